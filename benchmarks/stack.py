"""Stacked sweeps against one-by-one sweeps: `regsweep optimize` as a user runs it, MLflow logging on.

Each row is a fresh study in a temporary store, run as a subprocess and timed from start to exit:

    python benchmarks/stack.py                                   # GPU: 32 trials x 15 epochs, full MNIST
    python benchmarks/stack.py --rows 1:8,32 --trials 32         # --stack 1 on 8 trials only (rate per hour)
    python benchmarks/stack.py --small                           # CPU: 4 trials, 1 epoch, 2,000 images
    python benchmarks/stack.py --small --rows 4-median:12,4:12 --epochs 6   # CPU: pruning in stacks
    python benchmarks/stack.py --throughput 1,8,32               # GPU: step throughput per stack size and
                                                                 # setting (cuDNN, TF32, bf16, compiled, ...)
    python benchmarks/stack.py --throughput 32 --variants default,fastest   # only those two settings
    python benchmarks/stack.py --throughput 32 --variants default --profile 20   # and where a step's time goes
    python benchmarks/stack.py --shrink 8,32                     # GPU: stopped slots idle, shrink or refill
    python benchmarks/stack.py --small --shrink 4                # the same on the CPU, 2,000 images, 6 epochs
    python benchmarks/stack.py --small --shrink 4 --compiled     # ... with the CPU's default compiled step
    python benchmarks/stack.py --hooks 8,32                      # the per-epoch hooks alone: logging, pruning
    python benchmarks/stack.py --flushes                         # what one flush of MLflow's queue waits
    python benchmarks/stack.py --rows 32,1:4 --options "--deterministic false"
    python benchmarks/stack.py --rows grid                       # the notebooks' 4 x 5 grid, one stack

A row is STACK[-PRUNER][:TRIALS], or "grid": the notebooks' 4 scenarios x 5 seeds (`--grid "l1=0,0.001
l2=0,0.0005" --repeats 5 --stack auto`: one stack of 20 members on CUDA, one by one on the CPU; trials
count configurations). "configs/h" is finished trials per hour of wall time; "training share" is
the stacks' training-step time over the wall time; "stopped slots" the share of the stacks' slot-epochs
(members x the stack's epochs) in which no member trained: what those slots would idle through, were the
stacks not to shrink to the members still training; "epoch hooks share" the time spent
after each epoch queueing every member's metrics for MLflow and reporting to Optuna (and asking its
pruner); the rest is start-up, evaluation, completing the runs (figures, tables) and the study's bookkeeping.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

import optuna
from mlflow.tracking import MlflowClient


# The notebooks' four scenarios (none, L1, L2, L1+L2) with 5 seeds each: with --stack auto on CUDA, one
# stack of 20 members.
NOTEBOOK_GRID = ["--grid", "l1=0,0.001 l2=0,0.0005", "--repeats", "5"]


def run_row(row: str, args) -> dict:
    spec, _, trials = row.partition(":")
    stack, _, pruner = spec.partition("-")
    store = tempfile.mkdtemp()
    uri, storage = f"sqlite:///{store}/mlflow.db", f"sqlite:///{store}/optuna.db"
    if stack == "grid":
        stack, trials, space = "auto", 4, NOTEBOOK_GRID
    else:
        trials, space = int(trials or args.trials), []
    cmd = [sys.executable, "-m", "regsweep", "optimize", "--trials", str(trials), "--epochs", str(args.epochs),
           "--stack", stack, "--pruner", pruner or "none", "--storage", storage, "--experiment-name", "bench",
           "--seed", "1", *space, *args.extra]
    start, started_at = time.perf_counter(), time.time()
    done = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, cwd=store,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode:  # why, for the log; the other rows still run
        raise RuntimeError(f"row {row}: `{shlex.join(cmd)}` exited {done.returncode}:\n{done.stderr[-4000:]}")
    study = optuna.load_study(study_name="bench", storage=storage)
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("bench").experiment_id], max_results=1000)
    trial_runs = [r for r in runs if "optuna.trial_number" in r.data.tags and "seed" in r.data.params]
    # Every member of a stack logs the stack's epoch time, each under its own epoch number (a member that took
    # a freed slot counts from 1 again): the stack's epochs are its distinct times. One by one, a run is its own
    # stack.
    epoch_seconds: dict[str, set[float]] = {}
    # When the epochs ran, from the metrics' own timestamps (taken when each epoch's metrics were queued, after
    # its evaluation): the first epoch's training began about its epoch time before its metrics; the last
    # epoch's metrics mark the end of training. What lies outside is start-up and the tail (completing runs).
    began, ended = float("inf"), 0.0
    for r in trial_runs:
        which = r.data.tags.get("regsweep.stack", r.info.run_id)
        history = client.get_metric_history(r.info.run_id, "speed/epoch_seconds")
        epoch_seconds.setdefault(which, set()).update(m.value for m in history)
        began = min([began, *(m.timestamp / 1000 - m.value for m in history)])
        ended = max([ended, *(m.timestamp / 1000 for m in history)])
    training = sum(map(sum, epoch_seconds.values()))
    # The per-epoch hooks (queueing each member's metrics, Optuna's report and pruning) run one after
    # another in the training process: their sum over runs is wall time.
    hooks = sum(r.data.metrics.get("total_hook_seconds", 0.0) for r in runs)
    # A stack has its members' slots for each of its epochs; the epochs that no member trained in a slot would
    # idle there, unless the stack shrinks or the slot takes another trial (training.fit_stack).
    slot_epochs = sum(int(r.data.tags["regsweep.stack_members"]) * len(epoch_seconds[r.data.tags["regsweep.stack"]])
                      for r in {r.data.tags["regsweep.stack"]: r for r in trial_runs
                                if "regsweep.stack" in r.data.tags}.values())
    trained = sum(r.data.metrics.get("epochs_trained", 0.0) for r in trial_runs if "regsweep.stack" in r.data.tags)
    stopped = 1 - trained / slot_epochs if slot_epochs else 0.0
    best = max((t.value for t in study.trials if t.state.name == "COMPLETE"), default=float("nan"))
    return {"row": row, "stack": "grid 4x5, auto" if space else stack, "pruner": pruner or "none", "trials": len(done),
            "pruned": sum(t.state.name == "PRUNED" for t in done), "wall": wall,
            "per_hour": 3600 * len(done) / wall, "best": best, "training": training, "hooks": hooks, "stopped": stopped,
            "startup": began - started_at, "epochs": ended - began, "tail": started_at + wall - ended}


# What a stack's training step can run under, one --throughput row each: regsweep's default, then one lever at
# a time that PyTorch offers (cuDNN's choice of algorithm, TF32, memory format, precision, a compiled model inside
# the captured step), and the per-member learning rates that refilled stacks step with.
VARIANTS = {
    "default": "deterministic cuDNN, TF32 convolutions (regsweep's default)",
    "fp32": "the same, TF32 off (--tf32 false)",
    "timed": "deterministic algorithms, chosen by timing (cudnn.benchmark)",
    "channels-last": "deterministic, channels-last weights",
    "bf16": "deterministic, bf16 autocast",
    "channels-last-bf16": "deterministic, channels-last weights, bf16 autocast",
    "compiled": "deterministic, model compiled inside the captured step",
    "schedules": "deterministic, per-member learning rates (refilled stacks)",
    "fastest": "cuDNN's fastest algorithms (--deterministic false)",
    "fastest-fp32": "the same, TF32 off",
}


def variant_setup(variant: str, cfgs: list, data):
    """A stack of `cfgs` set up as regsweep does, then changed as `variant` says (VARIANTS)."""
    import torch

    from regsweep.step import CudaGraphStep, make_step
    from regsweep.training import new_stack, setup

    if variant.endswith("bf16"):
        cfgs = [c.replace(precision="bf16") for c in cfgs]
    model = new_stack(cfgs)
    if variant.startswith("channels-last"):
        model = model.to(memory_format=torch.channels_last)
    run = setup(cfgs, data, model=model, own_schedules=variant == "schedules")
    # setup() has set regsweep's own cuDNN/TF32 flags; the variant changes them before the first step.
    torch.backends.cudnn.deterministic = not variant.startswith("fastest")
    torch.backends.cudnn.benchmark = variant == "timed" or variant.startswith("fastest")
    torch.backends.cudnn.allow_tf32 = not variant.endswith("fp32")
    if variant == "compiled":
        step = make_step(torch.compile(run.model), run.optimizer, run.data.train, cfgs[0], run.penalised,
                         run.augment_generator, run.coef)
        run.step = CudaGraphStep(step, run.augment_generator) if run.mode == "cuda-graph" else step
    return run


def profile_step(run, steps: int = 20) -> None:
    """Where one step of `run` spends its time: `steps` calls of the step launched op by op (a captured graph
    replays the same kernels) under torch.profiler, its top operators and kernels by own device time on CUDA
    (so the layers that bound a wide stack show), by own CPU time elsewhere."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    eager = getattr(run.step, "step", run.step)  # CudaGraphStep keeps the step it records
    cuda = torch.cuda.is_available()
    batches = [torch.randint(len(run.data.train), (run.batch_size,), device=run.data.train.x.device)
               for _ in range(steps + 3)]
    for idx in batches[:3]:  # warm-up, unprofiled
        eager(idx)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for idx in batches[3:]:
            eager(idx)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"\n{steps} eager steps, top operators and kernels by {key}:\n")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=90), flush=True)


