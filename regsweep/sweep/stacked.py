"""Stacked trials: Optuna asks K trials, they train together as the members of one network
(training.fit_stack), each member reports to its own trial every epoch, and each result is told back.

With repeats, every seed of a trial is a member too, so a 4-configuration x 5-seed grid is one stack of
20. All members of a stack see the same batches and rotations (drawn from the first member's seed; a
member's own seed sets its initialisation): the comparison between them is paired. A pruned member's
trial ends PRUNED with its curve and reason. Its slot, like that of a member that has trained its epochs,
takes the next asked trial while the stack trains on (on CUDA or with a compiled step, with SGD: `refills`;
training.fit_stack's refill); else, or once the study wants no more, the stack shrinks to the members still
training (a compiled stack keeps its shape, with idle slots). The members' runs are completed by worker
processes side by side on CUDA (completion.py), each as soon as its member leaves the stack; each trial is
told once its runs are complete.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import mlflow
import optuna
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ..config import TrainConfig
from ..models import count_parameters
from ..outage import STOP_REASON_TAG, TAG_LIMIT, WORKER_TAG, Outage, worker_id
from ..signals import signals_held
from ..tracking import device_tags, run_params
from ..training import FitResult, fit_stack, new_model
from .completion import Completer, worker_count
from .objective import Surplus, fail_for_retry, mark_error, prepare_trial, reuse_twin
from .runs import (coefficients, create_run, create_trial_run, log_trial_run, prune_reason, report_step, seed_config,
                   seed_run_name, summarise_repeats, trial_run_name)
from .space import prunable
from .study import DIVERGED_ATTR, Heartbeats, SweepSettings, claim, count_toward_trials, storage_errors


@dataclass
class StackedTrial:
    """One asked trial and the MLflow runs of its seeds (members of the stack)."""
    trial: optuna.Trial
    penalties: dict[str, float]
    trial_run_id: str | None = None  # with repeats: the trial's own run, parent of the seed runs
    run_ids: list[str] = field(default_factory=list)  # one per seed
    members: list[int] = field(default_factory=list)  # its seeds' numbers in the stack (fit_stack's order)
    pruned: str = ""  # the reason, once the pruner stopped it
    told: bool = False  # its outcome is in the study

    @property
    def all_run_ids(self) -> list[str]:
        return ([self.trial_run_id] if self.trial_run_id else []) + self.run_ids


def stack_size(requested: int | None, trials: int, device: str) -> int:
    """--stack: as asked (at most the trial count), or auto: 32 on CUDA, where stacking pays (docs/benchmarks.md),
    1 on the CPU, where members' arithmetic adds up and there is no launch overhead to amortise."""
    size = requested if requested else (32 if device == "cuda" else 1)
    return max(1, min(size, trials))


def run_stacked(settings: SweepSettings, study: optuna.Study, data, parent_run_id: str, experiment_id: str) -> None:
    """Take trials `settings.stack` at a time until the study has `settings.trials` finished ones (or, with a
    timeout, until a stack ends after it). Where it `refills`, a slot that a member frees takes the next trial
    while the stack trains on (training.fit_stack's refill), so one stack usually runs the whole sweep."""
    deadline = time.monotonic() + settings.timeout if settings.timeout else None
    workers = worker_count(settings.completion_workers, settings.stack * settings.repeats,
                           settings.base.resolved_device(), settings.workers)
    with ExitStack() as resources:
        completer = None  # started with the first stack: a study with nothing left to train spawns nothing
        while deadline is None or time.monotonic() < deadline:
            optuna.storages.fail_stale_trials(study)  # another worker's dead trials, as study.optimize does
            n = min(settings.stack, wanted(settings, study))
            if n <= 0:
                return
            completer = completer or resources.enter_context(Completer(data, settings.base, workers))
            with Heartbeats(study) as heartbeats:

                def ask(most: int) -> list[optuna.Trial] | None:
                    """Up to `most` trials for freed slots; None once the study wants no more or time is up."""
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
                    optuna.storages.fail_stale_trials(study)
                    if wanted(settings, study) <= 0:
                        return None
                    return ask_up_to(settings, study, heartbeats, most)

                trials = ask_up_to(settings, study, heartbeats, n)  # queued (retried) trials come first
                if not trials:  # other workers asked for the rest meanwhile
                    return
                # Refilling costs a little per step (per-member schedules): only where it may happen.
                refill = refills(settings) and (deadline is not None or wanted(settings, study) > 0)
                TrialStack(settings, data, parent_run_id, experiment_id, completer, heartbeats,
                           ask if refill else None).train(trials)


