"""The `regsweep` command: a thin click adapter over TrainConfig and the stage modules.

Every TrainConfig field is one option of the same name (dashes for underscores), so `regsweep train` and the
MLproject entry point accept the same settings; `regsweep optimize` takes them all but --l1 and --l2, which it
searches (and logs no model by default).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
from pathlib import Path

import click

from .config import CHOICES, PRUNERS, REPORT_FORMATS, SAMPLERS, ConfigError, TrainConfig, fmt_coef
from .outage import EXIT_OUTAGE, STOP_REASON_TAG, redact
from .signals import terminal_status

HELP = {
    "l1": "L1 coefficient: adds l1 * sum|w| over the penalised tensors to the loss (0 = off).",
    "l2": "L2 coefficient: adds l2 * sum w^2 over the penalised tensors to the loss (0 = off). "
          "This is an explicit penalty, not decoupled weight decay.",
    "penalize": "Which tensors L1/L2 penalise: 'weights' = weights of conv and linear layers; "
                "'all' = also biases and norm scales/shifts.",
    "model": "cnn = 9.8k-parameter squeeze-expand CNN; mlp = fully connected net (see --hidden).",
    "norm": "bn = batch norm, gbn = ghost batch norm (see --ghost-batch-size), none.",
    "ghost_batch_size": "Virtual batch size for ghost batch norm.",
    "dropout": "Dropout rate (whole feature maps in the CNN, units in the MLP).",
    "hidden": "MLP hidden layer sizes, comma-separated (e.g. 500,250,100 or 20,7,5).",
    "activation": "MLP activation.",
    "init": "MLP weight init: default (PyTorch), gaussian N(0, 0.01^2), glorot (Xavier uniform).",
    "epochs": "Training epochs (an upper bound when early stopping is on).",
    "batch_size": "Training batch size.",
    "lr": "Learning rate (the peak for onecycle).",
    "momentum": "SGD (Nesterov) momentum, in [0, 1) (0 = plain SGD).",
    "optimizer": "sgd (Nesterov momentum) or adam.",
    "scheduler": "Learning-rate schedule, stepped per batch: none, step (x0.1 every --step-size epochs), "
                 "onecycle.",
    "step_size": "Epochs between learning-rate decays with --scheduler step.",
    "patience": "Early stopping: stop after this many epochs without a lower validation loss (0 = off).",
    "augment": "Random rotation of training batches (true/false).",
    "rotate": "Maximum rotation in degrees for --augment.",
    "precision": "fp32, or bf16 autocast.",
    "compile": "torch.compile the model (true/false): faster epochs after a one-off compile; not used when "
               "the step is captured (--cuda-graph on CUDA).",
    "device": "auto = CUDA when available, else cpu; cuda without a CUDA device is an error.",
    "cuda_graph": "On CUDA, capture the whole training step once as a CUDA graph and replay it (true/false).",
    "deterministic": "On CUDA, deterministic cuDNN: the same seed gives the same result (true); false lets "
                     "cuDNN pick its fastest algorithms (runs then differ slightly).",
    "tf32": "On CUDA, convolutions in TF32, still deterministic (true, PyTorch's default; 2.4x faster 32-member "
            "stacks); false keeps float32 throughout.",
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


DONE = "regsweep.done"  # ctx.meta: what a command had finished (for the line of a signal that comes after it)


class UsageFailure(click.ClickException):
    """A bad input found after parsing: one line on stderr, exit code 2, nothing created."""
    exit_code = 2


class Interrupted(click.ClickException):
    """Ctrl-C or SIGTERM stopped a train or a sweep once its runs were ended (and a sweep's trials queued): one
    line, and the exit status of a process ended by that signal (128 + its number), as a shell reports one."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

    @classmethod
    def by(cls, exc: KeyboardInterrupt, message: str) -> Interrupted:
        """The line for the signal behind `exc` (signals.terminal_status records which; Ctrl-C otherwise)."""
        return cls(message, getattr(exc, "signum", signal.SIGINT))


def interrupted_at_start(exc: KeyboardInterrupt) -> Interrupted:
    """Ctrl-C or SIGTERM while a command starts (imports its stages, checks its input and stores): as any other
    stop, one line and the signal's exit status (not click's "Aborted!" and 1). Nothing was started, except
    inside `mlflow run`, whose run then ends KILLED, as a run stopped later does."""
    if end_project_run("KILLED", STOP_REASON_TAG, "interrupted (Ctrl-C or SIGTERM) as the command started"):
        what = f"run {os.environ['MLFLOW_RUN_ID']} ended KILLED"
    else:
        what = "before any run was started"
    return Interrupted.by(exc, f"interrupted: as the command started (checking its input and stores), {what}")


class OutageStop(click.ClickException):
    """A store stopped answering mid-run: one line on stderr; exit code 75 (EX_TEMPFAIL): run it again."""
    exit_code = EXIT_OUTAGE


def searched_here(ctx, param, value):
    """A callback for optimize's hidden --l1 and --l2: what they would fix is what optimize searches."""
    if value is not None:
        raise click.BadParameter(f"optimize searches {param.name}: give its range (--{param.name}-range LOW HIGH) "
                                 f"or values (--grid \"{param.name}=0,{value}\"); `regsweep train --{param.name} "
                                 f"{value}` trains one value", ctx=ctx, param=param)


def name_check(library: str, kind: str, most: int):
    """A callback for a name option: a name the library would refuse (over `most` characters) or that would quietly
    stand for the default (empty, a typo) is refused here, before the stores are opened."""
    def check(ctx, param, value):
        if value is not None and not value.strip():
            raise click.BadParameter(f"the {library} {kind} name is empty", ctx=ctx, param=param)
        if value is not None and len(value) > most:
            raise click.BadParameter(f"{library} takes {kind} names of at most {most} characters, not {len(value)}",
                                     ctx=ctx, param=param)
        return value

    return check


check_experiment_name = name_check("MLflow", "experiment", 500)
check_study_name = name_check("Optuna", "study", 512)  # the length of its storages' name column


def a_number(ctx, param, value):
    """A callback for seconds given as FloatRange, which lets NaN through (every comparison being false)."""
    if value is not None and value != value:
        raise click.BadParameter("nan is not a number of seconds", ctx=ctx, param=param)
    return value


def tracking_timeout_option(command):
    # A setting of how runs are tracked, not of what is trained: it is not a TrainConfig field, so it is
    # neither logged as a param nor part of what makes two sweep trials the same configuration.
    from .outage import MAX_TIMEOUT

    return click.option(
        "--tracking-timeout", type=click.FloatRange(min=1, max=MAX_TIMEOUT), default=120, show_default=True,
        callback=a_number,
        help="Seconds an MLflow tracking server may be unreachable: a shorter outage is ridden out (metrics "
             "are buffered, nothing is lost); a longer one stops the command with exit code 75.")(command)


def stop_for_outage(exc, consequence: str) -> None:
    """One line: what is unreachable, what happens to the work, the command that resumes it."""
    from .outage import command_line, exit_now

    line = f"{exc}; stopped. {consequence} Run again with: {command_line()}"
    if exc.tracking:
        exit_now(f"Error: {line}")
    raise OutageStop(line)


class Cli(click.Group):
    def invoke(self, ctx):
        args = list(ctx.args)  # the command's; click empties ctx.args as it hands them on
        # Ctrl-C and SIGTERM raise KeyboardInterrupt from the moment the command is invoked (signals.py): `mlflow
        # run` has made its run before `regsweep train` has even imported MLflow (seconds), and a stop then must
        # end that run KILLED, not leave it RUNNING. The handlers below run under the same policy: a second
        # signal (`mlflow run` sends a SIGTERM after the terminal's Ctrl-C) does not cut them short.
        with terminal_status():
            try:
                return super().invoke(ctx)
            except click.UsageError as exc:
                exc.ctx = None  # one line ("Error: ..."), not a usage block
                mark_project_run_failed(exc.format_message())  # an option click refused, e.g. `-P model=resnet`
                raise
            except click.exceptions.Exit as exc:
                # `mlflow run . -P help=x` passes `--help x` on: the options are printed, nothing trains, and
                # MLflow would end its run FINISHED, empty. Said on that run, which then ends FAILED.
                if exc.exit_code == 0 and os.environ.get("MLFLOW_RUN_ID") and "--help" in args:
                    message = ("-P help is no parameter of this project: `mlflow run` passed it on as --help, "
                               "which only lists the options (the parameters are in MLproject)")
                    if mark_project_run_failed(message):
                        raise UsageFailure(message) from None
                raise
            except KeyboardInterrupt as exc:
                if DONE in ctx.meta:  # the work was done, and said so, before the signal came
                    raise Interrupted.by(exc, f"interrupted after {ctx.meta[DONE]}") from None
                # train and optimize turn every stop from their first run on into a line of their own: one that
                # reaches here came as they started (importing torch and MLflow takes seconds), before any run.
                if ctx.invoked_subcommand in ("train", "optimize"):
                    raise interrupted_at_start(exc) from None
                raise Interrupted.by(exc, "interrupted") from None  # the exit status of a process the signal ended


class WholeNumber(click.ParamType):
    """An integer, also when written as a float with nothing after the point: MLproject files have no integer
    type, so `mlflow run . -P epochs=2.0` passes MLflow's check of a float parameter and arrives here."""
    name = "integer"

    def convert(self, value, param, ctx):
        import decimal

        if isinstance(value, int):
            return value
        try:  # exactly, as written: through a float, 12345678901234567.0 would become ...568
            number = decimal.Decimal(str(value).strip())
        except decimal.InvalidOperation:
            self.fail(f"{value!r} is not a valid integer", param, ctx)
        # Bounded first: 1e100000000 would overflow decimal's arithmetic or take minutes to expand, and past 4,300
        # digits Python refuses to print an int (in the params, in an error message). No setting needs 10**30.
        if number.is_finite() and number.adjusted() >= 30:
            self.fail(f"{value!r} is too large (whole numbers here are below 10**30)", param, ctx)
        if not number.is_finite() or number != number.to_integral_value():
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return int(number)


def config_options(exclude: tuple[str, ...] = (), **defaults):
    """Add one click option per TrainConfig field, types and defaults taken from the dataclass
    (`defaults` overrides some, `exclude` leaves fields out)."""
    def decorate(command):
        for f in reversed(dataclasses.fields(TrainConfig)):
            if f.name in exclude:
                continue
            kind = {float: click.FLOAT, int: WholeNumber(), bool: click.BOOL}.get(type(f.default), click.STRING)
            if f.name in CHOICES:
                kind = click.Choice(CHOICES[f.name])
            flag = "--" + f.name.replace("_", "-")
            # data_dir's default is "" (the repository's data/, which its help names): nothing to show.
            command = click.option(flag, f.name, type=kind, default=defaults.get(f.name, f.default),
                                   show_default=f.name != "data_dir", help=HELP[f.name])(command)
        return command
    return decorate


def build_config(fields: dict) -> TrainConfig:
    try:
        cfg = TrainConfig(**fields).validate()
        return cfg.replace(data_dir=cfg.resolved_data_dir())
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


@click.group(cls=Cli)
@click.version_option(package_name="regsweep")
def cli():
    """regsweep: what L1/L2 regularisation does to a small MNIST network, tracked in MLflow."""


@cli.command()
@config_options()
@click.option("--experiment-name", envvar="MLFLOW_EXPERIMENT_NAME", callback=check_experiment_name, default=None,
              help="MLflow experiment for the run (ignored inside `mlflow run`, which has made the run).")
@tracking_timeout_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(experiment_name, tracking_timeout, quiet, **fields):
    """Train one configuration on MNIST and log it to MLflow.

    Logs the config as params; per epoch (step=epoch) train/val/test loss and accuracy, learning rate,
    penalty values, speed and per-layer weight statistics; at the end the summary (best_val_acc and the test
    accuracy at that epoch), per-class precision/recall/F1, figures and the model. The tracking location is
    MLFLOW_TRACKING_URI (MLflow's default: sqlite:///mlflow.db). Inside `mlflow run` it logs into the run
    MLflow created.
    """
    from .outage import mlflow_http_settings, parent_is_mlflow_run, when_parent_gone

    if os.environ.get("MLFLOW_RUN_ID") and parent_is_mlflow_run():
        # `mlflow run` stops its command on Ctrl-C, but dies of a SIGTERM (`timeout`, a job scheduler) without
        # telling it: training would go on, orphaned. Its going stops this command as a SIGTERM does, from the
        # start (the imports take seconds).
        when_parent_gone(lambda: os.kill(os.getpid(), signal.SIGTERM))
    with mlflow_http_settings(tracking_timeout):
        train_one(fields, experiment_name, tracking_timeout, quiet)


def train_one(fields: dict, experiment_name: str | None, tracking_timeout: float, quiet: bool) -> None:
    from mlflow.tracking import MlflowClient

    from .data import DataError, load_for
    from .outage import TrackingOutage, end_orphaned_runs, tracking_watch
    from .experiment import (TrackingError, check_artifact_location, check_experiment, check_run_to_resume,
                             check_tracking_uri, use_experiment, viewing_hint)
    from .tracking import enable_prompt_flushes, run_training
    from .training import DivergedError

    try:
        cfg = build_config(fields)
        data = load_for(cfg)
        check_tracking_uri()
        check_run_to_resume()
        if not os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run` the run, and its experiment, exist
            check_experiment(experiment_name)
        check_artifact_location(experiment_name, os.environ.get("MLFLOW_RUN_ID"))
        enable_prompt_flushes()
    except (UsageFailure, DataError, TrackingError) as exc:
        mark_project_run_failed(str(exc))
        raise UsageFailure(str(exc).removeprefix("Error: ")) from None
    except KeyboardInterrupt as exc:
        raise interrupted_at_start(exc) from None

    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    show_progress = not quiet and sys.stderr.isatty()
    try:
        with tracking_watch(tracking_timeout):
            experiment_id = None
            if experiment_name and not os.environ.get("MLFLOW_RUN_ID"):
                experiment_id = use_experiment(experiment_name)
            end_orphaned_runs(run_experiment_id(experiment_id))  # runs an earlier outage left RUNNING
            run_id, result = run_training(cfg, data, experiment_id=experiment_id, show_progress=show_progress)
    except TrackingOutage as exc:
        stop_for_outage(exc, "The run stays RUNNING until the store answers again: the next regsweep train "
                             "or optimize against this experiment ends it KILLED.")
    except DivergedError as exc:  # the run ended FAILED with the reason: one line says it, not a traceback
        import mlflow

        raise click.ClickException(f"training diverged: {exc}; run {mlflow.last_active_run().info.run_id} "
                                   "ended FAILED. A smaller lr or penalty may train.") from None
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (signals.terminal_status)
        if hasattr(exc, "run_status"):  # mlflow_run says which run, and how it ended
            what = f"run {exc.run_id} ended {exc.run_status}"
        elif end_project_run("KILLED", STOP_REASON_TAG, "interrupted (Ctrl-C or SIGTERM)"):  # before it resumed it
            what = f"run {os.environ['MLFLOW_RUN_ID']} ended KILLED"
        else:
            what = "no run was started"
        raise Interrupted.by(exc, f"interrupted: {what}") from None
    click.get_current_context().meta[DONE] = f"run {run_id} ended FINISHED"
    s = result.summary
    click.echo(f"run {run_id}: best val acc {100 * s['best_val_acc']:.2f}% at epoch {s['best_val_epoch']}, "
               f"test acc there {100 * s['test_acc_at_best_val']:.2f}% ({s['total_train_seconds']:.0f}s)")
    click.echo(viewing_hint(MlflowClient().get_run(run_id).info.experiment_id, run_id))


@cli.command()
@click.option("--trials", type=click.IntRange(min=1), default=30, show_default=True,
              help="Finished (complete or pruned) trials the study should have; a rerun tops up to this.")
@click.option("--study-name", default=None, callback=check_study_name,
              help="Optuna study name [default: the experiment name].")
@click.option("--storage", default="sqlite:///optuna.db", show_default=True,
              help="Optuna storage: sqlite:///FILE, postgresql://USER:PASSWORD@HOST/DB, or journal:FILE.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="tpe, random or grid [default: grid with --grid, else tpe].")
@click.option("--pruner", type=click.Choice(PRUNERS), default="median", show_default=True,
              help="Stops trials whose validation accuracy lags: median, hyperband or none.")
@click.option("--l1-range", type=(float, float), default=(1e-6, 1e-2), show_default=True,
              help="LOW HIGH of the log-uniform L1 coefficient.")
@click.option("--l2-range", type=(float, float), default=(1e-6, 1e-2), show_default=True,
              help="LOW HIGH of the log-uniform L2 coefficient.")
@click.option("--l1-zero/--no-l1-zero", default=True, show_default=True,
              help="Whether 'L1 off' is a candidate besides the log-uniform range.")
@click.option("--l2-zero/--no-l2-zero", default=True, show_default=True,
              help="Whether 'L2 off' is a candidate besides the log-uniform range.")
@click.option("--grid", default=None, help="Exact grid instead of ranges, e.g. \"l1=0,0.001 l2=0,0.0005\" "
              "(the four classic scenarios); --trials defaults to the grid's size.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Seeds per configuration (seed, seed+1, ...); the objective is their mean.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, callback=a_number,
              help="Stop starting new trials after this many seconds (per worker).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes on this machine sharing the study, each with cores/K torch threads.")
@click.option("--stack", default="auto", show_default=True,
              help="Trials trained at once as one stacked network (each with its own run and pruning): a "
                   "number, or auto = 32 on CUDA, 1 on the CPU; at most --trials.")
@click.option("--completion-workers", type=click.IntRange(min=0), default=None,
              help="With --stack > 1: processes that complete the members' runs (figures, tables, model) side "
                   "by side, each as its member leaves the stack; 0 = in the training process. Default: one per "
                   "member up to the spare cores on CUDA, 0 on the CPU (where training needs the cores).")
@click.option("--refill/--no-refill", default=None,
              help="With --stack > 1: a slot that a pruned or finished member frees takes the next trial, so "
                   "the stack keeps its size (SGD only); else the stack shrinks to the members still training "
                   "(a compiled step's stack keeps their slots, idle). "
                   "Default: on CUDA, where a full stack costs less per member, and with a compiled step (the "
                   "CPU's default), whose freed slots would idle; off with an eager CPU step (--compile false).")
# At most a day: past threading's longest wait (about 292 years) the heartbeat thread fails and a dead worker's
# trial is never noticed, and a day already leaves a dead worker's trial running for two.
@click.option("--heartbeat", type=click.IntRange(min=1, max=86400), default=60, show_default=True,
              help="Seconds between a running trial's liveness records (RDB storages); a trial silent for "
                   "twice this is failed and retried.")
@click.option("--experiment-name", envvar="MLFLOW_EXPERIMENT_NAME", callback=check_experiment_name, default="regsweep",
              show_default=True, help="MLflow experiment of the parent and trial runs.")
@tracking_timeout_option
@config_options(exclude=("l1", "l2"), log_model=False)
@click.option("--l1", hidden=True, expose_value=False, callback=searched_here)
@click.option("--l2", hidden=True, expose_value=False, callback=searched_here)
@click.pass_context
def optimize(ctx, trials, study_name, storage, sampler, pruner, l1_range, l2_range, l1_zero, l2_zero, grid,
             repeats, timeout, workers, stack, completion_workers, refill, heartbeat, experiment_name,
             tracking_timeout, **fields):
    """Search L1/L2 with Optuna; one MLflow parent run per study and one child run per trial.

    The objective is the trial's best validation accuracy (mean over --repeats seeds), reported every epoch
    so the pruner can stop weak trials; the test set is only reported. Every `regsweep train` option but
    --l1 and --l2 (searched: --l1-range, --l2-range, --grid) is accepted and fixed for all trials (--seed also
    seeds the sampler). Running the same command again
    resumes the study. When it ends, the parent run carries the best trial's values, a best_run_id tag and
    the study's plots.
    """
    from .data import DataError, load_raw
    from .sweep import (SearchSpace, SweepSettings, WorkerFailure, check_parent, check_resumable, optimize as run_study,
                        parse_grid, same_name_elsewhere, stack_size)
    from .experiment import (TrackingError, check_artifact_location, check_experiment, check_tracking_uri,
                             viewing_hint)
    from .tracking import enable_prompt_flushes

    try:
        base = build_config(fields)
        # An empty --grid "" is refused by parse_grid, not taken for no grid.
        space = SearchSpace(l1_range, l2_range, l1_zero, l2_zero, {} if grid is None else parse_grid(grid)).validate()
        if grid and ctx.get_parameter_source("trials") == click.core.ParameterSource.DEFAULT:
            trials = space.grid_size()  # the whole grid, each configuration once
        if stack != "auto" and not (re.fullmatch(r"[0-9]+", stack) and int(stack) >= 1):
            raise ConfigError(f"--stack must be auto or a whole number >= 1, got {stack!r}")
        members = stack_size(None if stack == "auto" else int(stack), trials, base.resolved_device())
        settings = SweepSettings(base=base, space=space, trials=trials, study_name=study_name or experiment_name,
                                 storage=storage, experiment_name=experiment_name,
                                 sampler=sampler or ("grid" if grid else "tpe"), pruner=pruner, repeats=repeats,
                                 timeout=timeout, heartbeat=heartbeat, workers=workers, stack=members,
                                 completion_workers=completion_workers, refill=refill,
                                 tracking_timeout=tracking_timeout).validate()
        if stack != "auto" and members < int(stack):
            click.echo(f"note: --stack {stack} is more than the {trials} trials; stacking {members}", err=True)
        load_raw(base.resolved_data_dir(), base.download)  # readable, before a study or run exists
        study, settings = check_resumable(settings)  # a bad URL, an unreachable database or a clashing space fails
        check_tracking_uri()
        check_experiment(experiment_name)
        check_parent(settings, study)
        others = same_name_elsewhere(settings) if study is None else []
        check_artifact_location(experiment_name)  # last: it makes the location's folder, where one is missing
        enable_prompt_flushes()
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    except (UsageFailure, DataError, TrackingError) as exc:
        raise UsageFailure(str(exc).removeprefix("Error: ")) from None
    except Exception as exc:  # noqa: BLE001 - e.g. SQLAlchemy errors for an unreachable database
        raise UsageFailure(f"cannot open Optuna storage: {str(exc).splitlines()[0]}") from None
    except KeyboardInterrupt as exc:
        raise interrupted_at_start(exc) from None
    for run_id, kept_in in others:
        here = f"sqlite:///{Path(storage[10:]).resolve()}" if storage.startswith("sqlite:///") else redact(storage)
        click.echo(f"note: a new study {settings.study_name!r} in {here}, while experiment {experiment_name!r} has "
                   f"one of that name under parent run {run_id} (storage {kept_in}, as given): to resume that one, "
                   "give its --storage (a relative sqlite:/// path from the folder it was given in)", err=True)

    from .outage import Outage, mlflow_http_settings

    try:
        with mlflow_http_settings(tracking_timeout):
            summary = run_study(settings)
    except Outage as exc:
        which = f"Trial {exc.trial_number}" if exc.trial_number is not None else "The interrupted trial"
        if exc.tracking:
            consequence = (f"{which} is failed and queued again: it runs again on resume, and its MLflow run is "
                           "ended KILLED then.")
        else:
            consequence = (f"{which} is failed and queued again on the next start (the storage could not be "
                           "told now), and runs again.")
        stop_for_outage(exc, consequence)
    except WorkerFailure as exc:  # exit 1; the parent run ended FAILED or KILLED
        from .outage import command_line

        raise click.ClickException(f"{exc}; the other workers finished their trials. Run again with: "
                                   f"{command_line()}") from None
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (signals.terminal_status), after the runs ended KILLED
        from .outage import command_line

        # `when`: no trial was stopped (the signal was held until it was told, or until the study was finished)
        parent = getattr(exc, "parent_status", "KILLED")  # None: there was no parent run yet
        what = (f"{exc.when}{f'; the parent run ended {parent}' if parent else ''}" if hasattr(exc, "when")
                else "the runs in progress ended KILLED and their trials are queued again")
        raise Interrupted.by(exc, f"interrupted: {what}. Run again with: {command_line()}") from None
    click.get_current_context().meta[DONE] = f"study {settings.study_name} was finished"
    counts = summary["counts"]
    surplus = f" ({summary['surplus']} over --trials, not trained)" if summary.get("surplus") else ""
    diverged = f" ({summary['diverged']} of them diverged)" if summary.get("diverged") else ""
    click.echo(f"study {settings.study_name}: {counts['complete']} complete, {counts['pruned']} pruned{diverged}, "
               f"{counts['fail']} failed{surplus}; parent run {summary['parent_run_id']}")
    if "best_value" in summary:
        click.echo(f"best trial {summary['best_trial']}: val acc {100 * summary['best_value']:.2f}% with "
                   f"l1={fmt_coef(summary['best_l1'])} l2={fmt_coef(summary['best_l2'])} "
                   f"(run {summary['best_run_id']})")
    else:
        why = (f"; {summary['diverged']} diverged (e.g. {summary['diverged_example']}): a smaller --lr or "
               f"penalty range may train" if summary.get("diverged") else "")
        click.echo(f"no trial completed, so there is no best trial{why}")
    click.echo(viewing_hint(summary["experiment_id"]))


@cli.command()
@click.option("--experiment-name", envvar="MLFLOW_EXPERIMENT_NAME", callback=check_experiment_name, default="regsweep",
              show_default=True, help="MLflow experiment to read (and of --study-name).")
@click.option("--study-name", default=None, callback=check_study_name, help="Report a study's runs: the trials "
              "under its parent run, repeats grouped under their trial.")
@click.option("--parent-run-id", default=None, help="Report the runs under this run (a study's parent run).")
@click.option("--filter", "filter_string", default=None,
              help="MLflow search filter narrowing the runs, e.g. \"params.model = 'cnn'\".")
@click.option("--runs", default=None, help="Report exactly these runs: ID,ID,...")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the report [default: reports/<study or experiment>/, or <run name>_<id8>/ for "
                   "--parent-run-id of a run other than a study's].")
@click.option("--log-to-mlflow/--no-log-to-mlflow", default=True, show_default=True,
              help="Also log the report's files under report/ of the study's parent run, or of a new run "
                   "'report <experiment>' tagged regsweep.kind=report.")
@click.option("--baseline", default=None, help="The configuration to compare against, by its settings, e.g. "
              "\"l1=0 l2=0 norm=bn\" [default: l1 = l2 = 0 with otherwise the same settings].")
@click.option("--format", "fmt", type=click.Choice(REPORT_FORMATS), default="table", show_default=True,
              help="How the tables are printed (the files hold CSV, Markdown and JSON in any case).")
@click.option("--include-unfinished", is_flag=True,
              help="Draw the curves of failed, killed and running runs (never in the statistics).")
def report(experiment_name, study_name, parent_run_id, filter_string, runs, out, log_to_mlflow, baseline, fmt,
           include_unfinished):
    """Compare runs: which regularisation, and is the difference real?

    Groups the selected runs into configurations (every setting except the seed; n = seeds) and writes, to
    --out: a table per configuration (best validation accuracy and the test accuracy at that epoch, mean ±
    sd and 95% CI, and the course notebooks' summary, labelled as such), a verdict per configuration against
    the baseline (difference, 95% CI, p-value of a paired t-test over matching seeds or Welch's test, or an
    exact permutation test where the seeds show no spread, and better / worse / not distinguishable at 0.05 on
    the p-values adjusted for the table's comparisons by Benjamini-Hochberg; "one seed: no verdict" below two
    seeds), eight figures and report.md. Failed, killed and running runs are counted, not used.
    """
    from .report import ReportError, Selection, make_report
    from .report.command import left_out_line, no_verdicts, people_tables, shared_batches_note
    from .report.tables import render
    from .experiment import TrackingError, check_tracking_uri

    try:
        check_tracking_uri(existing=True)
        ids = tuple(i.strip() for i in runs.split(",") if i.strip()) if runs is not None else ()
        if runs is not None and not ids:
            raise ReportError("--runs needs run ids: ID,ID,...")
        selection = Selection(experiment_name, study_name, parent_run_id, filter_string, ids).check()
        analysis, folder, logged = make_report(selection, out, baseline, include_unfinished, log_to_mlflow)
    except (ReportError, TrackingError) as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt as exc:
        if not hasattr(exc, "killed_run"):
            raise
        raise Interrupted.by(exc, f"interrupted: report run {exc.killed_run} ended KILLED") from None
    click.echo(render(people_tables(analysis), fmt))
    # CSV and JSON go to a pipe as they are: what is said about them goes to stderr.
    said = fmt in ("csv", "json")
    click.echo(f"Runs: {analysis.fetched.description}. {left_out_line(analysis)}.", err=said)
    if analysis.verdicts.empty:
        click.echo(no_verdicts(analysis), err=said)
    shared = shared_batches_note(analysis)
    if shared:
        click.echo(shared, err=said)
    where = f"; logged under report/ of run {logged}" if logged else ""
    click.echo(f"report: {folder / 'report.md'} ({len(analysis.figures)} figures){where}", err=said)


def run_experiment_id(experiment_id: str | None) -> str:
    """The experiment `regsweep train` logs into: the chosen one, `mlflow run`'s run's, or MLflow's active one."""
    import mlflow

    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    return experiment_id or mlflow.tracking.fluent._get_experiment_id()


def mark_project_run_failed(message: str) -> bool:
    """Inside `mlflow run` the run exists before we can check input: say on it why it failed (`mlflow run` ends
    it FAILED on the exit code). Returns whether there was such a run."""
    return end_project_run(None, "regsweep.error", message)


def end_project_run(status: str | None, tag: str, message: str) -> bool:
    """Tag the run `mlflow run` made for this command with why it stops, and end it as `status` (None: leave
    that to `mlflow run`). Returns whether there was such a run, not yet trained by regsweep.

    A signal that stopped the command as it imported MLflow (or its database layer) leaves those modules half
    made in this process, and every use of them fails: a run to be ended is then ended from a fresh
    interpreter. (A run only to be tagged, after bad input, is not worth that: the exit code still tells.)"""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return False
    try:
        return tell_project_run(run_id, status or "", tag, message)
    except Exception:  # noqa: BLE001 - a module cut short, or the store itself
        if not status:
            return False
    import subprocess

    # MLflow's own retries of an unreachable server would take minutes: one try, bounded, over the settings the
    # command made for its training (mlflow_http_settings, from --tracking-timeout) and whatever the user set.
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    script = ("import sys; from regsweep.cli import tell_project_run; "
              "sys.exit(0 if tell_project_run(*sys.argv[1:]) else 3)")
    try:
        return subprocess.run([sys.executable, "-c", script, run_id, status, tag, message], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tell_project_run(run_id: str, status: str, tag: str, message: str) -> bool:
    """end_project_run's work, here or in a fresh interpreter (status '': only the tag)."""
    from mlflow.tracking import MlflowClient

    from .experiment import not_this_commands_run
    client = MlflowClient()
    if not_this_commands_run(client.get_run(run_id)):  # a leftover id, or another's run
        return False
    client.set_tag(run_id, tag, message)
    if status:
        client.set_terminated(run_id, status)
    return True


def main():
    cli(prog_name="regsweep")


if __name__ == "__main__":
    sys.exit(main())
