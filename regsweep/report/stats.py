"""The report's maths: plain functions from DataFrames to DataFrames, tested on hand-made frames.

`runs` is MLflow's `search_runs` frame (`run_id`, `status`, `start_time`, `params.*`, `metrics.*`, `tags.*`);
`histories` is a long frame with columns run_id, key, step, value. A *configuration* is every setting of a
run except its seed; its runs are its seeds. Comparisons against a baseline use a paired t-test when both
sides ran the same seeds (the seed fixes initialisation, and, trained one by one, batch order and augmentation, so
the pair shares its luck) and Welch's t-test otherwise; an exact permutation test where the seeds leave no spread;
with fewer than two seeds on a side there is no verdict. Seeds that trained in one stack shared its batches: they
differ in initialisation only, and their spread says nothing of batch order's (`shared_batches`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
from scipy import stats

from ..config import APPLIES_WHERE, TrainConfig, fmt_coef  # APPLIES_WHERE: settings blanked where they do not apply

FLAGS = {f.name for f in dataclasses.fields(TrainConfig) if isinstance(f.default, bool)}  # on/off settings

ALPHA = 0.05  # significance level of the verdicts
NO_VERDICT = "one seed: no verdict"

# Params that say how or where a run was executed, or that follow from other settings; they do not make a
# different configuration. (tf32, deterministic: a run of one configuration differs by float rounding only; a
# sweep, deciding whether to reuse a result, keeps those two apart: sweep/study.py RUN_ONLY.)
NOT_SETTINGS = ("seed", "data_dir", "download", "log_model", "log_images", "threads", "compile", "device",
                "cuda_graph", "deterministic", "tf32", "n_params", "n_train", "n_val", "n_test")
# Params every regsweep training run logs; a run without them is not one.
REQUIRED_PARAMS = ("l1", "l2", "seed", "model")
# Runs regsweep itself creates that are not training runs, by their regsweep.kind tag: study parents and
# report runs. (The trial runs that hold a configuration's seeds under `--repeats` are the third kind; they
# are told by their optuna.trial_number tag and their `seeds` param: classify_runs.)
STRUCTURE_KINDS = ("study", "report")


# ---------------------------------------------------------------- which runs count


def classify_runs(runs: pd.DataFrame) -> pd.Series:
    """One word per run: 'training', 'structure' (sweep parents, repeat holders, reports), 'unstarted' (a sweep's
    run stopped before it logged its settings: Ctrl-C as it was created) or 'foreign'."""
    def column(name: str) -> pd.Series:
        return runs[name] if name in runs else pd.Series(np.nan, index=runs.index)

    has_params = pd.concat([column(f"params.{p}").notna() for p in REQUIRED_PARAMS], axis=1).all(axis=1)
    of_sweep = column("tags.optuna.trial_number").notna()
    structure = column("tags.regsweep.kind").isin(STRUCTURE_KINDS) | (of_sweep & column("params.seeds").notna())
    kind = np.where(structure, "structure", np.where(of_sweep, "unstarted", "foreign"))
    return pd.Series(np.where(has_params, "training", kind), index=runs.index)


def cut_short(runs: pd.DataFrame) -> pd.Series:
    """FINISHED runs that a pruner stopped before their last epoch: fewer epochs than the others, so their
    best accuracies are not comparable. (Early stopping on patience is part of the recipe and counts.)"""
    reason = runs.get("tags.regsweep.stop_reason", pd.Series("", index=runs.index)).fillna("").astype(str)
    trained = pd.to_numeric(runs.get("metrics.epochs_trained"), errors="coerce")
    planned = pd.to_numeric(runs.get("params.epochs"), errors="coerce")
    return reason.str.startswith("pruned") & (trained < planned)


def setting_columns(runs: pd.DataFrame) -> list[str]:
    return sorted(c for c in runs.columns
                  if c.startswith("params.") and c.removeprefix("params.") not in NOT_SETTINGS)


def select_training_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """The runs the statistics use, with a `configuration` label and a numeric `seed`, and what was left out.

    Left out, each counted by reason: runs that diverged, other FAILED, KILLED and RUNNING runs; runs a pruner
    cut short; sweep runs given a finished twin's result (the twin's run counts); runs that are not regsweep's;
    and older repeats of the same configuration and seed (the newest one counts, so that a configuration's n
    is its number of seeds). A configuration whose seeds diverged or were pruned only in part (a trial of
    --repeats is pruned on the seed that falls behind) would look better than it is with them left out
    silently: `diverged_seeds` and `pruned_seeds` count, for each configuration kept, its seeds stopped that way
    that have no run that trained; a configuration that diverged on every seed is named in what was left out.
    `shared_batches`: see that function.
    """
    kind = classify_runs(runs)
    left_out: dict[str, int] = {}
    if (kind == "foreign").any():
        left_out["not regsweep runs"] = int((kind == "foreign").sum())
    if (kind == "unstarted").any():
        left_out["stopped before they logged their settings"] = int((kind == "unstarted").sum())
    training = runs[kind == "training"]

    def tag(name: str) -> pd.Series:
        return training.get(f"tags.{name}", pd.Series("", index=training.index)).fillna("").astype(str)

    # A sweep's trial says so in its stop reason; a lone `regsweep train` ends FAILED with the error.
    said = tag("regsweep.stop_reason").str.startswith("diverged")
    said |= tag("regsweep.error").str.startswith("DivergedError")
    diverged = training[(training["status"] == "FAILED") & said]
    if len(diverged):
        left_out["diverged"] = len(diverged)
    for status in ("FAILED", "KILLED", "RUNNING", "SCHEDULED"):
        n = int((training["status"] == status).sum()) - (len(diverged) if status == "FAILED" else 0)
        if n:
            left_out[status] = n
    finished = training[training["status"] == "FINISHED"]
    # A sweep trial given a finished twin's result trained nothing: its run names the run that trained.
    reused = tag("regsweep.reused_run").loc[finished.index] != ""
    if reused.any():
        left_out["reused a twin's result (the twin's run counts)"] = int(reused.sum())
        finished = finished[~reused]
    summarised = finished.get("metrics.best_val_acc", pd.Series(np.nan, index=finished.index)).notna()
    if not summarised.all():
        left_out["without a summary"] = int((~summarised).sum())
    finished = finished[summarised]
    short = cut_short(finished)
    if short.any():
        left_out["pruned"] = int(short.sum())
    # Labelled after the unusable runs are gone: a failed run's missing params would otherwise count as a
    # setting that varies, and lengthen every label. (Diverged and pruned runs have every param: they stopped
    # in training.)
    labelled = label_configurations(pd.concat([finished[~short], finished[short], diverged]))
    pruned_ids = finished.loc[short, "run_id"]
    stopped = labelled["run_id"].isin(diverged["run_id"]) | labelled["run_id"].isin(pruned_ids)
    finished = labelled[~stopped].sort_values("start_time", ascending=False)
    newest = finished.drop_duplicates(["configuration", "seed"])
    if len(newest) < len(finished):
        left_out["older duplicates of a configuration and seed"] = len(finished) - len(newest)
    trained = set(zip(newest["configuration"], newest["seed"]))

    def lost_seeds(run_ids: pd.Series) -> pd.Series:
        """Per configuration, its seeds stopped in these runs that have no run that trained (a seed rerun to
        the end is not lost)."""
        lost = labelled.loc[labelled["run_id"].isin(run_ids), ["configuration", "seed"]].drop_duplicates()
        lost = lost[pd.Series([pair not in trained for pair in zip(lost["configuration"], lost["seed"])],
                              index=lost.index, dtype=bool)]
        return lost["configuration"].value_counts()

    diverged_seeds, pruned_seeds = lost_seeds(diverged["run_id"]), lost_seeds(pruned_ids)
    # A configuration none of whose seeds trained has no row to carry its count: it is named here instead. (One
    # that was pruned is not: without --repeats every pruned trial is one, and "pruned" counts them.)
    gone = sorted(set(diverged_seeds.index) - set(newest["configuration"]) - set(pruned_seeds.index))
    if gone:
        left_out[f"configuration(s) that diverged on every seed ({'; '.join(gone)})"] = len(gone)
    newest = newest.assign(diverged_seeds=newest["configuration"].map(diverged_seeds).fillna(0).astype(int),
                           pruned_seeds=newest["configuration"].map(pruned_seeds).fillna(0).astype(int),
                           shared_batches=shared_batches(newest))
    return newest.sort_values(["configuration", "seed"]).reset_index(drop=True), left_out


def shared_batches(runs: pd.DataFrame) -> pd.Series:
    """Per run, whether its configuration has two seeds that trained in one stack (the same `regsweep.stack` under
    the same parent run). A stack's members train on the same batches and rotations (training.setup), so such seeds
    differ in their initialisation only: their spread, and the intervals and tests built on it, leave out what
    batch order and augmentation would add. (Paired against a baseline in the same stack, the comparison is as
    close as it gets; what it shows holds for that batch order.)"""
    def tag(name: str) -> pd.Series:
        return runs.get(f"tags.{name}", pd.Series("", index=runs.index)).fillna("").astype(str)

    # A stack's number is the first trial's: the same in two studies of one name (another storage), so the runs'
    # parent (the study's parent run, or under --repeats the trial's run) tells the stack apart.
    stack = tag("mlflow.parentRunId") + "\x00" + tag("regsweep.stack")
    together = (tag("regsweep.stack") != "") & stack.groupby([runs["configuration"], stack]).transform("size").gt(1)
    return together.groupby(runs["configuration"]).transform("any").astype(bool)


def label_configurations(runs: pd.DataFrame) -> pd.DataFrame:
    """Add `seed`, `l1`, `l2` as numbers and `configuration`: l1 and l2, plus every other setting that
    differs between the runs (e.g. 'l1=1e-3 l2=0 norm=gbn'). Settings are compared as values, not as the
    strings logged (`canonical`), and only where they apply (APPLIES_WHERE)."""
    runs = runs.copy()
    columns = setting_columns(runs)
    for c in columns:
        as_value = canonical_flag if c.removeprefix("params.") in FLAGS else canonical
        runs[c] = runs[c].map(as_value, na_action="ignore").astype(object)
    for name, (key, value) in APPLIES_WHERE.items():
        if f"params.{name}" in runs and f"params.{key}" in runs:
            runs.loc[runs[f"params.{key}"] != value, f"params.{name}"] = np.nan
    settings = runs[columns].fillna("").astype(str) if columns else pd.DataFrame(index=runs.index)
    varying = [c for c in columns if settings[c].nunique() > 1 and c not in ("params.l1", "params.l2")]
    runs["seed"] = pd.to_numeric(runs["params.seed"], errors="coerce").astype("Int64")
    runs["l1"] = pd.to_numeric(runs["params.l1"], errors="coerce")
    runs["l2"] = pd.to_numeric(runs["params.l2"], errors="coerce")
    labels = [f"l1={l1} l2={l2}" for l1, l2 in zip(coefficient_labels(runs["l1"]), coefficient_labels(runs["l2"]))]
    for c in varying:
        labels = [f"{label} {c.removeprefix('params.')}={value}" if value != "" else label  # "": does not apply
                  for label, value in zip(labels, settings[c])]
    runs["configuration"] = labels
    return runs


def canonical(value) -> str:
    """A logged param as the value it stands for: `mlflow run` logs MLproject parameters as typed ('true',
    '1e-3', '7'), regsweep logs Python's str ('True', '0.001', '7.0'); both must land in one configuration."""
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.capitalize()
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    return str(int(number)) if number.is_integer() else repr(number)  # '7', '7.0' and '7e0' alike


