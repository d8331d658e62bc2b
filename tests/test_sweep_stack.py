"""regsweep optimize --stack K for real: K trials asked at once, trained as one network, told back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from regsweep.cli import cli
from regsweep.outage import pid_alive

from .test_sweep import KILL_EPOCHS, SMALL, load, start_and_kill_mid_trial, study_runs

GRID = ["--grid", "l1=0,0.001 l2=0,0.0005", "--epochs", "2", "--pruner", "none"]


def optimize(*args: str, expect: int = 0):
    result = CliRunner().invoke(cli, ["optimize", *SMALL, *args])
    assert result.exit_code == expect, result.output
    return result


def tree(experiment: str):
    """The study's MLflow tree as comparable facts: trial runs per configuration, seeds, states, epochs."""
    client = MlflowClient()
    (parent,), children = study_runs(experiment)
    facts = {}
    for run in children:
        p, t = run.data.params, run.data.tags
        if "seed" not in p:  # a trial-level run of repeats
            continue
        history = client.get_metric_history(run.info.run_id, "val/acc")
        facts[(p["l1"], p["l2"], p["seed"])] = (run.info.status, t["optuna.state"], len(history),
                                                "best_val_acc" in run.data.metrics)
    return parent, children, facts


def test_a_stacked_grid_with_repeats_builds_the_same_tree_as_one_by_one(tracking_uri, tmp_path):
    # Stacked, the runs are completed by two worker processes (on the CPU the default is in place).
    for stack, name in (("1", "alone"), ("8", "stacked")):
        optimize(*GRID, "--repeats", "2", "--stack", stack, "--storage", f"sqlite:///{tmp_path / name}.db",
                 "--experiment-name", name, "--study-name", name, "--completion-workers", "2")
    alone, stacked = tree("alone"), tree("stacked")
    assert stacked[2] == alone[2] and len(stacked[2]) == 8  # 4 configurations x 2 seeds
    assert set(stacked[2].values()) == {("FINISHED", "COMPLETE", 2, True)}
    assert len(stacked[1]) == len(alone[1]) == 12  # 4 trial runs + 8 seed runs
    assert {r.data.tags["regsweep.stack_members"] for r in stacked[1]} == {"8"}
    assert {r.data.tags["regsweep.stack"] for r in stacked[1]} == {"0"}  # one stack, from trial 0 on
    # Completed by worker processes (each run ends tagged with the process that completed it), with the device
    # tags the training process gave them.
    from regsweep.outage import worker_id

    completed_by = {r.data.tags["regsweep.worker"] for r in stacked[1] if "seed" in r.data.params}
    assert worker_id() not in completed_by and 1 <= len(completed_by) <= 2, completed_by
    assert {r.data.tags.get("regsweep.device") for r in stacked[1] if "seed" in r.data.params} == {"cpu"}
    parent = stacked[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 4
    assert parent.data.tags["best_run_id"] in {r.info.run_id for r in stacked[1]}
    study = load(f"sqlite:///{tmp_path / 'stacked'}.db", "stacked")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    # Each trial's value is the mean of its seeds' best validation accuracies, as one by one.
    trial_runs = [r for r in stacked[1] if "n_seeds" in r.data.metrics]
    assert {r.data.params["seeds"] for r in trial_runs} == {"1-2"} and all("l1" in r.data.params for r in trial_runs)
    assert all(r.data.tags["mlflow.source.type"] == "LOCAL" for r in [parent, *stacked[1]])
    for run in stacked[1]:  # logged once, when the run was created (completing it does not log them again)
        assert run.data.metrics["l1"] == float(run.data.params["l1"])
        assert len(MlflowClient().get_metric_history(run.info.run_id, "l2")) == 1
    assert sorted(t.value for t in study.trials) == sorted(r.data.metrics["mean_best_val_acc"] for r in trial_runs)


def test_a_diverging_member_is_pruned_with_its_reason_and_the_stack_goes_on(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # With a worker, which completes the diverged member's run as soon as it leaves the stack.
    result = optimize("--grid", "l1=0,1e30", "--epochs", "2", "--pruner", "none", "--stack", "2", "--storage",
                      storage, "--completion-workers", "1")
    assert "1 complete, 1 pruned (1 of them diverged), 0 failed" in result.output
    study = load(storage)
    states = {t.params["l1"]: t.state.name for t in study.trials}
    assert states == {0.0: "COMPLETE", 1e30: "PRUNED"}
    _, children = study_runs()
    (diverged,) = [r for r in children if r.data.params["l1"] == "1e+30"]
    assert diverged.info.status == "FAILED"
    assert diverged.data.tags["regsweep.stop_reason"].startswith("diverged: training loss is")


def test_a_member_below_the_median_is_pruned_with_its_curve_and_reason(tracking_uri, tmp_path):
    """The median pruner needs 3 complete trials: a first stack completes them, a second stack of two
    configurations with a crushing L1 penalty is pruned at epoch 2, the first epoch it may be (with two
    seeds, the second seed's epoch 1 is Optuna's step 4, past any warm-up in steps)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--epochs", "3", "--pruner", "median", "--stack", "3", "--repeats", "2", "--storage", storage,
              "--no-l1-zero", "--l2-range", "1e-6", "1e-5", "--no-l2-zero"]
    optimize("--l1-range", "1e-6", "1e-5", "--trials", "3", *common)
    optimize("--l1-range", "0.3", "0.5", "--trials", "5", *common)
    study = load(storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["PRUNED"] * 2
    _, children = study_runs()
    pruned = [r for r in children if "seed" in r.data.params and float(r.data.params["l1"]) >= 0.3]
    assert len(pruned) == 4  # 2 trials x 2 seeds
    for run in pruned:
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
        assert run.data.tags["regsweep.stop_reason"].startswith("pruned by median pruner at epoch 2")
        assert len(MlflowClient().get_metric_history(run.info.run_id, "val/acc")) == 2  # its curve, 2 epochs
        assert run.data.metrics["epochs_trained"] == 2
    for trial in study.trials[3:]:
        # seed 0's epochs 1 and 2 (pruned there), seed 1's epoch 1; seed 1 stops with its trial at epoch 2
        assert trial.intermediate_values.keys() == {1, 2, 4}


def test_a_stacked_sweep_resumes_and_tops_up(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--epochs", "1", "--pruner", "none", "--stack", "2", "--storage", storage]
    optimize("--trials", "2", *common)
    out = optimize("--trials", "3", *common)
    assert [t.state.name for t in load(storage).trials] == ["COMPLETE"] * 3
    parents, children = study_runs()
    assert len(parents) == 1 and len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert "3 complete" in out.output


def test_slots_freed_by_finished_trials_take_the_next_trials_in_the_same_stack(tracking_uri, tmp_path):
    """4 trials, a stack of 2: the slots of the first two take the last two once they have trained (one stack
    trains all four), and those are asked only after the first two are told, so the sampler knows them."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optimize("--trials", "4", "--epochs", "2", "--pruner", "none", "--stack", "2", "--refill", "--storage", storage)
    trials = load(storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert min(t.datetime_start for t in trials[2:]) >= max(t.datetime_complete for t in trials[:2])
    (parent,), children = study_runs()
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["regsweep.stack"] for r in children} == {"0"}  # one stack
    for run in children:
        assert len(MlflowClient().get_metric_history(run.info.run_id, "val/acc")) == 2
        lrs = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, "lr")]
        assert lrs == pytest.approx([m.value for m in MlflowClient().get_metric_history(children[0].info.run_id, "lr")])
    assert parent.data.metrics["trials_complete"] == 4


