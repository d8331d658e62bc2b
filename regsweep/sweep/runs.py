"""The study's side in MLflow: one parent run per study, trial run names, repeat summaries, the best
trial and the study's plots on the parent."""

from __future__ import annotations

import json
import math
import time
import warnings

import mlflow
import optuna
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ..config import ConfigError, TrainConfig, fmt_coef
from ..outage import redact, tag_run
from .space import effective_penalties
from .study import DIVERGED_ATTR, SweepSettings

STUDY_TAG = "regsweep.study"
TRIALS_TABLE = "study/trials.json"  # the study's trials, on its parent run, as an MLflow table
RACE_WINDOW_MS = 60_000  # commands racing to create a study's parent run start within this of each other


SEARCH_TAGS = ("optuna.sampler", "optuna.pruner", "optuna.search_space", "optuna.n_trials")  # may change on resume


def parent_tags(settings: SweepSettings) -> dict[str, str]:
    return {STUDY_TAG: settings.study_name, "optuna.storage": redact(settings.storage),
            "optuna.sampler": settings.sampler, "optuna.pruner": settings.pruner,
            "optuna.search_space": json.dumps(settings.space.describe()),
            "optuna.repeats": str(settings.repeats), "optuna.n_trials": str(settings.trials),
            "regsweep.kind": "study"}


def check_parent(settings: SweepSettings, study: optuna.Study | None) -> None:
    """A resumed study's parent run must be one the sweep can go on under: not deleted, and in the experiment
    this command logs into (its new trials' runs would otherwise land in another experiment than its earlier
    ones, and a report of either would miss them). A parent that is gone altogether (a new tracking store) is
    made anew."""
    run_id = study.user_attrs.get("mlflow_parent_run_id") if study is not None else None
    if not run_id:
        return
    client = MlflowClient()
    try:
        parent = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return
    if parent.info.lifecycle_stage == "deleted":
        raise ConfigError(f"study {settings.study_name!r}'s parent run {run_id} is deleted in MLflow: restore it "
                          f"(mlflow runs restore --run-id {run_id}) or start another study with --study-name")
    try:
        logged_in = client.get_experiment(parent.info.experiment_id).name
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"cannot read the experiment of study {settings.study_name!r}'s parent run {run_id}: "
                          f"{str(exc).splitlines()[0]}") from None
    if logged_in != settings.experiment_name:
        raise ConfigError(f"study {settings.study_name!r} logs into MLflow experiment {logged_in!r}; resume it "
                          f"with --experiment-name {logged_in!r}, or start another study with --study-name")


def same_name_elsewhere(settings: SweepSettings) -> list[tuple[str, str]]:
    """(parent run, storage as given) of the studies of this name in the experiment, for a study about to be made
    in this storage: so they are kept in another (or in a storage since deleted). With the default storage, a
    relative `sqlite:///optuna.db`, a command run from another folder starts a new study where its user meant to
    resume one; the storage tags, as given, are then the same."""
    client = MlflowClient()
    try:
        experiment = client.get_experiment_by_name(settings.experiment_name)
        parents = [] if experiment is None else client.search_runs(
            [experiment.experiment_id], "tags.`regsweep.kind` = 'study'", max_results=1000)
    except Exception:  # noqa: BLE001 - for a note only: the store's own errors come up where the sweep needs it
        return []
    return [(r.info.run_id, r.data.tags.get("optuna.storage", "")) for r in parents  # names may hold any character:
            if r.data.tags.get(STUDY_TAG) == settings.study_name]  # compared here, not in the filter


