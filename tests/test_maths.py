"""Pure functions: penalties, weight statistics, ghost batch norm, the split, config validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from regsweep.config import ConfigError, TrainConfig, fmt_coef
from regsweep.data import (MNIST_MEAN, MNIST_STD, Split, batches, normalise, rotate_batch, shuffled_batches,
                           split_indices)
from regsweep.models import MLP, GhostBatchNorm, SqueezeExpandCNN, build_model, count_parameters
from regsweep.step import build_optimizer, build_scheduler
from regsweep.regularization import (
    member_penalties, member_sums, penalised_parameters, regularisation_loss, weight_stats)
from regsweep.training import (
    confusion_matrix, eval_batch_size, new_stack, per_class_metrics, predict, summarise)


def test_penalties_match_hand_computation():
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, -0.5, 0.0])
    sum_abs, sum_sq = member_sums([a, b])
    assert sum_abs.tolist() == pytest.approx([6.5]) and sum_sq.tolist() == pytest.approx([1 + 4 + 9 + 0.25])
    assert regularisation_loss([a, b], 0.1, 0.01).item() == pytest.approx(0.65 + 0.1425)
    assert regularisation_loss([a, b], 0.0, 0.0) == 0.0
    # Two members, member-major (member k's part of a tensor is row k), each with its own coefficients.
    c, d = torch.tensor([[1.0, -2.0], [0.5, 0.5]]), torch.tensor([[3.0], [-1.0]])
    both = member_penalties([c, d], torch.tensor([0.1, 0.0]), torch.tensor([0.0, 1.0]), members=2)
    assert both.tolist() == pytest.approx([0.1 * 6.0, 0.25 + 0.25 + 1.0])


def test_penalty_gradients_are_sign_and_twice_w():
    w = torch.tensor([2.0, -3.0, 0.5], requires_grad=True)
    regularisation_loss([w], l1=1.0, l2=0.0).backward()
    assert w.grad.tolist() == [1.0, -1.0, 1.0]
    w.grad = None
    regularisation_loss([w], l1=0.0, l2=1.0).backward()
    assert w.grad.tolist() == [4.0, -6.0, 1.0]


@pytest.mark.parametrize("penalize", ["weights", "all"])
def test_one_training_step_moves_exactly_the_penalised_tensors_by_the_penalty_gradient(penalize):
    """Through the real step: one plain SGD step from the same weights on the same batch, with and without a
    penalty. The data gradient is the same, so the difference is the penalty's own: -lr * l1 * sign(w) for L1,
    -lr * 2 * l2 * w for L2, on the penalised tensors (--penalize) and nothing elsewhere."""
    from regsweep.data import load_mnist
    from regsweep.training import fit, new_model

    lr, c = 0.1, 0.01
    base = TrainConfig(epochs=1, max_train_samples=32, max_eval_samples=64, batch_size=32, compile=False,
                       log_model=False, scheduler="none", momentum=0.0, augment=False, lr=lr, penalize=penalize)
    data = load_mnist(base.resolved_data_dir(), base.val_size, 32, 64)  # one batch: one step
    start = new_model(base).state_dict()
    after = {name: fit(base.replace(l1=l1, l2=l2), data).model.state_dict()
             for name, (l1, l2) in {"none": (0.0, 0.0), "l1": (c, 0.0), "l2": (0.0, c)}.items()}
    penalised = set(penalised_parameters(new_model(base), penalize))
    assert penalised and (penalize == "all") == any("bias" in name for name in penalised)
    for name, w in start.items():
        if name not in dict(new_model(base).named_parameters()):
            continue  # batch norm's running statistics: no gradient
        assert not torch.equal(after["none"][name], w), name  # the step did train it
        by_l1, by_l2 = after["l1"][name] - after["none"][name], after["l2"][name] - after["none"][name]
        if name in penalised:
            torch.testing.assert_close(by_l1, -lr * c * torch.sign(w), rtol=0, atol=2e-6)
            torch.testing.assert_close(by_l2, -lr * 2 * c * w, rtol=0, atol=2e-6)
        else:
            assert torch.equal(by_l1, torch.zeros_like(w)) and torch.equal(by_l2, torch.zeros_like(w)), name


def test_penalised_set_is_conv_and_linear_weights_only_by_default():
    model = SqueezeExpandCNN(norm="bn")
    weights = penalised_parameters(model, "weights")
    assert set(weights) == {"conv1.weight", "conv2.weight", "trans1.weight", "conv3.weight", "conv4.weight",
                            "conv5.weight", "conv6.weight", "head.weight"}
    everything = penalised_parameters(model, "all")
    assert "head.bias" in everything and "norms.conv1.weight" in everything
    assert len(everything) == len(list(model.parameters()))


def test_weight_stats_per_layer_and_whole_model():
    model = MLP(hidden=(3,), norm="none")
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[0.0005] * 784, [1.0] * 784, [-2.0] * 784]))
        model.out.weight.fill_(0.5)
    stats = weight_stats(model)
    assert stats["weights/fc1/max_abs"] == pytest.approx(2.0)
    assert stats["weights/fc1/frac_small"] == pytest.approx(1 / 3)
    assert stats["weights/fc1/mean_abs"] == pytest.approx((0.0005 + 1 + 2) / 3)
    assert stats["weights/out/l2_norm"] == pytest.approx(math.sqrt(30 * 0.25))
    n = 3 * 784 + 30
    assert stats["weights/all/frac_small"] == pytest.approx(784 / n)
    assert set(k.split("/")[1] for k in stats) == {"fc1", "out", "all"}


def test_cnn_is_under_10k_parameters_and_mlps_have_the_notebook_shapes():
    assert count_parameters(build_model(TrainConfig())) < 10_000
    big = build_model(TrainConfig(model="mlp", norm="none"))
    assert [big.fc1.in_features, big.fc1.out_features, big.fc3.out_features, big.out.out_features] == [784, 500,
                                                                                                     100, 10]
    small = build_model(TrainConfig(model="mlp", hidden="20,7,5", activation="tanh", norm="none"))
    assert count_parameters(small) == 784 * 20 + 20 + 20 * 7 + 7 + 7 * 5 + 5 + 5 * 10 + 10
    for cfg in (TrainConfig(), TrainConfig(norm="gbn"), TrainConfig(norm="none"), TrainConfig(model="mlp")):
        assert build_model(cfg)(torch.zeros(4, 1, 28, 28)).shape == (4, 10)


def test_ghost_batch_norm_normalises_each_virtual_batch_separately():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    x[4:] = x[4:] * 10 + 5  # the second virtual batch has very different statistics
    gbn = GhostBatchNorm(nn.BatchNorm2d(3), virtual_batch_size=4).train()
    out = gbn(x)
    for chunk in out.split(4):  # each virtual batch comes out standardised on its own
        assert chunk.mean((0, 2, 3)).abs().max() < 1e-5
        assert chunk.var((0, 2, 3), unbiased=False).sub(1).abs().max() < 1e-3
    plain = nn.BatchNorm2d(3).train()(x)
    assert not torch.allclose(plain, out, atol=1e-2)  # ordinary batch norm mixes the two
    gbn.eval()
    assert torch.allclose(gbn(x), gbn.bn(x))  # evaluation is plain batch norm with running stats


def test_validation_split_is_deterministic_disjoint_and_seed_independent():
    train_a, val_a = split_indices(60000, 5000)
    train_b, val_b = split_indices(60000, 5000)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert len(val_a) == 5000 and len(train_a) == 55000
    assert len(set(val_a.tolist()) & set(train_a.tolist())) == 0
    assert sorted(torch.cat([train_a, val_a]).tolist()) == list(range(60000))
    _, val_other = split_indices(60000, 5000, seed=1)
    assert not torch.equal(val_a, val_other)


def test_tiny_data_split_uses_real_mnist(tiny_data):
    assert tiny_data.sizes() == {"n_train": 1024, "n_val": 512, "n_test": 512}
    assert tiny_data.train.x.shape == (1024, 1, 28, 28) and tiny_data.train.x.dtype == torch.float32
    assert tiny_data.test.y[:5].tolist() == [7, 2, 1, 0, 4]  # the first MNIST test labels
    assert set(tiny_data.train.y.tolist()) == set(range(10))


def test_mnist_is_read_back_from_its_tensor_file_without_torchvision_and_reread_when_stale(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from regsweep.config import default_data_dir
    from regsweep.data import cache_path, load_raw

    data = tmp_path / "data"
    shutil.copytree(f"{default_data_dir()}/mnist", data / "mnist")
    first = load_raw(data)  # through torchvision, which writes the tensor file
    assert cache_path(data).is_file()
    probe = ("import sys; from regsweep.data import load_raw; t = load_raw(sys.argv[1]); "
             "print('torchvision' in sys.modules, [tuple(x.shape) for x in t], t[3][:5].tolist())")
    out = subprocess.run([sys.executable, "-c", probe, str(data)], capture_output=True, text=True, check=True)
    assert out.stdout.split("[", 1)[0].strip() == "False"  # a fresh process read the file, not torchvision
    assert "(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)" in out.stdout and "[7, 2, 1, 0, 4]" in out.stdout
    again = load_raw(data)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(first, again))
    # A raw file newer than the tensor file (a re-unpacked download) is read afresh; so is a damaged file.
    raw = data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels = bytearray(raw.read_bytes())
    labels[8] = (labels[8] + 1) % 10
    raw.write_bytes(bytes(labels))
    later = cache_path(data).stat().st_mtime + 5
    os.utime(raw, (later, later))
    assert load_raw(data)[3][0].item() == (first[3][0].item() + 1) % 10
    earlier = cache_path(data).stat().st_mtime - 1  # older than the tensor file again (not than the .gz)
    os.utime(raw, (earlier, earlier))
    for damage in (b"damaged", cache_path(data).read_bytes()[:1000], b""):
        cache_path(data).write_bytes(damage)
        assert torch.equal(load_raw(data)[0], first[0]) and cache_path(data).stat().st_size > 1_000_000
    # A readable tensor file whose labels are not digits (one written from damaged files, before labels were
    # checked) is refused like the files themselves.
    from regsweep.data import DataError, write_cache

    write_cache(data, (first[0], torch.full_like(first[1], 200), first[2], first[3]))
    with pytest.raises(DataError, match="are not digits 0-9"):
        load_raw(data)


def test_batches_cover_the_split_once_as_slices():
    split = Split(torch.arange(10.0).reshape(10, 1, 1, 1), torch.arange(10))
    ordered = list(batches(split, 4))
    assert [len(y) for _, y in ordered] == [4, 4, 2]
    shuffled = shuffled_batches(len(split), 4, torch.Generator().manual_seed(0))
    assert [len(idx) for idx in shuffled] == [4, 4, 2]
    shuffled = torch.cat([split.y[idx] for idx in shuffled])
    assert sorted(shuffled.tolist()) == list(range(10)) and shuffled.tolist() != list(range(10))


def test_evaluation_batches_shrink_with_the_stack_on_the_cpu_and_give_the_same_logits():
    assert [eval_batch_size(k, "cpu") for k in (1, 4, 32, 128)] == [512, 128, 16, 16]
    assert eval_batch_size(32, "cuda") == 1000
    stack = new_stack([TrainConfig(seed=seed) for seed in range(4)])
    split = Split(torch.randn(300, 1, 28, 28), torch.zeros(300, dtype=torch.long))
    batched = predict(stack, split)  # 128 images a batch: three batches, the last one short
    assert batched.shape == (300, 4, 10)
    torch.testing.assert_close(batched, predict(stack, split, batch_size=300), rtol=1e-5, atol=1e-5)


def test_rotation_keeps_background_and_zero_angle_is_identity():
    images = normalise(torch.zeros(2, 28, 28, dtype=torch.uint8))
    rotated = rotate_batch(images, 7.0, torch.Generator().manual_seed(0))
    assert torch.allclose(rotated, images, atol=1e-5)  # blank stays blank: rotated-in pixels are background
    digit = normalise((torch.rand(3, 28, 28) * 255).to(torch.uint8))
    assert torch.allclose(rotate_batch(digit, 0.0, torch.Generator()), digit, atol=1e-4)
    moved = rotate_batch(digit, 30.0, torch.Generator().manual_seed(1))
    assert not torch.allclose(moved, digit, atol=1e-2)
    assert images[0, 0, 0, 0].item() == pytest.approx(-MNIST_MEAN / MNIST_STD)


def test_rotation_angles_stay_within_max_degrees_and_spread_over_them():
    """A horizontal bar rotated 256 times by up to 7 degrees: the bar's principal axis (from its pixel mass)
    lies within 7 degrees of horizontal (plus a degree for the pixel grid) and reaches beyond 5."""
    bar = torch.zeros(256, 28, 28, dtype=torch.uint8)
    bar[:, 13:15, 3:25] = 255
    background = -MNIST_MEAN / MNIST_STD
    mass = (rotate_batch(normalise(bar), 7.0, torch.Generator().manual_seed(0)) - background).clamp(min=0)[:, 0]
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    total = mass.sum((1, 2))
    mx, my = (mass * xs).sum((1, 2)) / total, (mass * ys).sum((1, 2)) / total
    dx, dy = xs - mx[:, None, None], ys - my[:, None, None]
    cxx, cyy, cxy = ((mass * d).sum((1, 2)) / total for d in (dx * dx, dy * dy, dx * dy))
    degrees = torch.rad2deg(0.5 * torch.atan2(2 * cxy, cxx - cyy)).abs()
    assert degrees.max() <= 8.0 and degrees.max() > 5.0, degrees.max()


def test_confusion_matrix_and_per_class_scores():
    y_true = torch.tensor([0, 0, 1, 1, 2])
    y_pred = torch.tensor([0, 1, 1, 1, 0])
    cm = confusion_matrix(y_true, y_pred, n_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    rows = per_class_metrics(cm)
    assert rows[0]["precision"] == pytest.approx(0.5) and rows[0]["recall"] == pytest.approx(0.5)
    assert rows[1]["precision"] == pytest.approx(2 / 3) and rows[1]["recall"] == 1.0
    assert rows[1]["f1"] == pytest.approx(0.8)
    assert rows[2] == {"class": 2, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_summary_selects_on_validation_and_reports_test_there():
    history = [{"val/acc": 0.90, "test/acc": 0.95, "test/loss": 0.3, "val/loss": 0.4, "train/acc": 0.9},
               {"val/acc": 0.97, "test/acc": 0.93, "test/loss": 0.2, "val/loss": 0.2, "train/acc": 0.95},
               {"val/acc": 0.96, "test/acc": 0.99, "test/loss": 0.1, "val/loss": 0.3, "train/acc": 0.97}]
    s = summarise(history, 12.0)
    assert s == {"best_val_acc": 0.97, "best_val_epoch": 2, "test_acc_at_best_val": 0.93,
                 "test_loss_at_best_val": 0.2, "best_test_acc": 0.99, "best_test_epoch": 3,
                 "final_train_acc": 0.97, "final_val_acc": 0.96, "final_test_acc": 0.99, "final_val_loss": 0.3,
                 "epochs_trained": 3, "total_train_seconds": 12.0}


@pytest.mark.parametrize("changes, message", [
    ({"l1": -0.1}, "l1 must be a finite number"),
    ({"l2": float("nan")}, "l2 must be a finite number"),
    ({"l1": float("inf")}, "l1 must be a finite number"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"momentum": 1.0}, "momentum must be < 1"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"norm": "ln"}, "unknown norm 'ln'"),
    ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"hidden": "500,x"}, "hidden must be comma-separated integers"),
    ({"norm": "gbn", "batch_size": 100, "ghost_batch_size": 32}, "multiple of ghost_batch_size"),
    ({"model": "mlp", "norm": "gbn", "batch_size": 33, "ghost_batch_size": 32}, r"batch_size \(33\) must be"),
    ({"norm": "gbn", "max_train_samples": 97, "ghost_batch_size": 32}, r"the batch \(97: the training split"),
    ({"norm": "gbn", "val_size": 59967, "ghost_batch_size": 32}, r"the batch \(33: the training split"),
    ({"model": "mlp", "batch_size": 1}, "the MLP's batch norm needs at least 2 samples to a batch; the batch is 1"),
    ({"threads": 2**40}, "threads must be at most 4096"),
    ({"model": "mlp", "hidden": "500,10000000000000"}, "hidden layers must have at most 65,536 units"),
    ({"model": "mlp", "max_train_samples": 1}, "the MLP's batch norm needs at least 2 samples"),
    ({"model": "mlp", "norm": "gbn", "ghost_batch_size": 1}, "needs at least 2 samples to a batch; ghost_batch_size"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"seed": 2**64}, r"seed must be below 2\*\*63"),
])
def test_config_validation_names_the_problem(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).validate()


def test_one_sample_to_a_batch_is_refused_only_where_batch_norm_cannot_take_it():
    """The MLP's batch norm needs two samples to a batch; the CNN's normalises over pixels too."""
    TrainConfig(batch_size=1).validate()
    TrainConfig(model="mlp", norm="none", batch_size=1).validate()
    TrainConfig(model="mlp", norm="gbn", batch_size=64, ghost_batch_size=2).validate()


@pytest.mark.parametrize("steps", range(1, 12))
def test_onecycle_runs_any_number_of_steps(steps):
    """OneCycleLR divides by its warm-up's last step, which is step 0 for 5 steps in all."""
    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig(epochs=1, lr=0.1)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, steps)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(0 < r <= cfg.lr for r in rates), rates
    used = rates[:steps]  # the last one is the rate after the last step
    if steps > 5:  # warm-up to near the peak, then down below the start
        assert used[0] < 0.9 * cfg.lr < max(used) and used[-1] < used[0]


