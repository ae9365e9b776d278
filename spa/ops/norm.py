"""Normalisations: per-channel ones are exact, ones that mix channels are not."""

from __future__ import annotations

import numpy as np

from spa.core.coupling import Dim, LinkSet, pairs
from spa.ops import cost
from spa.ops.base import PRODUCT, Operator

MS = "com.microsoft"
# LayerNorm-style moments plus 1 for the scale and 1 for a shift; RMS-style plus 1 for the scale
_LAYER_NORM_COSTS = {
    "LayerNormalization": cost.per_element(cost.MOMENTS + 1, 2),
    "SimplifiedLayerNormalization": cost.per_element(cost.RMS + 1),
    "RMSNormalization": cost.per_element(cost.RMS + 1),
}


class BatchNorm(Operator):
    """Y = scale * (X - mean) / sqrt(var + eps) + B, per channel (axis 1)."""

    ops = ("BatchNormalization", "InstanceNormalization")
    weight_inputs = (1,)
    costs = {
        "BatchNormalization": cost.per_element(2, channel_scales=True),  # folded scale and shift
        "InstanceNormalization": cost.per_element(cost.MOMENTS + 2, channel_scales=True),
    }
    zero_kinds = dict.fromkeys(ops, PRODUCT)

    def seeds(self, node, ctx):
        return [Dim(node.inputs[0], 1)]

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        if dim.tensor in (x, y) and dim.axis != 1:
            if dim.axis == 0:
                links.same(Dim(x, 0), Dim(y, 0))
            else:
                links.freeze(dim, f"statistics axis of {node.op_type} '{node.name}'")
            return links.out
        channel = Dim(x, 1)
        links.same(channel, Dim(y, 1))
        for name in list(node.inputs[1:]) + list(node.outputs[1:]):  # params and running stats
            if name:
                links.same(channel, Dim(name, 0))
        return links.out


class GroupNorm(Operator):
    """Statistics are per group of channels, so only whole groups can go exactly."""

    ops = ("GroupNormalization",)
    weight_inputs = (1,)
    costs = {"GroupNormalization": cost.per_element(cost.MOMENTS + 2, channel_scales=True)}

    def seeds(self, node, ctx):
        return [Dim(node.inputs[0], 1)]

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, scale, bias, y = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
        channels, groups = ctx.size(Dim(x, 1)), int(node.attr("num_groups"))
        if dim.tensor in (x, y) and dim.axis != 1:
            if dim.axis == 0:
                links.same(Dim(x, 0), Dim(y, 0))
            else:
                links.freeze(dim, f"statistics axis of GroupNormalization '{node.name}'")
            return links.out
        if channels is None:
            links.freeze(dim, f"channel count of GroupNormalization '{node.name}' unknown")
            return links.out
        per_group = channels // groups
        index = np.arange(channels)
        x_c = Dim(x, 1)
        links.same(x_c, Dim(y, 1))
        links.add(pairs(x_c, x_c, index, index - index % per_group))  # a group is one unit
        for param in (scale, bias):
            if ctx.size(Dim(param, 0)) == channels:  # opset 21: per channel
                links.same(x_c, Dim(param, 0))
            else:  # opset 18: per group
                links.add(pairs(x_c, Dim(param, 0), index, index // per_group))
        return links.out

    def rewrite(self, node, cut):
        x_c = Dim(node.inputs[0], 1)
        old, new = cut.old_size(x_c), cut.new_size(x_c)
        if old != new:
            per_group = old // int(node.attr("num_groups"))
            cut.set_attr(node, "num_groups", new // per_group)


class LayerNorm(Operator):
    """Normalises over axes [axis, rank): those channels are coupled approximately."""

    ops = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
    costs = _LAYER_NORM_COSTS

    def weight_inputs_of(self, op_type):
        return (1,) if op_type == "LayerNormalization" else ()

    def seeds(self, node, ctx):
        return []  # hidden-size groups are approximate; they are reached, not offered

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x = node.inputs[0]
        rank = ctx.rank(x)
        start = int(node.attr("axis", -1)) % rank
        outputs = [o for o in node.outputs if o]
        y = outputs[0]
        if dim.tensor in (x, y) and dim.axis < start:
            links.same(Dim(x, dim.axis), Dim(y, dim.axis))
            for stat in outputs[1:]:  # Mean and InvStdDev keep the leading axes
                links.same(Dim(x, dim.axis), Dim(stat, dim.axis))
            return links.out
        if dim.tensor in outputs[1:]:
            links.freeze(dim, f"statistics output of {node.op_type} '{node.name}'")
            return links.out
        axis = dim.axis if dim.tensor in (x, y) else dim.axis + start  # params cover [start, rank)
        links.same(Dim(x, axis), Dim(y, axis), exact=False)
        for param in node.inputs[1:]:
            if param and ctx.rank(param):
                param_axis = axis - (rank - ctx.rank(param))
                if param_axis >= 0:
                    links.same(Dim(x, axis), Dim(param, param_axis), exact=False)
        return links.out


class MicrosoftLayerNorm(LayerNorm):
    """The same norms in onnxruntime's domain: exporters put onnxruntime's own norms in either
    domain, and the op means the same in both."""

    domain = MS


class MeanVarianceNorm(Operator):
    """(x - mean) / std over the given axes: counted, not coupled."""

    ops = ("MeanVarianceNormalization",)
    couples = False
    costs = {"MeanVarianceNormalization": cost.per_element(cost.MOMENTS)}
