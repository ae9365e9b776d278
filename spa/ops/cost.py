"""Sizes and the cost formulas several operator families share (conventions: ``spa.reporting.metrics``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from spa.core.graph import ModelGraph, Node
from spa.ops.base import CostFn

SOFTMAX = 5  # max, subtract, exp, sum, divide
MOMENTS = 5  # mean 1, centre 1, variance (square, sum) 2, normalise 1
RMS = 3  # square, sum, normalise
GELU = 5  # x/sqrt(2), erf, +1, *x, *0.5
GELU_TANH = 9  # x^3 (2), *0.044715, +x, *sqrt(2/pi), tanh, +1, *x, *0.5


def size(dim) -> int:
    return dim if isinstance(dim, int) and dim > 0 else 1


def numel(shape: Sequence) -> int:
    return math.prod(size(d) for d in shape)


def broadcast_numel(*shapes: Sequence) -> int:
    """Elements of the numpy broadcast of ``shapes``."""
    rank = max(map(len, shapes), default=0)
    padded = [(1,) * (rank - len(s)) + tuple(size(d) for d in s) for s in shapes]
    return math.prod(max(column) for column in zip(*padded))


def input_shape(graph: ModelGraph, node: Node, slot: int):
    name = node.input(slot)
    return graph.shape(name) if name else None


def output_shape(graph: ModelGraph, node: Node):
    return graph.shape(node.outputs[0]) if node.outputs and node.outputs[0] else None


def elements(graph: ModelGraph, node: Node, channel_scales: bool = False) -> int:
    """Output elements of an element-wise op or a norm; where the output's shape was not inferred
    (contrib ops onnxruntime's inference skips), those of the broadcast of its inputs.
    ``channel_scales``: the op's per-channel scales sit on axis 1 and do not broadcast from the right."""
    shape = output_shape(graph, node)
    if shape is not None:
        return numel(shape)
    slots = [0] if channel_scales else [i for i in range(len(node.inputs)) if node.input(i)]
    shapes = [input_shape(graph, node, i) for i in slots]
    return 0 if not shapes or any(s is None for s in shapes) else broadcast_numel(*shapes)


def per_element(base: int, *optional_slots: int, channel_scales: bool = False) -> CostFn:
    """``base`` FLOPs per output element, plus one per optional input present (a bias or shift)."""

    def cost(graph: ModelGraph, node: Node) -> int:
        present = sum(1 for slot in optional_slots if node.input(slot))
        return elements(graph, node, channel_scales) * (base + present)

    return cost


def variadic(extra: int) -> CostFn:
    """n - 1 combining FLOPs per output element for n inputs, plus ``extra`` (Mean's divide)."""

    def cost(graph: ModelGraph, node: Node) -> int:
        return elements(graph, node) * (len([i for i in node.inputs if i]) - 1 + extra)

    return cost


def per_input_element(k: int) -> CostFn:
    def cost(graph: ModelGraph, node: Node) -> int:
        x = input_shape(graph, node, 0)
        return 0 if x is None else k * numel(x)

    return cost


def window(graph: ModelGraph, node: Node) -> int:
    y = output_shape(graph, node)
    return 0 if y is None else numel(y) * numel(node.attr("kernel_shape", []))


def gelu(graph: ModelGraph, node: Node) -> int:
    return elements(graph, node) * (GELU_TANH if node.attr("approximate", "none") == "tanh" else GELU)


def convolution(w_slot: int, bias_slot: int | None) -> CostFn:
    """A Conv whose weight is at ``w_slot`` (``[M, C/group, k...]``) and bias at ``bias_slot``."""

    def cost(graph: ModelGraph, node: Node) -> int:
        y, w = output_shape(graph, node), input_shape(graph, node, w_slot)
        if y is None or w is None or len(w) < 2:
            return 0
        # every output element meets C/group input channels times the kernel;
        # strides, dilations and pads act through the inferred output shape
        out = numel(y)
        bias = out if bias_slot is not None and node.input(bias_slot) else 0
        return 2 * out * numel(w[1:]) + bias

    return cost


def matmul(b_slot: int) -> CostFn:
    """A (batched) MatMul of input 0 by the input at ``b_slot``."""

    def cost(graph: ModelGraph, node: Node) -> int:
        a, b = input_shape(graph, node, 0), input_shape(graph, node, b_slot)
        if not a or not b:
            return 0
        m = a[-2] if len(a) > 1 else 1
        n = b[-1] if len(b) > 1 else 1
        return 2 * broadcast_numel(a[:-2], b[:-2]) * size(m) * size(n) * size(a[-1])

    return cost


def attention_core(b: int, heads: int, s: int, length: int, d_qk: int, d_v: int) -> int:
    """Q K^T, a scale and a softmax per score, then the scores times V; widths over all heads."""
    return 2 * b * s * length * d_qk + (1 + SOFTMAX) * b * heads * s * length + 2 * b * s * length * d_v


def past_length(shape, axis: int) -> int:
    """The sequence length of a KV cache input (0 without one)."""
    return size(shape[axis]) if shape is not None and len(shape) > axis else 0
