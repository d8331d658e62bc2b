"""The CLI through click's CliRunner: bad input fails with one line and exit 2 before any run exists."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from mlflow.environment_variables import MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS
from mlflow.tracking import MlflowClient

from regsweep.cli import cli

from .conftest import TINY, signalled_on_call


def all_runs(uri: str):
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    if not experiments:
        return []
    return client.search_runs([e.experiment_id for e in experiments])


def tiny_args() -> list[str]:
    args = []
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def test_help_lists_every_config_option_and_the_penalised_set():
    """Every TrainConfig field is an option of train, and of optimize but the coefficients it searches."""
    from dataclasses import fields

    from regsweep.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    options = {command: {p.name for p in cli.commands[command].params if not getattr(p, "hidden", False)}
               for command in ("train", "optimize")}
    assert names <= options["train"] and names - {"l1", "l2"} <= options["optimize"]
    assert not {"l1", "l2"} & options["optimize"]  # searched: hidden, only to say so (test_sweep's bad input)
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for name in names:
        assert "--" + name.replace("_", "-") in result.output, name
    assert "weights of conv and linear layers" in result.output


@pytest.mark.parametrize("args, message", [
    (["--l1", "-0.1"], "l1 must be a finite number >= 0"),
    (["--l2", "nan"], "l2 must be a finite number >= 0"),
    (["--l1", "abc"], "'abc' is not a valid float"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--epochs", "2.5"], "'2.5' is not a whole number"),
    (["--epochs", "1e5000"], "'1e5000' is too large (whole numbers here are below 10**30)"),  # made a run, then failed
    (["--seed", "1e100000000"], "is too large (whole numbers here are below 10**30)"),  # minutes in int() first
    (["--batch-size", "many"], "'many' is not a valid integer"),
    (["--model", "mlp", "--max-train-samples", "1"], "the MLP's batch norm needs at least 2 samples"),
    (["--seed", str(2**64)], "seed must be below 2**63"),
    (["--lr", "1e39"], "lr must be at most 3.403e+38 (float32)"),  # overflowed in the optimizer's first step
    (["--rotate", "1e300"], "rotate must be at most 360 degrees"),  # overflowed to NaN images: "diverged"
    (["--model", "mlp", "--hidden", "65536,65536"], "would have 4,347,002,880 weights; at most 1,000,000,000"),
    (["--model", "resnet"], "'resnet' is not one of 'cnn', 'mlp'"),
    (["--norm", "layer"], "'layer' is not one of 'bn', 'gbn', 'none'"),
    (["--optimizer", "rmsprop"], "'rmsprop' is not one of 'sgd', 'adam'"),
    (["--data-dir", "/nonexistent/mnist"], "no MNIST in /nonexistent/mnist"),
    (["--tracking-timeout", "nan"], "nan is not a number of seconds"),
    (["--experiment-name", "deleted"], "MLflow experiment 'deleted' is deleted: restore it"),
    (["MLFLOW_EXPERIMENT_ID=999"], "MLFLOW_EXPERIMENT_ID=999 names no active MLflow experiment"),
    (["MLFLOW_EXPERIMENT_NAME="], "MLFLOW_EXPERIMENT_NAME is set but empty"),
    (["delete Default"], "MLflow experiment 'Default', where runs go without --experiment-name, is deleted"),
    (["--experiment-name", " "], "the MLflow experiment name is empty"),
])
def test_bad_input_exits_2_with_one_line_and_creates_no_run(tracking_uri, monkeypatch, args, message):
    client = MlflowClient(tracking_uri)
    client.delete_experiment(client.create_experiment("deleted"))
    if args == ["delete Default"]:
        client.delete_experiment("0")
        args = []
    for arg in [a for a in args if "=" in a]:
        monkeypatch.setenv(*arg.split("=", 1))
    result = CliRunner().invoke(cli, ["train", *[a for a in args if "=" not in a]])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert message in lines[0]
    assert all_runs(tracking_uri) == []


@pytest.mark.parametrize("command, where", [("train", "experiment"), ("train", "new experiment"),
                                            ("train", "mlflow run"), ("optimize", "experiment"),
                                            ("optimize", "new experiment")])
def test_an_unwritable_artifact_location_is_refused_before_any_run(tracking_uri, tmp_path, monkeypatch, command,
                                                                   where):
    """MLflow finds out only at the first artifact: after `train` has made its run, after a sweep's first stack
    has trained. The location is under a file, which not even root can write into: an existing experiment's,
    the default root a new experiment would get (./mlruns of a database store), or `mlflow run`'s run's."""
    client = MlflowClient(tracking_uri)
    (tmp_path / "a-file").write_text("")
    blocked = tmp_path / "a-file" / "artifacts"
    if where == "new experiment":
        blocked = tmp_path / "mlruns"
        blocked.write_text("")
    else:
        client.create_experiment("unwritable", artifact_location=str(blocked))
    if where == "mlflow run":
        run = client.create_run(client.get_experiment_by_name("unwritable").experiment_id,
                                tags={"mlflow.project.entryPoint": "main"})  # as `mlflow run` makes it
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        blocked = blocked / run.info.run_id / "artifacts"
    options = ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"] if command == "optimize" else ["--l1", "0.001"]
    result = CliRunner().invoke(cli, [command, *tiny_args(), *options, "--experiment-name",
                                      "fresh" if where == "new experiment" else "unwritable"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: artifacts cannot be written to {blocked} ("), lines
    if where == "mlflow run":  # the run `mlflow run` made says why; `mlflow run` ends it FAILED on the exit code
        (only,) = all_runs(tracking_uri)
        assert "artifacts cannot be written" in only.data.tags["regsweep.error"] and only.data.metrics == {}
    else:
        assert all_runs(tracking_uri) == []
    assert client.get_experiment_by_name("fresh") is None


@pytest.mark.parametrize("location, message", [
    ("foo://bar/x", "Could not find a registered artifact repository for: foo://bar/x"),
    ("mlflow-artifacts:/x", "the tracking URI must be a valid http or https URI"),  # a server's, on a database
])
def test_an_artifact_location_mlflow_cannot_write_to_is_refused_before_any_run(tracking_uri, tmp_path, location,
                                                                               message):
    MlflowClient(tracking_uri).create_experiment("elsewhere", artifact_location=location)
    for command, options in (("train", ["--l1", "0.001"]),
                             ("optimize", ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"])):
        result = CliRunner().invoke(cli, [command, *tiny_args(), *options, "--experiment-name", "elsewhere"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"Error: MLflow cannot write artifacts to {location} ("), lines
        assert message in lines[0]
    assert all_runs(tracking_uri) == []


def test_integer_options_take_whole_numbers_written_as_floats_as_mlflow_run_passes_them():
    from regsweep.cli import WholeNumber

    whole = WholeNumber()
    assert [whole.convert(v, None, None) for v in ("2", "2.0", "1e3", 7, str(2**64))] == [2, 2, 1000, 7, 2**64]
    assert whole.convert("12345678901234567.0", None, None) == 12345678901234567  # not through a float
    for bad in ("2.5", 2.5, "nan", "inf", "many"):
        with pytest.raises(click.BadParameter):
            whole.convert(bad, None, None)


def test_a_diverged_train_says_so_in_one_line_and_its_run_ends_failed(tracking_uri):
    result = CliRunner().invoke(cli, ["train", *tiny_args(), "--epochs", "1", "--l1", "1e6", "--lr", "10",
                                      "--norm", "none", "--log-images", "false", "--log-model", "false"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith(("Error", "Traceback"))]
    (run,) = all_runs(tracking_uri)
    assert lines == ["Error: training diverged: training loss is nan (l1=1000000.0, l2=0.0, lr=10.0); "
                     f"run {run.info.run_id} ended FAILED. A smaller lr or penalty may train."], result.output
    assert run.info.status == "FAILED" and "DivergedError" in run.data.tags["regsweep.error"]


def test_a_signal_while_train_logs_its_model_waits_for_the_run_to_be_complete(tracking_uri, tmp_path):
    """Ctrl-C as the model is being logged (sent by train itself as it begins that): the model is logged whole,
    and the run, complete, ends FINISHED; the exit status is that of a process ended by Ctrl-C. Cut short there,
    an MLflow call could keep SQLite's lock, and the run's closing tag waited on it and was lost."""
    import signal
    import subprocess
    import sys

    script = signalled_on_call("regsweep.tracking", "log_model", "SIGINT")
    proc = subprocess.run([sys.executable, "-c", script, "train", *tiny_args(), "--epochs", "1", "--log-model",
                           "true", "--log-images", "false"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=600)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    (run,) = all_runs(tracking_uri)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("Error", "Traceback", "Aborted"))]
    assert errors == [f"Error: interrupted: run {run.info.run_id} ended FINISHED"], proc.stderr
    assert "stopping once the work in hand is done" in proc.stderr  # said at once, not after the wait
    assert run.info.status == "FINISHED" and "regsweep.stop_reason" not in run.data.tags
    assert run.data.metrics["best_val_acc"] > 0
    assert MlflowClient(tracking_uri).search_logged_models(experiment_ids=[run.info.experiment_id])


def test_a_signal_as_train_makes_its_run_ends_that_run_killed(tracking_uri, tmp_path):
    """Ctrl-C just as MLflow has made the run, before regsweep had it in hand: the run stayed RUNNING (until the
    next command found its process gone) and the line said no run was started."""
    import signal
    import subprocess
    import sys

    script = signalled_on_call("mlflow", "start_run", "SIGINT", after=True)  # the real start_run, then the signal
    proc = subprocess.run([sys.executable, "-c", script, "train", *tiny_args(), "--epochs", "1"], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    (run,) = all_runs(tracking_uri)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("Error", "Traceback", "Aborted"))]
    assert errors == [f"Error: interrupted: run {run.info.run_id} ended KILLED"], proc.stderr
    assert run.info.status == "KILLED" and run.data.tags["regsweep.stop_reason"] == "interrupted (Ctrl-C or SIGTERM)"


def test_a_third_signal_while_train_logs_its_outcome_stops_it_at_once_and_the_run_ends_killed(tracking_uri,
                                                                                                tmp_path):
    """Whoever insists: the first Ctrl-C is held, the second ignored, the third stops the logging where it is,
    and the run, incomplete, ends KILLED (not FINISHED, as a run whose outcome was logged whole does)."""
    import signal
    import subprocess
    import sys

    script = signalled_on_call("regsweep.tracking", "log_model", "SIGINT", times=3)
    proc = subprocess.run([sys.executable, "-c", script, "train", *tiny_args(), "--epochs", "1", "--log-model",
                           "true", "--log-images", "false"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=600)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "KILLED", proc.stderr
    assert not MlflowClient(tracking_uri).search_logged_models(experiment_ids=[run.info.experiment_id])


@pytest.mark.parametrize("command,module,function,signame", [
    ("train", "regsweep.experiment", "check_experiment", "SIGINT"),
    ("optimize", "regsweep.sweep", "check_parent", "SIGTERM"),
    ("train", "regsweep.outage", "mlflow_http_settings", "SIGTERM"),  # before train imports its stages
    ("report", "regsweep.experiment", "check_tracking_uri", "SIGTERM"),
])
def test_a_signal_while_a_command_checks_its_input_says_so_and_exits_as_by_that_signal(tracking_uri, tmp_path,
                                                                                        command, module, function,
                                                                                        signame):
    """Before anything is started, as after: one line and the exit status of a process ended by Ctrl-C or
    SIGTERM, not click's "Aborted!" and 1, nor a silent death by SIGTERM."""
    import signal
    import subprocess
    import sys

    script = signalled_on_call(module, function, signame)
    args = {"train": [*tiny_args(), "--epochs", "1"], "report": ["--out", str(tmp_path / "report")],
            "optimize": [*tiny_args(), "--epochs", "1", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]}[command]
    proc = subprocess.run([sys.executable, "-c", script, command, *args], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=300)
    assert proc.returncode == 128 + getattr(signal, signame), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("Error", "Traceback", "Aborted"))]
    assert errors == ["Error: interrupted" if command == "report" else  # it starts no run
                      "Error: interrupted: as the command started (checking its input and stores), before any "
                      "run was started"], proc.stderr
    assert all_runs(tracking_uri) == []


