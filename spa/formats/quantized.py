"""Weights stored quantized: ``DequantizeLinear(q, scale, zero_point)`` of initializers (the QDQ
format onnxruntime's static quantizer and QAT exporters write).

Criteria and compensation work on the float weight the graph computes from them, so they read
it dequantized; a refit is written back quantized at the weight's zero point and scale, the
scale grown where the refit would not fit (``Store``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from onnx import helper

if TYPE_CHECKING:
    from spa.analysis.layers import LinearLayer
    from spa.core.graph import ModelGraph

DEQUANTIZE_DOMAINS = ("", "ai.onnx", "com.microsoft")


@dataclass(frozen=True)
class QuantizedWeight:
    output: str  # the float tensor the DequantizeLinear makes: what layers see as their weight
    data: str  # the integer initializer
    scale: str
    zero_point: str | None
    axis: int | None  # the axis the scale runs along; None: one scale for the whole tensor


@dataclass
class Requantized:
    tensors: int = 0
    saturated: int = 0  # values of refits that fell outside the integer range and were clamped
    values: int = 0
    grown: int = 0  # scales grown so that a refit fits

    def as_dict(self) -> dict:
        return {"tensors": self.tensors, "saturated": self.saturated, "values": self.values, "grown": self.grown}


def quantized_weight(graph, tensor: str) -> QuantizedWeight | None:
    """``tensor`` as a dequantized integer initializer only it reads, or as the integer weight of
    a MatMulInteger or ConvInteger, or None."""
    return _dequantized(graph, tensor) or _integer_operand(graph, tensor)


def _dequantized(graph, tensor: str) -> QuantizedWeight | None:
    node = graph.producer.get(tensor)
    if (
        node is None
        or node.op_type != "DequantizeLinear"
        or node.domain not in DEQUANTIZE_DOMAINS
        or node.attr("block_size", 0)
    ):
        return None
    data, scale, zero_point = node.input(0), node.input(1), node.input(2)
    if not (graph.is_initializer(data) and graph.is_initializer(scale)) or len(graph.consumers.get(data, [])) != 1:
        return None
    if zero_point and not graph.is_initializer(zero_point):
        return None
    if np.dtype(_numpy_type(graph, data)).kind not in "iu":
        return None
    axis = scale_axis(graph, node)
    if axis == UNKNOWN_AXIS or (axis is not None and graph.shape(data)[axis] != graph.shape(scale)[0]):
        return None
    return QuantizedWeight(tensor, data, scale, zero_point or None, axis)


def block_layout(graph, node) -> tuple[int, int] | str:
    """A block-quantized QuantizeLinear's or DequantizeLinear's (axis, block_size), or why its
    scale and zero point are not one value per block of ``block_size`` along ``axis``."""
    block_size = int(node.attr("block_size", 0))
    data = graph.shape(node.inputs[0])
    if not data or any(not isinstance(s, int) for s in data):
        return "the shape of its data is unknown"
    axis = int(node.attr("axis", 1))
    if not -len(data) <= axis < len(data) or block_size < 1:
        return f"axis {axis} with block_size {block_size}"
    axis %= len(data)
    blocked = tuple(-(-s // block_size) if a == axis else s for a, s in enumerate(data))
    for name in (node.input(1), node.input(2)):
        if name and graph.shape(name) != blocked:
            return f"{name} of shape {graph.shape(name)}, not one value per block {blocked}"
    return axis, block_size


def block_dequantized(graph, tensor: str) -> np.ndarray | None:
    """The float weight a block-quantized DequantizeLinear makes of ``tensor``, its integer data
    (only it reads), with one scale and zero point per block; None for any other tensor."""
    readers = graph.consumers.get(tensor, [])
    if len(readers) != 1 or not graph.is_initializer(tensor):
        return None
    node = readers[0]
    if node.op_type != "DequantizeLinear" or node.domain not in DEQUANTIZE_DOMAINS or not node.attr("block_size", 0):
        return None
    found = block_layout(graph, node)
    constants = [graph.const(t) for t in (node.input(1), node.input(2)) if t]
    if node.inputs[0] != tensor or isinstance(found, str) or any(c is None for c in constants):
        return None
    axis, block_size = found
    data = np.asarray(graph.const(tensor)).astype(np.float32)
    count = data.shape[axis]

    def per_element(value: np.ndarray) -> np.ndarray:
        spread = np.repeat(np.asarray(value).astype(np.float32), block_size, axis=axis)
        return np.take(spread, np.arange(count), axis=axis)  # the last block may be short

    zero = per_element(constants[1]) if len(constants) == 2 else np.float32(0)
    return (data - zero) * per_element(constants[0])


# dynamic quantization's integer ops, and the axis of their weight that indexes output channels
INTEGER_PRODUCTS = {"MatMulInteger": -1, "ConvInteger": 0}


def _integer_operand(graph, tensor: str) -> QuantizedWeight | None:
    """The integer weight of a MatMulInteger or ConvInteger, only it reads it. Its scale is not an
    input of the op: the op's integer output is cast to float and multiplied by the activation's
    scale times the weight's (``rescaling``), one value or one per output channel."""
    readers = graph.consumers.get(tensor, [])
    if len(readers) != 1 or not graph.is_initializer(tensor):
        return None
    node = readers[0]
    if (
        node.op_type not in INTEGER_PRODUCTS
        or node.domain not in ("", "ai.onnx")
        or node.input(1) != tensor
        or np.dtype(_numpy_type(graph, tensor)).kind not in "iu"
    ):
        return None
    shape = graph.shape(tensor)
    if not shape or (node.op_type == "MatMulInteger" and len(shape) != 2) or not isinstance(shape[0], int):
        return None
    out_axis = INTEGER_PRODUCTS[node.op_type] % len(shape)
    channels = shape[out_axis]
    zero_point = node.input(3) or None
    factors = scale_factors(graph, node)
    if factors is None or (zero_point and not graph.is_initializer(zero_point)):
        return None
    scale = factors[0]
    output_rank = len(graph.shape(node.outputs[0]) or ())
    output_axis = output_rank - 1 if node.op_type == "MatMulInteger" else 1
    per_channel = [
        _per_output_scale(graph.shape(scale), output_rank, output_axis, channels),
        _per_output_zero_point(graph.shape(zero_point), channels) if zero_point else False,
    ]
    if None in per_channel:
        return None
    return QuantizedWeight(tensor, tensor, scale, zero_point, out_axis if any(per_channel) else None)


