"""Reshape chains that only permute axes, seen through tensors that have no index space.

The dynamo exporter transposes Kᵀ as [batch, heads, seq, d] -> [-1, seq, d] -> [-1, d, seq]
-> [batch, heads, d, seq]: the middle tensors merge the head axis into a symbolic batch, so
no channel of theirs can be named, yet the chain as a whole only moves axes. ``round_trip``
reads each Reshape entry as the list of X axes it spans (a run-time size of X, a literal, the
rest for -1) and, when every output axis spans one X axis, says which X axis each one is.
"""

from __future__ import annotations

from dataclasses import dataclass

from spa.core.coupling import Dim
from spa.core.graph import Node
from spa.ops.elementwise import Unary
from spa.patterns.shapes import Entry, trace_vector

# ops a round trip may pass between its two Reshapes: they move or scale elements, never mix them
_CHAIN_OPS = set(Unary.ops) | {"Transpose"}
_SCALING = ("Mul", "Div", "Add", "Sub")


@dataclass
class RoundTrip:
    """X -> Reshape -> (Transpose, element-wise) -> Reshape -> Y: X's axis a *is* Y's axis mapping[a]."""

    x: str
    y: str
    mapping: dict[int, int]  # X axis -> Y axis
    reshapes: list[tuple[Node, list[Entry], list[list[int]]]]  # each Reshape, its target entries, X axes per entry

    def partner(self, dim: Dim) -> Dim | None:
        if dim.tensor == self.x and dim.axis in self.mapping:
            return Dim(self.y, self.mapping[dim.axis])
        back = {b: a for a, b in self.mapping.items()}
        if dim.tensor == self.y and dim.axis in back:
            return Dim(self.x, back[dim.axis])
        return None

    def fixed_literal(self, dim: Dim) -> str | None:
        """Why a cut of this axis could not follow, or None. The middle tensors have no index
        space, so no rewrite reaches a literal there; the last Reshape's output is rewritten as usual."""
        if dim.tensor == self.x:
            a = dim.axis
        else:
            partner = self.partner(dim)
            # callers ask only about an axis the round trip maps
            assert partner is not None, dim
            a = partner.axis
        for node, entries, spans in self.reshapes[:-1]:
            for entry, span in zip(entries, spans):
                if a in span and entry.kind == "literal" and entry.value not in (-1, 0):
                    return f"Reshape '{node.name}' writes this axis's size as a literal"
        return None


def round_trip(graph, node, tensor) -> RoundTrip | None:
    if tensor not in (node.inputs[0], node.outputs[0]):
        return None
    chain = _chain(graph, node, forward=tensor == node.inputs[0])
    if chain is None:
        return None
    x, y = chain[0].inputs[0], chain[-1].outputs[0]
    x_shape, y_shape = graph.shape(x), graph.shape(y)
    if x_shape is None or y_shape is None:
        return None
    labels = {x: [[a] for a in range(len(x_shape))]}
    reshapes: list[tuple[Node, list[Entry], list[list[int]]]] = []
    for op in chain:
        if op.op_type == "Reshape":
            entries = trace_vector(graph, op, 1)
            if entries is None:
                return None
            out = _spans(graph, op, entries, labels, x_shape)
            if out is None:
                return None
            reshapes.append((op, entries, out))
        elif op.op_type == "Transpose":
            before = labels[op.inputs[0]]
            perm = op.attr("perm") or list(reversed(range(len(before))))
            out = [before[p] for p in perm]
        else:
            out = labels[op.inputs[0]]
        labels[op.outputs[0]] = out
    if len(labels[y]) != len(y_shape):
        return None
    mapping = {
        span[0]: j
        for j, span in enumerate(labels[y])
        if len(span) == 1 and isinstance(x_shape[span[0]], int) and x_shape[span[0]] == y_shape[j]
    }
    return RoundTrip(x, y, mapping, reshapes) if mapping else None


def _chain(graph, node, forward: bool, limit: int = 8) -> list[Node] | None:
    """The ops from one Reshape to the next, every tensor between them read by the next op alone."""
    chain = [node]
    tensor = node.outputs[0] if forward else node.inputs[0]
    while len(chain) <= limit:
        readers = [c for c in graph.consumers.get(tensor, []) if c.op_type != "Shape"]
        if tensor in graph.output_names or len(readers) != 1:
            return None
        if forward:
            step = readers[0]
            if step.inputs[0] != tensor:
                return None
            chain.append(step)
        else:
            step = graph.producer.get(tensor)
            if step is None or readers[0] is not chain[0]:
                return None
            chain.insert(0, step)
        if step.op_type == "Reshape":
            return chain
        if not _passes(graph, step):
            return None
        tensor = step.outputs[0] if forward else step.inputs[0]
    return None


def _passes(graph, node) -> bool:
    if node.op_type in _CHAIN_OPS:
        return True
    if node.op_type in _SCALING and len(node.inputs) == 2:  # a scale or offset broadcast from a scalar
        other = graph.shape(node.inputs[1])
        return other is not None and all(s == 1 for s in other)
    return False


def _spans(graph, node, entries, labels, x_shape) -> list[list[int]] | None:
    """The X axes each output axis of a chain Reshape spans, or None unless it regroups them in order."""
    before = labels[node.inputs[0]]
    if entries is None or sum(e.kind == "literal" and e.value == -1 for e in entries) > 1:
        return None

    def take(entry, position, pool, from_end):
        """The X axes this entry spans, from the front (or back) of ``pool``; None if unclear."""
        if entry.kind == "literal" and entry.value == 0 and not node.attr("allowzero", 0):
            want = before[position] if position < len(before) else None
        elif entry.kind == "runtime" and entry.source[0] in labels:
            want = labels[entry.source[0]][entry.source[1]]
        elif entry.kind == "runtime" and len(entry.source) == 2:
            size = graph.static_size(*entry.source)
            if size is not None:
                return _by_size(pool, size, x_shape, from_end)
            symbol = graph.shape(entry.source[0])[entry.source[1]]
            edge = pool[-1:] if from_end else pool[:1]
            return edge if edge and x_shape[edge[0]] == symbol else None
        elif entry.kind == "literal" and entry.value > 0:
            return _by_size(pool, entry.value, x_shape, from_end)
        else:
            return None
        if want is None or len(want) > len(pool):
            return None
        edge = pool[len(pool) - len(want) :] if from_end else pool[: len(want)]
        return list(want) if edge == list(want) else None

    fill = next((k for k, e in enumerate(entries) if e.kind == "literal" and e.value == -1), len(entries))
    pool = [a for span in before for a in span]
    out: list = [None] * len(entries)
    for k in range(fill):
        span = take(entries[k], k, pool, False)
        if span is None:
            return None
        out[k], pool = span, pool[len(span) :]
    for k in range(len(entries) - 1, fill, -1):
        span = take(entries[k], k, pool, True)
        if span is None:
            return None
        out[k], pool = span, pool[: len(pool) - len(span)]
    if fill < len(entries):
        out[fill], pool = pool, []
    return out if not pool else None


def _by_size(pool, size, x_shape, from_end) -> list[int] | None:
    """The shortest run at the front (or back) of ``pool`` whose static sizes multiply to ``size``."""
    order = list(reversed(pool)) if from_end else list(pool)
    product = 1
    span: list[int] = []
    for a in order:
        if product == size and (span or size == 1):
            break
        if not isinstance(x_shape[a], int):
            return None
        product *= x_shape[a]
        span.append(a)
    if product != size:
        return None
    return list(reversed(span)) if from_end else span
