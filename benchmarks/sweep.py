"""What pruning and parallel workers buy: the same trial budget under different settings, in one run.

Each row is a fresh `regsweep optimize` (a subprocess, as a user runs it) with its own temporary MLflow and
Optuna stores, the same TPE seed and the same fixed MNIST subset. Printed per row: epochs actually trained
over all trials, wall time, trials per hour and the best validation accuracy found.

    python benchmarks/sweep.py                   # 30 trials x 8 epochs, 5 sweeps: ~25 minutes on 2 cores
    python benchmarks/sweep.py --trials 8 --epochs 4 --rows none,median   # quick look
    python benchmarks/sweep.py --trials 10 --rows none,none-1t,none-2w      # where a second worker's gain goes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from regsweep.sweep import threads_per_worker

ROWS = {  # name: (pruner, workers, torch threads per worker; 0 = regsweep's default, cores / workers)
    "none": ("none", 1, 0),
    "median": ("median", 1, 0),
    "hyperband": ("hyperband", 1, 0),
    "none-2w": ("none", 2, 0),
    "median-2w": ("median", 2, 0),
    # Not run by default: one worker held to one thread, the yardstick for what a second worker can add.
    "none-1t": ("none", 1, 1),
}
DEFAULT_ROWS = "none,median,hyperband,none-2w,median-2w"


def run_sweep(pruner: str, workers: int, threads: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="regsweep-bench-") as tmp:
        storage = f"sqlite:///{Path(tmp) / 'optuna.db'}"
        cmd = [sys.executable, "-m", "regsweep", "optimize", "--trials", str(args.trials), "--epochs",
               str(args.epochs), "--max-train-samples", str(args.train), "--max-eval-samples", str(args.eval),
               "--batch-size", "64", "--compile", "false", "--log-images", "false", "--pruner", pruner,
               "--workers", str(workers), "--threads", str(threads), "--storage", storage, "--seed", "0"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}"}
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name="regsweep", storage=storage)
        finished = [t for t in study.trials if t.state.is_finished()]
        return {
            "epochs": sum(len(t.intermediate_values) for t in finished),
            "pruned": sum(t.state.name == "PRUNED" for t in finished),
            "trials": len(finished),
            "wall": wall,
            "best": 100 * study.best_value,
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train", type=int, default=4096, help="training images per trial")
    parser.add_argument("--eval", type=int, default=2000, help="validation (and test) images per trial")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated subset of {', '.join(ROWS)}")
    args = parser.parse_args()

    print(f"{args.trials} trials, up to {args.epochs} epochs each, {args.train} training and {args.eval} "
          f"validation images, TPE seed 0, {os.cpu_count()} cores\n")
    print("| pruner | workers | threads each | epochs trained | vs no pruning | pruned trials | wall time | "
          "trials/hour | worker-seconds per trial | best val acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for name in args.rows.split(","):
        pruner, workers, threads = ROWS[name]
        r = results[name] = run_sweep(pruner, workers, threads, args)
        base = results.get("none")
        share = f"{100 * r['epochs'] / base['epochs']:.0f}%" if base else "-"
        threads_each = threads_per_worker(workers, threads)
        print(f"| {pruner} | {workers} | {threads_each} | {r['epochs']} | {share} | {r['pruned']} | "
              f"{r['wall'] / 60:.1f} min | {3600 * r['trials'] / r['wall']:.0f} | "
              f"{workers * r['wall'] / r['trials']:.1f} s | {r['best']:.2f}% |", flush=True)

    def speedup(a: str, b: str) -> float:  # trials per hour of row a over row b
        return (results[a]["trials"] / results[a]["wall"]) / (results[b]["trials"] / results[b]["wall"])

    if "none" in results and "none-2w" in results:
        print(f"\n2 workers vs 1 (no pruning): {speedup('none-2w', 'none'):.2f}x trials per hour")
    if "none-1t" in results:
        if "none" in results:
            print(f"1 worker, {os.cpu_count()} threads vs 1 thread: {speedup('none', 'none-1t'):.2f}x")
        if "none-2w" in results:
            print(f"2 workers (1 thread each) vs 1 worker with 1 thread: {speedup('none-2w', 'none-1t'):.2f}x "
                  "(2.00x would mean the workers do not slow each other down)")


if __name__ == "__main__":
    main()
