"""The two model families the comparison runs on: a 9.8k-parameter squeeze-expand CNN and a configurable MLP.

Layers are named attributes (conv1, trans1, fc1, ...) so that the per-layer metrics in MLflow read
`weights/conv1/mean_abs` rather than `weights/layers.3.0/mean_abs`.

Both build as a stack of `members` independent models in one network, so that K configurations of a sweep
train in one step (one GPU launch sequence instead of K). The first layer reads the shared input with K
times the output channels; every later layer is grouped (`groups=K`), so member k only ever sees its own
block of channels; norm layers are per channel, hence per member. Every tensor's first dimension is
K x (one member's), member-major, so `training.member_state` / `training.load_members` move one member's
weights in and out. members=1 is the ordinary model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig


class GhostBatchNorm(nn.Module):
    """Batch norm whose training statistics come from virtual batches of `virtual_batch_size` samples.

    Normalising over small virtual batches adds noise that regularises, as in Hoffer et al. (2017). Each chunk
    goes through the same BatchNorm layer, so the running statistics used at evaluation time are a moving
    average updated once per chunk (with batch norm's momentum, so they follow training faster than plain
    batch norm's); evaluation is ordinary batch norm.
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

    def __init__(self, norm: str = "bn", ghost_batch_size: int = 32, dropout: float = 0.0, members: int = 1):
        super().__init__()
        bias, k = norm == "none", members
        self.members = k
        self.conv1 = nn.Conv2d(1, k * 8, 3, bias=bias)  # the input is shared: no groups
        self.conv2 = nn.Conv2d(k * 8, k * 16, 3, bias=bias, groups=k)
        self.trans1 = nn.Conv2d(k * 16, k * 8, 1, bias=bias, groups=k)  # after the 2x2 max-pool: 12x12
        self.conv3 = nn.Conv2d(k * 8, k * 16, 3, bias=bias, groups=k)
        self.conv4 = nn.Conv2d(k * 16, k * 16, 3, bias=bias, groups=k)
        self.conv5 = nn.Conv2d(k * 16, k * 16, 3, bias=bias, groups=k)
        self.conv6 = nn.Conv2d(k * 16, k * 16, 3, padding=1, bias=bias, groups=k)  # keeps 6x6 for GAP
        self.head = nn.Conv2d(k * 16, k * 10, 1, groups=k)
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
        return self.head(x).view(x.shape[0], self.members, 10).squeeze(1)  # B x 10, or B x K x 10


ACTIVATION_LAYERS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class GroupedLinear(nn.Linear):
    """`groups` independent Linear(n_in, n_out) layers on a B x (groups * n_in) input, as one batched matmul.

    The weight is stored (groups * n_out) x n_in, member-major like a grouped convolution's, so weight
    statistics and penalties treat it as any Linear; groups=1 is nn.Linear.
    """

    def __init__(self, n_in: int, n_out: int, groups: int = 1):
        super().__init__(n_in, groups * n_out)
        self.groups, self.n_in, self.n_out = groups, n_in, n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return super().forward(x)
        w = self.weight.view(self.groups, self.n_out, self.n_in)
        y = torch.einsum("bgi,goi->bgo", x.view(x.shape[0], self.groups, self.n_in), w)
        return (y + self.bias.view(self.groups, self.n_out)).flatten(1)


class MLP(nn.Module):
    """784 -> hidden... -> 10 with a chosen activation, optional (ghost) batch norm and dropout."""

    def __init__(self, hidden: tuple[int, ...] = (500, 250, 100), activation: str = "relu", norm: str = "bn",
                 ghost_batch_size: int = 32, dropout: float = 0.0, init: str = "default", members: int = 1):
        super().__init__()
        sizes = (784, *hidden)
        self.depth, self.members = len(hidden), members
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]), start=1):
            # The first layer reads the shared image; later ones each member's own features.
            layer = nn.Linear(n_in, members * n_out) if i == 1 else GroupedLinear(n_in, n_out, members)
            self.add_module(f"fc{i}", layer)
            self.add_module(f"norm{i}", make_norm(norm, members * n_out, ghost_batch_size, dims=1))
        self.out = GroupedLinear(sizes[-1], 10, members)
        self.act = ACTIVATION_LAYERS[activation]()
        self.dropout = nn.Dropout(dropout)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth + 1):
            x = self.dropout(self.act(getattr(self, f"norm{i}")(getattr(self, f"fc{i}")(x))))
        return self.out(x).view(x.shape[0], self.members, 10).squeeze(1)  # B x 10, or B x K x 10


def init_linear(layer: nn.Linear, init: str) -> None:
    if init == "gaussian":  # the notebooks' "gaussian" initialiser: N(0, 0.01^2), zero bias
        nn.init.normal_(layer.weight, 0.0, 0.01)
        nn.init.zeros_(layer.bias)
    elif init == "glorot":
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_model(cfg: TrainConfig, members: int = 1) -> nn.Module:
    if cfg.model == "cnn":
        return SqueezeExpandCNN(cfg.norm, cfg.ghost_batch_size, cfg.dropout, members)
    return MLP(cfg.hidden_sizes(), cfg.activation, cfg.norm, cfg.ghost_batch_size, cfg.dropout, cfg.init, members)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
