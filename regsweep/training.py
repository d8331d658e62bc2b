"""Train one configuration and return numbers: per-epoch metrics, the best-validation weights and a summary.

Nothing here prints or logs. `fit` calls `on_epoch(epoch, metrics)` after every epoch; MLflow logging and
Optuna pruning hook in there (tracking.py, sweep.py). Model selection uses the validation split only; the
test set is evaluated every epoch so its curve can be plotted, and reported, never used to choose.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import TrainConfig
from .data import MnistSplits, Split, batches, rotate_batch
from .models import build_model
from .regularization import l1_penalty, l2_penalty, penalised_parameters, regularisation_loss, weight_stats


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite (e.g. a huge L1 coefficient)."""


@dataclass
class FitResult:
    model: nn.Module  # holds the best-validation weights when fit returns
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per finished epoch
    summary: dict[str, float] = field(default_factory=dict)
    stop_reason: str = ""  # why training ended before cfg.epochs (early stopping, pruning); empty if it did not


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped once per batch, so every schedule is expressed in batches."""
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
            pct_start=0.2)  # short warm-up: 15 epochs leave little room
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 1000, precision: str = "fp32") -> torch.Tensor:
    """Logits for a whole split, in evaluation mode."""
    model.eval()
    with autocast(precision):
        return torch.cat([model(x).float() for x, _ in batches(split, batch_size)])


def evaluate(model: nn.Module, split: Split, precision: str = "fp32") -> dict[str, float]:
    logits = predict(model, split, precision=precision)
    return {"loss": F.cross_entropy(logits, split.y).item(),
            "acc": (logits.argmax(1) == split.y).float().mean().item()}


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int = 10) -> torch.Tensor:
    """Rows are true classes, columns predicted."""
    return torch.bincount(y_true * n_classes + y_pred, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def per_class_metrics(cm: torch.Tensor) -> list[dict[str, float]]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    cm = cm.double()
    tp = cm.diag()
    precision = torch.nan_to_num(tp / cm.sum(0))
    recall = torch.nan_to_num(tp / cm.sum(1))
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall))
    return [{"class": c, "precision": precision[c].item(), "recall": recall[c].item(), "f1": f1[c].item(),
             "support": int(cm[c].sum().item())} for c in range(cm.shape[0])]


def train_epoch(step_model: nn.Module, optimizer, scheduler, split: Split, cfg: TrainConfig,
                penalised: list[torch.Tensor], generator: torch.Generator, progress: tqdm | None = None
                ) -> dict[str, float]:
    """One pass over the training split in full batches; returns mean cross-entropy and accuracy.

    The incomplete last batch is dropped (it differs every epoch, as the order is reshuffled): a fixed
    batch shape keeps the compiled step from recompiling and batch-norm statistics from a tiny batch.
    """
    step_model.train()
    batch_size = min(cfg.batch_size, len(split))
    n_batches = len(split) // batch_size
    loss_sum, correct, seen = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
    # Sums stay tensors: reading .item() every batch would force a sync per step.
    for i, (x, y) in enumerate(batches(split, batch_size, generator)):
        if i == n_batches:
            break
        if cfg.augment:
            x = rotate_batch(x, cfg.rotate, generator)
        with autocast(cfg.precision):
            logits = step_model(x).float()
        data_loss = F.cross_entropy(logits, y)
        loss = data_loss + regularisation_loss(penalised, cfg.l1, cfg.l2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += data_loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if progress is not None:
            progress.update(1)
    train_loss = loss_sum.item() / seen
    if not math.isfinite(train_loss):
        raise DivergedError(f"training loss is {train_loss} (l1={cfg.l1}, l2={cfg.l2}, lr={cfg.lr})")
    return {"loss": train_loss, "acc": correct.item() / seen, "images": seen}


def new_model(cfg: TrainConfig) -> nn.Module:
    """The model `cfg` describes, initialised from its seed."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg)


