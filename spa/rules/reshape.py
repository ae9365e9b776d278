"""Reshape, Flatten, Squeeze, Unsqueeze: channels become blocks or factors.

Axes are paired into runs of equal size product (see ``segments``).
* one axis <-> one axis: identity.
* several axes merge into one (conv -> flatten -> Gemm): channel c of the
  merged-from axis is the block of flat features whose c-coordinate is c.
* one axis splits into several ([C] -> [g, C/g] in a channel shuffle,
  [H*D] -> [H, D] for heads): the channel becomes a product index, and only one
  factor can shrink while the others keep their size. Which one is decided
  after the rest of the graph is known (``Pending``): the factor some other op
  already treats as a channel, else the largest.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Dim, Freeze, LinkSet, Pending, Rule, pairs, register
from .shapes import rewritable, segments, trace_vector


@register
class ReshapeFamily(Rule):
    ops = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")

    def _segment(self, node, dim, ctx):
        x, y = node.inputs[0], node.outputs[0]
        sx, sy = ctx.graph.shape(x), ctx.graph.shape(y)
        if sx is None or sy is None:
            return None
        for ins, outs in segments(sx, sy):
            if dim.tensor == x and dim.axis in ins:
                return (x, ins), (y, outs)
            if dim.tensor == y and dim.axis in outs:
                return (y, outs), (x, ins)
        return None

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        if dim.tensor not in (node.inputs[0], node.outputs[0]):
            links.freeze(dim, f"shape operand of {node.op_type} '{node.name}'")
            return links.out
        seg = self._segment(node, dim, ctx)
        if seg is None:
            links.freeze(dim, f"{node.op_type} '{node.name}' mixes this axis with others of unknown size")
            return links.out
        (mine_t, mine), (theirs_t, theirs) = seg
        if len(mine) > 1 and len(theirs) > 1:
            links.freeze(dim, f"{node.op_type} '{node.name}' regroups this axis with others")
        elif len(theirs) == 1:  # identity, or a merge of several of my axes into one
            other = Dim(theirs_t, theirs[0])
            sizes = [ctx.graph.shape(mine_t)[a] for a in mine]
            coordinate = _coordinate(sizes, mine.index(dim.axis))
            links.add(pairs(dim, other, coordinate, np.arange(len(coordinate))))
        else:
            links.add(Pending(dim))
        self._check_target(node, dim, theirs_t, theirs, links, ctx)
        return links.out

    def resolve(self, node, dim, ctx):
        links = LinkSet(ctx)
        (mine_t, _), (theirs_t, theirs) = self._segment(node, dim, ctx)
        sizes = [ctx.graph.shape(theirs_t)[a] for a in theirs]
        known = [k for k, a in enumerate(theirs) if Dim(theirs_t, a) in ctx.known_dims]
        if len(known) > 1:
            links.freeze(dim, f"{node.op_type} '{node.name}' splits one channel axis into several channel axes")
            return links.out
        chosen = known[0] if known else int(np.argmax(sizes))
        coordinate = _coordinate(sizes, chosen)
        links.add(pairs(dim, Dim(theirs_t, theirs[chosen]), np.arange(len(coordinate)), coordinate))
        return links.out

    def _check_target(self, node, dim, theirs_t, theirs, links, ctx):
        """A Reshape's target must be rewritable at the output axes that change."""
        if node.op_type != "Reshape":
            return
        y_axes = theirs if theirs_t == node.outputs[0] else [dim.axis]
        entries = trace_vector(ctx.graph, node, 1)
        for axis in y_axes:
            reason = rewritable(entries, axis)
            if reason:
                links.add(Freeze(dim, f"Reshape '{node.name}' target: {reason}"))

    def rewrite(self, node, cut):
        if node.op_type != "Reshape":
            return
        y = node.outputs[0]
        entries = trace_vector(cut.graph, node, 1)
        for axis in range(len(cut.graph.shape(y) or ())):
            old, new = cut.old_size(Dim(y, axis)), cut.new_size(Dim(y, axis))
            if old == new:
                continue
            entry = entries[axis]
            if entry.kind == "literal" and entry.value not in (-1, 0):
                cut.set_const_element(*entry.source, new)


def _coordinate(sizes: list[int], which: int) -> np.ndarray:
    """For each flat index over ``sizes`` (row-major), its coordinate along axis ``which``."""
    inner = math.prod(sizes[which + 1:])
    return (np.arange(math.prod(sizes)) // inner) % sizes[which]
