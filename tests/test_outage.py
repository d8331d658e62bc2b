"""A sweep and a training run survive their tracking server: a real `mlflow server` on loopback, stopped
mid-trial (SIGKILL, as in a crash) and started again on the same port and store, within and beyond
--tracking-timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from regsweep.cli import cli
from regsweep.outage import EXIT_OUTAGE

from .conftest import in_step
from .servers import MlflowServer
from .test_sweep import SLOW_EPOCHS, SMALL

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("outage")]  # one server for the module, once


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    if server.proc.poll() is None:
        server.stop()


@pytest.fixture
def tracking(server, monkeypatch, tmp_path):
    """This test's process and its subprocesses log to the server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(server.url)
    yield MlflowClient(server.url)
    mlflow.set_tracking_uri(None)


def start(args: list[str], tmp_path: Path, pause: float = 0.0) -> subprocess.Popen:
    """regsweep in a subprocess, each training epoch followed by `pause` seconds (test_sweep.SLOW_EPOCHS)."""
    return subprocess.Popen([sys.executable, "-c", SLOW_EPOCHS, str(pause), *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_epoch(client: MlflowClient, experiment: str, proc: subprocess.Popen):
    """The experiment's first run once it has logged a validation accuracy."""
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        exp = client.get_experiment_by_name(experiment)
        for run in client.search_runs([exp.experiment_id]) if exp else []:
            if run.data.tags.get("regsweep.kind") != "study" and client.get_metric_history(run.info.run_id,
                                                                                             "val/acc"):
                return run
        time.sleep(0.5)
    pytest.fail("no run logged an epoch")


def stop_line(stderr: str) -> str:
    """The line the command stopped with: the last, the only error, no traceback or retry noise."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and "Retrying" not in stderr and "Failed to log" not in stderr, stderr
    assert [line for line in lines if "Error" in line] == lines[-1:], stderr
    return lines[-1]


def test_outage_shorter_than_the_timeout_is_ridden_out_and_loses_nothing(server, tracking, tmp_path):
    epochs = 20
    proc = start(["optimize", *SMALL, "--epochs", str(epochs), "--max-train-samples", "256", "--trials", "1",
                  "--pruner", "none", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                  "--experiment-name", "within", "--tracking-timeout", "60"], tmp_path)
    run = wait_for_epoch(tracking, "within", proc)
    server.stop()
    down = time.time()
    time.sleep(5)
    server.start()  # the restart itself takes a while on a busy machine: the outage is longer than 5 s
    up = time.time()
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err

    history = tracking.get_metric_history(run.info.run_id, "val/acc")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # every epoch landed
    during = [m for m in history if down * 1000 < m.timestamp < up * 1000]
    assert during, f"no epoch ended during the {up - down:.0f} s outage: training waited on the tracker"
    finished = tracking.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and "best_val_acc" in finished.data.metrics
    study = optuna.load_study(study_name="within", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert study.metric_names == ["best_val_acc"]


def test_longer_outage_stops_the_sweep_in_time_and_resume_reruns_the_trial_and_ends_its_run(
        server, tracking, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = start(["optimize", *SMALL, "--epochs", "12", "--trials", "1", "--pruner", "none", "--storage", storage,
                  "--experiment-name", "beyond", "--tracking-timeout", "6"], tmp_path, pause=2.0)
    victim = wait_for_epoch(tracking, "beyond", proc)
    server.stop()
    down = time.time()
    out, err = proc.communicate(timeout=120)
    stopped_after = time.time() - down
    assert proc.returncode == EXIT_OUTAGE, err
    # The timeout, one probe interval and the main thread's reaction (about 12 s), never MLflow's own minutes
    # of retries: the bound leaves room for a loaded machine.
    assert stopped_after < 60, stopped_after
    line = stop_line(err)
    assert line.startswith(f"Error: the MLflow tracking server at {server.url} has not answered for 6 s")
    assert "Trial 0 is failed and queued again" in line and "Run again with: regsweep optimize" in line
    study = optuna.load_study(study_name="beyond", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]  # consistent while the server is down
    assert study.trials[0].user_attrs["fail_kind"] == "outage"
    assert study.trials[1].params == study.trials[0].params

    server.start()
    assert tracking.get_run(victim.info.run_id).info.status == "RUNNING"  # nobody could end it
    result = CliRunner().invoke(cli, ["optimize", *SMALL, "--epochs", "12", "--trials", "1", "--pruner", "none",
                                      "--storage", storage, "--experiment-name", "beyond",
                                      "--tracking-timeout", "6"])
    assert result.exit_code == 0, result.output
    killed = tracking.get_run(victim.info.run_id)
    assert killed.info.status == "KILLED"
    reason = killed.data.tags["regsweep.stop_reason"]
    assert reason.startswith("trial 0 ended FAIL: the MLflow tracking server") and "reconciled" in reason
    study = optuna.load_study(study_name="beyond", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params  # the interrupted configuration was trained
    exp = tracking.get_experiment_by_name("beyond")
    runs = tracking.search_runs([exp.experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    retried = [r for r in runs if r.data.tags.get("optuna.retry_of_trial") == "0"]
    assert len(retried) == 1 and retried[0].info.status == "FINISHED"


def test_train_stops_on_a_longer_outage_and_the_next_command_ends_its_run(server, tracking, tmp_path):
    proc = start(["train", *SMALL, "--epochs", "500", "--experiment-name", "train-outage",
                  "--tracking-timeout", "6"], tmp_path)
    victim = wait_for_epoch(tracking, "train-outage", proc)
    server.stop()
    down = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_OUTAGE and time.time() - down < 60, err  # as above: not MLflow's minutes
    line = stop_line(err)
    assert "has not answered for 6 s" in line and "Run again with: regsweep train" in line

    server.start()
    assert tracking.get_run(victim.info.run_id).info.status == "RUNNING"
    result = CliRunner().invoke(cli, ["train", *SMALL, "--epochs", "1", "--experiment-name", "train-outage"])
    assert result.exit_code == 0, result.output
    killed = tracking.get_run(victim.info.run_id)
    assert killed.info.status == "KILLED"
    assert "tracking store was unreachable" in killed.data.tags["regsweep.stop_reason"]


def test_credentials_in_the_server_uri_reach_it_and_are_never_printed(server, tracking, monkeypatch, tmp_path):
    uri = server.url.replace("http://", "http://user:secret@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)  # undone after: the command sets it
    mlflow.set_tracking_uri(uri)
    result = CliRunner().invoke(cli, ["train", *SMALL, "--epochs", "1", "--log-model", "false",
                                      "--experiment-name", "credentials"])
    assert result.exit_code == 0, result.output
    assert "secret" not in result.output and server.url.removeprefix("http://") in result.output
    (run,) = tracking.search_runs([tracking.get_experiment_by_name("credentials").experiment_id])
    assert run.info.status == "FINISHED"


def test_two_processes_tagging_the_same_new_runs_at_once_both_succeed(tracking_uri):
    """Every command on a study tags its parent run as it starts and ends, and the same command may start on two
    machines at the same moment. With MLflow's set_tag the slower of two new writes of one key failed ("UNIQUE
    constraint failed: tags.key, tags.run_uuid"), in 3 of 3 tries of this test."""
    client = MlflowClient()
    experiment_id = client.create_experiment("race")
    run_ids = [client.create_run(experiment_id).info.run_id for _ in range(20)]
    script = f"""
import os
from mlflow.tracking import MlflowClient
from regsweep.outage import tag_run
client = MlflowClient()
print(os.getpid())
ready()  # both past their imports: they tag the same runs at the same moment
for run_id in {run_ids!r}:
    tag_run(client, run_id, {{"regsweep.worker": str(os.getpid())}})
"""
    pids = {lines[0] for lines in in_step(script, rounds=1, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})}
    assert len(pids) == 2
    assert {client.get_run(run_id).data.tags["regsweep.worker"] in pids for run_id in run_ids} == {True}


def test_a_sqlite_store_is_locked_and_checked_at_the_file_sqlalchemy_opens(tmp_path):
    """store_locked and the tracking URI's check read a sqlite: URL as SQLAlchemy does: a %20 in the path was taken
    literally, so the lock went to a file that is not the database (or to none, its folder missing)."""
    from regsweep.outage import sqlite_file, store_locked

    (tmp_path / "a b").mkdir()
    with store_locked(f"sqlite:///{tmp_path}/a%20b/m.db?timeout=30"):
        assert (tmp_path / "a b" / "m.db").exists()
    assert not (tmp_path / "a%20b").exists()
    assert sqlite_file("sqlite:///rel.db") == "rel.db" and sqlite_file("postgresql://host/db") is None
    assert sqlite_file("sqlite:///:memory:") is None and sqlite_file("sqlite:///file:x.db?mode=ro&uri=true") is None


def test_two_processes_opening_one_new_sqlite_tracking_store_at_once_both_use_it(tmp_path):
    """The same command started twice at the same moment on a new mlflow.db: MLflow's migrations, run by both,
    failed one or both (this test, 1 run of 2 without the lock), and could leave the file half made
    (`_alembic_tmp_tags`), refused by every later command. The first opening of a SQLite store now holds a lock
    on its file."""
    import sqlite3

    rounds = 5
    script = f"""
import mlflow
from regsweep.experiment import check_tracking_uri
for k in range({rounds}):
    ready()
    mlflow.set_tracking_uri(f"sqlite:///{{sys.argv[1]}}/mlflow-{{k}}.db")
    check_tracking_uri()
"""
    in_step(script, str(tmp_path), rounds=rounds)
    for k in range(rounds):
        path = tmp_path / f"mlflow-{k}.db"
        MlflowClient(f"sqlite:///{path}").search_experiments()  # opens: its tables are whole
        with sqlite3.connect(path) as db:
            assert not db.execute("select name from sqlite_master where name like '_alembic_tmp%'").fetchall()