def find_or_create_parent(settings: SweepSettings, study: optuna.Study, experiment_id: str) -> str:
    """One parent run per study, found again on resume through the study's user attribute."""
    client = MlflowClient()
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    tags = parent_tags(settings)
    if run_id:
        try:
            kept = client.get_run(run_id).data.tags
        except mlflow.exceptions.MlflowException:
            pass  # the tracking store was reset; make a new parent
        else:
            # A resume may raise --trials or search on with another sampler, pruner or range: the parent says
            # what the study is now searching for.
            changed = {k: tags[k] for k in SEARCH_TAGS if kept.get(k) != tags[k]}
            if changed:
                tag_run(client, run_id, changed)
            return run_id
    run = create_run(client, experiment_id, f"study {settings.study_name}", tags)
    # The settings every trial shares, as params; the trial count is a tag because a rerun may raise it.
    fixed = {k: v for k, v in settings.base.as_params().items() if k not in ("l1", "l2")}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in fixed.items()])
    # The trials table is made here, by the one process that made the run, and only rewritten after: made by the
    # first command to end the sweep, two ending at once both made it (log_table appends: doubled rows).
    try:
        client.log_table(run.info.run_id, trials_table(study), TRIALS_TABLE)
    except Exception:  # noqa: BLE001 - an artifact store's own errors (S3's, GCS's) are neither OSError nor MLflow's
        pass  # made at the end instead, where an artifact store that cannot be written fails the run it completes
    # Commands started on the same study at the same moment (several hosts) each got here. The user attribute
    # cannot settle it (the last write wins), so every one keeps the earliest parent: whichever created its
    # run later sees the earlier one, so they all agree (as long as the hosts' clocks agree more closely than
    # the time between two such creations). Parents of earlier studies of the same name (a deleted storage)
    # are older than any such race and are left alone.
    since = run.info.start_time - RACE_WINDOW_MS
    rivals = [r for r in client.search_runs([experiment_id], filter_string=(
        f"tags.`regsweep.kind` = 'study' and attributes.start_time >= {since}"), max_results=1000)
        if all(r.data.tags.get(k) == tags[k] for k in (STUDY_TAG, "optuna.storage"))]
    winner = min([run, *rivals], key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    if winner != run.info.run_id:
        client.set_terminated(run.info.run_id, "KILLED")  # not RUNNING among the deleted runs
        client.delete_run(run.info.run_id)
    study.set_user_attr("mlflow_parent_run_id", winner)
    return winner


def create_run(client: MlflowClient, experiment_id: str, run_name: str | None, tags: dict[str, str]):
    """`client.create_run` with the tags `mlflow.start_run` adds by itself (user, source, git commit), so
    that a sweep's runs say where they came from, as a `regsweep train` run does."""
    from mlflow.tracking.context.registry import resolve_tags

    return client.create_run(experiment_id, run_name=run_name, tags=resolve_tags(tags))


def coefficients(cfg: TrainConfig) -> list[Metric]:
    """tracking.coefficient_metrics for client.log_batch: a sweep's runs sort by l1 and l2 from their creation."""
    from ..tracking import coefficient_metrics

    now = int(time.time() * 1000)
    return [Metric(key, value, now, 0) for key, value in coefficient_metrics(cfg).items()]


def repeats_params(cfg: TrainConfig, repeats: int, n_params: int, data) -> list[Param]:
    """The params of the run that holds a configuration's seeds under --repeats: those of its seed runs, so
    that it shows, sorts and filters by them beside them in the MLflow UI, with `seeds` (first-last) instead
    of `seed` (it trains nothing itself, and the report tells it from training runs by that)."""
    from ..tracking import run_params

    params = run_params(cfg, data, n_params)
    first = int(params.pop("seed"))
    return [Param(k, v) for k, v in params.items()] + [Param("seeds", f"{first}-{first + repeats - 1}")]


def trial_run_name(trial_number: int, penalties: dict[str, float]) -> str:
    return f"trial {trial_number:03d} l1={fmt_coef(penalties['l1'])} l2={fmt_coef(penalties['l2'])}"


def seed_config(settings: SweepSettings, penalties: dict[str, float], repeat: int) -> TrainConfig:
    """Repeat `repeat` (0-based) of a trial's configuration: its seed is the base seed plus the repeat."""
    return settings.base.replace(**penalties, seed=settings.base.seed + repeat)


def report_step(repeat: int, epoch: int, epochs: int) -> int:
    """The step a repeat's epoch reports to its trial: repeats on consecutive steps, the same layout in every
    trial (so the pruner compares like with like)."""
    return repeat * epochs + epoch


def prune_reason(pruner: str, epoch: int, val_acc: float) -> str:
    return f"pruned by {pruner} pruner at epoch {epoch}: val/acc {val_acc:.4f}"


def create_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, name: str, tags: dict[str, str],
                     penalties: dict[str, float]) -> str:
    """Under --repeats, the run that holds a trial's seed runs (named `seed_run_name`); log_trial_run fills it."""
    return create_run(client, experiment_id, name, {
        **tags, "mlflow.parentRunId": parent_run_id, "regime": TrainConfig(**penalties).regime}).info.run_id


def log_trial_run(client: MlflowClient, run_id: str, settings: SweepSettings, penalties: dict[str, float],
                  n_params: int, data) -> None:
    """The trial run's params (those of its seed runs: repeats_params) and coefficients."""
    first = seed_config(settings, penalties, 0)
    client.log_batch(run_id, metrics=coefficients(first),
                     params=repeats_params(first, settings.repeats, n_params, data))


def seed_run_name(trial_name: str, cfg: TrainConfig, repeats: int) -> str:
    return trial_name if repeats == 1 else f"{trial_name} s{cfg.seed}"


def summarise_repeats(client: MlflowClient, run_id: str, best_vals: list[float], state: str,
                      killed: bool = False) -> None:
    """The trial-level run of a repeated configuration: mean, spread and a 95% t-interval over seeds. It ends
    as its seed runs do: FINISHED for a complete or pruned trial, KILLED when stopped (`killed`: a signal, an
    outage), else FAILED."""
    from ..report.stats import mean_ci

    summary = mean_ci(best_vals, bounds=(0.0, 1.0))
    metrics = {"n_seeds": summary["n"], "mean_best_val_acc": summary["mean"], "sd_best_val_acc": summary["sd"],
               "ci95_low_best_val_acc": summary["ci_low"], "ci95_high_best_val_acc": summary["ci_high"]}
    for key, value in metrics.items():
        if not math.isnan(value):  # no mean without seeds, no spread with one
            client.log_metric(run_id, key, value)
    client.set_terminated(run_id, "FINISHED" if state in ("COMPLETE", "PRUNED") else "KILLED" if killed else "FAILED")


