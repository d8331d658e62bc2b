"""GPU throughput and a complete `regsweep train` on CUDA, in one run.

Rows, all on the same default CNN, batch 128, L1 and L2 on, after an untimed warm-up:

  usual pipeline, 1 / 4 workers: torchvision MNIST with per-sample RandomRotation/ToTensor/Normalize, a
      DataLoader(pin_memory=True), the model on the GPU, penalties summed in a Python loop
      (benchmarks/throughput.py's reference pipeline, on CUDA).
  regsweep eager: data resident on the GPU, one rotation call per batch, the step launched op by op.
  regsweep graph: the same step captured once as a CUDA graph and replayed (what `regsweep train` runs).

Then what a fresh process pays to import the training stack and `mlflow.pytorch` (which imports Lightning
where it is installed, unless regsweep hides it), and `regsweep train` with its defaults on full MNIST (15
epochs, MLflow logging to a temporary SQLite store, figures and model) as a user runs it, twice (the first
pays one-off start-up costs), with its wall time, and the same training through `fit()` without MLflow, to
show what logging costs.

    python benchmarks/gpu.py                   # about 3 minutes on one H100
    python benchmarks/gpu.py --skip-train      # throughput rows only
    python benchmarks/gpu.py --skip-pipelines  # the import table and the complete train only
    python benchmarks/gpu.py --startup         # the import table only, on any machine

Without CUDA it says so and exits 0; `--startup` runs anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bytecode import bytecode_line  # noqa: E402
from throughput import L1, L2, reference_pipeline, regsweep_pipeline  # noqa: E402

from regsweep.config import TrainConfig  # noqa: E402
from regsweep.data import load_mnist, prepare_vendored  # noqa: E402
from regsweep.training import fit  # noqa: E402


def throughput(args) -> None:
    cfg = TrainConfig(l1=L1, l2=L2, device="cuda")
    n = args.images
    pipelines = {
        "usual pipeline, 1 worker": reference_pipeline(cfg, n, num_workers=1, device="cuda"),
        "usual pipeline, 4 workers": reference_pipeline(cfg, n, num_workers=4, device="cuda"),
        "regsweep eager": regsweep_pipeline(cfg.replace(cuda_graph=False, compile=False), n),
        "regsweep graph": regsweep_pipeline(cfg, n),
        "regsweep graph, bf16": regsweep_pipeline(cfg.replace(precision="bf16"), n),
    }
    rates = {name: [] for name in pipelines}
    for _ in range(args.rounds):  # interleaved, so a slow spell hits every pipeline alike
        for name, one_pass in pipelines.items():
            rates[name].append(one_pass())
    med = {name: statistics.median(r) for name, r in rates.items()}
    one, four = med["usual pipeline, 1 worker"], med["usual pipeline, 4 workers"]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {n} images per pass, median of "
          f"{args.rounds} interleaved rounds\n")
    print("| pipeline | images/s | vs 1 worker | vs 4 workers | rounds |")
    print("|---|---|---|---|---|")
    for name, rate in med.items():
        rounds = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"| {name} | {rate:,.0f} | {rate / one:.1f}x | {rate / four:.1f}x | {rounds} |", flush=True)


# What each row times, in a fresh process after the row's set-up (which is not timed).
STARTUP = {
    "import torch": ("", "import torch"),
    "import mlflow": ("", "import mlflow"),
    "import regsweep.tracking (torch, MLflow, the training stack)": ("", "import regsweep.tracking"),
    "then `import mlflow.pytorch`, as MLflow does it": ("import regsweep.tracking", "import mlflow.pytorch"),
    "then `regsweep.tracking.pytorch_flavour()`, as regsweep does it": (
        "import regsweep.tracking", "regsweep.tracking.pytorch_flavour()"),
}


def startup_costs(rounds: int) -> None:
    """What a fresh `regsweep train` pays to import its stack, and what logging the model adds: importing
    `mlflow.pytorch`, which imports Lightning where it is installed (for an autologging callback regsweep does
    not use) unless regsweep's `pytorch_flavour()` hides it."""
    import importlib.util

    lightning = [m for m in ("lightning", "pytorch_lightning") if importlib.util.find_spec(m)]
    print(f"\n{bytecode_line()}")
    print(f"\nImports in a fresh process, median of {rounds} (Lightning installed here: "
          f"{', '.join(lightning) or 'no'}):\n")
    print("| import | s | rounds |\n|---|---|---|")
    for name, (setup, timed) in STARTUP.items():
        code = "; ".join(filter(None, ["import time", setup, "t = time.perf_counter()", timed,
                                       "print(time.perf_counter() - t)"]))
        # The last line: whatever an import prints itself comes before it.
        seconds = [float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                        text=True).stdout.split()[-1]) for _ in range(rounds)]
        print(f"| {name} | {statistics.median(seconds):.2f} | {', '.join(f'{x:.2f}' for x in seconds)} |",
              flush=True)


