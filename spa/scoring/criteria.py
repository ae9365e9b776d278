"""Stage 4: rank the units of each group. A registry, like the op rules.

A criterion returns one score per unit of a group; low scores go first.
Magnitude criteria look at every weight slice of the group (the producer's
rows, the consumers' columns, norm scales) and normalise each member by its
mean, so a big 3x3 conv does not drown a BatchNorm scale, before averaging.

Data-aware criteria look at the linear layers that read the group's channels
(``spa.analysis.layers``) and at their inputs' statistics (``spa.scoring.statistics``): from
calibration data, or, for ``obspa``, from synthetic inputs run through the
dense model. A group no such layer reads falls back to ``l2``, and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from spa.analysis.groups import Analysis, Group
from spa.analysis.layers import LayerIndex, LinearLayer
from spa.core.coupling import Dim
from spa.formats.quantized import is_rescaling_factor, quantized_weight
from spa.ops.quantize import Dequantize
from spa.scoring.obs import DiagonalLayerState, LayerState, augmented_hessian, greedy_scores, inverse
from spa.scoring.statistics import Statistics

ScoreFn = Callable[[Analysis, Group, "ScoreContext"], np.ndarray]


class Criterion(Protocol):
    """A registered score function with what ``criterion`` said about it."""

    data: str | None
    comparable: bool

    def __call__(self, analysis: Analysis, group: Group, ctx: ScoreContext, /) -> np.ndarray: ...


CRITERIA: dict[str, Criterion] = {}


class ScoreContext:
    def __init__(self, seed: int = 0, statistics: Statistics | None = None, layers: LayerIndex | None = None):
        self.seed = seed
        self.statistics = statistics
        self.layers = layers
        self.fallbacks: list[int] = []  # groups a data-aware criterion scored by l2, for lack of layers


def criterion(name: str, data: str | None = None, comparable: bool = False):
    """Register a criterion. ``data``: None, "any" (calibration or synthetic statistics) or
    "calibration" (real data required). ``comparable``: scores already mean the same thing in
    every group, so --global must not renormalise them."""

    def register(fn: ScoreFn) -> Criterion:
        registered = cast(Criterion, fn)  # a function takes attributes; its Callable type does not say so
        registered.data, registered.comparable = data, comparable
        CRITERIA[name] = registered
        return registered

    return register


def weight_dims(analysis: Analysis, group: Group) -> list[Dim]:
    """The group's weights, read where ops read them: a quantized weight by its dequantized value
    (its integer data alone misranks channels with different scales)."""
    graph = analysis.graph
    dims = []
    for dim in analysis.param_dims(group):
        stored = _dequantized_by(graph, dim.tensor)
        if stored is not None:
            dim = Dim(stored, dim.axis)
        if _read_as_weight(analysis.registry, graph, dim.tensor) and not is_rescaling_factor(graph, dim.tensor):
            dims.append(dim)
    return dims


def _read_as_weight(registry, graph, tensor: str) -> bool:
    """Whether some op reads ``tensor`` at an input its operator ranks as a weight."""
    for node in graph.consumers.get(tensor, []):
        operator = registry.of(node)
        if operator is not None and any(
            t == tensor and operator.is_weight_input(node, i) for i, t in enumerate(node.inputs)
        ):
            return True
    return False


def _dequantized_by(graph, tensor: str) -> str | None:
    readers = graph.consumers.get(tensor, [])
    if len(readers) != 1 or readers[0].op_type not in Dequantize.ops or readers[0].input(0) != tensor:
        return None
    output = readers[0].outputs[0]
    return output if quantized_weight(graph, output) is not None else None


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
        values = analysis.graph.weight(dim.tensor)
        assert values is not None  # weight_dims holds initializers and dequantized stored weights
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


# data-aware criteria --------------------------------------------------------------------------


def _group_layers(analysis: Analysis, group: Group, ctx: ScoreContext) -> list[tuple[LinearLayer, np.ndarray]]:
    """Each linear layer reading the group, with its input channels' unit positions (-1: other groups)."""
    if ctx.layers is None:
        return []
    lookup = np.full(len(analysis.group_of_unit), -1, dtype=np.int64)
    lookup[group.units] = np.arange(len(group.units))
    return [(layer, lookup[layer.column_labels(analysis.labels)]) for layer in ctx.layers.of_group(group.dims)]


@dataclass
class LayerSystem:
    """A dense layer as OBS sees it: weights [rows, channels (+ bias column)], H^-1, E||W x||^2."""

    weights: np.ndarray
    hessian_inv: np.ndarray
    energy: float
    has_bias: bool


