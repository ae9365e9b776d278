"""Stage 4: rank the units of each group. A registry, like the op rules.

A criterion returns one score per unit of a group; low scores go first.
Magnitude criteria look at every weight slice of the group (the producer's
rows, the consumers' columns, norm scales) and normalise each member by its
mean, so a big 3x3 conv does not drown a BatchNorm scale, before averaging.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .groups import Analysis, Group
from .rules import Dim

Criterion = Callable[[Analysis, Group, "ScoreContext"], np.ndarray]
CRITERIA: dict[str, Criterion] = {}

# Which initializer inputs hold weights worth ranking, by consumer op and input index.
_WEIGHT_INPUTS = {("Conv", 1), ("ConvTranspose", 1), ("Gemm", 1), ("Gemm", 0), ("MatMul", 1), ("MatMul", 0),
                  ("BatchNormalization", 1), ("InstanceNormalization", 1), ("GroupNormalization", 1),
                  ("LayerNormalization", 1), ("PRelu", 1), ("Mul", 1), ("Mul", 0), ("Gather", 0)}


class ScoreContext:
    def __init__(self, seed: int = 0):
        self.seed = seed


def criterion(name: str):
    def register(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn
    return register


def weight_dims(analysis: Analysis, group: Group) -> list[Dim]:
    graph = analysis.graph
    dims = []
    for dim in analysis.param_dims(group):
        uses = {(n.op_type, i) for n in graph.consumers.get(dim.tensor, []) for i, t in enumerate(n.inputs)
                if t == dim.tensor}
        if uses & _WEIGHT_INPUTS:
            dims.append(dim)
    return dims


def _magnitude(analysis: Analysis, group: Group, power: int) -> np.ndarray:
    lookup = np.full(len(analysis.group_of_unit), -1, dtype=np.int64)
    lookup[group.units] = np.arange(len(group.units))
    total = np.zeros(len(group.units))
    members = 0
    for dim in weight_dims(analysis, group):
        per_index = _per_index_power(analysis, dim, power)
        if per_index is None:
            continue
        mine = lookup[analysis.labels[dim]]  # -1 where the index belongs to another group
        valid = mine >= 0
        per_unit = np.bincount(mine[valid], weights=per_index[valid], minlength=len(group.units))
        if power == 2:
            per_unit = np.sqrt(per_unit)
        mean = per_unit.mean()
        if np.isfinite(mean) and mean > 0:
            total += per_unit / mean
            members += 1
    return total / members if members else np.zeros(len(group.units))


def _per_index_power(analysis: Analysis, dim: Dim, power: int) -> np.ndarray | None:
    """sum(|w|^power) over everything but ``dim.axis``, cached: a weight is in two groups (in and out)."""
    cache = analysis.cache
    key = ("power", dim, power)
    if key not in cache:
        values = analysis.graph.const(dim.tensor)
        if values.ndim == 0:
            cache[key] = None
        else:
            other = tuple(a for a in range(values.ndim) if a != dim.axis)
            with np.errstate(all="ignore"):  # inf/NaN weights rank last rather than warn
                magnitude = np.abs(values, dtype=np.float32) if power == 1 else np.square(values, dtype=np.float32)
                cache[key] = np.nan_to_num(magnitude.sum(axis=other, dtype=np.float64), nan=np.inf)
    return cache[key]


@criterion("l1")
def l1(analysis: Analysis, group: Group, ctx: ScoreContext) -> np.ndarray:
    """Sum of |w| over every weight slice of the unit, mean-normalised per member."""
    return _magnitude(analysis, group, 1)


@criterion("l2")
def l2(analysis: Analysis, group: Group, ctx: ScoreContext) -> np.ndarray:
    """Euclidean norm of every weight slice of the unit, mean-normalised per member."""
    return _magnitude(analysis, group, 2)


@criterion("random")
def random(analysis: Analysis, group: Group, ctx: ScoreContext) -> np.ndarray:
    """Uniform scores from a generator seeded by --seed and the group's position: reproducible."""
    return np.random.default_rng([ctx.seed, group.id]).random(len(group.units))
