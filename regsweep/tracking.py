"""Everything that talks to MLflow for one training run.

`run_training` opens (or, inside `mlflow run`, resumes) a run, logs the config in one call, streams each
epoch's metrics as one batch with `step=epoch`, then logs the summary, tables, figures and model. A run
always ends in a terminal state: FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM; when the
tracking store itself stops answering, the next `train` or `optimize` ends it KILLED (see outage.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import mlflow
import pandas as pd
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from . import plots
from .config import TrainConfig
from .data import MnistSplits
from .models import count_parameters
from .outage import (STOP_REASON_TAG, TAG_LIMIT, WORKER_TAG, Outage, health, is_http, redact, store_locked,
                     without_credentials, worker_id)
from .regularization import weight_layers
from .training import FitResult, confusion_matrix, fit, new_model, per_class_metrics


PREDICTIONS = "predictions/test_pred.json"  # artifact of every run, read back by the report


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any run is created."""


def check_tracking_uri() -> str:
    """Fail fast, with one line, if the tracking store is unreachable. Returns the URI in use. (For a server
    URI with credentials in it, this also stops MLflow printing run URLs, which would show them.)"""
    uri = mlflow.get_tracking_uri()
    if is_http(uri):
        # MLflow's own client retries for minutes against a dead server; one short probe answers sooner.
        try:
            health(uri, timeout=5)
        except Exception as exc:  # noqa: BLE001 - requests' errors, reported in one line
            raise TrackingError(f"MLflow tracking server at {redact(uri)} is unreachable: "
                                f"{redact(str(exc))}") from None
        if without_credentials(uri) != uri:
            # MLflow prints each run's URL as it ends, credentials included; regsweep prints its own without.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        return uri
    try:
        with store_locked(uri):  # a new database's tables are made here, by one process at a time
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track", reported in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"cannot use MLflow tracking URI {redact(uri)!r}: {redact(first)}") from None
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


def check_artifact_location(name: str | None, run_id: str | None = None) -> None:
    """Fail with one line, before any run, where the runs' artifacts cannot be written to this machine's file
    system. MLflow only finds out when the first artifact is logged: `train` after its run is made, a sweep
    once its first stack has trained. A location elsewhere (a tracking server's, a cloud bucket) is left
    to the store: checking it would mean writing there."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    location, whose = artifact_location(name, run_id)
    if location is None or urllib.parse.urlparse(location).scheme not in ("", "file"):
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
            # public accessor for it; a store without the attribute leaves the check to the first artifact.
            root = getattr(client._tracking_client.store, "artifact_root_uri", None)
            return root, f"the default artifact root, for the new MLflow experiment {name!r}"
        return experiment.artifact_location, f"the artifact location of MLflow experiment {name!r}"
    experiment = client.get_experiment(mlflow.tracking.fluent._get_experiment_id())
    return experiment.artifact_location, f"the artifact location of MLflow experiment {experiment.name!r}"


def check_run_to_resume() -> None:
    """Where MLFLOW_RUN_ID is set, it must name a run that `mlflow run` started for this command: one that
    exists and is RUNNING. A leftover id of a finished run would otherwise be reopened and trained into, under
    another run's params."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"MLFLOW_RUN_ID={run_id} names no run in this tracking store; unset it to start a "
                            "new run") from None
    if run.info.lifecycle_stage == "deleted" or run.info.status != "RUNNING":
        state = "deleted" if run.info.lifecycle_stage == "deleted" else run.info.status
        raise TrackingError(f"MLFLOW_RUN_ID={run_id} names a {state} run: regsweep train logs into the run "
                            "`mlflow run` started for it, not into an earlier one; unset it to start a new run")


