"""The `regsweep` command: a thin click adapter over TrainConfig and the stage modules.

Every TrainConfig field is one option of the same name (dashes for underscores), so `regsweep train`, the
MLproject entry point and `regsweep optimize` accept the same settings.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import click

from . import config as C
from .config import ConfigError, TrainConfig

HELP = {
    "l1": "L1 coefficient: adds l1 * sum|w| over the penalised tensors to the loss (0 = off).",
    "l2": "L2 coefficient: adds l2 * sum w^2 over the penalised tensors to the loss (0 = off). "
          "This is an explicit penalty, not decoupled weight decay.",
    "penalize": "Which tensors L1/L2 penalise: 'weights' = weights of conv and linear layers; "
                "'all' = also biases and norm scales/shifts.",
    "model": "cnn = ~7.4k-parameter squeeze-expand CNN; mlp = fully connected net (see --hidden).",
    "norm": "bn = batch norm, gbn = ghost batch norm (see --ghost-batch-size), none.",
    "ghost_batch_size": "Virtual batch size for ghost batch norm.",
    "dropout": "Dropout rate (whole feature maps in the CNN, units in the MLP).",
    "hidden": "MLP hidden layer sizes, comma-separated (e.g. 500,250,100 or 20,7,5).",
    "activation": "MLP activation.",
    "init": "MLP weight init: default (PyTorch), gaussian N(0, 0.01^2), glorot (Xavier uniform).",
    "epochs": "Training epochs (an upper bound when early stopping is on).",
    "batch_size": "Training batch size.",
    "lr": "Learning rate (the peak for onecycle).",
    "momentum": "SGD (Nesterov) momentum.",
    "optimizer": "sgd (Nesterov momentum) or adam.",
    "scheduler": "Learning-rate schedule, stepped per batch: none, step (x0.1 every --step-size epochs), "
                 "onecycle.",
    "step_size": "Epochs between learning-rate decays with --scheduler step.",
    "patience": "Early stopping: stop after this many epochs without a lower validation loss (0 = off).",
    "augment": "Random rotation of training batches (true/false).",
    "rotate": "Maximum rotation in degrees for --augment.",
    "precision": "fp32, or bf16 autocast on the CPU.",
    "compile": "torch.compile the training step (true/false): faster epochs after a one-off compile.",
    "seed": "Seed for initialisation, batch order and augmentation (the validation split is fixed).",
    "val_size": "Training images held out as the validation set used for model selection.",
    "max_train_samples": "Use only this many training images (0 = all); for quick runs.",
    "max_eval_samples": "Use only this many validation and test images (0 = all); for quick runs.",
    "data_dir": "Folder with mnist/*.gz and SHA256SUMS, or torchvision's MNIST/raw layout "
                "(default: the repository's data/).",
    "download": "Let torchvision download MNIST into --data-dir if it is not there (true/false).",
    "log_model": "Log the best-validation model with mlflow.pytorch.log_model (true/false).",
    "log_images": "Log figures: misclassified digits, curves, confusion matrix, histograms (true/false).",
    "threads": "torch intra-op threads (0 = PyTorch's default).",
}
CHOICES = {"model": C.MODELS, "norm": C.NORMS, "optimizer": C.OPTIMIZERS, "scheduler": C.SCHEDULERS,
           "activation": C.ACTIVATIONS, "init": C.INITS, "precision": C.PRECISIONS, "penalize": C.PENALIZE}


class UsageFailure(click.ClickException):
    """A bad input found after parsing: one line on stderr, exit code 2, nothing created."""
    exit_code = 2


class Cli(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.ctx = None  # one line ("Error: ..."), not a usage block
            raise


def config_options(command):
    """Add one click option per TrainConfig field, defaults and types taken from the dataclass."""
    for f in reversed(dataclasses.fields(TrainConfig)):
        kind = {float: click.FLOAT, int: click.INT, bool: click.BOOL}.get(type(f.default), click.STRING)
        if f.name in CHOICES:
            kind = click.Choice(CHOICES[f.name])
        flag = "--" + f.name.replace("_", "-")
        command = click.option(flag, f.name, type=kind, default=f.default, show_default=True,
                               help=HELP[f.name])(command)
    return command


def build_config(fields: dict) -> TrainConfig:
    try:
        return TrainConfig(**fields).validate()
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


@click.group(cls=Cli)
@click.version_option(package_name="regsweep")
def cli():
    """regsweep: what L1/L2 regularisation does to a small MNIST network, tracked in MLflow."""


@cli.command()
@config_options
@click.option("--experiment-name", envvar="MLFLOW_EXPERIMENT_NAME", default=None,
              help="MLflow experiment for the run (ignored inside `mlflow run`, which has made the run).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(experiment_name, quiet, **fields):
    """Train one configuration on MNIST and log it to MLflow.

    Logs the config as params; per epoch (step=epoch) train/val/test loss and accuracy, learning rate,
    penalty values, speed and per-layer weight statistics; at the end the summary (best_val_acc and the test
    accuracy at that epoch), per-class precision/recall/F1, figures and the model. The tracking location is
    MLFLOW_TRACKING_URI (MLflow's default: sqlite:///mlflow.db). Inside `mlflow run` it logs into the run
    MLflow created.
    """
    from .data import DataError, load_mnist
    from .tracking import TrackingError, check_tracking_uri, progress_wanted, run_training

    try:
        cfg = build_config(fields)
        data = load_mnist(cfg.resolved_data_dir(), cfg.val_size, cfg.max_train_samples, cfg.max_eval_samples,
                          cfg.download)
        check_tracking_uri()
    except (UsageFailure, DataError, TrackingError) as exc:
        mark_project_run_failed(str(exc))
        raise UsageFailure(str(exc).removeprefix("Error: ")) from None

    import mlflow
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    experiment_id = None
    if experiment_name and not os.environ.get("MLFLOW_RUN_ID"):
        experiment_id = mlflow.set_experiment(experiment_name).experiment_id
    run_id, result = run_training(cfg, data, experiment_id=experiment_id, show_progress=progress_wanted(quiet))
    s = result.summary
    click.echo(f"run {run_id}: best val acc {100 * s['best_val_acc']:.2f}% at epoch {s['best_val_epoch']}, "
               f"test acc there {100 * s['test_acc_at_best_val']:.2f}% ({s['total_train_seconds']:.0f}s)")


def mark_project_run_failed(message: str) -> None:
    """Inside `mlflow run` the run exists before we can check input: say on it why it failed."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        from mlflow.tracking import MlflowClient
        try:
            MlflowClient().set_tag(run_id, "regsweep.error", message)
        except Exception:  # noqa: BLE001 - the store itself may be the problem; the exit code still tells
            pass


def main():
    cli(prog_name="regsweep")


if __name__ == "__main__":
    sys.exit(main())
