"""Training throughput: regsweep's pipeline against the usual torchvision + DataLoader pipeline, in one run.

Both train the same default CNN (same architecture, optimiser, batch size, L1+L2 penalties and rotation
augmentation) on the same number of MNIST images, after a warm-up that is not timed (it includes
torch.compile's one-off compilation for regsweep).

  reference: torchvision.datasets.MNIST with per-sample RandomRotation/ToTensor/Normalize, a DataLoader
             (num_workers 0 and 2 are both measured; the faster counts), eager model, penalties summed in a
             Python loop over named_parameters every step.
  regsweep:  uint8 tensors normalised once in memory, batches as index slices, rotation of whole batches,
             penalised tensors listed once, torch.compile'd training step.

Then, unless --skip-accuracy: regsweep fp32 vs bf16 accuracy over a few seeds, to show bf16 costs nothing.

    python benchmarks/throughput.py                # ~12 minutes on 2 cores
    python benchmarks/throughput.py --images 4096 --rounds 1 --skip-accuracy   # quick look
    python benchmarks/throughput.py --evaluation 1,4,8      # evaluation only: images a batch, stacks of K
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from regsweep.config import TrainConfig
from regsweep.data import MNIST_MEAN, MNIST_STD, Split, load_mnist, prepare_vendored
from regsweep.models import build_model
from regsweep.step import build_optimizer
from regsweep.training import eval_batch_size, fit, new_stack, predict, setup

L1, L2 = 1e-3, 5e-4  # both penalties on, so their cost is part of what is measured


def reference_pipeline(cfg: TrainConfig, n_images: int, num_workers: int, warmup_batches: int = 5,
                       device: str = "cpu") -> Callable[[], float]:
    """The pipeline as it is usually written; returns a function that runs one pass and gives images/s.

    Each pass iterates the DataLoader afresh, as an epoch does; the first `warmup_batches` (worker start-up,
    first allocations) are not timed. On CUDA the model lives on the GPU and each batch is copied there from
    pinned memory, as the usual GPU recipe does.
    """
    data_dir = cfg.resolved_data_dir()
    transform = transforms.Compose([
        transforms.RandomRotation(cfg.rotate, fill=0),
        transforms.ToTensor(),
        transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)),
    ])
    train = datasets.MNIST(data_dir, train=True, download=False, transform=transform)
    total = n_images + warmup_batches * cfg.batch_size
    loader = DataLoader(Subset(train, range(total)), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=num_workers, drop_last=True, pin_memory=device == "cuda")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    amp = torch.autocast(device, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    model.train()

    def one_pass() -> float:
        seen, start = 0, None
        for i, (x, y) in enumerate(loader):
            if i == warmup_batches:
                synchronize(device)
                start = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with amp:
                logits = model(x).float()
            loss = F.cross_entropy(logits, y)
            l1 = l2 = 0.0
            for name, p in model.named_parameters():
                if "weight" in name and p.dim() > 1:
                    l1 = l1 + p.abs().sum()
                    l2 = l2 + (p ** 2).sum()
            loss = loss + L1 * l1 + L2 * l2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if start is not None:
                seen += len(y)
        synchronize(device)
        return seen / (time.perf_counter() - start)

    return one_pass


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def regsweep_epoch(cfg: TrainConfig, n_images: int):
    """regsweep's training step set up as fit() does it; returns a function that trains one epoch."""
    data = load_mnist(cfg.resolved_data_dir(), max_train_samples=n_images, max_eval_samples=1)
    return setup(cfg.replace(scheduler="none"), data).epoch


def regsweep_pipeline(cfg: TrainConfig, n_images: int) -> Callable[[], float]:
    """regsweep's training step; returns a function that trains one epoch and gives images/s."""
    epoch = regsweep_epoch(cfg, n_images)
    epoch()  # warm-up: compiles (or captures the CUDA graph)

    def one_pass() -> float:
        start = time.perf_counter()
        stats = epoch()
        synchronize(cfg.resolved_device())
        return stats["images"] / (time.perf_counter() - start)

    return one_pass