@pytest.mark.parametrize("module,function", [
    ("mlflow.artifacts", None),  # as it imports MLflow: MLflow is left half imported in the process
    ("regsweep.outage", "end_orphaned_runs"),  # checked, not yet trained
    # on each call: in the checks, then again as the run is ended, as a second signal comes when `mlflow run`
    # sends its SIGTERM after a terminal's Ctrl-C
    ("regsweep.experiment", "not_this_commands_run"),
])
def test_sigterm_to_mlflow_runs_group_as_train_starts_ends_its_run_killed(tracking_uri, tmp_path, module, function):
    """`mlflow run` makes its run, then starts `regsweep train`, which takes seconds to import MLflow and torch
    and check its input: a SIGTERM to the group then (the launcher dies of it) must not leave the run RUNNING."""
    import signal
    import subprocess
    import sys

    from .conftest import signalled_on_import

    client = MlflowClient(tracking_uri)
    run = client.create_run("0", tags={"mlflow.project.entryPoint": "main"})  # as `mlflow run` makes it
    script = (signalled_on_call(module, function, "SIGTERM") if function else
              signalled_on_import(module, "SIGTERM"))
    proc = subprocess.run([sys.executable, "-c", script, "train", *tiny_args(), "--epochs", "1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": run.info.run_id})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("Error", "Traceback", "Aborted"))]
    assert len(errors) == 1 and errors[0].startswith("Error: interrupted: ") and errors[0].endswith(
        f"run {run.info.run_id} ended KILLED"), proc.stderr
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED", proc.stderr
    assert ended.data.tags["regsweep.stop_reason"].startswith("interrupted (Ctrl-C or SIGTERM)")
    assert [r.info.run_id for r in all_runs(tracking_uri)] == [run.info.run_id]


