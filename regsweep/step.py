"""The training step: from a batch's indices to each member's loss and hits, for one model or a stack of K, and
how it runs on each device.

`make_step` is the step's maths, the same on every device: gather the batch, rotate it, forward, cross-entropy
plus each member's L1/L2 penalty, backward, optimizer step. `CudaGraphStep` records it once on CUDA and replays
it (the fast path wraps the same function, it does not copy it); `step_mode` says which way a run takes and
`configure_device` sets cuDNN and TF32 for it. What changes between steps and members lives in device tensors
the step reads: the learning rate (in the optimizer), the members' coefficients (`Coefficients`) and, for stacks
whose slots are refilled, each member's own schedule (`Schedules`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data import Split, rotate_batch
from .regularization import member_penalties

CLASSES = 10  # MNIST's ten digits: the width of each member's logits


def autocast(precision: str, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def as_loss_dtype(logits: torch.Tensor) -> torch.Tensor:
    """Losses in at least float32: bf16 logits are widened, float64 ones (the equivalence tests) kept."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def build_optimizer(cfg: TrainConfig, params, device: torch.device | None = None) -> torch.optim.Optimizer:
    """On CUDA the learning rate lives in a device tensor and the update is one fused kernel: a captured step
    (CudaGraphStep) then reads the value the scheduler writes there before each replay. SGD is Nesterov's where
    it has momentum (momentum 0 is plain SGD)."""
    if device is not None and device.type == "cuda":
        lr = torch.tensor(cfg.lr, device=device)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, fused=True, capturable=True)
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped once per batch, so every schedule is expressed in batches."""
    if cfg.scheduler == "onecycle":
        total = cfg.epochs * steps_per_epoch
        # A short warm-up (15 epochs leave little room). It ends at step pct_start * total - 1, and OneCycleLR
        # divides by that: at exactly 0 (5 steps in all) by zero. Runs that short get no warm-up, as runs of
        # fewer steps already do (theirs would end before step 0).
        pct_start = 0.2 if total > 5 else 0.5 / total
        # cycle_momentum=False: momentum stays at cfg.momentum. Cycling it would bake a different constant into
        # every captured step (the fused kernels take momentum as a number), and a schedule must act the same on
        # every device.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=pct_start, cycle_momentum=False)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


Step = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Coefficients:
    """What differs between the members of a stack, as device tensors a captured step reads at each replay:
    each member's L1 and L2 coefficient, and whether it still trains (0 once it stopped)."""
    l1: torch.Tensor
    l2: torch.Tensor
    active: torch.Tensor

    @classmethod
    def of(cls, cfgs: list[TrainConfig], device: torch.device) -> Coefficients:
        def vector(values):
            return torch.tensor(values, dtype=torch.float32, device=device)
        return cls(vector([c.l1 for c in cfgs]), vector([c.l2 for c in cfgs]), vector([1.0] * len(cfgs)))