def refills(settings: SweepSettings) -> bool:
    """--refill, or by default on CUDA and wherever the step is compiled. On CUDA a fuller stack costs less per
    member (on the H100, 8 members train at 3.2x one model's model-images/s, 32 at 4.4x, deterministically:
    `python benchmarks/stack.py --throughput`, docs/benchmarks.md), so a freed slot is better refilled than
    dropped. A compiled step (the CPU's default) keeps its stack's shape, so a freed slot not refilled idles:
    refilling trained the same configurations 1.9-2.4x as fast (`python benchmarks/stack.py --small --shrink 4
    --compiled`). With an eager CPU step a step's cost grows with its members, a little more than in
    proportion, and shrinking won (`--small --shrink 4`). SGD only (step.Schedules)."""
    if settings.base.optimizer != "sgd":
        return False
    if settings.refill is not None:
        return settings.refill
    return settings.base.resolved_device() == "cuda" or settings.base.compile


def ask_up_to(settings: SweepSettings, study: optuna.Study, heartbeats: Heartbeats, most: int) -> list[optuna.Trial]:
    """Ask up to `most` trials, one at a time while the study wants more: an asked trial is RUNNING in the
    storage at once, so parallel workers asking side by side stop at `settings.trials` between them."""
    trials = []
    while len(trials) < most and wanted(settings, study) > 0:
        trials.append(claim(heartbeats.add(study.ask())))  # a heartbeat first: what other hosts go by
    return trials


def wanted(settings: SweepSettings, study: optuna.Study) -> int:
    """How many more trials to ask: up to `settings.trials` finished or running ones, or the queued (retried) ones."""
    room = settings.trials - count_toward_trials(study)
    return max(room, len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))))


def open_runs(settings: SweepSettings, data, trial: optuna.Trial, parent_run_id: str, experiment_id: str,
              client: MlflowClient, stack: tuple[int, int], n_params: int) -> StackedTrial | None:
    """Suggest the trial's coefficients and create its runs; None when the same configuration has finished
    already (its result is reused and told at once, as one by one: objective.reuse_twin) or when the trial is
    over `--trials` (objective.Surplus: told FAIL at once). `stack` is the stack's
    (first trial number, members): runs tagged with the same first trial trained together."""
    try:
        penalties, twin, tags = prepare_trial(settings, trial)
    except Surplus:
        tell_study(trial, state=TrialState.FAIL)
        return None
    if twin is not None:
        try:
            tell_study(trial, reuse_twin(settings, trial, twin, penalties, tags, parent_run_id, experiment_id))
        except optuna.TrialPruned:
            tell_study(trial, state=TrialState.PRUNED)
        return None
    tags["regsweep.stack"], tags["regsweep.stack_members"] = str(stack[0]), str(stack[1])
    tags[WORKER_TAG] = worker_id()  # as on a run that mlflow_run starts: which process trains it
    entry = StackedTrial(trial, penalties)
    name = trial_run_name(trial.number, penalties)
    parent = parent_run_id
    try:
        if settings.repeats > 1:
            entry.trial_run_id = create_trial_run(client, experiment_id, parent_run_id, name, tags, penalties)
            parent = entry.trial_run_id
            log_trial_run(client, parent, settings, penalties, n_params, data)
        for r in range(settings.repeats):
            cfg = seed_config(settings, penalties, r)
            run = create_run(client, experiment_id, seed_run_name(name, cfg, settings.repeats),
                             {**tags, "mlflow.parentRunId": parent})
            entry.run_ids.append(run.info.run_id)
            # The params now, so the run reads as a configuration from its first epoch on.
            params = run_params(cfg, data, n_params)
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                             metrics=coefficients(cfg))
        trial.set_user_attr("mlflow_run_ids", entry.all_run_ids)
    except BaseException as exc:  # the trial is told with the stack (TrialStack.unopened); its runs end here
        if isinstance(exc, Outage) and exc.tracking:
            raise  # MLflow calls would only wait on it: the next start ends the runs
        interrupted = isinstance(exc, KeyboardInterrupt)
        reason = ("interrupted (Ctrl-C or SIGTERM)" if interrupted
                  else f"opening the trial's runs failed: {type(exc).__name__}: {exc}")
        for run_id in entry.all_run_ids:
            end_run(client, run_id, reason, "KILLED" if interrupted else "FAILED")
        raise
    return entry


