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
import os
import sys
import time
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
from .experiment import PREDICTIONS, prepare_experiment
from .models import count_parameters
from .outage import STOP_REASON_TAG, TAG_LIMIT, WORKER_TAG, Outage, worker_id
from .regularization import weight_layers
from .signals import signals_held, terminal_status
from .training import FitResult, confusion_matrix, fit, new_model, per_class_metrics


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


def dataset_digest(data: MnistSplits) -> str:
    """Identifies the exact images and split: same digest, same data."""
    h = hashlib.sha256()
    for split in (data.train, data.val, data.test):
        h.update(split.y.numpy().tobytes())
        h.update(split.x[:: max(1, len(split) // 64)].numpy().tobytes())
    return h.hexdigest()[:16]


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


@contextmanager
def hidden_imports(*names: str):
    """`import name` raises ImportError in the block (a None in sys.modules does that), unless something in the
    process has imported it already. For the optional integrations that a library imports only to offer, which
    regsweep does not use and which cost a second or more to import. The library goes on without them, and for
    the rest of the process: it keeps the failed import (MLflow's Lightning callback, Optuna's try_import)."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def pytorch_flavour():
    """`mlflow.pytorch`, imported without Lightning.

    Where pytorch-lightning is installed, importing `mlflow.pytorch` imports it too (with torchmetrics and
    whatever they pull in), only to offer a checkpoint callback for Lightning's autologging, which regsweep
    does not use: seconds of a run whose epochs take half a second each (`python benchmarks/gpu.py
    --startup`). `mlflow.pytorch` already goes on without the callback when that import fails.
    """
    if "mlflow.pytorch" in sys.modules:  # imported already (mlflow's lazy attribute is not put there)
        return sys.modules["mlflow.pytorch"]
    with hidden_imports("pytorch_lightning", "lightning"):
        return importlib.import_module("mlflow.pytorch")


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
    logged = None  # the result, once its outcome is logged
    try:
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
            try:
                with signals_held():  # a signal waits for the outcome, which is then complete: the run ends FINISHED
                    log_outcome(cfg, result, data)
                    logged = result
            except KeyboardInterrupt as exc:
                exc.outcome_logged = logged is not None  # not where a third signal cut the logging short
                raise
            return run.info.run_id, result
    except KeyboardInterrupt as exc:
        # Held as the outcome was logged or as the run ended: the run ended FINISHED, complete, and a sweep counts
        # its trial before it stops. (Not one that came between the two holds: that run ended KILLED.)
        if logged is not None and getattr(exc, "run_status", "") == "FINISHED":
            exc.result = logged
        raise
