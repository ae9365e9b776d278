"""Whether calibration samples fit the model's inputs: shapes refused, doubtful values warned about.

Samples that do not fit either fail deep inside onnxruntime (a shape) or, worse, run and
mislead every statistic and refit drawn from them (8-bit pixels fed to a model trained on
[0, 1] images). The first is an error that names the axis; the second a warning that names
the fix, given only where the data or the graph makes the mismatch clear.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import numpy_helper

from spa.core.errors import UsageError
from spa.core.runtime import graph_inputs, one_line

# the graph scaling its input by at most this (x / 255, or / (255 * std)) reads 0-255 values;
# by at least NORMALISING_SCALE ((x - mean) / std with std <= 1) it reads values near [0, 1]
PIXEL_SCALE = 1 / 40
NORMALISING_SCALE = 1.0
# float samples reaching past this, fed to a graph that normalises [0, 1] images, are 8-bit pixels
PIXEL_LIKE = 16.0
AFFINE_OPS = ("Sub", "Add", "Mul", "Div")


class CalibrationWarning(UserWarning):
    """Calibration samples whose type or range looks wrong for the model's input."""


def check_fit(model: onnx.ModelProto, arrays: dict[str, np.ndarray], where: str) -> None:
    """Refuse samples whose shape the model's fixed axes exclude; warn where their type or
    range does not fit the input (``arrays``: input name -> samples, as read)."""
    for info in graph_inputs(model):
        array = arrays.get(info.name)
        if array is None:  # a control value or a state: spa feeds it, the samples need not
            continue
        _check_shape(info, array, where)
        for problem in _misfits(model, info, array):
            warnings.warn(CalibrationWarning(f"{where}: {problem}"), stacklevel=2)


def _check_shape(info: onnx.ValueInfoProto, array: np.ndarray, where: str) -> None:
    dims = list(info.type.tensor_type.shape.dim)
    declared = ", ".join(
        str(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else d.dim_param or "?" for d in dims
    )
    for axis, (dim, size) in enumerate(zip(dims[1:], array.shape[1:]), start=1):
        if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != size:
            raise UsageError(
                f"{where}: input '{info.name}' gets samples of shape {list(array.shape[1:])}, the model declares "
                f"[{declared}] (axis {axis} is fixed at {dim.dim_value}, not {size})"
            )


def _misfits(model: onnx.ModelProto, info: onnx.ValueInfoProto, array: np.ndarray) -> list[str]:
    elem = info.type.tensor_type.elem_type or onnx.TensorProto.FLOAT
    wanted = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    name, kind = info.name, array.dtype.kind
    if not array.size:
        return []
    low, high = float(array.min()), float(array.max())
    if wanted.kind == "f" and kind in "iub":
        return _integer_into_float(model, name, array.dtype, low, high)
    if wanted.kind in "iu" and kind == "f" and not np.array_equal(array, np.trunc(array)):
        return [f"input '{name}' is {wanted}, the samples hold fractions: they are cut to whole numbers"]
    if wanted.kind == "f" and kind == "f":
        scale = input_scale(model, name)
        if scale is not None and scale <= PIXEL_SCALE and 0 <= low and high <= 1.0:
            return [
                f"input '{name}' holds values in [{low:g}, {high:g}], but the model scales its input by "
                f"{scale:.3g} as for 0-255 pixels: multiply by 255"
            ]
        if scale is not None and scale >= NORMALISING_SCALE and high > PIXEL_LIKE and low >= 0:
            return [
                f"input '{name}' holds values up to {high:g}, but the model normalises its input as for "
                f"[0, 1] images (scale {scale:.3g}): divide by 255"
            ]
    return []


def _integer_into_float(model: onnx.ModelProto, name: str, dtype: np.dtype, low: float, high: float) -> list[str]:
    if not (0 <= low and 1 < high <= 255):
        return []
    scale = input_scale(model, name)
    if scale is not None and scale <= PIXEL_SCALE:  # the graph divides by 255 itself
        return []
    fix = "divide by 255" if scale is not None else "if the model expects values in [0, 1], divide by 255"
    return [f"input '{name}' is float, the samples are {dtype} values {low:g}-{high:g}, fed as they are: {fix}"]


def input_scale(model: onnx.ModelProto, name: str) -> float | None:
    """The factor the graph's first affine ops (Sub, Add, Mul, Div by constants) scale input
    ``name`` by, None where the input goes elsewhere first: the graph's own word on the range
    it expects (x / 255 reads pixels; (x - mean) / std reads [0, 1] or [-1, 1])."""
    constants = _constants(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    scale, tensor, seen = 1.0, name, False
    while len(consumers.get(tensor, [])) == 1:
        node = consumers[tensor][0]
        if node.op_type not in AFFINE_OPS or len(node.input) != 2:
            break
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        if other not in constants or (node.op_type == "Div" and node.input[0] != tensor):
            break
        constant = _value(constants[other])
        value = float(np.mean(np.abs(constant))) if constant.size else 0.0
        if node.op_type == "Mul":
            scale *= value
        elif node.op_type == "Div":
            if value == 0:
                break
            scale /= value
        tensor, seen = node.output[0], True
    return scale if seen else None


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constant tensors by name, unread: only the few an input meets first are converted."""
    values = {t.name: t for t in model.graph.initializer if not t.external_data}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    return values


def _value(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor).astype(np.float64, copy=False)


def calibration_run_error(exc: BaseException) -> UsageError:
    """onnxruntime refusing the calibration samples, with its whole reason (the useful part, which
    axis and which size, often sits on a later line)."""
    lines = [one_line(RuntimeError(line)) for line in str(exc).strip().splitlines() if line.strip()]
    reason = " ".join(lines) or type(exc).__name__
    return UsageError(f"onnxruntime could not run the calibration data: {reason}")
