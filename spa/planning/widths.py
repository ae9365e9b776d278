"""The width cost model: how long each layer takes on the execution provider at the channel
counts a plan may keep, measured, never assumed.

Latency does not follow FLOPs. onnxruntime's blocked convolutions want channel counts that fill
their vector blocks, a depthwise kernel off the vector width can run five times slower than one
channel wider, and GEMM tiles round up. So each distinct layer (op, attributes, input size) is
timed alone (``Operator.isolated``) at the candidate widths of the groups it reads and writes,
its kernels' own time taken from onnxruntime's profiler. The table is cached under
``~/.cache/spa/latency``, keyed by provider, CPU, onnxruntime version and thread count, so a
second run of any model with the same layers measures nothing.

A layer's time at input width a and output width b is modelled as separable,
T(a, b) = T(A, B) * [T(a, B) / T(A, B)] * [T(A, b) / T(A, B)]: each side's curve is measured
with the other side dense. A depthwise layer, whose two sides are one group, has one curve.
Layers below the timer's resolution, and ops that are not timed alone, follow their FLOPs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from spa.analysis.groups import Analysis
from spa.core.graph import ModelGraph, Node
from spa.ops.isolate import materialised
from spa.reporting.group_layers import weight_readers
from spa.verify.bench import kernel_ms

# a group whose layers take less than this in all (ms) costs less than the noise of one session
# call: its channel counts follow the ratio exactly, as they would without a table
MIN_GROUP_MS = 0.05
# each timing runs the layer this long in all (ms), within MIN_RUNS..MAX_RUNS runs
TIMING_BUDGET_MS = 20.0
MIN_RUNS, MAX_RUNS = 5, 50
# a count is on a spike of its curve when a larger one within this share of the group's size runs
# faster by more than FAST_TOLERANCE (past the noise of an isolated timing)
FAST_WINDOW = 0.125
FAST_TOLERANCE = 0.05
# a group of at most this many units has every count measured; wider ones a ladder of widths
ALL_COUNTS_UP_TO = 16
# the finest ladder step in channels: a vector of 8 floats is the narrowest SIMD block in use
MIN_STEP = 8
# the widest ladder has about this many rungs
RUNGS = 16


@dataclass
class TimedLayer:
    """One weighted op, the groups on its sides, and its measured times."""

    node: str
    sides: dict[str, int]  # "in" / "out" -> prunable group id on that side of its weight
    dense: tuple[int, int]  # (input, output) channels of the model as given
    joint: bool  # depthwise: its input and output are one group, timed together
    dense_ms: float = 0.0
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # side ("in"/"out"/"joint") -> width -> ms
    measured: bool = False  # timed alone; False: its time is estimated from its FLOPs


@dataclass
class WidthTable:
    """Measured layer times, and the model time they predict for a choice of keep counts."""

    layers: list[TimedLayer]
    sizes: dict[int, int]  # group id -> units at dense
    candidates: dict[int, list[int]]  # group id -> keep counts measured (ascending), for timed groups
    measured_points: int = 0  # isolated timings taken this run (0 when the cache had them all)
    cached_points: int = 0
    seconds: float = 0.0
    by_group: dict[int, list[int]] = field(default_factory=dict)  # group id -> indices into layers

    def __post_init__(self) -> None:
        for k, layer in enumerate(self.layers):
            for gid in set(layer.sides.values()):
                self.by_group.setdefault(gid, []).append(k)

    @property
    def timed_groups(self) -> set[int]:
        return set(self.candidates)

    @property
    def dense_ms(self) -> float:
        return sum(layer.dense_ms for layer in self.layers)

    def layer_ms(self, layer: TimedLayer, keep: Callable[[int], int]) -> float:
        """``layer``'s time with each group ``gid`` of its sides at ``keep(gid)`` units."""
        if layer.dense_ms <= 0:
            return 0.0
        if layer.joint:
            gid = layer.sides["out"]
            return self._side(layer, "joint", gid, keep(gid))
        time = layer.dense_ms
        for side, gid in layer.sides.items():
            time *= self._side(layer, side, gid, keep(gid)) / layer.dense_ms
        return time

    def _side(self, layer: TimedLayer, side: str, gid: int, count: int) -> float:
        curve = layer.curves.get(side)
        if count >= self.sizes[gid]:
            return layer.dense_ms
        if not curve:  # a side not timed: its time follows the units kept
            return layer.dense_ms * count / self.sizes[gid]
        width = side_width(layer, side, count, self.sizes[gid])
        if width in curve:
            return curve[width]
        # a count off the ladder (cut short, or a rung that could not be timed): between its rungs
        points = {**curve, side_width(layer, side, self.sizes[gid], self.sizes[gid]): layer.dense_ms}
        widths = sorted(points)
        return float(np.interp(width, widths, [points[w] for w in widths]))

    def group_ms(self, gid: int, count: int, keep: Callable[[int], int] | None = None) -> float:
        """The time of the layers ``gid`` touches with it at ``count`` (the others at ``keep``, dense by default)."""

        def at(g: int) -> int:
            if g == gid:
                return count
            return keep(g) if keep else self.sizes[g]

        return sum(self.layer_ms(self.layers[k], at) for k in self.by_group.get(gid, []))

    def fast_count(self, gid: int, wanted: int) -> int:
        """The measured count nearest ``wanted`` that is not on a spike of the group's curve: near
        ``wanted`` (within ``FAST_WINDOW`` of the group's size), a count that some larger one beats
        by more than ``FAST_TOLERANCE`` costs channels and time both, so it is passed over."""
        counts = self.candidates.get(gid)
        if not counts:
            return wanted
        reach = max(FAST_WINDOW * self.sizes[gid], 1)
        near = [c for c in counts if abs(c - wanted) <= reach] or [min(counts, key=lambda c: abs(c - wanted))]
        times = {c: self.group_ms(gid, c) for c in near}
        fast = [c for c in near if not any(d > c and times[d] < times[c] * (1 - FAST_TOLERANCE) for d in near)]
        return min(fast, key=lambda c: (abs(c - wanted), -c))

    def summary(self) -> dict:
        return {
            "layers": len(self.layers),
            "timed_alone": sum(layer.measured for layer in self.layers),
            "groups_timed": len(self.candidates),
            "measured": self.measured_points,
            "cached": self.cached_points,
            "seconds": round(self.seconds, 2),
        }