def test_a_signal_once_train_has_finished_says_so(tracking_uri, tmp_path):
    """A SIGTERM after the run ended FINISHED (as the command prints where to look): exit 143, and the line
    says the run had finished, not that nothing was started."""
    import signal
    import subprocess
    import sys

    script = signalled_on_call("regsweep.experiment", "viewing_hint", "SIGTERM")
    proc = subprocess.run([sys.executable, "-c", script, "train", *tiny_args(), "--epochs", "1"], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("Error", "Traceback", "Aborted"))]
    assert errors == [f"Error: interrupted after run {run.info.run_id} ended FINISHED"], proc.stderr


def test_inside_mlflow_run_a_help_parameter_fails_the_run_instead_of_finishing_it_empty(tracking_uri, monkeypatch):
    """`mlflow run . -P help=x` passes `--help x` on to the command: only the options would be listed, and
    MLflow would end its run FINISHED with nothing in it. Outside `mlflow run`, --help is help."""
    client = MlflowClient(tracking_uri)
    run = client.create_run("0", tags={"mlflow.project.entryPoint": "main"})  # as `mlflow run` makes it
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = CliRunner().invoke(cli, ["train", *tiny_args(), "--help", "x"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1].startswith("Error: -P help is no parameter of this project"), result.output
    assert "-P help is no parameter" in client.get_run(run.info.run_id).data.tags["regsweep.error"]
    monkeypatch.delenv("MLFLOW_RUN_ID")
    assert CliRunner().invoke(cli, ["train", "--help"]).exit_code == 0


def test_unreachable_tracking_server_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@127.0.0.1:9")  # discard port: nothing listens
    result = CliRunner().invoke(cli, ["train", *tiny_args()])
    assert result.exit_code == 2
    assert "unreachable" in result.output and "user:***@" in result.output and "secret" not in result.output


def test_a_web_server_that_is_not_mlflow_is_refused_in_one_line(tmp_path, monkeypatch):
    """Any web server answers /health; MLflow's API is what says whether it is a tracking server."""
    import functools
    import http.server
    import threading

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "health").write_text("OK")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # its request lines would be in the command's output
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
    try:
        for command in (["train", *tiny_args()], ["optimize", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"],
                        ["report"]):
            result = CliRunner().invoke(cli, command)
            assert result.exit_code == 2, result.output
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert len(lines) == 1 and "answers /health but not MLflow's API" in lines[0], lines
    finally:
        server.shutdown()


def test_a_sqlite_uri_naming_a_folder_is_refused_at_once(tmp_path, monkeypatch):
    """MLflow retries opening it for about a minute and a half, printing a warning for each try."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}")
    result = CliRunner().invoke(cli, ["train", *tiny_args()])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"Error: MLflow tracking URI 'sqlite:///{tmp_path}' names a folder, {tmp_path}; name a SQLite "
                     "file (it is made where missing)"], lines


def test_a_failed_download_is_said_in_one_line(tmp_path, tracking_uri, monkeypatch):
    """torchvision lists every mirror it tried, and each one's error, on lines of their own."""
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/a/", "http://127.0.0.1:9/b/"])  # nothing listens
    result = CliRunner().invoke(cli, ["train", *tiny_args(), "--data-dir", str(tmp_path / "none"), "--download",
                                      "true"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Error downloading" in lines[0] and "127.0.0.1:9/b/" in lines[0], lines
    assert all_runs(tracking_uri) == []


def test_corrupted_data_file_is_named_with_the_fix(tmp_path, tracking_uri):
    import shutil

    from regsweep.config import default_data_dir
    data = tmp_path / "data"
    shutil.copytree(f"{default_data_dir()}/mnist", data / "mnist")
    (data / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file")
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(data)])
    assert result.exit_code == 2
    assert "checksum mismatch" in result.output and "t10k-labels-idx1-ubyte.gz" in result.output
    assert "git checkout" in result.output
    (data / "mnist" / "train-images-idx3-ubyte.gz").unlink()
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(data)])
    assert result.exit_code == 2 and "missing" in result.output and "train-images-idx3-ubyte.gz" in result.output


