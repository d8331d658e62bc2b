"""An Optuna search over L1/L2: one MLflow parent run per study, one child run per trial.

Optuna touches two places: `suggest_penalties` turns a trial into (l1, l2), and `Objective` wraps it as
suggest -> train -> report/prune. The study lives in an Optuna storage (SQLite by default) so that
running the same command again resumes it, several worker processes can share it, and a worker that
dies mid-trial is detected (RDB heartbeat, plus an immediate check of local worker pids) and its trial
is retried while its MLflow run is marked KILLED.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import statistics
import warnings
from dataclasses import dataclass, field

import mlflow
import optuna
from mlflow.entities import Param, RunStatus
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from .config import ConfigError, TrainConfig, fmt_coef
from .tracking import terminal_status, use_experiment

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STUDY_TAG = "regsweep.study"


@dataclass(frozen=True)
class SearchSpace:
    """Each penalty is "off, or log-uniform in [low, high]" (off only if allowed), or an exact grid."""
    l1_range: tuple[float, float] = (1e-6, 1e-2)
    l2_range: tuple[float, float] = (1e-6, 1e-2)
    l1_zero: bool = True
    l2_zero: bool = True
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)  # {"l1": (0, 1e-3), "l2": (...)}

    def validate(self) -> SearchSpace:
        for name, (low, high) in (("l1", self.l1_range), ("l2", self.l2_range)):
            if not (0 < low <= high) or math.isinf(high):
                raise ConfigError(f"--{name}-range needs 0 < LOW <= HIGH (log scale), got {low} {high}")
        for name, values in self.grid.items():
            if any(math.isnan(v) or v < 0 or math.isinf(v) for v in values):
                raise ConfigError(f"grid values for {name} must be finite and >= 0, got {values}")
        return self

    def describe(self) -> dict:
        if self.grid:
            return {"grid": {k: list(v) for k, v in self.grid.items()}}
        return {"l1": {"range": list(self.l1_range), "log": True, "zero": self.l1_zero},
                "l2": {"range": list(self.l2_range), "log": True, "zero": self.l2_zero}}

    def grid_size(self) -> int:
        return len(self.grid.get("l1", (0,))) * len(self.grid.get("l2", (0,)))


def parse_grid(text: str) -> dict[str, tuple[float, ...]]:
    """'l1=0,0.001 l2=0,0.0005' -> {'l1': (0.0, 0.001), 'l2': (0.0, 0.0005)}."""
    grid = {}
    for part in text.split():
        match = re.fullmatch(r"(l1|l2)=([^=]+)", part)
        if not match:
            raise ConfigError(f"malformed --grid entry {part!r}; expected e.g. \"l1=0,0.001 l2=0,0.0005\"")
        try:
            values = tuple(float(v) for v in match.group(2).split(","))
        except ValueError:
            raise ConfigError(f"malformed --grid values in {part!r}: not numbers") from None
        if match.group(1) in grid:
            raise ConfigError(f"--grid names {match.group(1)} twice")
        grid[match.group(1)] = tuple(dict.fromkeys(values))  # keep order, drop repeats
    if not grid:
        raise ConfigError("--grid is empty; expected e.g. \"l1=0,0.001 l2=0,0.0005\"")
    return grid


def suggest_penalties(trial: optuna.Trial, space: SearchSpace) -> dict[str, float]:
    """The only place a trial becomes regularisation coefficients (define-by-run, conditional)."""
    values = {}
    for name, (low, high), zero in (("l1", space.l1_range, space.l1_zero), ("l2", space.l2_range, space.l2_zero)):
        if space.grid:
            values[name] = trial.suggest_categorical(name, list(space.grid.get(name, (0.0,))))
        elif zero and not trial.suggest_categorical(f"{name}_on", [False, True]):
            values[name] = 0.0
        else:
            values[name] = trial.suggest_float(name, low, high, log=True)
    return values


def make_sampler(name: str, space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "grid":
        grid = {k: list(space.grid.get(k, (0.0,))) for k in ("l1", "l2")}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # multivariate + group: TPE models l1 and l2 jointly and copes with the on/off branches.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=5)


def make_pruner(name: str, steps: int) -> optuna.pruners.BasePruner:
    """`steps`: reports per trial (epochs x repeats)."""
    if name == "median":
        # Compare against the median of at least 3 finished trials, and never before epoch 2:
        # first-epoch accuracy says little about where a run ends up.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=steps, reduction_factor=3)
    return optuna.pruners.NopPruner()


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


# ---------------------------------------------------------------- MLflow parent run


def parent_tags(settings: SweepSettings) -> dict[str, str]:
    return {STUDY_TAG: settings.study_name, "optuna.storage": redact(settings.storage),
            "optuna.sampler": settings.sampler, "optuna.pruner": settings.pruner,
            "optuna.search_space": json.dumps(settings.space.describe()),
            "optuna.repeats": str(settings.repeats), "optuna.n_trials": str(settings.trials),
            "regsweep.kind": "study"}


def find_or_create_parent(settings: SweepSettings, study: optuna.Study, experiment_id: str) -> str:
    """One parent run per study, found again on resume through the study's user attribute."""
    client = MlflowClient()
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            pass  # the tracking store was reset; make a new parent
    run = client.create_run(experiment_id, run_name=f"study {settings.study_name}", tags=parent_tags(settings))
    # The settings every trial shares, as params; the trial count is a tag because a rerun may raise it.
    fixed = {k: v for k, v in settings.base.as_params().items() if k not in ("l1", "l2")}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in fixed.items()])
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    winner = study.user_attrs["mlflow_parent_run_id"]  # read back from the storage
    if winner != run.info.run_id:  # another process created the parent at the same moment: use theirs
        client.delete_run(run.info.run_id)
    return winner


