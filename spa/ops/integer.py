"""Dynamic quantization's integer ops, as onnxruntime's ``quantize_dynamic`` writes them:
DynamicQuantizeLinear turns a float activation into uint8 with one scale and zero point for the
whole tensor, and MatMulInteger and ConvInteger multiply it by an integer weight, each operand
less its zero point. The weight's scale is applied after them, by a float Mul.

A removed channel of the soft model must read as its zero point on both operands, so that it
contributes nothing to the integer sum: the activation's (a zero input quantizes to it) and the
weight's (the soft fill)."""

from __future__ import annotations

import numpy as np

from spa.core.coupling import Dim, LinkSet, Sink
from spa.core.graph import ModelGraph, Node
from spa.formats.quantized import quantized_weight, rescaling, scale_factors
from spa.ops import cost
from spa.ops.base import Operator
from spa.ops.conv import _ConvBase
from spa.ops.linear import MatMul
from spa.ops.linear_view import LinearLayer, added_bias, is_static


class DynamicQuantize(Operator):
    """y = saturate(round(x / scale) + zero_point), scale and zero point from min(0, x) .. max(0, x)."""

    ops = ("DynamicQuantizeLinear",)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        if dim.tensor not in (x, y):
            links.freeze(dim, f"DynamicQuantizeLinear '{node.name}' makes this a scalar")
            return links.out
        links.same(Dim(x, dim.axis), Dim(y, dim.axis))
        # the range covers the whole tensor and always 0: a removed channel that reads zero leaves it
        # where the pruned model puts it, any other value may have set it
        links.add(Sink((Dim(x, dim.axis),), what=f"DynamicQuantizeLinear '{node.name}'"))
        return links.out

    def soft_zero(self, node, dim, input_zero):
        # zero quantizes to the zero point, which the integer ops subtract: it stands for zero
        return input_zero(node.inputs[0])


def _zero_point_fill(graph, weight: str, zero_point: str, channel_axis: int) -> dict:
    """Removed weight slices hold the weight's zero point (uint8 weights sit at 128, say) and the
    zero point itself keeps its dense values, so they contribute exactly nothing."""
    if not graph.is_initializer(weight):
        return {}
    if not zero_point or not graph.is_initializer(zero_point):
        return {}  # a zero point of 0: the default fill
    value = np.asarray(graph.const(zero_point))
    shape = [1] * len(graph.shape(weight) or ())
    if value.size > 1:
        shape[channel_axis] = value.size
    return {weight: value.reshape(shape if value.size > 1 else ()), zero_point: None}


def _operand_fills(node, graph, weight_axis: int) -> dict:
    """Zero-point fills for both operands: the weight, and a left operand that is a constant."""
    fills = _zero_point_fill(graph, node.inputs[1], node.input(3), weight_axis)
    left_rank = len(graph.shape(node.inputs[0]) or (0, 0))
    fills.update(_zero_point_fill(graph, node.inputs[0], node.input(2), max(left_rank - 2, 0)))
    return fills


def _freeze_unknown_fills(links: LinkSet, node, what: str) -> None:
    """A constant operand whose zero point is computed at run time: the soft model could not write
    it into removed slices, and zero is not it."""
    graph = links.ctx.graph
    for operand, zero_point in ((node.inputs[0], node.input(2)), (node.inputs[1], node.input(3))):
        if graph.is_initializer(operand) and zero_point and not graph.is_initializer(zero_point):
            for axis in range(len(graph.shape(operand) or ())):
                links.freeze(Dim(operand, axis), f"{what}: the zero point of {operand} is not a constant")


def _per_channel_zero_point(links: LinkSet, zero_point: str, channels: Dim, what: str) -> None:
    """A zero point is one value, or one per index of ``channels``."""
    if not zero_point:
        return
    shape = links.ctx.graph.shape(zero_point)
    if shape is None or len(shape) > 1:
        links.freeze(channels, f"{what}: zero point of shape {shape}")
    elif shape and shape[0] != 1:
        links.same(channels, Dim(zero_point, 0))


