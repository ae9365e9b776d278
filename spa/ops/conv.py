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

from spa.ops.base import Dim, LinkSet, Rule, Sink, pairs, register


class _ConvBase(Rule):
    transposed = False

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


@register
class Conv(_ConvBase):
    ops = ("Conv",)


@register
class ConvTranspose(_ConvBase):
    ops = ("ConvTranspose",)
    transposed = True