def enable_prompt_flushes() -> None:
    """Let `mlflow.flush_async_logging()`, and the end of a run that logged asynchronously, return as soon as
    the queue is written.

    MLflow's logging thread waits for new metrics with a one-second timeout and sees a flush only when that
    runs out, so each flush idled for most of a second (`python benchmarks/stack.py --flushes`). The sweep
    flushes whenever a member leaves its stack, while the others wait. With a buffering interval set, the
    thread waits on the event a flush sets instead, and writes what queued up meanwhile (MLflow merges only
    consecutive batches of one run, so a stack still sends one request per member and epoch). Worker processes
    inherit the setting; a value the user set is kept."""
    os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")


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
# the experiment on its runs table instead of an empty traces overview; MLflow 3.17's own UI goes by its
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
    # MLflow 3.17's UI chooses between its GenAI pages and its model-training pages by a switch it
    # remembers per browser (GenAI unless changed), not by the experiment's kind; the URL can set it.
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


def dataset_digest(data: MnistSplits) -> str:
    """Identifies the exact images and split: same digest, same data."""
    h = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        h.update(split.y.numpy().tobytes())
        h.update(split.x[:: max(1, len(split) // 64)].numpy().tobytes())
    return h.hexdigest()[:16]


class _Held:
    depth = 0  # signals_held blocks entered and not yet left
    interrupt: KeyboardInterrupt | None = None  # the signal one of them holds
    received = 0  # Ctrl-C and SIGTERM received inside the outermost terminal_status block


_held = _Held()


@contextmanager
def signals_held():
    """Hold the first Ctrl-C or SIGTERM (under terminal_status) until the block is done, then raise it. For the
    blocks that end runs and write their last tags: interrupted halfway, they would leave a run RUNNING or
    tagged unlike its trial, and a store call cut short can leave SQLite's write lock with the interrupted
    session, so that the writes of the stop itself wait on it and fail. Where the block raises an error of its
    own, that error stops what it stops instead, and the signal is forgotten: the next one counts as a first. A
    third signal is not held (terminal_status ignores the second): a block that hangs can still be stopped.
    Only the main thread, which signals interrupt, holds them: another thread's block must not hold its signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held.depth += 1
    done = False
    try:
        yield
        done = True
    finally:
        _held.depth -= 1
        if _held.depth == 0 and _held.interrupt is not None:
            interrupt, _held.interrupt = _held.interrupt, None
            if done:
                raise interrupt
            _held.received = 0


@contextmanager
def terminal_status():
    """Turn SIGTERM, like Ctrl-C, into KeyboardInterrupt for the duration, so a killed run is marked KILLED, not
    RUNNING. The second signal is ignored: what it would interrupt is the ending of the runs KILLED and the
    queueing of their trials again, and a sweep's worker processes get two for one stop (a terminal's Ctrl-C
    reaches every process, then the driver sends its SIGTERM). A third interrupts the stop itself, for
    whoever insists (the next start ends what it leaves). A signal stays ignored where it is (completion workers
    ignore Ctrl-C and SIGTERM, so that the sweep decides for them). A block inside another leaves the signals to
    the outer one."""
    if getattr(signal.getsignal(signal.SIGTERM), "is_terminal_status", False):
        yield
        return
    _held.received = 0

    def stop(signum, frame):
        _held.received += 1
        if _held.received == 2:
            return  # the stop under way is ending the runs: one more signal must not cut that short
        interrupt = KeyboardInterrupt(f"signal {signum}")
        interrupt.signum = signum  # a sweep's worker process ends by the same signal once it has cleaned up
        if _held.received == 1 and _held.depth:
            _held.interrupt = interrupt  # raised as the block that holds it ends (signals_held)
            # One line at once (os.write: safe in a handler), so that the wait does not look like a hang.
            os.write(2, b"\nstopping once the work in hand is done (a third Ctrl-C stops at once)\n")
            return
        raise interrupt

    stop.is_terminal_status = True
    previous = {}
    try:
        # An ignored signal stays ignored: completion workers ignore both, so that the sweep decides for them.
        for sig in [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) != signal.SIG_IGN]:
            previous[sig] = signal.signal(sig, stop)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def mlflow_run(cfg: TrainConfig, *, run_id: str | None = None, experiment_id: str | None = None,
               tags: dict[str, str] | None = None):
    """Start a run, or resume `run_id` (or MLFLOW_RUN_ID, as `mlflow run` sets it), that ends FINISHED,
    FAILED (exception) or KILLED (Ctrl-C, SIGTERM). A run created elsewhere (a sweep's trial, under its
    parent) keeps the name and parent it was given."""
    with terminal_status():
        status, note, end, started = RunStatus.FINISHED, None, True, None
        try:
            with signals_held():  # a signal as the run is made waits for it: the run then ends KILLED below
                # The worker tag goes on with the run itself: a run without it, left RUNNING by an outage in the
                # next calls, could never be told apart from another machine's and ended (end_orphaned_runs).
                run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id,
                                       run_name=None if run_id else cfg.run_name, tags={WORKER_TAG: worker_id()})
                started = run.info.run_id
            prepare_experiment(run.info.experiment_id)  # also the one `mlflow run` or the default chose
            tags = tags or {}
            # The device tags may come with `tags` (from a process that has the GPU open; looking its name up
            # here would open a CUDA context just for that).
            where = {} if "regsweep.device" in tags else device_tags(cfg)
            mlflow.set_tags({"regime": cfg.regime, "model": cfg.model, "norm": cfg.norm, **where, **tags})
            yield run
        except Outage as exc:
            # The tracking store down: nothing can be written (the next command ends the run KILLED).
            # Another store down (the sweep's Optuna storage): say so on the run, which stops KILLED.
            end = not exc.tracking
            status, note = RunStatus.KILLED, (STOP_REASON_TAG, f"{exc}; the trial runs again on resume")
            raise
        except KeyboardInterrupt as exc:
            if getattr(exc, "outcome_logged", False):  # held until the run was complete (run_training): it is
                status, note = RunStatus.FINISHED, None
            else:
                status, note = RunStatus.KILLED, (STOP_REASON_TAG, "interrupted (Ctrl-C or SIGTERM)")
            if started:  # for the command's one line
                exc.run_id, exc.run_status = started, RunStatus.to_string(status)
            raise
        except BaseException as exc:
            status, note = RunStatus.FAILED, ("regsweep.error", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if end and started:  # (not where making the run failed, or a third signal cut it short)
                try:
                    with signals_held():  # a signal now finds the run ended, not half-way there
                        end_active_run(started, RunStatus.to_string(status), note)
                except KeyboardInterrupt as exc:
                    exc.run_id, exc.run_status = started, RunStatus.to_string(status)
                    raise


def end_active_run(run_id: str, status: str, note: tuple[str, str] | None = None) -> None:
    """End the active run `run_id` as `status`, first tagging it with `note` (key, why). The run ends even
    where the store refuses the note or the last queued metrics: a run left RUNNING would also stay on
    MLflow's stack of active runs, and the sweep's next trial would nest under it."""
    if note is not None:
        try:
            MlflowClient().set_tag(run_id, note[0], note[1][:TAG_LIMIT])
        except Exception as exc:  # noqa: BLE001 - the run's status matters more than the note
            warnings.warn(f"could not tag run {run_id} with {note[0]}: {exc}", stacklevel=2)
    try:
        mlflow.end_run(status)  # takes the run off the stack first, then flushes and ends it
    except Exception:
        MlflowClient().set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise


def device_tags(cfg: TrainConfig) -> dict[str, str]:
    """Where the run trains: the device, and the GPU's name on CUDA."""
    device = cfg.resolved_device()
    if device != "cuda":
        return {"regsweep.device": device}
    import torch

    return {"regsweep.device": device, "regsweep.gpu": torch.cuda.get_device_name()}


def coefficient_metrics(cfg: TrainConfig) -> dict[str, float]:
    """L1 and L2 once more, as metrics. MLflow keeps params as text, which sorts 1e-05 after 0.001, filters only
    by = and LIKE, and keeps the spelling the entry point used (`mlflow run -P l1=1e-3` logs '1e-3', `train`
    '0.001'); as metrics they sort and filter as numbers (`metrics.l1 > 1e-4`). (The saved view shows the params:
    the UI writes these metrics out in full, 1e-6 as 0.00000100..., and cuts them to the column's width.)"""
    return {"l1": cfg.l1, "l2": cfg.l2}


def run_params(cfg: TrainConfig, data: MnistSplits, n_params: int) -> dict[str, str]:
    """A training run's params: its configuration, its parameter count and its splits' sizes."""
    return {k: str(v) for k, v in {**cfg.as_params(), "n_params": n_params, **data.sizes()}.items()}


def log_config(cfg: TrainConfig, data: MnistSplits, n_params: int) -> None:
    params = run_params(cfg, data, n_params)
    # `mlflow run` has already logged the MLproject parameters as the user typed them (e.g. l1=1e-3);
    # MLflow forbids changing a param, so only the ones it has not logged are added. (A stacked sweep has logged
    # them all, and the coefficients, when it created the run: sweep/stacked.py open_runs.)
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data
    mlflow.log_params({k: v for k, v in params.items() if k not in logged.params})
    if not coefficient_metrics(cfg).keys() <= logged.metrics.keys():
        mlflow.log_metrics(coefficient_metrics(cfg))
    mlflow.log_dict(dataclasses.asdict(cfg), "config.json")
    digest = dataset_digest(data)
    for context, split in (("training", data.train), ("validation", data.val), ("test", data.test)):
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that a path is ambiguous between them.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(split.x.numpy(), targets=split.y.numpy(), source=data.source,
                                             name=f"mnist-{context}", digest=digest)
        log_input_once(dataset, context)


def log_input_once(dataset, context: str, attempts: int = 3) -> None:
    """mlflow.log_input, tolerant of MLflow's get-or-create race: when two workers log the same dataset to
    one store at the same moment, the slower insert fails a UNIQUE constraint; a retry finds the record."""
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as exc:
            race = "UNIQUE constraint" in str(exc) or "IntegrityError" in str(exc)
            if not race or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def log_outcome(cfg: TrainConfig, result: FitResult, data: MnistSplits) -> None:
    """Summary metrics, per-class table, figures and model, all from the best-validation weights."""
    model = result.model
    pred = result.test_pred  # those behind test_acc_at_best_val (a diverged run, without them, ends before)
    cm = confusion_matrix(data.test.y, pred)
    per_class = per_class_metrics(cm)
    macro_f1 = sum(row["f1"] for row in per_class) / len(per_class)
    mlflow.log_metrics({**result.summary, "test_macro_f1_at_best_val": macro_f1})
    if result.stop_reason:
        mlflow.set_tag(STOP_REASON_TAG, result.stop_reason)
    mlflow.set_tag("regsweep.step", result.step_mode)
    s = result.summary
    # The run's description in the MLflow UI: the selection and the honest test number, in one line.
    mlflow.set_tag("mlflow.note.content",
                   f"{cfg.regime}: best validation accuracy {100 * s['best_val_acc']:.2f}% at epoch "
                   f"{s['best_val_epoch']}, test accuracy there {100 * s['test_acc_at_best_val']:.2f}% "
                   f"({s['epochs_trained']} epochs{'; ' + result.stop_reason if result.stop_reason else ''}).")
    mlflow.log_table(pd.DataFrame(per_class), artifact_file="per_class_metrics.json")
    # Test labels and predictions of the selected weights, so that a report can compare two runs image by
    # image (which digits one gets right and the other wrong); 10k small ints are a few kB of JSON.
    mlflow.log_dict({"true": data.test.y.tolist(), "pred": pred.tolist()}, PREDICTIONS)
    if cfg.log_images:
        figures = {
            "misclassified.png": plots.misclassified_grid(data.test.x, data.test.y, pred),
            "training_curves.png": plots.training_curves(result.history),
            "confusion_matrix.png": plots.confusion_figure(cm),
            "weight_histograms.png": plots.weight_histograms(
                {name: layer.weight for name, layer in weight_layers(model).items()}),
        }
        for name, fig in figures.items():
            mlflow.log_figure(fig, name)
            plots.plt.close(fig)
    if cfg.log_model:
        log_model(model, data)


def pytorch_flavour():
    """`mlflow.pytorch`, imported without Lightning.

    Where pytorch-lightning is installed, importing `mlflow.pytorch` imports it too (with torchmetrics and
    whatever they pull in), only to offer a checkpoint callback for Lightning's autologging, which regsweep
    does not use: seconds of a run whose epochs take half a second each (`python benchmarks/gpu.py
    --startup`). `mlflow.pytorch` already goes on without the callback when that import fails, so Lightning
    is hidden for this one import (a None in sys.modules makes `import` raise ImportError), unless something
    in the process has imported it already.
    """
    if "mlflow.pytorch" in sys.modules:  # imported already (mlflow's lazy attribute is not put there)
        return sys.modules["mlflow.pytorch"]
    hidden = [name for name in ("pytorch_lightning", "lightning") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        return importlib.import_module("mlflow.pytorch")
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def log_model(model, data: MnistSplits) -> None:
    import torch
    from mlflow.models import infer_signature

    model.eval()
    example = data.test.x[:4].numpy()
    with torch.no_grad():
        signature = infer_signature(example, model(data.test.x[:4]).numpy())
    # The input example is what MLflow traces the model with (its pt2 format needs one); validating it
    # as a serving request would reload the saved model (seconds; on a GPU machine it also tries CUDA on
    # a CPU export and warns), so that is skipped. Requirements are stated, not inferred (inference
    # re-imports the model in a subprocess); the model's class lives in this package, via code_paths.
    pytorch_flavour().log_model(
        model, name="model", signature=signature, input_example=example, validate_serving_input=False,
        code_paths=[str(Path(__file__).resolve().parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )


def run_training(cfg: TrainConfig, data: MnistSplits, *, run_id: str | None = None,
                 experiment_id: str | None = None,
                 on_epoch: Callable[[int, dict], str | None] | None = None,
                 show_progress: bool = False) -> tuple[str, FitResult]:
    """Train `cfg` inside an MLflow run and log everything; returns (run_id, result).

    `run_id`: a run created beforehand to resume (a sweep creates each trial's run under its parent, with
    its tags, then trains in it). `on_epoch` is called after the epoch's metrics are logged; a string it
    returns stops training with that reason (the sweep uses this for pruning).
    """
    with mlflow_run(cfg, run_id=run_id, experiment_id=experiment_id) as run:
        model = new_model(cfg)
        log_config(cfg, data, count_parameters(model))

        def log_epoch(epoch: int, metrics: dict[str, float]) -> str | None:
            # Queued, not waited for: on a GPU an epoch can take less time than a synchronous write.
            mlflow.log_metrics(metrics, step=epoch, synchronous=False)
            return on_epoch(epoch, metrics) if on_epoch else None

        try:
            result = fit(cfg, data, log_epoch, show_progress=show_progress, model=model)
        except Outage as exc:
            if not exc.tracking:  # with the tracker unreachable, flushing would wait on it
                mlflow.flush_async_logging()
            raise
        except BaseException:
            mlflow.flush_async_logging()  # every queued epoch lands before the run ends, whatever ends it
            raise
        mlflow.flush_async_logging()
        logged = False
        try:
            with signals_held():  # a signal waits for the outcome, which is then complete: the run ends FINISHED
                log_outcome(cfg, result, data)
                logged = True
        except KeyboardInterrupt as exc:
            exc.outcome_logged = logged  # not where a third signal cut the logging short
            raise
        return run.info.run_id, result
