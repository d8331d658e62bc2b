"""The report's figures: each takes DataFrames (or arrays) and returns a matplotlib Figure.

Sized and lettered for a slide. Accuracies are in percent, coefficients on log axes with "off" (0) at a
position of its own one decade below the smallest coefficient used. With many configurations (a 30-trial
search) only the baseline and the best few by validation accuracy are coloured and named; the rest are grey.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..config import fmt_coef  # noqa: E402
from . import stats  # noqa: E402

STYLE = {"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 10,
         "axes.grid": True, "grid.alpha": 0.3}
MAX_NAMED = 8  # configurations drawn in colour and named in legends
GREY = "0.75"


def shown(table: pd.DataFrame, always=()) -> list[str]:
    """The configurations drawn in colour: `always` (baselines) first, then the best by validation accuracy."""
    ranked = table.sort_values("best_val_acc_mean", ascending=False)["configuration"].tolist()
    first = [c for c in always if c in ranked]
    return (first + [c for c in ranked if c not in first])[:max(MAX_NAMED, len(first))]


def colours(names: list[str]) -> dict[str, tuple]:
    palette = [plt.get_cmap("tab10")(i) for i in range(10) if i != 7]  # tab10's grey is the unnamed runs' colour
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def coefficient_positions(values) -> tuple[dict[float, float], list[float], list[str]]:
    """x position of each coefficient on a log10 axis, "off" one decade below the smallest non-zero one;
    with the tick positions and labels."""
    values = sorted({float(v) for v in values if not math.isnan(v)})
    nonzero = [v for v in values if v > 0]
    low = math.floor(math.log10(min(nonzero))) if nonzero else 0
    pos = {v: (math.log10(v) if v > 0 else low - 1) for v in values}
    ticks = list(range(low, math.ceil(math.log10(max(nonzero))) + 1)) if nonzero else []
    labels = [f"1e{t}" for t in ticks]
    if 0.0 in pos:
        ticks, labels = [low - 1, *ticks], ["off", *labels]
    return pos, ticks, labels


def without(label: str, prefix: str) -> str:
    """A configuration label less one of its parts ('l1=1e-3 l2=0' less 'l1=' -> 'l2=0')."""
    return " ".join(p for p in label.split() if not p.startswith(prefix)) or "all"


def one_setting(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows whose other settings (all but l1 and l2) most configurations share, and those settings as
    words ('' when no other setting varies): a heat map or a path over the coefficients must not average or
    take the best across, say, batch norm and ghost batch norm."""
    rest = frame["configuration"].map(lambda c: without(without(c, "l1="), "l2="))
    if rest.nunique() <= 1:
        return frame, ""
    counts = rest[~frame["configuration"].duplicated()].value_counts()  # configurations per set of settings
    top = min(counts.index, key=lambda r: (-counts[r], r))
    return frame[rest == top], top


def whole_epochs(*axes) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


# ---------------------------------------------------------------- 1, 2: curves over epochs


def consolidated(values: pd.DataFrame, histories: pd.DataFrame, table: pd.DataFrame, baselines=(),
                 unfinished: pd.DataFrame | None = None) -> Figure:
    """Validation accuracy and test loss by epoch, one line per configuration: mean over seeds with a band of
    one standard deviation. Runs left out of the statistics (failed, killed, running) dotted, if given."""
    named = shown(table, baselines)
    colour = colours(named)
    with plt.rc_context(STYLE):
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(14, 5.5))
        for key, ax, scale in (("val/acc", ax_acc, 100), ("test/loss", ax_loss, 1)):
            bands = stats.band(histories, values, key)
            for name in [c for c in bands if c not in named] + [c for c in named if c in bands]:
                b = bands[name]
                is_named = name in named
                ax.plot(b.index, scale * b["mean"], color=colour.get(name, GREY), lw=2 if is_named else 1,
                        label=f"{name} (n={int(b['n'].max())})" if is_named else None, zorder=3 if is_named else 1)
                if is_named and (b["n"] > 1).any():
                    ax.fill_between(b.index, scale * (b["mean"] - b["sd"]), scale * (b["mean"] + b["sd"]),
                                    color=colour[name], alpha=0.15, lw=0)
            if unfinished is not None and not unfinished.empty:
                table_key = stats.history_frame(histories, key)
                for i, (run_id, status) in enumerate(zip(unfinished["run_id"], unfinished["status"])):
                    if run_id in table_key:
                        ax.plot(table_key.index, scale * table_key[run_id], ":", color="black", lw=1,
                                label=f"{status.lower()} runs" if i == 0 else None)
        ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy")
        ax_loss.set(xlabel="epoch", ylabel="test cross-entropy (nats)", title="test loss")
        whole_epochs(ax_acc, ax_loss)
        ax_acc.legend(loc="lower right")
        fig.suptitle("Validation accuracy and test loss by configuration (mean over seeds, band = ±1 sd)")
        fig.tight_layout()
    return fig