def canonical_flag(value) -> str:
    """A logged on/off setting as True or False: `mlflow run -P augment=yes` logs 'yes', which click reads as
    regsweep's True (as it does 1, on, y, t)."""
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return "True"
    if text in ("0", "false", "f", "no", "n", "off"):
        return "False"
    return str(value).strip()


def coefficient_labels(values: pd.Series) -> list[str]:
    """Each coefficient as `fmt_coef` writes it, with more digits where three would make two different values
    one label (a sweep samples on a continuous scale, and its trials gather near the best)."""
    distinct = {v for v in values if not math.isnan(v)}
    for digits in (3, 6, 17):
        if len({fmt_coef(v, digits) for v in distinct}) == len(distinct):
            break
    return [fmt_coef(v, digits) if not math.isnan(v) else "nan" for v in values]


def settings_of(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: its settings (as logged, strings) except l1 and l2, and l1, l2 as numbers."""
    columns = [c for c in setting_columns(runs) if c not in ("params.l1", "params.l2")]
    first = runs.groupby("configuration", sort=True).first()
    return first[["l1", "l2", *columns]].fillna("")


# ---------------------------------------------------------------- mean, spread, comparison


def mean_ci(values, level: float = 0.95, bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict[str, float]:
    """n, mean, sample sd and the t-interval for the mean (sd and interval NaN for a single value).

    `bounds`: where the mean can lie (an accuracy: 0 to 1). The interval is cut to them: with two seeds a
    t-interval spans 12.7 sd each way, past 100% for an accuracy. The mean lies inside them, so the cut interval
    covers it at least as often."""
    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "sd": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    with spread_warnings_off():
        ci = stats.ttest_1samp(x, 0.0).confidence_interval(level)
    return {"n": n, "mean": mean, "sd": float(x.std(ddof=1)), "ci_low": max(float(ci.low), bounds[0]),
            "ci_high": min(float(ci.high), bounds[1])}


def compare(values: pd.Series, baseline: pd.Series, level: float = 0.95) -> dict:
    """Difference of means (values - baseline), its confidence interval, the p-value, the test used and the
    number of values each side had.

    Both Series are indexed by seed. Paired t-test when both ran exactly the same seeds, Welch's t-test
    otherwise; with fewer than two seeds on either side only the difference is given. Where the seeds leave no
    spread to estimate (every paired difference the same; unpaired, every value the same on each side), a
    t-test would read a constant shift as certainty: p = 0 and a zero-width interval, for one image more on each
    of two seeds. Accuracies count images, so such ties are common with few seeds. There the p-value is the
    exact permutation test's (the differences' signs flipped, or the values shuffled between the sides), whose
    smallest p with n pairs is 2 / 2^n, and there is no interval.
    """
    a, b = values.dropna().astype(float), baseline.dropna().astype(float)
    out = {"diff": float(a.mean() - b.mean()) if len(a) and len(b) else math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "test": "", "n": len(a),
           "n_baseline": len(b)}
    if len(a) < 2 or len(b) < 2:
        return out
    paired = a.index.is_unique and b.index.is_unique and set(a.index) == set(b.index)
    differences = (a - b.reindex(a.index)).round(DIGITS) if paired else None
    if paired and differences.nunique() == 1:
        return out | {"p_value": permutation_p((differences,), "samples"), "test": "sign-flip (no spread)"}
    if not paired and a.round(DIGITS).nunique() == 1 and b.round(DIGITS).nunique() == 1:
        return out | {"p_value": permutation_p((a.round(DIGITS), b.round(DIGITS)), "independent"),
                      "test": "permutation (no spread)"}
    with spread_warnings_off():
        result = stats.ttest_rel(a, b.reindex(a.index)) if paired else stats.ttest_ind(a, b, equal_var=False)
        ci = result.confidence_interval(level)
    return out | {"ci_low": float(ci.low), "ci_high": float(ci.high), "p_value": float(result.pvalue),
                  "test": "paired t" if paired else "Welch t"}


# Decimals a value is compared to when looking for spread. Accuracies are counts of at most 10^5 images, so their
# differences lie on a grid of 1e-5 or finer steps that are whole multiples of it; they are logged as float32 (one
# image more is 1.00017e-4 or 0.99957e-4 apart, by the count): six decimals keep every real difference and drop the
# rounding.
DIGITS = 6


def permutation_p(samples: tuple[pd.Series, ...], permutation_type: str) -> float:
    """Two-sided p of the difference of means under scipy's permutation test: one sample of paired differences
    with their signs flipped ("samples"), or two samples shuffled between them ("independent"). Exact up to
    2^14 arrangements (14 pairs), a fixed-seed sample of that many beyond."""
    def mean_difference(*xs, axis):
        return np.mean(xs[0], axis=axis) - (np.mean(xs[1], axis=axis) if len(xs) > 1 else 0)

    result = stats.permutation_test(tuple(x.to_numpy() for x in samples), mean_difference, vectorized=True,
                                    permutation_type=permutation_type, n_resamples=2 ** 14, rng=0)
    return float(result.pvalue)


@contextmanager
def spread_warnings_off():
    """scipy warns where seeds agree to the last digit (catastrophic cancellation, a zero variance). mean_ci then
    gives the zero-width interval the seeds show (with an sd of 0); compare tests those cases otherwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def verdict(diff: float, p_value: float, n: int, n_baseline: int, alpha: float = ALPHA) -> str:
    """`n`, `n_baseline`: the values the comparison had (a run without the metric has none to give)."""
    if n < 2 or n_baseline < 2 or math.isnan(p_value):
        return NO_VERDICT
    if p_value < alpha:
        return "better" if diff > 0 else "worse"
    return "not distinguishable"


