"""The two model families the comparison runs on: a 9.8k-parameter squeeze-expand CNN and a configurable MLP.

Layers are named attributes (conv1, trans1, fc1, ...) so that the per-layer metrics in MLflow read
`weights/conv1/mean_abs` rather than `weights/layers.3.0/mean_abs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig


class GhostBatchNorm(nn.Module):
    """Batch norm whose training statistics come from virtual batches of `virtual_batch_size` samples.

    Normalising over small virtual batches adds noise that regularises, as in Hoffer et al. (2017). Each chunk
    goes through the same BatchNorm layer, so the running statistics used at evaluation time are an
    average over chunks; evaluation is ordinary batch norm.
    """

    def __init__(self, bn: nn.BatchNorm1d | nn.BatchNorm2d, virtual_batch_size: int):
        super().__init__()
        self.bn = bn
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.virtual_batch_size:
            return self.bn(x)
        return torch.cat([self.bn(chunk) for chunk in x.split(self.virtual_batch_size)])


def make_norm(kind: str, channels: int, ghost_batch_size: int, dims: int = 2) -> nn.Module:
    bn_class = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    if kind == "bn":
        return bn_class(channels)
    if kind == "gbn":
        return GhostBatchNorm(bn_class(channels), ghost_batch_size)
    return nn.Identity()


class SqueezeExpandCNN(nn.Module):
    """28x28 -> 10 logits in 9,778 parameters (with batch norm).

    Two 3x3 convs expand to 16 channels, max-pool + a 1x1 "transition" squeezes back to 8, four more 3x3
    convs expand again, and global average pooling feeds a 1x1 head. No biases before norm layers (the norm's
    shift does that job); with norm=none the convs keep their biases.
    """

    def __init__(self, norm: str = "bn", ghost_batch_size: int = 32, dropout: float = 0.05):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(1, 8, 3, bias=bias)
        self.conv2 = nn.Conv2d(8, 16, 3, bias=bias)
        self.trans1 = nn.Conv2d(16, 8, 1, bias=bias)  # after the 2x2 max-pool: 12x12
        self.conv3 = nn.Conv2d(8, 16, 3, bias=bias)
        self.conv4 = nn.Conv2d(16, 16, 3, bias=bias)
        self.conv5 = nn.Conv2d(16, 16, 3, bias=bias)
        self.conv6 = nn.Conv2d(16, 16, 3, padding=1, bias=bias)  # keeps 6x6 so GAP sees a useful map
        self.head = nn.Conv2d(16, 10, 1)
        self.norms = nn.ModuleDict({
            name: make_norm(norm, conv.out_channels, ghost_batch_size)
            for name, conv in self.convs().items()
        })
        # Whole feature maps are dropped: neighbouring pixels are correlated, so per-pixel dropout
        # regularises little, and drawing one random number per pixel dominated the CPU step time.
        self.dropout = nn.Dropout2d(dropout)

    def convs(self) -> dict[str, nn.Conv2d]:
        return {"conv1": self.conv1, "conv2": self.conv2, "trans1": self.trans1,
                "conv3": self.conv3, "conv4": self.conv4, "conv5": self.conv5, "conv6": self.conv6}

    def block(self, name: str, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(self, name)
        return self.dropout(F.relu(self.norms[name](conv(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block("conv2", self.block("conv1", x))
        x = self.block("trans1", F.max_pool2d(x, 2))
        x = self.block("conv5", self.block("conv4", self.block("conv3", x)))
        x = self.block("conv6", x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.head(x).flatten(1)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class MLP(nn.Module):
    """784 -> hidden... -> 10 with a chosen activation, optional (ghost) batch norm and dropout."""

    def __init__(self, hidden: tuple[int, ...] = (500, 250, 100), activation: str = "relu", norm: str = "none",
                 ghost_batch_size: int = 32, dropout: float = 0.0, init: str = "default"):
        super().__init__()
        sizes = (784, *hidden)
        self.depth = len(hidden)
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]), start=1):
            self.add_module(f"fc{i}", nn.Linear(n_in, n_out))
            self.add_module(f"norm{i}", make_norm(norm, n_out, ghost_batch_size, dims=1))
        self.out = nn.Linear(sizes[-1], 10)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth + 1):
            x = self.dropout(self.act(getattr(self, f"norm{i}")(getattr(self, f"fc{i}")(x))))
        return self.out(x)


def init_linear(layer: nn.Linear, init: str) -> None:
    if init == "gaussian":  # the notebooks' "gaussian" initialiser: N(0, 0.01^2), zero bias
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.zeros_(layer.bias)
    elif init == "glorot":
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_model(cfg: TrainConfig) -> nn.Module:
    if cfg.model == "cnn":
        return SqueezeExpandCNN(cfg.norm, cfg.ghost_batch_size, cfg.dropout)
    return MLP(cfg.hidden_sizes(), cfg.activation, cfg.norm, cfg.ghost_batch_size, cfg.dropout, cfg.init)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
