"""Params and FLOPs, measured from the model's own tensors and inferred shapes.

Conventions (the same before and after pruning, so the two compare):

- A multiply-add is 2 FLOPs; integer ops (ConvInteger, QLinearConv, ...) count like float ones.
  Math functions (exp, erf, tanh, sqrt) count 1 per element, like an add.
- Every size comes from an inferred shape or an attribute. A symbolic or unknown axis (batch,
  sequence) counts as 1, so figures are per sample and, for sequence models, per token. A node
  whose shapes are unknown counts 0. Data movement (Reshape, Transpose, Gather, Cast, ...) and
  (De)QuantizeLinear count 0.
- Attention is dense: masked (causal) scores are counted, as kernels compute them. With a KV
  cache the key length is the new keys plus the cache's sequence axis (for GroupQueryAttention a
  preallocated buffer's length: an upper bound).
- Recurrent ops run every step of X's sequence axis (``sequence_lens`` is data: ignored).
- If counts its costlier branch; Loop counts its body once (the trip count is data); Scan counts
  its body once per step of its first scan input. Shapes inside bodies come from the bodies' own
  value_info and the enclosing scope; body nodes whose shapes are unknown count 0.

Per-element constants (per output element): BatchNormalization 2 (folded scale and shift);
Softmax/LogSoftmax 5 (max, subtract, exp, sum, divide); LayerNorm-style moments 5 (mean 1,
centre 1, variance 2, normalise 1) plus 1 for the scale and 1 for a shift; RMS-style 3 (square,
sum, normalise) plus 1 for the scale; Gelu 5 (its ONNX function: divide, erf, add, multiply,
multiply) or 9 in tanh form; a Skip* norm adds 1 for the residual and 1 for its bias; an activation
(and a sum) fused into a convolution (FusedConv) count 1 per output element each, as their own nodes did.

Params are the elements of weight tensors: floating-point initializers (and Constant values in
bodies) that some node reads, plus integer initializers read as quantised weights (the data of
DequantizeLinear, the weight operands of QLinearConv/ConvInteger/QLinearMatMul/MatMulInteger).
Quantisation scales and zero points (metadata of those weights) and recurrent initial states are
not parameters. A tensor read by several nodes counts once; one that no node reads does not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from spa.core.graph import ModelGraph, Node
from spa.formats.quantized import is_rescaling_factor
from spa.ops.base import Operator
from spa.ops.cost import size
from spa.ops.registry import DEFAULT, Registry

_FLOAT_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT",
        "FLOAT16",
        "BFLOAT16",
        "DOUBLE",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
        "FLOAT8E8M0",
        "FLOAT4E2M1",
    )
    if hasattr(onnx.TensorProto, name)
)
# which input slots hold quantised weight data, and which are never weights (scales, zero
# points, recurrent initial states), each operator says (``quantized_data_inputs``,
# ``not_parameter_inputs``, ``scales_only``)
_DATA_MOVEMENT = {"Expand", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast", "Tile", "Transpose"}


@dataclass(frozen=True)
class NodeCost:
    """One main-graph node's share; an If/Loop/Scan carries what its bodies hold and compute."""

    name: str
    op_type: str
    flops: int
    params: int  # parameter elements first read here (a shared tensor counts at its first reader)
    unsized: bool = False  # an op that computes, counted 0 because its output shape is unknown


@dataclass
class ModelStats:
    params: int
    flops: int
    node_flops: dict[str, int] = field(default_factory=dict)
    nodes: list[NodeCost] = field(default_factory=list)  # nodes with FLOPs or params, in graph order

    def as_dict(self) -> dict:
        return {"params": self.params, "flops": self.flops}

    def uncounted(self) -> dict[str, int]:
        """Op types (and how many nodes) whose FLOPs are missing from ``flops``: shape inference
        did not reach their outputs (onnx knows no shapes for most com.microsoft ops)."""
        totals: dict[str, int] = {}
        for node in self.nodes:
            if node.unsized:
                totals[node.op_type] = totals.get(node.op_type, 0) + 1
        return totals

    def per_op_type(self) -> dict[str, int]:
        """FLOPs per op type, costliest first (op types that compute nothing left out)."""
        totals: dict[str, int] = {}
        for node in self.nodes:
            if node.flops:
                totals[node.op_type] = totals.get(node.op_type, 0) + node.flops
        return dict(sorted(totals.items(), key=lambda item: -item[1]))


def count(graph: ModelGraph, registry: Registry = DEFAULT) -> ModelStats:
    """Params and FLOPs of the graph, with each node's share; each operator of ``registry``
    knows its own cost and which of its inputs are parameters."""
    seen: set[str] = set()
    nodes = [
        cost
        for cost in (_node_cost(graph, node, seen, registry) for node in graph.nodes)
        if cost.flops or cost.params or cost.unsized
    ]
    return ModelStats(
        sum(n.params for n in nodes), sum(n.flops for n in nodes), {n.name: n.flops for n in nodes if n.flops}, nodes
    )


