"""Gather: constant indices along a channel axis select channels; an embedding table's rows are
its weight."""

from __future__ import annotations

import numpy as np

from spa.core.coupling import Dim, LinkSet, pairs
from spa.ops.base import PRESERVES, Operator


class Gather(Operator):
    """Constant 1-D indices along a channel axis select channels; other axes pass."""

    ops = ("Gather",)
    zero_kinds = dict.fromkeys(ops, PRESERVES)
    weight_inputs = (0,)  # an embedding table
    gathers_rows = True

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        rank = ctx.rank(data)
        axis = node.attr("axis", 0) % rank
        index_rank = ctx.rank(indices)
        if dim.tensor == indices or index_rank is None:
            links.freeze(dim, f"indices of Gather '{node.name}'")
            return links.out
        data_axis = dim.axis if dim.tensor == data else _gather_data_axis(dim.axis, axis, index_rank)
        if data_axis is None:  # an axis of y that comes from the indices
            links.freeze(dim, f"axis produced by the indices of Gather '{node.name}'")
            return links.out
        if data_axis != axis:
            shift = index_rank - 1 if data_axis > axis else 0
            links.same(Dim(data, data_axis), Dim(y, data_axis + shift))
            return links.out
        picks = ctx.graph.const(indices)
        if picks is None or picks.ndim != 1:
            links.freeze(dim, f"Gather '{node.name}' picks along this axis with non-constant or scalar indices")
            return links.out
        size = ctx.size(Dim(data, axis))
        links.add(pairs(Dim(data, axis), Dim(y, axis), np.asarray(picks) % size, np.arange(len(picks))))
        return links.out

    def rewrite(self, node, cut):
        data, y = node.inputs[0], node.outputs[0]
        axis = node.attr("axis", 0) % len(cut.graph.shape(data))
        keep_data = cut.kept(Dim(data, axis))
        if keep_data is None:
            return
        picks = cut.graph.const(node.inputs[1]) % cut.old_size(Dim(data, axis))
        keep_y = cut.kept(Dim(y, axis))
        if keep_y is not None:
            picks = picks[keep_y]
        cut.set_input_const(node, 1, np.searchsorted(keep_data, picks).astype(np.int64))


def _gather_data_axis(y_axis: int, axis: int, index_rank: int) -> int | None:
    if y_axis < axis:
        return y_axis
    if y_axis >= axis + index_rank:
        return y_axis - index_rank + 1
    return axis if index_rank == 1 else None
