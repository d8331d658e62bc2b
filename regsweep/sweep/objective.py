"""One trial: suggest -> train (one child run per seed) -> report each epoch -> prune or return the mean.

A configuration is trained once per study: a trial whose configuration equals a finished trial's takes
that trial's result (Optuna's FAQ recipe for duplicated samples) in a run tagged `regsweep.reused_run`.
A trial stopped by Ctrl-C, SIGTERM or an unreachable store is failed and queued again. A trial that parallel
workers asked beyond `--trials` is failed before it suggests anything (Surplus).
"""

from __future__ import annotations

import hashlib
import json
import statistics

import optuna
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ..models import count_parameters
from ..outage import STOP_REASON_TAG, TAG_LIMIT, Outage
from ..signals import signals_held
from ..training import DIVERGED, DivergedError, new_model
from .runs import (STUDY_TAG, coefficients, create_run, create_trial_run, log_trial_run, prune_reason, report_step,
                   seed_config, seed_run_name, summarise_repeats, trial_run_name)
from .space import prunable, suggest_penalties
from .study import (DIVERGED_ATTR, FINISHED, SweepSettings, claim, deciding_settings, queue_retry, seed_sampler,
                    storage_errors)


def configuration_key(settings: SweepSettings, penalties: dict[str, float]) -> str:
    """What decides a trial's result (study.deciding_settings: l1, l2, the seeds and every fixed setting that
    changes what is learned), as a short hash. Trials of machines that share a study with their own --seed
    are told apart by it."""
    fields = deciding_settings(settings, settings.base.replace(**penalties))
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_twin(trials: list[optuna.trial.FrozenTrial], key: str, number: int) -> optuna.trial.FrozenTrial | None:
    """The first finished trial that trained configuration `key` (a reuse points at it, so is skipped)."""
    for t in trials:
        if (t.number != number and t.state in FINISHED and t.user_attrs.get("config_key") == key
                and "reused_trial" not in t.user_attrs):
            return t
    return None


class Surplus(Exception):
    """A trial asked when the study already had its `--trials`: it is failed untrained (fail_kind "surplus")."""


def check_not_surplus(settings: SweepSettings, trial: optuna.Trial, me: optuna.trial.FrozenTrial,
                      trials: list[optuna.trial.FrozenTrial]) -> None:
    """Parallel workers (or stacks) that see the study one trial short at the same moment each ask one. The
    storage numbers them, so a later one knows it is over `--trials` from the trials numbered before it that
    count (finished, running, or queued to run): it says why and raises before anything is suggested or logged.
    A queued trial (a retry, or one given with enqueue_trial) was asked for on purpose and always runs; but not the
    retry of a trial stopped before it suggested anything, which may itself have been a surplus (its dead worker
    asked it in such a race): it is checked as the trial it stands in for would have been."""
    if "fixed_params" in me.system_attrs or ("retry_history" in me.system_attrs and me.params):
        return
    before = sum(t.number < trial.number and t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
                 for t in trials)
    if before >= settings.trials:
        reason = (f"not trained: the study had its {settings.trials} trials when this one was asked "
                  f"(parallel workers asked at once)")
        trial.set_user_attr("fail_kind", "surplus")
        trial.set_user_attr("fail_reason", reason)
        if "grid_id" in me.system_attrs:
            # GridSampler gave this trial a grid point as it was asked and counts the point visited once the trial
            # is finished, FAIL included, where the trial's "search_space" attribute is the grid's: a resume with
            # more --trials would never train it. Another search space releases the point.
            trial.study._storage.set_trial_system_attr(trial._trial_id, "search_space", {"released": ["surplus"]})
        raise Surplus(reason)


def prepare_trial(settings: SweepSettings, trial: optuna.Trial):
    """Suggest the trial's coefficients, record its worker and configuration, and find a finished twin.
    Returns (penalties, twin or None, the tags its runs start with: a retry names the trial it repeats).
    Raises Surplus for a trial beyond `--trials`."""
    trials = trial.study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == trial.number)
    if "worker" not in me.user_attrs:  # asked by study.optimize; a stacked sweep claims its trials as it asks
        claim(trial)
    check_not_surplus(settings, trial, me, trials)
    # A queued trial (a retry, or enqueue_trial) has its switches decided already; they are kept.
    decided = {**me.system_attrs.get("fixed_params", {}), **me.params}
    baseline = configuration_key(settings, {"l1": 0.0, "l2": 0.0})
    both_off_taken = "l2_on" not in decided and any(
        t.user_attrs.get("config_key") == baseline and t.state in (*FINISHED, TrialState.RUNNING)
        for t in trials if t.number != trial.number)
    seed_sampler(trial.study, settings, trial)
    penalties = suggest_penalties(trial, settings.space, both_off_taken)
    key = configuration_key(settings, penalties)
    trial.set_user_attr("config_key", key)
    tags = {"optuna.trial_number": str(trial.number), STUDY_TAG: settings.study_name, "optuna.state": "RUNNING"}
    history = me.system_attrs.get("retry_history", [])
    if history:
        tags["optuna.retry_of_trial"] = str(history[-1])
    return penalties, finished_twin(trials, key, trial.number), tags


