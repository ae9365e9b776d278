"""onnxruntime's MatMulNBits: A [..., K] times a [K, N] weight stored block-quantized to 2, 4 or 8
bits (``spa.formats.nbits`` holds the storage format).

Output channels (N) are rows of the packed weight, of its scales and zero points and of the bias,
so they go one by one. Input channels (K) share a scale and zero point with the rest of their
block and are packed with them, so they go a whole block at a time: the K channels of one block
are one unit, and grouping makes whatever they couple with follow suit.

The soft model zeroes the scales of the removed rows and blocks, which makes their dequantized
weights exactly zero whatever the packed values and zero points hold.
"""

from __future__ import annotations

import math

import numpy as np

from spa.core.coupling import Dim, LinkSet, Sink, pairs
from spa.core.graph import ModelGraph, Node
from spa.formats import nbits
from spa.ops import cost
from spa.ops.base import PRODUCT, Operator
from spa.ops.linear_view import BlockLayer, added_bias, owned

_B, _SCALES, _ZERO_POINTS, _G_IDX, _BIAS = 1, 2, 3, 4, 5


def _flops(graph: ModelGraph, node: Node) -> int:
    a, y = cost.input_shape(graph, node, 0), cost.output_shape(graph, node)
    if a is None or y is None or not a:
        return 0
    outputs = cost.numel(y)
    return 2 * outputs * cost.size(a[-1]) + (outputs if node.input(_BIAS) else 0)


class MatMulNBits(Operator):
    ops = (nbits.OP_TYPE,)
    domain = nbits.DOMAIN
    layer_kind = "dense"
    weight_inputs = (_B,)
    bias_input = _BIAS
    quantized_data_inputs = (_B,)
    not_parameter_inputs = (_SCALES, _ZERO_POINTS, _G_IDX)
    costs = {nbits.OP_TYPE: _flops}
    zero_kinds = {nbits.OP_TYPE: PRODUCT}

    def parameter_elements(self, node, index, dims):
        if index != _B or len(dims) != 3:
            return super().parameter_elements(node, index, dims)
        k, n = node.attr("K"), node.attr("N")
        if k is None or n is None:  # the values packed in each byte, the last block's padding too
            return math.prod(dims) * (8 // int(node.attr("bits", 4)))
        return int(k) * int(n)  # not the padding of a last block shorter than the others

    def weight_side(self, node, index, axis):
        if index != _B:
            return None
        return {0: "out", 1: "in"}.get(axis)

    def layer_widths(self, graph, node):
        shape = nbits.layout(graph, node)
        return (shape.k, shape.n) if isinstance(shape, nbits.BlockLayout) else None

    def linear(self, graph, node):
        a, b = node.inputs[0], node.inputs[_B]
        found = nbits.packed_weight(graph, b)
        a_shape = graph.shape(a)
        if found is None or node.input(_G_IDX) or graph.is_initializer(a) or not a_shape or len(a_shape) < 2:
            return None
        shape = found[1]
        own_bias = node.input(_BIAS)
        bias = own_bias if owned(graph, own_bias) else added_bias(graph, node.outputs[0], shape.n, -1)
        return BlockLayer(
            node,
            b,
            1,
            Dim(a, len(a_shape) - 1),
            bias,
            feeds_residual=True,
            bias_added=bias is not None and bias != own_bias,
            channels=shape.k,
            block_size=shape.block_size,
        )

    def seeds(self, node, ctx):
        return [Dim(node.inputs[_B], 0), Dim(node.inputs[_B], 1)]

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        a, b, y = node.inputs[0], node.inputs[_B], node.outputs[0]
        ra, ry = ctx.rank(a), ctx.rank(y)
        shape = nbits.layout(ctx.graph, node)
        what = f"MatMulNBits '{node.name}'"
        if ra is None or ry is None or ra != ry:
            links.freeze(dim, f"rank unknown around {what}")
            return links.out
        if not isinstance(shape, nbits.BlockLayout):
            links.freeze(dim, f"{what}: {shape}")
            return links.out
        computed = [t for t in node.inputs[_B : _ZERO_POINTS + 1] if t and not ctx.graph.is_initializer(t)]
        if computed:
            links.freeze(dim, f"{what}: {computed[0]} is computed at run time, not stored")
            return links.out
        if dim == Dim(b, 2):
            links.freeze(dim, f"{what}: the values packed in one quantization block")
            return links.out
        if dim.tensor == node.input(_ZERO_POINTS) or dim.tensor == node.input(_G_IDX):
            links.freeze(dim, f"{what}: its zero points and g_idx are rewritten with the weight, not cut alone")
            return links.out
        if links.answered(node):
            return links.out
        scales, rows = node.input(_SCALES), Dim(b, 0)
        links.same(rows, Dim(y, ry - 1))
        links.same(rows, Dim(scales, 0))
        if node.input(_BIAS):
            links.same(rows, Dim(node.input(_BIAS), 0))
        for axis in range(ra - 1):
            links.same(Dim(a, axis), Dim(y, axis))
        self._link_input_channels(links, node, Dim(a, ra - 1), shape, what)
        return links.out

    def _link_input_channels(
        self, links: LinkSet, node: Node, channels: Dim, shape: nbits.BlockLayout, what: str
    ) -> None:
        b, scales = node.inputs[_B], node.input(_SCALES)
        if links.ctx.size(channels) != shape.k:
            links.freeze(channels, f"{what}: input of {links.ctx.size(channels)} channels, K is {shape.k}")
            return
        if node.input(_G_IDX):
            # act-order: the blocks hold channels from anywhere along K, found only through g_idx
            links.freeze(channels, f"{what}: its g_idx assigns input channels to quantization blocks out of order")
            return
        index = np.arange(shape.k)
        links.add(pairs(channels, Dim(b, 1), index, index // shape.block_size))
        links.add(pairs(channels, Dim(scales, 1), index, index // shape.block_size))
        links.add(Sink((channels, Dim(b, 1), Dim(scales, 1))))

    def rewrite(self, node, cut):
        shape = nbits.layout(cut.graph, node)
        if not isinstance(shape, nbits.BlockLayout):
            return
        rows = cut.kept(Dim(node.inputs[_B], 0))
        blocks = cut.kept(Dim(node.inputs[_B], 1))
        if rows is None and blocks is None:
            return
        if rows is not None:
            cut.set_attr(node, "N", len(rows))
        if blocks is not None:
            cut.set_attr(node, "K", cut.new_size(Dim(node.inputs[0], cut.rank(node.inputs[0]) - 1)))
        zero_points = node.input(_ZERO_POINTS)
        value = cut.graph.const(zero_points) if zero_points else None
        if value is not None:
            all_rows, all_blocks = np.arange(shape.n), np.arange(shape.blocks)
            kept_rows = all_rows if rows is None else rows
            kept_blocks = all_blocks if blocks is None else blocks
            cut.set_input_const(node, _ZERO_POINTS, nbits.cut_zero_points(value, shape, kept_rows, kept_blocks))
