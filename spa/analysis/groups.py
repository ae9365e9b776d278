"""Stage 3: from per-op rules to coupled channel groups.

1. Starting from the channel axes that weighted ops offer (``Rule.seeds``),
   ask every op touching a dimension how that dimension relates to the op's
   other dimensions, until nothing new is reached.
2. Every reached dimension gets a range in one index space; every ``Link``
   says which indices are the same channel. Connected indices form a *unit*:
   the smallest set of indices, across all tensors, that can go at once.
3. Units that touch exactly the same dimensions form a *group*; a group is
   what the criteria rank and the plan shrinks.
"""

from __future__ import annotations

import fnmatch
import os
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace

import numpy as np

from spa.analysis.unknown_shapes import ShapeOrigins
from spa.core import decoder
from spa.core.coupling import Dim, Freeze, HeadInfo, Link, Pending, RuleContext, Sink
from spa.core.graph import ModelGraph
from spa.ops.base import NUMERATOR, PRESERVES, PRODUCT, SUM
from spa.ops.registry import DEFAULT, Registry

# Rule bugs must surface in our tests, but never crash a user's run: there they freeze the dim.
STRICT = os.environ.get("SPA_STRICT_RULES") == "1"


@dataclass
class Group:
    id: int
    dims: list[Dim]
    units: np.ndarray  # unit labels, ascending
    frozen: str | None  # why this group may not shrink, or None
    exact: bool  # removal equals zeroing the group's parameters
    inexact_reason: str | None = None
    attention: HeadInfo | None = None  # set when the units are an attention layer's heads or head_dim

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> bool:
        return self.frozen is None and self.size > 1


@dataclass
class Analysis:
    graph: ModelGraph
    sizes: dict[Dim, int]  # every reached dimension, in visiting order
    labels: dict[Dim, np.ndarray]  # unit label of each index of each dimension
    groups: list[Group]
    frozen_dims: dict[Dim, str]
    group_of_unit: np.ndarray = field(repr=False)
    cache: dict = field(repr=False, default_factory=dict)  # per-analysis memo for criteria
    registry: Registry = field(repr=False, default=DEFAULT)  # the operators the groups were found with

    def group(self, group_id: int) -> Group:
        return self.groups[group_id]

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def param_dims(self, group: Group) -> list[Dim]:
        return [d for d in group.dims if self.graph.is_initializer(d.tensor)]


def find_groups(
    graph: ModelGraph,
    opset: int,
    exclude: tuple[str, ...] = (),
    allow_approximate: bool = False,
    attention: str = "heads",
    registry: Registry = DEFAULT,
) -> Analysis:
    """``attention``: the unit of attention layers, whole heads ("heads") or one index of
    head_dim in every head ("head_dim"). ``registry``: the operators whose rules couple channels."""
    ctx = RuleContext(graph, opset, attention)
    walk = _Walk(graph, ctx, _excluded_tensors(graph, exclude), registry)
    walk.run()
    return _assemble(graph, walk, allow_approximate)


def _excluded_tensors(graph: ModelGraph, patterns: tuple[str, ...]) -> dict[str, str]:
    tensors: dict[str, str] = {}
    for node in graph.nodes:
        pattern = next((p for p in patterns if fnmatch.fnmatchcase(node.name, p)), None)
        if pattern:
            for name in node.inputs + node.outputs:
                if name:
                    tensors.setdefault(name, f"node '{node.name}' excluded by --exclude {pattern}")
    return tensors