def generalisation_gap(values: pd.DataFrame, histories: pd.DataFrame, table: pd.DataFrame, baselines=()) -> Figure:
    """Train (solid) and validation (dashed) accuracy per configuration, and their difference."""
    named = shown(table, baselines)
    colour = colours(named)
    train, val = stats.band(histories, values, "train/acc"), stats.band(histories, values, "val/acc")
    with plt.rc_context(STYLE):
        fig, (ax_acc, ax_gap) = plt.subplots(1, 2, figsize=(14, 5.5))
        for name in named:
            if name not in train or name not in val:
                continue
            ax_acc.plot(train[name].index, 100 * train[name]["mean"], "-", color=colour[name], lw=2, label=name)
            ax_acc.plot(val[name].index, 100 * val[name]["mean"], "--", color=colour[name], lw=2)
            gap = 100 * (train[name]["mean"] - val[name]["mean"])
            ax_gap.plot(gap.index, gap, color=colour[name], lw=2, label=name)
        ax_gap.axhline(0, color="black", lw=0.8)
        ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="train (solid) and validation (dashed)")
        ax_gap.set(xlabel="epoch", ylabel="train - validation accuracy (points)", title="generalisation gap")
        whole_epochs(ax_acc, ax_gap)
        ax_acc.legend(loc="lower right")
        fig.suptitle("Generalisation gap by configuration (mean over seeds; train accuracy is on augmented "
                     "batches)")
        fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 3, 6: responses to the coefficients


def coefficient_response(table: pd.DataFrame) -> Figure:
    """Best validation accuracy (mean, 95% CI) against L1 and against L2; an L1 x L2 heat map when both vary."""
    both = table["l1"].nunique() > 1 and table["l2"].nunique() > 1
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3 if both else 2, figsize=(19 if both else 13, 5.5))
        for ax, coef in zip(axes, ("l1", "l2")):
            pos, ticks, labels = coefficient_positions(table[coef])
            other = "l2=" if coef == "l1" else "l1="
            lines = table.assign(rest=[without(c, f"{coef}=") for c in table["configuration"]])
            for i, (rest, group) in enumerate(lines.groupby("rest", sort=True)):
                group = group.sort_values(coef)
                x = [pos[v] for v in group[coef]]
                y = 100 * group["best_val_acc_mean"]
                # Clipped to what an accuracy can be: with two seeds a t-interval can span -200% to 300%, and
                # drawn in full it flattens every mean into one line (the tables keep the interval as computed).
                low, high = (np.clip(100 * group[f"best_val_acc_ci_{end}"], 0, 100) for end in ("low", "high"))
                err = np.vstack([y - low, high - y])
                ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=4, lw=1.5,
                            label=rest if len(lines["rest"].unique()) <= MAX_NAMED else None,
                            color=plt.get_cmap("tab10")(i % 10))
            ax.set_xticks(ticks, labels)
            ax.set(xlabel=f"{coef.upper()} coefficient (log scale)", ylabel="best validation accuracy (%)",
                   title=f"against {coef.upper()}" + (f" (one line per {other.rstrip('=')} value)"))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=9)
        if both:
            ax = axes[2]
            cells, only = one_setting(table)  # one configuration per cell
            grid = cells.pivot_table(index="l1", columns="l2", values="best_val_acc_mean")
            im = ax.imshow(100 * grid.to_numpy(), cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(grid.columns)), [fmt_coef(v) if v else "off" for v in grid.columns])
            ax.set_yticks(range(len(grid.index)), [fmt_coef(v) if v else "off" for v in grid.index])
            for (i, j), v in np.ndenumerate(100 * grid.to_numpy()):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white", fontsize=10)
            ax.set(xlabel="L2 coefficient", ylabel="L1 coefficient",
                   title="best validation accuracy (%)" + (f", {only} only" if only else ""))
            ax.grid(False)
            fig.colorbar(im, ax=ax, label="%")
        fig.suptitle("Coefficient response: best validation accuracy, mean over seeds with 95% t-interval "
                     "(clipped to 0-100%)")
        fig.tight_layout()
    return fig


