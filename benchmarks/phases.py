"""Where the wall time of a regsweep command goes, stage by stage.

Runs the command as a user would, in a fresh process in a temporary directory with its own SQLite stores,
under cProfile, and adds up the time spent in each stage's functions (the outermost call of each, so a
function calling itself counts once). An indented stage is part of the one above it (not all of it). Imports are counted
wherever they happen, so they overlap the stages; and where a sweep refills its stacks (the default on a GPU
and with a compiled step), the runs of members that leave are completed inside the training loop, so the
training loop's row includes part of the completing row.

    python benchmarks/phases.py --small                               # train and optimize, small, any machine
    python benchmarks/phases.py train --epochs 15 --device cuda       # a complete default train on a GPU
    python benchmarks/phases.py optimize --trials 32 --epochs 15 --stack 32

cProfile adds a cost to every Python call (more to import-heavy stages than to a GPU's training steps), and
on a GPU the time of queued kernels lands in whatever waits for them (an evaluation, the end of an epoch),
so the split inside the training loop is approximate; the wall time and the big stages are what to read.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (depth, stage, patterns, fallback): a pattern is "file:function", the end of the profiled file's path and a
# regular expression for the function's name; the fallback patterns count only where the first match nothing
# (a sweep completes its runs through completion.py, which calls log_outcome; a single train calls it directly).
STAGES = [
    (0, "open the stores (tracking, Optuna study, parent run)",
     ["experiment.py:check_tracking_uri|use_experiment", "cli.py:run_experiment_id", "outage.py:end_orphaned_runs",
      "study.py:check_resumable|load_study", "runs.py:find_or_create_parent", "driver.py:reconcile"], []),
    (1, "MLflow creating its tables (a new store only)", ["mlflow/store/db/utils.py:_initialize_tables"], []),
    (0, "load MNIST", ["data.py:load_for"], []),
    (0, "training loop (fit / fit_stack)", ["training.py:fit_stack"], []),
    (1, "building the optimizer (torch.optim imports torch._dynamo on first use)", ["step.py:build_optimizer"], []),
    (1, "training steps", ["training.py:train_epoch"], []),
    (1, "evaluation", ["training.py:evaluate"], []),
    (1, "epoch hooks (queued metrics, Optuna reports, pruning)", ["tracking.py:log_epoch", "stacked.py:__call__"],
     []),
    (0, "completing runs (summary, tables, figures, model)", ["completion.py:complete"], ["tracking.py:log_outcome"]),
    (1, "figures written (PNG)", ["fluent.py:log_figure"], []),
    (1, "model logged", ["tracking.py:log_model"], []),
    (2, "MLflow exporting it (torch.export)", ["torch/export/__init__.py:export"], []),
    (2, "MLflow checking its requirements against the installed packages",
     ["mlflow/utils/requirements_utils.py:warn_dependency_requirement_mismatches"], []),
    (0, "Optuna: asking and telling", ["stacked.py:ask|tell_study"], []),
    (0, "finishing the study (best trial, plots)", ["runs.py:finish_study"], []),
    (0, "imports, wherever they happen", ["<frozen importlib._bootstrap>:_find_and_load"], []),
]

SMALL = ["--max-train-samples", "2000", "--max-eval-samples", "1000", "--epochs", "2"]


def stage_seconds(stats: pstats.Stats, patterns: list[str]) -> tuple[float, int]:
    """Cumulative seconds and calls of the profiled functions matching any of `patterns`."""
    seconds, calls = 0.0, 0
    for (path, _line, name), (_cc, nc, _tt, ct, _callers) in stats.stats.items():
        for pattern in patterns:
            file, function = pattern.rsplit(":", 1)
            if (path == file or path.endswith("/" + file)) and re.fullmatch(function, name):
                seconds, calls = seconds + ct, calls + nc
                break
    return seconds, calls


def profile(command: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.prof"
        args = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "regsweep", *command,
                "--data-dir", str(REPO / "data")]
        if command[0] == "optimize" and "--storage" not in command:
            args += ["--storage", f"sqlite:///{tmp}/optuna.db"]
        env_uri = f"sqlite:///{tmp}/mlflow.db"
        start = time.perf_counter()
        subprocess.run(args, cwd=tmp, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "MLFLOW_TRACKING_URI": env_uri})
        wall = time.perf_counter() - start
        stats = pstats.Stats(str(out))
    print(f"\n`regsweep {' '.join(command)}`: {wall:.1f} s wall (under cProfile), "
          f"{stats.total_tt:.1f} s profiled\n")
    print("| stage | calls | s | share of wall |\n|---|---|---|---|")
    for depth, label, patterns, fallback in STAGES:
        seconds, calls = stage_seconds(stats, patterns)
        if not calls and fallback:
            seconds, calls = stage_seconds(stats, fallback)
        if calls:
            indent = "&nbsp;&nbsp;" * 2 * depth + ("of which: " if depth else "")
            print(f"| {indent}{label} | {calls} | {seconds:.2f} | {100 * seconds / wall:.0f}% |")
    print(flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small train and a small stacked optimize")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="a regsweep command and its options")
    args = parser.parse_args()
    commands = [args.command] if args.command else []
    if args.small:
        commands += [["train", *SMALL], ["optimize", "--trials", "8", "--stack", "4", *SMALL]]
    if not commands:
        parser.error("give a regsweep command or --small")
    from bytecode import bytecode_line  # beside this script

    print(bytecode_line())
    for command in commands:
        profile(command)


if __name__ == "__main__":
    main()
