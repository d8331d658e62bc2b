"""Everything the report reads from MLflow, and nothing else does.

`fetch_runs` brings the runs into pandas with `mlflow.search_runs`: one call for an experiment or `--runs`,
one more to find a study's parent, and one more where `--filter` narrows a sweep or `--runs`. From that
frame it decides which metric histories the figures need, and fetches only those, concurrently; the test
predictions of the runs the figures compare come the same way. A study's Optuna plots, a few files, come
one after another.
Every later step takes these DataFrames, so the maths is tested without MLflow.
"""

from __future__ import annotations

import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..experiment import PREDICTIONS
from . import stats

CURVES = ("val/acc", "test/loss", "train/acc")  # figures 1 and 2, and the max train accuracy of the table
THREADS = 8  # concurrent history requests: each is one small query, mostly waiting on the store


class ReportError(ValueError):
    """The selection cannot be reported (unknown experiment, study or run, a rejected filter, no runs);
    found before anything is written or logged."""


@dataclass(frozen=True)
class Selection:
    """Which runs to report. At most one of study_name, parent_run_id and run_ids; `filter_string` (an MLflow
    search filter) narrows any of them."""
    experiment_name: str = "regsweep"
    study_name: str | None = None
    parent_run_id: str | None = None
    filter_string: str | None = None
    run_ids: tuple[str, ...] = ()

    def check(self) -> Selection:
        chosen = [name for name, value in (("--study-name", self.study_name), ("--parent-run-id",
                  self.parent_run_id), ("--runs", self.run_ids)) if value]
        if len(chosen) > 1:
            raise ReportError(f"{' and '.join(chosen)} each select runs; give one of them")
        return self


@dataclass
class Fetched:
    """What the report is made of: every run the selection matched, and the histories it needs."""
    runs: pd.DataFrame  # search_runs frame of every matched run (unfinished and non-training ones included)
    histories: pd.DataFrame  # long: run_id, key, step, value
    name: str  # the study, parent run or experiment: names the default output folder and the report run
    experiment_id: str
    parent_run_id: str | None = None  # where the report is logged, when the selection is a sweep
    description: str = ""  # the selection, in words


def search(experiment_ids: list[str] | None, filter_string: str | None = None, **kwargs) -> pd.DataFrame:
    try:
        return mlflow.search_runs(experiment_ids=experiment_ids, filter_string=filter_string or "",
                                  output_format="pandas", **kwargs)
    except MlflowException as exc:
        first = str(exc.message if hasattr(exc, "message") else exc).strip().splitlines()[0]
        raise ReportError(f"MLflow rejects the filter {filter_string!r}: {first}") from None


def descendants(runs: pd.DataFrame, root: str) -> pd.DataFrame:
    """Children of `root`, their children, and so on (a sweep's trials and, with repeats, their seeds)."""
    parent = runs.get("tags.mlflow.parentRunId", pd.Series(None, index=runs.index, dtype=object))
    found, frontier = set(), {root}
    while frontier:
        frontier = set(runs.loc[parent.isin(frontier), "run_id"]) - found
        found |= frontier
    return runs[runs["run_id"].isin(found)]


