"""The Optuna study in its storage: opening it, and finding trials whose worker died.

The study lives in an Optuna storage (SQLite by default) so that running the same command again resumes
it, several worker processes can share it, and a worker that dies mid-trial is detected (RDB heartbeat,
plus an immediate check of local worker pids) and its trial is retried while its MLflow run is marked
KILLED.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ..config import ConfigError, TrainConfig
from ..outage import STOP_REASON_TAG, TAG_LIMIT, StorageOutage, pid_alive, redact, store_locked, tag_run
from .space import SearchSpace, make_pruner, make_sampler

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OBJECTIVE_NAME = "best_val_acc"  # how study plots and optuna-dashboard label the objective
MAX_RETRY = 3  # times one configuration is queued again after its worker died, along one chain of retries (deaths)
# The `fail_kind` user attribute of a failed trial: "interrupted" (Ctrl-C, SIGTERM) and "outage" (a store
# stopped answering) run again; "error" (an exception in training) does not, it would fail again.
RETRIED_KINDS = ("interrupted", "outage")
DIVERGED_ATTR = "diverged"  # a pruned trial's user attribute: why its training diverged (finish_study counts them)
# User attributes that describe one attempt, not the configuration: a retry starts without them.
ATTEMPT_ATTRS = ("worker", "mlflow_run_ids", "fail_reason", "fail_kind", "config_key", "reused_trial",
                 "trial_number", DIVERGED_ATTR)


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
    repeats: int = 1
    timeout: float | None = None
    heartbeat: int = 60  # seconds between liveness records of a running trial (RDB storages)
    workers: int = 1
    stack: int = 1  # trials trained at once as one stacked network (stacked.py)
    completion_workers: int | None = None  # processes completing a stack's runs; None: completion.worker_count
    refill: bool | None = None  # freed slots take the next trial; None: stacked.refills decides
    tracking_timeout: float = 120.0  # seconds the MLflow tracking server may be silent before a worker stops

    def validate(self) -> SweepSettings:
        """Raise ConfigError on the first setting that cannot go with the others; return self so calls chain.
        (Each setting alone is checked where it is parsed: TrainConfig.validate, SearchSpace.validate.)"""
        grid = bool(self.space.grid)
        if self.sampler == "grid" and not grid:
            raise ConfigError("--sampler grid needs --grid, e.g. --grid \"l1=0,0.001 l2=0,0.0005\"")
        if grid and self.sampler != "grid":
            raise ConfigError(f"--grid runs the grid sampler; it cannot be combined with --sampler {self.sampler}")
        if grid and self.trials > self.space.grid_size():  # Optuna's grid sampler stops the study once it is used
            raise ConfigError(f"--trials {self.trials} is more than the grid's {self.space.grid_size()} "
                              "configurations, each trained once (more seeds of each: --repeats)")
        if self.base.seed + self.repeats > 2**63:  # the seeds are seed, seed + 1, ...: each below 2**63, as --seed is
            raise ConfigError(f"--seed {self.base.seed} with --repeats {self.repeats} gives seeds of 2**63 and more; "
                              "use a smaller seed or fewer repeats")
        if self.study_name == WRITE_CHECK_STUDY:
            raise ConfigError(f"the study name {WRITE_CHECK_STUDY!r} (--study-name, which defaults to the experiment "
                              "name) is regsweep's own: it checks that the storage takes writes, and deletes that "
                              "study again; choose another")
        if self.refill and self.base.optimizer != "sgd":
            raise ConfigError(f"--refill needs --optimizer sgd: each member's learning rate scales SGD's update, "
                              f"not {self.base.optimizer}'s")
        return self


def open_storage(settings: SweepSettings, tracking_uri: str | None = None):
    """The Optuna storage, with heartbeats and a retry-and-mark-KILLED callback where the backend has them."""
    url = settings.storage
    on_stale = StaleTrialHandler(tracking_uri)
    # Heartbeats, retries and the matplotlib plots are marked experimental; they are what this module is for.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # study.ask warns that heartbeats are meant for study.optimize: a stacked sweep records them (Heartbeats).
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    if url.startswith("sqlite:") and url.removeprefix("sqlite:").strip("/") in ("", ":memory:"):
        # Each process (the driver, every worker) would open a database of its own, and nothing would resume.
        raise ConfigError(f"--storage {url} keeps the study in memory: give a file, e.g. sqlite:///optuna.db")
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=settings.heartbeat,
            grace_period=2 * settings.heartbeat, heartbeat_stale_trial_callback=on_stale)
        if url.startswith("sqlite:"):
            transactions_take_the_write_lock(storage.engine)
        return storage
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    raise ConfigError(f"unsupported --storage {redact(url)!r}: use sqlite:///FILE, postgresql://..., "
                      "or journal:FILE")


def transactions_take_the_write_lock(engine) -> None:
    """Begin each transaction of a SQLite engine with BEGIN IMMEDIATE (SQLAlchemy's recipe for pysqlite).

    Optuna reads a row, then writes it, trusting SELECT ... FOR UPDATE to keep another process out in between:
    claiming a queued trial as it asks, failing a dead worker's trial. SQLite has no row locks, and Python's
    driver begins no transaction before a SELECT, so two processes both read WAITING and both claimed one
    retry, or both failed one dead trial and queued two retries. Under the write lock from the
    first statement, the second reads what the first wrote. SQLite takes one writer at a time anyway."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def driver_begins_nothing(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # the connections made while the storage opened began their own way


class StaleTrialHandler:
    """A dead worker's trial: queue the same parameters again, then end its MLflow runs KILLED."""

    def __init__(self, tracking_uri: str | None = None):
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        queue_retry(study, trial)  # first: reconciliation ends the runs if MLflow fails here
        for run_id in trial.user_attrs.get("mlflow_run_ids", []):
            end_dead_run(run_id, f"worker died during trial {trial.number}; trial retried", self.tracking_uri)


class Heartbeats:
    """Heartbeats for trials that are asked and told (stacked.py), as `study.optimize` records them for its own.

    Optuna records a running trial's heartbeat only inside `study.optimize`. Without one, the trials of a
    stacked worker that dies on another host would stay RUNNING for good: `fail_stale_trials` finds only trials
    whose heartbeat stopped (reap_dead_local_trials covers this host's dead workers). A trial's first heartbeat
    is recorded as it is added, right after it is asked; then one thread records every trial each interval, as
    Optuna's per-trial thread would, until it is told (`discard`). A storage without heartbeats
    (journal:, or none configured) gets no thread.
    """

    def __init__(self, study: optuna.Study):
        self.storage = study._storage
        self.interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        self.trial_ids: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="regsweep-heartbeats", daemon=True)

    def add(self, trial: optuna.Trial) -> optuna.Trial:
        if self.interval:
            self.storage.record_heartbeat(trial._trial_id)
            self.trial_ids.append(trial._trial_id)
        return trial

    def discard(self, trial: optuna.Trial) -> None:
        """A trial that was told: no more heartbeats."""
        if trial._trial_id in self.trial_ids:
            self.trial_ids.remove(trial._trial_id)

    def __enter__(self) -> Heartbeats:
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=self.interval)  # a hung database call must not hold up a stop

    def beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                for trial_id in list(self.trial_ids):
                    self.storage.record_heartbeat(trial_id)
            except Exception as exc:  # noqa: BLE001 - the training thread meets an outage itself and stops with
                logging.getLogger(__name__).debug("could not record the trials' heartbeat: %s", exc)  # one line