def throughput(sizes: list[int], variants: list[str], epochs: int = 2, small: bool = False,
               profile_steps: int = 0) -> None:
    """Training-step throughput of one stack per size and variant: the mean epoch of `epochs`, after a warm-up
    epoch (which captures the step and, for "compiled", compiles it). With `profile_steps`, each row is followed
    by where that many eager steps spend their time."""
    import torch

    from regsweep.config import TrainConfig
    from regsweep.data import load_for

    options = dict(max_train_samples=2000, max_eval_samples=1000) if small else {}
    cfg = TrainConfig(l1=1e-4, l2=1e-4, epochs=epochs + 1, **options)
    data = load_for(cfg)
    cuda = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if cuda else "CPU (cuDNN and TF32 rows change nothing here)"
    print(f"{where}, torch {torch.__version__}; {len(data.train):,} training images, batch {cfg.batch_size}, "
          f"mean of {epochs} epochs after a warm-up epoch\n")
    print("| members | step | epoch s | model-images/s | vs first row |")
    print("|---|---|---|---|---|")
    for k in sizes:
        base = None
        for variant in variants:
            run = variant_setup(variant, [cfg.replace(seed=1 + i) for i in range(k)], data)
            run.epoch()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(epochs):
                images = run.epoch()["images"]
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / epochs
            rate = k * images / seconds
            base = base or rate
            mode = getattr(run.step, "mode", run.mode)
            note = "" if mode in ("cuda-graph", "eager", "compiled") else f" ({mode})"
            print(f"| {k} | {VARIANTS[variant]}{note} | {seconds:.2f} | {rate:,.0f} | {rate / base:.2f}x |",
                  flush=True)
            if profile_steps:
                profile_step(run, profile_steps)
            del run


