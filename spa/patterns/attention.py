"""Telling the head axis from head_dim in the Reshapes around attention.

A Reshape that splits [hidden] into [heads, head_dim] (or [3, heads, head_dim] for a fused
QKV projection) does not say which factor is which, and a channel shuffle splits a channel
axis the same way. The graph says it: the head axis travels to a *batch* axis of the MatMuls
that multiply two activations (Q Kᵀ, then the scores times V), while head_dim is contracted
there (Q, K) or stays the last axis of the result (V). ONNX's own Attention op (opset 23) with
[B, heads, S, head_dim] operands says it outright: axis 1 is the heads, axis 3 head_dim.
``axis_role`` follows one axis through the layout and element-wise ops in between, forward from
a split or backward from the merge Reshape after scores times V.

Grouped-query attention shares each K/V head among several query heads: ``repeat_kv``
inserts an axis of size 1, Expands it to n_rep copies and merges [kv_heads, n_rep] into the
query head axis (``repeat_kv`` below finds that merge). The KV head axis takes the role of
the head axis it merges into.
"""

from __future__ import annotations

from dataclasses import dataclass

from spa.core.coupling import HEAD_DIM, HEADS, Dim
from spa.core.graph import ModelGraph, Node
from spa.ops.elementwise import Broadcasting, Softmax, Unary
from spa.ops.gather import Gather
from spa.ops.linear import MatMul
from spa.ops.onnx_attention import Attention
from spa.patterns.roundtrip import round_trip
from spa.patterns.shapes import segments

_STEPS = 64  # tensors visited per question: attention blocks are a handful of ops deep
_ELEMENTWISE = set(Unary.ops) | set(Broadcasting.ops)
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def axis_role(graph: ModelGraph, tensor: str, axis: int, forward: bool) -> str | None:
    """HEADS, HEAD_DIM, or None when the axis reaches no activation-by-activation MatMul
    (or reaches them in roles that disagree)."""
    roles: set[str] = set()
    seen: set[tuple[str, int]] = set()
    todo = [(tensor, axis)]
    while todo and len(seen) < _STEPS:
        here = todo.pop()
        if here in seen:
            continue
        seen.add(here)
        name, a = here
        if forward:
            nodes = graph.consumers.get(name, [])
        else:
            nodes = [graph.producer[name]] if name in graph.producer else []
        for node in nodes:
            role, onward = _step(graph, node, name, a, forward)
            if role:
                roles.add(role)
            todo.extend(onward)
    return roles.pop() if len(roles) == 1 else None


def _rank(graph: ModelGraph, tensor: str) -> int | None:
    shape = graph.shape(tensor)
    return None if shape is None else len(shape)


def _step(graph: ModelGraph, node: Node, name: str, a: int, forward: bool):
    """(role found at this op, (tensor, axis) pairs to follow on)."""
    op = node.op_type
    if op == "RotaryEmbedding" and name in (node.inputs[0], node.outputs[0]):  # either domain: within each head
        return None, [(node.outputs[0] if forward else node.inputs[0], a)]
    if node.domain not in ("", "ai.onnx"):
        return None, []
    if op in MatMul.ops:
        return _matmul_role(graph, node, name, a, forward), []
    if op in Attention.ops and _rank(graph, name) == 4:  # opset 23, heads split: [B, heads, S, head_dim]
        return {1: HEADS, 3: HEAD_DIM}.get(a), []
    if op == "Transpose":
        rank = _rank(graph, node.inputs[0])
        if rank is None:
            return None, []
        perm = list(node.attr("perm") or reversed(range(rank)))
        if forward:
            return None, [(node.outputs[0], perm.index(a))]
        return None, [(node.inputs[0], perm[a])]
    if op in _ELEMENTWISE or (op in Softmax.ops and not _normalised(graph, node, name, a)):
        return None, _elementwise(graph, node, name, a, forward)
    if op in _RESHAPES:
        return None, _reshape(graph, node, name, a, forward)
    if op == "Expand" and name in (node.inputs[0], node.outputs[0]):
        x, y = node.inputs[0], node.outputs[0]
        shift = (_rank(graph, y) or 0) - (_rank(graph, x) or 0)
        here, there = (x, y) if forward else (y, x)
        b = a + shift if forward else a - shift
        if b < 0 or name != here or graph.static_size(there, b) != graph.static_size(here, a):
            return None, []  # a broadcast axis: copies, not the same channel
        return None, [(there, b)]
    if op in Gather.ops and forward and name == node.inputs[0]:
        axis = node.attr("axis", 0) % (_rank(graph, name) or 1)
        index_rank = _rank(graph, node.inputs[1])
        if a == axis or index_rank is None:
            return None, []
        return None, [(node.outputs[0], a if a < axis else a + index_rank - 1)]
    if op == "Slice" and forward and name == node.inputs[0]:
        # paddle2onnx picks Q, K and V out of a fused projection with Slice (then Squeeze)
        # along the leading axis of 3; the other axes pass through unchanged
        rank = _rank(graph, name)
        axes = graph.const_ints(node.input(3)) if node.input(3) else list(range(rank or 0))
        if rank is None or axes is None:
            return None, []
        if a in [k % rank for k in axes] and not (rank == 4 and a == 3):
            return None, []
        # a slice of a head's last axis (partial rotary: the rotated part, the part passed
        # through) is still head_dim
        return None, [(node.outputs[0], a)]
    if op == "Concat" and (name in node.inputs if forward else name == node.outputs[0]):
        # a decoder appends the new keys and values to its cache along the sequence: every
        # other axis is the same channel before and after
        rank = _rank(graph, node.outputs[0])
        if rank is None or (a == node.attr("axis", 0) % rank and not (rank == 4 and a == 3)):
            return None, []  # the parts of a head's last axis (rotary halves) join into head_dim
        if forward:
            return None, [(node.outputs[0], a)]
        return None, [(x, a) for x in node.inputs if x and _rank(graph, x) == rank]
    if op == "Split" and forward and name == node.inputs[0]:
        if a == node.attr("axis", 0) % (_rank(graph, name) or 1):
            return None, []
        return None, [(y, a) for y in node.outputs if y]
    return None, []