def experiment_id_of(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ReportError(f"no MLflow experiment {name!r} (experiments: {known}); choose one with "
                          "--experiment-name (regsweep train logs into MLflow's Default unless given one)")
    return experiment.experiment_id


def select(selection: Selection, client: MlflowClient) -> tuple[pd.DataFrame, dict]:
    """The runs the selection names, as one search frame, plus where they came from."""
    selection.check()
    if selection.run_ids:
        ids = list(dict.fromkeys(selection.run_ids))
        malformed = [i for i in ids if not re.fullmatch(r"[A-Za-z0-9_-]+", i)]
        if malformed:  # MLflow's run ids are hex; anything else would also break the filter below
            raise ReportError(f"not a run id: {', '.join(repr(i) for i in malformed)}")
        quoted = ", ".join(f"'{i}'" for i in ids)
        runs = search(None, f"attributes.run_id IN ({quoted})", search_all_experiments=True)
        missing = [i for i in ids if i not in set(runs.get("run_id", ()))]
        if missing:
            raise ReportError(f"no run with id {', '.join(missing)}")
        if selection.filter_string:
            narrowed = search(None, selection.filter_string, search_all_experiments=True)
            runs = runs[runs["run_id"].isin(set(narrowed.get("run_id", ())))]
        foreign = runs.loc[stats.classify_runs(runs) != "training", "run_id"].tolist()
        if foreign:
            raise ReportError(f"not regsweep training runs (which have l1, l2, seed and model params; a sweep's "
                              f"study and the runs holding a trial's seeds have no seed: give those as "
                              f"--parent-run-id): {', '.join(foreign)}")
        experiment_id = str(runs["experiment_id"].iloc[0]) if len(runs) else "0"
        return runs, {"name": "runs", "experiment_id": experiment_id, "description": f"{len(ids)} named runs"}

    if selection.parent_run_id:
        try:
            parent = client.get_run(selection.parent_run_id)
        except MlflowException:
            raise ReportError(f"no run with id {selection.parent_run_id!r} (--parent-run-id)") from None
        experiment_id, root = parent.info.experiment_id, parent.info.run_id
        # A study's parent names the report after the study; any other run (a trial's, whose runs carry the study's
        # tag too) after itself, so that its report does not land in, and replace, the study's folder.
        study = parent.data.tags.get("regsweep.study") if parent.data.tags.get("regsweep.kind") == "study" else None
        name = study or f"{parent.info.run_name or 'run'} {root[:8]}"
        where = {"name": name, "experiment_id": experiment_id, "parent_run_id": root,
                 "description": f"children of run {root} ({parent.info.run_name})"}
    elif selection.study_name:
        experiment_id = experiment_id_of(client, selection.experiment_name)
        # The name is matched here, not in the filter: a study's name may hold any character, quotes included.
        studies = search([experiment_id], "tags.`regsweep.kind` = 'study'", order_by=["attributes.start_time DESC"])
        names = studies.get("tags.regsweep.study", pd.Series(dtype=str))
        parents = studies[names == selection.study_name]
        if parents.empty:
            known = ", ".join(sorted(names.dropna())) or "none"
            raise ReportError(f"no study {selection.study_name!r} in experiment {selection.experiment_name!r} "
                              f"(studies there: {known})")
        root = parents["run_id"].iloc[0]
        # Two studies of one name in one experiment (two Optuna storages, or a study made anew): the newest is
        # reported, and the report says which others there are.
        others = "" if len(parents) == 1 else (
            f"; the newest of {len(parents)} studies of that name here, the others under parent runs "
            f"{', '.join(parents['run_id'].iloc[1:])}: choose one with --parent-run-id")
        where = {"name": selection.study_name, "experiment_id": experiment_id, "parent_run_id": root,
                 "description": f"study {selection.study_name} (parent run {root}{others})"}
    else:
        experiment_id = experiment_id_of(client, selection.experiment_name)
        runs = search([experiment_id], selection.filter_string)
        return runs, {"name": selection.experiment_name, "experiment_id": experiment_id,
                      "description": f"experiment {selection.experiment_name}"
                                     + (f", filter {selection.filter_string}" if selection.filter_string else "")}

    runs = descendants(search([experiment_id]), root)
    if selection.filter_string:
        narrowed = search([experiment_id], selection.filter_string)
        runs = runs[runs["run_id"].isin(set(narrowed.get("run_id", ())))]
        where["description"] += f", filter {selection.filter_string}"
    return runs, where


def needed_histories(runs: pd.DataFrame, include_unfinished: bool) -> list[tuple[str, str]]:
    """(run_id, metric) pairs the figures and tables need. Weight statistics are needed at the selected
    (best-validation) epoch; when that is the last epoch, the search frame's latest value already is it."""
    kind = stats.classify_runs(runs)
    training = runs[kind == "training"]
    finished = training[training["status"] == "FINISHED"]
    pairs = [(r, key) for r in finished["run_id"] for key in CURVES]
    if include_unfinished:
        pairs += [(r, key) for r in training.loc[training["status"] != "FINISHED", "run_id"] for key in CURVES]
    if "metrics.best_val_epoch" in finished:
        moved = finished[finished["metrics.best_val_epoch"] != finished.get("metrics.epochs_trained")]
        for layer in stats.layers(runs):
            pairs += [(r, f"weights/{layer}/{stat}") for r in moved["run_id"] for stat in ("mean_abs", "frac_small")]
    return pairs


def fetch_histories(pairs: list[tuple[str, str]], client: MlflowClient) -> pd.DataFrame:
    def one(pair):
        run_id, key = pair
        return [(run_id, key, m.step, m.value) for m in client.get_metric_history(run_id, key)]

    with ThreadPoolExecutor(THREADS) as pool:
        rows = [row for rows in pool.map(one, pairs) for row in rows]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def fetch_runs(selection: Selection, include_unfinished: bool = False) -> Fetched:
    """The selected runs and the metric histories the report needs. Raises ReportError for bad input."""
    client = MlflowClient()
    runs, where = select(selection, client)
    if runs.empty:
        raise ReportError(f"no runs match: {where['description']}")
    kind = stats.classify_runs(runs)
    if not (kind == "training").any():
        raise ReportError(f"none of the {len(runs)} runs matching {where['description']} is a regsweep training "
                          "run (they lack the l1, l2, seed and model params)")
    histories = fetch_histories(needed_histories(runs, include_unfinished), client)
    return Fetched(runs=runs.reset_index(drop=True), histories=histories, name=where["name"],
                   experiment_id=where["experiment_id"], parent_run_id=where.get("parent_run_id"),
                   description=where["description"])


@contextmanager
def quiet_downloads():
    """No MLflow progress bar per downloaded file: the report prints one summary line instead."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def fetch_predictions(run_ids: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Test labels and predictions ({'true', 'pred'}) of each run that logged them; others are absent."""

    def one(run_id):
        try:
            data = mlflow.artifacts.load_dict(f"runs:/{run_id}/{PREDICTIONS}")
        except (MlflowException, OSError):
            return run_id, None
        return run_id, {k: np.asarray(v, dtype=np.int64) for k, v in data.items()}

    with quiet_downloads(), ThreadPoolExecutor(THREADS) as pool:
        return {run_id: p for run_id, p in pool.map(one, run_ids) if p is not None}


def fetch_study_plots(parent_run_id: str) -> dict[str, bytes]:
    """The Optuna plots `regsweep optimize` logged under study/ on its parent run, by file name."""
    client = MlflowClient()
    try:
        names = [a.path for a in client.list_artifacts(parent_run_id, "study") if a.path.endswith(".png")]
    except MlflowException:
        return {}
    plots = {}
    with quiet_downloads(), tempfile.TemporaryDirectory() as tmp:
        for name in names:
            plots[Path(name).name] = Path(client.download_artifacts(parent_run_id, name, tmp)).read_bytes()
    return plots