def rescaling(graph, node):
    """The Mul that turns an integer op's output into float: Cast, then times a scale."""
    cast = _sole_reader(graph, node.outputs[0])
    if cast is None or cast.op_type != "Cast":
        return None
    mul = _sole_reader(graph, cast.outputs[0])
    if mul is None or mul.op_type != "Mul" or len(mul.inputs) != 2:
        return None
    return mul


def scale_factors(graph, node) -> tuple[str, str | None] | None:
    """The weight's scale (an initializer) and the activation's (None when folded into it) that the
    rescaling Mul multiplies an integer op's output by, or None where that is not clear: two
    initializer factors could be either."""
    rescale = rescaling(graph, node)
    if rescale is None:
        return None
    cast_output = graph.consumers[node.outputs[0]][0].outputs[0]
    factor = next((t for t in rescale.inputs if t != cast_output), None)
    if factor is None:
        return None
    if graph.is_initializer(factor):
        return factor, None
    product = graph.producer.get(factor)
    if product is None or product.op_type != "Mul" or len(graph.consumers.get(factor, [])) != 1:
        return None
    stored = [t for t in product.inputs if graph.is_initializer(t)]
    others = [t for t in product.inputs if not graph.is_initializer(t)]
    return (stored[0], others[0]) if len(stored) == 1 and len(others) == 1 else None


def is_rescaling_factor(graph, tensor: str) -> bool:
    """A weight scale an integer op's output is multiplied by: a quantization parameter, not a
    weight of its own. Found from the scale forward: its Mul, or the rescaling Mul after it."""
    for mul in graph.consumers.get(tensor, []):
        for rescale in [mul] + list(graph.consumers.get(mul.outputs[0], [])):
            for cast in (graph.producer.get(t) for t in rescale.inputs):
                integer_op = graph.producer.get(cast.inputs[0]) if cast is not None and cast.op_type == "Cast" else None
                if (
                    integer_op is not None
                    and integer_op.op_type in INTEGER_PRODUCTS
                    and (scale_factors(graph, integer_op) or (None,))[0] == tensor
                ):
                    return True
    return False


def _sole_reader(graph, tensor: str):
    readers = graph.consumers.get(tensor, [])
    return readers[0] if len(readers) == 1 else None