def side_width(layer: TimedLayer, side: str, count: int, size: int) -> int:
    dense = layer.dense[1] if side in ("out", "joint") else layer.dense[0]
    return max(1, int(round(dense * count / size)))


def candidate_counts(size: int, channels: int) -> list[int]:
    """The keep counts measured for a group of ``size`` units spanning ``channels`` channels: every
    count for a narrow group (heads), else a ladder of widths in steps of a power of two of at least
    ``MIN_STEP`` channels, about ``RUNGS`` rungs, and the dense count."""
    if size <= ALL_COUNTS_UP_TO:
        return list(range(1, size + 1))
    per_unit = channels / size
    step_channels = max(MIN_STEP, 2 ** int(math.floor(math.log2(max(channels / RUNGS, 1)))))
    step = max(1, int(round(step_channels / per_unit)))
    return sorted({*range(step, size, step), size})


# ---------------------------------------------------------------- the layers a plan can change


def timed_layers(analysis: Analysis, sized: ModelGraph) -> list[TimedLayer]:
    """Every weighted op a prunable group slices, with the group on each side. ``sized`` is the
    graph with every input at the size the model is timed at."""
    registry = analysis.registry
    found: dict[str, TimedLayer] = {}
    for group in analysis.prunable_groups:
        for member in analysis.param_dims(group):
            for node, dim in weight_readers(analysis.graph, member):
                operator = registry.of(node)
                if operator is None or dim.tensor not in node.inputs:
                    continue
                index = node.inputs.index(dim.tensor)
                side = operator.weight_side(node, index, dim.axis) if index != operator.bias_input else None
                widths = operator.layer_widths(sized, node) if side else None
                if not side or not widths or None in widths:
                    continue
                layer = found.setdefault(node.name, TimedLayer(node.name, {}, widths, _depthwise(node, widths)))  # type: ignore[arg-type]
                layer.sides.setdefault(side, group.id)
    for layer in found.values():  # a depthwise layer's one group may have been reached on either side
        if layer.joint:
            layer.sides = {"out": next(iter(layer.sides.values()))}
    return list(found.values())


