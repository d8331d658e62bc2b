"""Ways to make the compiled fp32 training step faster, timed against regsweep's own step in one run.

Every variant trains the default CNN (L1 and L2 on, rotation, batch 128) on the same random batches; the
variants take turns, round after round, so a slow spell of a shared machine hits all of them alike. Printed:
the median and best ms per step, and each variant's median relative to regsweep's step.

  eager          no torch.compile
  regsweep       what fit() runs: the model compiled, loss, penalty and optimiser step eager
  whole-step     model, cross-entropy and penalty compiled as one graph
  compiled-opt   regsweep's step plus a compiled optimiser step
  fused-sgd      regsweep's step with SGD(fused=True)
  max-of-views   2x2 max-pool written as the max of four strided views (no pooling indices to scatter)
  simd-256       inductor told to use 256-bit vectors (8 floats: one vector per 8-channel layer)
  channels-last  regsweep's step with the model and each batch in channels-last memory format
  max-autotune   the model compiled with mode="max-autotune-no-cudagraphs" (slow to compile)

    python benchmarks/step_variants.py                 # ~5 minutes on 2 cores
    python benchmarks/step_variants.py --variants regsweep,whole-step --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from regsweep.config import TrainConfig
from regsweep.data import rotate_batch
from regsweep.regularization import penalised_parameters, regularisation_loss
from regsweep.step import build_optimizer
from regsweep.training import new_model

VARIANTS = ("eager", "regsweep", "whole-step", "compiled-opt", "fused-sgd", "max-of-views", "simd-256",
            "channels-last", "max-autotune")


def max_of_views(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 2) for even sizes; its gradient differs only where a window has tied maxima (after a
    ReLU: zeros, whose gradient the ReLU drops anyway)."""
    return torch.maximum(torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]),
                         torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


def build_step(variant: str, cfg: TrainConfig):
    """A function that runs one training step on (x, y), set up as `variant` says."""
    inductor_config.cpp.simdlen = 256 if variant == "simd-256" else None  # read when the graph compiles
    model = new_model(cfg)
    if variant == "max-of-views":
        def forward(x, m=model):  # SqueezeExpandCNN.forward with the pooling swapped
            x = m.block("trans1", max_of_views(m.block("conv2", m.block("conv1", x))))
            x = m.block("conv6", m.block("conv5", m.block("conv4", m.block("conv3", x))))
            return m.head(F.adaptive_avg_pool2d(x, 1)).flatten(1)
        model.forward = forward
    if variant == "channels-last":
        model = model.to(memory_format=torch.channels_last)
    penalised = list(penalised_parameters(model, cfg.penalize).values())
    if variant == "fused-sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                    fused=True)
    else:
        optimizer = build_optimizer(cfg, model.parameters())

    def loss_of(net):
        return lambda x, y: F.cross_entropy(net(x), y) + regularisation_loss(penalised, cfg.l1, cfg.l2)

    if variant == "eager":
        loss_fn = loss_of(model)
    elif variant == "whole-step":
        loss_fn = torch.compile(loss_of(model))
    elif variant == "max-autotune":
        loss_fn = loss_of(torch.compile(model, mode="max-autotune-no-cudagraphs"))
    else:
        loss_fn = loss_of(torch.compile(model))
    optimizer_step = torch.compile(optimizer.step) if variant == "compiled-opt" else optimizer.step

    def step(x, y):
        if variant == "channels-last":
            x = x.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    cfg = TrainConfig(l1=1e-3, l2=5e-4)
    generator = torch.Generator().manual_seed(0)
    x_all = torch.randn(cfg.batch_size * args.steps, 1, 28, 28, generator=generator)
    y_all = torch.randint(0, 10, (cfg.batch_size * args.steps,), generator=generator)
    batches = [(x_all[i:i + cfg.batch_size], y_all[i:i + cfg.batch_size])
               for i in range(0, len(x_all), cfg.batch_size)]

    def run(step) -> float:
        start = time.perf_counter()
        for x, y in batches:
            step(rotate_batch(x, cfg.rotate, generator), y)
        return 1000 * (time.perf_counter() - start) / len(batches)

    steps = {}
    for name in names:
        steps[name] = build_step(name, cfg)
        for x, y in batches[:3]:  # compiles
            steps[name](x, y)
    times = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            times[name].append(run(steps[name]))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {cfg.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps\n")
    print("| variant | median ms/step | best ms/step | vs regsweep (median) |")
    print("|---|---|---|---|")
    reference = statistics.median(times["regsweep"]) if "regsweep" in times else None
    for name in names:
        med = statistics.median(times[name])
        relative = f"{reference / med:.2f}x" if reference else "-"
        print(f"| {name} | {med:.1f} | {min(times[name]):.1f} | {relative} |")


if __name__ == "__main__":
    main()
