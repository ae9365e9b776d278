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
multiply) or 9 in tanh form; a Skip* norm adds 1 for the residual and 1 for its bias.

Params are the elements of weight tensors: floating-point initializers (and Constant values in
bodies) that some node reads, plus integer initializers read as quantised weights (the data of
DequantizeLinear, the weight operands of QLinearConv/ConvInteger/QLinearMatMul/MatMulInteger).
Quantisation scales and zero points (metadata of those weights) and recurrent initial states are
not parameters. A tensor read by several nodes counts once; one that no node reads does not count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import onnx

from spa.core.graph import ModelGraph, Node
from spa.formats.quantized import is_rescaling_factor

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
# input slots whose tensor is a (quantised) weight whatever its element type
_QUANTISED_DATA = {
    "DequantizeLinear": (0,),
    "QLinearConv": (3, 8),
    "ConvInteger": (1,),
    "QLinearMatMul": (0, 3),
    "MatMulInteger": (0, 1),
    "QGemm": (0, 3, 6),
}
# input slots that are never weights: scales and zero points describe a quantised tensor;
# a recurrent op's initial state is data (exporters store zero states as initializers)
_NOT_WEIGHTS = {
    "DequantizeLinear": (1, 2),
    "QuantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "ConvInteger": (2, 3),
    "MatMulInteger": (2, 3),
    "LSTM": (5, 6),
    "GRU": (5,),
    "RNN": (5,),
}
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


def count(graph: ModelGraph) -> ModelStats:
    """Params and FLOPs of the graph, with each node's share."""
    seen: set[str] = set()
    nodes = [
        cost
        for cost in (_node_cost(graph, node, seen) for node in graph.nodes)
        if cost.flops or cost.params or cost.unsized
    ]
    return ModelStats(
        sum(n.params for n in nodes), sum(n.flops for n in nodes), {n.name: n.flops for n in nodes if n.flops}, nodes
    )


def _node_cost(graph: ModelGraph, node: Node, seen: set[str]) -> NodeCost:
    params = _params_read(graph, node, seen)
    body_costs = [count(_body_scope(graph, body)) for body in bodies(node)]
    if body_costs:
        flops = _control_flow_flops(graph, node, [b.flops for b in body_costs])
        params += sum(b.params for b in body_costs)
    else:
        cost = _COSTS.get((_domain(node), node.op_type))
        flops = cost(graph, node) if cost else 0
        if cost and not flops and any(graph.shape(out) is None for out in node.outputs if out):
            return NodeCost(node.name, node.op_type, 0, params, unsized=True)
    return NodeCost(node.name, node.op_type, flops, params)


# ---------------------------------------------------------------- params


def _params_read(graph: ModelGraph, node: Node, seen: set[str]) -> int:
    total = _constant_params(graph, node)
    for name in dict.fromkeys(node.inputs + node.implicit_inputs):
        tensor = graph.initializers.get(name)
        if tensor is not None and name not in seen and _is_weight(graph, name, tensor.data_type):
            seen.add(name)
            total += math.prod(tensor.dims)
    return total


def _is_weight(graph: ModelGraph, name: str, data_type: int) -> bool:
    if data_type in _FLOAT_TYPES:
        return _read_as_weight(graph, name)
    return _read_as_quantised_data(graph, name)


def _read_as_quantised_data(graph: ModelGraph, name: str) -> bool:
    """Integers some op dequantizes or multiplies as a weight, directly or after rows are
    gathered or moved (quantize_dynamic gathers an int8 embedding table, then dequantizes)."""
    for node in graph.consumers.get(name, ()):
        if any(node.input(slot) == name for slot in _QUANTISED_DATA.get(node.op_type, ())):
            return True
        if (
            (node.op_type in _DATA_MOVEMENT or node.op_type == "Gather")
            and node.input(0) == name
            and _read_as_quantised_data(graph, node.outputs[0])
        ):
            return True
    return False


