"""Train one configuration, or several stacked as one network, and return numbers: per-epoch metrics, the
best-validation weights and a summary. (The step each batch takes, and how it runs on each device: step.py.)

Nothing here logs, and nothing prints but the progress bar a caller asks for (`show_progress`, on stderr).
`fit` calls `on_epoch(epoch, metrics)` after every epoch; MLflow logging and Optuna pruning hook in there
(tracking.py, sweep/objective.py). Model selection uses the validation split only; the
test set is evaluated every epoch so its curve can be plotted, and reported, never used to choose.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .config import TrainConfig
from .data import MnistSplits, Split, batches, shuffled_batches
from .models import build_model
from .regularization import member_sums, penalised_parameters, weight_stats_tensor
from .step import (CLASSES, Coefficients, CudaGraphStep, Schedules, Step, as_loss_dtype, autocast, build_optimizer,
                   build_scheduler, configure_device, make_step, member_losses, step_mode, stepping_config)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite (e.g. a huge L1 coefficient)."""


DIVERGED = "diverged: "  # how a diverged member's stop_reason begins; a DivergedError carries the rest


@dataclass
class FitResult:
    model: nn.Module  # holds the best-validation weights when fit returns
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per finished epoch
    summary: dict[str, float] = field(default_factory=dict)
    stop_reason: str = ""  # why training ended before cfg.epochs (early stopping, pruning, divergence); else empty
    step_mode: str = "eager"  # how the training step ran: cuda-graph, compiled, eager, or "eager: <why>"
    # Predicted test labels of the best-validation weights (CPU); None for a member that diverged in its first epoch.
    test_pred: torch.Tensor | None = None
    diverged: bool = False  # the training loss stopped being finite (stop_reason says when)

    def raise_if_diverged(self) -> None:
        """A member that diverged trained to no result: DivergedError, with when and why."""
        if self.diverged:
            raise DivergedError(self.stop_reason.removeprefix(DIVERGED))


EVAL_IMAGES_CPU = 512  # model-images (images x members) per evaluation batch on the CPU: see eval_batch_size


def eval_batch_size(members: int, device: str) -> int:
    """Images per evaluation batch: 1,000 on a GPU; on the CPU about EVAL_IMAGES_CPU model-images, so that a
    batch's activations stay in the caches. At 1,000 images a batch, a 4-member stack took 2-3x as long per
    image as at 128 (`python benchmarks/throughput.py --evaluation`, docs/benchmarks.md)."""
    return 1000 if device == "cuda" else max(16, EVAL_IMAGES_CPU // members)


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int | None = None, precision: str = "fp32") -> torch.Tensor:
    """Logits for a whole split, in evaluation mode, on the split's device (`batch_size`: eval_batch_size)."""
    model.eval()
    batch_size = batch_size or eval_batch_size(model.members, split.x.device.type)
    with autocast(precision, split.x.device.type):
        return torch.cat([as_loss_dtype(model(x)) for x, _ in batches(split, batch_size)])


def evaluate(model: nn.Module, split: Split, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Each member's loss and accuracy as device vectors (length 1 for a single model): the caller reads all
    of an epoch's numbers in one transfer. Also the predicted labels, images x members, on the device."""
    logits = predict(model, split, precision=precision)
    logits = logits.view(len(split), -1, CLASSES)
    pred = logits.argmax(2)
    return {"loss": member_losses(logits, split.y), "acc": (pred == split.y[:, None]).float().mean(0), "pred": pred}


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int = CLASSES) -> torch.Tensor:
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


def train_epoch(step: Step, scheduler, split: Split, batch_size: int, generator: torch.Generator,
                progress: tqdm | None = None) -> dict[str, torch.Tensor | int]:
    """One pass over the training split in full batches; returns each member's summed cross-entropy and
    correct count, and the images seen.

    The incomplete last batch is dropped (it differs every epoch, as the order is reshuffled): a fixed
    batch shape keeps the compiled step from recompiling, the captured graph valid, and batch-norm
    statistics away from a tiny batch. Sums stay device tensors: reading one every batch would stall the
    device once per step.
    """
    n_batches = len(split) // batch_size
    loss_sum, correct = 0, 0
    for idx in shuffled_batches(len(split), batch_size, generator)[:n_batches]:
        loss, hits = step(idx)
        loss_sum = loss_sum + loss * batch_size
        correct = correct + hits
        scheduler.step()
        if progress is not None:
            progress.update(1)
    return {"loss_sum": loss_sum, "correct": correct, "images": n_batches * batch_size}


