"""Gemm and MatMul: the contraction axis couples A and B, the free axes reach Y."""

from __future__ import annotations

import onnx

from spa.core.coupling import Dim, LinkSet, Sink
from spa.core.graph import ModelGraph, Node
from spa.ops import cost
from spa.ops.base import PRODUCT, CostFn, Operator, static_weight_dims
from spa.ops.isolate import float_input, lone_model, static_shape
from spa.ops.linear_view import LinearLayer, added_bias, is_static, numel, owned


def transposed(node: Node | onnx.NodeProto, operand: str = "B") -> bool:
    """Whether Gemm (or QGemm) reads operand "A" or "B" transposed."""
    name = f"trans{operand}"
    if isinstance(node, onnx.NodeProto):
        return any(a.name == name and a.i for a in node.attribute)
    return bool(node.attr(name, 0))


def gemm_cost(b_slot: int, bias_slot: int) -> CostFn:
    """A Gemm of input 0 by the input at ``b_slot``, plus the bias at ``bias_slot`` when present."""

    def flops(graph: ModelGraph, node: Node) -> int:
        a, b = cost.input_shape(graph, node, 0), cost.input_shape(graph, node, b_slot)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return 0
        m, k = (a[1], a[0]) if transposed(node, "A") else a
        n = b[0] if transposed(node) else b[1]
        outputs = cost.size(m) * cost.size(n)
        return 2 * outputs * cost.size(k) + (outputs if node.input(bias_slot) else 0)

    return flops


def gemm_weight_side(node: Node, axis: int) -> str:
    """The side of B's ``axis``: B is [K, N], or [N, K] with transB."""
    return "out" if (axis == 0) == transposed(node) else "in"


class _Dense(Operator):
    """A layer whose weight is a matrix: reports name its sides, and (by an initializer) its widths."""

    layer_kind = "dense"
    weight_inputs: tuple[int, ...] = (0, 1)
    zero_kinds = {"Gemm": PRODUCT, "MatMul": PRODUCT}

    def layer_widths(self, graph, node):
        dims = static_weight_dims(graph, node)
        # a product of two activations (attention scores) is not a layer with channels
        if dims is None or not graph.is_initializer(node.input(1)):
            return None
        return self._widths(node, dims)

    def _widths(self, node, dims):
        return (dims[-2], dims[-1]) if len(dims) >= 2 else None

    def isolated(self, graph, node, in_width, out_width):
        a, b = static_shape(graph, node.inputs[0]), static_shape(graph, node.input(1))
        if a is None or b is None or len(b) != 2 or not graph.is_initializer(node.input(1)):
            return None
        if graph.is_initializer(node.inputs[0]) or not float_input(graph, node.inputs[0]):
            return None
        return self._isolated(node, a, in_width, out_width)

    def _isolated(self, node, a, in_width, out_width):
        return lone_model(node, (*a[:-1], in_width), [(in_width, out_width)])


class Gemm(_Dense):
    ops = ("Gemm",)
    bias_input = 2
    costs = {"Gemm": gemm_cost(1, 2)}

    def _axes(self, node):
        a_m, a_k = (1, 0) if transposed(node, "A") else (0, 1)
        b_k, b_n = (1, 0) if transposed(node) else (0, 1)
        return a_m, a_k, b_k, b_n

    def weight_side(self, node, index, axis):
        return gemm_weight_side(node, axis) if index == 1 else None

    def _isolated(self, node, a, in_width, out_width):
        if transposed(node, "A") or len(a) != 2:
            return None
        weight = (out_width, in_width) if transposed(node) else (in_width, out_width)
        return lone_model(node, (a[0], in_width), [weight, (out_width,) if node.input(2) else None])

    def _widths(self, node, dims):
        if len(dims) != 2:
            return None
        return (dims[1], dims[0]) if transposed(node) else (dims[0], dims[1])

    def linear(self, graph, node):
        if len(node.inputs) < 2:
            return None
        x, w = node.inputs[0], node.inputs[1]
        if not x or graph.is_initializer(x) or not owned(graph, w):
            return None
        w_shape = graph.shape(w)
        if not w_shape or any(not isinstance(s, int) for s in w_shape) or transposed(node, "A"):
            return None
        trans_b = transposed(node)
        out = w_shape[0] if trans_b else w_shape[1]
        bias = node.input(2) if owned(graph, node.input(2)) and numel(graph, node.input(2)) == out else None
        return LinearLayer(node, w, 1 if trans_b else 0, Dim(x, 1), bias, feeds_residual=True)

    def seeds(self, node, ctx):
        _, _, b_k, b_n = self._axes(node)
        return [Dim(node.inputs[1], b_k), Dim(node.inputs[1], b_n)]

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        if links.answered(node):
            return links.out
        a, b, y, c = node.inputs[0], node.inputs[1], node.outputs[0], node.input(2)
        a_m, a_k, b_k, b_n = self._axes(node)
        links.same(Dim(a, a_k), Dim(b, b_k))
        links.add(Sink((Dim(a, a_k), Dim(b, b_k))))
        links.same(Dim(b, b_n), Dim(y, 1))
        links.same(Dim(a, a_m), Dim(y, 0))
        c_rank = ctx.rank(c) if c else None
        if c_rank:
            links.same(Dim(c, c_rank - 1), Dim(y, 1))
            if c_rank == 2:
                links.same(Dim(c, 0), Dim(y, 0))
        return links.out