def shrink(sizes: list[int], args) -> None:
    """What becomes of the slots of members that stop part-way (as pruned ones do), for 2K configurations at
    stack size K, as a sweep trains them: two stacks of K whose stopped slots idle; two stacks of K that
    shrink to the members still training (fit_stack's `compact`); one stack of K whose freed slots take the
    next configuration (fit_stack's `refill`), shrinking once none is left. Half the configurations stop
    after epoch 2, a quarter more after epoch 4. Same data and configurations throughout: in float64 idle and
    shrinking give identical members, and a refilled member trains as a fresh model on the stack's batches
    (tests/test_stack.py); in float32 the mean best validation accuracy agrees within noise. A compiled step
    (`args.compiled`) keeps its stack's shape, so its stopped slots idle either way: no shrinking row."""
    from itertools import islice

    import torch

    from regsweep.config import TrainConfig
    from regsweep.data import load_for
    from regsweep.step import step_mode
    from regsweep.training import fit_stack

    cfg = TrainConfig(l1=1e-4, l2=1e-4, epochs=args.epochs, **args.shrink_options)
    data = load_for(cfg)
    mode = step_mode(cfg, torch.device(cfg.resolved_device()))

    def stop_epoch(i: int) -> int:
        return 2 if i % 2 else 4 if i % 4 == 2 else cfg.epochs

    def hook_from(first: int):
        """The hook of a stack whose member k is configuration first + k."""
        return lambda k, epoch, metrics: ("stopped by the benchmark"
                                          if epoch == stop_epoch(first + k) < cfg.epochs else None)

    print(f"{cfg.resolved_device()}, {len(data.train):,} training images, {cfg.epochs} epochs, step {mode}; half "
          "the configurations stop after epoch 2, a quarter more after epoch 4\n")
    print("| members | configurations | member-epochs trained | freed slots | training s | vs idle | "
          "mean best val acc |")
    print("|---|---|---|---|---|---|---|")
    for k in sizes:
        cfgs = [cfg.replace(seed=1 + i, l1=1e-4 * (i % 4)) for i in range(2 * k)]
        fit_stack(cfgs[:1], data)  # warm-up: first CUDA context, cuDNN's choices
        seconds, best = {}, {}
        ways = ("idle", "take the next configuration") if mode == "compiled" else (
            "idle", "leave the stack", "take the next configuration")
        for way in ways:
            start = time.perf_counter()
            if way == "take the next configuration":
                queue = iter(cfgs[k:])
                results = fit_stack(cfgs[:k], data, hook_from(0), refill=lambda free: list(islice(queue, free)) or None)
            else:
                results = [r for first in (0, k)
                           for r in fit_stack(cfgs[first:first + k], data, hook_from(first), compact=way != "idle")]
            seconds[way] = time.perf_counter() - start
            best[way] = [r.summary["best_val_acc"] for r in results]
        trained = sum(stop_epoch(i) for i in range(2 * k))
        for way in seconds:
            print(f"| {k} | {2 * k} | {trained} of {2 * k * cfg.epochs} | {way} | {seconds[way]:.1f} | "
                  f"{seconds['idle'] / seconds[way]:.2f}x | {100 * sum(best[way]) / len(best[way]):.2f}% |", flush=True)


