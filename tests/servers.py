"""Servers the tests start on loopback: a free port, and a real `mlflow server` that can be killed and
started again on the same port and store; Debian's packages for the other servers, where they are missing."""

from __future__ import annotations

import fcntl
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


def apt_install(package: str, present) -> bool:
    """Install Debian's `package` unless `present()` already says it is there; returns `present()` after.
    One process at a time: the test runner's workers collect every test file, and dpkg refuses a second
    install while one holds its lock. Nothing is tried without apt or root."""
    if present() or not shutil.which("apt-get") or os.geteuid() != 0:
        return present()
    with open(Path(tempfile.gettempdir()) / "regsweep-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not present():  # another worker may have installed it while this one waited
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, capture_output=True)
    return present()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` with a SQLite store under `root`, on a fixed loopback port."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it and wait until /health answers (fails the test with the server's log if it never does)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.root / "artifacts"), "--workers", "1"],
            cwd=self.root, stdout=open(self.root / "log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not start: " + (self.root / "log").read_text()[-2000:])

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL by default, as in a crash; the whole process group (the server's workers too)."""
        os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=30)
