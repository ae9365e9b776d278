"""Einsum: counted, not coupled (its equation can mix any axes)."""

from __future__ import annotations

import math

from spa.core.graph import ModelGraph, Node
from spa.ops import cost
from spa.ops.base import Operator


def _flops(graph: ModelGraph, node: Node) -> int:
    shapes = [graph.shape(name) for name in node.inputs]
    known = [s for s in shapes if s is not None]
    equation = node.attr("equation", "").replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(known) != len(shapes) or len(terms) != len(known):
        return 0
    sizes: dict[str | int, int] = {}
    for term, shape in zip(terms, known):
        for label, dim in zip(_labels(term, len(shape)), shape):
            sizes[label] = max(sizes.get(label, 1), cost.size(dim))
    letters = [c for c in lhs if c.isalpha()]
    kept = set(rhs) if arrow else {c for c in letters if letters.count(c) == 1}
    summed = any(isinstance(label, str) and label not in kept for label in sizes)
    # evaluated naively: at every point of the joint index space one multiply per extra
    # operand, and one add when an index is summed out (a two-operand contraction: 2 per point)
    return math.prod(sizes.values()) * (len(terms) - 1 + summed)


def _labels(term: str, rank: int) -> list[str | int]:
    """A term's index labels; the axes under '...' get integer labels counted from the right,
    so they line up (and broadcast) across operands as numpy aligns them."""
    head, ellipsis, tail = term.partition("...")
    if not ellipsis:
        return list(term)
    width = rank - len(head) - len(tail)
    return list(head) + list(range(width - 1, -1, -1)) + list(tail)


class Einsum(Operator):
    ops = ("Einsum",)
    couples = False
    costs = {"Einsum": _flops}
