"""A linear layer seen from its input channels: what OBS, Wanda-style scores and compensation
work on. Operators say which of their nodes are one (``Operator.linear``); each is viewed as a
matrix with one column per input channel (a Conv's kernel positions become extra rows), so one
piece of maths serves all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeGuard

import numpy as np

from spa.core.coupling import Dim
from spa.core.graph import ModelGraph, Node, Size
from spa.formats.quantized import quantized_weight


@dataclass(frozen=True)
class LinearLayer:
    node: Node
    weight: str
    weight_axis: int  # the weight axis that meets the input channels
    activation: Dim  # the input tensor and its channel axis
    bias: str | None  # an initializer holding one value per output, when there is one
    convolution: bool = False  # a Conv's weight [out, in, kernel...]: kernel positions become rows
    feeds_residual: bool = False  # a float MatMul or Gemm, whose output may go into a residual Add
    bias_added: bool = False  # the bias is an Add after the op (whose output is the layer's)
    refittable: ClassVar[bool] = True  # a refit can be written back into the weight

    @property
    def weight_dim(self) -> Dim:
        return Dim(self.weight, self.weight_axis)

    def column_labels(self, labels: Mapping[Dim, np.ndarray]) -> np.ndarray:
        """The unit label of each input channel (each column of ``matrix``)."""
        return labels[self.weight_dim]

    @property
    def output_axis(self) -> int:
        """The weight axis of the layer's outputs."""
        return 0 if self.convolution else 1 - self.weight_axis

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        """The weight as [rows, input channels]."""
        if self.convolution:
            return np.moveaxis(weight, 1, -1).reshape(-1, weight.shape[1])
        return weight if self.weight_axis == 1 else weight.T

    def unmatrix(self, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.convolution:
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


@dataclass(frozen=True)
class BlockLayer(LinearLayer):
    """A weight stored as [outputs, blocks, block_size], its input channels a block at a time
    (``graph.weight`` reads a block-quantized weight dequantized in that shape). Its refit would
    have to be quantized again into the same blocks, so it is scored, not refitted."""

    channels: int = 0  # the input channels; the last block may hold fewer than block_size
    block_size: int = 1
    refittable: ClassVar[bool] = False

    def column_labels(self, labels: Mapping[Dim, np.ndarray]) -> np.ndarray:
        return np.repeat(labels[self.weight_dim], self.block_size)[: self.channels]

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        return weight.reshape(weight.shape[0], -1)[:, : self.channels]


def owned(graph: ModelGraph, tensor: str) -> bool:
    """A constant only this layer reads: an initializer, or one stored quantized."""
    return (
        bool(tensor)
        and (graph.is_initializer(tensor) or quantized_weight(graph, tensor) is not None)
        and len(graph.consumers.get(tensor, [])) == 1
    )


def added_bias(graph: ModelGraph, output: str, out: int, axis: int) -> str | None:
    """The initializer added to ``output`` with one value per index of its ``axis``, if any."""
    after = graph.consumers.get(output, [])
    if len(after) != 1 or after[0].op_type != "Add":
        return None
    other = [t for t in after[0].inputs if t != output]
    if len(other) != 1:
        return None
    bias, shape = other[0], graph.shape(other[0]) or ()
    if not owned(graph, bias) or numel(graph, bias) != out or not shape:
        return None
    # broadcast along the output axis, not some other one
    index = -1 if axis == -1 else len(shape) - len(graph.shape(output) or ()) + axis
    return bias if -len(shape) <= index < len(shape) and shape[index] == out else None


def is_static(shape: tuple[Size, ...]) -> TypeGuard[tuple[int, ...]]:
    """Whether every dimension of ``shape`` is a known integer."""
    return all(isinstance(s, int) for s in shape)


def numel(graph: ModelGraph, tensor: str) -> int | None:
    shape = graph.shape(tensor)
    if shape is None or not is_static(shape):
        return None
    return int(np.prod(shape)) if shape else 1
