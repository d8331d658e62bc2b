"""Whether the libraries a regsweep command imports have compiled bytecode, for benchmarks that time whole
commands.

A module without a cached .pyc is compiled from source on every import where the cache cannot be written
(a read-only site-packages) or is not kept; packages installed with `pip install --no-compile` start that
way. On one GPU machine a profiled sweep spent 13.4 s of its 105 s compiling 3,284 modules
(docs/benchmarks.md), which a wall-time table should not mistake for regsweep's own start-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("torch", "torchvision", "mlflow", "optuna", "sqlalchemy", "alembic", "matplotlib", "pandas", "numpy",
            "scipy", "regsweep")


def missing_bytecode(packages: tuple[str, ...] = PACKAGES) -> tuple[int, int, list[Path]]:
    """(modules without a cached .pyc, modules in all, the packages' folders) for the installed `packages`."""
    missing, total, folders = 0, 0, []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            folders.append(Path(folder))
            for root, _dirs, files in os.walk(folder):
                for file in files:
                    if file.endswith(".py"):
                        total += 1
                        missing += not os.path.exists(importlib.util.cache_from_source(os.path.join(root, file)))
    return missing, total, folders


def bytecode_line() -> str:
    """One line for a benchmark's header: how many modules would be compiled on import, and the fix."""
    missing, total, folders = missing_bytecode()
    line = f"Bytecode: {missing:,} of {total:,} modules of {', '.join(PACKAGES)} have no compiled cache."
    if missing > total // 10:
        line += (" Commands timed here pay for compiling them wherever the cache is not written or kept; "
                 f"`python -m compileall -q -j 0 {' '.join(sorted({str(f.parent) for f in folders}))}` compiles "
                 "them once.")
    return line


STACK = "import regsweep.tracking, regsweep.sweep, optuna"  # what `regsweep optimize` imports before training


def time_imports(rounds: int) -> None:
    """The sweep's imports in fresh processes, from the bytecode caches and compiled from source (caches
    looked up in an empty folder and not written), alternating."""
    print(f"\n`python -c \"{STACK}\"` in a fresh process:\n")
    print("| modules | s | rounds |\n|---|---|---|")
    seconds = {"from bytecode caches": [], "compiled from source": []}
    for _ in range(rounds):
        for way, values in seconds.items():
            with tempfile.TemporaryDirectory() as empty:
                env = dict(os.environ)
                if way == "compiled from source":
                    env |= {"PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", STACK], env=env, check=True)
                values.append(time.perf_counter() - start)
    for way, values in seconds.items():
        print(f"| {way} | {sorted(values)[len(values) // 2]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                        help="also time the sweep's imports both ways, ROUNDS times each")
    args = parser.parse_args()
    print(bytecode_line())
    if args.time:
        time_imports(args.time)