# ---------------------------------------------------------------- per-run values read off the histories


def history_frame(histories: pd.DataFrame, key: str) -> pd.DataFrame:
    """One metric's history as a step x run_id table."""
    rows = histories[histories["key"] == key]
    return rows.pivot_table(index="step", columns="run_id", values="value", aggfunc="last")


def at_selected_epoch(runs: pd.DataFrame, histories: pd.DataFrame, key: str) -> pd.Series:
    """`key` at each run's best-validation epoch, by run_id. A run's last logged value (the search frame)
    stands in where its history was not fetched, which the fetcher skips when the best epoch is the last."""
    latest = runs.set_index("run_id").get(f"metrics.{key}", pd.Series(np.nan, index=runs["run_id"]))
    epochs = runs.set_index("run_id")["metrics.best_val_epoch"]
    table = history_frame(histories, key)
    out = latest.astype(float).copy()
    for run_id, epoch in epochs.items():
        if run_id in table and epoch in table.index and not math.isnan(table.at[epoch, run_id]):
            out[run_id] = table.at[epoch, run_id]
    return out


def layers(runs: pd.DataFrame) -> list[str]:
    """Weight layers named in the runs' metrics: conv1, conv2, ..., other names, the head, then 'all'."""
    names = {c.split("/")[1] for c in runs.columns if c.startswith("metrics.weights/") and c.endswith("/mean_abs")}

    def order(name: str):
        return (name == "all", name == "head", [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])

    return sorted(names, key=order)