def queue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue `trial`'s parameters again as a WAITING trial, unless its chain of retries has seen MAX_RETRY deaths.

    Optuna's own convention (RetryHeartbeatStaleTrialCallback): the system attributes `failed_trial` (the
    first attempt) and `retry_history` (every earlier attempt), so Optuna's helpers read them. The retry
    has the trial's parameters already set, so it trains exactly the interrupted configuration. Not twice: a
    worker that queued its trial's retry and was killed before it could fail the trial leaves it RUNNING, and
    the next start fails it and comes here again."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    trials = study.get_trials(deepcopy=False)
    if any(trial.number in t.system_attrs.get("retry_history", ()) for t in trials):
        return False
    if len(deaths(trials, history)) > MAX_RETRY:
        return False
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS},
        # The samplers' own attributes come along, as RetryFailedTrialCallback copies them: GridSampler's grid_id
        # above all, else the retry would be given the next grid point to train the failed one's parameters on,
        # and that point would never be trained.
        system_attrs={**trial.system_attrs, "failed_trial": history[0], "retry_history": history}))
    return True


def deaths(trials: list[optuna.trial.FrozenTrial], numbers: list[int]) -> list[int]:
    """Those of the trials `numbers` whose worker died without a word (killed, crashed): what MAX_RETRY counts. A
    configuration that kills its worker (out of memory, say) must not be retried for ever; a Ctrl-C, SIGTERM or
    outage says nothing about the configuration. (An outage of the storage itself leaves no word either, and
    counts: the worker could not record why it stopped.)"""
    kinds = {t.number: t.user_attrs.get("fail_kind", "") for t in trials}
    return [n for n in numbers if kinds.get(n) == ""]


