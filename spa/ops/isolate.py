"""One layer alone, at chosen channel widths: what the width cost model times.

An operator that can be timed on its own answers ``Operator.isolated`` with a one-node model
built here: its activation is the graph input (so nothing is folded away), its weights are
initializers of the new shapes, and its attributes are the node's own. The weights are left
empty (a model of the widest layers at every width would not fit in memory at once):
``materialised`` fills them with random values just before the model is timed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spa.core.graph import ModelGraph, Node

# Conv, Gemm and MatMul mean the same at every opset onnxruntime runs
OPSET = 17


def static_shape(graph: ModelGraph, tensor: str) -> tuple[int, ...] | None:
    shape = graph.shape(tensor) if tensor else None
    if not shape:
        return None
    sizes = tuple(s for s in shape if isinstance(s, int) and s > 0)
    return sizes if len(sizes) == len(shape) else None


def lone_model(
    node: Node, activation: Sequence[int], weights: Sequence[Sequence[int] | None], attrs: dict | None = None
) -> onnx.ModelProto:
    """``node`` alone: input ``x`` of shape ``activation``, then one initializer per entry of
    ``weights`` (None: an absent optional input), output ``y``."""
    initializers, inputs = [], ["x"]
    for slot, shape in enumerate(weights, start=1):
        if shape is None:
            inputs.append("")
            continue
        name = f"w{slot}"
        initializers.append(onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape)))
        inputs.append(name)
    while inputs and not inputs[-1]:
        inputs.pop()
    attributes = node.attrs if attrs is None else attrs
    op = helper.make_node(node.op_type, inputs, ["y"], domain=node.domain or None, **attributes)
    graph = helper.make_graph(
        [op],
        "isolated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(activation))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def float_input(graph: ModelGraph, tensor: str) -> bool:
    """The layer computes in float32 (what the isolated model times)."""
    return graph.dtypes.get(tensor, TensorProto.FLOAT) == TensorProto.FLOAT


def materialised(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with random values in its empty initializers."""
    rng = np.random.default_rng(0)
    filled = onnx.ModelProto()
    filled.CopyFrom(model)
    for tensor in filled.graph.initializer:
        values = rng.standard_normal([int(d) for d in tensor.dims]).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return filled