class MatMul(_Dense):
    ops = ("MatMul",)
    costs = {"MatMul": cost.matmul(1)}

    def weight_side(self, node, index, axis):
        if index != 1:
            return None
        return "out" if axis == 1 else "in"

    def linear(self, graph, node):
        if len(node.inputs) < 2:
            return None
        x, w = node.inputs[0], node.inputs[1]
        if not owned(graph, w):
            return _transposed_matmul(graph, node)
        if not x or graph.is_initializer(x):
            return None
        w_shape, x_shape = graph.shape(w), graph.shape(x)
        if not w_shape or any(not isinstance(s, int) for s in w_shape):
            return None
        if len(w_shape) != 2 or not x_shape or len(x_shape) < 2:
            return None
        bias = added_bias(graph, node.outputs[0], w_shape[1], -1)
        return LinearLayer(node, w, 0, Dim(x, len(x_shape) - 1), bias, feeds_residual=True, bias_added=True)

    def seeds(self, node, ctx):
        b = node.inputs[1]
        if _weight(ctx.graph, b) and (ctx.rank(b) or 0) >= 2:
            return [Dim(b, ctx.rank(b) - 2), Dim(b, ctx.rank(b) - 1)]
        return []

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
        if ra is None or rb is None or ry is None:
            links.freeze(dim, f"rank unknown around MatMul '{node.name}'")
            return links.out
        if ra < 2 or rb < 2:
            links.freeze(dim, f"MatMul '{node.name}' with a 1-D operand")
            return links.out
        if links.answered(node):
            return links.out
        links.same(Dim(a, ra - 1), Dim(b, rb - 2))
        links.add(Sink((Dim(a, ra - 1), Dim(b, rb - 2))))
        links.same(Dim(b, rb - 1), Dim(y, ry - 1))
        links.same(Dim(a, ra - 2), Dim(y, ry - 2))
        for name, rank in ((a, ra), (b, rb)):  # batch axes broadcast from the right
            for axis in range(rank - 2):
                links.same(Dim(name, axis), Dim(y, axis + ry - rank))
        return links.out


def _weight(graph, tensor: str) -> bool:
    """An initializer, or one read through a Transpose: a tied output embedding (the lm head
    multiplying by the embedding table transposed) when the exporter did not fold it."""
    producer = graph.producer.get(tensor)
    if producer is not None and producer.op_type == "Transpose":
        tensor = producer.inputs[0]
    return graph.is_initializer(tensor)


def _transposed_matmul(graph: ModelGraph, node: Node) -> LinearLayer | None:
    """MatMul(x, Transpose(W)) with W [out, in] its own: an export made without constant folding."""
    x, wt = node.inputs[0], node.inputs[1]
    transpose = graph.producer.get(wt)
    if (
        transpose is None
        or transpose.op_type != "Transpose"
        or list(transpose.attr("perm") or [1, 0]) != [1, 0]
        or len(graph.consumers.get(wt, [])) != 1
        or graph.is_initializer(x)
    ):
        return None
    w = transpose.inputs[0]
    w_shape, x_shape = graph.shape(w), graph.shape(x)
    if not owned(graph, w) or not w_shape or len(w_shape) != 2 or not is_static(w_shape):
        return None
    if not x_shape or len(x_shape) < 2:
        return None
    bias = added_bias(graph, node.outputs[0], w_shape[0], -1)
    return LinearLayer(node, w, 1, Dim(x, len(x_shape) - 1), bias, feeds_residual=True, bias_added=True)
