"""`regsweep report` as plain functions: fetch -> analyse -> draw -> write -> log.

Bad input (an unknown selection, a rejected filter, no runs, an unusable --baseline or output folder) raises
ReportError before anything is written or logged; so does a folder that fails while it is written (some files
may be there then), before anything is logged. The files go to one folder; the same folder is logged
under `report/` of the sweep's parent run, or of a run of its own (`report <experiment>`, tagged
regsweep.kind=report) when there is no parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..outage import STOP_REASON_TAG
from . import figures, stats, tables
from .fetch import Fetched, ReportError, Selection, fetch_predictions, fetch_runs, fetch_study_plots

FIGURES = {  # file name -> what it shows (the report's own index)
    "1_consolidated.png": "validation accuracy and test loss by epoch, one line per configuration",
    "2_generalisation_gap.png": "train against validation accuracy by epoch",
    "3_coefficient_response.png": "best validation accuracy against L1 and L2 (and the L1 x L2 grid)",
    "4_weights.png": "mean |w| and near-zero weights per layer",
    "5_tradeoff_front.png": "accuracy against sparsity, Pareto-optimal runs marked",
    "6_regularisation_path.png": "mean |w| per layer against each coefficient",
    "7_misclassification.png": "misclassified digits of the baseline and the best regularised configuration, "
                               "and the flips",
    "8_study.png": "the study's Optuna plots",
}


@dataclass
class Analysis:
    """Everything computed from the fetched frames; no MLflow in here."""
    fetched: Fetched
    values: pd.DataFrame  # per run (index run_id): the numbers the tables and figures use
    table: pd.DataFrame  # per configuration
    verdicts: pd.DataFrame  # per configuration against its baseline
    baseline_of: pd.Series
    left_out: dict[str, int]
    best: str | None  # best configuration by validation accuracy, other than a baseline
    unfinished: pd.DataFrame
    flips: pd.DataFrame = field(default_factory=pd.DataFrame)
    figures: dict[str, Figure] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # figure -> why it is not drawn
    study_plots: dict[str, bytes] = field(default_factory=dict)


def analyse(fetched: Fetched, baseline: str | None = None) -> Analysis:
    """Tables and verdicts from the fetched frames. ReportError for an unusable --baseline or no usable runs."""
    runs, left_out = stats.select_training_runs(fetched.runs)
    if runs.empty:
        counts = ", ".join(f"{n} {why}" for why, n in left_out.items())
        # (--include-unfinished draws unfinished runs beside finished ones, in figures laid out by configuration;
        # alone, their curves are in the MLflow UI's chart view.)
        raise ReportError(f"no finished regsweep runs to report in {fetched.description} ({counts}); a report needs "
                          "one, also with --include-unfinished: compare unfinished runs' curves in the MLflow UI")
    values = stats.per_run(runs, fetched.histories)
    table = stats.configuration_table(values)
    try:
        baseline_of = stats.baselines(stats.settings_of(runs), stats.parse_baseline(baseline) if baseline else None)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    verdicts = stats.verdict_table(values, baseline_of)
    base_names = set(baseline_of.dropna())
    kind = stats.classify_runs(fetched.runs)
    unfinished = fetched.runs[(kind == "training") & (fetched.runs["status"] != "FINISHED")]
    return Analysis(fetched, values, table, verdicts, baseline_of, left_out,
                    stats.best_configuration(table, exclude=base_names), unfinished)


def flip_pair(a: Analysis) -> tuple[str, str] | None:
    """(baseline, best) for the misclassification figure, if both exist."""
    if a.best is None or not isinstance(a.baseline_of.get(a.best), str):
        return None
    return a.baseline_of[a.best], a.best


def vendored_test_images(n: int, labels: np.ndarray) -> np.ndarray | None:
    """The first `n` MNIST test images as uint8 (a run's test split is the first max_eval_samples of them), if
    the repository's copy is here and its labels agree with the ones the run logged. Read straight from the
    vendored IDX files: 10k images need neither the training set nor torchvision."""
    import gzip

    from ..config import default_data_dir

    folder = Path(default_data_dir()) / "mnist"
    try:
        with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as f:
            test_labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    except (OSError, ValueError):
        return None
    if n > len(test_labels) or not np.array_equal(test_labels[:n], labels):
        return None
    return images[:n]


@dataclass
class Pairing:
    """flip_pair's baseline and best configurations, matched seed by seed over the runs with test predictions."""
    base: str
    best: str
    seeds: list[tuple[int, str, str]]  # (seed, the baseline's run id, the best's run id), by seed


def pair_runs(a: Analysis, predictions: dict[str, dict[str, np.ndarray]]) -> Pairing | None:
    pair = flip_pair(a)
    if pair is None:
        return None
    v = a.values
    by_seed = [{int(s): r for r, s in zip(v.index[v["configuration"] == name],
                                          v.loc[v["configuration"] == name, "seed"]) if r in predictions}
               for name in pair]
    return Pairing(*pair, [(s, by_seed[0][s], by_seed[1][s]) for s in sorted(set(by_seed[0]) & set(by_seed[1]))])


def flip_table(pairing: Pairing | None, predictions: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """Per seed: the test images each of the two configurations gets wrong, and those the best fixes, breaks, or
    gets wrong as well (stats.flips)."""
    rows = []
    for seed, base_run, best_run in pairing.seeds if pairing else []:
        p, q = predictions[base_run], predictions[best_run]
        f = stats.flips(p["true"], p["pred"], q["pred"])
        rows.append({"seed": seed, "baseline": pairing.base, "best": pairing.best,
                     "baseline_wrong": int((p["pred"] != p["true"]).sum()),
                     "best_wrong": int((q["pred"] != q["true"]).sum()), "fixed": len(f["fixed"]),
                     "broken": len(f["broken"]), "both_wrong": len(f["both_wrong"])})
    return pd.DataFrame(rows)


def draw(a: Analysis, predictions: dict[str, dict[str, np.ndarray]], include_unfinished: bool = False,
         pairing: Pairing | None = None) -> None:
    """The eight figures into `a`; a figure that cannot be drawn is named with why. (`predictions`: those of
    flip_pair's configurations' runs, for the misclassification figure; `pairing`: pair_runs of them, where the
    caller has it already.)"""
    v, t, h = a.values, a.table, a.fetched.histories
    pairing = pairing or pair_runs(a, predictions)
    bases = sorted(set(a.baseline_of.dropna()))
    a.figures["1_consolidated.png"] = figures.consolidated(v, h, t, bases, a.unfinished if include_unfinished else None)
    a.figures["2_generalisation_gap.png"] = figures.generalisation_gap(v, h, t, bases)
    a.figures["3_coefficient_response.png"] = figures.coefficient_response(t)
    a.figures["4_weights.png"] = figures.weights(v, t, bases)
    a.figures["5_tradeoff_front.png"] = figures.tradeoff_front(v, t, bases)
    a.figures["6_regularisation_path.png"] = figures.regularisation_path(v)
    if pairing is None:
        a.skipped["7_misclassification.png"] = ("no baseline (l1 = l2 = 0 with the same other settings) for "
                                                "another configuration; see --baseline")
    elif not pairing.seeds:
        a.skipped["7_misclassification.png"] = (f"no seed with test predictions (predictions/test_pred.json) in "
                                                f"both {pairing.base} and {pairing.best}")
    else:
        seed, base_run, best_run = pairing.seeds[0]
        p, q = predictions[base_run], predictions[best_run]
        images = vendored_test_images(len(p["true"]), p["true"])
        a.figures["7_misclassification.png"] = figures.misclassification(
            images, p["true"], p["pred"], q["pred"], pairing.base, pairing.best, seed)
    if a.study_plots:
        a.figures["8_study.png"] = figures.study_plots(a.study_plots)
    else:
        a.skipped["8_study.png"] = "not a study, or its parent run has no study/ plots"


def people_tables(a: Analysis) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    return {"configurations": (a.table, tables.configurations_for_people(a.table)),
            "verdicts against the baseline": (a.verdicts, tables.verdicts_for_people(a.verdicts))}


def left_out_line(a: Analysis) -> str:
    n_runs, n_conf = len(a.values), len(a.table)
    counts = ", ".join(f"{n} {why}" for why, n in a.left_out.items())
    return (f"{n_runs} run{'s' * (n_runs != 1)} in {n_conf} configuration{'s' * (n_conf != 1)}; left out of the "
            f"statistics: {counts or 'none'}")


def no_verdicts(a: Analysis) -> str:
    """Why the verdict table is empty."""
    if a.baseline_of.notna().any():
        return ("No verdicts: no configuration but the baselines themselves has one (l1 = l2 = 0 with the same "
                "other settings; see `--baseline`).")
    return "No baseline: no configuration has l1 = l2 = 0 with the others' settings (see `--baseline`)."


def shared_batches_note(a: Analysis) -> str:
    """What the intervals cover where seeds trained side by side in one stack (stats.shared_batches); "" if none."""
    shared = a.table.loc[a.table["shared_batches"], "configuration"].tolist() if "shared_batches" in a.table else []
    if not shared:
        return ""
    which = "every configuration" if len(shared) == len(a.table) else f"{len(shared)} configuration(s)"
    return (f"The seeds of {which} (marked in the table above) trained in one stack, on the same batches and "
            f"rotations: they differ in their initialisation only, so their spread, intervals and tests leave out "
            f"what batch order and augmentation vary, and a verdict holds for that batch order. Trained one by one "
            f"(`--stack 1`), each seed draws its own.")


def markdown_report(a: Analysis) -> str:
    """report.md: what was selected, the tables, the figures, and how to read the verdicts."""
    people = people_tables(a)
    shared = shared_batches_note(a)
    lines = [f"# regsweep report: {a.fetched.name}", "",
             f"Runs: {a.fetched.description}. {left_out_line(a)}.", "",
             "Selection is on validation accuracy; the test accuracy at the best-validation epoch is the honest "
             "test number. Columns marked *notebooks* repeat the course notebooks' summary (the maximum test "
             "accuracy over epochs), which is chosen on the test set and shown for comparison only.", "",
             "## Configurations", "", tables.markdown(people["configurations"][1]), "",
             "## Against the baseline", "",
             f"Differences are configuration minus baseline, in percentage points, with 95% confidence intervals; "
             f"paired t-test when both ran the same seeds, Welch's t-test otherwise; a verdict of better or worse "
             f"needs p < {stats.ALPHA} once adjusted for the number of comparisons in the table (Benjamini-Hochberg: "
             f"among many comparisons, some pass p < {stats.ALPHA} by chance; the intervals are each comparison's "
             f"own). Where the seeds leave no spread (every paired difference the same, as with one image more on "
             f"each seed), the p-value is an exact permutation test's (signs flipped; it needs six pairs to reach "
             f"0.05) and there is no interval. With one seed on either side there is no verdict.", "",
             *([shared, ""] if shared else []),
             tables.markdown(people["verdicts against the baseline"][1]) if len(a.verdicts) else no_verdicts(a),
             ""]
    if len(a.flips):
        lines += ["## Flips", "", "Test images the baseline gets wrong and the best regularised configuration (by "
                  "validation accuracy, the baseline aside; it may be worse than the baseline) right (fixed), and "
                  "the reverse (broken), per seed both ran:", "", tables.markdown(a.flips), ""]
    lines += ["## Figures", ""]
    for name, what in FIGURES.items():
        if name in a.figures:
            lines += [f"### {what[0].upper() + what[1:]}", "", f"![{what}]({name})", ""]
        else:
            lines += [f"- {name} not drawn: {a.skipped.get(name, '')}"]
    if a.study_plots:
        lines += ["", "The study's plots: " + ", ".join(f"[{n}](study/{n})" for n in sorted(a.study_plots))]
    return "\n".join(lines) + "\n"


def default_out(name: str) -> Path:
    # At most 100 characters: a folder name has a limit (255 bytes on most file systems), a study's name none.
    return Path("reports") / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:100] or "report")


