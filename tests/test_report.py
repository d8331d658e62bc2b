"""regsweep report: the statistics on hand-made frames with known answers, then the command on a small real
sweep (two configurations x two seeds, a baseline among them) in a temporary MLflow store, and bad input."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from regsweep.cli import cli
from regsweep.report import stats
from regsweep.report.command import FIGURES, default_out

# The command's tests share one sweep (a module fixture): one pytest-xdist worker runs the module, once.
pytestmark = pytest.mark.xdist_group("report")

# ---------------------------------------------------------------- pure functions, known answers


def run_row(run_id, l1, l2, seed, status="FINISHED", norm="bn", best_val=0.9, test=0.9, start=0, **extra):
    return {"run_id": run_id, "status": status, "start_time": pd.Timestamp(start, unit="s"),
            "params.l1": str(l1), "params.l2": str(l2), "params.seed": str(seed), "params.model": "cnn",
            "params.norm": norm, "params.epochs": "3", "params.data_dir": f"/somewhere/{run_id}",
            "metrics.best_val_acc": best_val, "metrics.test_acc_at_best_val": test, "metrics.best_val_epoch": 3,
            "metrics.epochs_trained": 3, **extra}


def frame(*rows) -> pd.DataFrame:
    return pd.DataFrame(rows)


def test_runs_group_by_every_setting_but_seed_and_the_unusable_are_counted():
    runs = frame(
        run_row("a1", 0, 0, 1), run_row("a2", 0, 0, 2),
        run_row("b1", 0.001, 0, 1), run_row("b2", 0.001, 0, 2, start=5),
        run_row("b2-old", 0.001, 0, 2, start=1),  # an older repeat of the same seed: the newest counts
        run_row("c1", 0.001, 0, 1, norm="gbn"),
        run_row("f1", 0, 0, 3, status="FAILED"), run_row("k1", 0, 0, 4, status="KILLED"),
        run_row("r1", 0, 0, 5, status="RUNNING"),
        run_row("p1", 0, 0, 6, **{"tags.regsweep.stop_reason": "pruned by median pruner at epoch 1",
                                   "metrics.epochs_trained": 1}),
        {"run_id": "study", "status": "FINISHED", "tags.regsweep.kind": "study", "params.seed": "1"},
        {"run_id": "other", "status": "FINISHED", "params.alpha": "3"},
        # a trial given a twin's result: params and coefficients only, and the run that trained it named
        {**run_row("t1", 0, 0, 1, **{"tags.regsweep.reused_run": "a1"}), "metrics.best_val_acc": np.nan},
        {**run_row("s1", 0, 0, 7), "metrics.best_val_acc": np.nan},  # finished without its summary
        # a sweep's run holding a trial's seeds, and one stopped as it was created, before its params
        {"run_id": "holder", "status": "FINISHED", "tags.optuna.trial_number": "3", "params.l1": "0",
         "params.seeds": "1-3"},
        {"run_id": "cut", "status": "KILLED", "tags.optuna.trial_number": "4"},
    )
    kept, left_out = stats.select_training_runs(runs)
    assert left_out == {"not regsweep runs": 1, "FAILED": 1, "KILLED": 1, "RUNNING": 1, "pruned": 1,
                        "older duplicates of a configuration and seed": 1, "without a summary": 1,
                        "reused a twin's result (the twin's run counts)": 1,
                        "stopped before they logged their settings": 1}
    # data_dir differs on every run and is not a setting; norm is, and appears in the label because it varies
    assert dict(kept.groupby("configuration")["run_id"].apply(sorted)) == {
        "l1=0 l2=0 norm=bn": ["a1", "a2"], "l1=1e-3 l2=0 norm=bn": ["b1", "b2"], "l1=1e-3 l2=0 norm=gbn": ["c1"]}


def test_settings_compare_as_values_and_close_coefficients_stay_apart():
    runs = frame(
        run_row("a1", 0, 0, 1, **{"params.augment": "True", "params.rotate": "7.0"}),
        run_row("b1", 0.001, 0, 1, **{"params.augment": "True", "params.rotate": "7.0"}),
        # as `mlflow run` logs MLproject parameters: as typed
        run_row("b2", "1e-3", 0, 2, **{"params.augment": "true", "params.rotate": "7"}),
        run_row("b3", "1e-3", 0, 3, **{"params.augment": "yes", "params.rotate": "7"}),  # click reads it as True
        # two trials of a sweep that agree to three digits
        run_row("c1", 0.0012341, 0, 1, **{"params.augment": "True", "params.rotate": "7.0"}),
        run_row("d1", 0.0012344, 0, 1, **{"params.augment": "True", "params.rotate": "7.0"}),
    )
    kept, left_out = stats.select_training_runs(runs)
    assert left_out == {}
    assert dict(kept.groupby("configuration")["run_id"].apply(sorted)) == {
        "l1=0 l2=0": ["a1"], "l1=1e-3 l2=0": ["b1", "b2", "b3"], "l1=1.2341e-3 l2=0": ["c1"],
        "l1=1.2344e-3 l2=0": ["d1"]}
    assert stats.same_value("true", "True") and stats.same_value("7", "7.0") and not stats.same_value("bn", "gbn")

    # A CNN ignores the MLP's activation, batch norm ignores the ghost batch size: no second configuration.
    runs = frame(run_row("a1", 0, 0, 1, **{"params.activation": "relu", "params.ghost_batch_size": "32"}),
                 run_row("a2", 0, 0, 2, **{"params.activation": "tanh", "params.ghost_batch_size": "16"}),
                 run_row("m1", 0, 0, 1, **{"params.model": "mlp", "params.activation": "tanh"}))
    kept, _ = stats.select_training_runs(runs)
    assert dict(kept.groupby("configuration")["run_id"].apply(sorted)) == {
        "l1=0 l2=0 model=cnn": ["a1", "a2"], "l1=0 l2=0 activation=tanh model=mlp": ["m1"]}


def test_descendants_of_a_run_in_an_experiment_without_nested_runs_are_none():
    from regsweep.report.fetch import descendants

    runs = frame(run_row("a1", 0, 0, 1), run_row("a2", 0, 0, 2))
    assert descendants(runs, "a1").empty


def test_seeds_lost_to_divergence_or_pruning_are_counted_with_their_configuration():
    from regsweep.report import tables

    diverged = {"metrics.best_val_acc": np.nan, "metrics.test_acc_at_best_val": np.nan}
    pruned = {"tags.regsweep.stop_reason": "pruned by median pruner at epoch 1", "metrics.epochs_trained": 1}
    runs = frame(
        run_row("a1", 0, 0, 1), run_row("a2", 0, 0, 2),
        run_row("b1", 0.01, 0, 1, best_val=0.95), run_row("b2", 0.01, 0, 2, best_val=0.97),
        run_row("b3", 0.01, 0, 3, status="FAILED", **diverged,
                **{"tags.regsweep.stop_reason": "diverged: training loss is nan"}),  # a sweep's trial
        run_row("c1", 0.1, 0, 1, status="FAILED", **diverged,
                **{"tags.regsweep.error": "DivergedError: training loss is inf"}),  # a lone train, every seed
        run_row("f1", 0, 0, 3, status="FAILED", **{"tags.regsweep.error": "RuntimeError: disk full"}),
        run_row("b1-old", 0.01, 0, 1, status="FAILED", start=-1, **diverged,  # rerun since, and trained: not lost
                **{"tags.regsweep.stop_reason": "diverged: training loss is nan"}),
        # --repeats: seed 3 fell behind and its trial was pruned; seeds 1 and 2 had trained
        run_row("d1", 0.001, 0, 1), run_row("d2", 0.001, 0, 2), run_row("d3", 0.001, 0, 3, **pruned),
        run_row("e1", 0.002, 0, 1, **pruned),  # a trial pruned on its only seed: counted as pruned, not named
        run_row("g1", 0.003, 0, 1, status="FAILED", **diverged,  # one seed diverged, the other pruned: not named
                **{"tags.regsweep.stop_reason": "diverged: training loss is nan"}),
        run_row("g2", 0.003, 0, 2, **pruned),
    )
    kept, left_out = stats.select_training_runs(runs)
    assert left_out == {"diverged": 4, "FAILED": 1, "pruned": 3,
                        "configuration(s) that diverged on every seed (l1=1e-1 l2=0)": 1}
    table = stats.configuration_table(stats.per_run(kept, pd.DataFrame(columns=["run_id", "key", "step", "value"])))
    assert table[["configuration", "n", "diverged", "pruned"]].values.tolist() == [
        ["l1=0 l2=0", 2, 0, 0], ["l1=1e-3 l2=0", 2, 0, 1], ["l1=1e-2 l2=0", 2, 1, 0]]
    people = tables.configurations_for_people(table)
    assert list(people["seeds lost to divergence"]) == [0, 0, 1] and list(people["seeds pruned"]) == [0, 1, 0]
    assert "seeds lost to divergence" not in tables.configurations_for_people(table.assign(diverged=0, pruned=0))


def test_seeds_that_trained_in_one_stack_are_marked_as_sharing_their_batches():
    from regsweep.report import tables

    def member(run_id, l1, seed, parent="p", stack=""):
        return run_row(run_id, l1, 0, seed, **({"tags.mlflow.parentRunId": parent, "tags.regsweep.stack": stack}
                                                if stack else {}))

    runs = frame(member("a1", 0, 1, stack="0"), member("a2", 0, 2, stack="0"),  # one stack, two seeds
                 member("b1", 1e-3, 1, stack="0"), member("b2", 1e-3, 2, stack="2"),  # two stacks, a seed each
                 # stack 4 of two studies (two of one name, in two storages, number their stacks alike)
                 member("c1", 1e-2, 1, parent="p", stack="4"), member("c2", 1e-2, 2, parent="q", stack="4"),
                 member("d1", 1e-1, 1), member("d2", 1e-1, 2))  # one by one
    kept, _ = stats.select_training_runs(runs)
    table = stats.configuration_table(stats.per_run(kept, pd.DataFrame(columns=["run_id", "key", "step", "value"])))
    assert dict(zip(table["configuration"], table["shared_batches"])) == {
        "l1=0 l2=0": True, "l1=1e-3 l2=0": False, "l1=1e-2 l2=0": False, "l1=1e-1 l2=0": False}
    assert list(tables.configurations_for_people(table)["seeds on one stack's batches"]) == ["yes", "", "", ""]


def test_verdicts_go_by_p_adjusted_for_the_number_of_comparisons():
    from scipy.stats import false_discovery_control

    base = (0.90, 0.91, 0.92)
    shifts = {1e-4: (0.03, 0.04, 0.02),  # alone: p = 0.035
              **{l1: (0.01, -0.01, d) for l1, d in ((2e-4, 0.002), (3e-4, 0.004), (4e-4, -0.003), (5e-4, 0.0))}}
    runs = frame(*(run_row(f"a{s}", 0, 0, s, test=t) for s, t in zip((1, 2, 3), base)),
                 *(run_row(f"{l1}-{s}", l1, 0, s, test=t + d)
                   for l1, ds in shifts.items() for s, t, d in zip((1, 2, 3), base, ds)))
    kept, _ = stats.select_training_runs(runs)
    values = stats.per_run(kept, pd.DataFrame(columns=["run_id", "key", "step", "value"]))
    table = stats.verdict_table(values, stats.baselines(stats.settings_of(kept))).set_index("configuration")
    assert table["test_p_adjusted"].to_numpy() == pytest.approx(false_discovery_control(table["test_p"].to_numpy()))
    lone = table.loc["l1=1e-4 l2=0"]
    assert lone["test_p"] == pytest.approx(0.035, abs=1e-3) and lone["test_p_adjusted"] > 0.05
    assert set(table["test_verdict"]) == {"not distinguishable"}  # one of five passing 0.05 is what chance gives


def test_coefficient_figures_keep_to_one_set_of_other_settings():
    from regsweep.report.figures import one_setting

    values = pd.DataFrame({"configuration": ["l1=0 l2=0 norm=bn", "l1=0 l2=0 norm=bn", "l1=1e-3 l2=0 norm=bn",
                                             "l1=0 l2=0 norm=gbn", "l1=1e-3 l2=1e-4 norm=gbn"][::-1]})
    rows, only = one_setting(values)  # two configurations each: the first set of settings by name
    assert only == "norm=bn" and sorted(rows["configuration"]) == ["l1=0 l2=0 norm=bn"] * 2 + ["l1=1e-3 l2=0 norm=bn"]
    rows, only = one_setting(values.iloc[2:])  # three rows, two configurations, one set of settings
    assert only == "" and len(rows) == 3


def test_mean_and_t_interval():
    s = stats.mean_ci([1.0, 2.0, 3.0])
    # t(0.975, 2 df) = 4.302652729749464; sd = 1
    assert (s["n"], s["mean"], s["sd"]) == (3, 2.0, 1.0)
    assert s["ci_low"] == pytest.approx(2 - 4.302652729749464 / math.sqrt(3))
    assert s["ci_high"] == pytest.approx(2 + 4.302652729749464 / math.sqrt(3))
    one = stats.mean_ci([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["sd"]) and math.isnan(one["ci_low"])
    # Two seeds of an accuracy: t(0.975, 1 df) = 12.706 sd each way, cut to where an accuracy can be
    two = stats.mean_ci([0.10, 0.12], bounds=(0.0, 1.0))
    assert two["ci_low"] == 0.0 and two["ci_high"] == pytest.approx(0.11 + 12.706204736 * 0.01)
    assert stats.mean_ci([0.97, 0.99], bounds=(0.0, 1.0))["ci_high"] == 1.0


def test_matching_seeds_are_paired_others_use_welch():
    a = pd.Series([1.0, 2.0, 3.0], index=[1, 2, 3])
    b = pd.Series([0.0, 1.0, 1.0], index=[1, 2, 3])
    paired = stats.compare(a, b)
    # differences 1, 1, 2: t = 4 on 2 df, whose two-sided p is 1 - t / sqrt(2 + t^2) in closed form
    assert paired["test"] == "paired t" and paired["diff"] == pytest.approx(4 / 3)
    assert paired["p_value"] == pytest.approx(1 - 4 / math.sqrt(18))
    welch = stats.compare(a, b.set_axis([4, 5, 6]))
    # variances 1 and 1/3: se = 2/3, t = 2, Welch-Satterthwaite df = (4/9)^2 / ((1/3)^2/2 + (1/9)^2/2) = 3.2
    from scipy import stats as st
    assert welch["test"] == "Welch t"
    assert welch["p_value"] == pytest.approx(2 * st.t.sf(2.0, 3.2))
    assert welch["ci_high"] - welch["diff"] == pytest.approx(st.t.ppf(0.975, 3.2) * 2 / 3)
    # different seeds on each side (not the same set) also fall back to Welch
    assert stats.compare(a, b.set_axis([1, 2, 4]))["test"] == "Welch t"


def test_verdicts_and_degenerate_spreads():
    assert stats.verdict(0.01, 0.001, 3, 3) == "better"
    assert stats.verdict(-0.01, 0.001, 3, 3) == "worse"
    assert stats.verdict(0.01, 0.2, 3, 3) == "not distinguishable"
    assert stats.verdict(0.05, 0.0, 1, 3) == stats.verdict(0.05, 0.0, 3, 1) == "one seed: no verdict"
    assert stats.verdict(0.05, math.nan, 3, 3) == stats.NO_VERDICT  # no p: the values were missing
    same = stats.compare(pd.Series([0.9, 0.8], index=[1, 2]), pd.Series([0.9, 0.8], index=[1, 2]))
    assert same["p_value"] == 1.0 and same["diff"] == 0
    # One image more on each seed, as the runs log it (float32: the differences are 1.00017e-4 or 0.99957e-4 by the
    # count): a t-test gives p = 0 or close, a narrow interval and "better". Without spread the signs are flipped:
    # p = 2 / 2^n.
    for counts in ([9913, 9951], [9800, 9801, 9802]):
        seeds = range(1, len(counts) + 1)
        logged = [pd.Series(np.float32(np.array(counts) + extra) / np.float32(10_000), index=seeds, dtype=float)
                  for extra in (1, 0)]
        one_image = stats.compare(*logged)
        assert one_image["p_value"] == 2 / 2 ** len(counts) and one_image["test"] == "sign-flip (no spread)"
        assert math.isnan(one_image["ci_low"]) and one_image["diff"] == pytest.approx(1e-4, rel=1e-3)
    seeds = range(1, 7)
    six = stats.compare(pd.Series([0.9 + s / 100 + 1e-4 for s in seeds], index=seeds),
                        pd.Series([0.9 + s / 100 for s in seeds], index=seeds))
    assert six["p_value"] == pytest.approx(2 / 2 ** 6) and stats.verdict(six["diff"], six["p_value"], 6, 6) == "better"
    # Unpaired, every value the same on each side: the 6 ways to split 4 values 2 + 2, 2 of them as far apart
    apart = stats.compare(pd.Series([0.9, 0.9], index=[1, 2]), pd.Series([0.8, 0.8], index=[3, 4]))
    assert apart["p_value"] == pytest.approx(1 / 3) and apart["test"] == "permutation (no spread)"
    single = stats.compare(pd.Series([0.95], index=[1]), pd.Series([0.9, 0.8], index=[1, 2]))
    assert single["diff"] == pytest.approx(0.1) and math.isnan(single["p_value"]) and single["test"] == ""


def test_verdict_table_against_each_configurations_own_baseline():
    runs = frame(*(run_row(f"{n}{s}", l1, 0, s, norm=norm, test=t, best_val=t)
                   for n, l1, norm, tests in (("a", 0, "bn", (0.90, 0.91, 0.92)),
                                              ("b", 0.001, "bn", (0.95, 0.965, 0.97)),
                                              ("c", 0, "gbn", (0.80, 0.81, 0.82)), ("d", 0.001, "gbn", (0.5,)))
                   for s, t in zip((1, 2, 3), tests)),
                 *(run_row(f"e{s}", 0.002, 0, s, norm="gbn", test=t, best_val=v)
                   for s, t, v in zip((1, 2, 3), (0.85, math.nan, math.nan), (0.85, 0.865, 0.87))))
    kept, _ = stats.select_training_runs(runs)
    base = stats.baselines(stats.settings_of(kept))
    assert dict(base) == {"l1=0 l2=0 norm=bn": "l1=0 l2=0 norm=bn", "l1=1e-3 l2=0 norm=bn": "l1=0 l2=0 norm=bn",
                          "l1=0 l2=0 norm=gbn": "l1=0 l2=0 norm=gbn", "l1=1e-3 l2=0 norm=gbn": "l1=0 l2=0 norm=gbn",
                          "l1=2e-3 l2=0 norm=gbn": "l1=0 l2=0 norm=gbn"}
    values = stats.per_run(kept, pd.DataFrame(columns=["run_id", "key", "step", "value"]))
    table = stats.verdict_table(values, base).set_index("configuration")
    b = table.loc["l1=1e-3 l2=0 norm=bn"]
    assert b["test_diff"] == pytest.approx(0.155 / 3) and b["test_p"] < 0.01 and b["test_verdict"] == "better"
    assert b["test_used"] == b["val_test_used"] == "paired t"
    assert table.loc["l1=1e-3 l2=0 norm=gbn", "test_verdict"] == "one seed: no verdict"
    # Two of e's three runs have no test accuracy: its n and verdict are those of the one value there is,
    # while its validation accuracy (three seeds) is compared in full.
    e = table.loc["l1=2e-3 l2=0 norm=gbn"]
    assert (e["n"], e["n_baseline"], e["test_verdict"], e["test_used"]) == (1, 3, "one seed: no verdict", "")
    assert e["val_test_used"] == "paired t" and e["val_verdict"] == "better"
    assert len(table) == 3  # baselines are not compared with themselves

    chosen = stats.baselines(stats.settings_of(kept), stats.parse_baseline("l1=0 l2=0 norm=gbn"))
    assert set(chosen) == {"l1=0 l2=0 norm=gbn"}
    with pytest.raises(ValueError, match="matches 2 configurations"):
        stats.baselines(stats.settings_of(kept), stats.parse_baseline("l1=0"))
    with pytest.raises(ValueError, match="unknown setting"):
        stats.baselines(stats.settings_of(kept), {"colour": "red"})
    assert stats.best_configuration(stats.configuration_table(values), exclude=set(base)) == "l1=1e-3 l2=0 norm=bn"


def test_values_at_the_selected_epoch_come_from_the_history():
    runs = frame(run_row("a", 0, 0, 1, **{"metrics.best_val_epoch": 2, "metrics.weights/all/frac_small": 0.3}),
                 run_row("b", 0, 0, 2, **{"metrics.weights/all/frac_small": 0.4}))
    histories = pd.DataFrame([("a", "weights/all/frac_small", s, v) for s, v in ((1, 0.1), (2, 0.2), (3, 0.3))],
                             columns=["run_id", "key", "step", "value"])
    picked = stats.at_selected_epoch(runs, histories, "weights/all/frac_small")
    assert dict(picked) == {"a": 0.2, "b": 0.4}  # b's best epoch is its last: the latest value is the one


def test_pareto_front_and_flips():
    front = stats.pareto_front([0, 1, 0.5, 0.2, np.nan, 1], [1, 0, 0.5, 0.2, 1, 0])
    assert front.tolist() == [True, True, True, False, False, True]  # ties are both on the front
    f = stats.flips([0, 1, 2, 3, 4], [0, 0, 2, 0, 4], [0, 1, 1, 0, 4])
    assert f["fixed"].tolist() == [1] and f["broken"].tolist() == [2] and f["both_wrong"].tolist() == [3]
    with pytest.raises(ValueError, match="different test sets"):
        stats.flips([0, 1], [0, 1, 2], [0, 1])


# ---------------------------------------------------------------- the command on a small real sweep

SMALL = ["--max-train-samples", "512", "--max-eval-samples", "256", "--batch-size", "32", "--compile", "false",
         "--log-images", "false", "--epochs", "2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two configurations (none, L1) x two seeds as one grid study with repeats, plus one failed run."""
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(name, raising=False)
        mp.chdir(tmp)
        mlflow.set_tracking_uri(None)  # the store is the environment's, as for the command
        result = CliRunner().invoke(cli, ["optimize", *SMALL, "--grid", "l1=0,0.001", "--repeats", "2",
                                          "--pruner", "none", "--study-name", "pair", "--experiment-name", "rep",
                                          "--storage", f"sqlite:///{tmp / 'optuna.db'}"])
        assert result.exit_code == 0, result.output
        mlflow.set_tracking_uri(None)  # optimize set it; the environment names the store from here on
        client = MlflowClient()
        experiment_id = client.get_experiment_by_name("rep").experiment_id
        failed = client.create_run(experiment_id, run_name="cnn l1=0 l2=0 s9")  # a run that crashed early
        client.log_batch(failed.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in
                                                     {"l1": "0", "l2": "0", "seed": "9", "model": "cnn"}.items()])
        client.set_terminated(failed.info.run_id, "FAILED")
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        parent = client.search_runs([experiment_id], "tags.`regsweep.kind` = 'study'")[0]
        yield {"uri": uri, "tmp": tmp, "experiment_id": experiment_id, "parent": parent.info.run_id, "mp": mp}
        mlflow.set_tracking_uri(None)