def trial_run_name(trial_number: int, penalties: dict[str, float]) -> str:
    return f"trial {trial_number:03d} l1={fmt_coef(penalties['l1'])} l2={fmt_coef(penalties['l2'])}"


# ---------------------------------------------------------------- objective


class Objective:
    """suggest -> train (one child run per seed) -> report each epoch -> prune or return the mean."""

    def __init__(self, settings: SweepSettings, data, parent_run_id: str, experiment_id: str):
        self.settings, self.data = settings, data
        self.parent_run_id, self.experiment_id = parent_run_id, experiment_id

    def __call__(self, trial: optuna.Trial) -> float:
        from .tracking import run_training
        from .training import DivergedError

        settings = self.settings
        penalties = suggest_penalties(trial, settings.space)
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        name = trial_run_name(trial.number, penalties)
        client = MlflowClient()
        tags = {"optuna.trial_number": str(trial.number), STUDY_TAG: settings.study_name,
                "optuna.state": "RUNNING"}
        # A retried trial arrives with the user attributes of the one whose worker died.
        retried = trial.user_attrs.get("trial_number")
        if retried is not None:
            tags["optuna.retry_of_trial"] = str(retried)
        trial.set_user_attr("trial_number", trial.number)
        # With repeats, the trial is a run of its own and each seed a child of it.
        trial_run = None
        if settings.repeats > 1:
            trial_run = client.create_run(self.experiment_id, run_name=name, tags={
                **tags, "mlflow.parentRunId": self.parent_run_id, "regime": TrainConfig(**penalties).regime})
        run_ids = [trial_run.info.run_id] if trial_run else []
        best_vals, state, reason = [], "COMPLETE", ""
        try:
            for r in range(settings.repeats):
                cfg = settings.base.replace(**penalties, seed=settings.base.seed + r)
                offset = r * cfg.epochs  # repeats report on consecutive steps, the same layout in every trial

                def report(epoch: int, metrics: dict[str, float], offset=offset) -> str | None:
                    trial.report(metrics["val/acc"], offset + epoch)
                    if trial.should_prune():
                        return (f"pruned by {settings.pruner} pruner at epoch {epoch}: "
                                f"val/acc {metrics['val/acc']:.4f}")
                    return None

                run = client.create_run(
                    self.experiment_id, run_name=name if trial_run is None else f"{name} s{cfg.seed}",
                    tags={**tags, "mlflow.parentRunId": run_ids[0] if trial_run else self.parent_run_id})
                run_ids.append(run.info.run_id)
                trial.set_user_attr("mlflow_run_ids", run_ids)  # lets a later process end them if we die
                try:
                    _, result = run_training(cfg, self.data, run_id=run.info.run_id, on_epoch=report)
                except DivergedError as exc:
                    # Pruned, not failed: a diverging configuration is a (bad) result, and failed trials do
                    # not count towards --trials, so a region of divergence would keep the sweep going forever.
                    state, reason = "PRUNED", f"diverged: {exc}"
                    raise optuna.TrialPruned(reason) from exc
                best_vals.append(result.summary["best_val_acc"])
                if result.stop_reason.startswith("pruned"):
                    state, reason = "PRUNED", result.stop_reason
                    raise optuna.TrialPruned(reason)
            return statistics.mean(best_vals)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: queue the same parameters, so that resuming the study re-runs this trial.
            state, reason = "FAIL", "interrupted (Ctrl-C or SIGTERM); queued again for the next start"
            trial.study.enqueue_trial(trial.params, user_attrs={"trial_number": trial.number})
            raise
        except BaseException as exc:
            state, reason = "FAIL", reason or f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            raise
        finally:
            for run_id in run_ids:
                client.set_tag(run_id, "optuna.state", state)
                if reason:
                    client.set_tag(run_id, "regsweep.stop_reason", reason[:5000])
            if trial_run is not None:
                summarise_repeats(client, trial_run.info.run_id, best_vals, state)