def check_out_dir(out: Path) -> Path:
    """ReportError unless `out` is, or can be made as, a writable folder; nothing is created here."""
    out = Path(out).absolute()
    probe = out
    while not probe.exists():
        probe = probe.parent
    if probe == out and not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a folder")
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write the report to {out}: {probe} is not a writable folder")
    return out


def write(a: Analysis, out: Path) -> list[Path]:
    """Every table (CSV, Markdown, JSON), figure and the report itself into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name: str, text: str) -> None:
        (out / name).write_text(text)
        written.append(out / name)

    people = people_tables(a)
    save("configurations.csv", a.table.to_csv(index=False))
    save("verdicts.csv", a.verdicts.to_csv(index=False))
    save("runs.csv", a.values.reset_index().to_csv(index=False))
    save("flips.csv", a.flips.to_csv(index=False))
    save("configurations.md", tables.markdown(people["configurations"][1]) + "\n")
    save("verdicts.md", tables.markdown(people["verdicts against the baseline"][1]) + "\n")
    save("report.json", json.dumps({
        "selection": a.fetched.description, "left_out": a.left_out, "best": a.best,
        "figures": sorted(a.figures), "skipped": a.skipped,
        "configurations": json.loads(a.table.to_json(orient="records")),
        "verdicts": json.loads(a.verdicts.to_json(orient="records"))}, indent=1))
    for name, fig in a.figures.items():
        fig.savefig(out / name, dpi=110)
        written.append(out / name)
    if a.study_plots:
        (out / "study").mkdir(exist_ok=True)
        for name, png in a.study_plots.items():
            (out / "study" / name).write_bytes(png)
            written.append(out / "study" / name)
    save("report.md", markdown_report(a))
    return written


def log(a: Analysis, out: Path) -> str:
    """Log `out` under report/ of the parent run, or of a new `report <name>` run; returns that run's id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if a.fetched.parent_run_id:
        client.log_artifacts(a.fetched.parent_run_id, str(out), "report")
        return a.fetched.parent_run_id
    run = client.create_run(a.fetched.experiment_id, run_name=f"report {a.fetched.name}",
                            tags={"regsweep.kind": "report", "mlflow.note.content": left_out_line(a)})
    status = "FAILED"
    try:
        client.log_artifacts(run.info.run_id, str(out), "report")
        status = "FINISHED"
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (signals.terminal_status): stopped, not failed
        status, exc.killed_run = "KILLED", run.info.run_id  # the run, for the command's one line
        with contextlib.suppress(Exception):  # the reason is a courtesy: the run ends KILLED below regardless
            client.set_tag(run.info.run_id, STOP_REASON_TAG, "interrupted (Ctrl-C or SIGTERM) as its files were logged")
        raise
    finally:
        client.set_terminated(run.info.run_id, status)  # never left RUNNING
    return run.info.run_id