class _Walk:
    def __init__(self, graph: ModelGraph, ctx: RuleContext, excluded: dict[str, str], registry: Registry = DEFAULT):
        self.graph, self.ctx, self.excluded, self.registry = graph, ctx, excluded, registry
        self.sizes: dict[Dim, int] = {}
        self.links: list[Link] = []
        self.freezes: dict[Dim, str] = {}
        self.sinks: list[Sink] = []
        self.pending: deque = deque()
        self.linked_by: dict[str, set[Dim]] = defaultdict(set)
        self.queue: deque[Dim] = deque()
        self.asked: set[tuple[str, Dim]] = set()
        self.inputs, self.outputs = set(graph.inputs), set(graph.outputs)
        # a decoder's key/value cache is graph I/O whose head axis may shrink with the heads: the
        # runtime sizes the cache from the model (its config or the I/O shapes), not the reverse
        self.cache_io = decoder.cache_names(list(graph.inputs), list(graph.outputs))
        self.shape_origins = ShapeOrigins(graph, registry)

    def run(self) -> None:
        for node in self.graph.nodes:
            rule = self.registry.rule(node)
            if rule is not None:
                for dim in rule.seeds(node, self.ctx):
                    self._enqueue(self.ctx.dim(dim.tensor, dim.axis))
        while self.queue or self.pending:
            while self.queue:
                self._visit(self.queue.popleft())
            if self.pending:
                node, dim = self.pending.popleft()
                if dim not in self.linked_by[node.name]:
                    rule = self.registry.rule(node)
                    assert rule is not None  # only a rule's own link defers a dimension
                    self._take(node, rule.resolve(node, dim, self.ctx))

    def _enqueue(self, dim: Dim | None) -> None:
        if dim is not None and dim not in self.sizes:
            self.queue.append(dim)

    def _visit(self, dim: Dim) -> None:
        if dim in self.sizes:
            return
        size = self.ctx.size(dim)
        if size is None:
            return  # no index space for it; whatever linked to it was frozen by LinkSet
        self.sizes[dim] = size
        self.ctx.known_dims.add(dim)
        name = dim.tensor
        cache_heads = name in self.cache_io and dim.axis == 1
        # a cache's other axes (batch, length, head size) are laid out by the runtime: heads go whole
        cache_axis = (
            " of the key/value cache, whose head axis alone may shrink, by whole heads" if name in self.cache_io else ""
        )
        if name in self.inputs and not cache_heads:
            self._freeze(dim, f"graph input{cache_axis}")
        if name in self.outputs and not cache_heads:
            self._freeze(dim, f"graph output{cache_axis}")
        if name in self.excluded:
            self._freeze(dim, self.excluded[name])
        producer = self.graph.producer.get(name)
        for node in ([producer] if producer else []) + self.graph.consumers.get(name, []):
            if (node.name, dim) in self.asked:
                continue
            self.asked.add((node.name, dim))
            if name in node.implicit_inputs and name not in node.inputs:
                self._freeze(dim, f"used inside a subgraph of {node.op_type} '{node.name}'")
                continue
            rule = self.registry.rule(node)
            if rule is None:
                self._freeze(dim, f"no rule for op {node.op_type} (node '{node.name}')")
                continue
            try:
                outcomes = list(rule.link(node, dim, self.ctx))
            except Exception as exc:
                if STRICT:
                    raise
                self._freeze(dim, f"rule for {node.op_type} failed on '{node.name}': {exc}")
                continue
            self._take(node, outcomes)

    def _take(self, node, outcomes) -> None:
        for item in outcomes:
            if isinstance(item, (Link, Sink)) and not item.exact and not item.what:
                item = replace(item, what=f"{node.op_type} '{node.name}'")
            if isinstance(item, Link):
                if self.ctx.size(item.a) is None or self.ctx.size(item.b) is None:
                    self._freeze(
                        item.a, self._with_shape_cause(node, f"size unknown next to {node.op_type} '{node.name}'")
                    )
                    continue
                self.links.append(item)
                self.linked_by[node.name].update((item.a, item.b))
                self._enqueue(item.a)
                self._enqueue(item.b)
            elif isinstance(item, Freeze):
                self._freeze(item.dim, self._with_shape_cause(node, item.reason))
                self._enqueue(item.dim)
            elif isinstance(item, Sink):
                self.sinks.append(item)
            elif isinstance(item, Pending):
                self.pending.append((node, item.dim))

    def _with_shape_cause(self, node, reason: str) -> str:
        """``reason``, and where the shapes around ``node`` were lost when some are unknown: the
        rules notice a missing size at the next layer, the user can act only where it starts."""
        cause = self.shape_origins.cause(node)
        return reason if cause is None else f"{reason}; {cause}"

    def _freeze(self, dim: Dim, reason: str) -> None:
        self.freezes.setdefault(dim, reason)