def training_runs(client: MlflowClient, experiment_id: str) -> list:
    return [r for r in client.search_runs([experiment_id], max_results=1000)
            if "seed" in r.data.params and "l1" in r.data.params and r.info.status == "FINISHED"]


def report(*args, expect=0):
    result = CliRunner().invoke(cli, ["report", *args])
    assert result.exit_code == expect, result.output
    return result


@pytest.mark.slow
def test_study_report_tables_match_the_logged_metrics_and_files_land_on_the_parent(sweep):
    out = sweep["tmp"] / "study-report"
    result = report("--experiment-name", "rep", "--study-name", "pair", "--out", str(out))
    assert "4 runs in 2 configurations; left out of the statistics: none" in result.output
    assert f"report: {out / 'report.md'} (8 figures); logged under report/ of run {sweep['parent']}" in result.output

    for name in FIGURES:  # all eight, with something drawn in them
        assert (out / name).stat().st_size > 10_000, name
    client = MlflowClient()
    runs = training_runs(client, sweep["experiment_id"])
    assert len(runs) == 4
    table = pd.read_csv(out / "configurations.csv").set_index("configuration")
    assert list(table.index) == ["l1=0 l2=0", "l1=1e-3 l2=0"] and list(table["n"]) == [2, 2]
    for label, l1 in (("l1=0 l2=0", "0.0"), ("l1=1e-3 l2=0", "0.001")):
        mine = [r.data.metrics for r in runs if r.data.params["l1"] == l1]
        for key in ("best_val_acc", "test_acc_at_best_val"):
            logged = [m[key] for m in mine]
            assert table.loc[label, f"{key}_mean"] == pytest.approx(np.mean(logged), abs=1e-12)
            assert table.loc[label, f"{key}_sd"] == pytest.approx(np.std(logged, ddof=1), abs=1e-12)
        assert table.loc[label, "best_test_acc"] == pytest.approx(np.mean([m["best_test_acc"] for m in mine]))
    per_run = pd.read_csv(out / "runs.csv").set_index("run_id")
    for r in runs:
        assert per_run.loc[r.info.run_id, "test_acc_at_best_val"] == r.data.metrics["test_acc_at_best_val"]
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert verdicts[["configuration", "baseline", "test_used"]].values.tolist() == [
        ["l1=1e-3 l2=0", "l1=0 l2=0", "paired t"]]
    assert verdicts["test_verdict"].iloc[0] in ("better", "worse", "not distinguishable")
    flips = pd.read_csv(out / "flips.csv")
    assert list(flips["seed"]) == [1, 2] and (flips["fixed"] + flips["both_wrong"] == flips["baseline_wrong"]).all()

    logged = {a.path for a in client.list_artifacts(sweep["parent"], "report")}
    assert {f"report/{name}" for name in [*FIGURES, "report.md", "configurations.csv", "verdicts.csv"]} <= logged
    assert any(p.startswith("report/study") for p in logged)  # the study's own plots, copied
    assert "![" in (out / "report.md").read_text()


