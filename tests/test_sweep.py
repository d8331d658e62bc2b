"""regsweep optimize for real: Optuna and MLflow storages in a temporary directory, real MNIST slices."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from regsweep.cli import cli

from .conftest import in_step, signalled_on_call

# 512 training images in batches of 32 (16 steps an epoch), 256 validation/test images, eager.
SMALL = ["--max-train-samples", "512", "--max-eval-samples", "256", "--batch-size", "32", "--compile", "false",
         "--log-images", "false", "--epochs", "3"]


def optimize(*args: str, expect: int = 0):
    result = CliRunner().invoke(cli, ["optimize", *SMALL, *args])
    assert result.exit_code == expect, result.output
    return result


def study_runs(experiment: str = "regsweep"):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("regsweep.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return parents, children


def load(storage: str, name: str = "regsweep") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.slow
def test_tpe_study_with_pruning_builds_the_mlflow_tree(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    out = optimize("--trials", "4", "--storage", storage, "--pruner", "median").output
    assert "best trial" in out

    study = load(storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in finished)
    (parent,), children = study_runs()
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["regsweep.study"] == "regsweep" and tags["optuna.sampler"] == "tpe"
    assert tags["optuna.pruner"] == "median" and "l1" in tags["optuna.search_space"]
    assert len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    for trial in study.trials:
        run = by_number[trial.number]
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.run_name.startswith(f"trial {trial.number:03d} l1=")
        assert run.info.status == "FINISHED"
        assert "weights/conv1/mean_abs" in run.data.metrics and "best_val_acc" in run.data.metrics
        if trial.state.name == "PRUNED":
            assert run.data.tags["regsweep.stop_reason"].startswith("pruned by median pruner at epoch")
    best = study.best_trial
    assert tags["best_run_id"] == by_number[best.number].info.run_id
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.metrics["best_l1"] == pytest.approx(best.params.get("l1", 0.0))
    # the objective is validation accuracy, never test accuracy
    assert best.value == pytest.approx(by_number[best.number].data.metrics["best_val_acc"])
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/intermediate_values.png", "study/trials.json",
            "study/param_importances.png"} <= artifacts, artifacts


def test_a_trial_below_the_median_is_pruned_one_by_one_with_its_curve_and_reason(tracking_uri, tmp_path):
    """The median pruner on the one-by-one path (--stack 1, the CPU's default): 3 complete trials first,
    then two configurations with a crushing L1 penalty, pruned at epoch 2, the first epoch they may be."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--epochs", "3", "--pruner", "median", "--stack", "1", "--storage", storage, "--no-l1-zero",
              "--l2-range", "1e-6", "1e-5", "--no-l2-zero"]
    optimize("--l1-range", "1e-6", "1e-5", "--trials", "3", *common)
    optimize("--l1-range", "0.3", "0.5", "--trials", "5", *common)
    study = load(storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["PRUNED"] * 2
    _, children = study_runs()
    pruned = [r for r in children if float(r.data.params["l1"]) >= 0.3]
    assert len(pruned) == 2
    for run in pruned:
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
        assert run.data.tags["regsweep.stop_reason"].startswith("pruned by median pruner at epoch 2")
        assert len(MlflowClient().get_metric_history(run.info.run_id, "val/acc")) == 2  # its curve, 2 epochs
    assert all(t.intermediate_values.keys() == {1, 2} for t in study.trials[3:])


@pytest.mark.slow
def test_rerun_resumes_and_tops_up_without_duplicating(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optimize("--trials", "2", "--storage", storage, "--pruner", "none", "--epochs", "1")
    optimize("--trials", "2", "--storage", storage, "--pruner", "none", "--epochs", "1")
    assert len(load(storage).trials) == 2  # the same command again starts nothing
    optimize("--trials", "3", "--storage", storage, "--pruner", "none", "--epochs", "1")
    study = load(storage)
    assert [t.number for t in study.trials] == [0, 1, 2]
    parents, children = study_runs()
    assert len(parents) == 1 and len(children) == 3
    assert parents[0].info.status == "FINISHED"
    # The study's table of trials, rewritten at each finish, lists each trial once (log_table would append).
    table = MlflowClient().load_table(parents[0].info.experiment_id, "study/trials.json",
                                      run_ids=[parents[0].info.run_id])
    assert sorted(table["number"]) == [0, 1, 2]


def test_resuming_with_a_clashing_search_space_is_refused_before_any_run(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optimize("--grid", "l1=0,0.001", "--storage", storage, "--pruner", "none", "--epochs", "1")
    for args, message in ((["--grid", "l1=0,0.0005"], "searched l1 as one of 0.0, 0.001, not one of 0.0, 0.0005"),
                          ([], "searched l1 as one of 0.0, 0.001, not a range (1e-06 to 0.01)"),
                          # other settings: trials that would not compare with the study's
                          (["--grid", "l1=0,0.001", "--epochs", "2", "--repeats", "2"],
                           "study 'regsweep' was run with epochs=1 (now 2), repeats=1 (now 2): trials trained "
                           "otherwise would not compare"),
                          (["--grid", "l1=0,0.001", "--epochs", "1", "--threads", "1"], None)):  # how, not what
        if message is None:
            optimize(*args, "--trials", "2", "--storage", storage)
            continue
        out = optimize(*args, "--trials", "2" if "--grid" in args else "4", "--storage", storage, expect=2)
        lines = [line for line in out.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "--study-name" in lines[0], out.output
    assert len(load(storage).trials) == 2
    parents, children = study_runs()
    assert len(parents) == 1 and len(children) == 2 and parents[0].info.status == "FINISHED"


@pytest.mark.slow
def test_a_grid_topped_up_on_resume_trains_the_points_it_had_not(tracking_uri, tmp_path):
    """GridSampler shuffles the grid by its seed, and a trial's grid_id indexes the shuffled grid: seeded
    differently on the resume, grid_id 1 was the point trial 0 had trained, which then trained twice while the
    other never did. The values written in another order are the same grid (they were refused as another)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for trials, grid in (("1", "l1=0,0.001"), ("2", "l1=0.001,0")):
        optimize("--grid", grid, "--trials", trials, "--storage", storage, "--pruner", "none", "--epochs", "1")
    assert sorted(t.params["l1"] for t in load(storage).trials) == [0.0, 0.001]
    (parent,), _ = study_runs()
    assert parent.data.tags["optuna.n_trials"] == "2"  # what the study was topped up to, not its first --trials


def test_a_new_study_named_as_one_in_another_storage_says_so(tracking_uri, tmp_path):
    """Run from another folder, the default `sqlite:///optuna.db` is another file: the command would start a new
    study where its user meant to resume one. It goes on (two storages may be meant), with a note that says so."""
    first, second = (f"sqlite:///{tmp_path / name}" for name in ("first.db", "second.db"))
    optimize("--trials", "1", "--epochs", "1", "--storage", first, "--study-name", "s", "--pruner", "none")
    result = optimize("--trials", "1", "--epochs", "1", "--storage", second, "--study-name", "s", "--pruner", "none")
    (old, _new) = sorted(study_runs()[0], key=lambda r: r.info.start_time)
    assert (f"note: a new study 's' in {second}, while experiment 'regsweep' has one of that name under parent run "
            f"{old.info.run_id} (storage {first}, as given)") in result.stderr
    again = optimize("--trials", "1", "--epochs", "1", "--storage", second, "--study-name", "s", "--pruner", "none")
    assert "note: a new study" not in again.output  # resumed: nothing to say


def test_grid_runs_exactly_the_grid_with_repeats_grouped_under_each_trial(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optimize("--grid", "l1=0,0.001 l2=0,0.0005", "--storage", storage, "--pruner", "none", "--epochs", "1",
             "--repeats", "2")
    study = load(storage)
    configs = sorted((t.params["l1"], t.params["l2"]) for t in study.trials)
    assert configs == [(0.0, 0.0), (0.0, 0.0005), (0.001, 0.0), (0.001, 0.0005)]
    (parent,), children = study_runs()
    trial_runs = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    seed_runs = [c for c in children if c.data.tags["mlflow.parentRunId"] != parent.info.run_id]
    assert len(trial_runs) == 4 and len(seed_runs) == 8
    for trial_run in trial_runs:
        seeds = [s for s in seed_runs if s.data.tags["mlflow.parentRunId"] == trial_run.info.run_id]
        assert sorted(s.data.params["seed"] for s in seeds) == ["1", "2"]
        # The holder of the seeds reads as their configuration in the MLflow UI (sortable, filterable by l1).
        shared = {k: v for k, v in seeds[0].data.params.items() if k != "seed"}
        assert trial_run.data.params == {**shared, "seeds": "1-2"}
        mean = sum(s.data.metrics["best_val_acc"] for s in seeds) / 2
        assert trial_run.data.metrics["mean_best_val_acc"] == pytest.approx(mean)
        assert trial_run.data.metrics["ci95_low_best_val_acc"] <= mean <= trial_run.data.metrics[
            "ci95_high_best_val_acc"]
    regimes = sorted(r.data.tags["regime"] for r in trial_runs)
    assert regimes == ["l1", "l1+l2", "l2", "none"]
    for run in [parent, *children]:  # where each run came from, as on a run mlflow.start_run creates
        assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]
    # The coefficients as metrics: numbers to filter and sort by, on trial and seed runs alike.
    high = MlflowClient().search_runs([parent.info.experiment_id], filter_string="metrics.l1 > 0.0005")
    assert len(high) == 6 and {r.data.params["l1"] for r in high} == {"0.001"}  # 2 trial runs, 4 seed runs


@pytest.mark.slow
def test_two_workers_share_the_study_without_duplicates(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optimize("--trials", "4", "--storage", storage, "--workers", "2", "--pruner", "none", "--epochs", "1",
             "--sampler", "random")
    study = load(storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert len(pids) == 2  # both workers took trials
    parents, children = study_runs()
    assert len(parents) == 1 and len(children) == 4
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2, 3]


@pytest.mark.parametrize("stack", ["1", "2"])
def test_a_trial_asked_beyond_trials_by_a_worker_that_looked_too_early_fails_untrained(tracking_uri, tmp_path,
                                                                                        monkeypatch, stack):
    """Two workers that count the study one trial short at the same moment both ask one. Here the other
    worker's trials are RUNNING already and this one counted just before they appeared: its trial is failed
    with its reason before anything is suggested or logged, and the study keeps exactly --trials."""
    from regsweep.sweep import driver, stacked, study as study_module

    trials = int(stack)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    other = optuna.create_study(study_name="regsweep", storage=storage, direction="maximize")
    for _ in range(trials):
        other.ask()  # the other worker's trials, training

    def looked_too_early(study):
        real = study_module.count_toward_trials(study)
        return real - trials if len(study.trials) == trials else real

    monkeypatch.setattr(driver, "count_toward_trials", looked_too_early)
    monkeypatch.setattr(stacked, "count_toward_trials", looked_too_early)
    result = optimize("--trials", str(trials), "--stack", stack, "--storage", storage, "--epochs", "1")
    assert "0 complete, 0 pruned, 1 failed (1 over --trials, not trained)" in result.output
    states = [(t.number, t.state.name) for t in load(storage).trials]
    assert states == [*((n, "RUNNING") for n in range(trials)), (trials, "FAIL")]
    surplus = load(storage).trials[trials]
    assert surplus.user_attrs["fail_kind"] == "surplus" and surplus.params == {}
    assert "had its" in surplus.user_attrs["fail_reason"]
    _, children = study_runs()
    assert children == []  # nothing trained, nothing logged for it


def test_a_grid_point_given_to_a_surplus_trial_is_trained_when_the_study_grows(tracking_uri, tmp_path, monkeypatch):
    """GridSampler assigns a trial its point as it is asked and counts the point visited once the trial is
    finished, FAIL too: the surplus trial hands its point back, and a resume with more --trials trains it."""
    from regsweep.sweep import driver, study as study_module
    from regsweep.sweep.space import SearchSpace, make_sampler, parse_grid

    grid = "l1=0,0.001 l2=0,0.0005"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    other = optuna.create_study(study_name="regsweep", storage=storage, direction="maximize",
                                sampler=make_sampler("grid", SearchSpace(grid=parse_grid(grid)), 0))
    for _ in range(2):
        other.ask()  # another worker's trials, training grid points 0 and 1

    def looked_too_early(study):
        real = study_module.count_toward_trials(study)
        return real - 2 if len(study.trials) == 2 else real

    with monkeypatch.context() as patch:
        patch.setattr(driver, "count_toward_trials", looked_too_early)
        optimize("--grid", grid, "--trials", "2", "--stack", "1", "--storage", storage, "--epochs", "1",
                 "--heartbeat", "600")  # the other worker's trials, unclaimed, stay its own however slow this is
    surplus = load(storage).trials[2]
    assert surplus.state.name == "FAIL" and surplus.user_attrs["fail_kind"] == "surplus"
    optimize("--grid", grid, "--trials", "4", "--stack", "1", "--storage", storage, "--epochs", "1",
             "--heartbeat", "600")
    trained = [t for t in load(storage).trials if t.state.name == "COMPLETE"]
    assert sorted(t.system_attrs["grid_id"] for t in trained) == [2, 3]  # not 0 or 1 again, still running
    assert len({(t.params["l1"], t.params["l2"]) for t in trained}) == 2


@pytest.mark.parametrize("grid", [None, "l1=0,0.001 l2=0"])
def test_a_trial_whose_worker_died_before_naming_itself_is_failed_and_retried(tracking_uri, tmp_path, grid):
    """Killed between asking its trial and recording its pid: no worker to look up, no heartbeat for Optuna to
    miss. It stayed RUNNING for good, counted towards --trials, and the sweep stopped one short. Now it is failed
    and retried: on a grid, the retry trains the point the dead trial held, and each point trains once."""
    from regsweep.sweep.space import SearchSpace, make_sampler, parse_grid

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["--storage", storage, "--pruner", "none", "--epochs", "1", "--heartbeat", "1"]
    if grid:
        args += ["--grid", grid]
        optimize("--trials", "1", *args)
    if grid:  # asked as `optimize` asks it: given the point not yet trained
        sampler = make_sampler("grid", SearchSpace(grid=parse_grid(grid)), None)
        optuna.load_study(study_name="regsweep", storage=storage, sampler=sampler).ask()
    else:
        optuna.create_study(study_name="regsweep", storage=storage, direction="maximize").ask()
    time.sleep(2.5)  # longer than the grace period of --heartbeat 1
    if grid:
        assert "grid_id" in load(storage).trials[1].system_attrs
    optimize("--trials", "2" if grid else "1", *args)
    study = load(storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"] if grid else ["FAIL", "COMPLETE"]
    assert study.trials[-1].system_attrs["retry_history"] == [len(study.trials) - 2]
    if grid:
        assert sorted(t.params["l1"] for t in study.trials if t.state.name == "COMPLETE") == [0.0, 0.001]


def test_a_trial_asked_beyond_trials_by_a_worker_that_died_at_once_trains_nothing(tracking_uri, tmp_path):
    """The study had its --trials when a worker asked one more and died before suggesting anything: the next
    start fails that trial, and its retry is a surplus too. Before, a retry was taken as asked for on purpose,
    exempt from the surplus check, and the sweep trained one trial past --trials."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["--trials", "1", "--storage", storage, "--pruner", "none", "--epochs", "1", "--heartbeat", "1"]
    optimize(*args)
    load(storage).ask()
    time.sleep(2.5)  # longer than the grace period of --heartbeat 1
    optimize(*args)
    trials = load(storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL"]
    assert trials[2].system_attrs["retry_history"] == [1] and trials[2].user_attrs["fail_kind"] == "surplus"


def test_processes_that_join_a_study_at_once_draw_different_configurations(tmp_path):
    """The same command started on two machines at the same moment: each loads the study before either has asked
    a trial. Their samplers were seeded alike, from --seed and the trials they saw, and every configuration
    trained twice. Each trial's draws now follow from its number, which the storage hands out once; one process
    alone still draws the same from the same --seed."""
    from regsweep.config import TrainConfig
    from regsweep.sweep.objective import prepare_trial
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.study import SweepSettings, load_study

    def settings(name: str) -> SweepSettings:
        return SweepSettings(base=TrainConfig(), space=SearchSpace(), trials=8, study_name="at-once",
                             storage=f"sqlite:///{tmp_path / name}", experiment_name="at-once")

    together = settings("together.db")
    studies = [load_study(together), load_study(together)]  # both see no trials
    drawn = []
    for _ in range(3):
        trials = [study.ask() for study in studies]
        drawn += [prepare_trial(together, trial)[0] for trial in trials]
    assert len({tuple(sorted(p.items())) for p in drawn}) == len(drawn), drawn
    alone = load_study(settings("alone.db"))
    assert [prepare_trial(settings("alone.db"), alone.ask())[0] for _ in range(6)] == drawn
    # Machines that share a study may each give their own --seed: theirs must not be the same draws shifted.
    seeds = [dataclasses.replace(settings("seeds.db"), base=together.base.replace(seed=seed)) for seed in (1, 2)]
    studies, drawn = [load_study(seeds[0]), load_study(seeds[1])], []
    for _ in range(4):
        for study, own in zip(studies, seeds):
            drawn.append(prepare_trial(own, study.ask())[0])
    assert len({tuple(sorted(p.items())) for p in drawn}) == len(drawn), drawn


def test_a_configuration_is_retried_after_any_number_of_interruptions_but_not_after_its_worker_died_4_times(
        tmp_path):
    """MAX_RETRY bounds a configuration that kills its worker (out of memory, say), not the user's Ctrl-Cs: the
    4th Ctrl-C during the same configuration dropped it, and the line said it was queued again."""
    from regsweep.sweep.study import MAX_RETRY, queue_retry

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    on = {"l1_on": optuna.distributions.CategoricalDistribution([False, True])}

    def attempt(kind: str | None) -> bool:
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        trial = study.ask() if waiting else study.ask(on)
        if kind:
            trial.set_user_attr("fail_kind", kind)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return queue_retry(study, study.trials[trial.number])

    assert all(attempt("interrupted") for _ in range(2 * MAX_RETRY))
    assert all(attempt(None) for _ in range(MAX_RETRY))  # its worker died, 3 times: queued again each time
    assert attempt("outage")
    assert not attempt(None)  # a 4th death
    assert {t.params["l1_on"] for t in study.trials} == {study.trials[0].params["l1_on"]}  # one configuration


def test_a_dead_workers_line_says_whether_its_trial_is_queued_again():
    from regsweep.sweep.driver import WorkerFailure

    assert str(WorkerFailure([0, -9], [7, 8], {7})) == (
        "worker 1 was killed by SIGKILL; trial 7, left running, is failed and queued again; trial 8, left running, "
        "is failed, not queued again (its configuration's workers died 4 times)")


def test_the_same_command_started_twice_at_once_on_new_stores_trains_each_configuration_once(tracking_uri, tmp_path):
    """As the same command starts on two machines, here on one, at the same moment, against new SQLite stores. The
    second process failed at once: MLflow's and Optuna's migrations, each making the new file's tables, tripped
    over each other ("table experiments already exists"). And the two drew the same configurations."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = """
import mlflow, optuna, torch
from regsweep.cli import cli
ready()  # both past their imports: the stores are opened at the same moment
cli(sys.argv[1:])
"""
    args = [*SMALL, "--epochs", "1", "--trials", "4", "--pruner", "none", "--threads", "1", "--storage", storage]
    in_step(script, "optimize", *args, rounds=1, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
    trials = load(storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({t.user_attrs["config_key"] for t in trials}) == 4
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2


def test_processes_asking_at_once_claim_a_queued_trial_once_and_fail_a_dead_one_once(tmp_path):
    """Optuna reads a trial, then writes it, trusting a row lock that SQLite does not have: two processes asking
    at the same moment both took the one queued retry, and two starting after a worker died both failed its trial
    and queued two retries (this test failed 2 runs of 2 without the fix). open_storage makes every SQLite
    transaction take the write lock first."""
    storage, rounds = f"sqlite:///{tmp_path / 'optuna.db'}", 6
    dead = subprocess.Popen(["true"])
    dead.wait()
    for k in range(rounds):
        study = optuna.create_study(study_name=f"queued-{k}", storage=storage)
        study.enqueue_trial({"x": 1.0})
        study = optuna.create_study(study_name=f"dead-{k}", storage=storage)
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid})
    script = f"""
import types, optuna
from regsweep.sweep.study import StaleTrialHandler, open_storage, reap_dead_local_trials
storage = open_storage(types.SimpleNamespace(storage=sys.argv[1], heartbeat=60))
for k in range({rounds}):
    study = optuna.load_study(study_name=f"queued-{{k}}", storage=storage)
    ready()
    print(study.ask().number, flush=True)
for k in range({rounds}):
    study = optuna.load_study(study_name=f"dead-{{k}}", storage=storage)
    ready()
    reap_dead_local_trials(study, StaleTrialHandler())
"""
    asked = in_step(script, storage, rounds=2 * rounds)
    assert all(sorted(numbers) == ["0", "1"] for numbers in zip(*asked))  # the queued trial 0 once, then a new one
    for k in range(rounds):
        states = [t.state.name for t in load(storage, f"dead-{k}").trials]
        assert states == ["FAIL", "WAITING"]  # failed once, one retry queued


def test_processes_finishing_a_study_at_once_leave_its_trials_table_whole(tracking_uri, tmp_path):
    """Every command that ends a sweep rewrites the study's trials table on the parent run, and two may end at
    the same moment. The table was made by the first to finish: two that both found it missing both made it, and
    MLflow's log_table appended the second's rows to the first's, or raced on its tag."""
    from regsweep.config import TrainConfig
    from regsweep.sweep.runs import TRIALS_TABLE, find_or_create_parent
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.study import SweepSettings

    storage, rounds = f"sqlite:///{tmp_path / 'optuna.db'}", 8
    client = MlflowClient()
    experiment_id = client.create_experiment("finish")
    parents = []
    for k in range(rounds):
        settings = SweepSettings(base=TrainConfig(), space=SearchSpace(), trials=3, study_name=f"finish-{k}",
                                 storage=storage, experiment_name="finish")
        study = optuna.create_study(study_name=settings.study_name, storage=storage, direction="maximize")
        parents.append(find_or_create_parent(settings, study, experiment_id))
        for value in (0.9, 0.8, 0.7):
            study.add_trial(optuna.trial.create_trial(params={"l1": value / 1000}, value=value, distributions={
                "l1": optuna.distributions.FloatDistribution(0, 1)}))
    script = f"""
import optuna
from mlflow.tracking import MlflowClient
from regsweep.sweep.runs import log_trials_table
client = MlflowClient()
for k, parent in enumerate({parents!r}):
    study = optuna.load_study(study_name=f"finish-{{k}}", storage=sys.argv[1])
    ready()
    log_trials_table(client, study, parent)
"""
    in_step(script, storage, rounds=rounds, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
    for parent in parents:
        assert len(client.load_table(client.get_run(parent).info.experiment_id, TRIALS_TABLE, [parent])) == 3
        assert client.get_run(parent).data.tags["mlflow.loggedArtifacts"].count(TRIALS_TABLE) == 1


def test_queued_trials_run_even_where_the_study_has_its_trials(tracking_uri, tmp_path):
    """A trial given with enqueue_trial after the study is done, and the retry a worker on another host queued
    before it was killed (its trial still RUNNING): each was asked for on purpose and trains, not a surplus."""
    from regsweep.sweep.study import queue_retry

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="regsweep", storage=storage, direction="maximize")
    elsewhere = study.ask({"l1_on": optuna.distributions.CategoricalDistribution([False, True])})
    elsewhere.set_user_attr("worker", {"host": "elsewhere", "pid": 1})
    assert queue_retry(study, study.trials[0])
    optimize("--trials", "1", "--storage", storage, "--pruner", "none", "--epochs", "1")
    load(storage).enqueue_trial({"l1_on": True, "l2_on": False, "l1": 1e-3})
    optimize("--trials", "1", "--storage", storage, "--pruner", "none", "--epochs", "1")
    states = [(t.number, t.state.name) for t in load(storage).trials]
    assert states == [(0, "RUNNING"), (1, "COMPLETE"), (2, "COMPLETE")], states


def test_divergent_trial_is_pruned_with_its_reason_and_the_sweep_goes_on(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = optimize("--trials", "2", "--storage", storage, "--l1-range", "1e6", "1e7", "--no-l1-zero", "--lr",
                      "10", "--norm", "none", "--epochs", "1", "--pruner", "none")
    study = load(storage)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    # The command says so: not a sweep of pruned trials that only looks short of a best trial.
    assert "0 complete, 2 pruned (2 of them diverged), 0 failed" in result.output
    assert "no trial completed, so there is no best trial; 2 diverged (e.g. diverged: training loss is nan" in \
        result.output
    _, children = study_runs()
    for run in children:
        assert run.data.tags["regsweep.stop_reason"].startswith("diverged: training loss is nan")
        assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "PRUNED"


# `python -c SLOW_EPOCHS seconds optimize ...`: regsweep with every training epoch followed by a pause, so that a
# test can stop a sweep mid-trial and resume it with the same (few) epochs. Not in spawned worker processes.
SLOW_EPOCHS = """if True:
    import sys, time
    import regsweep.training as training
    pause, epoch = float(sys.argv.pop(1)), training.train_epoch
    def slow_epoch(*args, **kwargs):
        out = epoch(*args, **kwargs)
        time.sleep(pause)
        return out
    training.train_epoch = slow_epoch
    from regsweep.cli import cli
    cli(sys.argv[1:], prog_name="regsweep")
"""


def start_until_a_trial_trains(tracking_uri: str, args: list[str], capture: bool = False, pause: float = 0.0):
    """Start a sweep in a subprocess (each epoch followed by `pause` seconds); return it and the first trial run
    that has logged an epoch. With `capture`, its output is piped (read it with communicate, which also waits
    for whatever inherited it)."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EPOCHS, str(pause), "optimize", *args],
                            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, stdout=out, stderr=out,
                            text=True)
    client = MlflowClient()
    deadline, victim = time.time() + 180, None
    while time.time() < deadline and victim is None:
        time.sleep(0.5)
        exp = client.get_experiment_by_name("regsweep")
        for run in client.search_runs([exp.experiment_id]) if exp else []:
            if "optuna.trial_number" in run.data.tags and client.get_metric_history(run.info.run_id, "val/acc"):
                victim = run
                break
    assert victim is not None, "no trial started training"
    return proc, victim


KILL_EPOCHS = "4"  # of a sweep stopped mid-trial, each followed by a 2 s pause; a resume must train as many


def start_and_kill_mid_trial(tracking_uri: str, storage: str, sig: int, *more: str):
    """Start a slow sweep in a subprocess, wait until a trial has logged an epoch, send `sig`."""
    proc, victim = start_until_a_trial_trains(tracking_uri, [*SMALL, "--epochs", KILL_EPOCHS, "--trials", "2",
                                                             "--storage", storage, "--pruner", "none", *more],
                                              pause=2.0)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return victim


@pytest.mark.slow
def test_sigterm_ends_parent_and_trial_killed_and_resume_reruns_the_trial(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    victim = start_and_kill_mid_trial(tracking_uri, storage, signal.SIGTERM)
    client = MlflowClient()
    assert client.get_run(victim.info.run_id).info.status == "KILLED"
    (parent,), _ = study_runs()
    assert parent.info.status == "KILLED"
    assert parent.data.tags["regsweep.stop_reason"].startswith("interrupted (Ctrl-C or SIGTERM) while trials trained")
    study = load(storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert study.trials[1].params == study.trials[0].params  # queued as it was
    assert study.trials[1].system_attrs["failed_trial"] == 0
    assert study.trials[0].user_attrs["fail_kind"] == "interrupted"

    optimize("--epochs", KILL_EPOCHS, "--trials", "2", "--storage", storage, "--pruner", "none")  # its settings
    study = load(storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params  # the interrupted configuration ran again
    (parent,), children = study_runs()
    assert parent.info.status == "FINISHED" and all(c.info.status != "RUNNING" for c in children)
    assert "regsweep.stop_reason" not in parent.data.tags  # why the first start stopped is not this one's story


@pytest.mark.slow
def test_sigkilled_worker_trial_is_failed_its_run_killed_and_retried_on_resume(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    victim = start_and_kill_mid_trial(tracking_uri, storage, signal.SIGKILL)
    client = MlflowClient()
    assert client.get_run(victim.info.run_id).info.status == "RUNNING"  # nobody could mark it

    optimize("--epochs", KILL_EPOCHS, "--trials", "2", "--storage", storage, "--pruner", "none")  # resume
    killed = client.get_run(victim.info.run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["optuna.state"] == "FAIL" and "worker died" in killed.data.tags["regsweep.stop_reason"]
    study = load(storage)
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 2
    (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed.number == int(victim.data.tags["optuna.trial_number"])
    assert any(t.params == failed.params and t.state.name == "COMPLETE" for t in study.trials), \
        "the killed trial's parameters were not run again"
    retried_runs = [r for r in study_runs()[1] if r.data.tags.get("optuna.retry_of_trial") ==
                    victim.data.tags["optuna.trial_number"]]
    assert len(retried_runs) == 1 and retried_runs[0].info.status == "FINISHED"
    for run in study_runs()[1]:
        assert run.info.status != "RUNNING"


@pytest.mark.slow
def test_a_killed_worker_process_ends_the_sweep_killed_with_exit_1_and_resume_reruns_its_trial(tracking_uri,
                                                                                              tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc, victim = start_until_a_trial_trains(tracking_uri, [
        *SMALL, "--epochs", "12", "--trials", "2", "--workers", "2", "--storage", storage, "--pruner", "none",
        "--sampler", "random"], capture=True)
    client = MlflowClient()
    worker_pid = int(victim.data.tags["regsweep.worker"].rsplit(":", 1)[1])
    assert worker_pid != proc.pid  # a worker process, not the driver
    os.kill(worker_pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=180)

    assert proc.returncode == 1, stderr
    assert "was killed by SIGKILL" in stderr and "Run again with: regsweep optimize" in stderr
    assert f"trial {victim.data.tags['optuna.trial_number']}, left running, is failed and queued again" in stderr
    (parent,), _ = study_runs()
    assert parent.info.status == "KILLED" and "killed by SIGKILL" in parent.data.tags["regsweep.stop_reason"]
    killed = client.get_run(victim.info.run_id)
    assert killed.info.status == "KILLED" and "worker died" in killed.data.tags["regsweep.stop_reason"]
    study = load(storage)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "FAIL", "WAITING"]  # the other worker finished; the dead one's trial queued
    (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed.number == int(victim.data.tags["optuna.trial_number"])

    optimize("--epochs", "12", "--trials", "2", "--storage", storage, "--pruner", "none", "--sampler", "random")
    study = load(storage)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert any(t.params == failed.params and t.state.name == "COMPLETE" for t in study.trials)
    (parent,), children = study_runs()
    assert parent.info.status == "FINISHED" and all(c.info.status != "RUNNING" for c in children)


@pytest.mark.parametrize("args, message", [
    (["--l1-range", "0.01", "0.001"], "--l1-range needs 0 < LOW <= HIGH"),
    (["--l2-range", "-1", "0.1"], "--l2-range needs 0 < LOW <= HIGH"),
    (["--sampler", "cmaes"], "'cmaes' is not one of 'tpe', 'random', 'grid'"),
    (["--grid", "l1=0,abc"], "malformed --grid values"),
    (["--grid", "l3=0.1"], "malformed --grid entry 'l3=0.1'"),
    (["--grid", "l1=-0.1"], "grid values for l1 must be finite and >= 0"),
    (["--sampler", "grid"], "--sampler grid needs --grid"),
    (["--grid", "l1=0,0.001", "--sampler", "tpe"], "it cannot be combined with --sampler tpe"),
    (["--grid", "l1=0,0.001", "--trials", "3"], "--trials 3 is more than the grid's 2 configurations"),
    (["--trials", "0"], "0 is not in the range x>=1"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--storage", "redis://localhost"], "unsupported --storage"),
    (["--storage", "sqlite:///:memory:"], "keeps the study in memory"),
    (["--grid", ""], "--grid is empty"),
    (["--stack", "²"], "--stack must be auto or a whole number >= 1"),
    (["--timeout", "nan"], "nan is not a number of seconds"),
    (["--threads", str(2**40)], "threads must be at most 4096"),
    (["--experiment-name", " "], "the MLflow experiment name is empty"),
    (["--experiment-name", "x" * 501], "MLflow takes experiment names of at most 500 characters, not 501"),
    (["--heartbeat", str(10**11)], "is not in the range 1<=x<=86400"),  # past threading's timeout: no heartbeats
    (["--seed", str(2**63 - 2), "--repeats", "3"], "gives seeds of 2**63 and more"),
    (["--repeats", str(10**20)], "gives seeds of 2**63 and more"),
    (["--study-name", "regsweep-write-check"], "is regsweep's own"),  # deleted again by every start
    (["--study-name", ""], "the Optuna study name is empty"),  # not the default, quietly
    (["--study-name", "s" * 513], "Optuna takes study names of at most 512 characters, not 513"),
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (["--l1", "0.001"], "optimize searches l1: give its range (--l1-range LOW HIGH) or values (--grid \"l1=0,0.001\")"),
    (["--lr", "1e39"], "lr must be at most 3.403e+38 (float32)"),
])
def test_bad_sweep_input_exits_2_before_anything_is_created(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(cli, ["optimize", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
    assert not Path(tmp_path / "mlruns").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncated", "cannot read MNIST from"),
    ("test images as training images", "are not 60,000 training and 10,000 test images"),
    ("labels past 9", "are not digits 0-9 (read 0 to 200)"),
    ("a malformed SHA256SUMS", "cannot prepare the MNIST files"),
    ("MNIST a file", "cannot prepare the MNIST files"),
])
def test_damaged_data_exits_2_before_anything_is_created(tmp_path, monkeypatch, damage, message):
    """train and optimize alike: one line, exit 2, no study and no run (optimize used to read the data only in
    its workers, after both existed)."""
    import shutil

    from regsweep.config import default_data_dir

    source, data = Path(default_data_dir()), tmp_path / "data"
    if damage in ("truncated", "test images as training images", "labels past 9"):
        raw = data / "MNIST" / "raw"
        shutil.copytree(source / "MNIST" / "raw", raw)
        images = raw / "train-images-idx3-ubyte"
        if damage == "truncated":
            images.write_bytes(images.read_bytes()[:1_000_000])
        elif damage == "labels past 9":  # the raw files have no checksums to catch it, unlike the vendored ones
            labels = bytearray((raw / "train-labels-idx1-ubyte").read_bytes())
            labels[8:20] = bytes([200]) * 12
            (raw / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
        else:
            shutil.copy(raw / "t10k-images-idx3-ubyte", images)
    else:
        shutil.copytree(source / "mnist", data / "mnist")
        if damage == "a malformed SHA256SUMS":
            with open(data / "mnist" / "SHA256SUMS", "a") as sums:
                sums.write("one two three\n")
        else:
            (data / "MNIST").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for command in (["train"], ["optimize", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]):
        result = CliRunner().invoke(cli, [*command, "--data-dir", str(data)])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], result.output
        assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("directions", [["minimize"], ["maximize", "maximize"]])
def test_a_study_of_the_same_name_made_by_another_tool_is_refused(tmp_path, monkeypatch, directions):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="regsweep", storage=storage, directions=directions)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(cli, ["optimize", *SMALL, "--storage", storage])
    assert result.exit_code == 2 and "is not a regsweep study" in result.output, result.output
    assert not (tmp_path / "mlflow.db").exists() and load(storage).trials == []


@pytest.mark.parametrize("study_name", ["regsweep", "new"])
def test_a_storage_that_cannot_be_written_is_refused_before_anything_is_created(tmp_path, monkeypatch, study_name):
    """A read-only database used to look unreachable: exit 75 and advice to run again, which never helps."""
    path = tmp_path / "optuna.db"
    optuna.create_study(study_name="regsweep", storage=f"sqlite:///{path}", direction="maximize")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    result = CliRunner().invoke(cli, ["optimize", *SMALL, "--storage", read_only, "--study-name", study_name])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be written (attempt to write a readonly database)" in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists()
    assert optuna.get_all_study_names(f"sqlite:///{path}") == ["regsweep"] and load(f"sqlite:///{path}").trials == []


def test_the_write_check_leaves_no_study_behind_and_says_nothing(tmp_path, caplog, monkeypatch):
    import logging

    from regsweep.config import TrainConfig
    from regsweep.sweep import SearchSpace, SweepSettings
    from regsweep.sweep.study import check_writable

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setattr(logging.getLogger("optuna"), "propagate", True)  # to caplog, as Optuna prints it
    caplog.set_level(logging.INFO)
    settings = SweepSettings(base=TrainConfig(), space=SearchSpace(), trials=1, study_name="s", storage=storage,
                             experiment_name="e")
    check_writable(settings)
    assert optuna.get_all_study_names(storage) == []
    assert not [r for r in caplog.records if "write-check" in r.getMessage()]
    # One left behind by a start killed between making and deleting it goes with the next check.
    optuna.create_study(study_name="regsweep-write-check", storage=storage)
    check_writable(settings)
    assert optuna.get_all_study_names(storage) == []


def test_resuming_a_study_elsewhere_than_its_parent_run_is_refused_before_any_run(tracking_uri, tmp_path):
    """Under another experiment its new runs would be apart from its earlier ones; under a deleted parent run
    there is nothing to log to."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def run(trials: str, experiment: str, expect: int = 0):
        return optimize("--trials", trials, "--epochs", "1", "--storage", storage, "--study-name", "s",
                        "--experiment-name", experiment, expect=expect)

    run("1", "first")
    (parent,), _ = study_runs("first")
    result = run("2", "second", expect=2)
    assert "logs into MLflow experiment 'first'; resume it with --experiment-name 'first'" in result.output
    MlflowClient().delete_run(parent.info.run_id)
    result = run("2", "first", expect=2)
    assert f"parent run {parent.info.run_id} is deleted" in result.output
    assert f"mlflow runs restore --run-id {parent.info.run_id}" in result.output
    assert len(load(storage, "s").trials) == 1 and MlflowClient().get_experiment_by_name("second") is None
    MlflowClient().restore_run(parent.info.run_id)
    run("2", "first")
    (parent,), children = study_runs("first")
    assert parent.info.status == "FINISHED" and len(children) == 2


@pytest.mark.slow
def test_a_seed_beyond_numpys_range_trains_and_seeds_the_sampler(tracking_uri, tmp_path):
    """--seed is a training seed (torch takes up to 2**64); the samplers' numpy takes seeds below 2**32."""
    optimize("--trials", "1", "--epochs", "1", "--seed", str(2**32 + 5), "--storage",
             f"sqlite:///{tmp_path / 'optuna.db'}", "--sampler", "random")
    (parent,), (child,) = study_runs()
    assert parent.info.status == child.info.status == "FINISHED" and child.data.params["seed"] == str(2**32 + 5)


def test_journal_file_storage_runs_and_resumes(tracking_uri, tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "study.journal"
    optimize("--trials", "1", "--storage", f"journal:{journal}", "--pruner", "none", "--epochs", "1")
    optimize("--trials", "2", "--storage", f"journal:{journal}", "--pruner", "none", "--epochs", "1")
    study = optuna.load_study(study_name="regsweep", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    parents, children = study_runs()
    assert len(parents) == 1 and len(children) == 2


def test_a_duplicate_configuration_reuses_the_finished_result_instead_of_training(tracking_uri, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    queued = optuna.create_study(study_name="regsweep", storage=storage, direction="maximize")
    for _ in range(2):  # as a user, or a retry of an interrupted trial, would queue it
        queued.enqueue_trial({"l1_on": False, "l2_on": False}, skip_if_exists=False)
    optimize("--trials", "2", "--storage", storage, "--pruner", "none", "--epochs", "1")
    first, second = load(storage).trials
    assert first.state.name == second.state.name == "COMPLETE"
    assert second.value == first.value and second.user_attrs["reused_trial"] == 0
    assert second.intermediate_values == first.intermediate_values
    _, children = study_runs()
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    original, reused = by_number[0], by_number[1]
    assert reused.data.tags["regsweep.reused_run"] == original.info.run_id
    assert reused.info.status == "FINISHED" and reused.data.params["l1"] == "0.0"
    assert "best_val_acc" in original.data.metrics  # trained once: the reused run has only the coefficients
    assert reused.data.metrics == {"l1": 0.0, "l2": 0.0}


def test_a_trial_is_never_pruned_at_its_last_step():
    """By then it has trained in full: pruning would only throw its result away."""
    from regsweep.sweep.space import prunable

    assert [prunable(epoch, 3) for epoch in (1, 2, 3)] == [False, True, False]
    assert prunable(3, 3, last_seed=False)  # an earlier seed's last epoch: the later seeds are still to train


def test_an_interrupted_repeat_ends_its_trial_run_killed_and_tags_only_the_seed_it_stopped(tracking_uri, tmp_path,
                                                                                           monkeypatch):
    from regsweep import tracking

    real, seeds = tracking.run_training, []

    def second_seed_interrupted(cfg, data, *, on_epoch=None, **kwargs):
        seeds.append(cfg.seed)

        def hook(epoch, metrics):
            if len(seeds) == 2:
                raise KeyboardInterrupt
            return on_epoch(epoch, metrics)
        return real(cfg, data, on_epoch=hook, **kwargs)

    monkeypatch.setattr(tracking, "run_training", second_seed_interrupted)
    optimize("--trials", "1", "--repeats", "2", "--epochs", "1", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
             expect=130)  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C
    _, children = study_runs()
    holder = next(c for c in children if "seeds" in c.data.params)
    first, second = (next(c for c in children if c.data.params.get("seed") == s) for s in ("1", "2"))
    assert (holder.info.status, first.info.status, second.info.status) == ("KILLED", "FINISHED", "KILLED")
    assert "interrupted" in holder.data.tags["regsweep.stop_reason"]
    assert "interrupted" in second.data.tags["regsweep.stop_reason"]
    assert "regsweep.stop_reason" not in first.data.tags  # it trained in full before the interrupt


def test_once_both_off_is_taken_the_space_no_longer_offers_it():
    from regsweep.sweep import SearchSpace, suggest_penalties

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    offered = [suggest_penalties(study.ask(), SearchSpace(), both_off_taken=True) for _ in range(40)]
    assert (0.0, 0.0) not in {(p["l1"], p["l2"]) for p in offered}
    assert any(p["l1"] == 0 for p in offered) and any(p["l2"] == 0 for p in offered)  # each alone still is


def test_a_retried_trial_trains_the_penalties_it_was_queued_with():
    """A trial whose L2 was on without a choice (L1 off, the unregularised configuration taken), queued again:
    it trains that L2 even once the unregularised configuration is no longer taken."""
    from regsweep.sweep.space import SearchSpace, suggest_penalties

    space = SearchSpace()
    dists = space.distributions()
    for seed in range(8):  # the sampler would pick l2_on at random: every pick must keep L2 on
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))  # in memory
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING,
                                                  params={"l1_on": False, "l2": 1e-3},
                                                  distributions={k: dists[k] for k in ("l1_on", "l2")}))
        trial = study.ask()
        assert suggest_penalties(trial, space, both_off_taken=False) == {"l1": 0.0, "l2": 1e-3}


@pytest.mark.slow
def test_default_space_trains_both_off_only_once(tracking_uri, tmp_path):
    # With seed 1, TPE's random start proposed "both off" for trials 2 and 3.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optimize("--trials", "4", "--storage", storage, "--pruner", "none", "--epochs", "1")
    study = load(storage)
    configs = [(t.params.get("l1", 0.0), t.params.get("l2", 0.0)) for t in study.trials]
    assert len(configs) == 4 and configs.count((0.0, 0.0)) == 1 and len(set(configs)) == 4
    assert study.metric_names == ["best_val_acc"]


def test_two_commands_racing_to_create_a_study_keep_one_parent_run(tracking_uri, tmp_path):
    """Two commands that start the same study at the same moment each create a parent run before either has
    recorded one in the study: both must end up with the earliest, and the other is deleted. A parent of an
    earlier study of the same name, from before any such race, is not taken over."""
    from regsweep.config import TrainConfig
    from regsweep.sweep.runs import find_or_create_parent, parent_tags
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.study import SweepSettings, load_study

    settings = SweepSettings(base=TrainConfig(), space=SearchSpace(), trials=2, study_name="race",
                             storage=f"sqlite:///{tmp_path / 'optuna.db'}", experiment_name="race")
    client = MlflowClient()
    experiment_id = client.create_experiment("race")
    now = int(time.time() * 1000)
    old = client.create_run(experiment_id, start_time=now - 3_600_000, tags=parent_tags(settings))  # a past study
    other = client.create_run(experiment_id, start_time=now - 500, tags=parent_tags(settings))  # the other command
    elsewhere = client.create_run(experiment_id, start_time=now - 400,  # another storage's study of that name
                                  tags=parent_tags(SweepSettings(**{**settings.__dict__, "storage": "sqlite:///x.db"})))
    study = load_study(settings)
    assert "mlflow_parent_run_id" not in study.user_attrs  # the other command has not recorded its parent yet

    assert find_or_create_parent(settings, study, experiment_id) == other.info.run_id
    assert study.user_attrs["mlflow_parent_run_id"] == other.info.run_id
    active = {r.info.run_id for r in client.search_runs([experiment_id])}
    assert active == {old.info.run_id, other.info.run_id, elsewhere.info.run_id}  # this command's own: deleted
    assert find_or_create_parent(settings, load_study(settings), experiment_id) == other.info.run_id  # a resume


def test_a_trial_is_queued_again_once_however_often_it_is_found_failed():
    """A worker that queued its trial's retry and was killed before failing the trial leaves it RUNNING: the
    next start fails it and would queue it a second time."""
    from regsweep.sweep.study import queue_retry, requeue_interrupted

    study = optuna.create_study(direction="maximize")  # in memory: only the study's bookkeeping is tested
    trial = study.ask({"l1": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    frozen = study.trials[0]
    assert queue_retry(study, frozen) and not queue_retry(study, frozen) and requeue_interrupted(study) == []
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]


def test_a_study_holding_its_grid_in_another_order_resumes_in_that_order():
    """Grids are read sorted; a study started before that may hold '--grid l1=0.001,0' as written. Optuna compares
    a categorical's order (and a trial's grid_id indexes it): the study's order is kept, not refused."""
    from regsweep.config import ConfigError
    from regsweep.sweep.space import SearchSpace, parse_grid

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        params={"l1": 0.001, "l2": 0.0}, value=0.9,
        distributions={"l1": optuna.distributions.CategoricalDistribution([0.001, 0.0]),
                       "l2": optuna.distributions.CategoricalDistribution([0.0])}))
    space = SearchSpace(grid=parse_grid("l1=0.001,0")).check_resumable(study.trials)
    assert space.grid == {"l1": (0.001, 0.0)}
    for name, dist in space.distributions().items():  # what Optuna checks as the next trial asks
        optuna.distributions.check_distribution_compatibility(study.trials[0].distributions[name], dist)
    with pytest.raises(ConfigError, match="searched l1 as one of 0.001, 0.0, not one of 0.0, 0.002"):
        SearchSpace(grid=parse_grid("l1=0,0.002")).check_resumable(study.trials)


def test_the_retry_of_a_grid_trial_keeps_its_grid_point_and_the_grid_is_trained_whole():
    """GridSampler keeps a trial's grid point in its system attributes: a retry without them was given the next
    point, trained the failed one's parameters on it, and that point was never trained."""
    from regsweep.sweep.space import SearchSpace, make_sampler, parse_grid, suggest_penalties
    from regsweep.sweep.stacked import tell_study
    from regsweep.sweep.study import queue_retry

    space = SearchSpace(grid=parse_grid("l1=0,0.001"))
    study = optuna.create_study(direction="maximize", sampler=make_sampler("grid", space, 0))
    first = study.ask()
    suggest_penalties(first, space)
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # interrupted
    assert queue_retry(study, study.trials[0])
    trained = []
    for _ in range(2):
        trial = study.ask()
        trained.append(suggest_penalties(trial, space))
        tell_study(trial, 0.5)  # as the stacked sweep tells: GridSampler asks a finished grid to stop
    assert sorted(p["l1"] for p in trained) == [0.0, 0.001]
    assert study.trials[1].system_attrs["grid_id"] == study.trials[0].system_attrs["grid_id"]


def test_terminal_status_ignores_the_second_signal_while_the_runs_end_and_not_the_third():
    from regsweep.signals import terminal_status

    previous, ended = signal.getsignal(signal.SIGTERM), []
    with pytest.raises(KeyboardInterrupt):
        with terminal_status():
            with terminal_status():  # a run inside a sweep: the outer block holds the signals
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(1)  # the handler runs here
                    raise AssertionError("SIGTERM did not interrupt")
                finally:  # ending the runs: the second signal (a worker's Ctrl-C, then its driver's SIGTERM)
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.2)
                    ended.append(True)
    assert ended and signal.getsignal(signal.SIGTERM) == previous
    interrupted = []
    with pytest.raises(KeyboardInterrupt):  # the next block counts afresh; a third signal ends the stop too
        with terminal_status():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(1)
                except KeyboardInterrupt:
                    interrupted.append(True)
                    raise
    assert interrupted


def test_a_held_signal_is_raised_once_the_outermost_block_ends_and_a_third_is_not_held():
    from regsweep.signals import signals_held, terminal_status

    done = []
    with pytest.raises(KeyboardInterrupt):
        with terminal_status():
            with signals_held():
                with signals_held():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.2)
                    done.append("inner")
                done.append("outer")
            done.append("after")  # not reached: raised as the outer block ends
    assert done == ["inner", "outer"]
    with pytest.raises(KeyboardInterrupt):
        with terminal_status():
            with pytest.raises(ValueError):  # what the block raises itself goes first; the held signal is dropped
                with signals_held():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.2)
                    raise ValueError("the block's own")
            os.kill(os.getpid(), signal.SIGTERM)  # and the next one counts as a first, not as the ignored second
            time.sleep(1)
            done.append("not reached")
    with pytest.raises(KeyboardInterrupt):
        with terminal_status():
            with signals_held():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    os.kill(os.getpid(), sig)
                    time.sleep(0.2)
                done.append("held")
                os.kill(os.getpid(), signal.SIGTERM)  # whoever insists
                time.sleep(1)
                done.append("not reached")
    assert done[2:] == ["held"]


def test_a_signal_while_a_repeated_trial_ends_its_runs_waits_and_the_trial_counts(tracking_uri, tmp_path):
    """SIGTERM as a trial that trained to its end has its runs ended (sent by the sweep itself as it begins
    that): the runs end as they were ending, the trial is told COMPLETE, and then the sweep stops. Before, the
    signal cut the ending short and left the trial's own run RUNNING, and the trial was failed and retrained."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = signalled_on_call("regsweep.sweep.objective", "summarise_repeats", "SIGTERM")
    args = [*SMALL, "--trials", "2", "--epochs", "1", "--repeats", "2", "--storage", storage, "--pruner", "none"]
    proc = subprocess.run([sys.executable, "-c", script, "optimize", *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert ("Error: interrupted: after trial 0, which had trained to its end and is COMPLETE; the parent run ended "
            "KILLED") in proc.stderr
    (parent,), runs = study_runs()
    assert parent.info.status == "KILLED" and sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert all(r.data.tags["optuna.state"] == "COMPLETE" for r in runs)
    assert [t.state.name for t in load(storage).trials] == ["COMPLETE"]


@pytest.mark.parametrize("function", ["log_outcome", "end_active_run"])
def test_a_signal_as_a_trial_logs_its_outcome_waits_and_the_trial_counts(tracking_uri, tmp_path, function):
    """SIGTERM as a trial's only run logs its summary and figures, or as that run is ended (one by one, the CPU's
    default): the run ends FINISHED, complete, the trial is told COMPLETE, and then the sweep stops, with nothing
    queued to train again. Before, the trial was failed as interrupted and trained again on resume, though its
    run had finished."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = signalled_on_call("regsweep.tracking", function, "SIGTERM")
    args = [*SMALL, "--trials", "2", "--epochs", "1", "--storage", storage, "--pruner", "none"]
    proc = subprocess.run([sys.executable, "-c", script, "optimize", *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert ("Error: interrupted: after trial 0, which had trained to its end and is COMPLETE; the parent run ended "
            "KILLED") in proc.stderr
    (parent,), (run,) = study_runs()
    assert (run.info.status, run.data.tags["optuna.state"]) == ("FINISHED", "COMPLETE")
    assert "regsweep.stop_reason" not in run.data.tags and "test_macro_f1_at_best_val" in run.data.metrics
    assert [t.state.name for t in load(storage).trials] == ["COMPLETE"]


def test_the_ended_runs_of_a_failed_trial_are_tagged_fail_and_deleted_ones_are_left_alone(tracking_uri, tmp_path):
    """Killed between a run's end and the study being told: the run says COMPLETE, its trial FAIL. The next
    start tags it FAIL with the trial's reason; a run of such a trial deleted in MLflow is skipped, not a crash."""
    from regsweep.config import TrainConfig
    from regsweep.sweep import SearchSpace, SweepSettings
    from regsweep.sweep.driver import reconcile

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optimize("--trials", "1", "--storage", storage, "--pruner", "none", "--epochs", "1")
    (_parent,), (run,) = study_runs()
    client = MlflowClient()
    gone = client.create_run(run.info.experiment_id, tags={"optuna.state": "COMPLETE"}).info.run_id
    client.set_terminated(gone)
    client.delete_run(gone)
    study = load(storage)
    trial = study.ask()
    trial.set_user_attr("mlflow_run_ids", [run.info.run_id, gone])
    trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or SIGTERM)")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    settings = SweepSettings(base=TrainConfig(), space=SearchSpace(), trials=1, study_name="regsweep",
                             storage=storage, experiment_name="regsweep")
    reconcile(settings, load(storage), run.info.experiment_id, tracking_uri)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["optuna.state"] == "FAIL"
    assert tags["regsweep.stop_reason"] == "trial 1 ended FAIL after this run ended: interrupted (Ctrl-C or SIGTERM)"
    assert client.get_run(gone).data.tags["optuna.state"] == "COMPLETE"