def test_settings_that_do_not_apply_are_logged_as_not_applicable():
    """In the MLflow UI a CNN run showing the MLP's layers, or an Adam run a momentum, reads as if they were used."""
    cnn = TrainConfig().as_params()
    assert [cnn[k] for k in ("hidden", "activation", "init", "ghost_batch_size", "step_size")] == ["n/a"] * 5
    assert cnn["momentum"] == "0.9" and cnn["norm"] == "bn"
    mlp = TrainConfig(model="mlp", norm="gbn", optimizer="adam", scheduler="step").as_params()
    assert [mlp[k] for k in ("hidden", "ghost_batch_size", "step_size", "momentum")] == ["500,250,100", "32", "6",
                                                                                          "n/a"]


def test_config_names_and_regimes():
    assert TrainConfig().validate().regime == "none"
    assert TrainConfig(l1=1e-3, l2=5e-4).regime == "l1+l2"
    assert TrainConfig(l2=1e-4).regime == "l2"
    assert TrainConfig(l1=0.001, seed=3).run_name == "cnn l1=1e-3 l2=0 s3"
    assert [fmt_coef(v) for v in (0, 0.001, 0.0005, 0.00025, 1.5)] == ["0", "1e-3", "5e-4", "2.5e-4", "1.5e0"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().l1 = 1.0  # frozen: a config cannot drift after it is logged
