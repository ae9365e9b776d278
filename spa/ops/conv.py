"""Conv and ConvTranspose of any rank, with groups.

Weight layouts: Conv ``[Cout, Cin/g, k...]``, ConvTranspose ``[Cin, Cout/g, k...]``.
* depthwise (``Cin/g == 1``): input channel c owns output channels
  ``c*m .. c*m+m-1``; ``group`` follows the new channel count.
* general grouped: the weight's per-group axis is shared by all groups, so
  channel j of every group is one unit; the full-width side is tied the same
  way so every group keeps the same width and ``group`` stays.
"""

from __future__ import annotations

import numpy as np
import onnx

from spa.core.coupling import Dim, LinkSet, Sink, pairs
from spa.core.errors import ModelLoadError
from spa.core.graph import ModelGraph, Node
from spa.ops import cost
from spa.ops.base import PRODUCT, Operator, static_weight_dims, times
from spa.ops.isolate import float_input, lone_model, static_shape
from spa.ops.linear_view import LinearLayer, owned


class _ConvBase(Operator):
    transposed = False
    layer_kind = "conv"
    weight_inputs = (1,)

    def weight_side(self, node, index, axis):
        if index != 1:
            return None
        # Conv's weight is [Cout, Cin/g, k...], ConvTranspose's [Cin, Cout/g, k...]
        return ("in" if axis == 0 else "out") if self.transposed else ("out" if axis == 0 else "in")

    def layer_widths(self, graph, node):
        dims = static_weight_dims(graph, node)
        if dims is None or len(dims) < 3:
            return None
        group = node.attr("group", 1)
        if self.transposed:
            return dims[0], times(dims[1], group)
        return times(dims[1], group), dims[0]

    def bias(self, node) -> str:
        return node.input(2)

    def seeds(self, node, ctx):
        return [Dim(node.inputs[0], 1), Dim(node.outputs[0], 1)]

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        b = self.bias(node)
        w_shape = ctx.graph.shape(w)
        groups = int(node.attr("group", 1))
        if w_shape is None or not all(isinstance(s, int) for s in w_shape[:2]):
            links.freeze(dim, f"weight shape of {node.op_type} '{node.name}' unknown")
            return links.out
        # in_axis/out_axis: the weight axis indexed by input/output channels
        in_axis, out_axis = (0, 1) if self.transposed else (1, 0)
        cin = w_shape[in_axis] * (1 if self.transposed else groups)
        cout = w_shape[out_axis] * (groups if self.transposed else 1)
        x_c, y_c, w_in, w_out = Dim(x, 1), Dim(y, 1), Dim(w, in_axis), Dim(w, out_axis)
        if dim.tensor == x and dim.axis == 0 or dim.tensor == y and dim.axis == 0:
            links.same(Dim(x, 0), Dim(y, 0))
            return links.out
        if dim.tensor in (x, y) and dim.axis >= 2:
            links.freeze(dim, f"spatial axis of {node.op_type} '{node.name}'")
            return links.out
        if dim.tensor == w and dim.axis >= 2:
            links.freeze(dim, f"kernel axis of {node.op_type} '{node.name}'")
            return links.out
        if dim.tensor == b and b:
            links.same(Dim(b, 0), y_c)
            return links.out
        if links.answered(node):
            return links.out
        cin_g, cout_g = cin // groups, cout // groups
        if groups > 1 and cin_g == 1:  # depthwise, possibly with a channel multiplier
            block = np.repeat(np.arange(cin), cout_g)
            links.add(pairs(x_c, y_c, block, np.arange(cout)))
            if self.transposed:
                links.same(x_c, w_in)
                if cout_g > 1:  # the per-group output axis is shared by every input channel
                    links.freeze(w_out, "per-group axis of a depthwise ConvTranspose with multiplier")
            else:
                links.same(y_c, w_out)
        else:
            links.add(Sink((x_c, w_in)))
            # w_in/w_out that are per-group axes pair channel (g, j) of x/y with j
            if self.transposed:
                links.same(x_c, w_in)
                links.add(pairs(y_c, w_out, np.arange(cout), np.arange(cout) % cout_g))
                if groups > 1:
                    links.add(pairs(x_c, x_c, np.arange(cin), np.arange(cin) % cin_g))
            else:
                links.same(y_c, w_out)
                links.add(pairs(x_c, w_in, np.arange(cin), np.arange(cin) % cin_g))
                if groups > 1:
                    links.add(pairs(y_c, y_c, np.arange(cout), np.arange(cout) % cout_g))
        if b:
            links.same(y_c, Dim(b, 0))
        return links.out  # the whole op's coupling, whichever of its dims was asked

    def rewrite(self, node, cut):
        groups = int(node.attr("group", 1))
        if groups == 1:
            return
        w_shape = cut.graph.shape(node.inputs[1])
        in_axis = 0 if self.transposed else 1
        cin_g = w_shape[in_axis] if not self.transposed else w_shape[0] // groups
        if cin_g == 1:
            cut.set_attr(node, "group", cut.new_size(Dim(node.inputs[0], 1)))


