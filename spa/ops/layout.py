"""Ops that move channels around without weights: concat, split, slice,
gather, transpose, pixel shuffle, tile, expand and constant fills."""

from __future__ import annotations

from itertools import chain

import numpy as np
from onnx import numpy_helper

from spa.core.coupling import Dim, LinkSet, offset, pairs
from spa.ops.base import PRESERVES, Operator
from spa.patterns.shapes import rewritable, static_value, trace_vector


def _others_same_axis(links: LinkSet, node, dim: Dim, tensors) -> None:
    """``tensors`` is lazy: with N of them, the N - 1 asks that are already coupled cost nothing."""
    key = ("coupled", node.index, dim.axis)
    if not links.coupled(dim, key):
        links.same_all(dim, [Dim(name, dim.axis) for name in tensors if name and name != dim.tensor], key)


class Concat(Operator):
    """Input k occupies [offset_k, offset_k + size_k) of the output's concat axis."""

    ops = ("Concat",)
    zero_kinds = dict.fromkeys(ops, PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        y = node.outputs[0]
        axis = node.attr("axis") % ctx.rank(y)
        if dim.axis != axis:
            _others_same_axis(links, node, dim, chain(node.inputs, [y]))
            return links.out
        key = ("concat sizes", node.index)
        if key not in ctx.memo:  # read once: each of N inputs asks
            sizes = [ctx.size(Dim(x, axis)) for x in node.inputs]
            ctx.memo[key] = None if any(s is None for s in sizes) else sizes
        sizes = ctx.memo[key]
        if sizes is None:
            links.freeze(dim, f"Concat '{node.name}' has an input of unknown size")
            return links.out
        if links.answered(node):
            return links.out
        start = 0
        for x, size in zip(node.inputs, sizes):
            if size:
                links.add(offset(Dim(x, axis), Dim(y, axis), size, start))
            start += size
        return links.out


def _split_sizes(node, ctx, total: int) -> list[int] | None:
    if ctx.opset >= 13 and node.input(1):
        return ctx.graph.const_ints(node.input(1))
    if node.attr("split") is not None:
        return list(node.attr("split"))
    parts = node.attr("num_outputs", len(node.outputs))
    chunk = -(-total // parts)
    return [min(chunk, total - k * chunk) for k in range(parts)]


class Split(Operator):
    ops = ("Split",)
    zero_kinds = dict.fromkeys(ops, PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x = node.inputs[0]
        axis = node.attr("axis", 0) % ctx.rank(x)
        if dim.tensor != x and dim.tensor not in node.output_names:
            links.freeze(dim, f"split sizes of Split '{node.name}'")
            return links.out
        if dim.axis != axis:
            _others_same_axis(links, node, dim, chain([x], node.outputs))
            return links.out
        key = ("split sizes", node.index)
        if key not in ctx.memo:  # read once: each of N outputs asks
            total = ctx.size(Dim(x, axis))
            ctx.memo[key] = _split_sizes(node, ctx, total) if total else None
        sizes = ctx.memo[key]
        if sizes is None:
            links.freeze(dim, f"Split '{node.name}' sizes are not constant")
            return links.out
        if links.answered(node):
            return links.out
        start = 0
        for y, size in zip(node.outputs, sizes):
            if y and size:
                links.add(offset(Dim(y, axis), Dim(x, axis), size, start))
            start += size
        return links.out

    def rewrite(self, node, cut):
        x = node.inputs[0]
        axis = node.attr("axis", 0) % len(cut.graph.shape(x))
        new = [cut.new_size(Dim(y, axis)) for y in node.outputs]
        old = [cut.old_size(Dim(y, axis)) for y in node.outputs]
        if new == old:
            return
        if cut.opset >= 13:
            cut.set_input_const(node, 1, np.array(new, dtype=np.int64))
            cut.remove_attr(node, "num_outputs")
        else:
            cut.set_attr(node, "split", new)


def _slice_params(node, ctx):
    """(starts, ends, axes, steps) as int lists, or None if they cannot be known.

    The legacy exporter computes torch.chunk bounds at run time from Shape;
    on a static axis, one missing bound follows from the other and the
    output size, and the rewrite then stores both as constants.
    """
    rank = ctx.rank(node.inputs[0])
    if ctx.opset < 10:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes = node.attr("axes", list(range(len(starts))))
        return list(starts), list(ends), [a % rank for a in axes], [1] * len(starts)
    const = ctx.graph.const_ints
    starts = const(node.input(1)) or static_value(ctx.graph, node.input(1))
    ends = const(node.input(2)) or static_value(ctx.graph, node.input(2))
    axes = const(node.input(3)) if node.input(3) else list(range(len(starts or ends or [0])))
    steps = const(node.input(4)) if node.input(4) else [1] * len(axes or [])
    if axes is None or steps is None or (starts is None and ends is None):
        return None
    axes = [a % rank for a in axes]
    if starts is None or ends is None:
        if len(axes) != 1 or steps != [1]:
            return None
        size = ctx.graph.static_size(node.inputs[0], axes[0])
        length = ctx.graph.static_size(node.outputs[0], axes[0])
        if size is None or length is None:
            return None
        if starts is None:
            stop = slice(0, ends[0]).indices(size)[1]
            starts = [stop - length]
        else:
            start = slice(starts[0], None).indices(size)[0]
            ends = [start + length]
    return list(starts), list(ends), axes, list(steps)


class Slice(Operator):
    ops = ("Slice",)
    zero_kinds = dict.fromkeys(ops, PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        if dim.tensor not in (x, y):
            links.freeze(dim, f"bounds of Slice '{node.name}'")
            return links.out
        params = _slice_params(node, ctx)
        if params is None:
            links.freeze(dim, f"Slice '{node.name}' bounds are not constant")
            return links.out
        starts, ends, axes, steps = params
        if dim.axis not in axes:
            links.same(Dim(x, dim.axis), Dim(y, dim.axis))
            return links.out
        k = axes.index(dim.axis)
        size = ctx.size(Dim(x, dim.axis))
        if size is None or steps[k] != 1:
            links.freeze(dim, f"Slice '{node.name}' with step {steps[k]} or unknown size")
            return links.out
        start, stop, _ = slice(starts[k], ends[k]).indices(size)
        if stop > start:
            links.add(offset(Dim(y, dim.axis), Dim(x, dim.axis), stop - start, start))
        return links.out

    def rewrite(self, node, cut):
        starts, ends, axes, steps = _slice_params(node, cut)
        x = node.inputs[0]
        changed = False
        for k, axis in enumerate(axes):
            keep = cut.kept(Dim(x, axis))
            if keep is None:
                continue
            size = cut.old_size(Dim(x, axis))
            start, stop, _ = slice(starts[k], ends[k]).indices(size)
            starts[k] = int(np.searchsorted(keep, start))
            ends[k] = int(np.searchsorted(keep, stop))
            changed = True
        if not changed:
            return
        if cut.opset < 10:
            cut.set_attr(node, "starts", starts)
            cut.set_attr(node, "ends", ends)
        else:
            cut.set_input_const(node, 1, np.array(starts, dtype=np.int64))
            cut.set_input_const(node, 2, np.array(ends, dtype=np.int64))


class Transpose(Operator):
    ops = ("Transpose",)
    zero_kinds = dict.fromkeys(ops, PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        perm = node.attr("perm") or list(reversed(range(ctx.rank(x))))
        if dim.tensor == x:
            links.same(dim, Dim(y, perm.index(dim.axis)))
        else:
            links.same(dim, Dim(x, perm[dim.axis]))
        return links.out


class PixelShuffle(Operator):
    """DepthToSpace/SpaceToDepth: channel c of the deep side is (c, sub-pixel) of the shallow side."""

    ops = ("DepthToSpace", "SpaceToDepth")
    zero_kinds = dict.fromkeys(ops, PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        deep, shallow = (x, y) if node.op_type == "DepthToSpace" else (y, x)
        if dim.axis == 0:
            links.same(Dim(x, 0), Dim(y, 0))
            return links.out
        if dim.axis != 1:
            links.freeze(dim, f"spatial axis of {node.op_type} '{node.name}'")
            return links.out
        r2 = node.attr("blocksize") ** 2
        channels = ctx.size(Dim(shallow, 1))
        deep_index = np.arange(channels * r2)
        # DCR (and SpaceToDepth): depth = (sub-pixel, c); CRD: depth = (c, sub-pixel)
        if node.attr("mode", "DCR") == "CRD":
            shallow_index = deep_index // r2
        else:
            shallow_index = deep_index % channels
        links.add(pairs(Dim(deep, 1), Dim(shallow, 1), deep_index, shallow_index))
        return links.out


class Tile(Operator):
    ops = ("Tile",)
    zero_kinds = dict.fromkeys(ops, PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        repeats = ctx.graph.const_ints(node.input(1))
        if dim.tensor not in (x, y) or repeats is None or repeats[dim.axis] != 1:
            links.freeze(dim, f"Tile '{node.name}' repeats this axis")
        else:
            links.same(Dim(x, dim.axis), Dim(y, dim.axis))
        return links.out


class Expand(Operator):
    ops = ("Expand",)
    zero_kinds = dict.fromkeys(ops, PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        if dim.tensor not in (x, y):
            links.freeze(dim, f"shape operand of Expand '{node.name}'")
            return links.out
        shift = ctx.rank(y) - ctx.rank(x)
        x_axis = dim.axis if dim.tensor == x else dim.axis - shift
        entries = trace_vector(ctx.graph, node, 1)
        position = x_axis + shift - (ctx.rank(y) - len(entries)) if entries else 0
        if x_axis < 0 or ctx.size(Dim(x, x_axis)) != ctx.size(Dim(y, x_axis + shift)):
            if dim.tensor == y and _literal(entries, position):
                return links.out  # copies of one value (a mask expanded to every head): any of them can go
            links.freeze(dim, f"Expand '{node.name}' broadcasts along this axis")
            return links.out
        reason = rewritable(entries, position)
        if reason:
            links.freeze(dim, f"Expand '{node.name}' shape: {reason}")
        else:
            links.same(Dim(x, x_axis), Dim(y, x_axis + shift))
        return links.out

    def rewrite(self, node, cut):
        y = node.outputs[0]
        entries = trace_vector(cut.graph, node, 1)
        lead = len(cut.graph.shape(y)) - len(entries)
        x_shape = cut.graph.shape(node.inputs[0])
        for position, entry in enumerate(entries):
            dim = Dim(y, position + lead)
            if entry.kind == "literal" and entry.value > 1 and cut.old_size(dim) != cut.new_size(dim):
                x_axis = position + lead - (len(cut.graph.shape(y)) - len(x_shape))
                broadcast = x_axis < 0 or x_shape[x_axis] == 1
                # a broadcast axis takes its new size; elsewhere 1 keeps whatever size the input has
                cut.set_const_element(*entry.source, cut.new_size(dim) if broadcast else 1)


class ConstantOfShape(Operator):
    """A fill (exporters build zero initial states of recurrent layers this way): no input
    channel reaches its axes, so any index can go where its shape element is a literal to
    rewrite, or the run-time size of another tensor's axis (``zeros_like``), which is then
    coupled to it so that both shrink alike."""

    ops = ("ConstantOfShape",)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        if dim.tensor != node.outputs[0]:
            links.freeze(dim, f"shape operand of ConstantOfShape '{node.name}'")
            return links.out
        entries = trace_vector(ctx.graph, node, 0)
        reason = rewritable(entries, dim.axis)
        if reason is None and entries[dim.axis].kind == "runtime":
            source = entries[dim.axis].source
            if len(source) == 2:
                links.same(dim, Dim(*source))
            else:
                reason = "its size is computed at run time from other sizes"
        if reason:
            links.freeze(dim, f"ConstantOfShape '{node.name}' shape: {reason}")
        return links.out

    def rewrite(self, node, cut):
        y = node.outputs[0]
        for axis, entry in enumerate(trace_vector(cut.graph, node, 0) or ()):
            dim = Dim(y, axis)
            if entry.kind == "literal" and cut.old_size(dim) != cut.new_size(dim):
                cut.set_const_element(*entry.source, cut.new_size(dim))

    def soft_zero(self, node, dim, input_zero):
        value = node.attr("value")  # absent: a float zero
        return value is None or not np.any(numpy_helper.to_array(value))


def _literal(entries, position) -> bool:
    return (
        entries is not None
        and 0 <= position < len(entries)
        and entries[position].kind == "literal"
        and (entries[position].value > 1)
    )