def test_a_finished_trials_run_is_left_to_its_worker_while_that_may_still_end_it(tracking_uri, tmp_path):
    """A stack with --repeats tells a trial before it ends the trial's run. Another command reconciling the study
    in between (starting, or ending its own sweep) ended that run KILLED, saying its worker had stopped. It now
    leaves it while the worker lives (this host) or for the heartbeat's grace period (another host)."""
    import datetime

    from regsweep.config import TrainConfig
    from regsweep.sweep import SearchSpace, SweepSettings
    from regsweep.sweep.driver import reconcile

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="regsweep", storage=storage, direction="maximize")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    now, ten_minutes = datetime.datetime.now(), datetime.timedelta(minutes=10)
    # The fourth: a host whose clock runs ahead (another time zone) is not waited for as long as it is ahead. The
    # last: the reconciling process itself, which is not ending any run while it reconciles.
    workers = [(socket.gethostname(), alive.pid, now), ("elsewhere", 1, now), ("elsewhere", 1, now - ten_minutes),
               ("elsewhere", 1, now + ten_minutes), (socket.gethostname(), os.getpid(), now)]
    for host, pid, told in workers:
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, trial_id=0, state=optuna.trial.TrialState.COMPLETE, value=0.9, values=None, params={},
            distributions={}, user_attrs={"worker": {"host": host, "pid": pid}}, system_attrs={},
            intermediate_values={}, datetime_start=told, datetime_complete=told))
    client = MlflowClient()
    experiment_id = client.create_experiment("regsweep")
    runs = [client.create_run(experiment_id, tags={"regsweep.study": "regsweep", "optuna.trial_number": str(n)})
            .info.run_id for n in range(len(workers))]
    settings = SweepSettings(base=TrainConfig(), space=SearchSpace(), trials=3, study_name="regsweep",
                             storage=storage, experiment_name="regsweep", heartbeat=60)
    try:
        reconcile(settings, load(storage), experiment_id, tracking_uri)
        assert [client.get_run(r).info.status for r in runs] == ["RUNNING", "RUNNING", "KILLED", "KILLED", "KILLED"]
    finally:
        alive.kill()
        alive.wait()
    reconcile(settings, load(storage), experiment_id, tracking_uri)
    assert [client.get_run(r).info.status for r in runs] == ["KILLED", "RUNNING", "KILLED", "KILLED", "KILLED"]
    assert client.get_run(runs[0]).data.tags["regsweep.stop_reason"].startswith("trial 0 ended COMPLETE: its worker")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_as_the_sweep_starts_ends_the_parent_run_killed_and_a_resume_runs_on(tracking_uri, tmp_path,
                                                                                     signame):
    """The signal arrives while the sweep starts (here: sent as it reconciles the stores, once its parent run is
    RUNNING again). Before, the signal handlers came only after the start-up: SIGTERM killed the process on the
    spot with no line, Ctrl-C left the parent run RUNNING too. Now the start-up is finished, then the parent run
    ends KILLED with the reason and one line says so."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = signalled_on_call("regsweep.sweep.driver", "reconcile", signame)
    args = [*SMALL, "--trials", "1", "--epochs", "1", "--storage", storage]
    proc = subprocess.run([sys.executable, "-c", script, "optimize", *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=300)
    assert proc.returncode == 128 + getattr(signal, signame), proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith(("Error", "Traceback", "[W"))] == [
        f"Error: interrupted: as the sweep started, before any trial trained; the parent run ended KILLED. Run again "
        f"with: regsweep optimize {' '.join(args)}"], proc.stderr
    (parent,), children = study_runs()
    assert parent.info.status == "KILLED" and children == []
    assert parent.data.tags["regsweep.stop_reason"].startswith("interrupted (Ctrl-C or SIGTERM) as the sweep started")
    assert load(storage).trials == []
    optimize(*args[len(SMALL):])
    (parent,), children = study_runs()
    assert parent.info.status == "FINISHED" and "regsweep.stop_reason" not in parent.data.tags
    assert [c.info.status for c in children] == ["FINISHED"]


def test_a_third_ctrl_c_before_the_sweep_has_a_parent_run_stops_at_once_and_says_so(tracking_uri, tmp_path):
    """The first is held for the start-up, the second ignored, the third stops it on the spot: here before the
    parent run was made, so the line speaks of no run."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = signalled_on_call("regsweep.sweep.driver", "find_or_create_parent", "SIGINT", times=3)
    args = [*SMALL, "--trials", "1", "--epochs", "1", "--storage", storage]
    proc = subprocess.run([sys.executable, "-c", script, "optimize", *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith(("Error", "Traceback", "[W"))] == [
        f"Error: interrupted: as the sweep started, before any trial trained. Run again with: regsweep optimize "
        f"{' '.join(args)}"], proc.stderr
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_sigterm_while_the_study_is_finished_ends_the_parent_run_killed(tracking_uri, tmp_path):
    """The signal arrives after the trials, while the study's plots are drawn (here: sent by the sweep itself
    as it begins that): the parent run ends KILLED rather than being left RUNNING by a process killed on the
    spot."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = signalled_on_call("regsweep.sweep.driver", "finish_study", "SIGTERM")
    args = [*SMALL, "--trials", "1", "--epochs", "1", "--storage", storage]
    proc = subprocess.run([sys.executable, "-c", script, "optimize", *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr  # as a shell reports a process ended by it
    assert [line for line in proc.stderr.splitlines() if line.startswith(("Error", "Traceback", "[W"))] == [
        f"Error: interrupted: as the study was finished, its trials done; the parent run ended KILLED. Run again with: "
        f"regsweep optimize {' '.join(args)}"], proc.stderr
    (parent,), children = study_runs()
    assert parent.info.status == "KILLED" and [c.info.status for c in children] == ["FINISHED"]
    assert parent.data.tags["best_run_id"] == children[0].info.run_id  # the signal waited for the study's end
    assert parent.data.tags["regsweep.stop_reason"].startswith("interrupted (Ctrl-C or SIGTERM) as the study was")