def per_run(runs: pd.DataFrame, histories: pd.DataFrame) -> pd.DataFrame:
    """The numbers the tables and figures use, one row per run (index run_id)."""
    r = runs.set_index("run_id")
    metric = lambda name: pd.to_numeric(r.get(f"metrics.{name}"), errors="coerce")  # noqa: E731
    out = pd.DataFrame({"configuration": r["configuration"], "seed": r["seed"], "l1": r["l1"], "l2": r["l2"],
                        "diverged_seeds": r.get("diverged_seeds", 0), "pruned_seeds": r.get("pruned_seeds", 0),
                        "shared_batches": r.get("shared_batches", False)})
    for name in ("best_val_acc", "best_val_epoch", "test_acc_at_best_val", "test_loss_at_best_val",
                 "best_test_acc", "best_test_epoch", "final_val_loss", "epochs_trained", "total_train_seconds"):
        out[name] = metric(name)
    out["final_train_loss"] = metric("train/loss")  # the last logged value is the final epoch's
    out["final_test_loss"] = metric("test/loss")
    train_acc = history_frame(histories, "train/acc")
    out["max_train_acc"] = train_acc.max().reindex(out.index)
    out["max_train_epoch"] = train_acc.idxmax().reindex(out.index)
    out["n_params"] = pd.to_numeric(r.get("params.n_params"), errors="coerce")
    out["epoch_seconds"] = out["total_train_seconds"] / out["epochs_trained"]
    for layer in layers(runs):
        for stat in ("mean_abs", "frac_small"):
            out[f"{layer}/{stat}"] = at_selected_epoch(runs, histories, f"weights/{layer}/{stat}")
    return out