@dataclass
class Schedules:
    """Each member's learning rate at its own step, for a stack whose members start at different times (a freed
    slot refilled with a new member: fit_stack's `refill`).

    torch's optimizers hold one learning rate per parameter tensor, and every tensor of a stack holds all its
    members. So the optimizer steps at lr 1 and each member's rate enters through its loss and its momentum.
    SGD's step at rate r_t is r_t (g_t + m buf_t), where buf_t = m buf_t-1 + g_t sums past gradients (L2 is in
    the loss: no weight decay). Member k's loss scaled by r_t scales its gradients, and so g_t, by r_t (no other
    member's loss reaches its weights); its momentum buffer scaled by r_t / r_t-1 before the step keeps the
    buffer at r_t buf_t. The step at lr 1 is then the step at r_t, up to rounding (a unit or two in the last
    place), at the cost of one multiplication per momentum buffer. The rates are those of the configured torch
    scheduler, read off once per step of a member's training into `table`; a member reads it at its own step
    count. Device tensors: a captured step reads and advances them at every replay.
    """
    table: torch.Tensor  # float64: the learning rate of a member's i-th step, i <= epochs x steps per epoch
    started: torch.Tensor  # per member: the stack's step count at its first step
    clock: torch.Tensor  # 0-d: the steps the stack has taken

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int, members: int, device: torch.device) -> Schedules:
        stand_in = torch.optim.SGD([torch.zeros(1)], lr=cfg.lr)  # the scheduler only reads and writes its lr
        scheduler = build_scheduler(cfg, stand_in, steps_per_epoch)
        stand_in.step()  # no gradient, no change: only so that the scheduler sees a step before its own
        rates = [stand_in.param_groups[0]["lr"]]
        for _ in range(cfg.epochs * steps_per_epoch):  # to the rate after the last step, as training's scheduler
            scheduler.step()
            rates.append(stand_in.param_groups[0]["lr"])
        return cls(torch.tensor(rates, dtype=torch.float64, device=device),
                   torch.zeros(members, dtype=torch.long, device=device),
                   torch.zeros((), dtype=torch.long, device=device))

    def own_steps(self) -> torch.Tensor:
        """The steps each member has taken (an index into `table`)."""
        return (self.clock - self.started).clamp(0, len(self.table) - 1)

    def rates(self) -> torch.Tensor:
        """Each member's learning rate for its next step."""
        return self.table[self.own_steps()]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's rate for its next step, and its ratio to the member's rate at its previous step (1 at
        its first: its momentum buffer is zero, or not there yet)."""
        own = self.own_steps()
        rate = self.table[own]
        return rate, rate / self.table[(own - 1).clamp(min=0)]

    @torch.no_grad()
    def rescale_momentum(self, optimizer: torch.optim.Optimizer, ratio: torch.Tensor) -> None:
        """Scale each member's block of every momentum buffer by its ratio."""
        buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for group in optimizer.param_groups
                   for p in group["params"]]
        buffers = [b for b in buffers if b is not None]  # none before the first step, nor without momentum
        if buffers:
            column = ratio.to(buffers[0].dtype).view(-1, 1)  # the parameters' dtype, as every buffer's
            for buffer in buffers:
                buffer.view(len(ratio), -1).mul_(column)

    def take(self, keep: list[int]) -> Schedules:
        """The schedules of the members at positions `keep` (Trainer.compact)."""
        return Schedules(self.table, self.started[keep].clone(), self.clock.clone())


