"""QuantizeLinear and DequantizeLinear: element-wise, with a scale and zero point that are either
one value or one per index of ``axis`` (per-channel), and then shrink with that axis."""
from __future__ import annotations

from .base import Dim, LinkSet, Rule, register


def _per_axis(node, ctx) -> int | None:
    """The axis the scale runs along, or None for one scale over the whole tensor."""
    scale_shape = ctx.graph.shape(node.input(1))
    rank = ctx.rank(node.inputs[0])
    if scale_shape is None or rank is None or (len(scale_shape) <= 1 and scale_shape in ((), (1,))):
        return None
    return node.attr("axis", 1) % rank


@register
class Dequantize(Rule):
    """y = (x - zero_point) * scale."""

    ops = ("DequantizeLinear",)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        params = [t for t in (node.input(1), node.input(2)) if t]
        if node.attr("block_size", 0):
            links.freeze(dim, f"{node.op_type} '{node.name}' is block-quantized (block_size "
                              f"{node.attr('block_size')})")
            return links.out
        axis = _per_axis(node, ctx)
        if dim.tensor in params:
            if axis is None or dim.axis != 0:
                links.freeze(dim, f"{node.op_type} '{node.name}': unexpected shape of its scale")
                return links.out
            dim = Dim(x, axis)
        links.same(dim, Dim(y if dim.tensor == x else x, dim.axis))
        if axis is not None and dim.axis == axis:
            for name in params:
                links.same(Dim(x, axis), Dim(name, 0))
        return links.out

    def soft_zero(self, node, dim, input_zero):
        # a removed channel is at its zero point (soft fill of the data, or Q of a zero): it maps to 0
        return input_zero(node.inputs[0]) or bool(input_zero(node.input(1)))

    def soft_fills(self, node, graph):
        from ..quantized import quantized_weight, zero_fill
        stored = quantized_weight(graph, node.outputs[0])
        return {} if stored is None else {stored.data: zero_fill(graph, stored)}


@register
class Quantize(Dequantize):
    """y = saturate(round(x / scale) + zero_point)."""

    ops = ("QuantizeLinear",)

    def soft_zero(self, node, dim, input_zero):
        return input_zero(node.inputs[0])

    def soft_fills(self, node, graph):
        # zero scales would divide by zero; a removed channel already reads zero and lands on its zero point
        scale = node.input(1)
        return {scale: None} if graph.is_initializer(scale) else {}


@register
class MicrosoftDequantize(Dequantize):
    domain = "com.microsoft"


@register
class MicrosoftQuantize(Quantize):
    domain = "com.microsoft"