def make_report(selection: Selection, out: Path | None = None, baseline: str | None = None,
                include_unfinished: bool = False, log_to_mlflow: bool = True) -> tuple[Analysis, Path, str | None]:
    """The whole command: returns the analysis, the folder written and the run the files were logged to."""
    if out is not None:
        check_out_dir(out)
    fetched = fetch_runs(selection, include_unfinished)
    out = check_out_dir(out if out is not None else default_out(fetched.name))
    a = analyse(fetched, baseline)
    pair = flip_pair(a)
    run_ids = a.values.index[a.values["configuration"].isin(pair)].tolist() if pair else []
    predictions = fetch_predictions(run_ids)
    if fetched.parent_run_id:
        a.study_plots = fetch_study_plots(fetched.parent_run_id)
    pairing = pair_runs(a, predictions)
    a.flips = flip_table(pairing, predictions)
    draw(a, predictions, include_unfinished, pairing)
    try:
        try:
            write(a, out)
        except OSError as exc:  # what check_out_dir cannot foresee: a name taken by a folder, /proc, a full disk
            raise ReportError(f"cannot write the report to {out}: {exc}") from None
        logged = log(a, out) if log_to_mlflow else None
    finally:
        for fig in a.figures.values():
            figures.plt.close(fig)
    return a, out, logged