def member_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each member over the batch: B x K x CLASSES logits -> K losses."""
    return F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, logits.shape[1]), reduction="none").mean(0)


def make_step(step_model: nn.Module, optimizer: torch.optim.Optimizer, split: Split, cfg: TrainConfig,
              penalised: list[torch.Tensor], generator: torch.Generator, coef: Coefficients,
              schedules: Schedules | None = None) -> Step:
    """The training step, from a batch's indices to each member's (cross-entropy, number correct) as device
    tensors.

    Everything a step does is in here, gathering the batch included, so that CudaGraphStep can record it
    whole; the CPU and a non-captured GPU run call it as it is. The loss is the sum of the members' losses:
    member k's weights appear only in its own term, so each member gets exactly the gradient it would get
    trained alone.
    """
    members = len(coef.l1)

    def step(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = split.x[idx], split.y[idx]
        if cfg.augment:
            x = rotate_batch(x, cfg.rotate, generator)
        with autocast(cfg.precision, x.device.type):
            logits = as_loss_dtype(step_model(x)).view(len(y), members, CLASSES)
        data_loss = member_losses(logits, y)
        weight = coef.active
        if schedules is not None:  # each member's own learning rate (Schedules)
            rate, ratio = schedules.factors()
            weight = weight * rate.to(data_loss.dtype)
        loss = (weight * (data_loss + member_penalties(penalised, coef.l1, coef.l2, members))).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if schedules is not None:
            schedules.rescale_momentum(optimizer, ratio)
            schedules.clock.add_(1)
        optimizer.step()
        return data_loss.detach(), (logits.argmax(2) == y[:, None]).sum(0)

    return step


# Eager steps before a CUDA graph is captured. They create what the graph must find in place rather than record:
# the optimizer's state (made at its first step: SGD's momentum buffers, Adam's moments) and the libraries' lazily
# created handles and workspaces. Three, as in PyTorch's CUDA-graphs notes ("whole network capture").
CAPTURE_WARMUP_CALLS = 3


class CudaGraphStep:
    """A step recorded once as a CUDA graph and replayed for every later batch.

    A step of this 10k-parameter network is a few hundred tiny kernels; launching them one by one from
    Python, not arithmetic, bounds its speed on a GPU. Replaying the recorded graph launches them all at
    once (PyTorch's CUDA-graphs notes, "whole network capture"). What changes between batches lives in
    tensors the graph reads: the batch indices (copied into `idx` before each replay), the learning rate
    (the scheduler writes the optimizer's lr tensor), the members' coefficients and active flags, and the
    random state of `generator` (registered with the graph, so each replay draws new rotations; batch order
    comes from another generator, used outside the graph). The first `warmup` calls run eagerly on a side
    stream, as capture requires (CAPTURE_WARMUP_CALLS says why); they are ordinary training steps.

    A step that cannot be recorded (an operation that waits on the host, say, from a model added later) fails
    at capture, before any of it has run: the step then runs eagerly from there on, and `mode` says why.
    """

    def __init__(self, step: Step, generator: torch.Generator, warmup: int = CAPTURE_WARMUP_CALLS):
        self.step, self.generator, self.warmup = step, generator, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmup_calls = 0  # eager calls so far, before capture
        # Set at capture: a replay reads its batch indices from `idx` and writes its results into `out`.
        self.idx: torch.Tensor | None = None
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mode = "cuda-graph"  # or "eager: ..." once capture has failed

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode != "cuda-graph":
            return self.step(idx)
        if self.graph is None and self.warmup_calls < self.warmup:
            self.warmup_calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(idx)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.idx = idx.clone()
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.generator)
            stream, pool = torch.cuda.current_stream(), torch.cuda.graph_pool_handle()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self.out = self.step(self.idx)
            except RuntimeError as exc:  # recording only: nothing of this step has run yet
                recover_from_failed_capture(stream, pool, self.generator)
                # What failed inside the recording, rather than the failed end of it that followed.
                cause = exc.__context__ if isinstance(exc.__context__, Exception) else exc
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                self.mode = f"eager: CUDA graph capture failed ({first[:200]})"
                return self.step(idx)
            self.graph = graph
        else:
            self.idx.copy_(idx)  # same shape: train_epoch only feeds full batches
        self.graph.replay()  # after capture too: capturing records the step without running it
        return self.out


def recover_from_failed_capture(stream: torch.cuda.Stream, pool, generator: torch.Generator) -> None:
    """Undo what a failed capture leaves behind, so that the process trains on eagerly and can capture again.

    torch.cuda.graph's exit stops at the failed end of the recording, before it (a) puts back the stream that
    was current, (b) stops the caching allocator serving this thread from the graph's memory `pool` (until
    then the next capture's empty_cache asserts that no capture is under way, and every later step of the
    process would fall back too) and (c) takes the generators the recording drew from out of capture mode:
    `generator`, registered with the graph, and the device's default one (dropout's), which capture registers
    by itself; a fresh copy of a generator's state (same seed and offset) lets it draw outside a graph again.
    Where torch ended the pool's allocation itself (newer releases do, and free the pool with the graph), the
    first call fails and the second is skipped with it, so the pool is never released twice. The generators
    are reset one by one: one that fails leaves only its own consequence."""
    torch.cuda.set_stream(stream)
    device = torch.cuda.current_device()
    try:  # private bindings, used the same way by torch.cuda.memory's MemPool context
        torch._C._cuda_endAllocateToPool(device, pool)
        torch._C._cuda_releasePool(device, pool)
    except (AttributeError, RuntimeError):
        pass
    for g in (generator, torch.cuda.default_generators[device]):
        try:
            g.graphsafe_set_state(g.clone_state())
        except RuntimeError:
            pass
    torch.cuda.synchronize()


def configure_device(device: torch.device, deterministic: bool = True, tf32: bool = True) -> None:
    """Same seed, same device, same result. On CUDA: cuDNN picks its algorithms deterministically instead of
    by timing them (benchmark mode could pick a different one each run). Deterministic algorithms cost
    speed, most for a stack's grouped convolutions, so `deterministic=False` trades reproducibility for it.
    TF32 convolutions (PyTorch's default, which `tf32` keeps) round the inputs of each multiply to 10 bits
    of mantissa but stay deterministic; they buy back more than cuDNN's non-deterministic algorithms do
    (docs/benchmarks.md: at 32 members, 2.4x against 2.3x). Matrix products (the MLP) stay float32, as
    PyTorch's default has them. The equivalence tests, which compare a stack with separate models to 1e-7,
    switch TF32 off."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = tf32


def step_mode(cfg: TrainConfig, device: torch.device) -> str:
    """How the training step runs: 'cuda-graph', 'compiled' or 'eager'."""
    if device.type == "cuda" and cfg.cuda_graph:
        return "cuda-graph"
    return "compiled" if cfg.compile else "eager"


def stepping_config(cfg: TrainConfig, own_schedules: bool) -> TrainConfig:
    """What the optimizer and its torch scheduler are built from: `cfg`, or with per-member schedules lr 1 and no
    schedule (Schedules brings each member's rate in through its loss and momentum)."""
    return cfg.replace(lr=1.0, scheduler="none") if own_schedules else cfg
