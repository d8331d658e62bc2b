"""Completing a stack's member runs side by side, in worker processes.

Completing a run (its datasets, summary, tables, figures and model: what `regsweep train` logs after the
last epoch) costs a few seconds of one CPU core: matplotlib draws four figures, MLflow exports the model with
torch.export. A 32-member stack trains its epochs on a GPU in seconds, so completing its runs one after
another in the training process took longer than the training itself (docs/benchmarks.md). With workers,
each run is completed by one of several processes. They are spawned when the sweep starts, so that their
imports (matplotlib, and mlflow.pytorch where models are logged) and their loading of the data (the same
splits, from the same files) happen while the first stack trains. (Not the sweep's tensors through shared
memory: containers often give /dev/shm less room than MNIST's 200 MB.) Without workers (the default on the
CPU, see `worker_count`), the training process completes the runs one by one.

The training process keeps the study: it tells each trial its outcome once the trial's runs are complete,
and on Ctrl-C, SIGTERM or an outage it ends the runs itself, once no worker is completing one (so that no
worker ends a run FINISHED after the sweep ended it KILLED): workers skip the runs they have not begun, the
sweep waits for those in hand or, with the tracking store down, kills the workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

import mlflow

from ..config import TrainConfig
from ..data import MnistSplits, load_for
from ..models import count_parameters
from ..outage import when_parent_gone
from ..tracking import log_config, log_outcome, mlflow_run, pytorch_flavour
from ..training import DivergedError, FitResult


def complete_run(cfg: TrainConfig, result: FitResult, data: MnistSplits, run_id: str,
                 tags: dict[str, str]) -> None:
    """Complete a member's run as `regsweep train` would: datasets, summary, tables, figures, model. A
    diverged member's run ends FAILED with the reason, as a single run does. `tags`: tracking.device_tags,
    from the training process."""
    try:
        with mlflow_run(cfg, run_id=run_id, tags=tags):
            log_config(cfg, data, count_parameters(result.model))
            result.raise_if_diverged()
            log_outcome(cfg, result, data)
    except DivergedError:
        pass


STOP_WAIT = 60  # seconds a stopping sweep waits for the runs in hand; completing one takes a few
log = logging.getLogger(__name__)
# A completion worker's process state, set once by the pool's initializer (_start_worker), as a
# ProcessPoolExecutor's tasks can only reach it: unset in the sweep's own process.
_data: MnistSplits | None = None  # a worker's own copy of the sweep's data
_stopping = None  # set by the sweep when it stops: runs not yet begun are left to it


def _start_worker(tracking_uri: str, cfg: TrainConfig, stopping) -> None:
    global _data, _stopping
    # Spawned with Ctrl-C and SIGTERM ignored (see Completer): the sweep decides what becomes of the runs. A
    # worker finishes the run in hand (on SIGTERM sent to it alone, mlflow_run ends that run KILLED), and
    # leaves when the training process is gone, however it went.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    when_parent_gone(lambda: os._exit(1))
    import torch

    torch.set_num_threads(1)  # the workers share the cores among themselves
    mlflow.set_tracking_uri(tracking_uri)
    _data, _stopping = load_for(cfg), stopping
    if cfg.log_model:  # the slowest import, done before the first run arrives (sweeps log no model by default)
        pytorch_flavour()


def _complete_in_worker(cfg: TrainConfig, result: FitResult, run_id: str, tags: dict[str, str]) -> None:
    if not _stopping.is_set():
        complete_run(cfg, result, _data, run_id, tags)


@contextmanager
def signals_ignored():
    """Ctrl-C and SIGTERM ignored while processes are spawned: they keep ignoring them from their first
    instruction, before any import (Python installs no KeyboardInterrupt handler over an ignored SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker_count(requested: int | None, members: int, device: str, sweep_workers: int = 1) -> int:
    """--completion-workers as asked (at most one per member), or by default: on CUDA one per member up to
    the cores this sweep worker may use and does not train on (cores / --workers, less one), where at least
    two are spare (with one, the training process completes the runs itself; one worker against that has not
    been measured); on the CPU none. There training needs every core: workers spawned beside a training stack
    slowed a 4-member CPU sweep from 21.5 s to 29.9 s (`python benchmarks/stack.py --small`, 2-core CPU;
    docs/benchmarks.md), and completing the runs in place costs no more than spawning processes to do it."""
    if requested is not None:
        return min(requested, members)
    spare = len(os.sched_getaffinity(0)) // max(1, sweep_workers) - 1
    return min(members, spare) if device == "cuda" and spare >= 2 else 0


class Completer:
    """Completes member runs: in `workers` processes, or in this one when `workers` is 0. A context manager
    around the sweep's stacks. A run whose worker died (or was stopped alone) is completed here instead."""

    def __init__(self, data: MnistSplits, cfg: TrainConfig, workers: int):
        """`data`: the sweep's splits, loaded as `cfg` says (workers load them again from that)."""
        self.data, self.pool = data, None
        self.pending: dict[str, Future] = {}  # by run id: the runs handed to workers and not yet collected
        if workers:
            context = multiprocessing.get_context("spawn")
            self.stopping = context.Event()
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                            initargs=(mlflow.get_tracking_uri(), cfg, self.stopping))
            # Workers are spawned as work arrives: give each one a no-op now, so they all start importing.
            with signals_ignored():
                for _ in range(workers):
                    self.pool.submit(os.getpid)

    def start(self, job: tuple[TrainConfig, FitResult, str, dict[str, str]]) -> None:
        """Hand a member's run to a worker now, while the rest of its stack trains (a member that stopped
        early); `complete` collects it. Without workers this does nothing: `complete` does it here."""
        if self.pool is not None and job[2] not in self.pending:
            try:
                self.pending[job[2]] = self.pool.submit(_complete_in_worker, *job)
            except BrokenProcessPool:  # `complete` does it here
                pass

    def ready(self, run_ids: list[str]) -> bool:
        """Whether the workers have finished with these runs (those not handed to one are completed by `complete`)."""
        return all(self.pending[run_id].done() for run_id in run_ids if run_id in self.pending)

    def complete(self, jobs: list[tuple[TrainConfig, FitResult, str, dict[str, str]]]) -> list[Exception | None]:
        """Complete every (config, result, run_id, tags), those `start`ed already included; returns, per job, the
        error it raised or None. An error fails that run only (mlflow_run ends it FAILED); Ctrl-C and outages
        stop the lot (BaseException)."""
        errors: list[Exception | None] = [None] * len(jobs)
        here = list(range(len(jobs)))  # the jobs this process completes
        if self.pool is not None:
            for job in jobs:
                self.start(job)
            futures = [self.pending.get(job[2]) for job in jobs]
            wait([f for f in futures if f is not None])
            # Not submitted: a worker had died already, the pool was broken.
            outcomes = [f.exception() if f is not None else BrokenProcessPool("not submitted") for f in futures]
            for job in jobs:
                self.pending.pop(job[2], None)
            # A worker that died breaks the pool; one stopped alone returns its KeyboardInterrupt.
            here = [i for i, exc in enumerate(outcomes)
                    if isinstance(exc, BrokenProcessPool) or (exc is not None and not isinstance(exc, Exception))]
            for i, exc in enumerate(outcomes):
                if i not in here:
                    errors[i] = exc
            if here:
                log.warning("a completion worker stopped (%s); completing %d run(s) in the training process",
                            outcomes[here[0]].__class__.__name__, len(here))
                if any(isinstance(outcomes[i], BrokenProcessPool) for i in here):
                    self.end_workers()  # a broken pool takes no more work
        for i in here:
            try:
                cfg, result, run_id, tags = jobs[i]
                complete_run(cfg, result, self.data, run_id, tags)
            except Exception as exc:  # noqa: BLE001 - reported per run, as from a worker
                errors[i] = exc
        return errors

    def stop(self, tracking_down: bool = False) -> None:
        """The sweep stops: the workers skip runs not yet begun, and the runs in hand are waited for (a few
        seconds; at most STOP_WAIT, and not at all with the tracking store down, when they could only wait on
        it, or on one more Ctrl-C after the one terminal_status ignores). Workers still busy then are ended with
        their runs (the next start ends those KILLED)."""
        if self.pool is None:
            return
        self.stopping.set()
        for future in self.pending.values():
            future.cancel()
        in_hand = [f for f in self.pending.values() if not f.done()]
        self.pending = {}
        if in_hand and not tracking_down:
            log.warning("waiting for the %d run(s) being completed (at most %d s)", len(in_hand), STOP_WAIT)
            try:
                in_hand = list(wait(in_hand, timeout=STOP_WAIT).not_done)
            except KeyboardInterrupt:
                pass
        if in_hand:
            self.end_workers()

    def end_workers(self) -> None:
        """Kill the workers (they ignore SIGTERM) and drop the pool; later runs are completed here."""
        # ProcessPoolExecutor.terminate_workers arrives only in Python 3.14.
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        for process in processes:
            process.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=5)
        self.pool = None

    def __enter__(self) -> Completer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.stop(tracking_down=bool(getattr(exc, "tracking", False)))
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
