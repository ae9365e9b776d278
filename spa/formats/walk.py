"""Every tensor a model holds, wherever it sits: initializers, attributes, sparse tensors and the
graphs inside If, Loop and Scan. One walker, so loading, checking and writing see the same set."""

from __future__ import annotations

import onnx
from onnx.external_data_helper import uses_external_data


def external_tensors(model: onnx.ModelProto):
    """Every tensor in the model that keeps its data in a file: main graph and subgraphs."""
    return (t for t in all_tensors(model.graph) if uses_external_data(t))


def all_tensors(graph: onnx.GraphProto, sparse: bool = True):
    """Initializers, sparse initializers and attribute tensors of ``graph`` and, recursively, of the
    graphs its nodes' attributes hold (If branches, Loop and Scan bodies). ``sparse=False`` leaves
    out the values and indices of sparse tensors: the dense ones only."""
    yield from graph.initializer
    yield from nested_tensors(graph, sparse)


def nested_tensors(graph: onnx.GraphProto, sparse: bool = True):
    """``all_tensors`` but the graph's own initializers."""
    if sparse:
        for tensor in graph.sparse_initializer:
            yield tensor.values
            yield tensor.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if sparse and attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if sparse:
                for tensor in attr.sparse_tensors:
                    yield tensor.values
                    yield tensor.indices
            if attr.HasField("g"):  # whatever the declared type: a runtime may still read it
                yield from all_tensors(attr.g, sparse)
            for sub in attr.graphs:
                yield from all_tensors(sub, sparse)
