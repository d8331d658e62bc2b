"""Whether the libraries a regsweep command imports have compiled bytecode, for benchmarks that time whole
commands.

A module without a cached .pyc is compiled from source on every import where the cache cannot be written
(a read-only site-packages) or is not kept; packages installed with `pip install --no-compile` start that
way. On one GPU machine a profiled sweep spent 13.4 s of its 105 s compiling 3,284 modules
(docs/benchmarks.md), which a wall-time table should not mistake for regsweep's own start-up.
"""

from __future__ import annotations

import importlib.util
import os
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


if __name__ == "__main__":
    print(bytecode_line())