def _per_output_scale(shape, output_rank: int, output_axis: int, channels: int) -> bool | None:
    """Is the scale one value (False) or one per output channel (True) as the rescaling Mul
    broadcasts it against the output (shapes aligned from the right); None: neither."""
    if shape is None or any(not isinstance(s, int) for s in shape):
        return None
    if int(np.prod(shape)) == 1:
        return False
    wide = [i for i, s in enumerate(shape) if s != 1]
    on_channels = len(wide) == 1 and shape[wide[0]] == channels and output_rank - len(shape) + wide[0] == output_axis
    return True if on_channels else None


def _per_output_zero_point(shape, channels: int) -> bool | None:
    """A zero point is an op input: one value, or (1-D) one per output channel."""
    if shape is None or any(not isinstance(s, int) for s in shape):
        return None
    if int(np.prod(shape)) == 1:
        return False
    return True if tuple(shape) == (channels,) else None


UNKNOWN_AXIS = -1


def scale_axis(graph, node) -> int | None:
    """The axis a QuantizeLinear's or DequantizeLinear's scale runs along, None for one scale over
    the whole tensor, or UNKNOWN_AXIS where the shapes do not say."""
    scale_shape = graph.shape(node.input(1))
    input_shape = graph.shape(node.inputs[0])
    if scale_shape is None or input_shape is None:
        return UNKNOWN_AXIS
    if scale_shape in ((), (1,)):
        return None
    if len(scale_shape) != 1 or not input_shape:
        return UNKNOWN_AXIS
    return node.attr("axis", 1) % len(input_shape)


def _numpy_type(graph, tensor: str):
    return helper.tensor_dtype_to_np_dtype(graph.dtypes[tensor])


def _along(weight: QuantizedWeight, value, ndim: int) -> np.ndarray:
    """A scale or zero point shaped to broadcast against the weight."""
    value = np.asarray(value)
    if weight.axis is None or value.size == 1:  # an integer op's weight may pair one scale with per-channel zero points
        return value.reshape(())
    shape = [1] * ndim
    shape[weight.axis] = value.size
    return value.reshape(shape)


def _broadcast(graph, weight: QuantizedWeight, name: str | None, ndim: int, default: float) -> np.ndarray:
    return np.asarray(default) if name is None else _along(weight, graph.const(name), ndim)


def dequantize(graph, weight: QuantizedWeight) -> np.ndarray:
    data = np.asarray(graph.const(weight.data))
    scale = _broadcast(graph, weight, weight.scale, data.ndim, 1.0)
    zero = _broadcast(graph, weight, weight.zero_point, data.ndim, 0)
    return ((data.astype(np.float64) - zero.astype(np.float64)) * scale).astype(scale.dtype)


def zero_fill(graph, weight: QuantizedWeight) -> np.ndarray:
    """What a removed slice of the integer data holds in the soft model: its zero point, so it
    dequantizes to zero whatever the scale."""
    ndim = len(graph.shape(weight.data) or ())
    return _broadcast(graph, weight, weight.zero_point, ndim, 0).astype(_numpy_type(graph, weight.data))