class MatMulInteger(MatMul):
    """MatMul of (A - a_zero_point) and (B - b_zero_point); b's zero point may be per column."""

    ops = ("MatMulInteger",)
    costs = {"MatMulInteger": cost.matmul(1)}
    weight_inputs = (1,)
    quantized_data_inputs = (0, 1)
    not_parameter_inputs = (2, 3)  # zero points

    def linear(self, graph, node):
        return _integer_linear(graph, node)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx, list(super().link(node, dim, ctx)))
        a, b = node.inputs[0], node.inputs[1]
        ra, rb = ctx.rank(a), ctx.rank(b)
        if ra is None or rb is None:
            return links.out
        what = f"MatMulInteger '{node.name}'"
        _freeze_unknown_fills(links, node, what)
        _per_channel_zero_point(links, node.input(3), Dim(b, rb - 1), what)
        # a's zero point is one value, or one per row of A: rows are never channels, and K never has one
        a_zero = node.input(2)
        if a_zero and (ctx.graph.shape(a_zero) is None or len(ctx.graph.shape(a_zero)) > 1):
            links.freeze(Dim(a, ra - 1), f"{what}: zero point of A of shape {ctx.graph.shape(a_zero)}")
        return links.out

    def soft_zero(self, node, dim, input_zero):
        status = [input_zero(t) for t in node.inputs[:2]]
        return any(s for s in status if s is not None)

    def soft_fills(self, node, graph):
        return _operand_fills(node, graph, len(graph.shape(node.inputs[1]) or (0, 0)) - 1)


class ConvInteger(_ConvBase):
    """Conv of (x - x_zero_point) and (w - w_zero_point), no bias; w's zero point may be per
    output channel."""

    ops = ("ConvInteger",)
    costs = {"ConvInteger": cost.convolution(1, None)}
    quantized_data_inputs = (1,)
    not_parameter_inputs = (2, 3)  # zero points

    def linear(self, graph, node):
        return _integer_linear(graph, node)

    def bias(self, node) -> str:
        return ""

    def link(self, node, dim, ctx):
        links = LinkSet(ctx, list(super().link(node, dim, ctx)))
        what = f"ConvInteger '{node.name}'"
        _freeze_unknown_fills(links, node, what)
        _per_channel_zero_point(links, node.input(3), Dim(node.outputs[0], 1), what)
        x_zero = node.input(2)
        if x_zero and (ctx.graph.shape(x_zero) is None or int(np.prod(ctx.graph.shape(x_zero))) != 1):
            links.freeze(Dim(node.inputs[0], 1), f"{what}: zero point of x of shape {ctx.graph.shape(x_zero)}")
        return links.out

    def soft_zero(self, node, dim, input_zero):
        status = [input_zero(t) for t in node.inputs[:2]]
        return any(s for s in status if s is not None)

    def soft_fills(self, node, graph):
        return _operand_fills(node, graph, 0)


def _integer_linear(graph: ModelGraph, node: Node) -> LinearLayer | None:
    """A MatMulInteger or ConvInteger by its own weight on an activation DynamicQuantizeLinear
    quantized: the float layer it computes, from the float activation to the rescaled output."""
    w = node.inputs[1]
    quantizer = graph.producer.get(node.inputs[0])
    if quantizer is None or quantizer.op_type not in DynamicQuantize.ops or quantized_weight(graph, w) is None:
        return None
    # a weight that is not an integer initializer (a float one, from a DequantizeLinear, is
    # malformed input onnxruntime refuses) may have neither rescaling factors nor a shape
    factors = scale_factors(graph, node)
    if factors is None or factors[1] != quantizer.outputs[1]:
        return None  # the output is not rescaled by this activation's scale: not W x in float
    x, w_shape = quantizer.inputs[0], graph.shape(w)
    x_shape = graph.shape(x)
    if not x_shape or len(x_shape) < 2 or not w_shape or not is_static(w_shape):
        return None
    output = rescaling(graph, node).outputs[0]
    if node.op_type in ConvInteger.ops:
        if node.attr("group", 1) != 1:
            return None
        return LinearLayer(node, w, 1, Dim(x, 1), added_bias(graph, output, w_shape[0], 1), convolution=True)
    return LinearLayer(node, w, 0, Dim(x, len(x_shape) - 1), added_bias(graph, output, w_shape[1], -1))