def connected_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of n vertices and edges (a[i], b[i]), labelled 0..k-1.

    Vectorised min-label propagation with pointer jumping: a few numpy passes
    even for millions of indices, where a Python union-find would take seconds.
    """
    labels = np.arange(n, dtype=np.int64)
    while True:
        la, lb = labels[a], labels[b]
        low = np.minimum(la, lb)
        np.minimum.at(labels, la, low)
        np.minimum.at(labels, lb, low)
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels[a], labels[b]):
            break
    return np.unique(labels, return_inverse=True)[1]


def _global_pairs(links: list[Link], start_of: dict[Dim, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every link's index pairs in the one index space: offsets added in one pass, not per link."""
    if not links:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lengths = np.fromiter((len(k.a_index) for k in links), np.int64, len(links))
    ends = []
    for side in ("a", "b"):
        starts = np.fromiter((start_of[getattr(k, side)] for k in links), np.int64, len(links))
        index = np.concatenate([getattr(k, side + "_index") for k in links]).astype(np.int64, copy=False)
        ends.append(index + np.repeat(starts, lengths))
    return ends[0], ends[1]


def _assemble(graph: ModelGraph, walk: _Walk, allow_approximate: bool) -> Analysis:
    dims = list(walk.sizes)
    starts = np.cumsum([0] + [walk.sizes[d] for d in dims])
    start_of = {d: int(starts[i]) for i, d in enumerate(dims)}
    total = int(starts[-1])

    def global_index(dim, index):
        return start_of[dim] + index

    links = [link for link in walk.links if link.a in start_of and link.b in start_of]
    a, b = _global_pairs(links, start_of)
    labels = connected_labels(total, a, b)
    unit_count = int(labels.max()) + 1 if total else 0
    labels_of = {d: labels[start_of[d] : start_of[d] + walk.sizes[d]] for d in dims}

    frozen_reason: dict[int, str] = {}
    for dim, reason in walk.freezes.items():
        if dim in labels_of:
            for unit in np.unique(labels_of[dim]):
                frozen_reason.setdefault(int(unit), f"{dim}: {reason}")
    # what makes each approximate unit so: the norms over its channels
    approximate: dict[int, list[str]] = defaultdict(list)
    for link in links:
        if not link.exact:
            for unit in np.unique(labels[global_index(link.a, link.a_index)]).tolist():
                approximate[unit].append(link.what)

    # units with the same set of dimensions form a group
    dim_ids = np.repeat(np.arange(len(dims), dtype=np.int64), [walk.sizes[d] for d in dims])
    # (unit, dim) pairs encoded as one integer: a 1-D unique is far faster than unique rows
    codes = np.unique(labels * max(len(dims), 1) + dim_ids) if total else np.zeros(0, np.int64)
    pair_units, pair_dims = np.divmod(codes, max(len(dims), 1))
    boundaries = np.flatnonzero(np.diff(pair_units)) + 1
    signature_of: dict[tuple, list[int]] = {}
    for unit_dims, first in zip(np.split(pair_dims, boundaries), np.split(pair_units, boundaries)):
        if len(first):
            signature_of.setdefault(tuple(unit_dims.tolist()), []).append(int(first[0]))
    group_of_unit = np.zeros(unit_count, dtype=np.int64)
    groups: list[Group] = []
    sinks_by_dim = defaultdict(list)
    for sink in walk.sinks:
        for dim in sink.dims:
            sinks_by_dim[dim].append(sink)
    for signature, units in sorted(signature_of.items(), key=lambda kv: kv[1][0]):
        gid = len(groups)
        members = [dims[i] for i in signature]
        units_arr = np.array(units, dtype=np.int64)
        group_of_unit[units_arr] = gid
        frozen = next((frozen_reason[u] for u in units if u in frozen_reason), None)
        exact, why = _exactness(graph, walk.registry, members, units_arr, approximate, sinks_by_dim)
        if frozen is None and not exact and not allow_approximate:
            frozen = f"approximate group ({why}); enable with --approximate"
        infos = [walk.ctx.heads[d] for d in members if d in walk.ctx.heads]
        # the repeat_kv merge knows the KV head count as well
        head = next((i for i in infos if i.kv_heads), infos[0] if infos else None)
        groups.append(Group(gid, members, units_arr, frozen, exact, why, head))
    return Analysis(
        graph, dict(walk.sizes), labels_of, groups, dict(walk.freezes), group_of_unit, registry=walk.registry
    )


