"""Mixture-of-experts layers as graphs hold them: where the experts, their router and their count are.

Two forms are found:

* **fused**: onnxruntime's MoE or QMoE op (what onnxruntime-genai's builder writes), its router's
  logits read through a Reshape, its experts' weights stacked along axis 0 of its inputs;
* **decomposed**: the routing written out, as exporters produce it from a framework's MoE layer:
  router logits -> (Softmax) -> TopK, the top-k indices or weights then gathering the stacked
  expert weights (Gather/GatherND: the token-wise form transformers exports) or weighting every
  expert's output (a dense [tokens, experts] matrix: the dense-dispatch form). Its experts are the
  float initializers whose axis 0 has one entry per expert, used between the router and the
  residual Add that closes the layer.

Either way the router is a MatMul (weight [H, E]) or Gemm with its weight an initializer, and an
optional bias added to it: an expert goes with its router column.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from onnx import TensorProto

from spa.core.graph import ModelGraph, Node
from spa.ops import linear, moe

FUSED, DECOMPOSED = "fused", "decomposed"
# ops the router's logits may pass through on their way to the experts' selection
_PASS = ("Reshape", "Softmax", "Sigmoid", "Cast", "Identity", "Flatten")
_GEMM, _MATMUL = linear.Gemm.ops[0], linear.MatMul.ops[0]
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclass(frozen=True)
class Router:
    """The layer that scores the experts: one column (or row) of its weight per expert."""

    node: str  # the MatMul or Gemm
    weight: str
    axis: int  # the weight's expert axis
    bias: str | None  # an initializer of E values, added by the Gemm or an Add after it
    logits: str  # the router's output with its bias


@dataclass(frozen=True)
class ExpertLayer:
    name: str  # the MoE node, or the TopK that picks the experts
    form: str  # FUSED or DECOMPOSED
    experts: int
    k: int
    router: Router
    stacked: tuple[str, ...]  # initializers whose axis 0 is the expert axis
    shape_inputs: tuple[tuple[str, int], ...]  # (Reshape, slot) whose shape ends in the expert count
    tokens: str | None = None  # the fused op's input: what its experts read
    normalized: bool = True  # the k routing weights are renormalised to sum to 1


def expert_layers(graph: ModelGraph) -> tuple[list[ExpertLayer], list[str]]:
    """The MoE layers of ``graph``, and why each routed layer that cannot lose experts cannot."""
    found, refused = [], []
    for node in graph.nodes:
        if node.domain == moe.MoE.domain and node.op_type in (*moe.MoE.ops, *moe.QMoE.ops):
            layer, why = _fused(graph, node)
        elif node.op_type == "TopK":
            layer, why = _decomposed(graph, node)
            if layer is None and why is None:
                continue
        else:
            continue
        if layer is not None:
            found.append(layer)
        else:
            refused.append(f"{node.op_type} '{node.name}': {why}")
    return _apart(found, refused)


def _apart(found: list[ExpertLayer], refused: list[str]) -> tuple[list[ExpertLayer], list[str]]:
    """The layers whose experts are their own: a decomposed layer with no residual Add to close it
    reaches the next layer's weights, which two layers then both claim."""
    claims: dict[str, int] = {}
    for layer in found:
        for name in {*layer.stacked, layer.router.weight}:
            claims[name] = claims.get(name, 0) + 1
    apart = []
    for layer in found:
        if any(claims[name] > 1 for name in layer.stacked):
            refused.append(f"'{layer.name}': its experts cannot be told apart from another layer's")
        else:
            apart.append(layer)
    return apart, refused


def _router(graph: ModelGraph, routed: str) -> tuple[Router | None, list[tuple[str, int]], str | None]:
    """The router behind ``routed`` (walking back through reshapes and a softmax), the Reshapes on
    the way, or why there is none."""
    tensor, reshapes = routed, []
    bias = None
    while True:
        node = graph.producer.get(tensor)
        if node is None:
            return None, [], f"{routed} is not computed by a router layer"
        if node.op_type in _PASS:
            if node.op_type == "Reshape":
                reshapes.append((node.name, 1))
            tensor = node.inputs[0]
            continue
        if node.op_type == "Add" and bias is None:
            stored = [name for name in node.inputs if graph.is_initializer(name)]
            if len(stored) != 1:
                return None, [], f"the Add '{node.name}' before the routing does not add a stored bias"
            bias = stored[0]
            tensor = next(name for name in node.inputs if name != bias)
            logits = node.outputs[0]
            return _router_layer(graph, tensor, bias, logits, reshapes)
        return _router_layer(graph, tensor, None, tensor, reshapes)