# ---------------------------------------------------------------- tables


SUMMARISED = {  # column of per_run -> how the configuration table reports it
    "best_val_acc": "ci", "best_val_epoch": "mean", "test_acc_at_best_val": "ci", "best_test_acc": "mean",
    "best_test_epoch": "mean", "max_train_acc": "mean", "max_train_epoch": "mean", "final_train_loss": "mean",
    "final_val_loss": "mean", "final_test_loss": "mean", "n_params": "mean", "epoch_seconds": "mean",
    "all/frac_small": "mean",
}


def configuration_table(values: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: n seeds; mean, sd and 95% CI of the selection and the honest test numbers;
    means of the rest (the notebooks' summary: max test and train accuracy and their epochs)."""
    rows = []
    for name, group in values.groupby("configuration", sort=True):
        row = {"configuration": name, "l1": group["l1"].iloc[0], "l2": group["l2"].iloc[0], "n": len(group),
               "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna())),
               "diverged": int(group["diverged_seeds"].iloc[0]) if "diverged_seeds" in group else 0,
               "pruned": int(group["pruned_seeds"].iloc[0]) if "pruned_seeds" in group else 0,
               "shared_batches": bool(group["shared_batches"].any()) if "shared_batches" in group else False}
        for column, how in SUMMARISED.items():
            if column not in group:
                continue
            if how == "ci":
                summary = mean_ci(group[column], bounds=(0.0, 1.0))  # accuracies
                row |= {f"{column}_{k}": v for k, v in summary.items() if k != "n"}
            else:
                row[column] = group[column].mean()
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["l1", "l2", "configuration"], kind="stable").reset_index(drop=True)


def coefficient_order(values: pd.DataFrame) -> list[str]:
    """Configurations by L1, then L2, then label: 1e-3 after 1e-4, not before it as text would have it."""
    first = values.groupby("configuration")[["l1", "l2"]].first().reset_index()
    return first.sort_values(["l1", "l2", "configuration"], kind="stable")["configuration"].tolist()


def parse_baseline(text: str) -> dict[str, str]:
    """'l1=0 l2=0 norm=gbn' -> {'l1': '0', 'l2': '0', 'norm': 'gbn'}."""
    spec = {}
    for part in shlex.split(text):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--baseline expects settings like \"l1=0 l2=0\", got {part!r}")
        spec[key.strip()] = value.strip()
    if not spec:
        raise ValueError("--baseline is empty; expected settings like \"l1=0 l2=0\"")
    return spec