def retried_trials(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """The numbers of the trials that have a retry queued (or run)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue again every failed trial that was interrupted (or whose worker died without a word) and has
    no retry yet: the worker queues its own, but it may have been stopped before it could."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_trials(trials)
    queued = []
    for trial in trials:
        kind = trial.user_attrs.get("fail_kind")
        silent = kind is None and "fail_reason" not in trial.user_attrs  # its worker died without a word
        if trial.state == TrialState.FAIL and (kind in RETRIED_KINDS or silent) and trial.number not in retried:
            if queue_retry(study, trial):
                queued.append(trial.number)
    return queued


def end_dead_run(run_id: str, reason: str, tracking_uri: str | None = None, state: str = "FAIL") -> bool:
    """End KILLED a RUNNING run that no live process will end (its worker died, or its trial ended without it),
    with the reason and its trial's state as `optuna.state`; a run already ended is left alone. Returns whether
    it ended it."""
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    if RunStatus.is_terminated(RunStatus.from_string(run.info.status)):
        return False
    tag_run(client, run_id, {STOP_REASON_TAG: reason[:TAG_LIMIT], "optuna.state": state})
    client.set_terminated(run_id, "KILLED")
    return True


@contextmanager
def storage_errors(storage: str):
    """A lost database connection means the Optuna storage is unreachable: raise StorageOutage, which
    stops the worker with one line, instead of failing the trial over it."""
    try:
        yield
    except Exception as exc:
        lost = lost_connection(exc)
        if lost is None:
            raise
        detail = str(getattr(lost, "orig", None) or lost).strip().splitlines()
        raise StorageOutage(f"the Optuna storage {redact(storage)} is unreachable"
                            f" ({detail[0] if detail else type(lost).__name__})") from exc


def causes(exc: BaseException | None, most: int = 10):
    """`exc` and the errors behind it. Optuna wraps a database error (StorageInternalError), and a failed commit
    inside its own trial bookkeeping can surface as a different error raised while handling it, so the chain of
    causes is followed."""
    while exc is not None and most > 0:
        yield exc
        exc, most = exc.__cause__ or exc.__context__, most - 1


def lost_connection(exc: BaseException) -> BaseException | None:
    """The SQLAlchemy connection error behind `exc`, if there is one."""
    import sqlalchemy.exc

    return next((e for e in causes(exc) if isinstance(e, (sqlalchemy.exc.OperationalError,
                                                          sqlalchemy.exc.InterfaceError))), None)


def claim(trial: optuna.Trial) -> optuna.Trial:
    """Record the trial's worker (host and pid), right after it is asked: what tells a dead worker's trial apart
    (reap_dead_local_trials)."""
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    return trial


def reap_dead_local_trials(study: optuna.Study, handler: StaleTrialHandler,
                           unclaimed_after: float | None = None) -> list[int]:
    """Fail RUNNING trials whose worker ran on this host and no longer exists, without waiting for the
    heartbeat grace period (and on journal storages, which have no heartbeat). With `unclaimed_after`, also
    those running for that many seconds without naming a worker (`claim`): a worker names itself moments
    after it asks, so theirs died in between, before a heartbeat was recorded too, and `fail_stale_trials` would
    never find them: they would stay RUNNING and count towards --trials for good. (Their age is read against this
    host's clock, as Optuna records the asking host's local time: hosts sharing a study are taken to agree on the
    time, to well within the grace period.)"""
    host, reaped = socket.gethostname(), []
    now = datetime.datetime.now()  # Optuna's datetime_start is the asking machine's local time
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None:
            started = trial.datetime_start or now
            if unclaimed_after is None or (now - started).total_seconds() < unclaimed_after:
                continue
        elif worker.get("host") != host or pid_alive(worker.get("pid", -1)):
            continue
        try:
            if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                handler(study, study._storage.get_trial(trial._trial_id))
                reaped.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process got there first
    return reaped


# Settings that say how a run executes or what it logs, not what it learns: two trials that differ only
# in these are the same configuration, and a finished one's result is reused for the other. The device is
# here (a study resumed on another machine reuses its results); the numerics switches (tf32, deterministic,
# precision) are not. The report groups runs more loosely (report/stats.py NOT_SETTINGS): for comparing,
# seeds and float rounding are noise it measures.
RUN_ONLY = ("threads", "log_model", "log_images", "data_dir", "download", "compile", "device", "cuda_graph")
SETTINGS_ATTR = "regsweep_settings"  # the study's user attribute holding study_settings from its first start


def deciding_settings(settings: SweepSettings, cfg: TrainConfig | None = None) -> dict:
    """What decides a trial's value: every setting of `cfg` (default: the sweep's base) but RUN_ONLY, and
    --repeats."""
    fields = dataclasses.asdict(cfg or settings.base)
    return {k: v for k, v in fields.items() if k not in RUN_ONLY} | {"repeats": settings.repeats}


def study_settings(settings: SweepSettings) -> dict[str, str]:
    """deciding_settings but l1, l2 and the seed, as text. A study keeps to those of its first start: trials
    trained otherwise would not compare, and its best trial would be picked among values of different
    experiments. Not the seed: it is noise the study's values carry anyway (the report treats it so too), and
    machines sharing a study may each give their own --seed, which also keeps their samplers apart."""
    return {k: str(v) for k, v in deciding_settings(settings).items() if k not in ("l1", "l2", "seed")}


def load_study(settings: SweepSettings, tracking_uri: str | None = None) -> optuna.Study:
    study = optuna.create_study(
        study_name=settings.study_name, storage=open_storage(settings, tracking_uri), load_if_exists=True,
        direction="maximize", pruner=make_pruner(settings.pruner, settings.base.epochs * settings.repeats))
    # Unseeded: TPE and random draw from the sampler seed_sampler makes for each trial; the grid keeps its own.
    study.sampler = make_sampler(settings.sampler, settings.space, None)
    if SETTINGS_ATTR not in study.user_attrs:  # its first start (or one from before the study kept them)
        study.set_user_attr(SETTINGS_ATTR, study_settings(settings))
    if study.metric_names != [OBJECTIVE_NAME]:
        study.set_metric_names([OBJECTIVE_NAME])
    return study


def sampler_seed(settings: SweepSettings, trial_number: int) -> int:
    """From --seed and the trial's number, mixed (not added: trial n under --seed s would draw what trial n + 1
    draws under s - 1, and machines sharing a study with their own --seed would train the same points)."""
    import numpy as np

    return int(np.random.SeedSequence([settings.base.seed % 2**32, trial_number]).generate_state(1)[0])


def seed_sampler(study: optuna.Study, settings: SweepSettings, trial: optuna.Trial) -> None:
    """A sampler seeded for this trial, before it suggests anything (Optuna samples when a trial first suggests).

    Seeded by the trial's number, which the storage hands out once: processes that join a study at the same
    moment (the same command on several machines, --workers, or a resume) each see the same trials and would
    otherwise draw the same suggestions and train them twice, and a restart would repeat the draws of the start
    before it. One process alone draws the same suggestions from the same --seed. The grid sampler keeps its one
    shuffle (make_sampler)."""
    if settings.sampler != "grid":
        study.sampler = make_sampler(settings.sampler, settings.space, sampler_seed(settings, trial.number))


def check_resumable(settings: SweepSettings) -> tuple[optuna.Study | None, SweepSettings]:
    """A study this command would resume must be one regsweep can take on (a single objective, maximised: one
    another tool made under the same name may not be) and accept its search space (SearchSpace.check_resumable)
    and settings. Returns the study, or None where there is none yet, and the settings to resume it with (a grid
    in the study's order)."""
    storage = check_writable(settings)
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=storage)
    except KeyError:  # no such study yet
        return None, settings
    if study.directions != [optuna.study.StudyDirection.MAXIMIZE]:
        directions = ", ".join(d.name.lower() for d in study.directions)
        raise ConfigError(f"study {settings.study_name!r} in this storage is not a regsweep study (it has "
                          f"{len(study.directions)} objective(s): {directions}; regsweep maximises one, validation "
                          "accuracy); choose another --study-name")
    settings = dataclasses.replace(settings, space=settings.space.check_resumable(study.get_trials(deepcopy=False)))
    kept, wanted = study.user_attrs.get(SETTINGS_ATTR), study_settings(settings)
    changed = [f"{k}={kept.get(k)} (now {v})" for k, v in wanted.items() if kept and kept.get(k) != v]
    if changed:
        raise ConfigError(f"study {settings.study_name!r} was run with {', '.join(changed)}: trials trained "
                          "otherwise would not compare with its earlier ones; resume it with its settings, or "
                          "start another with --study-name")
    return study, settings


