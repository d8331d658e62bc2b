"""One trial: suggest -> train (one child run per seed) -> report each epoch -> prune or return the mean."""

from __future__ import annotations

import os
import socket
import statistics

import optuna
from mlflow.tracking import MlflowClient

from ..config import TrainConfig
from .runs import STUDY_TAG, summarise_repeats, trial_run_name
from .space import suggest_penalties
from .study import SweepSettings


class Objective:
    """suggest -> train (one child run per seed) -> report each epoch -> prune or return the mean."""

    def __init__(self, settings: SweepSettings, data, parent_run_id: str, experiment_id: str):
        self.settings, self.data = settings, data
        self.parent_run_id, self.experiment_id = parent_run_id, experiment_id

    def __call__(self, trial: optuna.Trial) -> float:
        from ..tracking import run_training
        from ..training import DivergedError

        settings = self.settings
        penalties = suggest_penalties(trial, settings.space)
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        name = trial_run_name(trial.number, penalties)
        client = MlflowClient()
        tags = {"optuna.trial_number": str(trial.number), STUDY_TAG: settings.study_name,
                "optuna.state": "RUNNING"}
        # A retried trial arrives with the user attributes of the one whose worker died.
        retried = trial.user_attrs.get("trial_number")
        if retried is not None:
            tags["optuna.retry_of_trial"] = str(retried)
        trial.set_user_attr("trial_number", trial.number)
        # With repeats, the trial is a run of its own and each seed a child of it.
        trial_run = None
        if settings.repeats > 1:
            trial_run = client.create_run(self.experiment_id, run_name=name, tags={
                **tags, "mlflow.parentRunId": self.parent_run_id, "regime": TrainConfig(**penalties).regime})
        run_ids = [trial_run.info.run_id] if trial_run else []
        best_vals, state, reason = [], "COMPLETE", ""
        try:
            for r in range(settings.repeats):
                cfg = settings.base.replace(**penalties, seed=settings.base.seed + r)
                offset = r * cfg.epochs  # repeats report on consecutive steps, the same layout in every trial

                def report(epoch: int, metrics: dict[str, float], offset=offset) -> str | None:
                    trial.report(metrics["val/acc"], offset + epoch)
                    if trial.should_prune():
                        return (f"pruned by {settings.pruner} pruner at epoch {epoch}: "
                                f"val/acc {metrics['val/acc']:.4f}")
                    return None

                run = client.create_run(
                    self.experiment_id, run_name=name if trial_run is None else f"{name} s{cfg.seed}",
                    tags={**tags, "mlflow.parentRunId": run_ids[0] if trial_run else self.parent_run_id})
                run_ids.append(run.info.run_id)
                trial.set_user_attr("mlflow_run_ids", run_ids)  # lets a later process end them if we die
                try:
                    _, result = run_training(cfg, self.data, run_id=run.info.run_id, on_epoch=report)
                except DivergedError as exc:
                    # Pruned, not failed: a diverging configuration is a (bad) result, and failed trials do
                    # not count towards --trials, so a region of divergence would keep the sweep going forever.
                    state, reason = "PRUNED", f"diverged: {exc}"
                    raise optuna.TrialPruned(reason) from exc
                best_vals.append(result.summary["best_val_acc"])
                if result.stop_reason.startswith("pruned"):
                    state, reason = "PRUNED", result.stop_reason
                    raise optuna.TrialPruned(reason)
            return statistics.mean(best_vals)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: queue the same parameters, so that resuming the study re-runs this trial.
            state, reason = "FAIL", "interrupted (Ctrl-C or SIGTERM); queued again for the next start"
            trial.study.enqueue_trial(trial.params, user_attrs={"trial_number": trial.number})
            raise
        except BaseException as exc:
            state, reason = "FAIL", reason or f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            raise
        finally:
            for run_id in run_ids:
                client.set_tag(run_id, "optuna.state", state)
                if reason:
                    client.set_tag(run_id, "regsweep.stop_reason", reason[:5000])
            if trial_run is not None:
                summarise_repeats(client, trial_run.info.run_id, best_vals, state)
