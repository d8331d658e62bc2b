"""Train one configuration and return numbers: per-epoch metrics, the best-validation weights and a summary.

Nothing here prints or logs. `fit` calls `on_epoch(epoch, metrics)` after every epoch; MLflow logging and
Optuna pruning hook in there (tracking.py, sweep/objective.py). Model selection uses the validation split only; the
test set is evaluated every epoch so its curve can be plotted, and reported, never used to choose.
"""

from __future__ import annotations

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
from .data import MnistSplits, Split, batches, rotate_batch, shuffled_batches
from .models import build_model
from .regularization import (l1_penalty, l2_penalty, penalised_parameters, regularisation_loss,
                             weight_stats_tensor)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite (e.g. a huge L1 coefficient)."""


@dataclass
class FitResult:
    model: nn.Module  # holds the best-validation weights when fit returns
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per finished epoch
    summary: dict[str, float] = field(default_factory=dict)
    stop_reason: str = ""  # why training ended before cfg.epochs (early stopping, pruning); empty if it did not
    step_mode: str = "eager"  # how the training step ran: cuda-graph, compiled or eager (see step_mode)
    test_pred: torch.Tensor | None = None  # predicted test labels of the best-validation weights (CPU)


def autocast(precision: str, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def build_optimizer(cfg: TrainConfig, params, device: torch.device | None = None) -> torch.optim.Optimizer:
    """On CUDA the learning rate lives in a device tensor and the update is one fused kernel: a captured step
    (CudaGraphStep) then reads the value the scheduler writes there before each replay."""
    if device is not None and device.type == "cuda":
        lr = torch.tensor(cfg.lr, device=device)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, fused=True, capturable=True)
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped once per batch, so every schedule is expressed in batches."""
    if cfg.scheduler == "onecycle":
        # Momentum stays at cfg.momentum: cycling it would bake a different constant into every captured
        # step (the fused kernels take momentum as a number), and a schedule must act the same on every device.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
            pct_start=0.2, cycle_momentum=False)  # short warm-up: 15 epochs leave little room
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 1000, precision: str = "fp32") -> torch.Tensor:
    """Logits for a whole split, in evaluation mode, on the split's device."""
    model.eval()
    with autocast(precision, split.x.device.type):
        return torch.cat([model(x).float() for x, _ in batches(split, batch_size)])


