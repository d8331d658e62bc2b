"""Stacked members train exactly as separate models: a stack of K is K models, not a different one.

The comparisons run in float64. In float32, summation-order noise (1e-8) between a grouped and a single
convolution is amplified by batch norm over near-constant channels (up to 1/sqrt(eps)) to 1e-4 within a few
steps; in float64 the same noise stays far below the tolerances, so a real difference cannot hide in it.
"""

from __future__ import annotations

import math

import pytest
import torch

from regsweep.data import MnistSplits, Split
from regsweep.regularization import weight_stats
from regsweep.training import Trainer, evaluate, fit, fit_stack, member_state, new_stack, setup


def double(data: MnistSplits) -> MnistSplits:
    return MnistSplits(*(Split(s.x.double(), s.y) for s in (data.train, data.val, data.test)), source=data.source)


VARIANTS = {
    "cnn-bn": dict(),
    "cnn-gbn": dict(norm="gbn", ghost_batch_size=8),
    "cnn-none": dict(norm="none"),
    "mlp-bn": dict(model="mlp", hidden="32,16", norm="bn"),
    "mlp-adam": dict(model="mlp", hidden="32,16", norm="none", optimizer="adam", lr=0.01),
}
MEMBERS = [dict(l1=0.0, l2=0.0, seed=1), dict(l1=1e-3, l2=0.0, seed=2), dict(l1=0.0, l2=5e-4, seed=3),
           dict(l1=1e-3, l2=5e-4, seed=4)]


def train_steps(cfgs, data, batches):
    run = setup(cfgs, data, new_stack(cfgs).double())
    for idx in batches:
        run.step(idx)
    assert run.effective_mode == ("cuda-graph" if batches[0].is_cuda else "eager")  # on CUDA, the captured step
    state = {name: t.cpu() for name, t in run.model.state_dict().items()}
    grads = {name: p.grad.cpu() for name, p in run.model.named_parameters()}
    return [(member_state(state, k, len(cfgs)), member_state(grads, k, len(cfgs))) for k in range(len(cfgs))]


CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device here"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_k_stacked_members_equal_k_separate_models(tiny_data, tiny_cfg, variant, device):
    """Weights, gradients and batch-norm statistics after a few steps on the same batches, member by member
    (on CUDA: TF32 off and deterministic cuDNN, set through step.configure_device; the captured step)."""
    base = tiny_cfg.replace(device=device, tf32=False, augment=False, batch_size=32, **variant)
    cfgs = [base.replace(**m) for m in MEMBERS]
    batches = [b.to(device) for b in torch.randperm(len(tiny_data.train),
                                                    generator=torch.Generator().manual_seed(0)).split(32)[:5]]
    data = double(tiny_data)
    stacked = train_steps(cfgs, data, batches)
    for k, cfg in enumerate(cfgs):
        ((alone_state, alone_grads),) = train_steps([cfg], data, batches)
        state, grads = stacked[k]
        assert state.keys() == alone_state.keys()
        for name in alone_state:  # running_mean/var and num_batches_tracked included
            torch.testing.assert_close(state[name], alone_state[name], rtol=1e-7, atol=1e-9,
                                       msg=lambda m, k=k, name=name: f"member {k} {name}: {m}")
        for name in alone_grads:
            torch.testing.assert_close(grads[name], alone_grads[name], rtol=1e-7, atol=1e-9,
                                       msg=lambda m, k=k, name=name: f"member {k} {name}: {m}")


def test_stacked_fit_equals_separate_fits_on_the_same_batches(tiny_data, tiny_cfg):
    """End to end with augmentation and a schedule: members with the stack's seed see its batches and
    rotations, so each member's history is what `fit` gives alone."""
    base = tiny_cfg.replace(device="cpu", epochs=2)
    cfgs = [base.replace(l1=l1, l2=l2) for l1, l2 in ((0, 0), (1e-3, 0), (0, 5e-4))]
    data = double(tiny_data)
    stacked = fit_stack(cfgs, data, model=new_stack(cfgs).double())
    for cfg, member in zip(cfgs, stacked):
        alone = fit(cfg, data, model=new_stack([cfg]).double())
        for got, want in zip(member.history, alone.history):
            for key in ("train/loss", "val/acc", "val/loss", "penalty/sum_abs_w", "weights/conv1/mean_abs"):
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
        assert member.summary["best_val_epoch"] == alone.summary["best_val_epoch"]
        assert torch.equal(member.test_pred, alone.test_pred)
        # The logged predictions are those behind the logged test accuracy of the selected epoch.
        assert (member.test_pred == data.test.y).float().mean().item() == member.summary["test_acc_at_best_val"]
        for name, t in alone.model.state_dict().items():
            torch.testing.assert_close(member.model.state_dict()[name].double(), t.double(), rtol=1e-6, atol=1e-7)