def fit(cfg: TrainConfig, data: MnistSplits, on_epoch: Callable[[int, dict], str | None] | None = None,
        show_progress: bool = False, model: nn.Module | None = None) -> FitResult:
    """Train `cfg` on `data`; epochs are numbered from 1.

    `on_epoch(epoch, metrics)` runs after each epoch; if it returns a non-empty string, training stops there
    with that string as the reason (how a pruner stops a trial without losing the epochs it ran).
    `model`, if given, must come from `new_model(cfg)`.
    """
    model = model if model is not None else new_model(cfg)  # a caller may have built it to log it first
    generator = torch.Generator().manual_seed(cfg.seed)
    penalised = list(penalised_parameters(model, cfg.penalize).values())
    optimizer = build_optimizer(cfg, model.parameters())
    steps_per_epoch = max(1, len(data.train) // min(cfg.batch_size, len(data.train)))
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    # Compiling fuses the small convs' norm/activation kernels (docs/benchmarks.md: ~30% per step on CPU).
    # Evaluation runs the eager model (same parameters) to avoid a second compilation.
    step_model = torch.compile(model) if cfg.compile else model

    result = FitResult(model=model)
    best_val_acc, best_val_loss, best_state, since_best_loss = -1.0, math.inf, None, 0
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not show_progress,
                  leave=False, unit="batch") as progress:
            train = train_epoch(step_model, optimizer, scheduler, data.train, cfg, penalised, generator, progress)
        seconds = time.perf_counter() - t0
        val, test = evaluate(model, data.val, cfg.precision), evaluate(model, data.test, cfg.precision)
        with torch.no_grad():
            sum_abs, sum_sq = l1_penalty(penalised).item(), l2_penalty(penalised).item()
        metrics = {
            "train/loss": train["loss"], "train/acc": train["acc"],
            "val/loss": val["loss"], "val/acc": val["acc"],
            "test/loss": test["loss"], "test/acc": test["acc"],
            "lr": optimizer.param_groups[0]["lr"],
            "penalty/l1": cfg.l1 * sum_abs, "penalty/l2": cfg.l2 * sum_sq,  # what was added to the loss
            # the penalised sums, comparable across coefficients
            "penalty/sum_abs_w": sum_abs, "penalty/sum_sq_w": sum_sq,
            "speed/epoch_seconds": seconds, "speed/images_per_sec": train["images"] / seconds,
            **weight_stats(model),
        }
        result.history.append(metrics)
        if val["acc"] > best_val_acc:
            best_val_acc = val["acc"]
            best_state = copy.deepcopy(model.state_dict())
        if val["loss"] < best_val_loss:
            best_val_loss, since_best_loss = val["loss"], 0
        else:
            since_best_loss += 1
        stop = on_epoch(epoch, metrics) if on_epoch is not None else None
        if not stop and cfg.patience and since_best_loss >= cfg.patience:
            stop = f"early stopping: val/loss did not improve for {cfg.patience} epochs"
        if stop:
            result.stop_reason = stop
            break

    model.load_state_dict(best_state)
    result.summary = summarise(result.history, time.perf_counter() - start)
    return result


def summarise(history: list[dict[str, float]], total_seconds: float) -> dict[str, float]:
    """The table the notebooks printed, with selection on validation: best_val_* picks the epoch,
    test_acc_at_best_val is the honest test number; best_test_acc is reported only for comparison."""
    val_accs = [h["val/acc"] for h in history]
    test_accs = [h["test/acc"] for h in history]
    best_val_epoch = val_accs.index(max(val_accs)) + 1
    best_test_epoch = test_accs.index(max(test_accs)) + 1
    final = history[-1]
    return {
        "best_val_acc": max(val_accs), "best_val_epoch": best_val_epoch,
        "test_acc_at_best_val": test_accs[best_val_epoch - 1],
        "test_loss_at_best_val": history[best_val_epoch - 1]["test/loss"],
        "best_test_acc": max(test_accs), "best_test_epoch": best_test_epoch,
        "final_train_acc": final["train/acc"], "final_val_acc": final["val/acc"],
        "final_test_acc": final["test/acc"], "final_val_loss": final["val/loss"],
        "epochs_trained": len(history), "total_train_seconds": total_seconds,
    }