def new_model(cfg: TrainConfig) -> nn.Module:
    """The model `cfg` describes, initialised from its seed (on the CPU: the same weights on every device)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg)


def new_stack(cfgs: list[TrainConfig]) -> nn.Module:
    """One network holding len(cfgs) members, member k initialised exactly as `new_model(cfgs[k])`."""
    if len(cfgs) == 1:
        return new_model(cfgs[0])
    stack = build_model(cfgs[0], members=len(cfgs))
    load_members(stack, [new_model(c) for c in cfgs])
    return stack


def load_members(stack: nn.Module, models: list[nn.Module]) -> None:
    """Copy each model's weights and buffers into its member block of `stack` (models.py's layout)."""
    with torch.no_grad():
        for name, t in stack.state_dict().items():
            parts = [m.state_dict()[name] for m in models]
            t.copy_(parts[0] if t.dim() == 0 else torch.cat(parts))


def member_state(state: dict[str, torch.Tensor], k: int, members: int) -> dict[str, torch.Tensor]:
    """Member k's weights and buffers out of a stacked state dict, as a single model's state dict."""
    return {name: member_blocks(t, members, [k]) for name, t in state.items()}


def member_blocks(t: torch.Tensor, members: int, keep: list[int]) -> torch.Tensor:
    """The blocks of members `keep` of a stacked tensor, as the same tensor of a len(keep)-member stack (a
    copy); a 0-d tensor (num_batches_tracked, one for the whole stack) is copied whole."""
    return t.clone() if t.dim() == 0 else t.reshape(members, -1, *t.shape[1:])[keep].flatten(0, 1)


def check_stackable(cfgs: list[TrainConfig]) -> None:
    """Members share every setting but their coefficients and seed: one schedule, one batch order."""
    shared = {f: v for f, v in cfgs[0].__dict__.items() if f not in ("l1", "l2", "seed")}
    for cfg in cfgs[1:]:
        differing = [f for f, v in shared.items() if getattr(cfg, f) != v]
        if differing:
            raise ValueError(f"stacked members may differ only in l1, l2 and seed, not in {differing}")


@dataclass
class Trainer:
    """A training run of one or more stacked members: what it holds between epochs, on its device, and what it
    does with it (train an epoch; refill, retire or drop a member's slot). `setup` builds one."""
    data: MnistSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    penalised: list[torch.Tensor]
    step: Step
    order_generator: torch.Generator
    augment_generator: torch.Generator
    batch_size: int
    steps_per_epoch: int
    mode: str  # how the step was built to run (step_mode); effective_mode says how it runs now
    coef: Coefficients
    cfgs: list[TrainConfig]  # the member at each position
    schedules: Schedules | None = None  # per-member learning rates, when slots can be refilled

    @property
    def members(self) -> int:
        return len(self.coef.l1)

    @property
    def effective_mode(self) -> str:
        """How the step runs now: `mode`, unless a captured step fell back to eager (CudaGraphStep.mode says why)."""
        return getattr(self.step, "mode", self.mode)

    def epoch(self, progress: tqdm | None = None) -> dict[str, torch.Tensor | int]:
        """One pass over the training split, in training mode (train_epoch)."""
        self.model.train()
        return train_epoch(self.step, self.scheduler, self.data.train, self.batch_size, self.order_generator,
                           progress)

    def rates(self) -> list[float]:
        """Each member's learning rate for its next step (read before an epoch, what its metrics log)."""
        if self.schedules is not None:
            return self.schedules.rates().tolist()
        return [float(self.optimizer.param_groups[0]["lr"])] * self.members

    @torch.no_grad()
    def refill(self, pos: int, cfg: TrainConfig) -> None:
        """The slot at `pos` takes a new member `cfg`: weights and buffers as `new_model(cfg)` initialises them,
        no optimizer state (SGD's momentum then starts from the first gradient, as a new optimizer's does), its
        own coefficients, and its schedule from its first step. All in place, so a captured step replays on. Only
        for a Trainer with per-member schedules (setup's own_schedules)."""
        if self.schedules is None:
            raise ValueError("refilling a slot needs per-member schedules: setup(..., own_schedules=True)")
        self.retire(pos)  # its optimizer state zeroed (a new optimizer's), its weights written below
        # As new_model(cfg) initialises it, with only the CPU's generator seeded and then restored: reseeding the
        # global generators mid-training would restart the other members' dropout masks.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cfg.seed)
            fresh = build_model(cfg).state_dict()
        for name, t in self.model.state_dict().items():
            if t.dim() > 0:  # not num_batches_tracked: one count for the stack, unused by its norms
                t.view(self.members, -1)[pos] = fresh[name].reshape(-1)
        self.coef.l1[pos], self.coef.l2[pos], self.coef.active[pos] = cfg.l1, cfg.l2, 1.0
        self.schedules.started[pos] = self.schedules.clock
        self.cfgs[pos] = cfg

    @torch.no_grad()
    def retire(self, pos: int) -> None:
        """Stop the member at `pos`: its loss no longer counts, and its weights, buffers and optimizer state are
        zeroed so that nothing it diverged to (inf, NaN) stays in the network."""
        self.coef.active[pos] = 0.0
        tensors = list(self.model.state_dict().values())
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        for t in tensors:
            if t.dim() > 0 and t.shape[0] % self.members == 0:
                t.view(self.members, -1)[pos] = 0.0

    @torch.no_grad()
    def compact(self, keep: list[int]) -> Trainer:
        """The same training with only the members at positions `keep`: a stack whose members stop shrinks, so
        that their slots stop costing steps. Weights, batch-norm statistics, optimizer state, the schedule's
        position (with per-member schedules, each one's) and both generators carry over, so each kept member
        trains on exactly as it would have in the larger stack (tests/test_stack.py; with dropout, the masks
        are drawn for the smaller stack: other draws from the same distribution). A captured step is recorded
        anew for the smaller network."""
        members, cfgs = self.members, [self.cfgs[k] for k in keep]
        cfg, device = cfgs[0], self.coef.l1.device

        def take(t: torch.Tensor) -> torch.Tensor:
            return member_blocks(t, members, keep)

        model = build_model(cfg, members=len(keep)).to(device, next(self.model.parameters()).dtype)
        model.load_state_dict({name: take(t) for name, t in self.model.state_dict().items()})
        schedules = None if self.schedules is None else self.schedules.take(keep)
        stepping = stepping_config(cfg, schedules is not None)
        optimizer = build_optimizer(stepping, model.parameters(), device)
        for old, new in zip(self.model.parameters(), model.parameters()):
            if old in self.optimizer.state:
                optimizer.state[new] = {key: take(v) if torch.is_tensor(v) else v
                                        for key, v in self.optimizer.state[old].items()}
        scheduler = build_scheduler(stepping, optimizer, self.steps_per_epoch)
        scheduler.load_state_dict(self.scheduler.state_dict())  # where the schedule is, not where it starts
        # Loading the scheduler's state leaves the rate the new scheduler set at its start in the optimizer: the
        # old optimizer holds the rate it is at.
        for group, old in zip(optimizer.param_groups, self.optimizer.param_groups):
            if torch.is_tensor(group["lr"]):
                group["lr"].copy_(old["lr"])
            else:
                group["lr"] = old["lr"]
        penalised = list(penalised_parameters(model, cfg.penalize).values())
        coef = Coefficients(take(self.coef.l1), take(self.coef.l2), take(self.coef.active))
        mode = self.effective_mode  # a captured step that fell back to eager stays eager
        step = build_step(mode, model, optimizer, self.data.train, cfg, penalised, self.augment_generator, coef,
                          schedules)
        return Trainer(self.data, model, optimizer, scheduler, penalised, step, self.order_generator,
                       self.augment_generator, self.batch_size, self.steps_per_epoch, mode, coef, cfgs, schedules)


def setup(cfgs: TrainConfig | list[TrainConfig], data: MnistSplits, model: nn.Module | None = None,
          own_schedules: bool = False) -> Trainer:
    """Move data and model to the device once and build the optimizer, schedule and step around them.

    With several configurations, they train as the members of one stacked network (models.py) on the same
    batches; the first one's seed sets the batch order and augmentation. `own_schedules`: each member follows
    the learning-rate schedule from its own first step (Schedules), so that a slot can be refilled (SGD only).
    """
    cfgs = [cfgs] if isinstance(cfgs, TrainConfig) else list(cfgs)
    check_stackable(cfgs)
    cfg = cfgs[0]
    if own_schedules and cfg.optimizer != "sgd":
        raise ValueError(f"per-member schedules need SGD, whose update scales with lr; not {cfg.optimizer}")
    device = torch.device(cfg.resolved_device())
    configure_device(device, cfg.deterministic, cfg.tf32)
    data = data.to(device)
    model = (model if model is not None else new_stack(cfgs)).to(device)
    # Batch order and augmentation draw from separate generators: the augmentation one is advanced by
    # graph replays, the order one by plain calls.
    order_gen = torch.Generator(device).manual_seed(cfg.seed)
    augment_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    penalised = list(penalised_parameters(model, cfg.penalize).values())
    batch_size = min(cfg.batch_size, len(data.train))
    steps_per_epoch = len(data.train) // batch_size
    schedules = Schedules.of(cfg, steps_per_epoch, len(cfgs), device) if own_schedules else None
    stepping = stepping_config(cfg, own_schedules)
    optimizer = build_optimizer(stepping, model.parameters(), device)
    scheduler = build_scheduler(stepping, optimizer, steps_per_epoch)
    mode = step_mode(cfg, device)
    coef = Coefficients.of(cfgs, device)
    step = build_step(mode, model, optimizer, data.train, cfg, penalised, augment_gen, coef, schedules)
    return Trainer(data, model, optimizer, scheduler, penalised, step, order_gen, augment_gen, batch_size,
                   steps_per_epoch, mode, coef, cfgs, schedules)


def build_step(mode: str, model: nn.Module, optimizer: torch.optim.Optimizer, train: Split, cfg: TrainConfig,
               penalised: list[torch.Tensor], augment_gen: torch.Generator, coef: Coefficients,
               schedules: Schedules | None) -> Step:
    """make_step around `model`, run the way `mode` (step_mode) names: compiled, captured as a CUDA graph, or
    eager."""
    # Compiling fuses the small convs' norm/activation kernels (docs/benchmarks.md: 10-35% per step on the CPU).
    # Evaluation runs the eager model (same parameters) to avoid a second compilation.
    step_model = torch.compile(model) if mode == "compiled" else model
    step = make_step(step_model, optimizer, train, cfg, penalised, augment_gen, coef, schedules)
    return CudaGraphStep(step, augment_gen) if mode == "cuda-graph" else step


def fit(cfg: TrainConfig, data: MnistSplits, on_epoch: Callable[[int, dict], str | None] | None = None,
        show_progress: bool = False, model: nn.Module | None = None) -> FitResult:
    """Train `cfg` on `data`; epochs are numbered from 1.

    `on_epoch(epoch, metrics)` runs after each epoch; if it returns a non-empty string, training stops there
    with that string as the reason (how a pruner stops a trial without losing the epochs it ran).
    `model`, if given, must come from `new_model(cfg)`. Data and model move to `cfg`'s device once; the
    returned model holds the best-validation weights, back on the CPU. Raises DivergedError when the
    training loss stops being finite.
    """
    hook = None if on_epoch is None else (lambda k, epoch, metrics: on_epoch(epoch, metrics))
    (result,) = fit_stack([cfg], data, hook, show_progress, model)
    result.raise_if_diverged()
    return result


@dataclass
class MemberRecord:
    """fit_stack's record of one member: its result so far and where it stands."""
    cfg: TrainConfig
    result: FitResult
    joined: int  # the stack's epochs before this member's first: its own epoch is the stack's less this
    start: float  # perf_counter at its first epoch
    running: bool = True
    retired: bool = False  # its slot zeroed (Trainer.retire)
    left: bool = False  # its result final and handed to on_leave
    best_val_acc: float = -1.0
    best_test_pred: torch.Tensor | None = None  # at its best validation epoch, on the device
    best_val_loss: float = math.inf
    since_best_loss: int = 0
    hook_seconds: float = 0.0  # in on_epoch: logging and pruning, what the caller adds to each epoch

    def track_best(self, val_acc: float, val_loss: float, test_pred: torch.Tensor) -> bool:
        """Note an epoch's validation numbers (`test_pred`: the epoch's test predictions, on the device); True when
        its accuracy is the best yet, so that fit_stack keeps its weights."""
        improved = val_acc > self.best_val_acc
        if improved:
            self.best_val_acc = val_acc
            # The test predictions behind this epoch's test accuracy: those of the weights kept.
            self.best_test_pred = test_pred.clone()
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.since_best_loss = val_loss, 0
        else:
            self.since_best_loss += 1
        return improved

    def end_epoch(self, own_epoch: int, metrics: dict[str, float], test_pred: torch.Tensor,
                  on_epoch: Callable[[int, dict], str | None] | None) -> bool:
        """Take one of its epochs: stop on a loss that is not finite; else note its numbers and best weights,
        then stop where `on_epoch` says why (a pruner), for early stopping, or with its epochs done. True when
        its weights are the best yet, so that fit_stack keeps them."""
        if not math.isfinite(metrics["train/loss"]):
            self.result.stop_reason = (f"{DIVERGED}training loss is {metrics['train/loss']} (l1={self.cfg.l1}, "
                                       f"l2={self.cfg.l2}, lr={self.cfg.lr})")
            self.result.diverged, self.running = True, False
            return False
        self.result.history.append(metrics)
        improved = self.track_best(metrics["val/acc"], metrics["val/loss"], test_pred)
        hook_start = time.perf_counter()
        stop = on_epoch(own_epoch, metrics) if on_epoch is not None else None
        self.hook_seconds += time.perf_counter() - hook_start
        if not stop and self.cfg.patience and self.since_best_loss >= self.cfg.patience:
            stop = f"early stopping: val/loss did not improve for {self.cfg.patience} epochs"
        if stop:
            self.result.stop_reason, self.running = stop, False
        elif own_epoch == self.cfg.epochs:
            self.running = False  # done
        return improved


def fit_stack(cfgs: list[TrainConfig], data: MnistSplits,
              on_epoch: Callable[[int, int, dict], str | None] | None = None,
              show_progress: bool = False, model: nn.Module | None = None, compact: bool = True,
              on_leave: Callable[[int, FitResult], None] | None = None,
              refill: Callable[[int], list[TrainConfig] | None] | None = None) -> list[FitResult]:
    """Train the configurations `cfgs` together as one stacked network: one FitResult per member, each what
    `fit` would return for it alone on the same batches.

    `on_epoch(member, epoch, metrics)` runs after each of a member's epochs while it trains; a non-empty string
    it returns stops that member with that reason. A member whose loss stops being finite stops with a
    "diverged: ..." reason and `diverged` set. A member that has trained its epochs is done.

    A stopped or done member's slot is, in this order of preference:
    - refilled: `refill(free_slots)` returns up to that many new configurations, which start in freed slots
      from their own initialisation, optimizer state and schedule (Trainer.refill; they are members
      len(cfgs), len(cfgs) + 1, ... in the results), on the stack's batches from there on. SGD only. The
      slots it does not fill idle until a later call fills them, unless it returns None: no more will come.
    - with `compact`, once no more configurations will come, dropped: the stack shrinks to the members still
      training (Trainer.compact; not for a compiled step, which would compile again).
    - else left idle, computing zeros.
    A member that leaves a slot is done: `on_leave(member, result)` gets its final result then, while the
    others train on. Training ends when no member trains and no slot was refilled.
    """
    trainer = setup(cfgs, data, model, own_schedules=refill is not None)
    data, cfg = trainer.data, cfgs[0]
    start = time.perf_counter()
    # One record per member, in the order of the results; grows as slots are refilled.
    records = [MemberRecord(c, FitResult(model=trainer.model), 0, start) for c in cfgs]
    slots = list(range(len(cfgs)))  # index in records of the member at each position of the (possibly shrunk) stack
    best_state = {name: t.detach().clone() for name, t in trainer.model.state_dict().items()}

    def leave(pos: int) -> None:
        """The member at `pos` is done: its result made final (its own model with its best weights, its test
        predictions, its summary) and handed to on_leave."""
        k = slots[pos]
        rec = records[k]
        rec.result.model = member_model(rec.cfg, best_state, pos, trainer.members)
        finalise_result(rec, time.perf_counter(), trainer.effective_mode)
        rec.left = True
        if on_leave is not None:
            on_leave(k, rec.result)

    shrinks = compact and trainer.mode != "compiled"  # a compiled step would compile again for a smaller stack
    epoch = 0  # the stack's: with refilled slots, members are at different epochs of their own
    while True:
        # 1. One epoch of the whole stack.
        epoch += 1
        members, model = trainer.members, trainer.model
        t0 = time.perf_counter()
        # With refilled slots the stack trains past any one member's epochs: then no total is shown.
        desc = f"epoch {epoch}/{cfg.epochs}" if refill is None else f"stack epoch {epoch}"
        # The rate the epoch starts at is what it logs: read after it, a step schedule's decay would show an
        # epoch early.
        rates = trainer.rates()
        with tqdm(total=trainer.steps_per_epoch, desc=desc, disable=not show_progress, leave=False,
                  unit="batch") as progress:
            train = trainer.epoch(progress)
        if data.train.x.is_cuda:
            torch.cuda.synchronize()  # once an epoch, so that the epoch's time is its training time
        seconds = time.perf_counter() - t0
        # 2. Each running member: its metrics, its best weights so far, and whether it stops.
        rows, stat_names, test_pred = epoch_rows(trainer, train, cfg.precision)
        improved = [False] * members
        for pos, values in enumerate(rows):
            k = slots[pos]
            rec = records[k]
            if rec.running:
                metrics = epoch_metrics(values, stat_names, rec.cfg, rates[pos], seconds, train["images"])
                hook = None if on_epoch is None else functools.partial(on_epoch, k)
                improved[pos] = rec.end_epoch(epoch - rec.joined, metrics, test_pred[:, pos], hook)
        keep_best(best_state, model.state_dict(), improved)
        # 3. Stopped members: their slots zeroed, their results handed over where the slots may be reused.
        free = [pos for pos, k in enumerate(slots) if not records[k].running]
        for pos in free:
            if not records[slots[pos]].retired:
                trainer.retire(pos)  # no more of its gradient, nor anything it diverged to
                records[slots[pos]].retired = True
        # Stopped members leave now where their slots may be refilled or dropped (before `refill`, which may want
        # their results), else with the rest at the end.
        if refill is not None or (shrinks and len(free) < members):
            for pos in free:
                if not records[slots[pos]].left:
                    leave(pos)
        # 4. Freed slots: refilled with new configurations, or dropped once no more will come.
        new = refill(len(free)) if refill is not None and free else None  # None: no more will come
        if len(free) == members and not new:
            break  # nothing trains on
        dropped = free if new is None and shrinks else []
        for pos, new_cfg in zip(free, new or []):
            trainer.refill(pos, new_cfg)
            slots[pos] = len(records)
            records.append(MemberRecord(new_cfg, FitResult(model=trainer.model), epoch, time.perf_counter()))
            keep_best(best_state, trainer.model.state_dict(), [p == pos for p in range(members)])  # its start
        if dropped:
            keep = [pos for pos in range(members) if pos not in dropped]
            best_state = {name: member_blocks(t, members, keep) for name, t in best_state.items()}
            trainer, slots = trainer.compact(keep), [slots[pos] for pos in keep]

    members, model = trainer.members, trainer.model
    staying = [(pos, records[k]) for pos, k in enumerate(slots) if not records[k].left]
    if not staying:  # every member left with its own predictions (a refilled stack's last epoch)
        return [rec.result for rec in records]
    model.load_state_dict(best_state)
    end = time.perf_counter()
    for pos, rec in staying:
        # A lone member keeps the network it trained in, back on the CPU (in `fit`, the caller's `model`, if given).
        rec.result.model = model.cpu() if members == 1 else member_model(rec.cfg, best_state, pos, members)
        finalise_result(rec, end, trainer.effective_mode)
    return [rec.result for rec in records]


def finalise_result(rec: MemberRecord, end: float, mode: str) -> None:
    """Complete a done member's result, all but its model (`end`: perf_counter then): how its step ran, its test
    predictions and, if it trained an epoch, its summary."""
    result = rec.result
    result.step_mode = mode
    result.test_pred = rec.best_test_pred.cpu() if rec.best_test_pred is not None else None
    rec.best_test_pred = None  # off the device: a refilled stack goes through many members
    if result.history:
        result.summary = summarise(result.history, end - rec.start) | {"total_hook_seconds": rec.hook_seconds}


def member_model(cfg: TrainConfig, best_state: dict[str, torch.Tensor], pos: int, members: int) -> nn.Module:
    """The member at `pos` as a model of its own, on the CPU, holding its best-validation weights."""
    state = {name: t.cpu() for name, t in member_state(best_state, pos, members).items()}  # its blocks only
    model = build_model(cfg).to(next(t.dtype for t in state.values() if t.is_floating_point()))
    model.load_state_dict(state)
    return model


COLUMNS = ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "penalty/sum_abs_w",
           "penalty/sum_sq_w")  # the order of the first columns of epoch_rows, weight statistics after


