"""onnxruntime's mixture-of-experts ops, MoE and QMoE: every expert's two- or three-matrix FFN
stacked along a leading expert axis, run for the ``k`` experts the router picks for each token.

Inputs (MoE): the tokens ``x`` [..., H], the router's logits [tokens, E], FC1 [E, F*I, H] with its
bias [E, F*I], FC2 [E, H, I] with its bias [E, H], and FC3 [E, I, H] with its bias [E, I] (the up
projection of a SwiGLU that is not fused). F is 2 where FC1 holds the SwiGLU's gate and up rows
together: interleaved (``swiglu_fusion=1``: gate, up, gate, up...) or concatenated (``=2``: every
gate row, then every up row).

* An FFN channel is one index of I: FC2's column, FC1's row (both rows of a fused SwiGLU), FC3's
  row, and their biases, in every expert at once since the experts are stacked. Its contribution
  to the output goes through FC2's column alone, so zeroing that column (the soft model) equals
  removing the channel whatever the activation makes of the rest.
* The hidden width couples FC1's and FC3's input axis with ``x``, and FC2's rows with the output.
* The expert axis does not prune as channels: removing an expert changes which experts the top-k
  picks, which zeroing its weights does not (a zero expert still takes a slot).
  ``spa.transforms.experts`` removes experts whole, with their router columns.

QMoE packs FC2's input channels several to a byte and quantizes them in blocks along that axis,
so its FFN channels stay whole; its experts are removed like MoE's.
"""

from __future__ import annotations

import onnx
from onnx import helper

from spa.core.coupling import Dim, LinkSet, Sink, pairs
from spa.core.graph import ModelGraph, Node
from spa.ops import cost
from spa.ops.base import PRODUCT, Operator

# input slots of MoE; QMoE's are in QMOE_SLOTS
MOE_SLOTS = {"fc1": 2, "fc1_bias": 3, "fc2": 4, "fc2_bias": 5, "fc3": 6, "fc3_bias": 7}
QMOE_SLOTS = {
    "fc1": 2,
    "fc1_scales": 3,
    "fc1_bias": 4,
    "fc2": 5,
    "fc2_scales": 6,
    "fc2_bias": 7,
    "fc3": 8,
    "fc3_scales": 9,
    "fc3_bias": 10,
    "fc1_zero_points": 11,
    "fc2_zero_points": 12,
    "fc3_zero_points": 13,
}
ROUTER = 1
SWIGLU = "swiglu"
# activations whose FC1 holds two rows per channel when fused (gate and up)
_GATED = (SWIGLU, "geglu")
EXPERTS_FREEZE = "experts are removed whole (--remove-experts), not as channels"


def slots(node: Node) -> dict[str, int]:
    return QMOE_SLOTS if node.op_type == "QMoE" else MOE_SLOTS


def slot_input(node: Node, key: str) -> str:
    """The tensor at the op's ``key`` input ('' where absent, or where the op has no such input)."""
    slot = slots(node).get(key)
    return node.input(slot) if slot is not None else ""


def fused(node: Node) -> int:
    """0, 1 (interleaved) or 2 (concatenated): how FC1 holds a gated activation's gate and up rows."""
    if _activation(node) not in _GATED:
        return 0
    return int(node.attr("swiglu_fusion", 0))


def _activation(node: Node) -> str:
    value = node.attr("activation_type", "relu")
    return value.decode() if isinstance(value, bytes) else str(value)


def expert_inputs(node: Node) -> list[int]:
    """The input slots whose axis 0 is the expert axis (weights, biases, scales, zero points)."""
    return [slot for slot in slots(node).values() if node.input(slot)]


def fc1_rows(channels: int, fusion: int):
    """(channel, FC1 row) pairs: a fused gated FC1 has two rows per channel."""
    index = list(range(channels))
    if fusion == 1:
        return index + index, [2 * i for i in index] + [2 * i + 1 for i in index]
    if fusion == 2:
        return index + index, index + [channels + i for i in index]
    return index, index


def _flops(graph: ModelGraph, node: Node) -> int:
    """The ``k`` experts each token runs (the others cost nothing), and the mixing."""
    names = slots(node)
    x, fc1, fc2 = cost.input_shape(graph, node, 0), graph.shape(node.inputs[names["fc1"]]), None
    fc2 = graph.shape(node.inputs[names["fc2"]])
    if not x or not fc1 or not fc2 or len(fc1) != 3 or len(fc2) != 3:
        return 0
    hidden, inter = cost.size(x[-1]), cost.size(fc2[2])
    tokens = cost.numel(x) // hidden
    matrices = cost.size(fc1[1]) + hidden + (inter if node.input(names["fc3"]) else 0)
    per_expert = 2 * hidden * matrices + 2 * hidden  # the products, then weighting and summing its output
    return tokens * int(node.attr("k", 1)) * per_expert


