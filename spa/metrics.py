"""Params and FLOPs, measured from the model's own tensors and inferred shapes.

FLOPs count a multiply-add as 2. Symbolic axes (batch, sequence) count as 1,
so figures are per sample; the same convention is used before and after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from .graph import ModelGraph

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish",
                "LeakyRelu", "PRelu", "Max", "Min", "Pow", "Sqrt", "Erf", "Exp", "Gelu", "Elu", "Selu",
                "Softplus", "Mish", "Where", "Neg", "Abs", "Reciprocal"}
_NORMS = {"BatchNormalization": 2, "InstanceNormalization": 5, "GroupNormalization": 5,
          "LayerNormalization": 5, "Softmax": 5, "LogSoftmax": 5}


@dataclass
class ModelStats:
    params: int
    flops: int
    node_flops: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"params": self.params, "flops": self.flops}


def _numel(shape) -> int:
    return math.prod(s if isinstance(s, int) and s > 0 else 1 for s in shape) if shape is not None else 0


def count(graph: ModelGraph) -> ModelStats:
    params = sum(_numel(t.dims) for t in graph.initializers.values() if t.data_type in _FLOAT_TYPES)
    per_node = {}
    for node in graph.nodes:
        flops = _node_flops(graph, node)
        if flops:
            per_node[node.name] = flops
    return ModelStats(params, sum(per_node.values()), per_node)


def _node_flops(graph: ModelGraph, node) -> int:
    op = node.op_type
    y_shape = graph.shape(node.outputs[0]) if node.outputs and node.outputs[0] else None
    x_shape = graph.shape(node.inputs[0]) if node.inputs and node.inputs[0] else None
    out = _numel(y_shape)
    if op in ("Conv", "ConvTranspose"):
        w = graph.shape(node.inputs[1])
        if w is None or y_shape is None or x_shape is None:
            return 0
        # each output (Conv) or input (ConvTranspose) element meets w[1] * kernel weights
        per_element = (w[1] if isinstance(w[1], int) else 1) * _numel(w[2:])
        macs = (out if op == "Conv" else _numel(x_shape)) * per_element
        bias = out if node.input(2) else 0
        return 2 * macs + bias
    if op == "Gemm":
        a = graph.shape(node.inputs[0])
        if a is None or y_shape is None:
            return 0
        k = a[0] if node.attr("transA", 0) else a[1]
        k = k if isinstance(k, int) else 1
        return 2 * out * k + (out if node.input(2) else 0)
    if op == "MatMul":
        a = graph.shape(node.inputs[0])
        if a is None or y_shape is None or not a:
            return 0
        k = a[-1] if isinstance(a[-1], int) else 1
        return 2 * out * k
    if op in _NORMS:
        return _NORMS[op] * out
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return out * _numel(node.attr("kernel_shape", []))
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum"):
        return _numel(x_shape)
    if op in _ELEMENTWISE:
        return out
    return 0