def evaluate(model: nn.Module, split: Split, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Loss and accuracy as 0-d device tensors: the caller reads all of an epoch's numbers in one transfer."""
    logits = predict(model, split, precision=precision)
    return {"loss": F.cross_entropy(logits, split.y), "acc": (logits.argmax(1) == split.y).float().mean()}


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


Step = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_step(step_model: nn.Module, optimizer: torch.optim.Optimizer, split: Split, cfg: TrainConfig,
              penalised: list[torch.Tensor], generator: torch.Generator) -> Step:
    """The training step, from a batch's indices to (cross-entropy, number correct) as device tensors.

    Everything a step does is in here, gathering the batch included, so that CudaGraphStep can record it
    whole; the CPU and a non-captured GPU run call it as it is.
    """
    def step(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = split.x[idx], split.y[idx]
        if cfg.augment:
            x = rotate_batch(x, cfg.rotate, generator)
        with autocast(cfg.precision, x.device.type):
            logits = step_model(x).float()
        data_loss = F.cross_entropy(logits, y)
        loss = data_loss + regularisation_loss(penalised, cfg.l1, cfg.l2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return data_loss.detach(), (logits.argmax(1) == y).sum()

    return step


class CudaGraphStep:
    """A step recorded once as a CUDA graph and replayed for every later batch.

    A step of this 10k-parameter network is a few hundred tiny kernels; launching them one by one from
    Python, not arithmetic, bounds its speed on a GPU. Replaying the recorded graph launches them all at
    once (PyTorch's CUDA-graphs notes, "whole network capture"). What changes between batches lives in
    tensors the graph reads: the batch indices (copied into `idx` before each replay), the learning rate
    (the scheduler writes the optimizer's lr tensor), and the random state of `generator` (registered with
    the graph, so each replay draws new rotations; batch order comes from another generator, used outside
    the graph). The first `warmup` calls run eagerly on a side stream,
    as capture requires (lazy initialisation, optimizer state); they are ordinary training steps.
    """

    def __init__(self, step: Step, generator: torch.Generator, warmup: int = 3):
        self.step, self.generator, self.warmup = step, generator, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(idx)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.idx = idx.clone()
            self.graph = torch.cuda.CUDAGraph()
            self.graph.register_generator_state(self.generator)
            with torch.cuda.graph(self.graph):
                self.out = self.step(self.idx)
        else:
            self.idx.copy_(idx)  # same shape: train_epoch only feeds full batches
        self.graph.replay()  # after capture too: capturing records the step without running it
        return self.out


def train_epoch(step: Step, scheduler, split: Split, batch_size: int, generator: torch.Generator,
                progress: tqdm | None = None) -> dict[str, torch.Tensor | int]:
    """One pass over the training split in full batches; returns summed cross-entropy, correct and seen.

    The incomplete last batch is dropped (it differs every epoch, as the order is reshuffled): a fixed
    batch shape keeps the compiled step from recompiling, the captured graph valid, and batch-norm
    statistics away from a tiny batch. Sums stay device tensors: reading one every batch would stall the
    device once per step.
    """
    n_batches = len(split) // batch_size
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), dtype=torch.long, device=split.x.device)
    for idx in shuffled_batches(len(split), batch_size, generator)[:n_batches]:
        loss, hits = step(idx)
        loss_sum += loss * batch_size
        correct += hits
        scheduler.step()
        if progress is not None:
            progress.update(1)
    return {"loss_sum": loss_sum, "correct": correct, "images": n_batches * batch_size}


def new_model(cfg: TrainConfig) -> nn.Module:
    """The model `cfg` describes, initialised from its seed (on the CPU: the same weights on every device)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg)


def configure_device(device: torch.device) -> None:
    """Same seed, same device, same result. On CUDA: cuDNN picks its algorithms deterministically instead of
    by timing them (benchmark mode could pick a different one each run), and TF32 is off so that float32
    means float32 (TF32 would also break the stacked-vs-separate equivalence checks). Neither costs speed
    here: the network's 8-16-channel layers are far too small for tensor cores to matter."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def step_mode(cfg: TrainConfig, device: torch.device) -> str:
    """How the training step runs: 'cuda-graph', 'compiled' or 'eager'."""
    if device.type == "cuda" and cfg.cuda_graph:
        return "cuda-graph"
    return "compiled" if cfg.compile else "eager"


@dataclass
class Setup:
    """Everything a training run holds between epochs, on its device."""
    data: MnistSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    penalised: list[torch.Tensor]
    step: Step
    order_generator: torch.Generator
    batch_size: int
    steps_per_epoch: int
    mode: str

    def epoch(self, progress: tqdm | None = None) -> dict[str, torch.Tensor | int]:
        self.model.train()
        return train_epoch(self.step, self.scheduler, self.data.train, self.batch_size, self.order_generator,
                           progress)


def setup(cfg: TrainConfig, data: MnistSplits, model: nn.Module | None = None) -> Setup:
    """Move data and model to `cfg`'s device once and build the optimizer, schedule and step around them."""
    device = torch.device(cfg.resolved_device())
    configure_device(device)
    data = data.to(device)
    model = (model if model is not None else new_model(cfg)).to(device)
    # Batch order and augmentation draw from separate generators: the augmentation one is advanced by
    # graph replays, the order one by plain calls.
    order_gen = torch.Generator(device).manual_seed(cfg.seed)
    augment_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    penalised = list(penalised_parameters(model, cfg.penalize).values())
    optimizer = build_optimizer(cfg, model.parameters(), device)
    batch_size = min(cfg.batch_size, len(data.train))
    steps_per_epoch = len(data.train) // batch_size
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    mode = step_mode(cfg, device)
    # Compiling fuses the small convs' norm/activation kernels (docs/benchmarks.md: ~30% per step on CPU).
    # Evaluation runs the eager model (same parameters) to avoid a second compilation.
    step_model = torch.compile(model) if mode == "compiled" else model
    step = make_step(step_model, optimizer, data.train, cfg, penalised, augment_gen)
    if mode == "cuda-graph":
        step = CudaGraphStep(step, augment_gen)
    return Setup(data, model, optimizer, scheduler, penalised, step, order_gen, batch_size, steps_per_epoch, mode)


def fit(cfg: TrainConfig, data: MnistSplits, on_epoch: Callable[[int, dict], str | None] | None = None,
        show_progress: bool = False, model: nn.Module | None = None) -> FitResult:
    """Train `cfg` on `data`; epochs are numbered from 1.

    `on_epoch(epoch, metrics)` runs after each epoch; if it returns a non-empty string, training stops there
    with that string as the reason (how a pruner stops a trial without losing the epochs it ran).
    `model`, if given, must come from `new_model(cfg)`. Data and model move to `cfg`'s device once; the
    returned model holds the best-validation weights, back on the CPU.
    """
    run = setup(cfg, data, model)
    data, model, optimizer, penalised = run.data, run.model, run.optimizer, run.penalised
    result = FitResult(model=model, step_mode=run.mode)
    best_val_acc, best_val_loss, best_state, since_best_loss = -1.0, math.inf, None, 0
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        with tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not show_progress,
                  leave=False, unit="batch") as progress:
            train = run.epoch(progress)
        if run.data.train.x.is_cuda:
            torch.cuda.synchronize()  # once an epoch, so that the epoch's time is its training time
        seconds = time.perf_counter() - t0
        val, test = evaluate(model, data.val, cfg.precision), evaluate(model, data.test, cfg.precision)
        with torch.no_grad():
            sum_abs, sum_sq = l1_penalty(penalised), l2_penalty(penalised)
            numbers = [train["loss_sum"] / train["images"], train["correct"] / train["images"], val["loss"],
                       val["acc"], test["loss"], test["acc"], sum_abs, sum_sq]
        # The epoch's one device-to-host transfer: every number at once, weight statistics included.
        names, stats = weight_stats_tensor(model)
        values = torch.cat([torch.stack([v.float() for v in numbers]), stats]).tolist()
        train_loss, train_acc, val_loss, val_acc, test_loss, test_acc, sum_abs, sum_sq = values[:8]
        if not math.isfinite(train_loss):
            raise DivergedError(f"training loss is {train_loss} (l1={cfg.l1}, l2={cfg.l2}, lr={cfg.lr})")
        metrics = {
            "train/loss": train_loss, "train/acc": train_acc,
            "val/loss": val_loss, "val/acc": val_acc,
            "test/loss": test_loss, "test/acc": test_acc,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "penalty/l1": cfg.l1 * sum_abs, "penalty/l2": cfg.l2 * sum_sq,  # what was added to the loss
            # the penalised sums, comparable across coefficients
            "penalty/sum_abs_w": sum_abs, "penalty/sum_sq_w": sum_sq,
            "speed/epoch_seconds": seconds, "speed/images_per_sec": train["images"] / seconds,
            **dict(zip(names, values[8:])),
        }
        result.history.append(metrics)
        if val_acc > best_val_acc:
            best_val_acc = val_acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if val_loss < best_val_loss:
            best_val_loss, since_best_loss = val_loss, 0
        else:
            since_best_loss += 1
        stop = on_epoch(epoch, metrics) if on_epoch is not None else None
        if not stop and cfg.patience and since_best_loss >= cfg.patience:
            stop = f"early stopping: val/loss did not improve for {cfg.patience} epochs"
        if stop:
            result.stop_reason = stop
            break

    model.load_state_dict(best_state)
    result.test_pred = predict(model, data.test, precision=cfg.precision).argmax(1).cpu()
    model.cpu()
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