@pytest.mark.slow
def test_experiment_report_counts_the_failed_run_and_logs_a_report_run(sweep):
    out = sweep["tmp"] / "experiment-report"
    result = report("--experiment-name", "rep", "--out", str(out), "--format", "json", "--include-unfinished")
    printed = json.loads(result.stdout)  # JSON alone on stdout, for a pipe; what is said of it on stderr
    assert [row["configuration"] for row in printed["configurations"]] == ["l1=0 l2=0", "l1=1e-3 l2=0"]
    assert "left out of the statistics: 1 FAILED." in result.stderr
    client = MlflowClient()
    (run,) = client.search_runs([sweep["experiment_id"]], "tags.`regsweep.kind` = 'report'")
    assert run.info.status == "FINISHED" and run.info.run_name == "report rep"
    assert "report/report.md" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert json.loads((out / "report.json").read_text())["left_out"] == {"FAILED": 1}
    # a second report leaves the report run out of its statistics (it is not a training run)
    again = report("--experiment-name", "rep", "--no-log-to-mlflow", "--out", str(out), "--format", "csv")
    assert "left out of the statistics: 1 FAILED.\n" in again.stderr and "FAILED" not in again.stdout


@pytest.mark.slow
def test_runs_and_filter_select_and_one_seed_gives_no_verdict(sweep):
    client = MlflowClient()
    runs = training_runs(client, sweep["experiment_id"])
    ids = [r.info.run_id for r in runs if r.data.params["seed"] == "1"]
    out = sweep["tmp"] / "named"
    result = report("--runs", ",".join(ids), "--no-log-to-mlflow", "--out", str(out), "--format", "csv")
    assert "one seed: no verdict" in result.output
    filtered = report("--experiment-name", "rep", "--filter", "params.l1 = '0.001'", "--no-log-to-mlflow",
                      "--out", str(sweep["tmp"] / "filtered"), "--format", "markdown")
    assert "| l1=1e-3 l2=0 | 2 |" in filtered.output
    assert "7_misclassification.png not drawn" in (sweep["tmp"] / "filtered" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--experiment-name", "nope"], "no MLflow experiment 'nope' (experiments: Default, other, rep); choose one with "
                                    "--experiment-name (regsweep train logs into MLflow's Default"),
    (["--experiment-name", "rep", "--study-name", "nope"], "no study 'nope' in experiment 'rep' (studies there: pair)"),
    (["--parent-run-id", "0" * 32], "no run with id"),
    (["--experiment-name", "rep", "--filter", "params.l1 ==== 3"], "MLflow rejects the filter"),
    (["--experiment-name", "rep", "--filter", "params.l1 = '7'"], "no runs match"),
    (["--experiment-name", "other"], "is a regsweep training run"),
    (["--runs", "FOREIGN"], "not regsweep training runs"),
    (["--runs", ","], "--runs needs run ids"),
    (["--experiment-name", "rep", "--study-name", "pair", "--runs", "abc"], "give one of them"),
    (["--experiment-name", "rep", "--baseline", "l1=5"], "--baseline l1=5 matches no configuration"),
    (["--experiment-name", "rep", "--out", "FILE/sub"], "is not a writable folder"),
    (["--experiment-name", "rep", "--study-name", "it's"], "no study \"it's\" in experiment 'rep' (studies there"),
    (["--runs", "it's"], "not a run id: \"it's\""),
    (["--experiment-name", "rep", "--filter", "attributes.status = 'FAILED'", "--include-unfinished"],
     "no finished regsweep runs to report in experiment rep, filter attributes.status = 'FAILED' (1 FAILED); a "
     "report needs one, also with --include-unfinished"),
    (["--experiment-name", "rep", "--study-name", ""], "the Optuna study name is empty"),
])
def test_bad_input_exits_2_with_one_line_and_writes_and_logs_nothing(sweep, args, message):
    client = MlflowClient()
    other = client.get_experiment_by_name("other")
    other_id = other.experiment_id if other else client.create_experiment("other")
    foreign = client.search_runs([other_id]) or [client.create_run(other_id)]
    client.set_terminated(foreign[0].info.run_id)
    (sweep["tmp"] / "a-file").write_text("not a folder")
    args = [a.replace("FOREIGN", foreign[0].info.run_id).replace("FILE", str(sweep["tmp"] / "a-file")) for a in args]
    if "--out" not in args:
        args += ["--out", str(sweep["tmp"] / "never")]
    before = ({r.info.run_id for r in client.search_runs([sweep["experiment_id"], other_id])},
              {a.path for a in client.list_artifacts(sweep["parent"])})
    result = CliRunner().invoke(cli, ["report", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert not (sweep["tmp"] / "never").exists()
    assert before == ({r.info.run_id for r in client.search_runs([sweep["experiment_id"], other_id])},
                      {a.path for a in client.list_artifacts(sweep["parent"])})


def test_a_study_name_that_two_parent_runs_carry_reports_the_newest_and_names_the_other(sweep):
    client = MlflowClient()
    older = client.create_run(sweep["experiment_id"], start_time=1000,  # a study of that name in another storage
                              tags={"regsweep.kind": "study", "regsweep.study": "pair"}).info.run_id
    client.set_terminated(older, "FINISHED")
    try:
        out = sweep["tmp"] / "two-pairs"
        result = CliRunner().invoke(cli, ["report", "--experiment-name", "rep", "--study-name", "pair",
                                          "--no-log-to-mlflow", "--out", str(out)])
        assert result.exit_code == 0, result.output
        said = (f"study pair (parent run {sweep['parent']}; the newest of 2 studies of that name here, the others "
                f"under parent runs {older}: choose one with --parent-run-id)")
        assert said in (out / "report.md").read_text() and f"Runs: {said}." in result.output
    finally:
        client.delete_run(older)


def test_a_report_on_a_trials_runs_goes_to_a_folder_of_its_own_and_says_why_there_is_no_verdict(sweep, monkeypatch):
    """--parent-run-id of a trial (whose runs carry the study's tag too) must not replace the study's report, which
    is where a report named after the study would go; with no configuration to compare, the command says why."""
    monkeypatch.chdir(sweep["tmp"])
    client = MlflowClient()
    (trial,) = client.search_runs([sweep["experiment_id"]], "tags.`optuna.trial_number` = '0' and params.seeds != ''")
    result = report("--parent-run-id", trial.info.run_id, "--no-log-to-mlflow")
    folder = default_out(f"{trial.info.run_name} {trial.info.run_id[:8]}")
    assert (sweep["tmp"] / folder / "report.md").exists() and folder != default_out("pair")
    # One configuration (the trial's two seeds): the baseline itself, or one without a baseline.
    assert ("No verdicts: no configuration but the baselines" if float(trial.data.params["l1"]) == 0 else
            "No baseline: no configuration has l1 = l2 = 0") in result.output


def test_a_report_on_a_store_that_is_not_there_says_so_and_makes_none(tmp_path, monkeypatch):
    """Run in the wrong folder, `sqlite:///mlflow.db` names a file that is not there: MLflow would make an empty
    store, and the report would find no experiment in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    result = CliRunner().invoke(cli, ["report"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"Error: no MLflow tracking store at {tmp_path.resolve() / 'mlflow.db'}: set MLFLOW_TRACKING_URI "
                     "to the store the runs were logged to"], lines
    assert list(tmp_path.iterdir()) == []


def test_a_report_that_cannot_be_written_exits_2_with_one_line_and_logs_nothing(sweep):
    out = sweep["tmp"] / "blocked"
    (out / "report.md").mkdir(parents=True)  # the report's own file name taken by a folder
    before = {a.path for a in MlflowClient().list_artifacts(sweep["parent"])}
    result = CliRunner().invoke(cli, ["report", "--experiment-name", "rep", "--study-name", "pair", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot write the report to {out}"), result.output
    assert before == {a.path for a in MlflowClient().list_artifacts(sweep["parent"])}


@pytest.mark.slow
def test_a_signal_as_the_report_is_logged_ends_its_report_run_killed(sweep):
    """Stopped, not failed: Ctrl-C or SIGTERM while a report run's files upload ends that run KILLED, with why."""
    import signal
    import subprocess
    import sys

    from .conftest import signalled_on_call

    script = signalled_on_call("mlflow.tracking", "MlflowClient.log_artifacts", "SIGTERM")
    out = sweep["tmp"] / "stopped-report"
    proc = subprocess.run([sys.executable, "-c", script, "report", "--experiment-name", "rep", "--out", str(out)],
                          capture_output=True, text=True, cwd=sweep["tmp"], timeout=600)
    client = MlflowClient()
    (run,) = client.search_runs([sweep["experiment_id"]], "tags.`regsweep.kind` = 'report' and "
                                                          "attributes.status = 'KILLED'")
    client.delete_run(run.info.run_id)  # the later tests see the experiment as before
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"Error: interrupted: report run {run.info.run_id} ended KILLED"
    assert "interrupted" in run.data.tags["regsweep.stop_reason"]


def test_unreachable_tracking_server_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    result = CliRunner().invoke(cli, ["report"])
    assert result.exit_code == 2 and "unreachable" in result.output
    assert not (tmp_path / "reports").exists()


@pytest.mark.slow
def test_compare_runs_notebook_runs(sweep, monkeypatch):
    """The notebook's code cells run top to bottom against the sweep above."""
    from .conftest import REPO

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rep")
    notebook = json.loads((REPO / "notebooks" / "compare_runs.ipynb").read_text())
    assert all(not c.get("outputs") for c in notebook["cells"] if c["cell_type"] == "code")  # stored without
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "compare_runs.ipynb", "exec"), namespace)
    assert list(namespace["analysis"].table["configuration"]) == ["l1=0 l2=0", "l1=1e-3 l2=0"]
    assert set(namespace["analysis"].figures) >= {"1_consolidated.png", "7_misclassification.png"}


def test_readme_documents_every_report_option():
    from .conftest import REPO

    readme = (REPO / "README.md").read_text()
    for param in cli.commands["report"].params:
        for flag in param.opts:
            assert f"`{flag}" in readme, f"README does not document report {flag}"
