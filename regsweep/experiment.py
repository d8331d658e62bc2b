"""The MLflow experiment a command logs into, before and after its runs.

Before any run: the checks that turn an unusable store, experiment or artifact location into one line
(`TrackingError`, which the CLI prints as `Error: ...` with exit code 2). Around the runs: the experiment is
made, or found, and tagged so that MLflow's UI opens it on its runs with a saved comparison view. After
them: `viewing_hint`, the command and URL that show what was logged. The runs themselves are tracking.py's.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
import urllib.parse
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from .outage import (WORKER_TAG, health, is_http, mlflow_http_settings, redact, sqlite_file, store_locked,
                     without_credentials)

# Every run's test labels and predictions (tracking.log_outcome), read back by the report: named here, where
# importing it costs the report no torch.
PREDICTIONS = "predictions/test_pred.json"
PROJECT_ENTRY_POINT_TAG = "mlflow.project.entryPoint"  # on every run `mlflow run` starts


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any run is created."""


def first_line(exc: BaseException) -> str:
    """An error in one line: MLflow's and SQLAlchemy's messages go on with bodies, SQL and links."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_tracking_uri(existing: bool = False) -> str:
    """Fail fast, with one line, where the tracking store cannot be used: a server that does not answer, or not
    MLflow's API; a SQLite URI naming a folder; a database that cannot be opened. Returns the URI in use. (For a
    server URI with credentials in it, this also stops MLflow printing run URLs, which would show them.) With
    `existing`, a SQLite file that is not there is refused rather than made: a command that only reads runs
    (report) started in the wrong folder would otherwise make an empty store and find nothing in it."""
    uri = mlflow.get_tracking_uri()
    path = sqlite_file(uri)
    if path and Path(path).is_dir():  # MLflow would try to open it for a minute and a half, then fail
        raise TrackingError(f"MLflow tracking URI {redact(uri)!r} names a folder, {Path(path).resolve()}; name a "
                            "SQLite file (it is made where missing)")
    if path and existing and not Path(path).exists():
        raise TrackingError(f"no MLflow tracking store at {Path(path).resolve()}: set MLFLOW_TRACKING_URI to the "
                            "store the runs were logged to")
    if is_http(uri):
        # MLflow's own client retries for minutes against a dead server; one short probe answers sooner.
        try:
            health(uri, timeout=5)
        except Exception as exc:  # noqa: BLE001 - requests' errors, reported in one line
            raise TrackingError(f"MLflow tracking server at {redact(uri)} is unreachable: "
                                f"{redact(str(exc))}") from None
        try:  # /health says little: any web server can answer it, and MLflow's API may still refuse (404, 401)
            with mlflow_http_settings(10):  # a server failing every call is said within seconds, not minutes
                MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - MLflow's and requests' errors, reported in one line
            raise TrackingError(f"{redact(uri)} answers /health but not MLflow's API (not a tracking server, or one "
                                f"whose store fails): {redact(first_line(exc))[:300]}") from None
        if without_credentials(uri) != uri:
            # MLflow prints each run's URL as it ends, credentials included; regsweep prints its own without.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        return uri
    try:
        with store_locked(uri):  # a new database's tables are made here, by one process at a time
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track", reported in one line
        raise TrackingError(f"cannot use MLflow tracking URI {redact(uri)!r}: {redact(first_line(exc))}") from None
    return uri


def check_experiment(name: str | None) -> None:
    """Fail with one line, before any run, where the experiment to log into cannot take runs: deleted (MLflow
    refuses it), or, with no name given, an MLFLOW_EXPERIMENT_ID that names none."""
    client = MlflowClient()
    if name:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore "
                                f"--experiment-id {experiment.experiment_id}) or choose another name")
        return
    from_env = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if from_env is not None and not from_env.strip():  # click takes it for unset; MLflow reads it, and fails
        raise TrackingError("MLFLOW_EXPERIMENT_NAME is set but empty: unset it, or name an experiment")
    given = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if given:
        try:
            experiment = client.get_experiment(given)
        except mlflow.exceptions.MlflowException:
            experiment = None
        if experiment is None or experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLFLOW_EXPERIMENT_ID={given} names no active MLflow experiment")
        return
    try:  # MLflow's active experiment: "Default" (id 0) unless this process chose another
        experiment = client.get_experiment(mlflow.tracking.fluent._get_experiment_id())
    except mlflow.exceptions.MlflowException:
        return  # none to look at: MLflow says what it makes of that when it makes the run
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {experiment.name!r}, where runs go without --experiment-name, is "
                            f"deleted: restore it (mlflow experiments restore --experiment-id "
                            f"{experiment.experiment_id}) or name an experiment with --experiment-name")


def check_artifact_location(name: str | None, run_id: str | None = None) -> None:
    """Fail with one line, before any run, where the runs' artifacts cannot be written. MLflow only finds out
    when the first artifact is logged: `train` after its run is made, a sweep once its first stack has
    trained. A location on this machine's file system is tried; elsewhere, MLflow must have a way to write
    there (a scheme it knows, a tracking server for mlflow-artifacts:, the client library of those whose
    repository imports it when made, as gs:// and wasbs:// do and s3:// does not), and whether the server or
    bucket then takes the writes is left to the store: checking that would mean writing there."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.utils.file_utils import local_file_uri_to_path

    try:
        location, whose = artifact_location(name, run_id)
    except mlflow.exceptions.MlflowException:  # e.g. no default experiment: MLflow says so when it makes the run
        return
    if location is None:
        return
    if urllib.parse.urlparse(location).scheme not in ("", "file"):
        try:
            get_artifact_repository(location)  # MLflow's choice of how to write there; nothing is written
        except (mlflow.exceptions.MlflowException, ImportError) as exc:  # an unknown scheme, a missing library
            raise TrackingError(f"MLflow cannot write artifacts to {redact(location)} ({whose}): "
                                f"{redact(first_line(exc))}") from None
        except Exception:  # noqa: BLE001 - anything else (Databricks' dbfs: wants a run's URI) is the run's to meet
            pass
        return
    path = local_file_uri_to_path(location)
    try:
        os.makedirs(path, exist_ok=True)  # MLflow makes it at the first artifact; a run's folder goes inside
        with tempfile.NamedTemporaryFile(dir=path, prefix=".regsweep-check-"):
            pass
    except OSError as exc:
        why = "a file is in its place" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
        raise TrackingError(f"artifacts cannot be written to {path} ({whose}): {why}; fix the location or log "
                            "into another experiment") from None


def artifact_location(name: str | None, run_id: str | None) -> tuple[str | None, str]:
    """Where the artifacts of the command's runs will go (None where unknown), and whose location that is:
    run `run_id`'s, experiment `name`'s (MLflow's active experiment where None) or a new experiment's."""
    client = MlflowClient()
    if run_id:
        return client.get_run(run_id).info.artifact_uri, f"the artifact location of run {run_id}"
    if name:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            # A new experiment's artifacts go under its store's default artifact root (`mlflow server
            # --default-artifact-root`, ./mlruns for a database store used directly). MLflow's client has no
            # public accessor for it; where the private one is missing (a server's store, another MLflow
            # version), the check is left to the first artifact.
            try:
                root = client._tracking_client.store.artifact_root_uri
            except AttributeError:
                root = None
            return root, f"the default artifact root, for the new MLflow experiment {name!r}"
        return experiment.artifact_location, f"the artifact location of MLflow experiment {name!r}"
    experiment = client.get_experiment(mlflow.tracking.fluent._get_experiment_id())
    return experiment.artifact_location, f"the artifact location of MLflow experiment {experiment.name!r}"


def check_run_to_resume() -> None:
    """Where MLFLOW_RUN_ID is set, it must name the run that `mlflow run` started for this command: one that
    exists, is RUNNING, carries the project's entry point (which `mlflow run` tags its runs with) and has no
    regsweep process training it yet. A leftover id would otherwise be reopened and trained into, under another
    run's params, or another command's run taken over and ended under it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        hint = ""
        uri = mlflow.get_tracking_uri()
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            hint = " (a relative sqlite:/// path is read from the current folder: `mlflow run` makes it the project's)"
        raise TrackingError(f"MLFLOW_RUN_ID={run_id} names no run in this tracking store{hint}; unset it to start "
                            "a new run") from None
    why = not_this_commands_run(run)
    if why:
        raise TrackingError(f"MLFLOW_RUN_ID={run_id} names {why}: regsweep train logs into the run `mlflow run` "
                            "started for it; unset it to start a new run")


def not_this_commands_run(run) -> str | None:
    """Why `run` is not one that `mlflow run` has just started for this command (None where it is)."""
    if run.info.lifecycle_stage == "deleted" or run.info.status != "RUNNING":
        return f"a {'deleted' if run.info.lifecycle_stage == 'deleted' else run.info.status} run"
    if PROJECT_ENTRY_POINT_TAG not in run.data.tags:
        return "a run that `mlflow run` did not start"
    if WORKER_TAG in run.data.tags:
        return f"a run that a regsweep process ({run.data.tags[WORKER_TAG]}) already trains"
    return None


def use_experiment(name: str) -> str:
    """mlflow.set_experiment, safe when several workers create the same experiment at the same moment;
    the experiment is made to open on its runs (see `prepare_experiment`)."""
    try:
        experiment_id = mlflow.set_experiment(name).experiment_id
    except mlflow.exceptions.MlflowException:
        existing = MlflowClient().get_experiment_by_name(name)  # another process created it first
        if existing is None:
            raise
        experiment_id = mlflow.set_experiment(experiment_id=existing.experiment_id).experiment_id
    prepare_experiment(experiment_id)
    return experiment_id


# The experiment's kind as MLflow 3 records it: model training runs, not a GenAI app. UIs that go by it open
# the experiment on its runs table instead of an empty traces overview; MLflow's own UI (3.17, 3.18) goes by its
# GenAI / Model training switch instead, which the printed URLs set (see `viewing_hint`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A saved view of the runs page, stored the way MLflow 3.17's "Save & share view" stores one: an experiment
# tag `mlflow.sharedViewState.<id>` holding a JSON envelope whose `state` is the page's serialized state.
# The URL parameter `viewStateShareKey=<id>` opens it; it is the only way a URL can choose the columns.
COMPARE_VIEW_ID = "regsweep-compare"
COMPARE_VIEW_TAG = f"mlflow.sharedViewState.{COMPARE_VIEW_ID}"
COMPARE_VIEW_NAME = "regsweep: best_val_acc first, with l1 and l2"
COMPARE_VIEW_COLUMNS = ("params.`l1`", "params.`l2`", "metrics.`best_val_acc`", "metrics.`test_acc_at_best_val`",
                        "metrics.`epochs_trained`", "tags.`regime`", "tags.`optuna.state`")
# Chart sections in this order instead of MLflow's alphabetical one (penalty, speed, test, train, val,
# weights): accuracy and loss first. Sections not named here (one per layer) are added after them.
COMPARE_VIEW_SECTIONS = ("val", "train", "test", "penalty", "Model metrics", "speed", "weights/all",
                         "System metrics")


def compare_view_envelope(created_ms: int) -> str:
    sections = [{"uuid": f"regsweep-{name.replace(' ', '-').replace('/', '-')}", "name": name, "display": True,
                 "isReordered": False, "deleted": False, "isGenerated": True} for name in COMPARE_VIEW_SECTIONS]
    state = {"orderByKey": "metrics.`best_val_acc`", "orderByAsc": False,
             "selectedColumns": list(COMPARE_VIEW_COLUMNS),
             # No charts yet: the UI fills every section with its metrics' charts, keeping the section order.
             "compareRunCharts": [], "compareRunSections": sections, "isAccordionReordered": True}
    return json.dumps({"name": COMPARE_VIEW_NAME, "createdAt": created_ms, "state": json.dumps(state)})


def prepare_experiment(experiment_id: str) -> None:
    """Tag an experiment so that the MLflow UI opens it on its runs, with a saved comparison view.

    Tags already there are left alone: a view the user has edited and saved again stays theirs. Several
    workers may arrive at once; a lost race to set a tag means the other one set it.
    """
    client = MlflowClient()
    tags = client.get_experiment(experiment_id).tags
    wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, COMPARE_VIEW_TAG: compare_view_envelope(int(time.time() * 1000))}
    for key, value in wanted.items():
        if key in tags:
            continue
        try:
            client.set_experiment_tag(experiment_id, key, value)
        except mlflow.exceptions.MlflowException:
            if key not in client.get_experiment(experiment_id).tags:
                raise


def viewing_hint(experiment_id: str, run_id: str | None = None) -> str:
    """How to look at what was logged: for a local store the `mlflow ui` command that serves it, then the
    URL of the run, or of the experiment's runs table opened on the saved comparison view."""
    uri = mlflow.get_tracking_uri()
    if is_http(uri):
        # Without credentials in the URI: the browser asks for them, and a password is never printed.
        lines, base = [], without_credentials(uri.rstrip("/"))
    else:
        # A comment, not prose, after the command: the line stays copy-pastable into a shell.
        lines = [f"mlflow ui --backend-store-uri {shlex.quote(store_uri_for_ui(uri))}    # then open:"]
        base = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
    # MLflow's UI (3.17, 3.18) chooses between its GenAI pages and its model-training pages by a switch it
    # remembers per browser once clicked (GenAI until then), not by the experiment's kind; the URL sets it for
    # the page it opens.
    query = "?workflowType=machine_learning"
    if run_id:
        lines.append(f"{base}/#/experiments/{experiment_id}/runs/{run_id}{query}")
    else:
        if has_compare_view(experiment_id):
            query += f"&viewStateShareKey={COMPARE_VIEW_ID}"
        lines.append(f"{base}/#/experiments/{experiment_id}/runs{query}")
    return "\n".join(lines)


def store_uri_for_ui(uri: str) -> str:
    """The store as `mlflow ui` accepts it from any directory: relative SQLite and file paths made absolute,
    passwords in database URLs masked (the hint is printed)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri.removeprefix("sqlite:///")
        return f"sqlite:///{Path(path).resolve()}" if path and path != ":memory:" else uri
    if "://" not in uri:
        return str(Path(uri.removeprefix("file:")).resolve())
    if uri.startswith("file://"):
        return uri
    return redact(uri)


def has_compare_view(experiment_id: str) -> bool:
    """Whether the experiment holds the comparison view: a URL naming a view that is not there makes the
    UI show an error instead of the runs."""
    try:
        return COMPARE_VIEW_TAG in MlflowClient().get_experiment(experiment_id).tags
    except mlflow.exceptions.MlflowException:
        return False