def _matmul_role(graph: ModelGraph, node: Node, name: str, a: int, forward: bool) -> str | None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if graph.is_initializer(x) or graph.is_initializer(w):
        return None  # a projection by a weight: not between two activations
    rank = _rank(graph, name)
    if rank is None or rank < 3:
        return None
    if a < rank - 2:
        return HEADS
    if forward:
        contracted = a == rank - 1 if name == x else a == rank - 2
        carried = name == w and a == rank - 1  # V's head_dim stays the output's last axis
        return HEAD_DIM if contracted or carried else None
    return HEAD_DIM if name == y and a == rank - 1 else None


def _normalised(graph: ModelGraph, node: Node, name: str, a: int) -> bool:
    rank = _rank(graph, name) or 1
    return a == node.attr("axis", -1) % rank


def _elementwise(graph: ModelGraph, node: Node, name: str, a: int, forward: bool):
    y = node.outputs[0]
    ry, rank = _rank(graph, y), _rank(graph, name)
    if ry is None or rank is None:
        return []
    size = graph.static_size(name, a)
    if forward:
        out_axis = a + ry - rank
        return [(y, out_axis)] if graph.static_size(y, out_axis) == size else []
    onward = []
    for x in node.inputs:
        rx = _rank(graph, x) if x else None
        if rx is None or graph.is_initializer(x) or a - (ry - rx) < 0:
            continue
        if graph.static_size(x, a - (ry - rx)) == size:
            onward.append((x, a - (ry - rx)))
    return onward


def _reshape(graph: ModelGraph, node: Node, name: str, a: int, forward: bool):
    x, y = node.inputs[0], node.outputs[0]
    sx, sy = graph.shape(x), graph.shape(y)
    if sx is None or sy is None or (forward and name != x):
        return []
    merge = repeat_kv(graph, node) if forward else None
    if merge and a == merge.kv_axis:
        return [(y, merge.heads_axis)]
    for ins, outs in segments(sx, sy):
        if len(ins) == 1 and len(outs) == 1:
            if forward and ins[0] == a:
                return [(y, outs[0])]
            if not forward and outs[0] == a:
                return [(x, ins[0])]
    trip = round_trip(graph, node, name) if node.op_type == "Reshape" else None
    partner = trip.partner(Dim(name, a)) if trip else None
    return [(partner.tensor, partner.axis)] if partner else []


@dataclass(frozen=True)
class RepeatKV:
    """A Reshape merging [kv_heads, n_rep] into the query head axis, after an Expand that
    wrote n_rep copies of each K/V head (axes of the Reshape's input, and of its output)."""

    kv_axis: int
    rep_axis: int
    heads_axis: int


def repeat_kv(graph: ModelGraph, node: Node) -> RepeatKV | None:
    if node.op_type != "Reshape":
        return None
    x, y = node.inputs[0], node.outputs[0]
    expand = graph.producer.get(x)
    if expand is None or expand.op_type != "Expand":
        return None
    sx, sy, source = graph.shape(x), graph.shape(y), graph.shape(expand.inputs[0])
    if sx is None or sy is None or source is None:
        return None
    shift = len(sx) - len(source)
    for ins, outs in segments(sx, sy):
        if len(ins) != 2 or len(outs) != 1:
            continue
        for kv, rep in (ins, ins[::-1]):
            # the copies come from an axis of size 1 in the Expand's input; the KV heads pass through
            if (rep - shift < 0 or source[rep - shift] == 1) and kv - shift >= 0 and source[kv - shift] == sx[kv]:
                return RepeatKV(kv, rep, outs[0])
    return None