WRITE_CHECK_STUDY = "regsweep-write-check"  # the empty study check_writable creates and deletes


def check_writable(settings: SweepSettings) -> optuna.storages.BaseStorage:
    """The storage, opened, once it has taken a write. One the sweep cannot write (a read-only SQLite file or
    PostgreSQL database, a role without write rights) is refused before anything is created: else it fails at
    the study's first write and looks like an unreachable database, whose advice, to run the same command again,
    never helps. The write creates a study of a name of its own and deletes it again: Optuna's storage API has no
    other write that leaves nothing behind."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line saying that the throwaway study was made
    try:
        with store_locked(settings.storage):  # an RDB storage makes its tables here, one process at a time
            storage = open_storage(settings)
        try:
            study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], WRITE_CHECK_STUDY)
        except optuna.exceptions.DuplicatedStudyError:
            # The database took the write up to the name's uniqueness (it refuses a read-only or forbidden write
            # before that): another start is checking at this moment, or one that was killed before it could
            # delete the study, or could not, left it behind. That one is deleted now where it can be.
            study_id = None
        try:
            with warnings.catch_warnings():  # SQLAlchemy's, where another start deleted it a moment before
                warnings.simplefilter("ignore")
                storage.delete_study(study_id if study_id is not None else storage.get_study_id_from_name(
                    WRITE_CHECK_STUDY))
        except Exception:  # noqa: BLE001 - a role that may write but not delete can still sweep
            pass  # (the study stays, empty, and the next start finds it there: one, whatever the starts)
        return storage
    except Exception as exc:
        denied = refused_write(exc)
        if denied is None:
            raise
        raise ConfigError(f"the Optuna storage {redact(settings.storage)} cannot be written ({denied}): the sweep "
                          "keeps its trials there; give a --storage this user can write") from None
    finally:
        optuna.logging.set_verbosity(verbosity)


def refused_write(exc: BaseException) -> str | None:
    """Why the database refused a write, if that is what `exc` is (SQLite's read-only file; PostgreSQL's
    read-only transaction, SQLSTATE 25006, or missing privilege, 42501): the first line of its message."""
    for orig in (getattr(e, "orig", None) for e in causes(exc)):
        if orig is not None:
            code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)  # psycopg 2 or 3
            message = str(orig).strip()
            if code in ("25006", "42501") or "readonly database" in message:
                return message.splitlines()[0]
    return None


def count_toward_trials(study: optuna.Study) -> int:
    """Trials that count towards --trials: finished ones and running ones (so that parallel workers stop at
    --trials between them)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,)))


def has_waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