def profile_step(cfg: TrainConfig, steps: int = 20) -> None:
    """Where a compiled training step spends its time: ATen operators and inductor's generated kernels."""
    import torch._inductor.config as inductor_config
    from torch.profiler import profile

    torch._dynamo.reset()  # compile afresh, so that the kernels carry their names
    epoch = regsweep_epoch(cfg, cfg.batch_size * steps)
    # Only this compilation names its kernels and skips the caches; later ones (the accuracy runs) do not.
    with inductor_config.patch({"cpp.enable_kernel_profile": True, "force_disable_caches": True}):
        epoch()  # compile
    with profile() as prof:
        epoch()
    print(f"\nprofile of {steps} compiled fp32 steps, top operators and kernels by own CPU time:\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=110))


def evaluation(member_counts: list[int], rounds: int) -> None:
    """Evaluation (training.predict on the 10,000 test images) of the default CNN stacked K times, at the batch
    regsweep picks (training.eval_batch_size) and at other sizes, 1,000 images a batch the reference; the
    sizes interleaved over `rounds`, medians. Evaluation runs twice an epoch (validation and test splits)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_mnist(TrainConfig().resolved_data_dir(), max_train_samples=1)
    split = Split(data.test.x.to(device), data.test.y.to(device))
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}; {len(split):,} test images, median of {rounds} rounds\n")
    print("| members | images a batch | µs per model-image | vs 1,000 a batch |\n|---|---|---|---|")
    for k in member_counts:
        model = new_stack([TrainConfig(seed=seed) for seed in range(k)]).to(device)
        chosen = eval_batch_size(k, device)
        sizes = sorted({chosen, 1000, max(16, chosen // 4), 4 * chosen} - {0})
        seconds = {size: [] for size in sizes}
        for size in sizes:
            predict(model, split, batch_size=size)  # warm-up
        for _ in range(rounds):
            for size in sizes:
                start = time.perf_counter()
                predict(model, split, batch_size=size)
                synchronize(device)
                seconds[size].append(time.perf_counter() - start)
        per = {size: 1e6 * statistics.median(t) / (len(split) * k) for size, t in seconds.items()}
        for size in sizes:
            mark = " (regsweep's)" if size == chosen else ""
            print(f"| {k} | {size:,}{mark} | {per[size]:.0f} | {per[1000] / per[size]:.2f}x |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16384, help="images timed per pipeline and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed passes per pipeline")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--accuracy-epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print where a compiled step spends time")
    parser.add_argument("--evaluation", default=None, metavar="K,...",
                        help="only evaluation's speed per batch size, for stacks of these sizes (e.g. 1,4,8)")
    args = parser.parse_args()
    if args.evaluation:
        evaluation([int(k) for k in args.evaluation.split(",")], args.rounds)
        return
    prepare_vendored(Path(TrainConfig().resolved_data_dir()))  # the reference reads MNIST/raw directly

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.images} images per pass, "
          f"{args.rounds} rounds; "
          f"L1={L1}, L2={L2}\n")
    print("| precision | reference, 0 workers | reference, 2 workers | regsweep, eager | regsweep | speed-up "
          "(median) | speed-up (per round) |")
    print("|---|---|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(l1=L1, l2=L2, precision=precision, device="cpu")
        pipelines = {
            "ref0": reference_pipeline(cfg, args.images, num_workers=0),
            "ref2": reference_pipeline(cfg, args.images, num_workers=2),
            "eager": regsweep_pipeline(cfg.replace(compile=False), args.images),
            "ours": regsweep_pipeline(cfg, args.images),
        }
        # Rounds interleave the pipelines, so a slow spell of a shared machine hits all of them alike.
        rates = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, one_pass in pipelines.items():
                rates[name].append(one_pass())
        ratios = sorted(o / max(r0, r2) for o, r0, r2 in zip(rates["ours"], rates["ref0"], rates["ref2"]))
        med = {name: statistics.median(r) for name, r in rates.items()}
        print(f"| {precision} | {med['ref0']:,.0f} img/s | {med['ref2']:,.0f} img/s | {med['eager']:,.0f} img/s | "
              f"{med['ours']:,.0f} img/s | {med['ours'] / max(med['ref0'], med['ref2']):.2f}x | "
              f"{', '.join(f'{r:.2f}x' for r in ratios)} |", flush=True)
    if args.profile:
        profile_step(TrainConfig(l1=L1, l2=L2, device="cpu"))

    if args.skip_accuracy:
        return
    print(f"\nregsweep, full training set, {args.accuracy_epochs} epochs (onecycle), seeds 1..{args.seeds}: "
          "best validation accuracy and test accuracy at that epoch\n")
    print("| precision | val acc (mean ± sd) | test acc (mean ± sd) | s/epoch |")
    print("|---|---|---|---|")
    data = load_mnist(TrainConfig().resolved_data_dir())
    for precision in ("fp32", "bf16"):
        vals, tests, secs = [], [], []
        for seed in range(1, args.seeds + 1):
            cfg = TrainConfig(epochs=args.accuracy_epochs, precision=precision, seed=seed, device="cpu")
            summary = fit(cfg, data).summary
            vals.append(100 * summary["best_val_acc"])
            tests.append(100 * summary["test_acc_at_best_val"])
            secs.append(summary["total_train_seconds"] / summary["epochs_trained"])
        print(f"| {precision} | {statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} | "
              f"{statistics.mean(tests):.2f} ± {statistics.stdev(tests):.2f} | {statistics.mean(secs):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
