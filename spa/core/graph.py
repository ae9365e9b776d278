"""Stage 2: a read-only view of the model that rules query.

``ModelGraph`` answers the questions rules ask (shape of a tensor, constant
value of a tensor, who produces and who consumes it) and keeps a networkx
dependency graph of ops and tensors for reporting and ordering.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import numpy as np
import onnx

from spa.core.tensors import to_array
from spa.formats.nbits import dequantized_blocks
from spa.formats.quantized import block_dequantized, dequantize, quantized_weight

Size = int | str | None  # int: static; str: symbolic (dim_param); None: unknown
_CACHE_LIMIT = 1 << 20  # constants up to 1 MiB are cached; weights are read on demand


@dataclass(frozen=True)
class Node:
    """One op of the main graph, with attributes decoded once."""

    index: int
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict
    implicit_inputs: tuple[str, ...] = ()

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)

    @cached_property
    def input_names(self) -> frozenset[str]:
        """The tensors it reads as inputs, absent optional ones left out: a set to ask of an op
        with thousands of inputs."""
        return frozenset(name for name in self.inputs if name)

    @cached_property
    def output_names(self) -> frozenset[str]:
        """The tensors it writes, as a set (a Split may have thousands)."""
        return frozenset(name for name in self.outputs if name)

    def input(self, i: int) -> str:
        """The i-th input name, or '' when the optional input is absent."""
        return self.inputs[i] if i < len(self.inputs) else ""


class ModelGraph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.inputs: list[str] = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs: list[str] = [o.name for o in graph.output]
        self.nodes: list[Node] = [_decode(i, n) for i, n in enumerate(graph.node)]
        self.producer: dict[str, Node] = {}
        self.consumers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.outputs:
                if name:
                    self.producer[name] = node
            for name in dict.fromkeys(node.inputs + node.implicit_inputs):
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.shapes: dict[str, tuple[Size, ...]] = {}
        self.dtypes: dict[str, int] = {}
        for info in list(graph.input) + list(graph.value_info) + list(graph.output):
            tensor_type = info.type.tensor_type
            if tensor_type.elem_type:
                self.dtypes[info.name] = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                self.shapes[info.name] = tuple(_dim_size(d) for d in tensor_type.shape.dim)
        for name, tensor in self.initializers.items():
            self.shapes[name] = tuple(int(d) for d in tensor.dims)
            self.dtypes[name] = tensor.data_type
        self._arrays: dict[str, np.ndarray] = {}

    @cached_property
    def output_names(self) -> frozenset[str]:
        """``outputs`` as a set, for membership tests on graphs with thousands of outputs."""
        return frozenset(self.outputs)

    def shape(self, tensor: str) -> tuple[Size, ...] | None:
        return self.shapes.get(tensor)

    def static_size(self, tensor: str, axis: int) -> int | None:
        shape = self.shapes.get(tensor)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        size = shape[axis]
        return size if isinstance(size, int) else None

    def is_initializer(self, tensor: str) -> bool:
        return tensor in self.initializers

    def const(self, tensor: str) -> np.ndarray | None:
        """The value of an initializer (Constant nodes were turned into initializers on load).

        Small values are cached for the rules; large ones are read (or memory-mapped) on
        each call and not kept, so a big model's weights are never all resident at once.
        """
        if tensor not in self.initializers:
            return None
        if tensor in self._arrays:
            return self._arrays[tensor]
        value = to_array(self.initializers[tensor])
        if value.nbytes <= _CACHE_LIMIT:
            self._arrays[tensor] = value
        return value

    def weight(self, tensor: str) -> np.ndarray | None:
        """``const``, or the float value of a weight stored quantized (``spa.formats.quantized``): what
        criteria and compensation read."""
        blocks = dequantized_blocks(self, tensor)
        if blocks is None:
            blocks = block_dequantized(self, tensor)
        if blocks is not None:
            return blocks
        stored = quantized_weight(self, tensor)  # first: an integer op's weight is an initializer too
        return self.const(tensor) if stored is None else dequantize(self, stored)

    def const_ints(self, tensor: str) -> list[int] | None:
        value = self.const(tensor)
        return None if value is None else [int(v) for v in value.reshape(-1)]

    @cached_property
    def tensor_order(self) -> dict[str, int]:
        """Topological position of every tensor, producers before consumers.

        The order of networkx's lexicographical sort of ``nx`` (the ready vertex with the least
        (kind, name) first), computed on plain dicts: networkx's own takes longer than the whole
        channel walk on large graphs."""
        children: dict[tuple, set] = {}
        for name in self.initializers:
            children.setdefault(("tensor", name), set())
        for name in self.inputs:
            children.setdefault(("tensor", name), set())
        for node in self.nodes:
            op = ("op", node.name)
            children.setdefault(op, set())
            for name in node.inputs + node.implicit_inputs:
                if name:
                    children.setdefault(("tensor", name), set()).add(op)
            for name in node.outputs:
                if name:
                    children[op].add(("tensor", name))
                    children.setdefault(("tensor", name), set())
        indegree: dict[tuple, int] = dict.fromkeys(children, 0)
        for targets in children.values():
            for target in targets:
                indegree[target] += 1
        ready = [vertex for vertex, degree in indegree.items() if degree == 0]
        heapq.heapify(ready)
        order: dict[str, int] = {}
        position = 0
        while ready:
            vertex = heapq.heappop(ready)
            for child in children[vertex]:
                indegree[child] -= 1
                if indegree[child] == 0:
                    heapq.heappush(ready, child)
            if vertex[0] == "tensor":
                order[vertex[1]] = position
            position += 1
        if position < len(children):
            raise nx.NetworkXUnfeasible("Graph contains a cycle or graph changed during iteration")
        return order

    @cached_property
    def nx(self) -> nx.DiGraph:
        """Bipartite dependency graph: ('op', name) and ('tensor', name) vertices."""
        g = nx.DiGraph()
        for name in self.initializers:
            g.add_node(("tensor", name), kind="initializer")
        for name in self.inputs:
            g.add_node(("tensor", name), kind="input")
        for node in self.nodes:
            g.add_node(("op", node.name), kind="op", op_type=node.op_type)
            for name in node.inputs + node.implicit_inputs:
                if name:
                    g.add_edge(("tensor", name), ("op", node.name))
            for name in node.outputs:
                if name:
                    g.add_edge(("op", node.name), ("tensor", name))
        return g


def _dim_size(dim) -> Size:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None


def _decode(index: int, node: onnx.NodeProto) -> Node:
    attrs = {}
    implicit: list[str] = []
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in graphs:
                implicit.extend(_outer_names(sub))
            attrs[attr.name] = graphs
        else:
            attrs[attr.name] = onnx.helper.get_attribute_value(attr)
    for key, value in attrs.items():
        if isinstance(value, bytes):
            attrs[key] = value.decode()
    return Node(
        index,
        node.name,
        node.op_type,
        node.domain,
        tuple(node.input),
        tuple(node.output),
        attrs,
        tuple(dict.fromkeys(implicit)),
    )


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads from its enclosing scope (If/Loop/Scan bodies)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: list[str] = []
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                used.append(name)
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                used.extend(n for n in _outer_names(sub) if n not in defined)
        defined.update(node.output)
    return used
