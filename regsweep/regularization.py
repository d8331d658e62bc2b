"""L1 and L2 penalties as plain functions of a list of tensors, and the weight statistics that show their effect.

The penalised set is stated once, by `penalised_parameters`: the weights of every Conv and Linear layer by
default ("weights"), or every trainable tensor including biases and norm scales/shifts ("all"). The training
step adds `member_penalties` to each member's loss (step.make_step, for one model or a stack);
`regularisation_loss` is the same for a single model, as one would write it by hand.
"""

from __future__ import annotations

import torch
from torch import nn

SMALL = 1e-3  # |w| below this counts as "near zero" in frac_small: the sparsity L1 is expected to produce


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and Linear layers by their attribute path, e.g. {'conv1': Conv2d, ..., 'head': Conv2d}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def penalised_parameters(model: nn.Module, which: str = "weights") -> dict[str, nn.Parameter]:
    if which == "all":
        return {name: p for name, p in model.named_parameters() if p.requires_grad}
    return {f"{name}.weight": layer.weight for name, layer in weight_layers(model).items()}


def member_sums(params: list[torch.Tensor], members: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum |w|, sum w^2) of each member of a stacked model, as two length-`members` vectors: the one
    place the penalties are computed (no 1/2 factor on w^2: the coefficient is exactly what multiplies it).

    All tensors are joined first, so each sum is one reduction rather than one per tensor. Every tensor of a
    stacked model is member-major (models.py), so member k's part of each is row k of `t.reshape(members,
    -1)`; members=1 gives the whole-model sums.
    """
    w = torch.cat([p.reshape(members, -1) for p in params], dim=1)
    return w.abs().sum(1), (w * w).sum(1)


def member_penalties(params: list[torch.Tensor], l1, l2, members: int = 1) -> torch.Tensor:
    """l1 * sum|w| + l2 * sum w^2 of each member, a length-`members` vector; `l1` and `l2` are numbers or one
    coefficient per member (tensors). What the training step adds to each member's loss."""
    sum_abs, sum_sq = member_sums(params, members)
    return l1 * sum_abs + l2 * sum_sq


def regularisation_loss(params: list[torch.Tensor], l1: float, l2: float) -> torch.Tensor | float:
    """`member_penalties` of a single model as a scalar, as one would add it to a loss by hand (0 when both
    coefficients are off)."""
    if l1 <= 0 and l2 <= 0:
        return 0.0
    return member_penalties(params, l1, l2)[0]


STATS = ("mean_abs", "l2_norm", "max_abs", "frac_small")


def tensor_stats(w: torch.Tensor, members: int = 1) -> torch.Tensor:
    """The STATS of each member's part of one tensor's magnitudes: members x len(STATS), on its device."""
    a = w.detach().abs().reshape(members, -1).float()
    return torch.stack([a.mean(1), a.norm(dim=1), a.amax(1), (a < SMALL).float().mean(1)], dim=1)


def weight_stats_tensor(model: nn.Module, members: int = 1) -> tuple[list[str], torch.Tensor]:
    """Per-layer and whole-model weight magnitudes: names `weights/<layer>/<stat>` and a members x names
    matrix of values, computed on the model's device so that reading them is one transfer. (MLflow's chart
    view groups metrics into sections by the prefix before the first `/`.)"""
    layers = {name: layer.weight.detach().reshape(members, -1) for name, layer in weight_layers(model).items()}
    layers["all"] = torch.cat(list(layers.values()), dim=1)
    names = [f"weights/{layer}/{stat}" for layer in layers for stat in STATS]
    return names, torch.cat([tensor_stats(w, members) for w in layers.values()], dim=1)


def weight_stats(model: nn.Module) -> dict[str, float]:
    """`weight_stats_tensor` of a single model as a dict of floats."""
    names, values = weight_stats_tensor(model)
    return dict(zip(names, values[0].tolist()))