def hooks(sizes: list[int], args) -> None:
    """The hook that runs after each epoch for every member of a stack (stacked.EpochHook: queue the member's
    metrics for MLflow, report to its trial, ask the median pruner) against the same hook asking Optuna's
    `trial.should_prune()` per member, the reference, and without asking any pruner (what logging and
    reporting cost alone; members then train all epochs). The hooks' time in the calling thread is what holds
    up the next epoch; between epochs the benchmark sleeps, as a GPU epoch would leave the host idle, and
    the writes queued for MLflow and Optuna proceed in their threads. Real SQLite stores for MLflow and Optuna, as
    `regsweep optimize` opens them, no training: each study holds a first stack's 32 complete trials, then
    K trials are asked and their members report made-up curves (the same in both) for the epochs."""
    import random
    import warnings

    import mlflow

    from regsweep.config import TrainConfig
    from regsweep.sweep.space import SearchSpace
    from regsweep.sweep.stacked import EpochHook, StackedTrial
    from regsweep.sweep.study import SweepSettings, load_study
    from regsweep.tracking import enable_prompt_flushes

    enable_prompt_flushes()  # as `regsweep optimize` sets MLflow's logging queue up

    class PerMember(EpochHook):
        def reads_storage(self, study):  # as for Hyperband: report, then trial.should_prune()
            return True

    def curve(seed: int) -> dict[int, float]:
        rng = random.Random(seed)
        top = rng.uniform(0.95, 0.99)
        return {e: top - 0.05 * 0.5 ** e + rng.gauss(0, 0.002) for e in range(1, args.epochs + 1)}

    warnings.filterwarnings("ignore", message="Heartbeat of storage")  # ask/tell, as in a stacked sweep
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as `regsweep optimize` sets it
    store = tempfile.mkdtemp()
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    client = MlflowClient()
    experiment = client.create_experiment("hooks")
    names = [f"metric_{i}" for i in range(40)]  # about what a real epoch logs: losses, accuracies, weight statistics
    print(f"{args.epochs} epochs, {args.epoch_seconds} s apart; each study holds 32 complete trials; 40 metrics a "
          "member-epoch; the median pruner unless the row says none\n")
    print("| members | pruner asked | ms per stack epoch | ms per member-epoch | queued writes left at the end, s "
          "| members pruned |")
    print("|---|---|---|---|---|---|")
    ways = (("per member (Optuna's should_prune)", PerMember, "median"), ("one read an epoch", EpochHook, "median"),
            ("not asked (--pruner none): logging and reporting only", EpochHook, "none"))
    for k in sizes:
        rows = {}
        for name, hook_class, pruner in ways:
            settings = SweepSettings(base=TrainConfig(epochs=args.epochs), space=SearchSpace(), trials=32 + k,
                                     study_name=f"{name} {k}", storage=f"sqlite:///{store}/optuna.db",
                                     experiment_name="hooks", pruner=pruner)
            study = load_study(settings)
            study.add_trials([optuna.trial.create_trial(value=max(c.values()), intermediate_values=c)
                              for c in map(curve, range(32))])
            members = []
            for i in range(k):
                run_id = client.create_run(experiment).info.run_id
                members.append((StackedTrial(study.ask(), {}, run_ids=[run_id]), 0))
            hook, curves = hook_class(settings, members, client), [curve(1000 + i) for i in range(k)]
            seconds, stopped, calls = 0.0, set(), 0
            for epoch in range(1, args.epochs + 1):
                time.sleep(args.epoch_seconds)  # the epoch's training, on a GPU: queued writes proceed meanwhile
                start = time.perf_counter()
                for i in range(k):
                    if i not in stopped:
                        value, calls = curves[i][epoch], calls + 1
                        if hook(i, epoch, {"val/acc": value} | {n: value for n in names}):
                            stopped.add(i)
                seconds += time.perf_counter() - start
            flush = time.perf_counter()
            hook.flush()  # what the queued writes cost background threads meanwhile: Optuna's reports,
            mlflow.flush_async_logging()  # MLflow's metrics
            flush = time.perf_counter() - flush
            if pruner != "none":
                rows[name] = sorted(stopped)
            print(f"| {k} | {name} | {1000 * seconds / args.epochs:.0f} | {1000 * seconds / calls:.1f} | "
                  f"{flush:.1f} | {len(stopped)} |", flush=True)
        if len(set(map(tuple, rows.values()))) != 1:
            print(f"the two ways pruned different members: {rows}")
            sys.exit(1)