def same_value(logged: str, wanted: str) -> bool:
    return canonical(logged).lower() == canonical(wanted).lower()


def baselines(settings: pd.DataFrame, spec: dict[str, str] | None = None) -> pd.Series:
    """Each configuration's baseline (index and values are configuration labels; NaN where there is none).

    Default: the configuration with l1 = l2 = 0 and otherwise the same settings. With `spec`, the one
    configuration whose settings match it, for every configuration; ValueError unless exactly one matches.
    """
    if spec:
        def matches(row) -> bool:
            for key, wanted in spec.items():
                logged = row.get(key, row.get(f"params.{key}"))
                if logged is None or (isinstance(logged, float) and math.isnan(logged)) or not same_value(
                        str(logged), wanted):
                    return False
            return True

        unknown = [k for k in spec if k not in settings.columns and f"params.{k}" not in settings.columns]
        if unknown:
            raise ValueError(f"--baseline names unknown setting(s) {', '.join(unknown)}")
        hits = [name for name, row in settings.iterrows() if matches(row)]
        if len(hits) != 1:
            def listed(names: list[str], most: int = 8) -> str:  # a sweep may have hundreds: a line, not a page
                return "; ".join(names[:most]) + (f"; and {len(names) - most} more" if len(names) > most else "")

            found = "no configuration" if not hits else f"{len(hits)} configurations ({listed(hits)})"
            raise ValueError(f"--baseline {' '.join(f'{k}={v}' for k, v in spec.items())} matches {found}; "
                             f"configurations: {listed(list(settings.index))}")
        return pd.Series(hits[0], index=settings.index)
    others = [c for c in settings.columns if c not in ("l1", "l2")]
    zero = settings[(settings["l1"] == 0) & (settings["l2"] == 0)]
    key = lambda row: tuple(row[c] for c in others)  # noqa: E731
    by_rest = {key(row): name for name, row in zero.iterrows()}
    return pd.Series({name: by_rest.get(key(row), np.nan) for name, row in settings.iterrows()}, dtype=object)


# Per comparison, the columns of its counts and its test: n is the verdict's comparison's (test accuracy); the
# validation comparison's verdict goes by its own.
COUNTS = {"test": ("n", "n_baseline", "test_used"), "val": ("val_n", "val_n_baseline", "val_test_used")}


