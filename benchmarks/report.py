"""How long `regsweep report` takes on a 100-run study.

Builds, in a temporary SQLite MLflow store, what `regsweep optimize --grid ... --repeats 5` leaves behind for a
5 x 4 grid of L1 x L2: a study parent run, 20 trial runs and 100 seed runs, each with every per-epoch metric a
real run logs (15 epochs, 50 metrics), the summary metrics and a 10k-label predictions artifact. The values are
synthetic (the command's cost does not depend on them); the test labels are MNIST's. Then it times the command
as a user runs it (a fresh process, imports included) and, in this process, each stage of it.

    python benchmarks/report.py               # 3 timed runs of the command
    python benchmarks/report.py --rounds 1 --seeds 2
    python benchmarks/report.py --reference /tmp/old   # and, in turn, the command of another checkout
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
L1 = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
L2 = (0.0, 1e-5, 1e-4, 1e-3)
LAYERS = ("conv1", "conv2", "trans1", "conv3", "conv4", "conv5", "conv6", "head", "all")
STATS = ("mean_abs", "l2_norm", "max_abs", "frac_small")


def epoch_metrics(rng: np.random.Generator, epoch: int, l1: float, l2: float) -> dict[str, float]:
    acc = 0.99 - 0.3 / epoch - 0.5 * l1 + rng.normal(0, 0.002)
    m = {"train/loss": 1 / epoch, "train/acc": acc + 0.005, "val/loss": 1.1 / epoch, "val/acc": acc,
         "test/loss": 1.1 / epoch + rng.normal(0, 0.01), "test/acc": acc + rng.normal(0, 0.002), "lr": 0.1 / epoch,
         "penalty/l1": l1 * 300, "penalty/l2": l2 * 20, "penalty/sum_abs_w": 300.0, "penalty/sum_sq_w": 20.0,
         "speed/epoch_seconds": 15 + rng.normal(0, 1), "speed/images_per_sec": 3600.0}
    for layer in LAYERS:
        m |= {f"weights/{layer}/{s}": abs(rng.normal(0.05 / (1 + 100 * l1), 0.01)) for s in STATS}
    return m


def build(uri: str, seeds: int, epochs: int = 15) -> None:
    """The study's runs, logged the way regsweep logs them (params, per-epoch batches, summary, predictions)."""
    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from regsweep.config import TrainConfig, default_data_dir
    from regsweep.data import load_raw

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    true = load_raw(default_data_dir())[3].numpy()
    experiment_id = client.create_experiment("bench")
    parent = client.create_run(experiment_id, run_name="study bench",
                               tags={"regsweep.kind": "study", "regsweep.study": "bench"}).info.run_id
    rng = np.random.default_rng(0)
    now = int(time.time() * 1000)
    for trial, (l1, l2) in enumerate((a, b) for a in L1 for b in L2):
        holder = client.create_run(experiment_id, run_name=f"trial {trial:03d}", tags={
            "mlflow.parentRunId": parent, "optuna.trial_number": str(trial), "regsweep.study": "bench"}).info.run_id
        for seed in range(1, seeds + 1):
            cfg = TrainConfig(l1=l1, l2=l2, seed=seed, epochs=epochs)
            run = client.create_run(experiment_id, run_name=f"{cfg.run_name}", tags={
                "mlflow.parentRunId": holder, "optuna.trial_number": str(trial), "regime": cfg.regime}).info.run_id
            params = [Param(k, v) for k, v in {**cfg.as_params(), "n_params": "9778", "n_train": "55000",
                                               "n_val": "5000", "n_test": "10000"}.items()]
            history = [epoch_metrics(rng, e, l1, l2) for e in range(1, epochs + 1)]
            metrics = [Metric(k, v, now, e) for e, h in enumerate(history, 1) for k, v in h.items()]
            val = [h["val/acc"] for h in history]
            best = int(np.argmax(val))
            summary = {"best_val_acc": val[best], "best_val_epoch": best + 1,
                       "test_acc_at_best_val": history[best]["test/acc"],
                       "test_loss_at_best_val": history[best]["test/loss"],
                       "best_test_acc": max(h["test/acc"] for h in history),
                       "best_test_epoch": 1 + int(np.argmax([h["test/acc"] for h in history])),
                       "final_val_loss": history[-1]["val/loss"], "epochs_trained": epochs,
                       "total_train_seconds": sum(h["speed/epoch_seconds"] for h in history)}
            metrics += [Metric(k, v, now, 0) for k, v in summary.items()]
            client.log_batch(run, params=params[:100])
            for i in range(0, len(metrics), 1000):
                client.log_batch(run, metrics=metrics[i:i + 1000])
            pred = np.where(rng.random(len(true)) < 1 - history[best]["test/acc"], (true + 1) % 10, true)
            client.log_dict(run, {"true": true.tolist(), "pred": pred.tolist()}, "predictions/test_pred.json")
            client.set_terminated(run)
        client.set_terminated(holder)
    client.set_terminated(parent)
    mlflow.set_tracking_uri(None)


