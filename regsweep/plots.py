"""Matplotlib figures for one run's artifacts (tracking.log_outcome). The comparisons across runs are drawn by
report/figures.py.

Every function takes plain data and returns a Figure; the caller decides where it goes. A sweep draws these
for every trial, so their margins are fixed rather than measured by tight_layout, which measures every tick
label once more before the figure is drawn (a quarter of their drawing time).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullLocator  # noqa: E402

from .data import MNIST_MEAN, MNIST_STD  # noqa: E402


def misclassified_grid(images: torch.Tensor, true: torch.Tensor, pred: torch.Tensor, n: int = 25) -> Figure:
    """Up to `n` misclassified digits in a square grid, labelled 'true -> predicted'.

    The digits are tiled into one image on one axes: a sweep draws this for every trial, and 25 separate
    axes cost most of a second each time.
    """
    wrong = (true != pred).nonzero().flatten()[:n].tolist()
    side, tile = max(1, int(n ** 0.5)), 36  # 28-pixel digits with room for the label above
    mosaic = torch.ones(side * tile, side * tile)
    fig, ax = plt.subplots(figsize=(1.6 * side, 1.8 * side))
    for slot, i in enumerate(wrong):
        row, col = divmod(slot, side)
        top, left = row * tile + 7, col * tile + 4
        mosaic[top:top + 28, left:left + 28] = 1 - (images[i, 0] * MNIST_STD + MNIST_MEAN).clamp(0, 1)
        ax.text(left + 14, top - 1, f"{true[i].item()} -> {pred[i].item()}", ha="center", va="bottom",
                fontsize=8, color="firebrick")
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{len(wrong)} misclassified test images (true -> predicted)")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.975)
    return fig


def training_curves(history: list[dict[str, float]]) -> Figure:
    epochs = range(1, len(history) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
        ax_loss.plot(epochs, [h[f"{split}/loss"] for h in history], style, label=split)
        ax_acc.plot(epochs, [100 * h[f"{split}/acc"] for h in history], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss (without penalty)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.2 of one
        ax.grid(alpha=0.3)
        ax.legend()
    # Room on the left for six-character ticks (a loss stuck at ln 10 gets "2.3026"-style labels).
    fig.subplots_adjust(left=0.09, right=0.985, bottom=0.14, top=0.91, wspace=0.2)
    return fig


def confusion_figure(cm: torch.Tensor) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    # Log colour scale: the diagonal is ~1000 per class, the interesting errors are single digits.
    im = ax.imshow((cm + 1).log10().numpy(), cmap="Blues")
    for (i, j), value in zip(torch.cartesian_prod(torch.arange(10), torch.arange(10)).tolist(), cm.flatten()):
        if value:
            ax.text(j, i, str(value.item()), ha="center", va="center", fontsize=7,
                    color="white" if i == j else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title="test confusion matrix")
    fig.colorbar(im, ax=ax, label="log10(count + 1)")
    fig.subplots_adjust(left=0.09, right=0.95, bottom=0.07, top=0.96)
    return fig


def weight_histograms(weights: dict[str, torch.Tensor]) -> Figure:
    """One panel per layer: the distribution of its weights, on a log count axis to show the spike at 0."""
    ncols = min(4, len(weights))
    nrows = -(-len(weights) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(weights):]:
        ax.axis("off")
    for ax, (name, w) in zip(axes.flat, weights.items()):
        # One step artist per panel rather than hist's 60 patches: drawn once per trial in a sweep.
        counts, edges = np.histogram(w.detach().flatten().numpy(), bins=60)
        ax.stairs(counts, edges, fill=True, color="steelblue")
        ax.set_yscale("log")
        # Labels at 1, 2 and 5 per decade and no minor ticks: a log axis's minor ticks were most of the figure's
        # drawing time, and they were all that labelled a panel spanning less than a decade. Four x ticks: six
        # ran into each other. A title at a fixed height skips matplotlib's search for room above the ticks.
        ax.yaxis.set(major_locator=LogLocator(subs=(1, 2, 5), numticks=6), minor_locator=NullLocator(),
                     major_formatter=FormatStrFormatter("%g"))
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set_title(f"{name} ({w.numel()})", fontsize=9, y=1.0)
        ax.tick_params(which="both", labelsize=7)
    fig.suptitle("weight distribution per layer (best-validation weights)")
    # Fixed margins (see the module's docstring): with eight panels, tight_layout took most of a second.
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.2 / nrows, top=1 - 0.3 / nrows, wspace=0.3, hspace=0.5)
    return fig
