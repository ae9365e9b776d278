"""com.microsoft FusedConv: a Conv with its activation (and optionally a sum) fused in, as onnxruntime
saves a graph optimized at the extended level: ``Y = activation(Conv(X, W, B) + Z)``.

The convolution couples, costs and refits as a Conv does (its code is shared). The activation only
decides whether a removed output channel stays zero in the soft model: ``activation(0)`` must be 0
(Relu, LeakyRelu, Tanh, a Clip whose range holds 0), not Sigmoid's 0.5.

The linear view is the Conv's: compensation refits ``W x + b`` to the dense layer's ``W x + b``,
before any activation, for a FusedConv exactly as for a Conv followed by its activation node, so the
fused and unfused forms of a model prune to the same weights.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

from spa.core.coupling import Dim, LinkSet
from spa.ops import cost
from spa.ops.conv import Conv, conv_linear

MS = "com.microsoft"
_CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def activation_at_zero(node) -> float | None:
    """``activation(0)`` for the activations onnxruntime fuses; None for one spa does not know."""
    name = _text(node.attr("activation"))
    params = list(node.attr("activation_params") or [])
    if name in ("Relu", "LeakyRelu", "Tanh"):
        return 0.0
    if name == "Sigmoid":
        return 0.5
    if name == "Clip":
        low, high = (params + [-math.inf, math.inf][len(params) :])[:2]
        return min(max(0.0, low), high)
    if name == "HardSigmoid":
        beta = params[1] if len(params) > 1 else 0.5  # max(0, min(1, alpha * 0 + beta))
        return min(max(0.0, beta), 1.0)
    return None


def _flops(graph, node) -> int:
    convolution = cost.convolution(1, 2)(graph, node)
    y = cost.output_shape(graph, node)
    if not convolution or y is None:
        return convolution
    # the activation counts 1 per element, like its own node; the sum Z 1 more
    return convolution + cost.numel(y) * (1 + (1 if node.input(3) else 0))


class FusedConv(Conv):
    ops = ("FusedConv",)
    domain = MS
    costs = {"FusedConv": _flops}
    zero_kinds = {}  # soft_zero decides, from the activation

    def link(self, node, dim, ctx):
        z, y = node.input(3), node.outputs[0]
        if z and dim.tensor == z:  # the sum has Y's shape: each of its axes is Y's
            links = LinkSet(ctx)
            links.same(dim, Dim(y, dim.axis))
            return links.out
        out = list(super().link(node, dim, ctx))
        if z and dim.tensor == y:
            links = LinkSet(ctx, out)
            links.same(dim, Dim(z, dim.axis))
        return out

    def soft_zero(self, node, dim, input_zero):
        if dim.tensor != node.outputs[0] or dim.axis != 1:
            return False
        z = node.input(3)
        # a removed output channel has its weights and bias zeroed: the sum before the
        # activation is zero when Z's channel is too
        return (not z or bool(input_zero(z))) and activation_at_zero(node) == 0.0

    def linear(self, graph, node):
        return conv_linear(graph, node)

    def inferred_as(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """onnx infers no shape for FusedConv: Y's shape is the Conv's."""
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _CONV_ATTRIBUTES}
        return helper.make_node(Conv.ops[0], list(node.input[:3]), list(node.output), name=node.name, **attributes)
