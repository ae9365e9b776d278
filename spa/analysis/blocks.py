"""Residual blocks: the parts of a graph of the form ``y = x + f(x)`` that depth pruning removes whole.

A residual add is an ``Add`` (or onnxruntime's fused ``SkipLayerNormalization`` /
``SkipSimplifiedLayerNormalization``, whose fourth output is the sum) where one input, the skip,
is an ancestor of the other, the branch, and the branch holds a weighted op. Adds whose sum is
the skip of the next one form the residual stream. In a transformer the add after an attention
branch and the adds after it up to the next attention make one block: a whole layer, attention
and MLP, as ShortGPT removes them (``unit="layer"``). With ``unit="sublayer"`` each add is its own
block, an attention or an MLP sub-block ranked against each other, and ``"attention"`` or
``"mlp"`` keeps only that kind removable. Elsewhere (CNNs) each add is a block.

A block is removable when dropping its branches leaves exactly its input:
- pre-norm transformer layers (``h = x + Attn(Norm(x)); y = h + MLP(Norm(h))``), fused or not;
- identity blocks whose sum goes through a Relu where the input is itself non-negative
  (ResNet: ``Relu(x + f(x))`` with ``x`` a Relu output, so ``Relu(x) == x``).
Not removable, with the reason: post-norm layers (BERT: the sum goes through a norm, so without
``f`` the block leaves ``Norm(x)``, a different function, not ``x``), projection shortcuts
(``proj(x) + f(x)``), blocks whose inner tensors are read outside them, and blocks sharing a
key/value cache input with another part of the graph.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, replace

import onnx

from spa.core import decoder
from spa.ops.registry import DEFAULT

# a decomposed attention's token mixing (fused attention ops say so themselves: ``Operator.attends``)
TOKEN_MIXING = {"Softmax", "SparseAttention"}
# the fused skip norms and the plain norm each becomes where its skip sum is no longer wanted
FUSED_NORMS = {
    "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
    "SkipLayerNormalization": "LayerNormalization",
}
NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", *FUSED_NORMS}
# ops whose output is non-negative when their input is (a Relu after them changes nothing)
KEEPS_SIGN = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity"}
# how far back a projection shortcut's two paths are followed to their common input
PROJECTION_DEPTH = 12
# what one block of a transformer is: a whole layer, or its attention and MLP sub-blocks apart
# (both, or only one kind removable); a CNN's blocks are the same in every unit
BLOCK_UNITS = ("layer", "sublayer", "attention", "mlp")
# the kinds of block a transformer's stream has (``Block.kind``)
TRANSFORMER_KINDS = ("transformer layer", "attention", "MLP")


@dataclass(frozen=True)
class ResidualAdd:
    node: str  # the Add or fused skip norm
    skip: str  # the stream tensor it adds to
    branch: str  # the branch tensor it adds
    total: str  # the sum ('' where a fused norm writes none)
    fused: bool
    attention: bool  # the branch holds an attention op
    branch_nodes: frozenset[str]  # the nodes computing the branch from the skip


@dataclass(frozen=True)
class Block:
    """One residual block: removing it makes its output its input."""

    index: int
    name: str  # the longest common prefix of its node names, for people
    kind: str  # "transformer layer", "attention", "MLP" or "residual block"
    input: str  # x
    output: str  # y ('' where the last add is a fused norm that writes no sum)
    adds: tuple[ResidualAdd, ...]  # in stream order: the last one is the exit
    post: str | None  # a Relu after the exit add, removed with it
    nodes: frozenset[str]  # every node that goes with the block (the exit and ``post`` aside)
    cache: tuple[str, ...]  # the past key/value inputs it reads (their present outputs go too)
    reason: str | None = None  # why it cannot be removed; None: removable

    @property
    def removable(self) -> bool:
        return self.reason is None

    @property
    def exit(self) -> ResidualAdd:
        return self.adds[-1]

    @property
    def layer(self) -> int | None:
        """The layer number its cache names carry, where it reads a cache."""
        numbers = {int(m.group(1)) for name in self.cache if (m := re.search(r"(\d+)", name))}
        return numbers.pop() if len(numbers) == 1 else None


@dataclass
class BlockAnalysis:
    blocks: list[Block] = field(default_factory=list)

    @property
    def removable(self) -> list[Block]:
        return [b for b in self.blocks if b.removable]


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.nodes = {n.name: n for n in model.graph.node}
        self.order = {n.name: k for k, n in enumerate(model.graph.node)}
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers[name].append(node)
        self.constants = {t.name for t in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}
        self.inputs = {i.name for i in model.graph.input} - self.constants
        infos = [
            v
            for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
            if v.type.HasField("tensor_type")
        ]
        self.types = {v.name: v.type.tensor_type.elem_type for v in infos}
        self.shapes = {
            v.name: [d.dim_value or d.dim_param or None for d in v.type.tensor_type.shape.dim]
            for v in infos
            if v.type.tensor_type.HasField("shape")
        }

    def broadcast(self, small: str, total: str) -> bool:
        """``small`` is known to have another shape than ``total``: added, it was broadcast (an
        attention mask added to the scores), so it is no residual stream."""
        a, b = self.shapes.get(small), self.shapes.get(total)
        if a is None or b is None:
            return False
        return len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a, b))

    def weighted(self, node: onnx.NodeProto) -> bool:
        """A layer with a constant weight: it makes a branch a learned function, not arithmetic on
        its input."""
        operator = DEFAULT.of(node)
        # a dense or conv layer, not a constant of arithmetic (Pow's exponent, a Gather's indices)
        if operator is None or not operator.layer_kind:
            return False
        return any(i in self.constants for i in node.input[1:])

    def attends(self, node: onnx.NodeProto) -> bool:
        operator = DEFAULT.of(node)
        return node.op_type in TOKEN_MIXING or (operator is not None and operator.attends)

    def branch(self, skip: str, tensor: str) -> frozenset[str]:
        """The nodes computing ``tensor`` that depend on ``skip`` (empty where none do). A fused
        skip norm writing ``skip`` as its sum also writes the norm of it: that depends on it too."""
        source = self.producer.get(skip)
        same = set(source.output) if source is not None and source.op_type in FUSED_NORMS else {skip}
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            name = stack.pop()
            node = self.producer.get(name)
            if name in same or node is None or node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(i for i in node.input if i)
        depends: set[str] = set()
        for name in sorted(seen, key=self.order.__getitem__):
            node = self.nodes[name]
            if any(i in same or (i in self.producer and self.producer[i].name in depends) for i in node.input):
                depends.add(name)
        return frozenset(depends)


def residual_add(graph: _Graph, node: onnx.NodeProto) -> ResidualAdd | None:
    fused = node.op_type in FUSED_NORMS and node.domain == "com.microsoft"
    if not (fused or (node.op_type == "Add" and node.domain in ("", "ai.onnx"))) or len(node.input) < 2:
        return None
    first, second = node.input[0], node.input[1]
    if not first or not second or first in graph.constants or second in graph.constants:
        return None
    for skip, branch in ((first, second), (second, first)):
        nodes = graph.branch(skip, branch)
        producer = graph.producer.get(branch)
        total = (node.output[3] if len(node.output) > 3 else "") if fused else node.output[0]
        if graph.broadcast(skip, total or node.output[0]):
            continue
        if producer is not None and producer.name in nodes and any(graph.weighted(graph.nodes[n]) for n in nodes):
            attention = any(graph.attends(graph.nodes[n]) for n in nodes)
            return ResidualAdd(node.name, skip, branch, total, fused, attention, nodes)
    return None


def find_blocks(model: onnx.ModelProto, unit: str = "layer") -> BlockAnalysis:
    """Every residual block of ``model``'s main graph, removable or with the reason it is not;
    ``unit`` (``BLOCK_UNITS``) says what one block of a transformer is."""
    if unit not in BLOCK_UNITS:
        raise ValueError(f"unknown block unit {unit}")
    graph = _Graph(model)
    adds = [a for node in model.graph.node if (a := residual_add(graph, node)) is not None]
    by_skip = {_uncast(graph, a.skip): a for a in adds}
    after = {a.node: _stream_out(graph, a) for a in adds}
    following = {a.node: by_skip.get(_link(graph, a, after[a.node][0], by_skip)) for a in adds}
    transformer = any(a.attention for a in adds)
    groups: list[list[ResidualAdd]] = []
    grouped: dict[str, list[ResidualAdd]] = {}
    for add in adds:
        previous = next((p for p in adds if following[p.node] is add), None)
        whole_layers = transformer and unit == "layer"
        if whole_layers and not add.attention and previous is not None and previous.node in grouped:
            group = grouped[previous.node]
            if group[-1] is previous:
                group.append(add)
                grouped[add.node] = group
                continue
        grouped[add.node] = group = [add]
        groups.append(group)
    analysis = BlockAnalysis()
    cache = decoder.layout(model)
    past = set(cache.past) if cache else set()
    for group in groups:
        block = _block(graph, group, after[group[-1].node], len(analysis.blocks), transformer, past)
        analysis.blocks.append(_of_unit(block, unit, transformer))
    analysis.blocks += _projection_blocks(graph, model, {a.node for a in adds}, len(analysis.blocks))
    # numbered in graph order, as people read the model
    ordered = sorted(analysis.blocks, key=lambda b: graph.order[b.exit.node] if b.adds else graph.order[b.name])
    analysis.blocks = [replace(b, index=k) for k, b in enumerate(ordered)]
    return analysis


def _link(graph: _Graph, add: ResidualAdd, out: str, skips: dict) -> str:
    """The tensor the next add of the stream reads as its skip: ``out``, or in a post-norm stack the
    norm of it (``find_blocks`` then pairs a layer's adds, and refuses them as post-norm)."""
    candidates = [out]
    if add.fused:
        candidates.append(graph.nodes[add.node].output[0])
    readers = graph.consumers.get(out, []) if out else []
    if len(readers) == 1 and readers[0].op_type in NORMS - set(FUSED_NORMS):
        candidates.append(readers[0].output[0])
    return next((c for c in candidates if c and c in skips), "")


def _uncast(graph: _Graph, tensor: str) -> str:
    """The tensor before the casts that do not change it (an exporter's norm casts its input to
    float32, and the residual add then reads that cast)."""
    node = graph.producer.get(tensor)
    while node is not None and (node.op_type == "Identity" or _same_type_cast(graph, node)):
        tensor = node.input[0]
        node = graph.producer.get(tensor)
    return tensor


def _casts(graph: _Graph, tensor: str) -> list[str]:
    """The nodes ``_uncast`` looks through above ``tensor``."""
    names = []
    node = graph.producer.get(tensor)
    while node is not None and (node.op_type == "Identity" or _same_type_cast(graph, node)):
        names.append(node.name)
        node = graph.producer.get(node.input[0])
    return names


def _same_type_cast(graph: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type != "Cast":
        return False
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return to is not None and graph.types.get(node.input[0]) == to


def _stream_out(graph: _Graph, add: ResidualAdd) -> tuple[str, str | None]:
    """The stream tensor after ``add`` and the Relu it passes through on the way, if any."""
    if not add.total:
        return "", None
    readers = graph.consumers.get(add.total, [])
    if len(readers) == 1 and readers[0].op_type == "Relu" and add.total not in graph.outputs:
        return readers[0].output[0], readers[0].name
    return add.total, None


def _block(
    graph: _Graph, adds: list[ResidualAdd], out: tuple[str, str | None], index: int, transformer: bool, past: set[str]
) -> Block:
    exit, (output, post) = adds[-1], out
    casts = [n for a in adds[1:] for n in _casts(graph, a.skip)]  # between one add and the next
    nodes = frozenset().union(*(a.branch_nodes for a in adds), (a.node for a in adds[:-1]), casts)
    reads = {i for n in nodes for i in graph.nodes[n].input}
    cache = tuple(sorted(reads & past))
    names = sorted(nodes) or [exit.node]
    prefix = _common_prefix(names) or exit.node
    kind = "residual block"
    if transformer:
        kind = ("transformer layer" if len(adds) > 1 else "attention") if adds[0].attention else "MLP"
    reason = _refusal(graph, adds, nodes, post, cache)
    return Block(index, prefix, kind, adds[0].skip, output, tuple(adds), post, nodes, cache, reason)


def _of_unit(block: Block, unit: str, transformer: bool) -> Block:
    """``block``, refused where ``unit`` removes only the other kind of sub-block."""
    if not transformer or unit in ("layer", "sublayer") or not block.removable:
        return block
    attention = block.adds[0].attention
    if attention == (unit == "attention"):
        return block
    return replace(block, reason=f"an {'attention' if attention else 'MLP'} sub-block (the block unit is {unit})")


def _refusal(
    graph: _Graph, adds: list[ResidualAdd], nodes: frozenset[str], post: str | None, cache: tuple[str, ...]
) -> str | None:
    exit = adds[-1]
    if all(_normalized(graph, a.skip) for a in adds) or _normalizes_stream(graph, exit):
        return (
            "post-norm: the residual sum goes through a normalization, so without the block the "
            "output would be Norm(x), not x"
        )
    if post is not None and not _non_negative(graph, adds[0].skip):
        return "the sum goes through a Relu and the block input can be negative: Relu(x) is not x"
    allowed = nodes | {exit.node}
    presents = decoder.cache_names(sorted(graph.inputs), sorted(graph.outputs))
    for name in sorted(nodes, key=graph.order.__getitem__):
        for tensor in graph.nodes[name].output:
            if tensor in graph.outputs and tensor not in presents:
                return f"its inner tensor {tensor} is a graph output"
            outside = [c.name for c in graph.consumers.get(tensor, []) if c.name not in allowed]
            if outside:
                return f"its inner tensor {tensor} is read outside it (by {outside[0]})"
    if exit.fused:
        norm = graph.nodes[exit.node]
        if any(o for o in norm.output[1:3]) and any(graph.consumers.get(o) for o in norm.output[1:3] if o):
            return f"{exit.node} writes statistics another op reads"
    for name in cache:
        # a Shape outside (Optimum reads the past length there) reads another layer's cache instead
        if any(c.name not in nodes and c.op_type != "Shape" for c in graph.consumers.get(name, [])):
            return f"its cache input {name} is read outside it"
    return None


def _normalizes_stream(graph: _Graph, add: ResidualAdd) -> bool:
    """The sum, normalized, is the skip of another residual add (post-norm, whatever the input)."""
    node = graph.nodes[add.node]
    normed = [node.output[0]] if add.fused else []
    readers = graph.consumers.get(add.total, []) if add.total else []
    normed += [r.output[0] for r in readers if r.op_type in NORMS]
    return any(_skip_of_residual(graph, t) for t in normed)


def _skip_of_residual(graph: _Graph, tensor: str) -> bool:
    return any((a := residual_add(graph, c)) is not None and a.skip == tensor for c in graph.consumers.get(tensor, []))


def _normalized(graph: _Graph, tensor: str) -> bool:
    node = graph.producer.get(tensor)
    return node is not None and node.op_type in NORMS and node.output[0] == tensor


def _non_negative(graph: _Graph, tensor: str) -> bool:
    node = graph.producer.get(tensor)
    while node is not None and node.op_type in KEEPS_SIGN:
        node = graph.producer.get(node.input[0])
    return node is not None and node.op_type == "Relu"


def _common_prefix(names: list[str]) -> str:
    if not names:
        return ""
    first, last = min(names), max(names)
    k = 0
    while k < min(len(first), len(last)) and first[k] == last[k]:
        k += 1
    prefix = first[:k]
    return prefix.rsplit("/", 1)[0] if "/" in prefix else prefix


def _projection_blocks(graph: _Graph, model: onnx.ModelProto, residual: set[str], start: int) -> list[Block]:
    """Adds of two computed paths from one input, each through a weighted op: ``proj(x) + f(x)``.
    Listed as not removable: without ``f`` the block leaves ``proj(x)``, not ``x``."""
    found: list[Block] = []
    for node in model.graph.node:
        if node.op_type != "Add" or node.name in residual or len(node.input) != 2:
            continue
        if any(i in graph.constants or i not in graph.producer for i in node.input):
            continue
        cones = [_cone(graph, i) for i in node.input]
        shared = set(cones[0]) & set(cones[1])
        if not shared or not all(any(graph.weighted(graph.nodes[n]) for n in cone.values()) for cone in cones):
            continue
        source = max(shared, key=lambda t: graph.order[graph.producer[t].name] if t in graph.producer else -1)
        paths = [_weighted_between(graph, source, i) for i in node.input]
        # each path its own weights: two reads of one projection (rotary q*cos + rot(q)*sin) are not two paths
        if not all(paths) or paths[0] & paths[1]:
            continue
        output, post = _stream_out(
            graph, ResidualAdd(node.name, source, node.input[1], node.output[0], False, False, frozenset())
        )
        reason = (
            "projection shortcut: the shortcut is computed (proj(x) + f(x)), so without f the output is proj(x), not x"
        )
        found.append(
            Block(start + len(found), node.name, "residual block", source, output, (), post, frozenset(), (), reason)
        )
    return found


def _cone(graph: _Graph, tensor: str) -> dict[str, str]:
    """Tensors within PROJECTION_DEPTH nodes above ``tensor`` -> the node reading them."""
    cone: dict[str, str] = {}
    frontier = [tensor]
    for _ in range(PROJECTION_DEPTH):
        nxt = []
        for name in frontier:
            node = graph.producer.get(name)
            if node is None:
                continue
            for i in node.input:
                if i and i not in graph.constants and i not in cone:
                    cone[i] = node.name
                    nxt.append(i)
        frontier = nxt
    return cone


def _weighted_between(graph: _Graph, source: str, tensor: str) -> set[str]:
    return {n for n in graph.branch(source, tensor) if graph.weighted(graph.nodes[n])}