def test_train_creates_one_named_run_in_the_chosen_experiment(tracking_uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS")  # set by the fixture; the CLI must set it
    result = CliRunner().invoke(cli, ["train", *tiny_args(), "--l1", "0.001", "--experiment-name", "cli-test",
                                      "--log-images", "false"])
    # Flushes of the metrics queue wait on an event, not on MLflow's one-second poll (tracking.enable_prompt_flushes).
    assert MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS.get() == 1
    assert result.exit_code == 0, result.output
    assert "best val acc" in result.output
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "cnn l1=1e-3 l2=0 s1"
    assert run.data.tags["regime"] == "l1"
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "cli-test"
    assert run.data.params["l1"] == "0.001" and run.data.params["n_train"] == "1024"


def test_python_dash_m_works():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "regsweep", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout


def test_a_built_wheel_holds_every_package(tmp_path):
    """`pip install .` (not only the editable install) must carry every subpackage, the sweep's included."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from .conftest import REPO
    source = tmp_path / "source"
    shutil.copytree(REPO / "regsweep", source / "regsweep", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("regsweep-*.whl")
    packaged = {Path(n).parent.as_posix() for n in zipfile.ZipFile(wheel).namelist() if n.endswith("__init__.py")}
    expected = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "regsweep").rglob("__init__.py")
                if "__pycache__" not in p.parts}
    assert packaged == expected and "regsweep/sweep" in packaged


def test_readme_documents_every_option():
    """The README's option tables are written by hand; this keeps them complete."""
    from .conftest import REPO
    readme = (REPO / "README.md").read_text()
    for command in ("train", "optimize"):
        for param in cli.commands[command].params:
            for flag in param.opts:
                assert f"`{flag}" in readme, f"README does not document {command} {flag}"


def test_the_mlproject_entry_point_passes_every_setting():
    """`mlflow run . -P name=value` accepts what `regsweep train` does: each TrainConfig field is a parameter,
    passed on as the option of the same name."""
    import dataclasses

    import yaml

    from regsweep.config import TrainConfig

    from .conftest import REPO
    main = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["main"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(main["parameters"]) == fields
    for name in fields:
        assert f"--{name.replace('_', '-')} {{{name}}}" in main["command"], name


def test_a_run_carries_its_worker_tag_from_its_creation(tracking_uri, monkeypatch):
    """What a later command needs to end a run an outage left RUNNING (the process that owns it) is on the run
    from the moment it exists: here the first call after creating it fails."""
    import regsweep.tracking

    def failing(experiment_id):
        raise RuntimeError("the store went away")

    monkeypatch.setattr(regsweep.tracking, "prepare_experiment", failing)
    result = CliRunner().invoke(cli, ["train", *tiny_args()])
    assert result.exit_code != 0
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FAILED" and run.data.tags["regsweep.worker"].endswith(f":{os.getpid()}")


@pytest.mark.parametrize("status, message", [
    ("FINISHED", "names a FINISHED run"), ("deleted", "names a deleted run"), ("missing", "names no run"),
    ("another command's", "names a run that `mlflow run` did not start"),
    ("trained", "names a run that a regsweep process (elsewhere:123) already trains"),
])
def test_an_mlflow_run_id_of_a_run_not_started_for_this_command_is_refused_and_left_as_it_was(tracking_uri,
                                                                                               monkeypatch, status,
                                                                                               message):
    """MLFLOW_RUN_ID left over in the environment, outside `mlflow run`: training into that run would put a new
    configuration under its params, and a RUNNING one would be taken from the command that runs it and ended
    under it. Refused before anything is written, the run untouched, bad input or not."""
    client = MlflowClient(tracking_uri)
    tags = {"mlflow.project.entryPoint": "main"} if status != "another command's" else {}
    run = client.create_run("0", tags=tags | ({"regsweep.worker": "elsewhere:123"} if status == "trained" else {}))
    client.log_param(run.info.run_id, "l1", "0.0")
    if status in ("FINISHED", "deleted", "missing"):
        client.set_terminated(run.info.run_id, "FINISHED")
    if status == "deleted":
        client.delete_run(run.info.run_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32 if status == "missing" else run.info.run_id)
    result = CliRunner().invoke(cli, ["train", *tiny_args(), "--l1", "0.001"])
    assert result.exit_code == 2, result.output
    assert f"MLFLOW_RUN_ID={'0' * 32 if status == 'missing' else run.info.run_id} {message}" in result.output
    assert CliRunner().invoke(cli, ["train", *tiny_args(), "--l1", "-1"]).exit_code == 2
    after = client.get_run(run.info.run_id)
    assert after.data.params == {"l1": "0.0"} and "regsweep.error" not in after.data.tags
    assert after.info.status == ("RUNNING" if status in ("another command's", "trained") else "FINISHED")
    assert not client.get_metric_history(run.info.run_id, "val/acc")


def test_inside_mlflow_run_an_option_click_refuses_is_said_on_the_run(tracking_uri, monkeypatch):
    """`mlflow run . -P model=resnet`: MLflow has created the run before the options are parsed."""
    run = MlflowClient(tracking_uri).create_run("0", tags={"mlflow.project.entryPoint": "main"})
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = CliRunner().invoke(cli, ["train", "--model", "resnet"])
    assert result.exit_code == 2
    tags = MlflowClient(tracking_uri).get_run(run.info.run_id).data.tags
    assert "'resnet' is not one of 'cnn', 'mlp'" in tags["regsweep.error"]