def epoch_rows(trainer: Trainer, train: dict[str, torch.Tensor | int],
               precision: str) -> tuple[list[list[float]], list[str], torch.Tensor]:
    """Every slot's numbers for the epoch just trained (`train`: what Trainer.epoch returned) as one row each:
    COLUMNS, then the weight statistics the second value names. Also the test predictions, images x members,
    left on the device for the members whose best epoch this is."""
    model, members = trainer.model, trainer.members
    val, test = evaluate(model, trainer.data.val, precision), evaluate(model, trainer.data.test, precision)
    with torch.no_grad():
        sum_abs, sum_sq = member_sums(trainer.penalised, members)
        columns = [train["loss_sum"] / train["images"], train["correct"] / train["images"], val["loss"],
                   val["acc"], test["loss"], test["acc"], sum_abs, sum_sq]
        names, stats = weight_stats_tensor(model, members)
        # The epoch's one device-to-host transfer: every member's numbers at once, weight statistics too.
        rows = torch.cat([torch.stack([c.float() for c in columns], 1), stats], 1).tolist()
    return rows, names, test["pred"]


def epoch_metrics(values: list[float], stat_names: list[str], cfg: TrainConfig, lr: float, seconds: float,
                  images: int) -> dict[str, float]:
    """One member's logged metrics for one epoch from its row of the epoch's transfer."""
    metrics = dict(zip(COLUMNS, values))
    return {
        **metrics, "lr": lr,
        # what was added to the loss; the penalised sums above compare across coefficients
        "penalty/l1": cfg.l1 * metrics["penalty/sum_abs_w"], "penalty/l2": cfg.l2 * metrics["penalty/sum_sq_w"],
        # in a stack, the stack's epoch: every member trained in it
        "speed/epoch_seconds": seconds, "speed/images_per_sec": images / seconds,
        **dict(zip(stat_names, values[len(COLUMNS):])),
    }


def keep_best(best: dict[str, torch.Tensor], current: dict[str, torch.Tensor], improved: list[bool]) -> None:
    """Copy the improved members' blocks of `current` into `best` (all of it for a single model)."""
    if not any(improved):
        return
    members = len(improved)
    with torch.no_grad():
        mask = torch.tensor(improved, device=next(iter(current.values())).device).view(members, 1)
        for name, t in current.items():
            if t.dim() == 0:  # num_batches_tracked: shared by the members
                best[name].copy_(t)
            else:
                kept = best[name].view(members, -1)
                kept.copy_(torch.where(mask, t.view(members, -1), kept))


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