def test_a_pruned_members_slot_takes_the_next_trial_which_is_pruned_at_its_own_epoch_2(tracking_uri, tmp_path):
    """3 complete trials, then 4 with a crushing L1 in a refilled stack of 2: each pruned trial is told at
    once and its slot takes the next, whose epochs count from its own first (pruned at its epoch 2)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--epochs", "3", "--pruner", "median", "--storage", storage, "--no-l1-zero", "--l2-range", "1e-6",
              "1e-5", "--no-l2-zero"]
    optimize("--l1-range", "1e-6", "1e-5", "--trials", "3", "--stack", "3", *common)
    optimize("--l1-range", "0.3", "0.5", "--trials", "7", "--stack", "2", "--refill", *common)
    trials = load(storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["PRUNED"] * 4
    assert all(t.intermediate_values.keys() == {1, 2} for t in trials[3:])
    assert min(t.datetime_start for t in trials[5:]) >= min(t.datetime_complete for t in trials[3:5])
    _, children = study_runs()
    pruned = [r for r in children if float(r.data.params["l1"]) >= 0.3]
    assert len(pruned) == 4 and {r.data.tags["regsweep.stack"] for r in pruned} == {"3"}  # one stack
    for run in pruned:
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
        assert run.data.tags["regsweep.stop_reason"].startswith("pruned by median pruner at epoch 2")
        assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val/acc")] == [1, 2]


def test_freed_slots_are_refilled_by_default_on_cuda_and_where_the_stack_is_compiled():
    """A compiled stack cannot shrink (it would compile again): without refilling its freed slots would idle."""
    from regsweep.config import TrainConfig
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.stacked import refills
    from regsweep.sweep.study import SweepSettings

    def refilled(refill=None, **base) -> bool:
        return refills(SweepSettings(base=TrainConfig(**{"device": "cpu", **base}), space=SearchSpace(), trials=4,
                                     study_name="s", storage="sqlite://", experiment_name="e", refill=refill))

    assert refilled()  # the CPU's default step is compiled
    assert not refilled(compile=False)  # an eager CPU stack shrinks instead
    assert refilled(device="cuda", compile=False)
    assert refilled(True, compile=False) and not refilled(False)
    assert not refilled(optimizer="adam")  # per-member schedules need SGD


def test_stack_bad_input_and_clipping(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for bad in ("0", "-1", "many"):
        out = optimize("--trials", "2", "--stack", bad, "--storage", storage, expect=2)
        assert out.output.startswith("Error: --stack must be auto or a whole number")
        assert len(out.output.splitlines()) == 1
    out = optimize("--trials", "2", "--stack", "2", "--refill", "--optimizer", "adam", "--storage", storage, expect=2)
    assert out.output.startswith("Error: --refill needs --optimizer sgd") and len(out.output.splitlines()) == 1
    assert MlflowClient().search_experiments(filter_string="name = 'regsweep'") == []
    out = optimize("--trials", "2", "--epochs", "1", "--pruner", "none", "--stack", "5", "--storage", storage)
    assert "--stack 5 is more than the 2 trials; stacking 2" in out.output
    assert [t.state.name for t in load(storage).trials] == ["COMPLETE"] * 2


@pytest.mark.parametrize("workers", ["2", "0"])
def test_a_run_that_cannot_be_completed_fails_its_trial_and_leaves_nothing_running(tracking_uri, tmp_path, workers,
                                                                                  monkeypatch):
    """A run whose artifacts cannot be written (the artifact location is under a file, so not even root can
    create it) ends FAILED, its trial FAIL, and the sweep stops with the error: no run is left RUNNING,
    whether the runs are completed by worker processes or in the training process. The check that refuses
    such a location at the start is skipped, as for a store that fails after it (a full disk)."""
    import regsweep.experiment

    monkeypatch.setattr(regsweep.experiment, "check_artifact_location", lambda *args: None)
    (tmp_path / "a-file").write_text("")
    name = f"unwritable-{workers}"
    mlflow.create_experiment(name, artifact_location=str(tmp_path / "a-file" / "artifacts"))
    storage = f"sqlite:///{tmp_path / name}.db"
    result = CliRunner().invoke(cli, ["optimize", *SMALL, "--grid", "l1=0,0.001", "--epochs", "1",
                                      "--pruner", "none", "--stack", "2", "--storage", storage,
                                      "--experiment-name", name, "--completion-workers", workers])
    assert result.exit_code != 0, result.output
    assert {t.state.name for t in load(storage, name).trials} == {"FAIL"}
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name(name).experiment_id])
    members = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(members) == 2 and {r.info.status for r in members} == {"FAILED"}
    assert all("regsweep.stop_reason" in r.data.tags for r in members)
    assert "RUNNING" not in {r.info.status for r in runs}
    (parent,) = [r for r in runs if "optuna.trial_number" not in r.data.tags]
    assert parent.info.status == "FAILED"
    study = load(storage, name)  # failed on an error of their own: a resume does not train them again
    assert all(t.user_attrs["fail_kind"] == "error" and "completing a run failed" in t.user_attrs["fail_reason"]
               for t in study.trials)
    from regsweep.sweep.study import requeue_interrupted
    assert requeue_interrupted(study) == []


def test_a_stack_that_fails_in_training_fails_its_trials_for_good(tracking_uri, tmp_path, monkeypatch):
    import regsweep.sweep.stacked

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--trials", "2", "--epochs", "1", "--pruner", "none", "--stack", "2", "--storage", storage]
    with monkeypatch.context() as patch:
        patch.setattr(regsweep.sweep.stacked, "fit_stack", broken)
        optimize(*common, expect=1)
    study = load(storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs == {**t.user_attrs, "fail_kind": "error", "fail_reason": "RuntimeError: boom"}
               for t in study.trials)
    (parent,), children = study_runs()
    assert parent.info.status == "FAILED" and {c.info.status for c in children} == {"FAILED"}
    optimize(*common)  # resumed: two new trials, the failed ones not queued again
    assert [t.state.name for t in load(storage).trials] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]


def start_stack_and_wait_for_completion(tracking_uri: str, storage: str):
    """A stacked sweep of 8 members (4 configurations x 2 seeds) whose runs 2 worker processes complete,
    started in its own process group; returns once the stack has trained and its runs are being completed."""
    args = [sys.executable, "-m", "regsweep", "optimize", *SMALL, *GRID[:2], "--repeats", "2", "--epochs", "1",
            "--pruner", "none", "--stack", "4", "--completion-workers", "2", "--storage", storage]
    proc = subprocess.Popen(args, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, deadline = MlflowClient(), time.time() + 180
    while time.time() < deadline:  # until every member's epoch is in the store
        exp = client.get_experiment_by_name("regsweep")
        members = [r for r in client.search_runs([exp.experiment_id])
                   if "optuna.trial_number" in r.data.tags and "seed" in r.data.params] if exp else []
        if len(members) == 8 and all("val/acc" in r.data.metrics for r in members):
            break
        time.sleep(0.2)
    assert len(members) == 8 and {r.info.status for r in members} == {"RUNNING"}, "not caught mid-completion"
    return proc, exp


def test_a_completion_worker_killed_mid_run_leaves_its_runs_to_the_training_process(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc, exp = start_stack_and_wait_for_completion(tracking_uri, storage)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[0]), signal.SIGKILL)
    assert proc.wait(timeout=180) == 0
    runs = MlflowClient().search_runs([exp.experiment_id])
    assert len(runs) == 13 and {r.info.status for r in runs} == {"FINISHED"}  # parent, 4 trials, 8 seeds
    assert all("best_val_acc" in r.data.metrics for r in runs if {"l1", "seed"} <= r.data.params.keys())
    assert [t.state.name for t in load(storage).trials] == ["COMPLETE"] * 4


def test_sigterm_to_the_whole_group_while_workers_complete_runs(tracking_uri, tmp_path):
    """SIGTERM sent to the sweep's process group (as a service manager does) while worker processes complete
    the runs: the workers finish the run in hand; the trials whose runs are complete are told (the signal waits
    for that) and count; every other trial is queued again, its runs tagged FAIL and ended KILLED (but for one
    a worker completed whole, which stays FINISHED); no process is left behind."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc, exp = start_stack_and_wait_for_completion(tracking_uri, storage)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    for _ in range(100):  # the workers are gone too (and multiprocessing's resource tracker after them)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        left = subprocess.run(["ps", "-o", "pid,cmd", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        raise AssertionError(f"processes left behind:\n{left}")
    runs = MlflowClient().search_runs([exp.experiment_id])  # parent, 4 trial runs, 8 seed runs
    (parent,) = [r for r in runs if r.data.tags.get("regsweep.kind") == "study"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "KILLED" and len(children) == 12
    trials = load(storage).trials
    states = {t.number: t.state.name for t in trials}
    for run in children:
        state = states[int(run.data.tags["optuna.trial_number"])]
        assert run.data.tags["optuna.state"] == state, run.info.run_name
        if state == "COMPLETE":
            assert run.info.status == "FINISHED", run.info.run_name
        elif run.info.status == "FINISHED":  # a worker had completed it whole: it stays so, its trial failed
            assert state == "FAIL" and "best_val_acc" in run.data.metrics, run.info.run_name
        else:
            assert state == "FAIL" and run.info.status == "KILLED", run.info.run_name
            assert "interrupted" in run.data.tags["regsweep.stop_reason"], run.info.run_name
    told = sorted(t.state.name for t in trials[:4])
    assert set(told) <= {"COMPLETE", "FAIL"}
    assert [t.state.name for t in trials[4:]] == ["WAITING"] * told.count("FAIL")


def test_a_stopped_stack_leaves_a_run_completed_whole_finished_and_ends_the_others_killed(tracking_uri, tmp_path):
    """A stack stopped while a worker had completed one seed's run of a trial but not the other's: the trial is
    queued again; the completed run stays FINISHED, tagged FAIL without a stop reason (as a seed run that
    finished before its trial stopped, one by one); the seed run still running and the trial's own run end
    KILLED with the reason. Before, every run of the trial was set KILLED, the completed one included."""
    from regsweep.config import TrainConfig
    from regsweep.sweep.completion import Completer
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.stacked import StackedTrial, TrialStack
    from regsweep.sweep.study import Heartbeats, SweepSettings, load_study

    client = MlflowClient()
    settings = SweepSettings(base=TrainConfig(), space=SearchSpace(), trials=1, study_name="stop", repeats=2,
                             storage=f"sqlite:///{tmp_path / 'optuna.db'}", experiment_name="stop")
    study = load_study(settings)
    trial_run, done, running = (client.create_run("0").info.run_id for _ in range(3))
    client.set_terminated(done, "FINISHED")  # the worker's completion of seed 0
    stack = TrialStack(settings, None, "", "0", Completer(None, settings.base, 0), Heartbeats(study))
    stack.entries.append(StackedTrial(study.ask(), {}, trial_run_id=trial_run, run_ids=[done, running]))
    stack.abandon(KeyboardInterrupt())
    runs = {run_id: client.get_run(run_id) for run_id in (trial_run, done, running)}
    assert {run_id: r.info.status for run_id, r in runs.items()} == {trial_run: "KILLED", done: "FINISHED",
                                                                     running: "KILLED"}
    assert {r.data.tags["optuna.state"] for r in runs.values()} == {"FAIL"}
    assert "regsweep.stop_reason" not in runs[done].data.tags
    assert "interrupted" in runs[running].data.tags["regsweep.stop_reason"]
    assert [t.state.name for t in load_study(settings).trials] == ["FAIL", "WAITING"]


def test_a_stacked_member_is_never_pruned_at_its_last_epoch(tracking_uri, tmp_path):
    """By then it has trained in full. The complete trials' curves climb; one member stays below their median
    from the start (pruned at epoch 2, the first it may be: the control), the other falls below it only at
    its last epoch, 4 (kept). (Optuna compares a trial's best value so far with the median at that step.)"""
    import optuna

    from regsweep.config import TrainConfig
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.stacked import EpochHook, StackedTrial
    from regsweep.sweep.study import SweepSettings, load_study

    epochs, client = 4, MlflowClient()
    settings = SweepSettings(base=TrainConfig(epochs=epochs), space=SearchSpace(), trials=8, study_name="last",
                             storage=f"sqlite:///{tmp_path / 'optuna.db'}", experiment_name="last")
    study = load_study(settings)
    climb = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.99}
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(value=0.99, intermediate_values=climb))
    entries = [StackedTrial(study.ask(), {}, run_ids=[client.create_run("0").info.run_id]) for _ in range(2)]
    hook = EpochHook(settings, [(e, 0) for e in entries], client)
    curves = {0: [0.4, 0.45, 0.5, 0.55], 1: [0.55, 0.65, 0.75, 0.8]}
    stops = {}
    for epoch in range(1, epochs + 1):
        for k in curves:
            if k not in stops and hook(k, epoch, {"val/acc": curves[k][epoch - 1], "val/loss": 0.1}):
                stops[k] = epoch
    hook.flush()
    assert stops == {0: 2}