def complete_train(args) -> None:
    from mlflow.tracking import MlflowClient

    store = tempfile.mkdtemp()
    uri = f"sqlite:///{store}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    print(f"\n`regsweep train --epochs {args.epochs}` (defaults otherwise: CUDA graph, full MNIST, MLflow logging, "
          "figures, model), as a subprocess, twice:\n")
    print("| run | wall s | training steps s | epochs loop s | outside training steps | epoch logging s "
          "| logging share | best-val epoch | test acc at best val | best test acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    client = MlflowClient(uri)
    loop_seconds = []
    for attempt in (1, 2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "regsweep", "train", "--epochs", str(args.epochs), "--quiet",
                        "--experiment-name", "gpu-bench", "--device", "cuda"], env=env, check=True, cwd=store)
        wall = time.perf_counter() - start
        run = client.search_runs([client.get_experiment_by_name("gpu-bench").experiment_id],
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        steps = sum(m.value for m in client.get_metric_history(run.info.run_id, "speed/epoch_seconds"))
        m = run.data.metrics
        loop_seconds.append(m["total_train_seconds"])
        # Epoch logging: time inside the per-epoch hook (queueing the epoch's metrics), measured in the run.
        print(f"| {attempt} | {wall:.1f} | {steps:.1f} | {m['total_train_seconds']:.1f} | "
              f"{100 * (1 - steps / wall):.0f}% | {m['total_hook_seconds']:.2f} | "
              f"{100 * m['total_hook_seconds'] / wall:.1f}% | {m['best_val_epoch']:.0f} | "
              f"{100 * m['test_acc_at_best_val']:.2f}% | {100 * m['best_test_acc']:.2f}% |", flush=True)

    cfg = TrainConfig(epochs=args.epochs, device="cuda")
    data = load_mnist(cfg.resolved_data_dir())
    plain = fit(cfg, data).summary["total_train_seconds"]
    logged = loop_seconds[-1]
    print(f"\nThe epochs loop without MLflow (`fit()` in this process): {plain:.1f} s; with per-epoch logging "
          f"(run 2): {logged:.1f} s; logging's share of run 2's loop: {100 * max(0.0, logged - plain) / logged:.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=54912, help="images timed per pipeline and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-pipelines", action="store_true", help="no throughput rows")
    parser.add_argument("--startup", action="store_true",
                        help="only the import table, which runs without CUDA too")
    args = parser.parse_args()
    if args.startup:
        startup_costs(args.rounds)
        return
    if not torch.cuda.is_available():
        print("No CUDA device here: nothing to measure (benchmarks/throughput.py measures the CPU).")
        return
    prepare_vendored(Path(TrainConfig().resolved_data_dir()))  # the usual pipeline reads MNIST/raw directly
    if not args.skip_pipelines:
        throughput(args)
    if not args.skip_train:
        startup_costs(args.rounds)
        complete_train(args)


if __name__ == "__main__":
    main()