def quantize(
    graph, weight: QuantizedWeight, value: np.ndarray, tally: Requantized | None = None, scale: np.ndarray | None = None
) -> np.ndarray:
    """``value`` (the float weight) as ``weight``'s integer data, rounded half to even like
    QuantizeLinear, clamped to the integer type's range; ``scale`` replaces the weight's own."""
    dtype = np.dtype(_numpy_type(graph, weight.data))
    steps = _steps(graph, weight, value.ndim, scale)
    zero = _broadcast(graph, weight, weight.zero_point, value.ndim, 0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(steps != 0, np.rint(np.asarray(value, np.float64) / steps), 0.0) + zero
    info = np.iinfo(dtype)
    if tally is not None:
        tally.tensors += 1
        tally.values += levels.size
        tally.saturated += int(np.count_nonzero((levels < info.min) | (levels > info.max)))
    return np.clip(levels, info.min, info.max).astype(dtype)


def _steps(graph, weight: QuantizedWeight, ndim: int, scale: np.ndarray | None) -> np.ndarray:
    return _along(weight, graph.const(weight.scale) if scale is None else scale, ndim).astype(np.float64)


def growth(graph, weight: QuantizedWeight, value: np.ndarray) -> np.ndarray:
    """How much each scale (one per index of the weight's axis, or one) must grow, at least 1, for
    ``value`` to fit the integer range around its zero point."""
    info = np.iinfo(np.dtype(_numpy_type(graph, weight.data)))
    steps = _steps(graph, weight, value.ndim, None)
    zero = _broadcast(graph, weight, weight.zero_point, value.ndim, 0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(steps != 0, np.asarray(value, np.float64) / steps, 0.0)
        need = np.where(levels > 0, levels / (info.max - zero), np.where(levels < 0, levels / (info.min - zero), 0.0))
    need = np.nan_to_num(need, nan=1.0, posinf=1.0)  # a zero point at the range's end: nothing to gain
    if weight.axis is None:
        return np.asarray(max(1.0, float(need.max(initial=1.0))))
    other = tuple(a for a in range(value.ndim) if a != weight.axis)
    return np.maximum(need.max(axis=other, initial=1.0), 1.0)


@dataclass
class Store:
    """Writes refitted float weights where the model keeps them: as is for float initializers,
    quantized into the integer initializer for dequantized ones.

    A refit can outgrow the range its scale allows. Where the scale is the weight's own, it grows
    just enough (per output channel when it is per channel), and a bias stored quantized at the
    input's scale times the weight's grows with it: onnxruntime's fused integer kernels read the
    bias at exactly that product. Elsewhere the values saturate, and ``tally`` counts them.
    """

    graph: ModelGraph
    layers: tuple[LinearLayer, ...] = ()  # the LinearLayers whose refits are stored: a weight's bias follows its scale
    tally: Requantized = field(default_factory=Requantized)

    def __call__(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        graph = self.graph
        bias_of = {layer.weight: layer for layer in self.layers}
        stored: dict[str, np.ndarray] = {}
        stored_biases: set[str] = set()
        # weights before biases: a weight's scale decides its bias's
        for name in sorted(values, key=lambda n: n not in bias_of):
            value = values[name]
            weight = quantized_weight(graph, name)
            if weight is None:
                stored[name] = value
                continue
            if name in stored_biases:
                continue
            scale = None
            layer = bias_of.get(name)
            factor = growth(graph, weight, value)
            if self._may_grow(weight, layer, factor):
                # written even when nothing grows: the model being refitted may hold an earlier grown scale
                scale = _scaled(_initializer_value(graph, weight.scale), factor)
                stored[weight.scale] = scale
                self.tally.grown += int(np.count_nonzero(factor > 1))
                if layer is not None and layer.bias:
                    bias = quantized_weight(graph, layer.bias)
                    if bias is not None and layer.bias in values:
                        stored_biases.add(layer.bias)
                        self._store_bias(bias, values[layer.bias], factor, stored)
            stored[weight.data] = quantize(graph, weight, value, self.tally, scale)
        return stored

    def _may_grow(self, weight: QuantizedWeight, layer, factor: np.ndarray) -> bool:
        graph = self.graph
        if len(graph.consumers.get(weight.scale, [])) != 1:
            return False  # shared: growing it would change another tensor
        if factor.size > 1 and _element_count(graph, weight.scale) != factor.size:
            return False  # one scale for channels with their own zero points
        if layer is None or not layer.bias:
            return True
        bias = quantized_weight(graph, layer.bias)
        if bias is None:
            return True  # a float bias does not depend on the weight's scale
        if len(graph.consumers.get(bias.scale, [])) != 1:
            return False
        per_output = weight.axis is not None and weight.axis == layer.output_axis
        return factor.size == 1 or (per_output and _element_count(graph, bias.scale) == factor.size)

    def _store_bias(self, bias: QuantizedWeight, value: np.ndarray, factor: np.ndarray, stored: dict) -> None:
        scale = _scaled(_initializer_value(self.graph, bias.scale), factor)
        stored[bias.scale] = scale
        stored[bias.data] = quantize(self.graph, bias, value, self.tally, scale)


def _initializer_value(graph: ModelGraph, tensor: str) -> np.ndarray:
    value = graph.const(tensor)
    assert value is not None, tensor  # a QuantizedWeight's scale is an initializer
    return value


def _element_count(graph: ModelGraph, tensor: str) -> int:
    return math.prod(graph.initializers[tensor].dims)


def _scaled(scale: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``scale`` times ``factor`` in the scale's own dtype and shape: quantizing against exactly
    what the model will hold."""
    scale = np.asarray(scale)
    return (scale.astype(np.float64).reshape(-1) * factor.reshape(-1)).astype(scale.dtype).reshape(scale.shape)