def _exactness(graph, registry, members, units, approximate, sinks_by_dim) -> tuple[bool, str | None]:
    whats = [what for unit in units.tolist() for what in approximate.get(unit, ())]
    whats += [sink.what for dim in members for sink in sinks_by_dim.get(dim, []) if not sink.exact]
    if whats:
        return False, _normalised_by(list(dict.fromkeys(whats)))
    member_set = set(members)
    by_tensor: dict[str, list[Dim]] = defaultdict(list)
    for dim in members:
        by_tensor[dim.tensor].append(dim)
    order = graph.tensor_order
    zero: dict[Dim, bool] = {}  # is this channel all zeros in the soft model (parameters zeroed)?
    for dim in sorted(members, key=lambda d: (order.get(d.tensor, -1), d)):
        zero[dim] = _soft_zero(graph, registry, dim, by_tensor, zero)
    for dim in members:
        for sink in sinks_by_dim.get(dim, []):
            if not any(d in member_set and zero.get(d, False) for d in sink.dims):
                return False, f"a weightless reduction reads {dim}, which stays non-zero when soft-pruned"
    return True, None


def _normalised_by(whats: list[str]) -> str:
    named = ", ".join(whats[:3]) + (f" and {len(whats) - 3} more" if len(whats) > 3 else "")
    return f"normalised or averaged over these channels by {named}: removal changes their statistics"


def _soft_zero(graph: ModelGraph, registry: Registry, dim: Dim, by_tensor, zero: dict[Dim, bool]) -> bool:
    """Zero status of one member from its producer's member inputs (visited first, in topological order)."""
    if graph.is_initializer(dim.tensor):
        return True  # a member parameter: soft pruning zeroes it
    node = graph.producer.get(dim.tensor)
    if node is None:
        return False
    rule = registry.rule(node)
    if rule is not None:

        def input_zero(tensor: str) -> bool | None:
            dims = by_tensor.get(tensor)
            return None if not dims else all(zero.get(d, False) for d in dims)

        verdict = rule.soft_zero(node, dim, input_zero)
        if verdict is not None:
            return verdict
    # the member inputs, from whichever side is smaller: an op of N inputs is in up to N groups
    # (a Concat of N branches), a group of M members has up to M producers of few inputs each
    named = node.input_names
    if len(by_tensor) < len(named):
        tensors = [t for t in by_tensor if t in named and t != dim.tensor]
    else:
        tensors = [t for t in dict.fromkeys(node.inputs) if t and t != dim.tensor and t in by_tensor]
    inputs = [d for t in tensors for d in by_tensor[t]]
    status = [zero.get(d, False) for d in inputs]
    operator = registry.of(node)
    kind = operator.zero_kind(node) if operator is not None else None
    if kind == PRODUCT:
        return any(status)
    if kind == NUMERATOR:
        return any(s for d, s in zip(inputs, status) if d.tensor == node.inputs[0])
    if kind in (PRESERVES, SUM):
        if not inputs or not all(status):
            return False
        if kind == SUM:
            # an input outside the group (a scalar offset, another branch) adds a non-zero value
            covered = {d.tensor for d in inputs}
            if len(covered) == len(named):
                return True  # every input is a member: no stray
            strays = [t for t in node.inputs if t and t not in covered]
            return all(graph.is_initializer(t) and not _nonzero_const(graph, t) for t in strays)
        return True
    return False


def _nonzero_const(graph: ModelGraph, tensor: str) -> bool:
    value = graph.const(tensor)
    return value is not None and value.dtype.kind in "fiu" and bool(np.any(value != 0))