def layer_system(analysis: Analysis, layer: LinearLayer, stats) -> LayerSystem:
    """For statistics with X^T X (``stats.gram``). Built once per layer and statistics, and shared
    by every group reading the layer (a DenseNet concatenation feeds up to 24 layers) and by
    compensation."""
    key = ("obs-layer", layer.weight_dim, id(stats))
    if key not in analysis.cache:
        weights = layer.augmented_rows(analysis.graph.weight)
        has_bias = layer.bias is not None
        hessian = augmented_hessian(stats.second_moment, stats.mean if has_bias else None)
        weights32 = weights.astype(np.float32)
        energy = float(np.einsum("ij,ij->", weights32 @ hessian.astype(np.float32), weights32, dtype=np.float64))
        analysis.cache[key] = LayerSystem(weights, inverse(hessian), energy if energy > 0 else 1.0, has_bias)
    return analysis.cache[key]


def release_layer_systems(analysis: Analysis) -> None:
    """Drop the cached layer systems (each a float64 copy of a layer's weights and its inverse
    Hessian: a third of a decoder's size in all) once scoring and compensation are done, so a
    model whose weights stay on disk is timed and written without them."""
    for key in [k for k in analysis.cache if isinstance(k, tuple) and k and k[0] == "obs-layer"]:
        del analysis.cache[key]


def layer_state(analysis: Analysis, layer: LinearLayer, units: np.ndarray, stats) -> LayerState | DiagonalLayerState:
    """A layer ready for greedy OBS (it copies what it changes). Without statistics, or for an
    input too wide for X^T X (a VGG classifier reads 25,088 features), the diagonal form: a dense
    25,088^2 Hessian would take 5 GB."""
    if stats is None or stats.gram is None:
        weight = np.asarray(analysis.graph.weight(layer.weight))
        matrix = layer.matrix(weight.astype(np.float32, copy=False))
        columns = np.einsum("ij,ij->j", matrix, matrix, dtype=np.float64)
        power = np.ones_like(columns) if stats is None else stats.mean_square
        loss = columns * power
        total = float(loss.sum())
        return DiagonalLayerState(loss, units.copy(), total if total > 0 else 1.0)
    system = layer_system(analysis, layer, stats)
    return LayerState(system.weights, system.hessian_inv, units.copy(), system.energy)


def _statistics_of(ctx: ScoreContext, layer: LinearLayer):
    return ctx.statistics.of(layer.activation) if ctx.statistics is not None else None


def _obs(analysis: Analysis, group: Group, ctx: ScoreContext) -> np.ndarray:
    states = []
    for layer, units in _group_layers(analysis, group, ctx):
        stats = _statistics_of(ctx, layer)
        if ctx.statistics is not None and stats is None:
            continue  # the activation never came out of onnxruntime (not a float tensor)
        states.append(layer_state(analysis, layer, units, stats))
    if not states:
        ctx.fallbacks.append(group.id)
        return _magnitude(analysis, group, 2)
    return greedy_scores(states, len(group.units))


@criterion("obspa", data="any", comparable=True)
def obspa(analysis: Analysis, group: Group, ctx: ScoreContext) -> np.ndarray:
    """Data-free OBS: greedy group removal with the Hessian of synthetic inputs run through the model."""
    return _obs(analysis, group, ctx)


@criterion("obs", data="calibration", comparable=True)
def obs(analysis: Analysis, group: Group, ctx: ScoreContext) -> np.ndarray:
    """OBS with the calibration Hessian: greedy group removal with weight updates between steps."""
    return _obs(analysis, group, ctx)


def _per_channel(analysis: Analysis, group: Group, ctx: ScoreContext, channel_score) -> np.ndarray:
    total = np.zeros(len(group.units))
    members = 0
    for layer, units in _group_layers(analysis, group, ctx):
        stats = _statistics_of(ctx, layer)
        if stats is None:
            continue
        matrix, _, _ = layer.float_rows(analysis.graph.weight)
        per_channel = channel_score(matrix, stats)
        mine = units >= 0
        per_unit = np.bincount(units[mine], per_channel[mine], minlength=len(group.units))
        mean = per_unit.mean()
        if np.isfinite(mean) and mean > 0:
            total += per_unit / mean
            members += 1
    if not members:
        ctx.fallbacks.append(group.id)
        return _magnitude(analysis, group, 2)
    return total / members


@criterion("activation", data="calibration")
def activation(analysis: Analysis, group: Group, ctx: ScoreContext) -> np.ndarray:
    """Wanda-style: ||W[:, c]|| * ||X[c]|| over the layers reading the channel, mean-normalised."""
    return _per_channel(
        analysis, group, ctx, lambda m, s: np.sqrt(np.einsum("ij,ij->j", m, m)) * np.sqrt(s.mean_square)
    )


@criterion("fluctuation", data="calibration")
def fluctuation(analysis: Analysis, group: Group, ctx: ScoreContext) -> np.ndarray:
    """FLAP: the variance of the channel's input times ||W[:, c]||^2; its mean goes into the bias
    (compensation)."""
    return _per_channel(analysis, group, ctx, lambda m, s: s.variance * np.einsum("ij,ij->j", m, m))
