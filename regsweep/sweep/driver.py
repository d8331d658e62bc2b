"""Running a study: create or resume it and its parent run, run the workers, mark the best trial."""

from __future__ import annotations

import os

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ..tracking import terminal_status, use_experiment
from .objective import Objective
from .runs import find_or_create_parent, finish_study
from .stacked import run_stacked
from .study import (FINISHED, StaleTrialHandler, SweepSettings, count_finished, has_waiting, load_study,
                    reap_dead_local_trials)


def run_worker(settings: SweepSettings, parent_run_id: str, experiment_id: str, tracking_uri: str,
               worker_index: int = 0, threads: int = 0) -> None:
    """One worker: load data once, then take trials until the study has `trials` finished ones."""
    import torch

    from ..data import load_mnist

    if threads:
        torch.set_num_threads(threads)
    mlflow.set_tracking_uri(tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(settings, tracking_uri, worker_index)
    base = settings.base
    data = load_mnist(base.resolved_data_dir(), base.val_size, base.max_train_samples, base.max_eval_samples,
                      base.download)
    if settings.stack > 1:
        run_stacked(settings, study, data, parent_run_id, experiment_id)
        return
    objective = Objective(settings, data, parent_run_id, experiment_id)
    # Running trials count towards the total so that parallel workers stop at exactly `trials`.
    stop_at_total = optuna.study.MaxTrialsCallback(settings.trials, states=FINISHED + (TrialState.RUNNING,))
    if count_finished(study, include_running=True) < settings.trials or has_waiting(study):
        study.optimize(objective, callbacks=[stop_at_total], timeout=settings.timeout, gc_after_trial=True)


def threads_per_worker(workers: int, threads: int = 0) -> int:
    """torch threads for each of `workers` processes: `threads` if set, else the cores shared out evenly."""
    return threads or max(1, (os.cpu_count() or 1) // workers)


def optimize(settings: SweepSettings) -> dict:
    """Create or resume the study and its parent run, run the workers, then mark the best trial.

    With workers > 1, each is a separate process (spawned, so each loads its data once and owns its torch
    threads: cores / workers). All share the study through its storage.
    """
    import multiprocessing

    client = MlflowClient()
    tracking_uri = mlflow.get_tracking_uri()
    experiment_id = use_experiment(settings.experiment_name)
    study = load_study(settings, tracking_uri)
    parent_run_id = find_or_create_parent(settings, study, experiment_id)
    client.update_run(parent_run_id, status="RUNNING")
    # Trials of workers that died since the last start: fail them, end their runs KILLED, queue retries.
    handler = StaleTrialHandler(tracking_uri)
    reap_dead_local_trials(study, handler)
    optuna.storages.fail_stale_trials(study)

    status, procs = "FINISHED", []
    try:
        with terminal_status():  # SIGTERM, like Ctrl-C, ends the parent run KILLED
            if settings.workers == 1:
                run_worker(settings, parent_run_id, experiment_id, tracking_uri, 0, settings.base.threads)
            else:
                threads = threads_per_worker(settings.workers, settings.base.threads)
                ctx = multiprocessing.get_context("spawn")
                procs = [ctx.Process(target=run_worker, name=f"regsweep-worker-{i}",
                                     args=(settings, parent_run_id, experiment_id, tracking_uri, i, threads))
                         for i in range(settings.workers)]
                for proc in procs:
                    proc.start()
                for proc in procs:
                    proc.join()
                reap_dead_local_trials(study, handler)  # a worker that crashed leaves its trial RUNNING
    except KeyboardInterrupt:
        status = "KILLED"
        for proc in procs:  # each worker ends its own trial's run KILLED on SIGTERM
            proc.terminate()
            proc.join()
        raise
    finally:
        summary = finish_study(settings, study, parent_run_id)
        client.set_terminated(parent_run_id, status)
    return summary | {"parent_run_id": parent_run_id, "experiment_id": experiment_id}
