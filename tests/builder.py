"""A tiny graph builder for hand-written rule tests."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.analysis.groups import find_groups
from spa.core.coupling import Dim
from spa.formats.model import Model


class Graph:
    def __init__(self, opset: int = 17, seed: int = 0):
        self.opset = opset
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.rng = np.random.default_rng(seed)
        self._ids = itertools.count()

    def input(self, name: str, shape, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, value, name: str | None = None) -> str:
        name = name or f"c{next(self._ids)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape, low: float = -1.0, high: float = 1.0) -> str:
        return self.const(self.rng.uniform(low, high, shape).astype(np.float32))

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", name: str | None = None, **attrs):
        k = next(self._ids)
        outs = [f"{op_type.lower()}{k}_{i}" for i in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=name or f"{op_type}_{k}", domain=domain, **attrs)
        )
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, rank: int = 2, bias: bool = True):
        w = self.weight(cout, cin // group, *([k] * rank))
        inputs = [x, w] + ([self.weight(cout)] if bias else [])
        return self.op("Conv", inputs, pads=[k // 2] * (2 * rank), group=group)

    def output(self, name: str) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def build(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == "com.microsoft" for n in self.nodes):  # onnxruntime's contrib ops
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8
        return model


def analysis_of(model: onnx.ModelProto, approximate: bool = False, attention: str = "heads"):
    prepared = Model.load(model)
    return find_groups(prepared.graph, prepared.opset, allow_approximate=approximate, attention=attention)


def group_at(analysis, tensor: str, axis: int = 1):
    """The group owning the units of ``tensor[axis]`` (asserting there is exactly one)."""
    labels = analysis.labels[Dim(tensor, axis)]
    gids = set(analysis.group_of_unit[np.unique(labels)].tolist())
    assert len(gids) == 1, f"{tensor}[{axis}] spans groups {gids}"
    return analysis.group(gids.pop())


def prune_exact(model: onnx.ModelProto, ratio: float = 0.5, **kwargs):
    """Prune with validation on: raises unless valid and soft == hard; returns the result. Counts
    are the ratio's exactly (``round_to=1``): rule tests assert the cut's arithmetic, not which
    widths this machine's kernels run fastest."""
    kwargs.setdefault("round_to", 1)
    result = spa.prune(model, ratio=ratio, **kwargs)
    assert result.report.validation.ok, result.report.validation.problems
    return result


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def node_attr(model: onnx.ModelProto, op_type: str, attr: str, index: int = 0):
    node = [n for n in model.graph.node if n.op_type == op_type][index]
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == attr)
