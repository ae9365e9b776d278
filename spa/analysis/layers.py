"""Linear layers seen from their input channels: what OBS, Wanda-style scores and
compensation work on.

A layer here is an op computing ``y = W x + b`` over one channel axis of its
activation input, with W (and b) initializers that belong to it alone: Conv
with group 1, Gemm, and MatMul by a 2-D weight or its Transpose (optionally
followed by an Add of a bias), and their dynamically quantized forms (ConvInteger
and MatMulInteger, seen from the float input before DynamicQuantizeLinear to the
rescaled float output). Each is viewed as a matrix with one column per input channel (a
Conv's kernel positions become extra rows), so one piece of maths serves all.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from spa.core.graph import ModelGraph, Node
from spa.formats.quantized import INTEGER_PRODUCTS, quantized_weight, rescaling, scale_factors
from spa.ops.registry import Dim

_CONVOLUTIONS = ("Conv", "ConvInteger")


@dataclass(frozen=True)
class LinearLayer:
    node: Node
    weight: str
    weight_axis: int  # the weight axis that meets the input channels
    activation: Dim  # the input tensor and its channel axis
    bias: str | None  # an initializer holding one value per output, when there is one

    @property
    def weight_dim(self) -> Dim:
        return Dim(self.weight, self.weight_axis)

    @property
    def output_axis(self) -> int:
        """The weight axis of the layer's outputs."""
        return 0 if self.node.op_type in _CONVOLUTIONS else 1 - self.weight_axis

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        """The weight as [rows, input channels]."""
        if self.node.op_type in _CONVOLUTIONS:
            return np.moveaxis(weight, 1, -1).reshape(-1, weight.shape[1])
        return weight if self.weight_axis == 1 else weight.T

    def unmatrix(self, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.node.op_type in _CONVOLUTIONS:
            moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
            return np.moveaxis(matrix.reshape(moved), -1, 1)
        return matrix if self.weight_axis == 1 else matrix.T

    def float_rows(self, const) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The weight as [rows, input channels] in float64, its bias per row if any, and the rows
        per output (a Conv's kernel positions); ``const`` reads an initializer by name (the dense
        graph's, or a refitted model's)."""
        matrix = self.matrix(np.asarray(const(self.weight), dtype=np.float64))
        if self.bias is None:
            return matrix, None, 1
        bias = np.asarray(const(self.bias), dtype=np.float64)
        kernel = len(matrix) // bias.size
        return matrix, self.bias_rows(bias, kernel), kernel

    def augmented_rows(self, const) -> np.ndarray:
        """``float_rows`` with the bias as a last column when the layer has one: the weight of the
        constant input that OBS and the refits add to x."""
        matrix, bias, _ = self.float_rows(const)
        return np.hstack([matrix, bias[:, None]]) if bias is not None else matrix

    def tensors(self, rows: np.ndarray, const) -> dict[str, np.ndarray]:
        """The inverse of ``augmented_rows``: the weight (and bias) initializers holding ``rows``, in
        the shapes and dtypes ``const`` gives them."""
        weight = np.asarray(const(self.weight))
        channels = weight.shape[self.weight_axis]
        values = {self.weight: self.unmatrix(rows[:, :channels], weight.shape).astype(weight.dtype)}
        if self.bias is not None:
            bias = np.asarray(const(self.bias))
            per_output = rows[:, channels].reshape(-1, len(rows) // bias.size).sum(axis=1)  # a Conv's kernel rows
            values[self.bias] = per_output.reshape(bias.shape).astype(bias.dtype)
        return values

    def bias_rows(self, bias: np.ndarray, kernel: int) -> np.ndarray:
        """The bias per matrix row: a Conv's bias sits once per output, spread over its kernel rows."""
        flat = bias.reshape(-1)
        return np.repeat(flat, kernel) / kernel if kernel > 1 else flat


def linear_layers(graph: ModelGraph) -> list[LinearLayer]:
    layers = []
    for node in graph.nodes:
        layer = _as_linear(graph, node)
        if layer is not None:
            layers.append(layer)
    return layers


def _owned(graph: ModelGraph, tensor: str) -> bool:
    """A constant only this layer reads: an initializer, or one stored quantized."""
    return (
        bool(tensor)
        and (graph.is_initializer(tensor) or quantized_weight(graph, tensor) is not None)
        and len(graph.consumers.get(tensor, [])) == 1
    )


def _as_linear(graph: ModelGraph, node: Node) -> LinearLayer | None:
    op = node.op_type
    if op in INTEGER_PRODUCTS and node.domain in ("", "ai.onnx"):
        return _integer_linear(graph, node)
    if node.domain not in ("", "ai.onnx") or op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if op == "MatMul" and not _owned(graph, w):
        return _transposed_matmul(graph, node)
    if not x or graph.is_initializer(x) or not _owned(graph, w):
        return None
    w_shape = graph.shape(w)
    if not w_shape or any(not isinstance(s, int) for s in w_shape):
        return None
    if op == "Conv":
        if node.attr("group", 1) != 1:
            return None
        bias = node.input(2) if _owned(graph, node.input(2)) else None
        return LinearLayer(node, w, 1, Dim(x, 1), bias)
    if op == "Gemm":
        if node.attr("transA", 0):
            return None
        trans_b = bool(node.attr("transB", 0))
        out = w_shape[0] if trans_b else w_shape[1]
        bias = node.input(2) if _owned(graph, node.input(2)) and _numel(graph, node.input(2)) == out else None
        return LinearLayer(node, w, 1 if trans_b else 0, Dim(x, 1), bias)
    x_shape = graph.shape(x)
    if len(w_shape) != 2 or not x_shape or len(x_shape) < 2:
        return None
    return LinearLayer(node, w, 0, Dim(x, len(x_shape) - 1), _matmul_bias(graph, node, w_shape[1]))


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
    if not _owned(graph, w) or not w_shape or len(w_shape) != 2 or any(not isinstance(s, int) for s in w_shape):
        return None
    if not x_shape or len(x_shape) < 2:
        return None
    return LinearLayer(node, w, 1, Dim(x, len(x_shape) - 1), _matmul_bias(graph, node, w_shape[0]))


def _integer_linear(graph: ModelGraph, node: Node) -> LinearLayer | None:
    """A MatMulInteger or ConvInteger by its own weight on an activation DynamicQuantizeLinear
    quantized: the float layer it computes, from the float activation to the rescaled output."""
    w = node.inputs[1]
    quantizer = graph.producer.get(node.inputs[0])
    if quantizer is None or quantizer.op_type != "DynamicQuantizeLinear" or quantized_weight(graph, w) is None:
        return None
    if scale_factors(graph, node)[1] != quantizer.outputs[1]:
        return None  # the output is not rescaled by this activation's scale: not W x in float
    x, w_shape = quantizer.inputs[0], graph.shape(w)
    x_shape = graph.shape(x)
    if not x_shape or len(x_shape) < 2 or any(not isinstance(s, int) for s in w_shape):
        return None
    output = rescaling(graph, node).outputs[0]
    if node.op_type == "ConvInteger":
        if node.attr("group", 1) != 1:
            return None
        return LinearLayer(node, w, 1, Dim(x, 1), _added_bias(graph, output, w_shape[0], 1))
    return LinearLayer(node, w, 0, Dim(x, len(x_shape) - 1), _added_bias(graph, output, w_shape[1], -1))


def _matmul_bias(graph: ModelGraph, node: Node, out: int) -> str | None:
    return _added_bias(graph, node.outputs[0], out, -1)


def _added_bias(graph: ModelGraph, output: str, out: int, axis: int) -> str | None:
    """The initializer added to ``output`` with one value per index of its ``axis``, if any."""
    after = graph.consumers.get(output, [])
    if len(after) != 1 or after[0].op_type != "Add":
        return None
    other = [t for t in after[0].inputs if t != output]
    if len(other) != 1:
        return None
    bias, shape = other[0], graph.shape(other[0]) or ()
    if not _owned(graph, bias) or _numel(graph, bias) != out or not shape:
        return None
    # broadcast along the output axis, not some other one
    index = -1 if axis == -1 else len(shape) - len(graph.shape(output) or ()) + axis
    return bias if -len(shape) <= index < len(shape) and shape[index] == out else None


def _numel(graph: ModelGraph, tensor: str) -> int | None:
    shape = graph.shape(tensor)
    if shape is None or any(not isinstance(s, int) for s in shape):
        return None
    return int(np.prod(shape)) if shape else 1


class LayerIndex:
    """The linear layers of an analysed model, by the weight dimension groups slice."""

    def __init__(self, graph: ModelGraph, reached: dict[Dim, np.ndarray]):
        self.layers = [
            layer
            for layer in linear_layers(graph)
            if layer.weight_dim in reached
            and layer.activation in reached
            and len(reached[layer.weight_dim]) == len(reached[layer.activation])
        ]

    @cached_property
    def by_weight_dim(self) -> dict[Dim, LinearLayer]:
        return {layer.weight_dim: layer for layer in self.layers}

    def of_group(self, dims) -> list[LinearLayer]:
        return [self.by_weight_dim[d] for d in dims if d in self.by_weight_dim]