def test_a_diverging_member_stops_alone_and_its_nan_reaches_no_other(tiny_data, tiny_cfg):
    base = tiny_cfg.replace(device="cpu", epochs=2, scheduler="none")
    cfgs = [base, base.replace(l1=math.inf), base.replace(l2=5e-4)]  # member 1's weights become inf, then NaN
    data = double(tiny_data)
    stacked = fit_stack(cfgs, data, model=new_stack(cfgs).double())
    assert stacked[1].diverged and stacked[1].stop_reason.startswith("diverged: training loss is")
    assert [m.diverged for m in (stacked[0], stacked[2])] == [False, False]
    for k in (0, 2):
        assert len(stacked[k].history) == 2 and all(math.isfinite(v) for h in stacked[k].history for v in h.values())
        alone = fit(cfgs[k], data, model=new_stack([cfgs[k]]).double())
        assert stacked[k].history[-1]["val/loss"] == pytest.approx(alone.history[-1]["val/loss"], rel=1e-6)
        assert all(torch.isfinite(t).all() for t in stacked[k].model.state_dict().values())


def test_a_member_stopped_by_its_hook_keeps_its_epochs_and_the_others_go_on(tiny_data, tiny_cfg):
    base = tiny_cfg.replace(device="cpu", epochs=3)
    cfgs = [base, base.replace(l1=1e-3)]
    seen = []

    def hook(k, epoch, metrics):
        seen.append((k, epoch))
        return "pruned by test" if k == 1 and epoch == 1 else None

    def leave(k, result):  # member 1 is done before member 0 trains its epoch 2
        seen.append(("left", k, result.summary["epochs_trained"], len(result.test_pred)))

    stacked = fit_stack(cfgs, tiny_data, hook, on_leave=leave)
    assert seen == [(0, 1), (1, 1), ("left", 1, 1, len(tiny_data.test)), (0, 2), (0, 3)]
    assert stacked[1].stop_reason == "pruned by test" and len(stacked[1].history) == 1
    assert len(stacked[0].history) == 3 and stacked[0].stop_reason == ""


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["cnn-bn", "mlp-adam"])
def test_a_stack_that_shrinks_trains_its_other_members_on_exactly_as_before(tiny_data, tiny_cfg, variant, device,
                                                                          monkeypatch):
    """Members stopped by the hook leave the stack (4 -> 2 -> 1 members): every member's history, selected
    weights and test predictions are those of the same stack whose stopped slots idle instead (float64;
    on CUDA the smaller stacks' steps are captured anew)."""
    base = tiny_cfg.replace(device=device, epochs=3, **VARIANTS[variant])
    cfgs = [base.replace(**m) for m in MEMBERS]
    stops = {(1, 1), (3, 1), (0, 2)}  # (member, epoch): after epoch 2 only member 2 trains on

    def hook(k, epoch, metrics):
        return "pruned by test" if (k, epoch) in stops else None

    splits = (tiny_data.train, tiny_data.val, tiny_data.test)  # 256 images each, 8 steps an epoch
    data = double(MnistSplits(*(Split(s.x[:256], s.y[:256]) for s in splits), source=tiny_data.source))
    widths = []  # the stack's members after each shrink
    original = Trainer.compact

    def compact_and_record(trainer, keep):
        widths.append(len(keep))
        return original(trainer, keep)

    monkeypatch.setattr(Trainer, "compact", compact_and_record)
    idle = fit_stack(cfgs, data, hook, model=new_stack(cfgs).double(), compact=False)
    assert widths == []
    shrunk = fit_stack(cfgs, data, hook, model=new_stack(cfgs).double(), compact=True)
    assert widths == [2, 1]  # 4 -> 2 after epoch 1, -> 1 after epoch 2
    assert {r.step_mode for r in idle + shrunk} == {"cuda-graph" if device == "cuda" else "eager"}
    for k, (a, b) in enumerate(zip(idle, shrunk)):
        assert len(a.history) == len(b.history) == {1: 1, 3: 1, 0: 2, 2: 3}[k]
        for got, want in zip(b.history, a.history):
            for key in ("train/loss", "val/acc", "val/loss", "lr", "penalty/sum_sq_w"):
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (k, key)
            # Weight statistics are float32 (for logging), and on CUDA their sums run in an order that
            # depends on the stack's width: equal to float32 rounding.
            assert got["weights/all/mean_abs"] == pytest.approx(want["weights/all/mean_abs"], rel=1e-6), k
        assert b.summary["best_val_epoch"] == a.summary["best_val_epoch"]
        assert torch.equal(b.test_pred, a.test_pred), k
        for name, t in a.model.state_dict().items():
            if not name.endswith("num_batches_tracked"):  # one count for a whole stack, unused by its norms
                torch.testing.assert_close(b.model.state_dict()[name], t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("device", DEVICES)
def test_a_refilled_slot_trains_its_new_member_as_a_fresh_model_on_the_stacks_batches(tiny_data, tiny_cfg, device,
                                                                                       momentum, request):
    """Member 0 is stopped after epoch 1 and a new member takes its slot: it trains from its own seed's
    weights, with no momentum yet and the schedule from its first step, on the stack's batches and rotations
    from the stack's epoch 2 on; member 1 beside it trains as it would alone (float64; on CUDA the captured step
    replays on through the refill). With SGD's momentum (Nesterov) and without it (plain SGD)."""
    if device == "cuda" and momentum == 0.0:
        # Measured on an H100: with plain SGD the member beside the refilled slot ended its last epoch with a
        # training loss 3e-5 (relative) off the same member trained alone, although float64; it matches on
        # the CPU, with momentum 0.9, and over 3 epochs instead of 2. That run came after the capture-fallback
        # test in the same process, which may have left capture broken (recover_from_failed_capture), so the
        # step may have run eagerly. Strict: the day it matches, this fails and says so.
        request.applymarker(pytest.mark.xfail(strict=True, reason="plain SGD beside a refill on CUDA: unexplained"))
    base = tiny_cfg.replace(device=device, epochs=2, momentum=momentum)
    first, second, newcomer = base, base.replace(l1=1e-3), base.replace(l2=5e-4, seed=7)
    splits = (tiny_data.train, tiny_data.val, tiny_data.test)  # 256 images each, 8 steps an epoch
    data = double(MnistSplits(*(Split(s.x[:256], s.y[:256]) for s in splits), source=tiny_data.source))
    asked, left = [], []

    def refill(free):
        asked.append(free)
        return [newcomer] if len(asked) == 1 else None  # then no more: member 1's slot is dropped

    results = fit_stack([first, second], data, lambda k, epoch, metrics: "pruned by test" if k == 0 else None,
                        model=new_stack([first, second]).double(), refill=refill,
                        on_leave=lambda k, result: left.append(k))
    assert len(results) == 3 and asked == [1, 1, 1] and left == [0, 1, 2]
    assert {r.step_mode for r in results} == {"cuda-graph" if device == "cuda" else "eager"}
    assert [len(r.history) for r in results] == [1, 2, 2] and results[0].stop_reason == "pruned by test"

    # The newcomer alone: its own weights, the generators where the stack's were after its epoch 1.
    warm = setup([first], data, new_stack([first]).double())
    warm.epoch()
    alone = setup([newcomer.replace(seed=first.seed)], data, new_stack([newcomer]).double())
    alone.order_generator.set_state(warm.order_generator.get_state())
    alone.augment_generator.set_state(warm.augment_generator.get_state())
    for got in results[2].history:
        rate = alone.rates()[0]
        train = alone.epoch()
        val = evaluate(alone.model, alone.data.val)  # the split on the stack's device
        want = {"train/loss": (train["loss_sum"] / train["images"]).item(), "val/loss": val["loss"].item(),
                "val/acc": val["acc"].item(), "lr": rate,
                "weights/all/mean_abs": weight_stats(alone.model)["weights/all/mean_abs"]}
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key

    beside = fit(second, data, model=new_stack([second]).double())
    for got, want in zip(results[1].history, beside.history):
        for key in ("train/loss", "val/acc", "val/loss", "lr", "weights/all/mean_abs"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    assert torch.equal(results[1].test_pred, beside.test_pred)


def test_refilling_needs_sgd(tiny_data, tiny_cfg):
    cfg = tiny_cfg.replace(device="cpu", optimizer="adam")
    with pytest.raises(ValueError, match="need SGD"):
        fit_stack([cfg, cfg.replace(l1=1e-3)], tiny_data, refill=lambda free: [])


def test_the_logged_learning_rate_is_the_one_the_epoch_trained_at(tiny_data, tiny_cfg):
    """A step schedule decays after the epoch's last step: the epoch's lr is the rate before it."""
    cfg = tiny_cfg.replace(device="cpu", epochs=3, lr=0.1, scheduler="step", step_size=2)
    assert [h["lr"] for h in fit(cfg, tiny_data).history] == pytest.approx([0.1, 0.1, 0.01])