def _depthwise(node: Node, widths: tuple[int, int]) -> bool:
    groups = int(node.attr("group", 1))
    return groups > 1 and groups == widths[0] == widths[1]


# ---------------------------------------------------------------- measuring


class LatencyCache:
    """Isolated layer timings on one provider, CPU, onnxruntime version and thread count."""

    def __init__(self, provider: str, threads: int, root: Path | None = None):
        import onnxruntime as ort

        root = root or cache_root()
        name = f"{provider}-{machine_id()}-ort{ort.__version__}-t{threads or 'default'}.json"
        self.path = root / "latency" / name
        self.entries: dict[str, float] = {}
        try:
            self.entries = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            self.entries = {}  # absent or unreadable: measured again and rewritten
        self.added = 0

    def save(self) -> None:
        if not self.added:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            scratch = self.path.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(json.dumps(self.entries, sort_keys=True))
            os.replace(scratch, self.path)
        except OSError:
            pass  # a read-only home costs the next run the same measuring, nothing else


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spa"


def machine_id() -> str:
    """The CPU model and its instruction-set flags: two machines sharing a name in a cloud can
    differ in vector width, which decides the fast channel counts."""
    text = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            info = handle.read()
        model = next((line for line in info.splitlines() if line.startswith("model name")), "")
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
        text = model + flags
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()}|{text}".encode()).hexdigest()[:12]


def signature(model: onnx.ModelProto) -> str:
    """What decides an isolated layer's time: its node and every input's shape (not weight values)."""
    digest = hashlib.sha1(model.graph.node[0].SerializeToString())
    for info in model.graph.input:
        digest.update(info.SerializeToString())
    for tensor in model.graph.initializer:
        digest.update(f"{tensor.name}{list(tensor.dims)}".encode())
    return digest.hexdigest()


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


class Timer:
    """Times isolated models, through the cache."""

    def __init__(self, cache: LatencyCache, provider: str, threads: int, progress=None):
        self.cache, self.provider, self.threads, self.progress = cache, provider, threads, progress
        self.measured = 0
        self.cached = 0

    def times(self, models: dict[str, onnx.ModelProto]) -> dict[str, float]:
        """Signature -> ms for every model, the cache's where it has them."""
        missing = [key for key in models if key not in self.cache.entries]
        self.cached += len(models) - len(missing)
        for done, key in enumerate(missing):
            if self.progress is not None:
                self.progress(done, len(missing))
            model = materialised(models[key])
            try:
                ms = kernel_ms(
                    model, feeds_for(model), self.provider, self.threads, TIMING_BUDGET_MS, (MIN_RUNS, MAX_RUNS)
                )
            except Exception:  # noqa: BLE001 - onnxruntime raises several types: this layer is not timed alone
                continue
            self.cache.entries[key] = round(ms, 5)
            self.cache.added += 1
        self.measured += len(missing)
        return {key: self.cache.entries[key] for key in models if key in self.cache.entries}


# ---------------------------------------------------------------- the table

# layers with more weight elements than this are estimated from their FLOPs: timing one alone
# at every width would hold a copy of a weight as large as the model's largest
MAX_TIMED_ELEMENTS = 1 << 24


