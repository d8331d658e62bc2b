"""The search space: how an Optuna trial becomes (l1, l2), and the sampler and pruner that drive it."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import optuna

from ..config import ConfigError


@dataclass(frozen=True)
class SearchSpace:
    """Each penalty is "off, or log-uniform in [low, high]" (off only if allowed), or an exact grid."""
    l1_range: tuple[float, float] = (1e-6, 1e-2)
    l2_range: tuple[float, float] = (1e-6, 1e-2)
    l1_zero: bool = True
    l2_zero: bool = True
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)  # {"l1": (0, 1e-3), "l2": (...)}

    def validate(self) -> SearchSpace:
        for name, (low, high) in (("l1", self.l1_range), ("l2", self.l2_range)):
            if not (0 < low <= high) or math.isinf(high):
                raise ConfigError(f"--{name}-range needs 0 < LOW <= HIGH (log scale), got {low} {high}")
        for name, values in self.grid.items():
            if any(math.isnan(v) or v < 0 or math.isinf(v) for v in values):
                raise ConfigError(f"grid values for {name} must be finite and >= 0, got {values}")
        return self

    def describe(self) -> dict:
        if self.grid:
            return {"grid": {k: list(v) for k, v in self.grid.items()}}
        return {"l1": {"range": list(self.l1_range), "log": True, "zero": self.l1_zero},
                "l2": {"range": list(self.l2_range), "log": True, "zero": self.l2_zero}}

    def grid_size(self) -> int:
        return len(self.grid.get("l1", (0,))) * len(self.grid.get("l2", (0,)))

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """What `suggest_penalties` asks Optuna for, by parameter name."""
        if self.grid:
            return {name: optuna.distributions.CategoricalDistribution(list(self.grid.get(name, (0.0,))))
                    for name in ("l1", "l2")}
        dists: dict[str, optuna.distributions.BaseDistribution] = {}
        for name, (low, high), zero in (("l1", self.l1_range, self.l1_zero), ("l2", self.l2_range, self.l2_zero)):
            dists[name] = optuna.distributions.FloatDistribution(low, high, log=True)
            if zero:
                dists[f"{name}_on"] = optuna.distributions.CategoricalDistribution([False, True])
        return dists

    def check_resumable(self, trials: list[optuna.trial.FrozenTrial]) -> SearchSpace:
        """Raise ConfigError if an existing study's trials cannot share it with this space: Optuna refuses a
        parameter whose kind changes (a grid's categories against a range) or a grid whose values change,
        but only once a trial asks, with a run already open. Returns the space to resume with: this one, or
        with a grid's values in the study's order where it holds the same values written in another order
        (Optuna compares the order, and the trials' grid_id indexes it)."""
        wanted, grid = self.distributions(), dict(self.grid)
        for trial in trials:
            for name, old in trial.distributions.items():
                if name not in wanted:
                    continue
                if name in grid and isinstance(old, optuna.distributions.CategoricalDistribution) and \
                        sorted(old.choices) == sorted(grid[name]):
                    wanted[name], grid[name] = old, tuple(old.choices)  # its order, for this trial and the next
                    continue
                try:
                    optuna.distributions.check_distribution_compatibility(old, wanted[name])
                except ValueError:
                    raise ConfigError(
                        f"the study's earlier trials searched {name} as {describe(old)}, not "
                        f"{describe(wanted[name])}: resume it with the same --grid or ranges, or start another with "
                        "--study-name") from None
        return self if grid == self.grid else dataclasses.replace(self, grid=grid)


def describe(dist: optuna.distributions.BaseDistribution) -> str:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return "one of " + ", ".join(map(str, dist.choices))
    return f"a range ({dist.low:g} to {dist.high:g})"


def parse_grid(text: str) -> dict[str, tuple[float, ...]]:
    """'l1=0,0.001 l2=0,0.0005' -> {'l1': (0.0, 0.001), 'l2': (0.0, 0.0005)}."""
    grid = {}
    for part in text.split():
        match = re.fullmatch(r"(l1|l2)=([^=]+)", part)
        if not match:
            raise ConfigError(f"malformed --grid entry {part!r}; expected e.g. \"l1=0,0.001 l2=0,0.0005\"")
        try:
            values = tuple(float(v) for v in match.group(2).split(","))
        except ValueError:
            raise ConfigError(f"malformed --grid values in {part!r}: not numbers") from None
        if match.group(1) in grid:
            raise ConfigError(f"--grid names {match.group(1)} twice")
        grid[match.group(1)] = tuple(dict.fromkeys(values))  # keep order (check_resumable), drop repeats
    if not grid:
        raise ConfigError("--grid is empty; expected e.g. \"l1=0,0.001 l2=0,0.0005\"")
    return grid


def suggest_penalties(trial: optuna.Trial, space: SearchSpace, both_off_taken: bool = False) -> dict[str, float]:
    """The only place a trial becomes regularisation coefficients (define-by-run, conditional).

    `both_off_taken`: the unregularised configuration has a result (or is training) already. It is a single
    point, and TPE would keep proposing it if it does well, so once L1 is off, L2 is then always on. A retried
    trial comes with its parameters set as they were suggested: one whose penalty was on without a choice (no
    `_on` parameter) keeps it on, whatever has become of the unregularised configuration since."""
    values, fixed = {}, trial.params
    for name, (low, high), zero in (("l1", space.l1_range, space.l1_zero), ("l2", space.l2_range, space.l2_zero)):
        if (name == "l2" and both_off_taken and values["l1"] == 0) or (name in fixed and f"{name}_on" not in fixed):
            zero = False
        if space.grid:
            values[name] = trial.suggest_categorical(name, list(space.grid.get(name, (0.0,))))
        elif zero and not trial.suggest_categorical(f"{name}_on", [False, True]):
            values[name] = 0.0
        else:
            values[name] = trial.suggest_float(name, low, high, log=True)
    return values


def make_sampler(name: str, space: SearchSpace, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "grid":
        grid = {k: list(space.grid.get(k, (0.0,))) for k in ("l1", "l2")}
        # GridSampler shuffles the grid by its seed, and a trial's grid_id indexes the shuffled grid: every
        # process and every resume must shuffle it alike, else grid_id 1 is another point there, some points
        # train twice and others never. Its choice among unvisited points then draws from fresh entropy, so that
        # parallel workers do not all pick the same one.
        sampler = optuna.samplers.GridSampler(grid, seed=0)
        sampler.reseed_rng()
        return sampler
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # multivariate + group: TPE models l1 and l2 jointly and copes with the on/off branches. constant_liar:
    # trials asked while others still run (a stack, parallel workers) are steered away from those.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=5,
                                      constant_liar=True)


# First-epoch accuracy says little about where a run ends up: no pruner is asked before a seed's epoch 2.
# (A gate on the epoch, not the pruner's n_warmup_steps: with repeats, steps run on across seeds, so the
# second seed's epoch 1 is step epochs + 1, and in a stack all seeds report side by side.)
FIRST_PRUNABLE_EPOCH = 2


def prunable(epoch: int, epochs: int, last_seed: bool = True) -> bool:
    """Whether the pruner is asked after this epoch: from FIRST_PRUNABLE_EPOCH on, but not at the trial's last
    step (its last seed's last epoch; in a stack its seeds train side by side, so every seed's last epoch is
    that), when the trial has trained in full and pruning would only throw its result away."""
    return epoch >= FIRST_PRUNABLE_EPOCH and not (last_seed and epoch >= epochs)


def make_pruner(name: str, steps: int) -> optuna.pruners.BasePruner:
    """`steps`: reports per trial (epochs x repeats)."""
    if name == "median":
        # Compare against the median of at least 3 complete trials (Optuna counts only COMPLETE ones).
        return optuna.pruners.MedianPruner(n_startup_trials=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=steps, reduction_factor=3)
    return optuna.pruners.NopPruner()


def effective_penalties(trial: optuna.trial.FrozenTrial) -> tuple[float, float]:
    """(l1, l2) as trained: a penalty switched off in the conditional space is 0."""
    return trial.params.get("l1", 0.0), trial.params.get("l2", 0.0)