class TrialStack:
    """Asked trials trained as one stack (training.fit_stack): their runs opened, each member's run completed as
    it leaves the stack, each trial told once its runs are complete (so that the pruner and the sampler count it
    while the stack trains on) and, with `ask`, the slots that members free given the trials it returns."""

    def __init__(self, settings: SweepSettings, data, parent_run_id: str, experiment_id: str,
                 completer: Completer, heartbeats: Heartbeats,
                 ask: Callable[[int], list[optuna.Trial] | None] | None = None):
        self.settings, self.data, self.parent_run_id, self.experiment_id = settings, data, parent_run_id, experiment_id
        self.completer, self.heartbeats, self.ask = completer, heartbeats, ask
        self.client = MlflowClient()
        self.n_params = count_parameters(new_model(settings.base))  # the same for every member: l1, l2, seed differ
        self.stack = (0, 0)  # (first trial number, members at the start): the runs' stack tags
        self.entries: list[StackedTrial] = []
        self.members: list[tuple[StackedTrial, int]] = []  # fit_stack's members in its order: (trial, seed index)
        self.cfgs: list[TrainConfig] = []
        self.done: dict[int, FitResult] = {}  # the final results, by member
        self.failures: list[Exception] = []  # from runs that could not be completed: raised once the stack trained
        self.unopened: list[optuna.Trial] = []  # asked, runs not yet opened: if the stack fails now, told with it
        self.on_epoch = EpochHook(settings, self.members, self.client)

    def train(self, trials: list[optuna.Trial]) -> None:
        """Train the trials, complete every member's run and tell every trial its outcome."""
        self.stack = (trials[0].number, len(trials) * self.settings.repeats)
        try:
            self.add(trials)
            if self.entries:  # else every trial reused a finished twin's result and is told already
                results = fit_stack(list(self.cfgs), self.data, self.on_epoch, on_leave=self.on_leave,
                                    refill=self.refill if self.ask else None)
                for k, result in enumerate(results):
                    self.done.setdefault(k, result)
                mlflow.flush_async_logging()  # every epoch in the store before a worker ends the run
                self.settle(final=True)
            self.on_epoch.close(wait=True)
            if self.failures:
                raise self.failures[0]
        except BaseException as exc:
            self.abandon(exc)
            raise

    def add(self, asked: list[optuna.Trial]) -> list[TrainConfig]:
        """Open the asked trials' runs; their seeds are the next members (reused results are told already)."""
        new = []
        self.unopened.extend(asked)
        for trial in asked:
            entry = open_runs(self.settings, self.data, trial, self.parent_run_id, self.experiment_id, self.client,
                              self.stack, self.n_params)
            self.unopened.remove(trial)
            if entry is not None:
                self.entries.append(entry)
                for r in range(self.settings.repeats):
                    entry.members.append(len(self.members))
                    self.members.append((entry, r))
                    new.append(seed_config(self.settings, entry.penalties, r))
        self.cfgs.extend(new)
        return new

    def completion_job(self, k: int) -> tuple[TrainConfig, FitResult, str, dict[str, str]]:
        """What completing member k's run takes (its device tags read here, where the GPU is open)."""
        entry, r = self.members[k]
        return self.cfgs[k], self.done[k], entry.run_ids[r], device_tags(self.settings.base)

    def on_leave(self, k: int, result: FitResult) -> None:
        """fit_stack's on_leave: a member that left the stack is done; with workers, its run is completed while
        the stack trains on."""
        with signals_held():  # a signal waits until the trials that are ready are told (settle)
            self.done[k] = result
            mlflow.flush_async_logging()  # its epochs in the store before a worker ends the run
            self.completer.start(self.completion_job(k))
            self.settle(final=False)

    def settle(self, final: bool) -> None:
        """Tell the trials whose members are done and whose runs are complete (`final`: every trial left,
        waiting for its runs). A run that could not be completed fails its trial; the sweep then asks no more
        and stops with the error once the stack has trained, as one by one."""
        ready = [e for e in self.entries if not e.told and all(k in self.done for k in e.members)
                 and (final or self.completer.ready(e.run_ids))]
        if not ready:
            return
        with signals_held():  # every trial ready is completed and told before a signal stops the stack
            self.tell_ready(ready)

    def tell_ready(self, ready: list[StackedTrial]) -> None:
        with storage_errors(self.settings.storage):
            self.on_epoch.flush()  # every report in the study before its trial is told
        ks = [k for e in ready for k in e.members]
        errors = dict(zip(ks, self.completer.complete([self.completion_job(k) for k in ks])))
        for entry in ready:
            error = next((errors[k] for k in entry.members if errors[k] is not None), None)
            with storage_errors(self.settings.storage):
                if error is None:
                    tell_outcome(entry, [self.done[k] for k in entry.members], self.client)
                else:
                    fail_trial(entry, errors, self.client)
                    self.failures.append(error)
            self.heartbeats.discard(entry.trial)
        self.on_epoch.study_changed()

    def refill(self, free: int) -> list[TrainConfig] | None:
        """fit_stack's refill: the configurations of the next asked trials for `free` slots; None when no more
        will come."""
        self.settle(final=False)  # first, so that the sampler and the pruner count what is complete
        if self.failures:
            return None
        with storage_errors(self.settings.storage):
            asked = self.ask(free // self.settings.repeats)  # with repeats, a trial waits for as many free slots
        new = None if asked is None else self.add(asked)
        self.on_epoch.study_changed()  # reused results were told
        return new

    def abandon(self, exc: BaseException) -> None:
        """As one by one (Objective): an interrupted or outage-stopped stack queues every trial not yet told again;
        any other error fails them. Their runs end KILLED or FAILED with the reason, once no worker is still
        completing one of them; a run a worker completed whole stays FINISHED (end_run)."""
        kind = ("interrupted" if isinstance(exc, KeyboardInterrupt)
                else "outage" if isinstance(exc, Outage) else None)
        reason = "interrupted (Ctrl-C or SIGTERM)" if kind == "interrupted" else f"{type(exc).__name__}: {exc}"
        tracking_down = isinstance(exc, Outage) and exc.tracking  # then MLflow calls would only wait
        storage_down = isinstance(exc, Outage) and not exc.tracking  # then Optuna cannot record anything
        self.on_epoch.close(wait=not storage_down)  # no report lands after its trial is failed
        untold = [e for e in self.entries if not e.told]
        if not storage_down:
            for trial in [e.trial for e in untold] + self.unopened:
                if kind is not None:
                    fail_for_retry(trial, reason, kind, tell=True)
                else:
                    mark_error(trial, reason)
                    tell_study(trial, state=TrialState.FAIL)
        self.completer.stop(tracking_down)  # the study first: this may wait for runs being completed
        if not tracking_down:
            for entry in untold:
                for run_id in entry.all_run_ids:
                    end_run(self.client, run_id, reason, "FAILED" if kind is None else "KILLED")
            mlflow.flush_async_logging()


def fail_trial(entry: StackedTrial, errors: dict[int, Exception | None], client: MlflowClient) -> None:
    """A trial whose runs could not all be completed: FAIL, and each run whose completion failed ended FAILED with
    the reason (the completion may have failed before it could end the run itself)."""
    error = next(errors[k] for k in entry.members if errors[k] is not None)
    mark_error(entry.trial, f"completing a run failed: {type(error).__name__}: {error}")
    tell_study(entry.trial, state=TrialState.FAIL)
    entry.told = True
    for k, run_id in zip(entry.members, entry.run_ids):
        if errors[k] is not None:
            end_run(client, run_id, f"completing the run failed: {type(errors[k]).__name__}: {errors[k]}", "FAILED")
    for run_id in entry.all_run_ids:
        client.set_tag(run_id, "optuna.state", "FAIL")
    if entry.trial_run_id:
        end_run(client, entry.trial_run_id, "a seed's run could not be completed", "FAILED")


class EpochHook:
    """fit_stack's on_epoch: after each epoch, a member's metrics are queued for its MLflow run, its validation
    accuracy is reported to its trial, and the pruner is asked about it.

    The median pruner is asked against one read of the study an epoch, not one per member. Optuna's
    `trial.should_prune()` reads the study again on every call, and its cache re-reads every running trial,
    since another process may have changed it: with K members running, one epoch's questions cost K^2 trial
    reads (`python benchmarks/stack.py --hooks 8,32`). The median pruner looks only at the complete trials and
    at the member's own curve, and this process tells trials only between epochs (TrialStack.settle), after
    which the study is read again, so one read an epoch gives it the same answers; a trial that another worker
    completes meanwhile counts from a later epoch. A new epoch shows as a member asked a second time since the
    last read. Other pruners (Hyperband's rungs count running trials too) are asked per member.

    With the median pruner (or none), the reports themselves are queued too, as the metrics are for MLflow:
    one thread writes them in order (`trial.report` is a storage transaction per member and epoch, the larger
    part of what is left), while the stack trains its next epoch; the pruner reads the member's curve from
    `curves`, not from the storage. `flush` waits for them before the stack's trials are told; a report that
    failed raises at the next epoch's hook or at `flush`.
    """

    def __init__(self, settings: SweepSettings, members: list[tuple[StackedTrial, int]], client: MlflowClient):
        self.settings, self.members, self.client = settings, members, client
        # Trial number -> its reported curve (step -> val/acc): what the storage holds, without reading it.
        self.curves: dict[int, dict[int, float]] = {}
        self.complete: optuna.Study | None = None  # the study's complete trials, in memory, as of the last read
        self.known: set[int] = set()  # their numbers in the study (the copies are numbered anew)
        self.asked: set[int] = set()  # the members asked since the last read: one asked again is a new epoch
        self.stale = True  # trials were told since the last read
        self.queue = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regsweep-reports")  # one: in order
        self.pending: list[Future] = []

    def __call__(self, k: int, epoch: int, metrics: dict[str, float]) -> str | None:
        entry, r = self.members[k]
        now = int(time.time() * 1000)
        self.client.log_batch(entry.run_ids[r], metrics=[Metric(n, v, now, epoch) for n, v in metrics.items()],
                              synchronous=False)  # queued: K runs' epochs must not wait on the store
        if entry.pruned:
            return entry.pruned  # another seed of this trial was pruned
        step = report_step(r, epoch, self.settings.base.epochs)
        with storage_errors(self.settings.storage):  # unreachable: the stack stops, its trials are queued again
            self.raise_failed()
            if self.reads_storage(entry.trial.study):
                entry.trial.report(metrics["val/acc"], step)  # the pruner reads it back at once
            else:
                self.pending.append(self.queue.submit(entry.trial.report, metrics["val/acc"], step))
            self.curves.setdefault(entry.trial.number, {})[step] = metrics["val/acc"]
            prune = prunable(epoch, self.settings.base.epochs) and self.should_prune(k, entry.trial)
        if prune:
            entry.pruned = prune_reason(self.settings.pruner, epoch, metrics["val/acc"])
            return entry.pruned
        return None

    def reads_storage(self, study: optuna.Study) -> bool:
        """Whether the pruner is asked through the storage: any but the median (percentile) one or none."""
        return not isinstance(study.pruner, (optuna.pruners.PercentilePruner, optuna.pruners.NopPruner))

    def should_prune(self, k: int, trial: optuna.Trial) -> bool:
        study = trial.study
        if isinstance(study.pruner, optuna.pruners.NopPruner):
            return False  # --pruner none: nothing to read
        if self.reads_storage(study):
            return trial.should_prune()
        if self.complete is None:
            self.complete = optuna.create_study(direction=study.direction)  # in memory
        if self.stale or k in self.asked:  # a complete trial stays as it is: only those completed since are added
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            new = [t for t in complete if t.number not in self.known]
            self.complete.add_trials(new)
            self.known.update(t.number for t in new)
            self.asked, self.stale = set(), False
        self.asked.add(k)
        # The trial as the pruner would read it from the storage: running, with the values reported so far.
        mine = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values=self.curves[trial.number])
        return study.pruner.prune(self.complete, mine)

    def raise_failed(self) -> None:
        """A queued report that failed (the storage went away, say) stops the stack at the next epoch."""
        for future in [f for f in self.pending if f.done()]:
            future.result()
            self.pending.remove(future)

    def flush(self) -> None:
        """Every queued report in the storage; raises the first that failed."""
        for future in self.pending:
            future.result()
        self.pending.clear()

    def study_changed(self) -> None:
        """Trials were told: the next question reads the study again."""
        self.stale = True

    def close(self, wait: bool) -> None:
        """Stop the queue. For a stack that failed, the reports not begun are dropped (its trials are failed), and
        the one being written is waited for unless the storage is down."""
        self.queue.shutdown(wait=wait, cancel_futures=True)


