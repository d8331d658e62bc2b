"""Scale-out path for real: an Optuna study in PostgreSQL and one MLflow tracking server, both on loopback,
shared by two independent `regsweep optimize` processes, as the README tells people to run it."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from .servers import MlflowServer, apt_install, free_port
from .test_sweep import SLOW_EPOCHS, SMALL

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("postgres")]  # module-wide servers, once


def postgres_bin() -> str:
    """Debian's PostgreSQL server binaries, installed from Debian's packages if this machine lacks them."""
    def found() -> list[str]:
        return sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))

    assert apt_install("postgresql", found), "no PostgreSQL server, and apt-get could not install Debian's"
    return os.path.dirname(found()[-1])


def as_postgres(args: list[str]) -> list[str]:
    # The server refuses to run as root; Debian's package creates the postgres user.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class Postgres:
    """A PostgreSQL server of our own on loopback, with a database "optuna"; it can be stopped and started."""

    def __init__(self):
        self.bindir = postgres_bin()
        # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="regsweep-pg-"))
        self.datadir, self.sockdir = self.root / "data", self.root / "sock"
        self.sockdir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sockdir, "postgres")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/optuna"
        subprocess.run(as_postgres([f"{self.bindir}/initdb", "-D", str(self.datadir), "-U", "postgres",
                                    "--auth=trust"]), check=True, stdout=subprocess.DEVNULL)

    def start(self) -> None:
        subprocess.run(as_postgres([f"{self.bindir}/pg_ctl", "-D", str(self.datadir), "-w", "-l",
                                    str(self.root / "log"), "-o",
                                    f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1", "start"]),
                       check=True, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        # "fast": open connections are terminated, as when a database server is restarted
        subprocess.run(as_postgres([f"{self.bindir}/pg_ctl", "-D", str(self.datadir), "-m", "fast", "stop"]),
                       stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    server.start()
    try:
        subprocess.run(as_postgres([f"{server.bindir}/createdb", "-h", "127.0.0.1", "-p", str(server.port), "-U",
                                    "postgres", "optuna"]), check=True)
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url(postgres):
    return postgres.url


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server.url
    server.stop(signal.SIGTERM)


def test_two_processes_share_one_study_through_postgresql_and_one_tracking_server(
        postgres_url, mlflow_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "regsweep", "optimize", *SMALL, "--epochs", "1", "--trials", "4",
           "--storage", postgres_url, "--pruner", "none", "--sampler", "random", "--study-name", "pg",
           "--experiment-name", "pg", "--threads", "1"]
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path)
    time.sleep(3)  # the parent run is made by whichever starts first; the other finds it in the study
    second = subprocess.Popen([*cmd[:-2], "--seed", "7", *cmd[-2:]], env=env, cwd=tmp_path)
    assert first.wait(timeout=600) == 0 and second.wait(timeout=600) == 0

    study = optuna.load_study(study_name="pg", storage=postgres_url)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers))) and len(set(numbers)) == len(numbers)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert all(t.state.name == "COMPLETE" for t in finished)
    assert 4 <= len(finished) <= 5  # both processes stop at 4; one may have had a trial in flight
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("pg")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("regsweep.kind") == "study"]
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["optuna.storage"].startswith("postgresql://postgres@")
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == sorted(numbers)
    assert all(c.info.status == "FINISHED" for c in children)
    assert parents[0].data.tags["best_run_id"] in {c.info.run_id for c in children}


@pytest.mark.parametrize("stack", [1, 2])
def test_postgresql_stopped_mid_sweep_stops_with_one_line_and_resume_loses_nothing(postgres, tracking_uri, tmp_path,
                                                                                    stack):
    """One by one, and a stack of two trials (whose Optuna calls are its members' epoch reports)."""
    from click.testing import CliRunner

    from regsweep.cli import cli
    from regsweep.outage import EXIT_OUTAGE

    from .test_outage import stop_line, wait_for_epoch

    name = f"pg-outage-{stack}"
    cmd = ["optimize", *SMALL, "--trials", str(stack), "--stack", str(stack), "--storage", postgres.url,
           "--pruner", "none", "--study-name", name, "--experiment-name", name]
    # Slow epochs (12, each followed by 2 s), so that the outage meets training and the resume, which must
    # train as many epochs as the study's first start, is quick.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EPOCHS, "2", *cmd, "--epochs", "12"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    client = MlflowClient()
    victim = wait_for_epoch(client, name, proc)
    postgres.stop()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        postgres.start()
    assert proc.returncode == EXIT_OUTAGE, err
    line = stop_line(err)
    assert line.startswith(f"Error: the Optuna storage {postgres.url} is unreachable"), line
    assert "Trial 0" in line or stack > 1, line
    trial_runs = [r for r in client.search_runs([victim.info.experiment_id]) if "optuna.trial_number" in r.data.tags]
    assert len(trial_runs) == stack
    for run in trial_runs:  # MLflow still answered: each run says why it stopped
        assert run.info.status == "KILLED" and "Optuna storage" in run.data.tags["regsweep.stop_reason"]
    (parent,) = [r for r in client.search_runs([victim.info.experiment_id])
                 if r.data.tags.get("regsweep.kind") == "study"]
    assert parent.info.status == "KILLED" and "unreachable" in parent.data.tags["regsweep.stop_reason"]
    study = optuna.load_study(study_name=name, storage=postgres.url)
    assert [t.state.name for t in study.trials] == ["RUNNING"] * stack  # as far as the storage got to know

    result = CliRunner().invoke(cli, [*cmd, "--epochs", "12"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=name, storage=postgres.url)
    assert [t.state.name for t in study.trials] == ["FAIL"] * stack + ["COMPLETE"] * stack
    for t in study.trials[:stack]:  # the interrupted configurations were trained
        assert study.trials[stack + t.number].params == t.params
    runs = client.search_runs([victim.info.experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    assert sorted(r.data.tags.get("optuna.retry_of_trial") for r in runs
                  if int(r.data.tags.get("optuna.trial_number", -1)) >= stack) == [str(n) for n in range(stack)]


@pytest.mark.parametrize("tables", ["made", "none"])
def test_a_read_only_postgresql_database_is_refused_before_anything_is_created(postgres, tmp_path, monkeypatch,
                                                                              tables):
    """As a replica or a database set read-only serves it: the sweep could never write a trial there."""
    from click.testing import CliRunner

    from regsweep.cli import cli

    name = f"readonly_{tables}"
    server = ["-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres"]
    subprocess.run(as_postgres([f"{postgres.bindir}/createdb", *server, name]), check=True)
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    if tables == "made":  # Optuna's tables and a study exist; the database turns read-only after
        optuna.create_study(study_name="regsweep", storage=url, direction="maximize")
    subprocess.run(as_postgres([f"{postgres.bindir}/psql", "-q", *server, "-d", name, "-c",
                                f"ALTER DATABASE {name} SET default_transaction_read_only = on"]), check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(cli, ["optimize", *SMALL, "--storage", url])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be written (cannot execute" in lines[0], lines
    assert "read-only transaction" in lines[0] and not (tmp_path / "mlflow.db").exists()


def test_a_role_that_may_not_delete_can_sweep_and_leaves_one_empty_check_study_at_most(postgres, tmp_path):
    """The write check creates a study and deletes it; a role without DELETE keeps the study. It is one name, so
    every later start finds it there (the write was taken up to the name's uniqueness): one study at most,
    not one per start."""
    from regsweep.config import TrainConfig
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.study import SweepSettings, check_writable

    name = "nodelete"
    server = ["-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres"]
    subprocess.run(as_postgres([f"{postgres.bindir}/createdb", *server, name]), check=True)
    owner_url = postgres.url.rsplit("/", 1)[0] + "/" + name
    optuna.create_study(study_name="regsweep", storage=owner_url, direction="maximize")  # Optuna's tables
    grants = ("CREATE ROLE sweeper LOGIN; GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO sweeper; "
              "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO sweeper;")
    subprocess.run(as_postgres([f"{postgres.bindir}/psql", "-q", *server, "-d", name, "-c", grants]), check=True)
    url = owner_url.replace("postgres@", "sweeper@")
    settings = SweepSettings(base=TrainConfig(), space=SearchSpace(), trials=1, study_name="regsweep", storage=url,
                             experiment_name="regsweep")
    for _ in range(3):
        check_writable(settings)
    names = [s.study_name for s in optuna.get_all_study_summaries(owner_url)]
    assert len(names) == 2 and [n for n in names if n.startswith("regsweep-write-check")], names


def test_two_processes_opening_one_new_postgresql_database_at_once_both_use_it(postgres):
    """The same command started twice at the same moment on new PostgreSQL databases: both made the tables, and
    one failed ("duplicate key value violates unique constraint pg_type_typname_nsp_index"), for MLflow's store
    and for Optuna's, in every round of this test. The first opening of a database now holds an advisory lock."""
    from .conftest import in_step

    rounds, server = 3, ["-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres"]
    base = postgres.url.rsplit("/", 1)[0]
    for k in range(rounds):
        for kind in ("tracking", "study"):
            subprocess.run(as_postgres([f"{postgres.bindir}/createdb", *server, f"new_{kind}_{k}"]), check=True)
    script = f"""
import types, mlflow
from regsweep.sweep.study import check_writable
from regsweep.experiment import check_tracking_uri
for k in range({rounds}):
    ready()
    mlflow.set_tracking_uri(f"{base}/new_tracking_{{k}}")
    check_tracking_uri()
    ready()
    check_writable(types.SimpleNamespace(storage=f"{base}/new_study_{{k}}", heartbeat=60))
"""
    in_step(script, rounds=2 * rounds)
    for k in range(rounds):
        assert MlflowClient(f"{base}/new_tracking_{k}").search_experiments()  # its tables are whole: "Default"
        assert optuna.get_all_study_summaries(f"{base}/new_study_{k}") == []  # the write checks left nothing
