"""onnxruntime's GatherBlockQuantized: rows of a block-quantized table picked by indices, then
dequantized. The onnxruntime-genai builder writes it for an int4 model's token embedding, often
tied to the LM head: the table is the head's packed MatMulNBits weight, reshaped, and the scales
are the head's.

``GatherBlockQuantized(data, indices, scales, zero_points)`` with ``gather_axis`` and
``quantize_axis``: data is int4/uint4, or uint8 holding ``8 // bits`` values per byte (low bits
first); scales have data's shape with the quantize axis counted in blocks of ``block_size``. The
output is data's shape with the gather axis replaced by the indices' shape, the quantize axis
unpacked, in the scales' type.

The quantize axis (the hidden width of an embedding) is cut in whole blocks: an output channel is
value ``i`` of byte ``i // (8 // bits)`` and of scale block ``i // block_size``, so grouping makes a
block one unit, as MatMulNBits does for its input channels. The gathered rows (the vocabulary) are
picked at run time and stay whole.
"""

from __future__ import annotations

import onnx
from onnx import helper

from spa.core.coupling import Dim, LinkSet, pairs
from spa.formats import nbits
from spa.ops.base import PRODUCT, Operator
from spa.ops.gather import Gather
from spa.ops.layout import Concat

OP_TYPE = "GatherBlockQuantized"
_DATA, _INDICES, _SCALES, _ZERO_POINTS = 0, 1, 2, 3
_PACKED_TYPES = (onnx.TensorProto.UINT8,)


class GatherBlockQuantized(Operator):
    ops = (OP_TYPE,)
    domain = nbits.DOMAIN
    gathers_rows = True
    quantized_data_inputs = (_DATA,)
    not_parameter_inputs = (_SCALES, _ZERO_POINTS)
    zero_kinds = {OP_TYPE: PRODUCT}  # a removed block's scale is zero in the soft model

    def parameter_elements(self, node, index, dims):
        values = super().parameter_elements(node, index, dims)
        return values * (8 // int(node.attr("bits", 4))) if index == _DATA else values

    def inferred_as(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """The scales gathered, each repeated ``block_size`` times along the quantize axis: the
        output's shape and type whenever the quantized width is whole blocks (``link`` checks it
        against the data before any channel is coupled through it)."""
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        gather_axis, quantize_axis = attributes.get("gather_axis", 0), attributes.get("quantize_axis", 1)
        if gather_axis != 0 or quantize_axis != 1 or len(node.input) < 3:
            return None  # the output axis of a quantize axis elsewhere depends on ranks unknown here
        rows = f"{node.output[0]}/spa_inferred_rows"
        gather = helper.make_node(Gather.ops[0], [node.input[_SCALES], node.input[_INDICES]], [rows], axis=0)
        repeat = [rows] * int(attributes.get("block_size", 128))
        return [gather, helper.make_node(Concat.ops[0], repeat, list(node.output[:1]), axis=-1)]

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        data, indices, scales, y = node.inputs[_DATA], node.inputs[_INDICES], node.inputs[_SCALES], node.outputs[0]
        what = f"GatherBlockQuantized '{node.name}'"
        rank, index_rank, out_rank = ctx.rank(data), ctx.rank(indices), ctx.rank(y)
        if rank is None or index_rank is None or out_rank != rank + index_rank - 1:
            links.freeze(dim, f"{what}: shapes of its table, indices or output unknown")
            return links.out
        gather_axis = node.attr("gather_axis", 0) % rank
        quantize_axis = node.attr("quantize_axis", 1) % rank
        data_axis = _data_axis(dim, node, gather_axis, index_rank)
        if data_axis is None:
            links.freeze(dim, f"{what}: axis of its indices")
            return links.out
        out_axis = data_axis + (index_rank - 1 if data_axis > gather_axis else 0)
        if data_axis == gather_axis:
            links.same(Dim(data, data_axis), Dim(scales, data_axis))
            links.freeze(Dim(data, data_axis), f"{what}: its rows are picked by indices known only at run time")
        elif data_axis != quantize_axis:
            links.same(Dim(data, data_axis), Dim(y, out_axis))
            links.same(Dim(data, data_axis), Dim(scales, data_axis))
        else:
            self._link_blocks(links, node, Dim(data, data_axis), Dim(y, out_axis), what)
        return links.out

    def _link_blocks(self, links: LinkSet, node, packed: Dim, values: Dim, what: str) -> None:
        """Output channel i is value i of the packed axis and belongs to scale block i // block_size."""
        ctx, scales = links.ctx, Dim(node.inputs[_SCALES], packed.axis)
        bits, block_size = int(node.attr("bits", 4)), int(node.attr("block_size", 128))
        per_element = 8 // bits if ctx.graph.dtypes.get(packed.tensor) in _PACKED_TYPES else 1
        width, stored, blocks = ctx.size(values), ctx.size(packed), ctx.size(scales)
        if width is None or stored is None or blocks is None:
            links.freeze(values, f"{what}: the size of its quantized axis is unknown")
            return
        if node.input(_ZERO_POINTS):
            links.freeze(values, f"{what}: its zero points are packed along the quantized axis and not cut")
            return
        if width != stored * per_element or blocks != -(-width // block_size):
            links.freeze(
                values, f"{what}: output width {width} does not match {stored} stored values and {blocks} blocks"
            )
            return
        index = list(range(width))
        links.add(pairs(values, packed, index, [i // per_element for i in index]))
        links.add(pairs(values, scales, index, [i // block_size for i in index]))


def _data_axis(dim: Dim, node, gather_axis: int, index_rank: int) -> int | None:
    """The table's axis that ``dim`` (of the table, the scales or the output) is; None for the indices'."""
    if dim.tensor in (node.inputs[_DATA], node.inputs[_SCALES]):
        return dim.axis
    if dim.tensor != node.outputs[0]:
        return None
    if dim.axis < gather_axis:
        return dim.axis
    if dim.axis >= gather_axis + index_rank:
        return dim.axis - index_rank + 1
    return None
