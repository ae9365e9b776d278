"""Whole experts out of mixture-of-experts layers (``spa.patterns.moe`` finds them).

Hard: every stacked expert initializer loses the expert's slice along axis 0, the router loses its
column and bias entry, Reshapes that name the expert count name the new one, and ``k`` (the MoE
op's attribute, TopK's input) stays at most the experts left.

Soft: the router's bias is -inf at the removed experts (a bias is added where the router has
none). Their softmax weight is then exactly 0 and the top-k never picks them while k experts
remain, which is what removing them does; zeroing their weights instead would not be, since a
zero expert still takes one of the k slots and its share of the routing weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spa.core.tensors import to_array
from spa.ops.linear import Gemm
from spa.patterns.moe import ExpertLayer


def remove_experts(
    model: onnx.ModelProto, layers: list[ExpertLayer], keep: Mapping[str, np.ndarray], soft: bool = False
) -> onnx.ModelProto:
    """``model`` keeping, in each of ``layers``, the experts ``keep[layer.name]`` (sorted indices)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    edit = _Edit(result)
    for layer in layers:
        kept = np.asarray(keep[layer.name], dtype=np.int64)
        if len(kept) == layer.experts:
            continue
        if soft:
            _mask(edit, layer, kept)
        else:
            _cut(edit, layer, kept)
    edit.finish()
    return result


class _Edit:
    """Initializer replacements and new nodes, applied once: a tensor several layers share is
    never edited in place (each gets its own copy)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.nodes = {n.name: n for n in model.graph.node}
        self.replaced: dict[str, np.ndarray] = {}
        self.added: list[onnx.TensorProto] = []
        self.reshaped = False  # whether the inferred shapes of the tensors after a router changed

    def value(self, name: str) -> np.ndarray:
        return self.replaced[name] if name in self.replaced else to_array(self.inits[name])

    def replace(self, name: str, value: np.ndarray) -> None:
        self.replaced[name] = value

    def new_input(self, node_name: str, slot: int, value: np.ndarray, suffix: str) -> None:
        node = self.nodes[node_name]
        name = f"{node.input[slot] or node_name}/{suffix}"
        made = {t.name: t for t in self.added}
        if name in made and np.array_equal(numpy_helper.to_array(made[name]), value):
            node.input[slot] = name  # several layers shared the old constant: they share the new one
            return
        while name in made or name in self.inits:
            name += "_"
        self.added.append(numpy_helper.from_array(np.asarray(value), name))
        node.input[slot] = name

    def finish(self) -> None:
        for tensor in self.model.graph.initializer:
            if tensor.name in self.replaced:
                tensor.CopyFrom(numpy_helper.from_array(self.replaced[tensor.name], tensor.name))
        self.model.graph.initializer.extend(self.added)
        if self.reshaped:  # inferred again from the new sizes: what was inferred before contradicts them
            del self.model.graph.value_info[:]


def _cut(edit: _Edit, layer: ExpertLayer, kept: np.ndarray) -> None:
    for name in layer.stacked:
        edit.replace(name, np.take(edit.value(name), kept, axis=0))
    router = layer.router
    edit.replace(router.weight, np.take(edit.value(router.weight), kept, axis=router.axis))
    if router.bias is not None:
        edit.replace(router.bias, np.take(edit.value(router.bias), kept, axis=-1))
    for node_name, slot in layer.shape_inputs:
        target = np.array(edit.value(edit.nodes[node_name].input[slot]))
        target[-1] = len(kept)
        edit.new_input(node_name, slot, target, f"experts{len(kept)}")
    k = min(layer.k, len(kept))
    node = edit.nodes[layer.name]
    if layer.form == "fused":
        for attribute in node.attribute:
            if attribute.name == "k":
                attribute.CopyFrom(helper.make_attribute("k", k))
    elif k != layer.k:
        edit.new_input(layer.name, 1, np.array([k], dtype=np.int64), f"k{k}")
    edit.reshaped = True


def _mask(edit: _Edit, layer: ExpertLayer, kept: np.ndarray) -> None:
    router = layer.router
    removed = np.setdiff1d(np.arange(layer.experts), kept)
    if router.bias is not None:
        bias = np.array(edit.value(router.bias), copy=True)
        bias.reshape(-1)[removed] = -np.inf
        edit.replace(router.bias, bias)
        return
    weight = edit.value(router.weight)
    bias = np.zeros(layer.experts, dtype=weight.dtype)
    bias[removed] = -np.inf
    node = edit.nodes[router.node]
    if node.op_type == Gemm.ops[0] and len(node.input) < 3:
        node.input.append("")
    if node.op_type == Gemm.ops[0]:
        edit.new_input(router.node, 2, bias, "expert_mask")
        return
    masked, name = f"{router.logits}/expert_mask", f"{router.logits}/expert_mask_bias"
    for other in edit.model.graph.node:
        other.input[:] = [masked if i == router.logits else i for i in other.input]
    for output in edit.model.graph.output:
        if output.name == router.logits:
            raise ValueError(f"the router logits {router.logits} are a graph output")
    edit.added.append(numpy_helper.from_array(bias, name))
    index = list(edit.model.graph.node).index(node)
    edit.model.graph.node.insert(index + 1, helper.make_node("Add", [router.logits, name], [masked], name=masked))