def finish_study(study: optuna.Study, parent_run_id: str) -> dict:
    """Mark the best trial on the parent run and refresh the study's plots there."""
    client = MlflowClient()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for key, value in counts.items():
        client.log_metric(parent_run_id, f"trials_{key}", value)
    surplus = sum(t.user_attrs.get("fail_kind") == "surplus"
                  for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    diverged = [t.user_attrs[DIVERGED_ATTR] for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
                if DIVERGED_ATTR in t.user_attrs]
    summary = {"counts": counts, "surplus": surplus, "diverged": len(diverged),
               "diverged_example": diverged[0] if diverged else ""}
    if complete:
        # As study.best_trial, but of equal values the lowest-numbered trial wins, on every storage (Optuna's
        # query leaves a tie to the database's row order).
        best = max(complete, key=lambda t: t.value)
        runs = best.user_attrs.get("mlflow_run_ids", [])
        best_l1, best_l2 = effective_penalties(best)
        client.log_metric(parent_run_id, "best_value", best.value)
        client.log_metric(parent_run_id, "best_l1", best_l1)
        client.log_metric(parent_run_id, "best_l2", best_l2)
        best_tags = {"best_trial_number": str(best.number), "best_params": json.dumps({"l1": best_l1, "l2": best_l2})}
        tag_run(client, parent_run_id, best_tags | ({"best_run_id": runs[0]} if runs else {}))
        summary |= {"best_value": best.value, "best_l1": best_l1, "best_l2": best_l2,
                    "best_trial": best.number, "best_run_id": runs[0] if runs else None}
    log_study_plots(study, parent_run_id)
    return summary


def log_study_plots(study: optuna.Study, parent_run_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from ..tracking import hidden_imports

    # optuna.importance imports scikit-learn for its fANOVA evaluator: a second on a fast machine, in a sweep's
    # last seconds. The importance plot uses PED-ANOVA (Optuna's default from 5.0 on, and much faster), which
    # does not need it. Optuna's scikit-learn evaluators (fANOVA, mean decrease impurity) then stay unavailable
    # in this process; a caller that wants them imports optuna.importance before the sweep, and this hides nothing.
    with hidden_imports("sklearn"):
        from optuna.importance import PedAnovaImportanceEvaluator

    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study),
        "param_importances.png": lambda: ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator()),
        "contour_l1_l2.png": lambda: ovm.plot_contour(study, params=["l1", "l2"]),
        "intermediate_values.png": lambda: ovm.plot_intermediate_values(study),
    }
    client = MlflowClient()
    skipped = {}
    # Small studies draw these with warnings about too few trials (importances, contour); the plots say as
    # much themselves, and what could not be drawn at all is listed in study/skipped_plots.json.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"optuna\.(importance|visualization)")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        for name, draw in plots.items():
            try:
                ax = draw()
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(8, 6)
                client.log_figure(parent_run_id, fig, f"study/{name}")
                plt.close(fig)
            except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
                skipped[name] = f"{type(exc).__name__}: {exc}"  # e.g. importances need 2+ complete trials
    finally:
        optuna.logging.set_verbosity(verbosity)
    client.log_dict(parent_run_id, {"skipped_plots": skipped}, "study/skipped_plots.json")
    log_trials_table(client, study, parent_run_id)


def trials_table(study: optuna.Study):
    """One row per trial: its number, state, value, penalties, epochs reported and MLflow runs."""
    import pandas as pd

    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "l1": effective_penalties(t)[0],
             "l2": effective_penalties(t)[1], "epochs": len(t.intermediate_values),
             "run_ids": ",".join(t.user_attrs.get("mlflow_run_ids", []))} for t in study.trials]
    return pd.DataFrame(rows, columns=["number", "state", "value", "l1", "l2", "epochs", "run_ids"])


def log_trials_table(client: MlflowClient, study: optuna.Study, parent_run_id: str) -> None:
    table = trials_table(study)
    if any(a.path == TRIALS_TABLE for a in client.list_artifacts(parent_run_id, "study")):
        # log_table appends to a table the run has: each resume would list the earlier trials again. The file
        # is rewritten whole instead, in the format log_table writes (its first call marked it as a table).
        client.log_dict(parent_run_id, json.loads(table.to_json(orient="split", index=False)), TRIALS_TABLE)
    else:  # a parent whose command stopped between making it and making its table
        client.log_table(parent_run_id, table, TRIALS_TABLE)