class MoE(Operator):
    ops = ("MoE",)
    domain = "com.microsoft"
    layer_kind = "dense"
    weight_inputs = (MOE_SLOTS["fc1"], MOE_SLOTS["fc2"], MOE_SLOTS["fc3"])
    costs = {"MoE": _flops}
    zero_kinds = {"MoE": PRODUCT}

    def inferred_as(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """The output has the tokens' shape (onnxruntime's inference knows MoE, not QMoE)."""
        return helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)

    def weight_side(self, node, index, axis):
        names = slots(node)
        if index in (names["fc1"], names["fc2"], names["fc3"]):
            return {1: "out", 2: "in"}.get(axis)
        return None

    def seeds(self, node, ctx):
        fc2 = node.inputs[slots(node)["fc2"]]
        return [Dim(fc2, 2)] if ctx.graph.is_initializer(fc2) else []

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        names, x, y = slots(node), node.inputs[0], node.outputs[0]
        rx, ry = ctx.rank(x), ctx.rank(y)
        what = f"{node.op_type} '{node.name}'"
        weights = [node.input(names[key]) for key in ("fc1", "fc2", "fc3") if node.input(names[key])]
        if rx is None or ry is None or rx != ry or any(ctx.rank(w) != 3 for w in weights):
            links.freeze(dim, f"ranks unknown or unexpected around {what}")
            return links.out
        if dim.axis == 0 and dim.tensor in [node.input(s) for s in expert_inputs(node)]:
            links.freeze(dim, f"{what}: {EXPERTS_FREEZE}")
            return links.out
        if dim == Dim(node.inputs[ROUTER], 1):
            links.freeze(dim, f"{what}: {EXPERTS_FREEZE}")
            return links.out
        if links.answered(node):
            return links.out
        self._link_hidden(links, node, rx)
        self._link_channels(links, node, what)
        return links.out

    def _link_hidden(self, links: LinkSet, node: Node, rank: int) -> None:
        names, x, y = slots(node), node.inputs[0], node.outputs[0]
        for axis in range(rank - 1):
            links.same(Dim(x, axis), Dim(y, axis))
        hidden_in = Dim(x, rank - 1)
        if node.op_type == "QMoE":  # packed along the hidden axis: several channels a byte
            links.freeze(hidden_in, f"QMoE '{node.name}' packs its input channels several to a byte")
        else:
            readers = [Dim(node.input(names[key]), 2) for key in ("fc1", "fc3") if node.input(names[key])]
            for reader in readers:
                links.same(hidden_in, reader)
            links.add(Sink((hidden_in, *readers)))
        hidden_out = Dim(y, rank - 1)
        links.same(hidden_out, Dim(node.inputs[names["fc2"]], 1))
        for key in ("fc2_bias", "fc2_scales"):
            if slot_input(node, key) and links.ctx.rank(slot_input(node, key)) in (2, 3):
                links.same(hidden_out, Dim(slot_input(node, key), 1))
        if slot_input(node, "fc2_zero_points"):
            links.freeze(hidden_out, f"QMoE '{node.name}': its zero points pack output channels together")

    def _link_channels(self, links: LinkSet, node: Node, what: str) -> None:
        names, ctx = slots(node), links.ctx
        channels = Dim(node.inputs[names["fc2"]], 2)
        if node.op_type == "QMoE":
            links.freeze(channels, f"{what} packs FC2's input channels several to a byte, quantized in blocks")
            return
        inter, fusion = ctx.size(channels), fused(node)
        fc1 = Dim(node.inputs[names["fc1"]], 1)
        rows = ctx.size(fc1)
        if inter is None or rows is None or rows != inter * (2 if fusion else 1):
            links.freeze(channels, f"{what}: FC1 has {rows} rows for {inter} channels")
            return
        index, fc1_index = fc1_rows(inter, fusion)
        links.add(pairs(channels, fc1, index, fc1_index))
        if node.input(names["fc1_bias"]):
            links.add(pairs(channels, Dim(node.input(names["fc1_bias"]), 1), index, fc1_index))
        for key in ("fc3", "fc3_bias"):
            if node.input(names[key]):
                links.same(channels, Dim(node.input(names[key]), 1))
        links.add(Sink((channels, fc1)))


class QMoE(MoE):
    """MoE with quantized experts: its weights are integer data, its scales and zero points not
    parameters of their own."""

    ops = ("QMoE",)
    weight_inputs = (QMOE_SLOTS["fc1"], QMOE_SLOTS["fc2"], QMOE_SLOTS["fc3"])
    quantized_data_inputs = (QMOE_SLOTS["fc1"], QMOE_SLOTS["fc2"], QMOE_SLOTS["fc3"])
    not_parameter_inputs = tuple(
        QMOE_SLOTS[key]
        for key in ("fc1_scales", "fc2_scales", "fc3_scales", "fc1_zero_points", "fc2_zero_points", "fc3_zero_points")
    )
    costs = {"QMoE": _flops}
    zero_kinds = {"QMoE": PRODUCT}

    def seeds(self, node, ctx):
        return []

    def parameter_elements(self, node, index, dims):
        if index not in self.quantized_data_inputs:
            return super().parameter_elements(node, index, dims)
        bits = int(node.attr("expert_weight_bits", 4))
        return super().parameter_elements(node, index, dims) * max(1, 8 // bits)