def reuse_twin(settings: SweepSettings, trial: optuna.Trial, twin: optuna.trial.FrozenTrial,
               penalties: dict[str, float], tags: dict[str, str], parent_run_id: str, experiment_id: str) -> float:
    """The same configuration as `twin`: its result, without training. The trial keeps one child run,
    tagged with the run that trained it, with the configuration as params and no results of its own (of the
    metrics, only the coefficients: tracking.coefficient_metrics). Raises
    TrialPruned where the twin was pruned."""
    client = MlflowClient()
    source = (twin.user_attrs.get("mlflow_run_ids") or [""])[0]
    with storage_errors(settings.storage):
        for step, value in sorted(twin.intermediate_values.items()):
            trial.report(value, step)  # the same curve, for the pruner and the study plots
        trial.set_user_attr("reused_trial", twin.number)
        if DIVERGED_ATTR in twin.user_attrs:
            trial.set_user_attr(DIVERGED_ATTR, twin.user_attrs[DIVERGED_ATTR])
    note = (f"same configuration as trial {twin.number} ({twin.state.name}): its result is reused, "
            f"not trained again (run {source})")
    cfg = settings.base.replace(**penalties)
    run = create_run(client, experiment_id, trial_run_name(trial.number, penalties), {
        **tags, "mlflow.parentRunId": parent_run_id, "regime": cfg.regime, "optuna.state": twin.state.name,
        "regsweep.reused_run": source, "regsweep.reused_trial": str(twin.number),
        STOP_REASON_TAG: note, "mlflow.note.content": note})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in cfg.as_params().items()],
                     metrics=coefficients(cfg))
    with storage_errors(settings.storage):
        trial.set_user_attr("mlflow_run_ids", [run.info.run_id])
    client.set_terminated(run.info.run_id, "FINISHED")
    if twin.state == TrialState.PRUNED:
        raise optuna.TrialPruned(note)
    return twin.value