def _read_as_weight(graph: ModelGraph, name: str) -> bool:
    """Whether some node reads ``name`` as a weight, directly or through data movement; not
    when every use is a scale, a zero point or an initial state (such as the zero states the
    legacy torch exporter stores and Expands to the batch size)."""
    for node in graph.consumers.get(name, ()):
        if node.op_type.startswith("QLinear") or node.op_type == "QGemm":
            continue  # the quantized operator format's float inputs are all scales
        if node.op_type == "Mul" and is_rescaling_factor(graph, name):
            continue  # dynamic quantization's weight scale
        for slot, read in enumerate(node.inputs + node.implicit_inputs):
            if read != name or slot in _NOT_WEIGHTS.get(node.op_type, ()):
                continue
            if node.op_type not in _DATA_MOVEMENT or _read_as_weight(graph, node.outputs[0]):
                return True
    return False


def _constant_params(graph: ModelGraph, node: Node) -> int:
    """Weights left in Constant nodes: load turns the main graph's into initializers, not bodies'."""
    value = node.attr("value") if node.op_type == "Constant" else None
    if (
        isinstance(value, onnx.TensorProto)
        and value.data_type in _FLOAT_TYPES
        and _read_as_weight(graph, node.outputs[0])
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
    return _size(shape[axis]) if shape and -len(shape) <= axis < len(shape) else 1


# ---------------------------------------------------------------- sizes


def _size(dim) -> int:
    return dim if isinstance(dim, int) and dim > 0 else 1


def _numel(shape: Sequence) -> int:
    return math.prod(_size(d) for d in shape)


def _broadcast_numel(*shapes: Sequence) -> int:
    """Elements of the numpy broadcast of ``shapes``."""
    rank = max(map(len, shapes), default=0)
    padded = [(1,) * (rank - len(s)) + tuple(_size(d) for d in s) for s in shapes]
    return math.prod(max(column) for column in zip(*padded))


def _in(graph: ModelGraph, node: Node, slot: int):
    name = node.input(slot)
    return graph.shape(name) if name else None


def _output_shape(graph: ModelGraph, node: Node):
    return graph.shape(node.outputs[0]) if node.outputs and node.outputs[0] else None


def _elements(graph: ModelGraph, node: Node) -> int:
    """Output elements of an element-wise op or a norm; where the output's shape was not inferred
    (contrib ops onnxruntime's inference skips), those of the broadcast of its inputs."""
    shape = _output_shape(graph, node)
    if shape is not None:
        return _numel(shape)
    # per-channel scales sit on axis 1 and do not broadcast from the right
    slots = [0] if node.op_type in _CHANNEL_NORMS else [i for i in range(len(node.inputs)) if node.input(i)]
    shapes = [_in(graph, node, i) for i in slots]
    return 0 if not shapes or any(s is None for s in shapes) else _broadcast_numel(*shapes)


def _domain(node: Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


# ---------------------------------------------------------------- cost registry

CostFn = Callable[[ModelGraph, Node], int]
_COSTS: dict[tuple[str, str], CostFn] = {}
_MS = "com.microsoft"


def _register(*ops: str, domains: tuple[str, ...] = ("",)):
    def add(fn: CostFn) -> CostFn:
        for domain in domains:
            for op in ops:
                _COSTS[(domain, op)] = fn
        return fn

    return add


def _conv(w_slot: int, bias_slot: int | None, graph: ModelGraph, node: Node) -> int:
    y, w = _output_shape(graph, node), _in(graph, node, w_slot)
    if y is None or w is None or len(w) < 2:
        return 0
    # every output element meets C/group input channels times the kernel (W is [M, C/group, k...]);
    # strides, dilations and pads act through the inferred output shape
    out = _numel(y)
    bias = out if bias_slot is not None and node.input(bias_slot) else 0
    return 2 * out * _numel(w[1:]) + bias


def _conv_transpose(graph: ModelGraph, node: Node) -> int:
    x, w, y = _in(graph, node, 0), _in(graph, node, 1), _output_shape(graph, node)
    if x is None or w is None or len(w) < 2:
        return 0
    # every input element is scattered through M/group output channels times the kernel
    # (W is [C, M/group, k...]); outputs later cropped by pads are counted
    bias = _numel(y) if node.input(2) and y is not None else 0
    return 2 * _numel(x) * _numel(w[1:]) + bias


def _gemm(b_slot: int, bias_slot: int, graph: ModelGraph, node: Node) -> int:
    a, b = _in(graph, node, 0), _in(graph, node, b_slot)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return 0
    m, k = (a[1], a[0]) if node.attr("transA", 0) else a
    n = b[0] if node.attr("transB", 0) else b[1]
    outputs = _size(m) * _size(n)
    return 2 * outputs * _size(k) + (outputs if node.input(bias_slot) else 0)


def _matmul(b_slot: int, graph: ModelGraph, node: Node) -> int:
    a, b = _in(graph, node, 0), _in(graph, node, b_slot)
    if not a or not b:
        return 0
    m = a[-2] if len(a) > 1 else 1
    n = b[-1] if len(b) > 1 else 1
    return 2 * _broadcast_numel(a[:-2], b[:-2]) * _size(m) * _size(n) * _size(a[-1])


def _einsum(graph: ModelGraph, node: Node) -> int:
    shapes = [graph.shape(name) for name in node.inputs]
    equation = node.attr("equation", "").replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if any(s is None for s in shapes) or len(terms) != len(shapes):
        return 0
    sizes: dict[str | int, int] = {}
    for term, shape in zip(terms, shapes):
        for label, dim in zip(_einsum_labels(term, len(shape)), shape):
            sizes[label] = max(sizes.get(label, 1), _size(dim))
    letters = [c for c in lhs if c.isalpha()]
    kept = set(rhs) if arrow else {c for c in letters if letters.count(c) == 1}
    summed = any(isinstance(label, str) and label not in kept for label in sizes)
    # evaluated naively: at every point of the joint index space one multiply per extra
    # operand, and one add when an index is summed out (a two-operand contraction: 2 per point)
    return math.prod(sizes.values()) * (len(terms) - 1 + summed)


def _einsum_labels(term: str, rank: int) -> list[str | int]:
    """A term's index labels; the axes under '...' get integer labels counted from the right,
    so they line up (and broadcast) across operands as numpy aligns them."""
    head, ellipsis, tail = term.partition("...")
    if not ellipsis:
        return list(term)
    width = rank - len(head) - len(tail)
    return list(head) + list(range(width - 1, -1, -1)) + list(tail)


_register("Conv")(partial(_conv, 1, 2))
_register("QLinearConv")(partial(_conv, 3, 8))
_register("ConvInteger")(partial(_conv, 1, None))
_register("ConvTranspose")(_conv_transpose)
_register("Gemm")(partial(_gemm, 1, 2))
_register("QGemm", domains=("com.microsoft",))(partial(_gemm, 3, 6))
_register("MatMul", "MatMulInteger")(partial(_matmul, 1))
_register("QLinearMatMul")(partial(_matmul, 3))
_register("Einsum")(_einsum)


# ---------------------------------------------------------------- per-element ops

_CHANNEL_NORMS = ("BatchNormalization", "InstanceNormalization", "GroupNormalization")
_ELEMENTWISE = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Mod",
    "Where",
    "PRelu",
    "Relu",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "ThresholdedRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Softplus",
    "Softsign",
    "Mish",
    "Clip",
    "Sqrt",
    "Exp",
    "Log",
    "Erf",
    "Sin",
    "Cos",
    "Neg",
    "Abs",
    "Reciprocal",
)
_SOFTMAX = 5  # max, subtract, exp, sum, divide
_MOMENTS = 5  # mean 1, centre 1, variance (square, sum) 2, normalise 1
_RMS = 3  # square, sum, normalise
_GELU = 5  # x/sqrt(2), erf, +1, *x, *0.5
_GELU_TANH = 9  # x^3 (2), *0.044715, +x, *sqrt(2/pi), tanh, +1, *x, *0.5


def _per_element(base: int, *optional_slots: int) -> CostFn:
    """``base`` FLOPs per output element, plus one per optional input present (a bias or shift)."""

    def cost(graph: ModelGraph, node: Node) -> int:
        return _elements(graph, node) * (base + sum(1 for slot in optional_slots if node.input(slot)))

    return cost


def _variadic(extra: int) -> CostFn:
    """n - 1 combining FLOPs per output element for n inputs, plus ``extra`` (Mean's divide)."""

    def cost(graph: ModelGraph, node: Node) -> int:
        return _elements(graph, node) * (len([i for i in node.inputs if i]) - 1 + extra)

    return cost


def _gelu(graph: ModelGraph, node: Node) -> int:
    return _elements(graph, node) * (_GELU_TANH if node.attr("approximate", "none") == "tanh" else _GELU)


def _window(graph: ModelGraph, node: Node) -> int:
    y = _output_shape(graph, node)
    return 0 if y is None else _numel(y) * _numel(node.attr("kernel_shape", []))


def _per_input_element(k: int) -> CostFn:
    def cost(graph: ModelGraph, node: Node) -> int:
        x = _in(graph, node, 0)
        return 0 if x is None else k * _numel(x)

    return cost


_BOTH = ("", _MS)  # onnxruntime registers some of these in the ONNX domain, some in its own
_register(*_ELEMENTWISE)(_per_element(1))
_register("Sum", "Max", "Min")(_variadic(0))
_register("Mean")(_variadic(1))
_register("Softmax", "LogSoftmax")(_per_element(_SOFTMAX))
_register("BatchNormalization")(_per_element(2))
_register("InstanceNormalization", "GroupNormalization")(_per_element(_MOMENTS + 2))
_register("MeanVarianceNormalization")(_per_element(_MOMENTS))
_register("LayerNormalization", domains=_BOTH)(_per_element(_MOMENTS + 1, 2))
_register("RMSNormalization", "SimplifiedLayerNormalization", domains=_BOTH)(_per_element(_RMS + 1))
_register("SkipLayerNormalization", domains=_BOTH)(_per_element(1 + _MOMENTS + 1, 3, 4))
_register("SkipSimplifiedLayerNormalization", domains=_BOTH)(_per_element(1 + _RMS + 1, 3))
_register("Gelu", domains=_BOTH)(_gelu)
_register("BiasGelu", domains=(_MS,))(_per_element(1 + _GELU))
_register("FastGelu", domains=(_MS,))(_per_element(_GELU_TANH, 1))
_register("QuickGelu", domains=(_MS,))(_per_element(3))  # x * sigmoid(alpha * x)
_register("MaxPool", "AveragePool", "LpPool")(_window)
_register("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd")(
    _per_input_element(1)
)
_register("ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")(_per_input_element(2))


# ---------------------------------------------------------------- recurrent

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# per hidden unit and step, besides the gate products and biases:
# LSTM: 3 sigmoids, 2 tanh, c = f*c + i*g (3), h = o*tanh(c) (1);
# GRU: 2 sigmoids, tanh, r applied to h or to R*h (1: the same count with linear_before_reset),
#      h = (1-z)*n + z*h (4); RNN: the activation
_GATE_MATH = {"LSTM": 9, "GRU": 8, "RNN": 1}


@_register("LSTM", "GRU", "RNN")
def _recurrent(graph: ModelGraph, node: Node) -> int:
    x, w = _in(graph, node, 0), _in(graph, node, 1)
    if x is None or w is None or len(x) != 3 or len(w) != 3:
        return 0
    directions, gate_rows, inputs = (_size(d) for d in w)  # W is [directions, gates * H, I]
    hidden = node.attr("hidden_size") or gate_rows // _GATES[node.op_type]
    steps, batch = (x[1], x[0]) if node.attr("layout", 0) else (x[0], x[1])
    per_step = 2 * gate_rows * (inputs + hidden) + _GATE_MATH[node.op_type] * hidden
    if node.input(3):
        per_step += 2 * gate_rows  # both bias vectors (Wb and Rb) are added
    if node.op_type == "LSTM" and node.input(7):
        per_step += 6 * hidden  # peepholes: 3 multiplies, 3 adds
    return per_step * _size(steps) * _size(batch) * directions


# ---------------------------------------------------------------- attention


def _attention_core(b: int, heads: int, s: int, length: int, d_qk: int, d_v: int) -> int:
    """Q K^T, a scale and a softmax per score, then the scores times V; widths over all heads."""
    return 2 * b * s * length * d_qk + (1 + _SOFTMAX) * b * heads * s * length + 2 * b * s * length * d_v


def _past_length(shape, axis: int) -> int:
    return _size(shape[axis]) if shape is not None and len(shape) > axis else 0


@_register("Attention", domains=(_MS,))
def _ms_attention(graph: ModelGraph, node: Node) -> int:
    """Includes the QKV input projection: input [B, S, D_in] times weights [D_in, D_q + D_k + D_v]."""
    x, w = _in(graph, node, 0), _in(graph, node, 1)
    if x is None or w is None or len(x) != 3 or len(w) != 2:
        return 0
    b, s, d_in = (_size(d) for d in x)
    d_q, d_k, d_v = node.attr("qkv_hidden_sizes") or [_size(w[1]) // 3] * 3
    length = s + _past_length(_in(graph, node, 4), 3)  # past is [2, B, N, P, H]
    projection = 2 * b * s * d_in * (d_q + d_k + d_v) + (b * s * (d_q + d_k + d_v) if node.input(2) else 0)
    return projection + _attention_core(b, node.attr("num_heads", 1), s, length, d_q, d_v)


def _mha_widths(q, k, v, heads: int) -> tuple[int, int, int] | None:
    """(new key length, Q/K width, V width) for MultiHeadAttention's input layouts."""
    if k is None:
        return (_size(q[1]), heads * _size(q[4]), heads * _size(q[4])) if len(q) == 5 else None  # [B,S,N,3,H]
    if len(k) == 5:
        return _size(k[1]), _size(q[2]), heads * _size(k[4])  # packed KV [B, L, N, 2, H]
    if v is None:
        return None
    if len(k) == 4:
        return _size(k[2]), _size(q[2]), heads * _size(v[3])  # per head [B, N, L, H]
    return _size(k[1]), _size(q[2]), _size(v[2])


@_register("MultiHeadAttention", domains=(_MS,))
def _ms_multi_head_attention(graph: ModelGraph, node: Node) -> int:
    q = _in(graph, node, 0)
    heads = node.attr("num_heads", 1)
    widths = None if q is None or len(q) < 3 else _mha_widths(q, _in(graph, node, 1), _in(graph, node, 2), heads)
    if widths is None:
        return 0
    new, d_qk, d_v = widths
    b, s = _size(q[0]), _size(q[1])
    bias = b * (s * d_qk + new * (d_qk + d_v)) if node.input(3) else 0
    length = new + _past_length(_in(graph, node, 6), 2)  # past_key is [B, N, P, H]
    return bias + _attention_core(b, heads, s, length, d_qk, d_v)


@_register("GroupQueryAttention", domains=(_MS,))
def _ms_group_query_attention(graph: ModelGraph, node: Node) -> int:
    """Each of the query heads reads its group's K and V head, so it costs as many full heads."""
    q, k = _in(graph, node, 0), _in(graph, node, 1)
    heads = node.attr("num_heads", 1)
    kv_heads = node.attr("kv_num_heads", heads)
    if q is None or len(q) != 3 or (node.input(1) and (k is None or len(k) != 3)):
        return 0
    b, s, width = (_size(d) for d in q)
    # packed QKV when key is absent: [B, S, (N + 2 N_kv) H]
    head = _size(k[2]) // kv_heads if node.input(1) else width // (heads + 2 * kv_heads)
    d_q, d_kv = heads * head, kv_heads * head
    length = s + _past_length(_in(graph, node, 3), 2)  # past_key is [B, N_kv, P, H]
    rotary = 3 * b * s * (d_q + d_kv) if node.attr("do_rotary", 0) else 0  # x*cos + rotate(x)*sin
    return rotary + _attention_core(b, heads, s, length, d_q, d_q)


@_register("Attention")
def _attention(graph: ModelGraph, node: Node) -> int:
    """ONNX Attention (opset 23): Q, K, V as [B, N, S, H], or [B, S, N*H] with head-count attrs."""
    q, k, v = (_in(graph, node, i) for i in range(3))
    if q is None or k is None or v is None or not len(q) == len(k) == len(v) or len(q) not in (3, 4):
        return 0
    if len(q) == 4:
        b, heads, s, head = (_size(d) for d in q)
        new, d_qk, d_v = _size(k[2]), heads * head, heads * _size(v[3])
    else:
        heads, kv_heads = node.attr("q_num_heads", 1), node.attr("kv_num_heads", 1)
        b, s, d_qk = (_size(d) for d in q)
        new, d_v = _size(k[1]), _size(v[2]) // kv_heads * heads
    length = new + _past_length(_in(graph, node, 4), 2)  # past_key is [B, N_kv, P, H]
    return _attention_core(b, heads, s, length, d_qk, d_v)