def _node_cost(graph: ModelGraph, node: Node, seen: set[str], registry: Registry) -> NodeCost:
    params = _params_read(graph, node, seen, registry)
    body_costs = [count(_body_scope(graph, body), registry) for body in bodies(node)]
    if body_costs:
        flops = _control_flow_flops(graph, node, [b.flops for b in body_costs])
        params += sum(b.params for b in body_costs)
    else:
        operator = registry.of(node)
        cost = operator.flops(graph, node) if operator is not None else None
        flops = cost or 0
        if cost is not None and not flops and any(graph.shape(out) is None for out in node.outputs if out):
            return NodeCost(node.name, node.op_type, 0, params, unsized=True)
    return NodeCost(node.name, node.op_type, flops, params)


# ---------------------------------------------------------------- params


def _params_read(graph: ModelGraph, node: Node, seen: set[str], registry: Registry) -> int:
    total = _constant_params(graph, node, registry)
    operator = registry.of(node) or _NOTHING
    for slot, name in enumerate(node.inputs + node.implicit_inputs):
        tensor = graph.initializers.get(name)
        if tensor is not None and name not in seen and _is_weight(graph, name, tensor.data_type, registry):
            if node.op_type in _DATA_MOVEMENT and _read_packed_elsewhere(graph, name, registry):
                continue  # counted where it is read packed, as values rather than bytes
            seen.add(name)
            total += operator.parameter_elements(node, slot, tensor.dims)
    return total


def _read_packed_elsewhere(graph: ModelGraph, name: str, registry: Registry) -> bool:
    """Whether an op reads ``name`` as quantized data directly: a tied table that an embedding
    reads reshaped and the LM head reads packed."""
    for node in graph.consumers.get(name, ()):
        operator = registry.of(node) or _NOTHING
        if any(node.input(slot) == name for slot in operator.quantized_data_inputs):
            return True
    return False


def _is_weight(graph: ModelGraph, name: str, data_type: int, registry: Registry) -> bool:
    if data_type in _FLOAT_TYPES:
        return _read_as_weight(graph, name, registry)
    return _read_as_quantised_data(graph, name, registry)


_NOTHING = Operator()  # an op spa does not know: no input has a role


def _read_as_quantised_data(graph: ModelGraph, name: str, registry: Registry) -> bool:
    """Integers some op dequantizes or multiplies as a weight, directly or after rows are
    gathered or moved (quantize_dynamic gathers an int8 embedding table, then dequantizes)."""
    for node in graph.consumers.get(name, ()):
        operator = registry.of(node) or _NOTHING
        if any(node.input(slot) == name for slot in operator.quantized_data_inputs):
            return True
        if (
            (node.op_type in _DATA_MOVEMENT or operator.gathers_rows)
            and node.input(0) == name
            and _read_as_quantised_data(graph, node.outputs[0], registry)
        ):
            return True
    return False


def _read_as_weight(graph: ModelGraph, name: str, registry: Registry) -> bool:
    """Whether some node reads ``name`` as a weight, directly or through data movement; not
    when every use is a scale, a zero point or an initial state (such as the zero states the
    legacy torch exporter stores and Expands to the batch size)."""
    for node in graph.consumers.get(name, ()):
        operator = registry.of(node) or _NOTHING
        if node.op_type.startswith("QLinear") or operator.scales_only:
            continue  # the quantized operator format's float inputs are all scales
        if node.op_type == "Mul" and is_rescaling_factor(graph, name):
            continue  # dynamic quantization's weight scale
        for slot, read in enumerate(node.inputs + node.implicit_inputs):
            if read != name or slot in operator.not_parameter_inputs:
                continue
            if node.op_type not in _DATA_MOVEMENT or _read_as_weight(graph, node.outputs[0], registry):
                return True
    return False


def _constant_params(graph: ModelGraph, node: Node, registry: Registry) -> int:
    """Weights left in Constant nodes: load turns the main graph's into initializers, not bodies'."""
    value = node.attr("value") if node.op_type == "Constant" else None
    if (
        isinstance(value, onnx.TensorProto)
        and value.data_type in _FLOAT_TYPES
        and _read_as_weight(graph, node.outputs[0], registry)
    ):
        return math.prod(value.dims)
    return 0


# ---------------------------------------------------------------- subgraphs


def bodies(node: Node) -> list[onnx.GraphProto]:
    """The subgraphs a node carries (If branches, Loop and Scan bodies, a custom op's graphs)."""
    return [
        g for value in node.attrs.values() if isinstance(value, list) for g in value if isinstance(g, onnx.GraphProto)
    ]


def _body_scope(outer: ModelGraph, body: onnx.GraphProto) -> ModelGraph:
    """A body as a graph of its own that also sees the shapes of its enclosing scope."""
    model = onnx.ModelProto()
    model.graph.CopyFrom(body)
    scope = ModelGraph(model)
    scope.shapes = {**outer.shapes, **scope.shapes}
    return scope


def _control_flow_flops(graph: ModelGraph, node: Node, bodies: list[int]) -> int:
    if node.op_type == "If":
        return max(bodies)  # one branch runs
    if node.op_type == "Scan":
        return _scan_steps(graph, node) * sum(bodies)
    return sum(bodies)  # Loop: once, its trip count being data


def _scan_steps(graph: ModelGraph, node: Node) -> int:
    """The scan axis of the first scan input (opset 9+: scan inputs are the last inputs)."""
    first = node.inputs[len(node.inputs) - node.attr("num_scan_inputs", 1)]
    axis = (node.attr("scan_input_axes") or [0])[0]
    shape = graph.shape(first)
    return size(shape[axis]) if shape and -len(shape) <= axis < len(shape) else 1