def summarise_repeats(client: MlflowClient, run_id: str, best_vals: list[float], state: str) -> None:
    """The trial-level run of a repeated configuration: mean, spread and a 95% t-interval over seeds."""
    from scipy import stats

    metrics = {"n_seeds": len(best_vals)}
    if best_vals:
        mean = statistics.mean(best_vals)
        metrics |= {"mean_best_val_acc": mean}
        if len(best_vals) > 1:
            sd = statistics.stdev(best_vals)
            half = stats.t.ppf(0.975, len(best_vals) - 1) * sd / math.sqrt(len(best_vals))
            metrics |= {"sd_best_val_acc": sd, "ci95_low_best_val_acc": mean - half,
                        "ci95_high_best_val_acc": mean + half}
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, "FINISHED" if state in ("COMPLETE", "PRUNED") else "FAILED")


# ---------------------------------------------------------------- running and finishing a study


def run_worker(settings: SweepSettings, parent_run_id: str, experiment_id: str, tracking_uri: str,
               worker_index: int = 0, threads: int = 0) -> None:
    """One worker: load data once, then take trials until the study has `trials` finished ones."""
    import torch

    from .data import load_mnist

    if threads:
        torch.set_num_threads(threads)
    mlflow.set_tracking_uri(tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(settings, tracking_uri, worker_index)
    base = settings.base
    data = load_mnist(base.resolved_data_dir(), base.val_size, base.max_train_samples, base.max_eval_samples,
                      base.download)
    objective = Objective(settings, data, parent_run_id, experiment_id)
    # Running trials count towards the total so that parallel workers stop at exactly `trials`.
    stop_at_total = optuna.study.MaxTrialsCallback(settings.trials, states=FINISHED + (TrialState.RUNNING,))
    if count_finished(study, include_running=True) < settings.trials or has_waiting(study):
        study.optimize(objective, callbacks=[stop_at_total], timeout=settings.timeout, gc_after_trial=True)


def threads_per_worker(workers: int, threads: int = 0) -> int:
    """torch threads for each of `workers` processes: `threads` if set, else the cores shared out evenly."""
    return threads or max(1, (os.cpu_count() or 1) // workers)


def has_waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def finish_study(settings: SweepSettings, study: optuna.Study, parent_run_id: str) -> dict:
    """Mark the best trial on the parent run and refresh the study's plots there."""
    client = MlflowClient()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for key, value in counts.items():
        client.log_metric(parent_run_id, f"trials_{key}", value)
    summary = {"counts": counts}
    if complete:
        best = max(complete, key=lambda t: t.value)
        runs = best.user_attrs.get("mlflow_run_ids", [])
        best_l1, best_l2 = effective_penalties(best)
        client.log_metric(parent_run_id, "best_value", best.value)
        client.log_metric(parent_run_id, "best_l1", best_l1)
        client.log_metric(parent_run_id, "best_l2", best_l2)
        client.set_tag(parent_run_id, "best_trial_number", str(best.number))
        client.set_tag(parent_run_id, "best_params", json.dumps({"l1": best_l1, "l2": best_l2}))
        if runs:
            client.set_tag(parent_run_id, "best_run_id", runs[0])
        summary |= {"best_value": best.value, "best_l1": best_l1, "best_l2": best_l2,
                    "best_trial": best.number, "best_run_id": runs[0] if runs else None}
    log_study_plots(study, parent_run_id)
    return summary


def effective_penalties(trial: optuna.trial.FrozenTrial) -> tuple[float, float]:
    """(l1, l2) as trained: a penalty switched off in the conditional space is 0."""
    return trial.params.get("l1", 0.0), trial.params.get("l2", 0.0)


def log_study_plots(study: optuna.Study, parent_run_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study),
        "param_importances.png": lambda: ovm.plot_param_importances(study),
        "contour_l1_l2.png": lambda: ovm.plot_contour(study, params=["l1", "l2"]),
        "intermediate_values.png": lambda: ovm.plot_intermediate_values(study),
    }
    client = MlflowClient()
    skipped = {}
    for name, draw in plots.items():
        try:
            ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 6)
            client.log_figure(parent_run_id, fig, f"study/{name}")
            plt.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"  # e.g. importances need 2+ complete trials
    client.log_dict(parent_run_id, {"skipped_plots": skipped}, "study/skipped_plots.json")
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "l1": effective_penalties(t)[0],
             "l2": effective_penalties(t)[1], "epochs": len(t.intermediate_values),
             "run_ids": ",".join(t.user_attrs.get("mlflow_run_ids", []))} for t in study.trials]
    import pandas as pd
    client.log_table(parent_run_id, pd.DataFrame(rows), "study/trials.json")


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
