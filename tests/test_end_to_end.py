"""Real training runs on a slice of real MNIST against a temporary MLflow store, checked through MlflowClient."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from regsweep.tracking import run_training

from .conftest import REPO

ARTIFACTS = {"misclassified.png", "training_curves.png", "confusion_matrix.png", "weight_histograms.png",
             "per_class_metrics.json", "config.json", "predictions"}


def the_only_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_mlflow_run_logs_a_complete_comparable_run(tracking_uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    params = {"l1": "0.001", "l2": "0.0005", "epochs": 2, "max_train_samples": 1024, "max_eval_samples": 512,
              "batch_size": 32, "compile": "false"}
    cmd = ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-name", "e2e"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    subprocess.run(cmd, env=env, check=True, timeout=600)

    client = MlflowClient(tracking_uri)
    run = the_only_run(client, "e2e")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "cnn l1=1e-3 l2=5e-4 s1"
    assert run.data.tags["regime"] == "l1+l2"
    # the experiment `mlflow run` chose is marked as model training, like every one regsweep logs into
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    p = run.data.params
    assert (p["l1"], p["l2"], p["model"], p["norm"], p["optimizer"]) == ("0.001", "0.0005", "cnn", "bn", "sgd")
    assert int(p["n_params"]) < 10_000 and (p["n_train"], p["n_val"], p["n_test"]) == ("1024", "512", "512")

    for key in ("train/loss", "val/acc", "test/acc", "lr", "penalty/l1", "penalty/l2", "speed/epoch_seconds",
                "speed/images_per_sec", "weights/conv1/mean_abs", "weights/head/frac_small",
                "weights/all/l2_norm", "weights/conv5/max_abs"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    l1_hist = client.get_metric_history(run.info.run_id, "penalty/l1")
    sum_abs = client.get_metric_history(run.info.run_id, "penalty/sum_abs_w")
    assert l1_hist[-1].value == pytest.approx(0.001 * sum_abs[-1].value)

    m = run.data.metrics
    assert (m["l1"], m["l2"]) == (0.001, 0.0005)  # the coefficients as numbers, to sort and filter by
    for key in ("best_val_acc", "best_val_epoch", "test_acc_at_best_val", "best_test_acc", "best_test_epoch",
                "final_test_acc", "total_train_seconds", "total_hook_seconds", "test_macro_f1_at_best_val"):
        assert key in m, key
    assert 0.3 < m["best_val_acc"] <= 1 and m["best_val_epoch"] in (1, 2)
    assert 0 < m["total_hook_seconds"] < m["total_train_seconds"]
    assert run.data.tags["mlflow.note.content"].startswith("l1+l2: best validation accuracy")

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert ARTIFACTS <= artifacts
    table = client.load_table(run.info.experiment_id, "per_class_metrics.json", run_ids=[run.info.run_id])
    assert list(table["class"]) == list(range(10)) and {"precision", "recall", "f1"} <= set(table.columns)

    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"mnist-training", "mnist-validation",
                                                                   "mnist-test"}
    (model_info,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert model_info.source_run_id == run.info.run_id
    # Loaded in a fresh process, as a consumer of the model would: loading puts the model's bundled code
    # on sys.path, which must not leak into this test session.
    check = (f"import mlflow, numpy as np; mlflow.set_tracking_uri({tracking_uri!r}); "
             f"m = mlflow.pyfunc.load_model('models:/{model_info.model_id}'); "
             "print(np.asarray(m.predict(np.zeros((3, 1, 28, 28), dtype=np.float32))).shape)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "(3, 10)"


def test_exception_marks_run_failed_with_the_reason(tracking_uri, tiny_data, tiny_cfg):
    def explode(epoch, metrics):
        raise RuntimeError("boom at epoch 1")

    with pytest.raises(RuntimeError, match="boom"):
        run_training(tiny_cfg.replace(log_images=False), tiny_data, on_epoch=explode)
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED"
    assert "boom at epoch 1" in run.data.tags["regsweep.error"]
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val/acc")] == [1]


def test_a_run_ends_failed_and_leaves_no_active_run_even_where_the_store_refuses_its_error_tag(
        tracking_uri, tiny_data, tiny_cfg):
    import sqlite3

    db = sqlite3.connect(tracking_uri.removeprefix("sqlite:///"))
    db.execute("CREATE TRIGGER refuse_error_tag BEFORE INSERT ON tags WHEN NEW.key = 'regsweep.error' "
               "BEGIN SELECT RAISE(ABORT, 'tag refused'); END")
    db.commit()
    db.close()

    def explode(epoch, metrics):
        raise RuntimeError("boom at epoch 1")

    with pytest.warns(UserWarning, match="could not tag run"), pytest.raises(RuntimeError, match="boom"):
        run_training(tiny_cfg.replace(log_images=False), tiny_data, on_epoch=explode)
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED" and "regsweep.error" not in run.data.tags
    assert mlflow.active_run() is None  # the next run of a sweep process does not nest under it


def test_on_epoch_can_stop_training_and_the_reason_is_kept(tracking_uri, tiny_data, tiny_cfg):
    run_id, result = run_training(tiny_cfg.replace(epochs=3, log_images=False), tiny_data,
                                  on_epoch=lambda epoch, _: "pruned by test" if epoch == 2 else None)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["regsweep.stop_reason"] == "pruned by test"
    assert run.data.metrics["epochs_trained"] == 2 and len(result.history) == 2


def test_divergence_fails_the_run_with_a_clear_reason(tracking_uri, tiny_data, tiny_cfg):
    from regsweep.training import DivergedError

    with pytest.raises(DivergedError, match="training loss is nan"):
        run_training(tiny_cfg.replace(l1=1e6, lr=10.0, log_images=False, norm="none", epochs=1), tiny_data)
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED" and "DivergedError" in run.data.tags["regsweep.error"]


def test_logging_the_model_does_not_import_lightning_even_where_it_is_installed(tmp_path):
    """mlflow.pytorch imports pytorch-lightning when it can; regsweep's import of it hides Lightning."""
    fake = tmp_path / "pytorch_lightning"
    fake.mkdir()
    marker = tmp_path / "imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    code = ("import sys; from regsweep.tracking import pytorch_flavour; flavour = pytorch_flavour(); "
            "assert callable(flavour.log_model) and 'pytorch_lightning' not in sys.modules; "
            "import pytorch_lightning")  # still importable by anyone who wants it afterwards
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert marker.read_text() == "x"  # once: by the explicit import, not by mlflow.pytorch's