@pytest.mark.parametrize("repeats", [1, 2])
def test_the_median_pruner_asked_once_an_epoch_stops_the_members_optunas_should_prune_would(tracking_uri, tmp_path,
                                                                                          repeats):
    """EpochHook asks the pruner against one read of the study an epoch; Optuna's own `trial.should_prune()`,
    reading the storage for every member, is the reference. Same curves, same stops, epoch by epoch."""
    import optuna

    from regsweep.config import TrainConfig
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.stacked import EpochHook, StackedTrial
    from regsweep.sweep.study import SweepSettings, load_study

    class PerMember(EpochHook):
        def reads_storage(self, study):  # as for Hyperband: report, then trial.should_prune()
            return True

    epochs, client = 4, MlflowClient()

    def value(top: float, step: int) -> float:
        # A later seed's steps run higher, so a curve read at the wrong step gets other answers.
        return top - 0.04 * 0.5 ** ((step - 1) % epochs + 1) + 0.03 * ((step - 1) // epochs)

    stops = {}
    for hook_class in (PerMember, EpochHook):
        settings = SweepSettings(base=TrainConfig(epochs=epochs), space=SearchSpace(), trials=12,
                                 study_name=hook_class.__name__, storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                 experiment_name="hooks", repeats=repeats)
        study = load_study(settings)

        def complete(top: float) -> None:
            study.add_trial(optuna.trial.create_trial(
                value=top, intermediate_values={s: value(top, s) for s in range(1, epochs * repeats + 1)}))

        for top in (0.95, 0.97):  # fewer than the median pruner's 3 startup trials: nobody is pruned yet
            complete(top)
        tops = [0.93, 0.975, 0.955, 0.99, 0.965, 0.94]  # some below the median of the complete trials, some above
        entries = [StackedTrial(study.ask(), {}, run_ids=[client.create_run("0").info.run_id for _ in range(repeats)])
                   for _ in tops]
        members = [(e, r) for e in entries for r in range(repeats)]
        hook, stopped = hook_class(settings, members, client), {}
        for epoch in range(1, epochs + 1):
            if epoch == 3:
                complete(0.96)  # as another worker would, between epochs: from now on the pruner can prune
            for k, (entry, r) in enumerate(members):
                if k not in stopped:
                    top = tops[entries.index(entry)]
                    if hook(k, epoch, {"val/acc": value(top, r * epochs + epoch), "val/loss": 0.1}):
                        stopped[k] = epoch
        stops[hook_class] = stopped
        assert all(not e.pruned or e.pruned.startswith("pruned by median pruner at epoch") for e in entries)
        hook.flush()  # queued reports (EpochHook) in the storage: every one, as reported
        stored = {t.number: t.intermediate_values for t in study.get_trials() if t.state.name == "RUNNING"}
        assert stored == hook.curves and sum(map(len, stored.values())) >= len(tops) * 2
    assert stops[EpochHook] == stops[PerMember]
    assert 0 < len({k // repeats for k in stops[EpochHook]}) < len(tops)  # the comparison can tell them apart
    assert min(stops[EpochHook].values()) >= 3  # not before the third complete trial


def test_heartbeats_keep_a_stack_alive_while_it_trains_and_stop_when_it_ends(tmp_path):
    import optuna

    from regsweep.config import TrainConfig
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.study import Heartbeats, SweepSettings, load_study

    settings = SweepSettings(base=TrainConfig(), space=SearchSpace(), trials=2, study_name="beats",
                             storage=f"sqlite:///{tmp_path / 'optuna.db'}", experiment_name="beats", heartbeat=1)
    study = load_study(settings)
    watch = optuna.storages.RDBStorage(settings.storage, heartbeat_interval=1, grace_period=2)
    with Heartbeats(study) as heartbeats:
        trials = [heartbeats.add(study.ask()) for _ in range(2)]
        time.sleep(3.5)  # longer than the grace period: only the thread's beats keep them fresh
        assert watch._get_stale_trial_ids(study._study_id) == []
    time.sleep(3.5)  # the stack has ended without telling them, as a dead worker's would
    assert sorted(watch._get_stale_trial_ids(study._study_id)) == sorted(t._trial_id for t in trials)


@pytest.mark.slow
def test_a_stacked_worker_that_dies_on_another_host_has_its_trials_found_stale_and_retried(tracking_uri, tmp_path):
    """Trials asked and told get heartbeats, as study.optimize's do: a stack whose worker died where this host
    cannot see its pid (here: its trials say another host) is found by its stopped heartbeat."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    stacked = ("--stack", "2", "--heartbeat", "1")
    victim = start_and_kill_mid_trial(tracking_uri, storage, signal.SIGKILL, *stacked)
    study = load(storage)
    dead = [t for t in study.trials if t.state.name == "RUNNING"]
    assert len(dead) == 2
    for t in dead:  # as if the worker had run elsewhere: this host's pid check does not apply
        study._storage.set_trial_user_attr(t._trial_id, "worker", {"host": "another-host", "pid": 1})
    time.sleep(3)  # past the grace period, twice the heartbeat
    import optuna
    watch = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=2)
    assert sorted(watch._get_stale_trial_ids(study._study_id)) == sorted(t._trial_id for t in dead)

    optimize("--epochs", KILL_EPOCHS, "--trials", "2", "--storage", storage, "--pruner", "none", *stacked)  # resume
    study = load(storage)
    assert [t.state.name for t in study.trials].count("COMPLETE") == 2
    assert {t.number for t in study.trials if t.state.name == "FAIL"} == {t.number for t in dead}
    assert {tuple(sorted(t.params.items())) for t in study.trials if t.state.name == "COMPLETE"} == \
        {tuple(sorted(t.params.items())) for t in dead}  # the same configurations, trained again
    client = MlflowClient()
    killed = client.get_run(victim.info.run_id)
    assert killed.info.status == "KILLED" and "worker died" in killed.data.tags["regsweep.stop_reason"]
    assert all(r.info.status != "RUNNING" for r in study_runs()[1])


def test_a_trial_whose_runs_cannot_be_opened_leaves_none_of_them_running(tracking_uri, tmp_path, monkeypatch):
    from regsweep.data import MnistSplits

    sizes, calls = MnistSplits.sizes, []

    def broken(self):  # read for the run holding the trial's seeds, then for its first seed run: fails there
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("no sizes")
        return sizes(self)

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setattr(MnistSplits, "sizes", broken)
    optimize("--trials", "2", "--repeats", "2", "--epochs", "1", "--pruner", "none", "--stack", "4",
             "--storage", storage, expect=1)
    (parent,), children = study_runs()
    assert len(children) == 2 and {c.info.status for c in children} == {"FAILED"}  # the trial's run, one seed's
    assert all("opening the trial's runs failed: RuntimeError: no sizes" in c.data.tags["regsweep.stop_reason"]
               for c in children)
    assert parent.info.status == "FAILED" and [t.state.name for t in load(storage).trials] == ["FAIL", "FAIL"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the driver", "Ctrl-C to the group", "SIGKILL to the driver"])
def test_stacked_worker_processes_stopped_end_every_run_killed_and_queue_every_trial(tracking_uri, tmp_path, how):
    """--workers 2 with stacks: each worker process ends its stack's runs KILLED and queues its trials again,
    whether the driver relays a SIGTERM, a terminal's Ctrl-C reaches every process (and then the driver's
    SIGTERM too), or the driver dies at once (then the workers notice it is gone, and the parent run is left
    to the resume); a resume trains exactly the interrupted trials."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [*SMALL, "--trials", "4", "--stack", "2", "--workers", "2", "--epochs", "12", "--pruner", "none",
            "--storage", storage, "--sampler", "random"]
    proc = subprocess.Popen([sys.executable, "-m", "regsweep", "optimize", *args], start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, deadline = MlflowClient(), time.time() + 240
    while time.time() < deadline:  # until both workers' stacks have logged an epoch
        exp = client.get_experiment_by_name("regsweep")
        members = [r for r in client.search_runs([exp.experiment_id])
                   if {"l1", "seed"} <= r.data.params.keys()] if exp else []
        if len(members) == 4 and all("val/acc" in r.data.metrics for r in members):
            break
        time.sleep(0.5)
    assert len(members) == 4, "the stacks did not start training"
    workers = {int(r.data.tags["regsweep.worker"].rsplit(":", 1)[1]) for r in members}
    assert len(workers) == 2 and proc.pid not in workers
    if how == "SIGTERM to the driver":
        proc.send_signal(signal.SIGTERM)
    elif how == "SIGKILL to the driver":
        proc.kill()
    else:
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    deadline = time.time() + 120  # the workers are not the test's children: poll until they are gone
    while any(pid_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(pid_alive(pid) for pid in workers), "a worker outlived the sweep"
    (parent,), children = study_runs()
    assert parent.info.status == ("RUNNING" if how == "SIGKILL to the driver" else "KILLED")
    assert {c.info.status for c in children} == {"KILLED"}
    assert all("interrupted" in c.data.tags["regsweep.stop_reason"] for c in children)
    study = load(storage)
    assert sorted(t.state.name for t in study.trials) == ["FAIL"] * 4 + ["WAITING"] * 4
    assert sorted(str(t.params) for t in study.trials if t.state.name == "WAITING") == \
        sorted(str(t.params) for t in study.trials if t.state.name == "FAIL")
    if how == "Ctrl-C to the group":
        return  # the stores are as a SIGTERM to the driver leaves them (above), and that case resumes from there

    optimize("--trials", "4", "--stack", "2", "--epochs", "12", "--pruner", "none", "--storage", storage,
             "--sampler", "random")
    study = load(storage)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4 + ["FAIL"] * 4
    assert sorted(str(t.params) for t in study.trials if t.state.name == "FAIL") == \
        sorted(str(t.params) for t in study.trials if t.state.name == "COMPLETE")
    (parent,), children = study_runs()
    assert parent.info.status == "FINISHED" and "RUNNING" not in {c.info.status for c in children}


@pytest.mark.parametrize("hook", ["regsweep.sweep.completion:log_outcome", "regsweep.sweep.stacked:tell_outcome"])
def test_a_signal_as_a_stack_completes_and_tells_its_trials_waits_until_every_ready_one_is_told(
        tracking_uri, tmp_path, hook):
    """SIGTERM as the first member's run is completed (in this process, the CPU's default) or as its trial is
    told: both trials trained to their end, and both are told COMPLETE before the sweep stops. Before, the
    signal stopped the stack at once, or after the first tell, and trained trials were failed and retrained."""
    from .conftest import signalled_on_call

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    module, function = hook.split(":")
    args = [*SMALL, "--trials", "2", "--stack", "2", "--epochs", "1", "--storage", storage, "--pruner", "none"]
    proc = subprocess.run([sys.executable, "-c", signalled_on_call(module, function, "SIGTERM"), "optimize", *args],
                          capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                          timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "stopping once the work in hand is done" in proc.stderr
    assert [t.state.name for t in load(storage).trials] == ["COMPLETE", "COMPLETE"]
    _, children = study_runs()
    assert [(c.info.status, c.data.tags["optuna.state"]) for c in children] == [("FINISHED", "COMPLETE")] * 2
