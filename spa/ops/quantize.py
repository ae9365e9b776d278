"""QuantizeLinear and DequantizeLinear: element-wise, with a scale and zero point that are either
one value or one per index of ``axis`` (per-channel), and then shrink with that axis."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from spa.core.coupling import Dim, LinkSet, pairs
from spa.formats.quantized import UNKNOWN_AXIS, block_layout, quantized_weight, scale_axis, zero_fill
from spa.ops.base import Operator

# the integer types whose zero point the soft model can write; 4-bit, 2-bit and float8 data freeze
_INTEGERS = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32}


def _integer_type(node, graph) -> int | None:
    """The element type of the op's integer side: inferred, or its zero point's, or the default uint8."""
    side = node.inputs[0] if node.op_type == "DequantizeLinear" else node.outputs[0]
    known = graph.dtypes.get(side) or graph.dtypes.get(node.input(2))
    if known is None and not node.input(2) and not node.attr("output_dtype"):
        return TensorProto.UINT8
    return known


class Dequantize(Operator):
    """y = (x - zero_point) * scale."""

    ops = ("DequantizeLinear",)
    quantized_data_inputs: tuple[int, ...] = (0,)
    not_parameter_inputs = (1, 2)  # scale and zero point

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        params = [t for t in (node.input(1), node.input(2)) if t]
        if node.attr("block_size", 0):
            return _link_blocks(node, dim, links)
        integers = _integer_type(node, ctx.graph)
        if integers not in _INTEGERS:
            name = TensorProto.DataType.Name(integers) if integers else "unknown"
            links.freeze(dim, f"{node.op_type} '{node.name}': {name.lower()} data is not supported")
            return links.out
        axis = scale_axis(ctx.graph, node)
        if axis == UNKNOWN_AXIS:
            links.freeze(dim, f"{node.op_type} '{node.name}': the shape of its scale or input is unknown")
            return links.out
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

    def seeds(self, node, ctx):
        # a block-quantized weight is the only op of its layer that knows its blocks
        if node.attr("block_size", 0) and node.op_type in Dequantize.ops and ctx.graph.is_initializer(node.inputs[0]):
            return [Dim(node.inputs[0], axis) for axis in range(ctx.rank(node.inputs[0]) or 0)]
        return []

    def is_weight_input(self, node, index):
        # its data is what the layer's magnitude is read from (dequantized, ``ModelGraph.weight``)
        return index == 0 and bool(node.attr("block_size", 0))

    def soft_zero(self, node, dim, input_zero):
        # a removed channel is at its zero point (soft fill of the data, or Q of a zero): it maps to 0
        return input_zero(node.inputs[0])

    def soft_fills(self, node, graph):
        stored = quantized_weight(graph, node.outputs[0])
        return {} if stored is None else {stored.data: zero_fill(graph, stored)}


def _link_blocks(node, dim: Dim, links: LinkSet):
    """Block-quantized: one scale and zero point per block of ``block_size`` indices along
    ``axis``. The other axes couple index for index; along ``axis`` each block of the data is one
    unit with its row of scales. The soft model zeroes the removed scales, which makes those
    weights zero whatever the integers and zero points hold, so 4-bit data prunes too."""
    ctx = links.ctx
    what = f"{node.op_type} '{node.name}' is block-quantized (block_size {node.attr('block_size')})"
    found = block_layout(ctx.graph, node)
    if isinstance(found, str):
        links.freeze(dim, f"{what}: {found}")
        return links.out
    x, y = node.inputs[0], node.outputs[0]
    if node.op_type not in Dequantize.ops or not ctx.graph.is_initializer(x):
        links.freeze(dim, f"{what}: only a stored weight's blocks are cut, not an activation's")
        return links.out
    if links.answered(node):
        return links.out
    axis, block_size = found
    params = [t for t in (node.input(1), node.input(2)) if t]
    for a in range(ctx.rank(x) or 0):
        links.same(Dim(x, a), Dim(y, a))
        if a != axis:
            for name in params:
                links.same(Dim(x, a), Dim(name, a))
            continue
        index = np.arange(ctx.size(Dim(x, a)) or 0)
        for name in params:
            links.add(pairs(Dim(x, a), Dim(name, a), index, index // block_size))
    return links.out


class Quantize(Dequantize):
    """y = saturate(round(x / scale) + zero_point)."""

    ops = ("QuantizeLinear",)
    quantized_data_inputs = ()

    def soft_fills(self, node, graph):
        # zero scales would divide by zero; a removed channel already reads zero and lands on its zero point
        scale = node.input(1)
        return {scale: None} if graph.is_initializer(scale) else {}


class MicrosoftDequantize(Dequantize):
    domain = "com.microsoft"


class MicrosoftQuantize(Quantize):
    domain = "com.microsoft"
