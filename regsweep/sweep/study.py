"""The Optuna study in its storage: opening it, and finding trials whose worker died.

The study lives in an Optuna storage (SQLite by default) so that running the same command again resumes
it, several worker processes can share it, and a worker that dies mid-trial is detected (RDB heartbeat,
plus an immediate check of local worker pids) and its trial is retried while its MLflow run is marked
KILLED.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from dataclasses import dataclass

import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ..config import ConfigError, TrainConfig
from .space import SearchSpace, make_pruner, make_sampler

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class SweepSettings:
    """Everything a worker needs; picklable, so worker processes rebuild their study from it."""
    base: TrainConfig
    space: SearchSpace
    trials: int
    study_name: str
    storage: str
    experiment_name: str
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int | None = 0
    repeats: int = 1
    timeout: float | None = None
    heartbeat: int = 60  # seconds between liveness records of a running trial (RDB storages)
    workers: int = 1
    stack: int = 1  # trials trained at once as one stacked network (stacked.py)


def redact(url: str) -> str:
    """Storage URLs go into MLflow tags: never with a password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def open_storage(settings: SweepSettings, tracking_uri: str | None = None):
    """The Optuna storage, with heartbeats and a retry-and-mark-KILLED callback where the backend has them."""
    url = settings.storage
    on_stale = StaleTrialHandler(tracking_uri)
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=settings.heartbeat,
            grace_period=2 * settings.heartbeat, heartbeat_stale_trial_callback=on_stale)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    raise ConfigError(f"unsupported --storage {redact(url)!r}: use sqlite:///FILE, postgresql://..., "
                      "or journal:FILE")


class StaleTrialHandler:
    """A dead worker's trial: end its MLflow run as KILLED, then queue the same parameters again."""

    def __init__(self, tracking_uri: str | None = None, max_retry: int = 3):
        self.tracking_uri = tracking_uri
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        for run_id in trial.user_attrs.get("mlflow_run_ids", []):
            end_dead_run(run_id, f"worker died during trial {trial.number}; trial retried", self.tracking_uri)
        self.retry(study, trial)


def end_dead_run(run_id: str, reason: str, tracking_uri: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    if not RunStatus.is_terminated(RunStatus.from_string(run.info.status)):
        client.set_tag(run_id, "regsweep.stop_reason", reason)
        client.set_tag(run_id, "optuna.state", "FAIL")
        client.set_terminated(run_id, "KILLED")


def reap_dead_local_trials(study: optuna.Study, handler: StaleTrialHandler) -> list[int]:
    """Fail RUNNING trials whose worker ran on this host and no longer exists, without waiting for the
    heartbeat grace period (and on journal storages, which have no heartbeat)."""
    host, reaped = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", {})
        if worker.get("host") != host or pid_alive(worker.get("pid", -1)):
            continue
        try:
            if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                handler(study, study._storage.get_trial(trial._trial_id))
                reaped.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process got there first
    return reaped


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return True


def load_study(settings: SweepSettings, tracking_uri: str | None = None, worker_index: int = 0) -> optuna.Study:
    # Heartbeats, retries and the matplotlib plots are marked experimental; they are what this module is for.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(
        study_name=settings.study_name, storage=open_storage(settings, tracking_uri), load_if_exists=True,
        direction="maximize", pruner=make_pruner(settings.pruner, settings.base.epochs * settings.repeats))
    # Seeded per worker and per resume: the same seed in every worker, or again after a restart, would
    # repeat the same random suggestions instead of exploring.
    seed = None if settings.seed is None else settings.seed + 1000 * worker_index + len(study.trials)
    study.sampler = make_sampler(settings.sampler, settings.space, seed)
    return study


def count_finished(study: optuna.Study, include_running: bool = False) -> int:
    states = FINISHED + ((TrialState.RUNNING,) if include_running else ())
    return len(study.get_trials(deepcopy=False, states=states))


def has_waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