class Conv(_ConvBase):
    ops = ("Conv",)
    bias_input = 2
    costs = {"Conv": cost.convolution(1, 2)}
    zero_kinds = {"Conv": PRODUCT}

    def linear(self, graph, node):
        return conv_linear(graph, node)

    def isolated(self, graph, node, in_width, out_width):
        x, w = static_shape(graph, node.inputs[0]), static_shape(graph, node.input(1))
        if x is None or w is None or len(x) < 3 or not float_input(graph, node.inputs[0]):
            return None
        if not graph.is_initializer(node.input(1)):  # a quantized weight runs on integer kernels
            return None
        groups = int(node.attr("group", 1))
        if groups == 1:
            new_groups = 1
        elif groups == x[1] == w[0] and in_width == out_width:  # depthwise: one group per channel
            new_groups = in_width
        else:  # other grouped convolutions keep their group count: not timed on their own
            return None
        bias = (out_width,) if node.input(2) else None
        weight = (out_width, in_width // new_groups, *w[2:])
        return lone_model(node, (x[0], in_width, *x[2:]), [weight, bias], {**node.attrs, "group": new_groups})


class ConvTranspose(_ConvBase):
    ops = ("ConvTranspose",)
    transposed = True
    bias_input = 2
    costs = {"ConvTranspose": lambda graph, node: _transposed_cost(graph, node)}
    zero_kinds = {"ConvTranspose": PRODUCT}


def _transposed_cost(graph: ModelGraph, node: Node) -> int:
    x, w, y = cost.input_shape(graph, node, 0), cost.input_shape(graph, node, 1), cost.output_shape(graph, node)
    if x is None or w is None or len(w) < 2:
        return 0
    # every input element is scattered through M/group output channels times the kernel
    # (W is [C, M/group, k...]); outputs later cropped by pads are counted
    bias = cost.numel(y) if node.input(2) and y is not None else 0
    return 2 * cost.numel(x) * cost.numel(w[1:]) + bias


def conv_linear(graph: ModelGraph, node: Node) -> LinearLayer | None:
    """A Conv of group 1 by its own weight (and bias): one matrix row per output channel and
    kernel position."""
    if len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if not x or graph.is_initializer(x) or not owned(graph, w):
        return None
    w_shape = graph.shape(w)
    if not w_shape or any(not isinstance(s, int) for s in w_shape) or node.attr("group", 1) != 1:
        return None
    bias = node.input(2) if owned(graph, node.input(2)) else None
    return LinearLayer(node, w, 1, Dim(x, 1), bias, convolution=True)


def check_groups(node: onnx.NodeProto, shapes: dict[str, list], printable) -> None:
    """Refuse a Conv or ConvTranspose whose channels do not divide into its groups, before the rules
    rely on them (``printable`` makes a node name safe to print)."""
    if node.op_type not in Conv.ops + ConvTranspose.ops or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    what = f"{node.op_type} '{printable(node.name)}'"
    if group < 1:
        raise ModelLoadError(f"{what} has group {group}")
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not w or len(w) < 2 or w[0] is None:
        return
    channels = x[1] if x and len(x) > 1 else None
    if node.op_type in Conv.ops:
        if w[0] % group:
            raise ModelLoadError(f"{what}: its {w[0]} output channels are not a multiple of group {group}")
        if channels is not None and w[1] is not None and channels != w[1] * group:
            raise ModelLoadError(
                f"{what}: its input has {channels} channels, its weight expects {w[1]} x group {group}"
            )
    elif w[0] % group or (channels is not None and channels != w[0]):
        raise ModelLoadError(
            f"{what}: its weight's {w[0]} input channels do not match its input ({channels} channels) in group {group}"
        )
