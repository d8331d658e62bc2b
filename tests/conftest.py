"""Shared fixtures: a temporary MLflow store per test and one small slice of real MNIST per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regsweep.config import TrainConfig
from regsweep.data import load_mnist

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """Under pytest-xdist (`-n N`) each worker gets its share of the cores for torch's threads, and so do the
    commands it starts (OMP_NUM_THREADS). With torch's default of a thread per core in every worker, two workers
    on two cores made the CPU-bound tests of test_stack.py take 91 s instead of 40 s: OpenMP's threads spin
    waiting for cores the other worker holds."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Small, fast, real: 1,024 training images (64 steps over 2 epochs), 512 validation and 512 test images,
# eager (compiling costs more than these runs take).
TINY = dict(epochs=2, max_train_samples=1024, max_eval_samples=512, batch_size=32, compile=False,
            log_model=False)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Unset for the test and restored after it, also where the test sets them (mlflow.set_experiment exports
    # the experiment's id; delenv alone records nothing to restore for a variable that was not set).
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # What regsweep's CLI sets (tracking.enable_prompt_flushes), for tests that call the library too.
    monkeypatch.setenv("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
    monkeypatch.chdir(tmp_path)  # anything MLflow writes relative to the cwd lands in the temp dir
    import mlflow
    mlflow.set_tracking_uri(uri)
    # The fluent API remembers the active experiment across stores; a fresh store only has "Default".
    mlflow.set_experiment(experiment_id="0")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # set_experiment exports it to subprocesses
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def tiny_data():
    cfg = TrainConfig(**TINY)
    return load_mnist(cfg.resolved_data_dir(), cfg.val_size, cfg.max_train_samples, cfg.max_eval_samples)


@pytest.fixture
def tiny_cfg() -> TrainConfig:
    return TrainConfig(**TINY)


def signalled_on_call(module: str, function: str, signame: str, times: int = 1, after: bool = False) -> str:
    """A `python -c` script that runs the regsweep CLI (its arguments: sys.argv[1:]) with `module.function`
    made to send the process `signame` (`times` times) as it is called (`after`: once it has done its work, before
    it returns), and to go on once the handler has run: a signal that arrives at exactly that moment, every time."""
    return f"""if True:
        import os, signal, sys, time
        import {module} as target
        original = target.{function}
        def signal_now():
            for _ in range({times}):
                os.kill(os.getpid(), signal.{signame})
                time.sleep(0.5)
        def signalled(*args, **kwargs):
            if not {after}:
                signal_now()
            result = original(*args, **kwargs)
            if {after}:
                signal_now()
            return result
        target.{function} = signalled
        from regsweep.cli import cli
        cli(sys.argv[1:])
    """


def signalled_on_import(module: str, signame: str) -> str:
    """A `python -c` script that runs the regsweep CLI (its arguments: sys.argv[1:]) and sends the process
    `signame` as `module` starts to be imported: a signal that cuts that import short, every time."""
    return f"""if True:
        import os, signal, sys
        class SignalOnImport:
            def find_spec(self, name, path=None, target=None):
                if name == {module!r}:
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), signal.{signame})
                return None
        sys.meta_path.insert(0, SignalOnImport())
        from regsweep.cli import cli
        cli(sys.argv[1:])
    """


def in_step(script: str, *args: str, rounds: int, processes: int = 2, env: dict | None = None) -> list[list[str]]:
    """Run `script` in `processes` Python processes that do each of `rounds` steps at the same moment: each
    calls `ready()` (given to it) before a step, which waits until all are ready. Returns each process's printed
    lines other than those."""
    preamble = "import sys\ndef ready():\n    print('ready', flush=True)\n    sys.stdin.readline()\n"
    procs = [subprocess.Popen([sys.executable, "-c", preamble + script, *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(processes)]
    printed = [[] for _ in procs]
    try:
        for _ in range(rounds):
            for proc, lines in zip(procs, printed):
                while (line := proc.stdout.readline()) not in ("ready\n", ""):
                    lines.append(line.strip())
            for proc in procs:
                try:
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass  # it ended: its exit code and stderr say why
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0] * processes, [err[-1000:] for _, err in outputs]
    return [lines + [line.strip() for line in out.splitlines()] for lines, (out, _) in zip(printed, outputs)]