def _router_layer(graph: ModelGraph, tensor: str, bias: str | None, logits: str, reshapes):
    node = graph.producer.get(tensor)
    if node is None or node.op_type not in (_MATMUL, _GEMM) or not graph.is_initializer(node.input(1)):
        kind = "nothing" if node is None else f"{node.op_type} '{node.name}'"
        return None, [], f"the router logits come from {kind}, not a MatMul or Gemm with a stored weight"
    shape = graph.shape(node.inputs[1])
    if not shape or len(shape) != 2:
        return None, [], f"the router '{node.name}' has a weight of rank {len(shape or ())}"
    axis = 0 if node.op_type == _GEMM and node.attr("transB", 0) else 1
    if node.op_type == _GEMM and node.input(2):
        if bias is not None or not graph.is_initializer(node.input(2)):
            return None, [], f"the router '{node.name}' has a bias that is computed or added twice"
        bias, logits = node.input(2), node.outputs[0]
    stored = graph.const(bias) if bias is not None else None
    if bias is not None and (stored is None or stored.size != shape[axis]):
        return None, [], f"the router bias {bias} is not one value per expert"
    return Router(node.name, node.inputs[1], axis, bias, logits), reshapes, None


def _expert_shapes(graph: ModelGraph, reshapes, experts: int) -> list[tuple[str, int]] | None:
    """The Reshapes whose target ends in the expert count (the others keep it through -1)."""
    nodes = {n.name: n for n in graph.nodes}
    kept = []
    for name, slot in reshapes:
        target = graph.const_ints(nodes[name].input(slot))
        if target is None:
            return None
        if target and target[-1] == experts:
            kept.append((name, slot))
    return kept


def _fused(graph: ModelGraph, node: Node) -> tuple[ExpertLayer | None, str | None]:
    router, reshapes, why = _router(graph, node.inputs[moe.ROUTER])
    if router is None:
        return None, why
    experts = graph.static_size(router.weight, router.axis)
    extra = [name for name in node.inputs[max(moe.QMOE_SLOTS.values()) + 1 :] if name]
    if node.op_type in moe.QMoE.ops and extra:
        return None, f"it reads {extra[0]} (mixing weights or FP4/FP8 scales), which spa does not cut per expert"
    stacked = [node.input(slot) for slot in moe.expert_inputs(node)]
    if any(not graph.is_initializer(name) for name in stacked):
        return None, "its expert weights are computed, not stored"
    if experts is None or any(graph.static_size(name, 0) != experts for name in stacked):
        return None, "its expert weights and its router disagree on the number of experts"
    shapes = _expert_shapes(graph, reshapes, experts)
    if shapes is None:
        return None, "the router's logits are reshaped to a computed shape"
    k = int(node.attr("k", 1))
    normalized = bool(node.attr("normalize_routing_weights", 0))
    return (
        ExpertLayer(node.name, FUSED, experts, k, router, tuple(stacked), tuple(shapes), node.inputs[0], normalized),
        None,
    )


def _decomposed(graph: ModelGraph, node: Node) -> tuple[ExpertLayer | None, str | None]:
    """A TopK over router logits; (None, None) for a TopK that does not pick experts."""
    router, reshapes, why = _router(graph, node.inputs[0])
    if router is None:
        return None, None
    experts = graph.static_size(router.weight, router.axis)
    k = graph.const_ints(node.input(1))
    rank = len(graph.shape(node.inputs[0]) or ())
    if experts is None or k is None or len(k) != 1 or node.attr("axis", -1) not in (-1, rank - 1):
        return None, "its k is computed, or it does not pick along the router's expert axis"
    shapes = _expert_shapes(graph, reshapes, experts)
    if shapes is None:
        return None, "the router's logits are reshaped to a computed shape"
    upstream = _ancestors(graph, [node.inputs[0]])
    region = _ancestors(graph, _layer_end(graph, node, upstream)) - upstream
    stacked = sorted(
        name
        for name in _inputs_of(graph, region)
        if graph.is_initializer(name)
        and graph.dtypes.get(name) in _FLOATS
        and len(graph.shape(name) or ()) >= 2
        and graph.static_size(name, 0) == experts
    )
    if not stacked:
        return None, "no stored expert weights with one entry per expert were found after it"
    return ExpertLayer(node.name, DECOMPOSED, experts, k[0], router, tuple(stacked), tuple(shapes)), None


def _ancestors(graph: ModelGraph, tensors: Iterable[str]) -> set[str]:
    """The tensors ``tensors`` are computed from (themselves included)."""
    seen: set[str] = set()
    stack = list(tensors)
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        producer = graph.producer.get(tensor)
        if producer is not None:
            stack.extend(name for name in producer.inputs if name)
    return seen


def _layer_end(graph: ModelGraph, topk: Node, upstream: set[str]) -> list[str]:
    """Where the expert layer ends: the first Add after the TopK that adds back a tensor from
    before it (the residual connection), else the graph outputs."""
    order = graph.tensor_order
    frontier, seen = list(topk.outputs), set()
    adds = []
    while frontier:
        tensor = frontier.pop()
        for consumer in graph.consumers.get(tensor, []):
            if consumer.index in seen:
                continue
            seen.add(consumer.index)
            if consumer.op_type == "Add" and any(name in upstream for name in consumer.inputs):
                adds.append(consumer)
                continue
            frontier.extend(consumer.outputs)
    if adds:
        first = min(adds, key=lambda n: order.get(n.outputs[0], 0))
        return [first.outputs[0]]
    return list(graph.outputs)


def _inputs_of(graph: ModelGraph, region: set[str]) -> set[str]:
    return {name for tensor in region if (p := graph.producer.get(tensor)) for name in p.inputs if name}