def verdict_table(values: pd.DataFrame, baseline_of: pd.Series) -> pd.DataFrame:
    """Every configuration against its baseline: differences in test accuracy at the best-validation epoch
    (the verdict) and in best validation accuracy, each with 95% CI, p-value and p-value adjusted for the
    number of comparisons in the table.

    A sweep compares tens of configurations with their baseline: at p < 0.05 each, one or two would read
    better or worse by chance. So the verdicts go by p adjusted over the table's comparisons (Benjamini and
    Hochberg's false discovery rate, scipy.stats.false_discovery_control); the intervals are each comparison's
    own."""
    rows = []
    for name in coefficient_order(values):
        base = baseline_of.get(name)
        if not isinstance(base, str) or name == base:
            continue
        mine = values[values["configuration"] == name].set_index("seed")
        theirs = values[values["configuration"] == base].set_index("seed")
        row = {"configuration": name, "baseline": base}
        for column, prefix in (("test_acc_at_best_val", "test"), ("best_val_acc", "val")):
            c = compare(mine[column], theirs[column])
            n, n_baseline, used = COUNTS[prefix]
            row |= {f"{prefix}_diff": c["diff"], f"{prefix}_ci_low": c["ci_low"], f"{prefix}_ci_high": c["ci_high"],
                    f"{prefix}_p": c["p_value"], used: c["test"], n: c["n"], n_baseline: c["n_baseline"]}
        rows.append(row)
    columns = ["configuration", "baseline", "n", "n_baseline", "test_diff", "test_ci_low", "test_ci_high", "test_p",
               "test_p_adjusted", "test_verdict", "val_diff", "val_ci_low", "val_ci_high", "val_p", "val_p_adjusted",
               "val_verdict", "test_used", "val_test_used", "val_n", "val_n_baseline"]
    table = pd.DataFrame(rows, columns=columns)
    for prefix, (n, n_baseline, _) in COUNTS.items():
        table[f"{prefix}_p_adjusted"] = adjusted_p(table[f"{prefix}_p"])
        table[f"{prefix}_verdict"] = [verdict(d, p, k, kb) for d, p, k, kb in zip(
            table[f"{prefix}_diff"], table[f"{prefix}_p_adjusted"], table[n], table[n_baseline])]
    return table



def adjusted_p(p_values: pd.Series) -> pd.Series:
    """Benjamini-Hochberg adjusted p-values over those that exist (a comparison with one seed has none)."""
    out = pd.Series(np.nan, index=p_values.index, dtype=float)
    given = p_values.notna()
    if given.any():
        out[given] = stats.false_discovery_control(p_values[given].to_numpy(dtype=float), method="bh")
    return out


def best_configuration(table: pd.DataFrame, exclude=()) -> str | None:
    """The configuration with the highest mean best validation accuracy (selection never looks at test)."""
    candidates = table[~table["configuration"].isin(exclude)]
    if candidates.empty:
        return None
    return str(candidates.loc[candidates["best_val_acc_mean"].idxmax(), "configuration"])


# ---------------------------------------------------------------- fronts and flips


def pareto_front(x, y) -> np.ndarray:
    """True for points no other point beats in both x and y (both maximised); NaN points are never on it."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    front = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        front[i] = not dominated.any()
    return front


def flips(true, baseline_pred, other_pred) -> dict[str, np.ndarray]:
    """Test images by index: `fixed` (the baseline wrong, the other right), `broken` (the reverse), and
    `both_wrong`."""
    true, a, b = (np.asarray(v) for v in (true, baseline_pred, other_pred))
    if not (true.shape == a.shape == b.shape):
        raise ValueError(f"predictions of different test sets: {a.shape} vs {b.shape} vs {true.shape} labels")
    wrong_a, wrong_b = a != true, b != true
    return {"fixed": np.flatnonzero(wrong_a & ~wrong_b), "broken": np.flatnonzero(~wrong_a & wrong_b),
            "both_wrong": np.flatnonzero(wrong_a & wrong_b)}


def band(histories: pd.DataFrame, values: pd.DataFrame, key: str) -> dict[str, pd.DataFrame]:
    """Per configuration: mean and sd over its seeds of `key` by epoch (columns mean, sd, n)."""
    table = history_frame(histories, key)
    out = {}
    for name, group in values.groupby("configuration", sort=True):
        cols = [r for r in group.index if r in table]
        if cols:
            sub = table[cols]
            out[name] = pd.DataFrame({"mean": sub.mean(axis=1), "sd": sub.std(axis=1, ddof=1),
                                      "n": sub.notna().sum(axis=1)})
    return out