def measure_table(
    analysis: Analysis,
    sized: ModelGraph,
    node_flops: dict[str, int],
    provider: str,
    threads: int,
    progress: Callable[[int, int], None] | None = None,
    cache: LatencyCache | None = None,
) -> WidthTable:
    """Time every layer a prunable group slices, alone, at its groups' candidate widths."""
    started = time.perf_counter()
    cache = cache or LatencyCache(provider, threads)
    timer = Timer(cache, provider, threads, progress)
    layers = timed_layers(analysis, sized)
    sizes = {g.id: g.size for g in analysis.prunable_groups}
    isolate = Isolator(analysis, sized)
    alone = {layer.node: isolate(layer, *layer.dense) for layer in layers}
    dense = {node: model for node, model in alone.items() if model is not None}
    keys = {node: signature(model) for node, model in dense.items()}
    dense_times = timer.times({keys[node]: model for node, model in dense.items()})
    for layer in layers:
        if keys.get(layer.node) in dense_times:
            layer.dense_ms, layer.measured = dense_times[keys[layer.node]], True
    _estimate_untimed(layers, node_flops)
    candidates = {}
    for gid, size in sizes.items():
        touching = [layer for layer in layers if gid in layer.sides.values() and layer.measured]
        if sum(layer.dense_ms for layer in touching) >= MIN_GROUP_MS:
            widest = max(
                side_width(layer, side, size, size) for layer in touching for side, g in layer.sides.items() if g == gid
            )
            candidates[gid] = candidate_counts(size, widest)
    points = list(_curve_points(layers, candidates, sizes, isolate))
    times = timer.times({key: model for _, _, _, key, model in points})
    for layer, kind, width, key, _ in points:
        if key in times:
            layer.curves.setdefault(kind, {})[width] = times[key]
    cache.save()
    table = WidthTable(layers, sizes, candidates, timer.measured, timer.cached)
    table.seconds = time.perf_counter() - started
    return table


class Isolator:
    """``Operator.isolated`` for a layer of the sized graph, None for layers too large to copy."""

    def __init__(self, analysis: Analysis, sized: ModelGraph):
        self.registry, self.sized = analysis.registry, sized
        self.nodes = {node.name: node for node in sized.nodes}

    def __call__(self, layer: TimedLayer, in_width: int, out_width: int) -> onnx.ModelProto | None:
        node = self.nodes[layer.node]
        operator = self.registry.of(node)
        weight = self.sized.shape(node.input(1))
        if operator is None or not weight or not all(isinstance(s, int) for s in weight):
            return None
        if math.prod(weight) > MAX_TIMED_ELEMENTS:  # type: ignore[arg-type]
            return None
        return operator.isolated(self.sized, node, in_width, out_width)


def _curve_points(layers: list[TimedLayer], candidates: dict[int, list[int]], sizes: dict[int, int], isolate):
    """(layer, side, width, signature, model) for every candidate width of every timed side."""
    for layer in layers:
        if not layer.measured:
            continue
        for side, gid in layer.sides.items():
            kind = "joint" if layer.joint else side
            for count in candidates.get(gid, [])[:-1]:
                width = side_width(layer, kind, count, sizes[gid])
                if layer.joint:
                    model = isolate(layer, width, width)
                else:
                    model = (
                        isolate(layer, width, layer.dense[1]) if side == "in" else isolate(layer, layer.dense[0], width)
                    )
                if model is not None:
                    yield layer, kind, width, signature(model), model


def _estimate_untimed(layers: list[TimedLayer], node_flops: dict[str, int]) -> None:
    """A layer not timed alone takes the median time per FLOP of those that were."""
    rates = [
        layer.dense_ms / node_flops[layer.node] for layer in layers if layer.measured and node_flops.get(layer.node)
    ]
    rate = float(np.median(rates)) if rates else 0.0
    for layer in layers:
        if not layer.measured:
            layer.dense_ms = node_flops.get(layer.node, 0) * rate