def end_run(client: MlflowClient, run_id: str, reason: str, status: str) -> None:
    """A run of a trial that failed: tagged FAIL and ended `status` with the reason, unless it had ended FINISHED
    (a worker completed it whole before the stack stopped): that stays FINISHED, as a seed run that finished
    before its trial stopped does one by one. Best effort: in an outage the next start's reconciliation ends what
    this cannot."""
    try:
        client.set_tag(run_id, "optuna.state", "FAIL")
        if client.get_run(run_id).info.status == "FINISHED":
            return
        client.set_tag(run_id, STOP_REASON_TAG, reason[:TAG_LIMIT])
        client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def tell_study(trial: optuna.Trial, value: float | None = None, state: TrialState | None = None) -> None:
    """study.tell, minus the grid sampler's request to stop `optimize` once its grid is used up (an error
    outside `optimize`; the trial is recorded before it is raised, and run_stacked stops by counting)."""
    try:
        trial.study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def tell_outcome(entry: StackedTrial, results: list[FitResult], client: MlflowClient) -> None:
    """A trial whose runs are complete: PRUNED if a seed diverged or the pruner stopped it, else COMPLETE with its
    seeds' mean best validation accuracy. Its runs are tagged with that state (and the reason); with repeats, its
    trial run gets the seeds' summary and ends."""
    diverged = next((r.stop_reason for r in results if r.diverged), "")
    reason = diverged or entry.pruned
    state = "PRUNED" if reason else "COMPLETE"
    best_vals = [r.summary["best_val_acc"] for r in results if r.summary]
    if diverged:
        entry.trial.set_user_attr(DIVERGED_ATTR, diverged[:TAG_LIMIT])
    if reason:
        tell_study(entry.trial, state=TrialState.PRUNED)
    else:
        tell_study(entry.trial, statistics.mean(best_vals))
    entry.told = True
    for run_id in entry.all_run_ids:
        client.set_tag(run_id, "optuna.state", state)
        if reason:
            client.set_tag(run_id, STOP_REASON_TAG, reason[:TAG_LIMIT])
    if entry.trial_run_id:
        summarise_repeats(client, entry.trial_run_id, best_vals, state)

