"""Run an ONNX graph with torch operations, so that gradients reach its inputs.

Used by ``tools/ocr_data_free.py inversion`` to synthesise inputs by gradient descent (model
inversion). It is a tool, not part of spa: spa depends on neither torch nor an autodiff runtime.
It covers the operators of the PP-OCRv4 recogniser and of the project's MNIST models, one small
function per operator; another raises NotImplementedError naming it.

    outputs, batchnorm_inputs = run(model, {"x": tensor})

``batchnorm_inputs`` maps each BatchNormalization node to (its input, running mean, running
variance): what an inversion matches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

TORCH_TYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 11: torch.float64}
OPS: dict[str, Callable] = {}


def op(*names: str):
    def register(function):
        for name in names:
            OPS[name] = function
        return function

    return register


def _ints(value) -> list[int] | None:
    return None if value is None else [int(v) for v in value.tolist()]


def _symmetric(pads: list[int], spatial: int) -> list[int]:
    if pads[:spatial] != pads[spatial:]:
        raise NotImplementedError(f"asymmetric pads {pads}")
    return pads[:spatial]


@op("Constant")
def _constant(inputs, attrs):
    return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())


for _name, _function in (("Add", torch.add), ("Sub", torch.sub), ("Mul", torch.mul), ("Pow", torch.pow)):
    OPS[_name] = (lambda f: lambda inputs, attrs: f(inputs[0], inputs[1]))(_function)


@op("Div")
def _div(inputs, attrs):
    a, b = inputs
    return torch.div(a, b, rounding_mode=None if a.is_floating_point() else "trunc")


@op("Conv")
def _conv(inputs, attrs):
    x, weight = inputs[:2]
    spatial = weight.dim() - 2
    convolve = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return convolve(
        x,
        weight,
        inputs[2] if len(inputs) > 2 else None,
        attrs.get("strides", [1] * spatial),
        _symmetric(attrs.get("pads", [0] * 2 * spatial), spatial),
        attrs.get("dilations", [1] * spatial),
        attrs.get("group", 1),
    )


@op("BatchNormalization")
def _batchnorm(inputs, attrs):
    x, scale, bias, mean, variance = inputs
    shape = [1, -1] + [1] * (x.dim() - 2)
    factor = scale / torch.sqrt(variance + attrs.get("epsilon", 1e-5))
    return (x - mean.view(shape)) * factor.view(shape) + bias.view(shape)


@op("Clip")
def _clip(inputs, attrs):
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")

    def as_float(v):
        return None if v is None else float(v)

    return torch.clamp(inputs[0], as_float(low), as_float(high))


@op("Cast")
def _cast(inputs, attrs):
    return inputs[0].to(TORCH_TYPES[attrs["to"]])


@op("MatMul")
def _matmul(inputs, attrs):
    return torch.matmul(inputs[0], inputs[1])


@op("Gemm")
def _gemm(inputs, attrs):
    a = inputs[0].T if attrs.get("transA") else inputs[0]
    b = inputs[1].T if attrs.get("transB") else inputs[1]
    product = attrs.get("alpha", 1.0) * (a @ b)
    return product + attrs.get("beta", 1.0) * inputs[2] if len(inputs) > 2 else product


@op("Slice")
def _slice(inputs, attrs):
    x, starts, ends = inputs[0], _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step != 1:
            raise NotImplementedError(f"Slice step {step}")
        size = x.shape[axis]
        index[axis] = slice(*(max(min(v + size if v < 0 else v, size), 0) for v in (start, end)))
    return x[tuple(index)]


def _axes(inputs, attrs) -> list[int] | None:
    return attrs.get("axes") or (_ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None)


@op("ReduceMean")
def _reduce_mean(inputs, attrs):
    axes = _axes(inputs, attrs)
    return inputs[0].mean(dim=axes, keepdim=bool(attrs.get("keepdims", 1)))


@op("Squeeze")
def _squeeze(inputs, attrs):
    x = inputs[0]
    for axis in sorted((a % x.dim() for a in _axes(inputs, attrs)), reverse=True):
        x = x.squeeze(axis)
    return x


@op("Unsqueeze")
def _unsqueeze(inputs, attrs):
    x = inputs[0]
    for axis in sorted(_axes(inputs, attrs)):
        x = x.unsqueeze(axis)
    return x


@op("Reshape")
def _reshape(inputs, attrs):
    x = inputs[0]
    return x.reshape([x.shape[i] if size == 0 else size for i, size in enumerate(_ints(inputs[1]))])


@op("Flatten")
def _flatten(inputs, attrs):
    x, axis = inputs[0], attrs.get("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@op("Transpose")
def _transpose(inputs, attrs):
    return inputs[0].permute(attrs["perm"])


@op("Concat")
def _concat(inputs, attrs):
    return torch.cat(inputs, dim=attrs["axis"])


@op("Shape")
def _shape(inputs, attrs):
    return torch.tensor(list(inputs[0].shape), dtype=torch.int64)


@op("Sqrt")
def _sqrt(inputs, attrs):
    return torch.sqrt(inputs[0])


@op("Sigmoid")
def _sigmoid(inputs, attrs):
    return torch.sigmoid(inputs[0])


@op("Relu")
def _relu(inputs, attrs):
    return F.relu(inputs[0])


@op("HardSigmoid")
def _hard_sigmoid(inputs, attrs):
    return torch.clamp(attrs.get("alpha", 0.2) * inputs[0] + attrs.get("beta", 0.5), 0, 1)


@op("HardSwish")
def _hard_swish(inputs, attrs):
    return F.hardswish(inputs[0])


@op("Softmax")
def _softmax(inputs, attrs):
    return torch.softmax(inputs[0], dim=attrs.get("axis", -1))


@op("GlobalAveragePool")
def _global_average_pool(inputs, attrs):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _pool_with(average: bool):
    def pool(inputs, attrs):
        kernel = attrs["kernel_shape"]
        pads = _symmetric(attrs.get("pads", [0] * 2 * len(kernel)), len(kernel))
        ceil = attrs.get("ceil_mode", 0) == 1
        if average:
            return F.avg_pool2d(
                inputs[0], kernel, attrs.get("strides"), pads, ceil, attrs.get("count_include_pad", 0) == 1
            )
        return F.max_pool2d(inputs[0], kernel, attrs.get("strides"), pads, ceil_mode=ceil)

    return pool


OPS["AveragePool"], OPS["MaxPool"] = _pool_with(True), _pool_with(False)


def run(model: onnx.ModelProto, feeds: dict[str, torch.Tensor]):
    """The graph's outputs for ``feeds``, and each BatchNormalization's (input, mean, variance)."""
    values = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    values.update(feeds)
    batchnorm_inputs = {}
    for node in model.graph.node:
        if node.op_type not in OPS:
            raise NotImplementedError(f"onnx_torch has no rule for {node.op_type}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        inputs = [values[name] if name else None for name in node.input]
        if node.op_type == "BatchNormalization":
            batchnorm_inputs[node.name] = (inputs[0], inputs[3], inputs[4])
        values[node.output[0]] = OPS[node.op_type](inputs, attrs)
    return [values[o.name] for o in model.graph.output], batchnorm_inputs