class Objective:
    """suggest -> train (one child run per seed) -> report each epoch -> prune or return the mean."""

    def __init__(self, settings: SweepSettings, data, parent_run_id: str, experiment_id: str):
        self.settings, self.data = settings, data
        self.parent_run_id, self.experiment_id = parent_run_id, experiment_id
        self.held: KeyboardInterrupt | None = None  # a signal held as a trial's runs ended, raised once it is told

    def raise_held(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A study.optimize callback (after the trial is told): the signal held while the trial's runs ended, if
        the trial had trained to its end. It stops the sweep now, with the trial counted, not retrained."""
        if self.held is not None:
            interrupt, self.held = self.held, None
            interrupt.when = f"after trial {trial.number}, which had trained to its end and is {trial.state.name}"
            raise interrupt

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            with storage_errors(self.settings.storage):
                penalties, twin, tags = prepare_trial(self.settings, trial)
            if twin is not None:
                return reuse_twin(self.settings, trial, twin, penalties, tags, self.parent_run_id,
                                  self.experiment_id)
            return self.train(trial, penalties, tags)
        except Outage as exc:
            exc.trial_number = trial.number
            if exc.tracking:  # the Optuna storage answers: fail the trial now and queue it again
                fail_for_retry(trial, str(exc), "outage", tell=True)
            # With the storage down nothing can be recorded: the next start fails the trial (its worker is
            # gone) and queues it again.
            raise
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: queue the same parameters, so that resuming the study re-runs this trial.
            fail_for_retry(trial, "interrupted (Ctrl-C or SIGTERM)", "interrupted", tell=False)
            raise

    def train(self, trial: optuna.Trial, penalties: dict[str, float], tags: dict[str, str]) -> float:
        from ..tracking import run_training  # looked up per call: a test replaces tracking.run_training

        settings = self.settings
        name = trial_run_name(trial.number, penalties)
        client = MlflowClient()
        # With repeats, the trial is a run of its own and each seed a child of it.
        trial_run = (create_trial_run(client, self.experiment_id, self.parent_run_id, name, tags, penalties)
                     if settings.repeats > 1 else None)
        run_ids = [trial_run] if trial_run else []
        best_vals, state, reason, tracker_down, killed = [], "COMPLETE", "", False, False
        try:
            if trial_run is not None:  # in here, so that the run ends however this fails
                log_trial_run(client, trial_run, settings, penalties, count_parameters(new_model(settings.base)),
                              self.data)
            for r in range(settings.repeats):
                cfg = seed_config(settings, penalties, r)

                def report(epoch: int, metrics: dict[str, float], r=r, cfg=cfg) -> str | None:
                    with storage_errors(settings.storage):
                        trial.report(metrics["val/acc"], report_step(r, epoch, cfg.epochs))
                        prune = prunable(epoch, cfg.epochs, r == settings.repeats - 1) and trial.should_prune()
                    return prune_reason(settings.pruner, epoch, metrics["val/acc"]) if prune else None

                run = create_run(client, self.experiment_id, seed_run_name(name, cfg, settings.repeats),
                                 {**tags, "mlflow.parentRunId": trial_run or self.parent_run_id})
                run_ids.append(run.info.run_id)
                with storage_errors(settings.storage):
                    trial.set_user_attr("mlflow_run_ids", run_ids)  # lets a later process end them if we die
                try:
                    _, result = run_training(cfg, self.data, run_id=run.info.run_id, on_epoch=report)
                except KeyboardInterrupt as exc:
                    # The signal came as the seed's outcome was logged, and waited for it: the run ended FINISHED,
                    # complete. On the trial's last seed, or one the pruner stopped, the trial is over too: it is
                    # told first, and the signal stops the sweep after (raise_held), rather than failing a trial
                    # that trained to its end and training it again on resume.
                    result = getattr(exc, "result", None)
                    if result is None or not (r == settings.repeats - 1 or result.stop_reason.startswith("pruned")):
                        raise
                    self.held = exc
                except DivergedError as exc:
                    # Pruned, not failed: a diverging configuration is a (bad) result, and failed trials do
                    # not count towards --trials, so a region of divergence would keep the sweep going forever.
                    state, reason = "PRUNED", f"{DIVERGED}{exc}"
                    with storage_errors(settings.storage):
                        trial.set_user_attr(DIVERGED_ATTR, reason[:TAG_LIMIT])
                    raise optuna.TrialPruned(reason) from exc
                best_vals.append(result.summary["best_val_acc"])
                if result.stop_reason.startswith("pruned"):
                    state, reason = "PRUNED", result.stop_reason
                    raise optuna.TrialPruned(reason)
            return statistics.mean(best_vals)
        except optuna.TrialPruned:
            raise
        except Outage as exc:
            state, reason, tracker_down = "FAIL", f"{exc}; queued again for the next start", exc.tracking
            killed = True
            raise
        except KeyboardInterrupt:
            state, reason = "FAIL", "interrupted (Ctrl-C or SIGTERM); queued again for the next start"
            killed = True
            raise
        except BaseException as exc:
            state, reason = "FAIL", reason or f"{type(exc).__name__}: {exc}"
            mark_error(trial, reason)
            raise
        finally:
            if not tracker_down:  # an unreachable tracker is reconciled on the next start instead
                ended = False
                try:
                    with signals_held():
                        end_runs(client, run_ids, trial_run, best_vals, state, reason, killed)
                        ended = True
                except KeyboardInterrupt as exc:
                    if not ended:  # the signal came before the hold began: end them now (a second is ignored)
                        end_runs(client, run_ids, trial_run, best_vals, state, reason, killed)
                    if state == "FAIL":
                        raise
                    self.held = exc  # the trial is complete or pruned: told so first (raise_held)


def end_runs(client: MlflowClient, run_ids: list[str], trial_run: str | None, best_vals: list[float], state: str,
             reason: str, killed: bool) -> None:
    """A trial's runs, tagged with its state (the reason on the run that stopped), ended where they have not ended
    themselves. Called with signals held: the runs end tagged as the trial, however it stopped."""
    # The reason goes to the run that stopped (and the trial's own run), not to seeds done before.
    stopped = {run_ids[0], run_ids[-1]} if run_ids else set()
    for run_id in run_ids:
        client.set_tag(run_id, "optuna.state", state)
        if reason and run_id in stopped:
            client.set_tag(run_id, STOP_REASON_TAG, reason[:TAG_LIMIT])
    if trial_run is not None:
        summarise_repeats(client, trial_run, best_vals, state, killed)
    if state == "FAIL" and len(run_ids) > len(best_vals) + bool(trial_run):
        # A seed run that was created but stopped before its training began, or while it started its run, which
        # ends the run itself only from there on.
        end_if_running(client, run_ids[-1], "KILLED" if killed else "FAILED")


def end_if_running(client: MlflowClient, run_id: str, status: str) -> None:
    """End a run its own code never got to end (mlflow_run ends its run only once it has started it)."""
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


def mark_error(trial: optuna.Trial, reason: str) -> None:
    """Record that the trial failed on an error of its own: it is not retried, it would fail the same way."""
    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr("fail_kind", "error")


def fail_for_retry(trial: optuna.Trial, reason: str, kind: str, tell: bool) -> None:
    """Record why the trial stopped, queue its parameters again and (`tell`) fail it now. Best effort: if
    the storage fails here too, the next start finds the trial and queues it (study.requeue_interrupted)."""
    study = trial.study
    try:
        trial.set_user_attr("fail_kind", kind)
        trial.set_user_attr("fail_reason", f"{reason}; queued again for the next start")
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        queue_retry(study, frozen)
        if tell:
            study.tell(trial, state=TrialState.FAIL)
    except Exception:  # noqa: BLE001 - see the docstring
        pass