def regularisation_path(values: pd.DataFrame) -> Figure:
    """Per-layer mean |w| at the selected epoch as a function of each coefficient, the other one off."""
    layer_names = [c.removesuffix("/mean_abs") for c in values.columns if c.endswith("/mean_abs")]
    values, only = one_setting(values)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), sharey=True)
        for ax, coef, other in zip(axes, ("l1", "l2"), ("l2", "l1")):
            path = values[values[other] == 0].groupby(coef)[[f"{n}/mean_abs" for n in layer_names]].mean()
            if len(path) < 2 or not layer_names:
                note(ax, f"needs runs at two or more {coef.upper()} values with {other.upper()} off")
                continue
            pos, ticks, labels = coefficient_positions(path.index)
            x = [pos[v] for v in path.index]
            cmap = plt.get_cmap("viridis")
            for i, name in enumerate(layer_names):
                shade = cmap(i / max(1, len(layer_names) - 1))
                style = dict(color="black", lw=3) if name == "all" else dict(color=shade)
                ax.plot(x, path[f"{name}/mean_abs"], marker="o", label=name, **style)
            ax.set_yscale("log")
            ax.set_xticks(ticks, labels)
            ax.set(xlabel=f"{coef.upper()} coefficient (log scale; {other.upper()} off)", ylabel="mean |w|",
                   title=f"{coef.upper()} path")
        if axes[1].get_legend_handles_labels()[0] or axes[0].get_legend_handles_labels()[0]:
            ax = axes[1] if axes[1].get_legend_handles_labels()[0] else axes[0]
            ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1), title="layer")
        fig.suptitle("Regularisation path: mean |w| per layer at the best-validation epoch (mean over seeds)"
                     + (f", {only} only" if only else ""))
        fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 4, 5: weights and the trade-off


def weights(values: pd.DataFrame, table: pd.DataFrame, baselines=()) -> Figure:
    """Mean |w| per layer, and the fraction of weights below 1e-3 per layer, per configuration."""
    named = shown(table, baselines)
    colour = colours(named)
    layer_names = [c.removesuffix("/mean_abs") for c in values.columns if c.endswith("/mean_abs")]
    means = values.groupby("configuration")[[c for c in values.columns if "/" in c]].mean()
    with plt.rc_context(STYLE):
        fig, (ax_w, ax_s) = plt.subplots(2, 1, figsize=(14, 9), sharex=True)
        width = 0.8 / max(1, len(named))
        x = np.arange(len(layer_names))
        for i, name in enumerate(named):
            if name not in means.index:
                continue
            row = means.loc[name]
            ax_w.bar(x + i * width, [row[f"{n}/mean_abs"] for n in layer_names], width, color=colour[name],
                     label=name)
            ax_s.bar(x + i * width, [100 * row[f"{n}/frac_small"] for n in layer_names], width,
                     color=colour[name])
        ax_w.set_yscale("log")
        ax_w.set(ylabel="mean |w|", title="mean absolute weight per layer")
        ax_s.set(ylabel="weights with |w| < 1e-3 (%)", title="near-zero weights per layer", xlabel="layer")
        ax_s.set_xticks(x + width * (len(named) - 1) / 2, layer_names)
        ax_w.legend(fontsize=9, ncol=2)
        fig.suptitle("Weights at the best-validation epoch (mean over seeds)")
        fig.tight_layout()
    return fig


