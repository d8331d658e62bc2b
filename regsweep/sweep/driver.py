"""Running a study: create or resume it and its parent run, run the workers, mark the best trial."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import socket
import time

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ..outage import (EXIT_OUTAGE, STOP_REASON_TAG, TAG_LIMIT, WORKER_TAG, Outage, StorageOutage, TrackingOutage,
                      end_orphaned_runs, pid_alive, redact, tag_run, tracking_watch, when_parent_gone, worker_id)
from ..experiment import use_experiment
from ..signals import signals_held, terminal_status
from .objective import Objective, Surplus
from .runs import STUDY_TAG, find_or_create_parent, finish_study
from .stacked import run_stacked
from .study import (FINISHED, MAX_RETRY, StaleTrialHandler, SweepSettings, count_toward_trials, end_dead_run,
                    has_waiting, load_study, reap_dead_local_trials, requeue_interrupted, retried_trials,
                    storage_errors)

# How a worker process tells the driver which store stopped answering.
WORKER_EXIT = {TrackingOutage: EXIT_OUTAGE, StorageOutage: EXIT_OUTAGE + 1}


class WorkerFailure(Exception):
    """A worker process crashed or was killed. The others finish their trials first; a trial the dead worker
    left RUNNING is failed and queued again, and the sweep ends FAILED (crashed) or KILLED (signalled), to be
    resumed. (A worker that stopped on an error of its own has already failed its trial and printed why.)"""

    def __init__(self, exitcodes: list[int | None], reaped: list[int], retried: set[int]):
        self.killed = any(code is not None and code < 0 for code in exitcodes)
        dead = [f"worker {i} {describe_exit(code)}" for i, code in enumerate(exitcodes) if code != 0]
        queued, dropped = [n for n in reaped if n in retried], [n for n in reaped if n not in retried]
        left = "".join(f"; trial {', '.join(map(str, numbers))}, left running, is failed{outcome}"
                       for numbers, outcome in ((queued, " and queued again"),
                                                (dropped, f", not queued again (its configuration's workers died "
                                                          f"{MAX_RETRY + 1} times)")) if numbers)
        super().__init__(", ".join(dead) + left)


def describe_exit(code: int | None) -> str:
    """A process's exit code in words: multiprocessing gives -N for a process ended by signal N."""
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_worker(settings: SweepSettings, parent_run_id: str, experiment_id: str, tracking_uri: str,
               threads: int = 0) -> None:
    """One worker: load data once, then take trials until the study has `trials` finished ones."""
    import torch

    from ..data import load_for

    if threads:
        torch.set_num_threads(threads)
    mlflow.set_tracking_uri(tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as in optimize
    with storage_errors(settings.storage), tracking_watch(settings.tracking_timeout, tracking_uri):
        study = load_study(settings, tracking_uri)
        data = load_for(settings.base)
        if settings.stack > 1:
            run_stacked(settings, study, data, parent_run_id, experiment_id)
            return
        objective = Objective(settings, data, parent_run_id, experiment_id)
        # Running trials count towards the total so that parallel workers stop at exactly `trials`.
        stop_at_total = optuna.study.MaxTrialsCallback(settings.trials, states=FINISHED + (TrialState.RUNNING,))
        if count_toward_trials(study) < settings.trials or has_waiting(study):
            # A Surplus trial (asked by two workers at once) ends FAIL with its reason; the callback then counts
            # --trials and stops this worker.
            study.optimize(objective, callbacks=[objective.raise_held, stop_at_total], timeout=settings.timeout,
                           gc_after_trial=True, catch=(Surplus,))


def worker_process(*args) -> None:
    """A spawned worker: an outage ends the process at once with an exit code the driver reads (see
    outage.exit_now for why not a normal exit). Ctrl-C or SIGTERM ends its trials' runs KILLED and queues the
    trials again, as in the driver's own process; then the worker ends by that signal, as the driver reads it.
    A driver that dies without stopping it (SIGKILL) stops it the same way, through a SIGTERM to itself: the
    next start then ends the parent run and resumes the queued trials."""
    try:
        with terminal_status():
            when_parent_gone(lambda: os.kill(os.getpid(), signal.SIGTERM))
            run_worker(*args)
    except Outage as exc:
        os._exit(WORKER_EXIT[type(exc)])
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def threads_per_worker(workers: int, threads: int = 0) -> int:
    """torch threads for each of `workers` processes: `threads` if set, else the cores shared out evenly."""
    return threads or max(1, (os.cpu_count() or 1) // workers)


def reconcile(settings: SweepSettings, study: optuna.Study, experiment_id: str, tracking_uri: str) -> None:
    """Make MLflow and Optuna agree, on every start and at the end of a sweep.

    Every run of the study that is RUNNING while its trial is not (the trial ended, or was never recorded)
    ends KILLED with the trial's story as its stop reason; so does any RUNNING run of the experiment whose
    process on this machine is gone. The ended runs of failed trials are tagged FAIL (retag_ended_runs). Every
    trial that was interrupted and has no retry yet is queued again.
    Trials of dead workers must have been failed first (reap_dead_local_trials, fail_stale_trials)."""
    client = MlflowClient(tracking_uri)
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)
    # The trials after the runs: a trial another process asks in between, with its run, is then in the study.
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for run in running:
        tags = run.data.tags
        if tags.get(STUDY_TAG) != settings.study_name or tags.get("regsweep.kind") == "study":
            continue
        number = tags.get("optuna.trial_number", "")
        trial = trials.get(int(number)) if number.isdigit() else None
        if trial is not None and trial.state == TrialState.RUNNING:
            continue  # its worker is alive (dead workers' trials were failed before this)
        if trial is not None and trial.state in FINISHED and still_ending(trial, settings.heartbeat):
            continue  # a stack tells a repeated trial before it ends the trial's run (stacked.tell_outcome)
        if trial is None:
            story = f"its trial {number or '?'} is not in the study"
        else:
            why = trial.user_attrs.get("fail_reason") or "its worker stopped before it could end the run"
            story = f"trial {trial.number} ended {trial.state.name}: {why}"
        end_dead_run(run.info.run_id, f"{story}; run ended KILLED when the sweep was reconciled", tracking_uri,
                     trial.state.name if trial is not None else "FAIL")
    retag_ended_runs(client, experiment_id, list(trials.values()))
    end_orphaned_runs(experiment_id, tracking_uri)
    requeue_interrupted(study)


def still_ending(trial: optuna.trial.FrozenTrial, heartbeat: int) -> bool:
    """Whether the worker of a finished trial may still be ending its runs: a live process on this host (not this
    one, which is reconciling), or on another host a trial told within the heartbeat's grace period (2 x
    --heartbeat, read against this host's clock, as reap_dead_local_trials does)."""
    worker = trial.user_attrs.get("worker") or {}
    if worker.get("host") == socket.gethostname():
        return worker.get("pid") != os.getpid() and pid_alive(worker.get("pid", -1))
    told = trial.datetime_complete or datetime.datetime.min
    # Not below 0: a host whose clock is ahead of this one's (another time zone) would hold the run for as long.
    return 0 <= (datetime.datetime.now() - told).total_seconds() < 2 * heartbeat


def retag_ended_runs(client: MlflowClient, experiment_id: str, trials: list[optuna.trial.FrozenTrial]) -> None:
    """The failed trials' runs that ended before their trial failed (killed between a run's end and the study
    being told) still say what they said then, RUNNING or COMPLETE: they are tagged FAIL, with the trial's reason.
    One search for those still tagged otherwise (deleted runs are not searched), as this runs on every start."""
    failed = {run_id: t for t in trials if t.state == TrialState.FAIL
              for run_id in t.user_attrs.get("mlflow_run_ids", [])}
    ids = sorted(failed)
    for start in range(0, len(ids), 100):
        quoted = ", ".join(f"'{run_id}'" for run_id in ids[start:start + 100])
        for run in client.search_runs([experiment_id], f"attributes.run_id IN ({quoted}) and "
                                      "attributes.status != 'RUNNING' and tags.`optuna.state` != 'FAIL'"):
            trial = failed[run.info.run_id]
            why = trial.user_attrs.get("fail_reason") or "its worker stopped before the study was told"
            tag_run(client, run.info.run_id, {"optuna.state": "FAIL", STOP_REASON_TAG: (
                f"trial {trial.number} ended FAIL after this run ended: {why}"[:TAG_LIMIT])})


def optimize(settings: SweepSettings) -> dict:
    """Create or resume the study and its parent run, run the workers, then mark the best trial.

    With workers > 1, each is a separate process (spawned, so each loads its data once and owns its torch
    threads: cores / workers). All share the study through its storage.
    """
    tracking_uri = mlflow.get_tracking_uri()
    # The sweep says what became of each trial itself (its runs' tags, the summary, one line on a stop); Optuna's
    # warnings would repeat a stopped or failed trial with a traceback, a Ctrl-C included.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with terminal_status():  # SIGTERM, like Ctrl-C, ends the parent run KILLED, from start-up to the finished study
        experiment_id, study, parent_run_id, handler = start(settings, tracking_uri)
        summary = run_and_finish(settings, study, parent_run_id, experiment_id, tracking_uri, handler)
    return summary | {"parent_run_id": parent_run_id, "experiment_id": experiment_id}


def start(settings: SweepSettings, tracking_uri: str) -> tuple[str, optuna.Study, str, StaleTrialHandler]:
    """Open both stores, find or make the parent run and set it RUNNING, and deal with what dead workers left.
    Returns (experiment id, study, parent run id, the dead-worker handler).

    A signal waits until this is done (a second or two): cut short, it would leave the parent run RUNNING, a dead
    worker's trial half reconciled, or a new store's tables half made. Then the parent run ends KILLED."""
    client, parent_run_id = MlflowClient(), None
    try:
        with storage_errors(settings.storage), tracking_watch(settings.tracking_timeout, tracking_uri), \
                signals_held():
            experiment_id = use_experiment(settings.experiment_name)
            study = load_study(settings, tracking_uri)
            parent_run_id = find_or_create_parent(settings, study, experiment_id)
            client.update_run(parent_run_id, status="RUNNING")
            if STOP_REASON_TAG in client.get_run(parent_run_id).data.tags:  # why an earlier start stopped: not now
                try:
                    client.delete_tag(parent_run_id, STOP_REASON_TAG)
                except mlflow.exceptions.MlflowException as exc:  # another command, starting at this moment, did
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
            # Gone without ending it, the next command does. Another command on the study may start at this moment.
            tag_run(client, parent_run_id, {WORKER_TAG: worker_id()})
            # Trials of workers that died since the last start: fail them, end their runs KILLED, queue retries.
            handler = StaleTrialHandler(tracking_uri)
            reap_dead_local_trials(study, handler, unclaimed_after=2 * settings.heartbeat)  # Optuna's grace period
            optuna.storages.fail_stale_trials(study)
            reconcile(settings, study, experiment_id, tracking_uri)
        return experiment_id, study, parent_run_id, handler
    except KeyboardInterrupt as exc:  # held until the start-up was done (a third signal is not)
        exc.when = "as the sweep started, before any trial trained"
        if parent_run_id is None:  # a third signal, before the parent run was found or made
            exc.parent_status = None
            raise
        with signals_held():
            tag_run(client, parent_run_id, {
                STOP_REASON_TAG: "interrupted (Ctrl-C or SIGTERM) as the sweep started; resume with the same command"})
            client.set_terminated(parent_run_id, "KILLED")
        raise


def run_and_finish(settings: SweepSettings, study: optuna.Study, parent_run_id: str, experiment_id: str,
                   tracking_uri: str, handler: StaleTrialHandler) -> dict:
    """Run the workers, then finish the study and end its parent run, whatever stopped them."""
    client = MlflowClient(tracking_uri)
    status, procs, outage, interrupted = "FINISHED", [], None, ""
    try:
        if settings.workers == 1:
            run_worker(settings, parent_run_id, experiment_id, tracking_uri, settings.base.threads)
        else:
            threads = threads_per_worker(settings.workers, settings.base.threads)
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=worker_process, name=f"regsweep-worker-{i}",
                                 args=(settings, parent_run_id, experiment_id, tracking_uri, threads))
                     for i in range(settings.workers)]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
            exitcodes = [proc.exitcode for proc in procs]
            raise_worker_outage(settings, tracking_uri, exitcodes)
            reaped = reap_dead_local_trials(study, handler)  # a worker that crashed leaves its trial RUNNING
            if any(exitcodes):
                raise WorkerFailure(exitcodes, reaped, retried_trials(study.get_trials(deepcopy=False)))
    except KeyboardInterrupt:
        status, interrupted = "KILLED", "interrupted (Ctrl-C or SIGTERM) while trials trained"
        stop_workers(procs)
        raise
    except Outage as exc:
        status, outage = "KILLED", exc
        raise
    except WorkerFailure as exc:
        status = "KILLED" if exc.killed else "FAILED"
        tag_run(client, parent_run_id, {STOP_REASON_TAG: f"{exc}; resume with the same command"})
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if outage is None:
            try:
                # A first signal now is held until the study is finished (its best trial, plots, runs reconciled),
                # then ends the parent run KILLED: cut short, a store call can keep SQLite's lock from the end.
                with tracking_watch(settings.tracking_timeout, tracking_uri), signals_held():
                    summary = finish_study(study, parent_run_id)
                    if status == "FINISHED":
                        reconcile(settings, study, experiment_id, tracking_uri)
            except KeyboardInterrupt as exc:
                if status == "FINISHED":  # the first signal, arriving as the study was being finished
                    status, interrupted = "KILLED", "interrupted (Ctrl-C or SIGTERM) as the study was finished"
                    exc.when = "as the study was finished, its trials done"  # none was stopped: the line says so
                raise
            except BaseException:
                status = "FAILED"
                raise
            finally:  # whatever failed above, the parent run does not stay RUNNING
                try:
                    with signals_held():
                        if interrupted:
                            tag_run(client, parent_run_id,
                                    {STOP_REASON_TAG: f"{interrupted}; resume with the same command"})
                        client.set_terminated(parent_run_id, status)
                except KeyboardInterrupt as exc:  # held while the parent run ended: the sweep itself was done
                    if status == "FINISHED":
                        exc.when = "as the sweep ended, its trials done"
                    exc.parent_status = status
                    raise
        elif not outage.tracking:  # MLflow answers: say on the parent why the sweep stopped
            tag_run(client, parent_run_id, {STOP_REASON_TAG: f"{outage}; resume with the same command"})
            client.set_terminated(parent_run_id, status)
    return summary


STOP_WAIT = 120  # seconds stopping worker processes get to end their trials' runs before they are killed


def stop_workers(procs) -> None:
    """Stop the worker processes: each ends its trials' runs KILLED and queues the trials again, as on its own
    SIGTERM (worker_process); those still at it after STOP_WAIT are killed (the next start then reconciles
    what they left). A process the signal caught before it started is skipped."""
    started = [proc for proc in procs if proc.pid is not None]
    for proc in started:
        proc.terminate()
    deadline = time.monotonic() + STOP_WAIT
    for proc in started:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def raise_worker_outage(settings: SweepSettings, tracking_uri: str, exitcodes: list[int | None]) -> None:
    """A worker process that stopped for an outage exits with a code of WORKER_EXIT: raise it here."""
    if WORKER_EXIT[TrackingOutage] in exitcodes:
        raise TrackingOutage(f"the MLflow tracking server at {redact(tracking_uri)} has not answered for "
                             f"{settings.tracking_timeout:g} s (--tracking-timeout)")
    if WORKER_EXIT[StorageOutage] in exitcodes:
        raise StorageOutage(f"the Optuna storage {redact(settings.storage)} is unreachable")