@pytest.mark.slow
def test_sigterm_marks_the_run_killed(tracking_uri):
    args = ["--epochs", "200", "--max-train-samples", "1024", "--max-eval-samples", "256", "--compile", "false",
            "--log-model", "false", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "regsweep", "train", *args],
                            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
    client = MlflowClient(tracking_uri)
    deadline = time.time() + 120
    run = None
    while time.time() < deadline:  # wait until the run is training: it has logged an epoch
        runs = client.search_runs(["0"]) if client.get_experiment("0") else []
        if runs and client.get_metric_history(runs[0].info.run_id, "val/acc"):
            run = runs[0]
            break
        time.sleep(0.5)
    assert run is not None and run.info.status == "RUNNING"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # as a shell reports a process ended by it
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    assert "SIGTERM" in run.data.tags["regsweep.stop_reason"]


def children_of(pid: int, running: str) -> list[int]:
    """The processes whose parent is `pid` and whose command line holds `running` (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid and \
                    running in (stat.parent / "cmdline").read_text():
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


@pytest.mark.slow
def test_sigterm_to_mlflow_run_alone_stops_its_training_and_ends_the_run_killed(tracking_uri):
    """`timeout` or a job scheduler signals `mlflow run` alone. MLflow's launcher dies of a SIGTERM without
    stopping its command: regsweep train notices its parent gone, and stops as if signalled itself, from its
    start on (here a second after it began, as it imports its stages; once it trains, the same signal ends the
    run KILLED as in test_sigterm_marks_the_run_killed)."""
    from regsweep.outage import pid_alive

    cmd = ["mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-name", "orphan"]
    for key, value in {"epochs": 200, "max_train_samples": 1024, "max_eval_samples": 256, "batch_size": 32,
                       "compile": "false", "log_model": "false"}.items():
        cmd += ["-P", f"{key}={value}"]
    launcher = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, deadline, trainer = MlflowClient(tracking_uri), time.time() + 180, None
    try:
        while time.time() < deadline and trainer is None:  # `mlflow run` starts the command once its run exists
            assert launcher.poll() is None
            trainer = next(iter(children_of(launcher.pid, "regsweep")), None)  # bash execs it
            time.sleep(0.1)
        assert trainer is not None, "mlflow run started no command"
        time.sleep(1)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == -signal.SIGTERM  # MLflow's launcher is gone, nothing ended its run
        deadline = time.time() + 90  # the trainer is not this test's child: poll until it is gone
        while pid_alive(trainer) and time.time() < deadline:
            time.sleep(0.5)
        assert not pid_alive(trainer), "training went on without the mlflow run that started it"
    finally:
        for pid in [trainer] if trainer and pid_alive(trainer) else []:
            os.kill(pid, signal.SIGKILL)
    (run,) = client.search_runs([client.get_experiment_by_name("orphan").experiment_id])
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["regsweep.stop_reason"]


@pytest.mark.slow
def test_walkthrough_notebook_runs(tracking_uri):
    """The notebook's code cells run top to bottom (it sets up its own temporary store)."""
    import json

    notebook = json.loads((REPO / "notebooks" / "walkthrough.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "walkthrough.ipynb", "exec"), namespace)
    assert set(namespace["results"]) == {"none", "l1", "l2", "l1+l2"}
    assert len(namespace["runs"]) == 4
    # L1 leaves more near-zero weights than no penalty at all: the effect the notebook is about.
    frac = {k: r.history[-1]["weights/all/frac_small"] for k, r in namespace["results"].items()}
    assert frac["l1"] > frac["none"]
