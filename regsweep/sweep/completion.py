"""Completing a stack's member runs side by side, in worker processes.

Completing a run (its datasets, summary, tables, figures and model: what `regsweep train` logs after the
last epoch) costs a few seconds of one CPU core: matplotlib draws four figures, MLflow exports the model with
torch.export. A 32-member stack trains its epochs on a GPU in seconds, so completing its runs one after
another in the training process took longer than the training itself (docs/benchmarks.md). With workers,
each run is completed by one of several processes. They are spawned when the sweep starts, so that their
imports (mlflow.pytorch, matplotlib) and their loading of the data (the same splits, from the same files)
happen while the first stack trains. (Not the sweep's tensors through shared memory: containers often give
/dev/shm less room than MNIST's 200 MB.) Without (the default on the CPU, see `worker_count`), the training process completes the
runs one by one.

The training process keeps the study: it tells each trial its outcome once the trial's runs are complete,
and on Ctrl-C, SIGTERM or an outage it ends the runs itself, after waiting for the runs in hand (so that no
worker ends a run FINISHED after the sweep ended it KILLED).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor, wait

import mlflow

from ..config import TrainConfig
from ..data import MnistSplits, load_for
from ..models import count_parameters
from ..tracking import log_config, log_outcome, mlflow_run
from ..training import DivergedError, FitResult


def complete_run(cfg: TrainConfig, result: FitResult, data: MnistSplits, run_id: str) -> None:
    """Complete a member's run as `regsweep train` would: datasets, summary, tables, figures, model. A
    diverged member's run ends FAILED with the reason, as a single run does."""
    try:
        with mlflow_run(cfg, run_id=run_id):
            log_config(cfg, data, count_parameters(result.model))
            if result.diverged:
                raise DivergedError(result.stop_reason.removeprefix("diverged: "))
            log_outcome(cfg, result, data)
    except DivergedError:
        pass


STOP_WAIT = 60  # seconds a stopping sweep waits for the runs in hand; completing one takes a few
_data: MnistSplits | None = None  # a worker's own copy of the sweep's data


def _start_worker(tracking_uri: str, cfg: TrainConfig) -> None:
    global _data
    # Ctrl-C reaches the whole process group, and a service manager may send SIGTERM to all of it. The sweep
    # decides what becomes of the runs; a worker only finishes the run in hand (or, on SIGTERM, ends it KILLED:
    # mlflow_run's handler) and stays alive for the pool's shutdown, so that the pool does not break.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)  # the workers share the cores among themselves
    mlflow.set_tracking_uri(tracking_uri)
    _data = load_for(cfg)
    importlib.import_module("mlflow.pytorch")  # the slowest import, done before the first run arrives


def _complete_in_worker(cfg: TrainConfig, result: FitResult, run_id: str) -> None:
    complete_run(cfg, result, _data, run_id)


def worker_count(requested: int | None, members: int, device: str) -> int:
    """--completion-workers as asked (at most one per member), or by default: on CUDA one per member up to the
    cores the training process leaves free; on the CPU none. There training needs every core: workers
    spawned beside a training stack slowed a 4-member CPU sweep from 22 s to 31 s
    (`python benchmarks/stack.py --small --rows 1,4`, 2-core CPU), and completing the runs in place costs no
    more than spawning processes to do it."""
    if requested is not None:
        return min(requested, members)
    spare = (os.cpu_count() or 1) - 1
    return min(members, spare) if device == "cuda" and spare >= 2 else 0


class Completer:
    """Completes member runs: in `workers` processes, or in this one when `workers` is 0. A context manager
    around the sweep's stacks."""

    def __init__(self, data: MnistSplits, cfg: TrainConfig, workers: int):
        """`data`: the sweep's splits, loaded as `cfg` says (workers load them again from that)."""
        self.data, self.pool = data, None
        self.pending: list[Future] = []
        if workers:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(mlflow.get_tracking_uri(), cfg))
            # Workers are spawned as work arrives: give each one a no-op now, so they all start importing.
            for _ in range(workers):
                self.pool.submit(os.getpid)

    def complete(self, jobs: list[tuple[TrainConfig, FitResult, str]]) -> list[Exception | None]:
        """Complete every (config, result, run_id); returns, per job, the error it raised or None. An error
        fails that run only (mlflow_run ends it FAILED); Ctrl-C and outages stop the lot (BaseException)."""
        if self.pool is None:
            errors: list[Exception | None] = []
            for job in jobs:
                try:
                    complete_run(job[0], job[1], self.data, job[2])
                    errors.append(None)
                except Exception as exc:  # noqa: BLE001 - reported per run, as from a worker
                    errors.append(exc)
            return errors
        self.pending = [self.pool.submit(_complete_in_worker, *job) for job in jobs]
        wait(self.pending)
        errors = [f.exception() for f in self.pending]
        self.pending = []
        return errors

    def stop(self, tracking_down: bool = False) -> None:
        """Drop the runs not yet started; wait for those in hand (a few seconds), unless the tracking store is
        down, when they could only wait on it: then the workers are ended, and their runs with them (the next
        start ends them KILLED). The wait is bounded: a worker that died meanwhile can leave its future
        unresolved (Python 3.11's pool fails to mark it once another was cancelled)."""
        if self.pool is None:
            return
        for future in self.pending:
            future.cancel()
        if tracking_down or wait(self.pending, timeout=STOP_WAIT).not_done:
            # ProcessPoolExecutor.terminate_workers arrives only in Python 3.14.
            for process in list((getattr(self.pool, "_processes", None) or {}).values()):
                process.terminate()
        self.pending = []

    def __enter__(self) -> Completer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is None:
            return
        tracking_down = bool(getattr(exc, "tracking", False))
        if exc is not None:
            self.stop(tracking_down)
        self.pool.shutdown(wait=not tracking_down, cancel_futures=True)