def stages(uri: str, out: Path) -> dict[str, float]:
    """The command's stages, timed one by one in this process (imports already paid)."""
    import mlflow

    from regsweep.report import command as c

    mlflow.set_tracking_uri(uri)
    times = {}
    t = time.perf_counter()
    fetched = c.fetch_runs(c.Selection(experiment_name="bench", study_name="bench"))
    times["fetch runs and histories"] = time.perf_counter() - t
    t = time.perf_counter()
    a = c.analyse(fetched)
    times["statistics"] = time.perf_counter() - t
    t = time.perf_counter()
    pair = c.flip_pair(a)
    predictions = c.fetch_predictions(a.values.index[a.values["configuration"].isin(pair)].tolist())
    times["fetch predictions"] = time.perf_counter() - t
    t = time.perf_counter()
    a.flips = c.flip_table(c.pair_runs(a, predictions), predictions)
    c.draw(a, predictions)
    times["draw figures"] = time.perf_counter() - t
    t = time.perf_counter()
    c.write(a, out)
    times["write files"] = time.perf_counter() - t
    t = time.perf_counter()
    c.log(a, out)
    times["log to MLflow"] = time.perf_counter() - t
    times["(histories fetched)"] = fetched.histories.groupby(["run_id", "key"]).ngroups
    mlflow.set_tracking_uri(None)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of the command")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per configuration (20 configurations)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="another checkout of regsweep (e.g. `git worktree add /tmp/old HEAD~1`) whose command "
                             "is timed too, alternating with this one's, on the same store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="regsweep-report-bench-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        t = time.perf_counter()
        build(uri, args.seeds)
        n_runs = len(L1) * len(L2) * args.seeds
        print(f"built {n_runs} runs ({len(L1) * len(L2)} configurations x {args.seeds} seeds, 15 epochs) "
              f"in {time.perf_counter() - t:.0f} s\n")
        checkouts = {"this checkout": REPO} | ({f"reference ({args.reference})": args.reference.resolve()}
                                               if args.reference else {})
        walls = {name: [] for name in checkouts}
        for i in range(args.rounds):
            for k, (name, checkout) in enumerate(checkouts.items()):  # in turn: a change in load hits both
                path = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
                env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": path}
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "regsweep", "report", "--experiment-name", "bench",
                                "--study-name", "bench", "--out", str(Path(tmp) / f"out{i}-{k}")], env=env,
                               cwd=tmp, check=True, stdout=subprocess.DEVNULL)
                walls[name].append(time.perf_counter() - t)
        print(f"| `regsweep report --study-name bench` | wall s, fresh process (median of {args.rounds}) | "
              "all rounds |")
        print("|---|---|---|")
        for name, times in walls.items():
            print(f"| {name} | {statistics.median(times):.1f} | {', '.join(f'{w:.1f}' for w in times)} |")
        print("\n| stage (in one process, imports paid) | seconds |")
        print("|---|---|")
        for name, value in stages(uri, Path(tmp) / "stages").items():
            print(f"| {name} | {value:.2f} |" if isinstance(value, float) else f"| {name} | {value} |")


if __name__ == "__main__":
    main()
