"""Devices: resolution and its bad input everywhere; on CUDA (skipped without it), the captured step against
the eager one, and same seed -> same result."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from regsweep.cli import cli
from regsweep.config import ConfigError, TrainConfig
from regsweep.step import CudaGraphStep
from regsweep.training import fit, setup

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")


def test_auto_device_is_cuda_exactly_when_cuda_is_available():
    assert TrainConfig().resolved_device() == ("cuda" if CUDA else "cpu")
    assert TrainConfig(device="cpu").resolved_device() == "cpu"
    assert TrainConfig(device="cpu").as_params()["device"] == "cpu"
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        TrainConfig(device="tpu").validate()


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_cuda_without_cuda_is_one_error_line_and_no_run(tracking_uri):
    from mlflow.tracking import MlflowClient

    for command in (["train"], ["optimize", "--trials", "1"]):
        out = CliRunner().invoke(cli, [*command, "--device", "cuda", "--epochs", "1"])
        assert out.exit_code == 2, out.output
        assert out.output.strip().splitlines() == [out.output.strip()] and "no CUDA device" in out.output
    assert MlflowClient().search_runs(["0"]) == []


def test_cpu_training_is_reproducible_and_reports_its_step(tiny_data, tiny_cfg):
    cfg = tiny_cfg.replace(epochs=1, device="cpu")
    first, second = fit(cfg, tiny_data), fit(cfg, tiny_data)
    assert first.history[0]["val/acc"] == second.history[0]["val/acc"]
    assert first.step_mode == "eager" and len(first.test_pred) == len(tiny_data.test)
    assert next(first.model.parameters()).device.type == "cpu"


def steps(cfg: TrainConfig, data, n: int):
    """Weights after `n` training steps, and the loss of each step."""
    run = setup(cfg, data)
    batches = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    losses = [run.step(batches[i * cfg.batch_size:(i + 1) * cfg.batch_size].to("cuda"))[0].item()
              for i in range(n)]
    return {k: v.detach().cpu() for k, v in run.model.state_dict().items()}, losses


@needs_cuda
@pytest.mark.parametrize("variant", [dict(), dict(norm="gbn"), dict(norm="none", optimizer="adam"),
                                     dict(model="mlp", norm="bn", dropout=0.0)])
def test_captured_step_equals_the_eager_step(tiny_data, tiny_cfg, variant):
    """The graph replays exactly the step the eager loop runs: same weights after warm-up, capture and
    replays (TF32 off, cuDNN deterministic; see step.configure_device)."""
    cfg = tiny_cfg.replace(device="cuda", tf32=False, l1=1e-3, l2=5e-4, **variant)
    graph_weights, graph_losses = steps(cfg, tiny_data, 8)
    eager_weights, eager_losses = steps(cfg.replace(cuda_graph=False), tiny_data, 8)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    for name in eager_weights:
        torch.testing.assert_close(graph_weights[name], eager_weights[name], rtol=1e-5, atol=1e-6, msg=name)


@needs_cuda
def test_same_seed_same_gpu_same_result_and_features_keep_working(tiny_data, tiny_cfg):
    cfg = tiny_cfg.replace(device="cuda", epochs=3, l1=1e-3, dropout=0.1, norm="gbn", patience=1,
                           scheduler="onecycle")
    first, second = fit(cfg, tiny_data), fit(cfg, tiny_data)
    assert first.step_mode == "cuda-graph"
    assert [h["val/acc"] for h in first.history] == [h["val/acc"] for h in second.history]
    assert [h["train/loss"] for h in first.history] == [h["train/loss"] for h in second.history]
    # The schedule acts under capture: the logged lr follows OneCycle, not the value at capture time.
    lrs = [h["lr"] for h in first.history]
    assert len(set(lrs)) == len(lrs)


@needs_cuda
def test_a_step_that_cannot_be_captured_falls_back_to_eager_and_says_so():
    """Reading a value on the host is not allowed while a graph is recorded: capture fails before the step
    has done anything, and from then on the step runs eagerly, every call applied exactly once, and the
    generator registered with the failed graph still draws (as the rotations do)."""
    generator = torch.Generator("cuda").manual_seed(0)
    w = torch.zeros(4, device="cuda")

    def step(idx: torch.Tensor):
        noise = torch.rand(4, generator=generator, device="cuda")
        if float(idx.sum()) >= 0:  # waits on the host
            w.add_(idx.float().mean())
        return noise, w.sum()

    captured = CudaGraphStep(step, generator)
    idx = torch.arange(4, device="cuda")  # mean 1.5
    draws = [captured(idx)[0].clone() for _ in range(6)]  # 3 warm-up steps, the failed capture, 2 more
    assert captured.mode.startswith("eager: CUDA graph capture failed") and captured.graph is None
    assert "previous error during capture" not in captured.mode  # the host read, not the failed end it caused
    torch.testing.assert_close(w, torch.full((4,), 6 * 1.5, device="cuda"))
    after = torch.stack(draws[3:])
    assert ((after >= 0) & (after < 1)).all() and len({tuple(d.tolist()) for d in draws}) == 6

    # The process is left as it was: on its stream, the default generator (dropout's) draws, and the next
    # step captures (a sweep's next stack, or the next test).
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5).eq(0).any()
    total = torch.zeros((), device="cuda")

    def capturable(idx: torch.Tensor):
        total.add_(idx.float().sum())
        return torch.rand(1, generator=generator, device="cuda"), total

    again = CudaGraphStep(capturable, generator)
    for _ in range(5):  # 3 warm-up steps, the capture (which runs it too), 1 replay
        again(idx)
    assert again.mode == "cuda-graph" and again.graph is not None and total.item() == 5 * 6