def tradeoff_front(values: pd.DataFrame, table: pd.DataFrame, baselines=()) -> Figure:
    """Validation accuracy against sparsity over all runs; Pareto-optimal runs ringed and joined."""
    named = shown(table, baselines)
    colour = colours(named)
    x = 100 * values["all/frac_small"] if "all/frac_small" in values else pd.Series(np.nan, index=values.index)
    y = 100 * values["best_val_acc"]
    front = stats.pareto_front(x, y)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(10, 6.5))
        for name, group in values.groupby("configuration", sort=True):
            is_named = name in named
            ax.scatter(x[group.index], y[group.index], s=50 if is_named else 25, color=colour.get(name, GREY),
                       label=name if is_named else None, zorder=3 if is_named else 2)
        order = np.argsort(x[front].to_numpy())
        ax.plot(x[front].to_numpy()[order], y[front].to_numpy()[order], "-", color="black", lw=1, zorder=1)
        ax.scatter(x[front], y[front], s=160, facecolors="none", edgecolors="black", lw=1.5,
                   label="Pareto-optimal", zorder=4)
        ax.set(xlabel="weights with |w| < 1e-3 at the best-validation epoch (%)",
               ylabel="best validation accuracy (%)",
               title="Accuracy against sparsity, one point per run")
        ax.legend(fontsize=9)
        fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 7, 8: digits and the study's plots


def misclassification(images: np.ndarray | None, true: np.ndarray, base_pred: np.ndarray, best_pred: np.ndarray,
                      base_name: str, best_name: str, seed, per_panel: int = 16) -> Figure:
    """The misclassified test digits of the baseline and of the best configuration side by side, and the
    flips between them: the baseline wrong and the best right (fixed), and the reverse (broken)."""
    f = stats.flips(true, base_pred, best_pred)
    panels = [
        (f"baseline {base_name}: {int((base_pred != true).sum())} wrong", np.flatnonzero(base_pred != true),
         base_pred),
        (f"best regularised {best_name}: {int((best_pred != true).sum())} wrong", np.flatnonzero(best_pred != true),
         best_pred),
        (f"fixed: baseline wrong, best right ({len(f['fixed'])})", f["fixed"], base_pred),
        (f"broken: baseline right, best wrong ({len(f['broken'])})", f["broken"], best_pred),
    ]
    side = int(math.sqrt(per_panel))
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(14, 14), layout="constrained")
        for sub, (title, idx, pred) in zip(fig.subfigures(2, 2).flat, panels):
            axes = sub.subplots(side, side)
            for ax in axes.flat:
                ax.axis("off")
            for ax, i in zip(axes.flat, idx[:per_panel]):
                if images is not None:
                    ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=255)
                ax.set_title(f"{true[i]} -> {pred[i]}", fontsize=10, color="firebrick")
            sub.suptitle(title, fontsize=13)
        fig.suptitle(f"Test digits (true -> predicted), seed {seed}, weights of the best-validation epoch",
                     fontsize=14)
    return fig


def study_plots(pngs: dict[str, bytes]) -> Figure:
    """The Optuna plots of the study's parent run, copied into one figure."""
    names = sorted(pngs)
    cols = 2 if len(names) > 1 else 1
    rows = -(-len(names) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 6 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, name in zip(axes.flat, names):
            ax.imshow(plt.imread(io.BytesIO(pngs[name]), format="png"))
            ax.set_title(f"study/{name}")
        fig.suptitle("The study's Optuna plots (logged by regsweep optimize on its parent run)")
        fig.tight_layout()
    return fig
