"""Ops that work over spatial axes and leave channels alone: pooling, padding,
resizing and reductions (which may also reduce the channel axis away)."""

from __future__ import annotations

from spa.core.coupling import Dim, Freeze, LinkSet, Sink
from spa.ops import cost
from spa.ops.base import PRESERVES, Operator
from spa.patterns.decomposed import norm_name
from spa.patterns.shapes import rewritable, size_read_as_value, trace_vector


class Pool(Operator):
    ops = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
    costs = {
        **dict.fromkeys(("MaxPool", "AveragePool", "LpPool"), cost.window),
        **dict.fromkeys(("GlobalAveragePool", "GlobalMaxPool"), cost.per_input_element(1)),
    }
    zero_kinds = dict.fromkeys(("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"), PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        if len(node.outputs) > 1 and node.outputs[1] and ctx.graph.consumers.get(node.outputs[1]):
            links.freeze(dim, f"MaxPool '{node.name}' indices encode the channel count")
        elif dim.tensor in (x, y) and dim.axis in (0, 1):
            links.same(Dim(x, dim.axis), Dim(y, dim.axis))
        else:
            links.freeze(dim, f"pooled axis of {node.op_type} '{node.name}'")
        return links.out


class Pad(Operator):
    ops = ("Pad",)
    zero_kinds = {"Pad": PRESERVES}

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        rank = ctx.rank(x)
        if ctx.opset < 11:
            pads, axes = node.attr("pads"), list(range(rank))
        else:
            pads = ctx.graph.const_ints(node.input(1))
            axes = ctx.graph.const_ints(node.input(3)) if node.input(3) else list(range(rank))
        if dim.tensor not in (x, y) or pads is None or axes is None:
            links.freeze(dim, f"Pad '{node.name}' pads are not constant")
            return links.out
        axes = [a % rank for a in axes]
        padded = dim.axis in axes and (pads[axes.index(dim.axis)] or pads[axes.index(dim.axis) + len(axes)])
        if padded:
            links.freeze(dim, f"Pad '{node.name}' pads this axis")
        else:
            links.same(Dim(x, dim.axis), Dim(y, dim.axis))
        return links.out


class Resize(Operator):
    ops = ("Resize", "Upsample")
    zero_kinds = dict.fromkeys(ops, PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        if dim.tensor not in (x, y) or ctx.size(Dim(x, dim.axis)) != ctx.size(Dim(y, dim.axis)):
            links.freeze(dim, f"{node.op_type} '{node.name}' resizes this axis")
            return links.out
        if node.op_type == "Resize" and node.input(3) and node.attr("axes") is None:
            reason = rewritable(trace_vector(ctx.graph, node, 3), dim.axis)
            if reason:
                links.freeze(dim, f"Resize '{node.name}' sizes: {reason}")
                return links.out
        links.same(Dim(x, dim.axis), Dim(y, dim.axis))
        return links.out

    def rewrite(self, node, cut):
        if node.op_type != "Resize" or not node.input(3) or node.attr("axes") is not None:
            return
        y = node.outputs[0]
        for position, entry in enumerate(trace_vector(cut.graph, node, 3)):
            dim = Dim(y, position)
            if entry.kind == "literal" and cut.old_size(dim) != cut.new_size(dim):
                cut.set_const_element(*entry.source, cut.new_size(dim))


# removing a channel from a sum drops its term, which is what zeroing does;
# a mean also changes its divisor, so it is only approximately the same
_SUM_LIKE = {"ReduceSum": True, "ReduceL1": True, "ReduceL2": True, "ReduceSumSquare": True, "ReduceMean": False}
# reductions of all-zero values that are zero (not a log of a sum, not an index)
_ZERO_TO_ZERO = {
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
}


class Reduce(Operator):
    ops = (
        "ReduceSum",
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceSumSquare",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ArgMax",
        "ArgMin",
    )
    costs = {
        **dict.fromkeys(("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"), cost.per_input_element(1)),
        **dict.fromkeys(("ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"), cost.per_input_element(2)),
    }

    def _axes(self, node, ctx, rank):
        axes_in_input = (ctx.opset >= 13 and node.op_type == "ReduceSum") or ctx.opset >= 18
        if node.op_type.startswith("Arg"):
            axes = [node.attr("axis", 0)]
        elif axes_in_input and node.input(1):
            axes = ctx.graph.const_ints(node.input(1))
        else:
            axes = node.attr("axes")
        if axes is None:
            return None
        if not axes:
            return [] if node.attr("noop_with_empty_axes", 0) else list(range(rank))
        return sorted(a % rank for a in axes)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        rank = ctx.rank(x)
        axes = self._axes(node, ctx, rank)
        keepdims = node.attr("keepdims", 1)
        if axes is None or dim.tensor not in (x, y):
            links.freeze(dim, f"{node.op_type} '{node.name}' axes are not constant")
            return links.out
        if dim.tensor == y:
            if keepdims:
                x_axis = dim.axis
            else:
                kept = [a for a in range(rank) if a not in axes]
                x_axis = kept[dim.axis]
            dim = Dim(x, x_axis)
        if dim.axis not in axes:
            y_axis = dim.axis if keepdims else dim.axis - sum(a < dim.axis for a in axes)
            links.same(dim, Dim(y, y_axis))
        elif node.op_type in _SUM_LIKE:
            what = ""
            if node.op_type == "ReduceMean":
                what = norm_name(ctx.graph, node) or f"ReduceMean '{node.name}'"
            links.add(Sink((dim,), exact=_SUM_LIKE[node.op_type], what=what))
        else:
            links.freeze(dim, f"{node.op_type} '{node.name}' reduces over this axis")
        return links.out

    def soft_zero(self, node, dim, input_zero):
        # a channel kept apart (reduced over other axes): all-zero in, zero out, except where the
        # reduction of zeros is not zero (log of a sum, an index)
        return input_zero(node.inputs[0]) if node.op_type in _ZERO_TO_ZERO else False


class ShapeOf(Operator):
    """Reading a tensor's shape constrains nothing while the value only becomes other shapes, which
    follow the cut at run time; a size that becomes a float (an attention scale) must not change."""

    ops = ("Shape", "Size")

    def link(self, node, dim, ctx):
        reader = size_read_as_value(ctx.graph, node, dim.axis)
        if reader is None:
            return []
        return [
            Freeze(dim, f"{node.op_type} '{node.name}' reads this size into a value ({reader.op_type} '{reader.name}')")
        ]