def flushes(args) -> None:
    """What flushing MLflow's logging queue holds up. The sweep flushes whenever a member leaves its stack
    (its epochs in the store before its run is completed) while the other members wait, and once a stack
    ends; ending a run that logged asynchronously waits the same way. MLflow's own logging loop against the
    buffered one regsweep sets (tracking.enable_prompt_flushes), in turn, in one process, against a real SQLite
    store: each epoch queues 40 metrics, lasts `--epoch-seconds` times 0.5-1.5 (the same draws for both),
    and ends with two members leaving: two flushes in a row."""
    import random
    import statistics

    import mlflow

    from regsweep.tracking import enable_prompt_flushes

    store = tempfile.mkdtemp()
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    mlflow.set_experiment("flushes")
    names = [f"metric_{i}" for i in range(40)]
    rng = random.Random(0)
    epochs = [rng.uniform(0.5, 1.5) * args.epoch_seconds for _ in range(args.epochs)]
    print(f"{args.epochs} epochs of {min(epochs):.2f}-{max(epochs):.2f} s, two flushes after each\n")
    print("| logging loop | flushes | ms per flush, median | max | s held in all |\n|---|---|---|---|---|")
    for name in ("MLflow's default", "buffered (regsweep's setting)"):
        os.environ.pop("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", None)
        if name.startswith("buffered"):
            enable_prompt_flushes()
        seconds = []
        with mlflow.start_run():
            mlflow.log_metrics({"warm-up": 0.0}, synchronous=False)
            mlflow.flush_async_logging()  # the logging thread starts anew, reading the setting
            for epoch, length in enumerate(epochs, 1):
                mlflow.log_metrics({n: 0.5 for n in names}, step=epoch, synchronous=False)
                time.sleep(length)  # the epoch's training: the queued metrics are written meanwhile
                for _ in range(2):
                    start = time.perf_counter()
                    mlflow.flush_async_logging()
                    seconds.append(time.perf_counter() - start)
        print(f"| {name} | {len(seconds)} | {1000 * statistics.median(seconds):.0f} | {1000 * max(seconds):.0f} | "
              f"{sum(seconds):.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=None, help='default "1:8,8,32,32-median" ("1,4" with --small)')
    parser.add_argument("--trials", type=int, default=None, help="default 32 (4 with --small)")
    parser.add_argument("--epochs", type=int, default=None, help="default 15 (1 with --small)")
    parser.add_argument("--small", action="store_true", help="CPU size: 4 trials, 1 epoch, 2,000 images")
    parser.add_argument("--throughput", default=None, help="e.g. 1,8,32: only the step throughput per stack size")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"with --throughput, which steps to time (of {', '.join(VARIANTS)}; the first is the "
                             "reference)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="with --throughput: after each row, where that many eager steps spend their time")
    parser.add_argument("--options", default="", help='more `regsweep optimize` options, e.g. "--deterministic false"')
    parser.add_argument("--shrink", default=None, help="e.g. 8,32: only idle, shrinking and refilled slots, per size")
    parser.add_argument("--compiled", action="store_true",
                        help="with --shrink --small: the step compiled (the CPU's default), not eager")
    parser.add_argument("--hooks", default=None,
                        help="e.g. 8,32: only the per-epoch hooks (logging, pruning), per size")
    parser.add_argument("--epoch-seconds", type=float, default=1.0,
                        help="with --hooks or --flushes: the time between two epochs, standing in for training")
    parser.add_argument("--flushes", action="store_true", help="only what one flush of MLflow's logging queue waits")
    args = parser.parse_args()
    if args.flushes:
        args.epochs = args.epochs or 15
        flushes(args)
        return
    if args.hooks:
        args.epochs = args.epochs or 15
        hooks([int(k) for k in args.hooks.split(",")], args)
        return
    if args.shrink:
        args.epochs = args.epochs or (6 if args.small else 15)
        args.shrink_options = dict(max_train_samples=2000, max_eval_samples=1000,
                                   compile=args.compiled) if args.small else {}
        shrink([int(k) for k in args.shrink.split(",")], args)
        return
    if args.throughput:
        throughput([int(k) for k in args.throughput.split(",")], args.variants.split(","), small=args.small,
                   profile_steps=args.profile)
        return
    args.extra = args.options.split()
    if args.small:
        args.trials, args.epochs, args.rows = args.trials or 4, args.epochs or 1, args.rows or "1,4"
        args.extra += ["--max-train-samples", "2000", "--max-eval-samples", "1000", "--compile", "false"]
    args.rows, args.trials, args.epochs = args.rows or "1:8,8,32,32-median", args.trials or 32, args.epochs or 15
    import torch
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{where}, torch {torch.__version__}; {args.trials} trials x {args.epochs} epochs unless the row "
          f"says otherwise; `regsweep optimize {args.options}` with MLflow logging (figures on, model off: "
          "optimize's defaults)")
    from bytecode import bytecode_line  # beside this script

    print(f"{bytecode_line()}\n")
    results = []
    header = ("| --stack | pruner | trials (pruned) | wall s | configs/h | vs --stack 1 | training share "
              "| stopped slots | epoch hooks share | best val acc |\n|---|---|---|---|---|---|---|---|---|---|")
    for row in args.rows.split(","):
        try:
            results.append(run_row(row, args))
        except RuntimeError as exc:
            print(exc, file=sys.stderr, flush=True)
            continue
        print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    if not results:
        sys.exit("no row finished")
    # Rates relative to the one-by-one row when there is one, else to the first row.
    one_by_one = next((r for r in results if r["stack"] == "1"), None)
    base = (one_by_one or results[0])["per_hour"]
    print(header.replace("vs --stack 1", "vs --stack 1" if one_by_one else "vs first row"))
    for r in results:
        print(f"| {r['stack']} | {r['pruner']} | {r['trials']} ({r['pruned']}) | {r['wall']:.1f} | "
              f"{r['per_hour']:,.0f} | {r['per_hour'] / base:.1f}x | {100 * r['training'] / r['wall']:.0f}% | "
              f"{100 * r['stopped']:.0f}% | {100 * r['hooks'] / r['wall']:.1f}% | {100 * r['best']:.2f}% |", flush=True)
    print("\nWhere the wall time went: before the first epoch's first step (imports, stores, data, workers "
          "spawned); from there to the last epoch's metrics (training steps, evaluation, hooks, refills, runs "
          "completed on the way); after them (completing the last runs, the study's end, exit).\n\n"
          "| --stack | pruner | wall s | before the first epoch s | epochs s | of which training steps s "
          "| after the last epoch s |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['stack']} | {r['pruner']} | {r['wall']:.1f} | {r['startup']:.1f} | {r['epochs']:.1f} | "
              f"{r['training']:.1f} | {r['tail']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
