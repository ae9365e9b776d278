"""What spa feeds the inputs it has no data for, read from the graph.

Real streaming models take more than a batch of samples: a sample rate that selects a branch
(``If(Equal(sr, 16000))``), a recurrent state laid out ``[layers, batch, hidden]``, and a chunk of
samples whose length their ``Pad`` and ``Reshape`` constrain. Random values and a length of 1
run none of them. This module says, from the graph alone, along which axis each input stacks
samples, and which value a control input (a rate, a flag, a mode) takes: the constant the graph
compares it with, so the branch that constant guards is the one run. ``spa.core.probe`` finds
a length the model runs at, where the default does not.

The choice is a ``FeedSpec`` that the stages set for their own call (a context variable, as
``spa.core.runlimit`` does with the time limit), so every feed spa makes (statistics, searches,
validation, latency, export checks) uses it without being handed it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from spa.core.errors import UsageError

# ops a control value goes through unchanged on its way to a comparison
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Slice"}
_COMPARISONS = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
# inputs of at most this many elements, integer or boolean, can be control values
_CONTROL_ELEMENTS = 1
# lengths the graph's constants suggest are tried within this range
_LENGTHS = (2, 1 << 16)


@dataclass(frozen=True)
class FeedSpec:
    """Values spa feeds whole (control inputs, ``--input``), and the length of free axes past the
    batch where the default does not run; ``why`` says, per input, where its value came from."""

    values: Mapping[str, np.ndarray] = field(default_factory=dict)
    length: int | None = None
    why: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "values": {name: value.tolist() for name, value in self.values.items()},
            "length": self.length,
            "why": dict(self.why),
        }


NO_SPEC = FeedSpec()
_spec: contextvars.ContextVar[FeedSpec] = contextvars.ContextVar("spa_feeds", default=NO_SPEC)


def use(spec: FeedSpec) -> None:
    """Feed ``spec`` for the rest of the current context (stages run in their own: ``own_context``)."""
    _spec.set(spec)


def current() -> FeedSpec:
    return _spec.get()


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _free(dim) -> bool:
    return not (dim.HasField("dim_value") and dim.dim_value > 0)


def batch_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """The axis each input stacks samples along; None for one value that serves every batch
    (a scalar, a control value).

    The first axis, unless it is fixed and another axis says otherwise: one named like another
    input's first axis (a state ``[2, batch, 128]`` beside ``input [batch, samples]``), or, for a
    recurrent state (an input an output of the same rank is named after: ``state``/``stateN``,
    ``h``/``hn``), the second axis of ``[layers, batch, hidden]`` as ONNX's recurrent ops lay it
    out. Otherwise, where the batch is free, an input's one free axis is its batch."""
    inputs = _inputs(model)
    first = [list(i.type.tensor_type.shape.dim)[:1] for i in inputs]
    symbols = {d[0].dim_param for d in first if d and d[0].HasField("dim_param") and d[0].dim_param}
    dynamic = any(d and _free(d[0]) for d in first)
    controls = set(control_inputs(model))
    outputs = {o.name: len(o.type.tensor_type.shape.dim) for o in model.graph.output}
    axes: dict[str, int | None] = {}
    for info in inputs:
        dims = list(info.type.tensor_type.shape.dim)
        named = [a for a, d in enumerate(dims) if a and d.HasField("dim_param") and d.dim_param in symbols]
        free = [a for a, d in enumerate(dims) if _free(d)]
        state = len(dims) == 3 and any(
            out != info.name and out.startswith(info.name) and rank in (0, 3) for out, rank in outputs.items()
        )
        if not dims or info.name in controls:
            axes[info.name] = None
        elif _free(dims[0]):
            axes[info.name] = 0
        elif named:
            axes[info.name] = named[0]
        elif state:
            axes[info.name] = 1
        elif dynamic and len(free) == 1:
            axes[info.name] = free[0]
        else:
            axes[info.name] = 0
    return axes


def control_inputs(model: onnx.ModelProto) -> list[str]:
    """Integer or boolean inputs of one element: values that choose rather than carry data."""
    return [
        info.name
        for info in _inputs(model)
        if np.dtype(_numpy_type(info)).kind in "iub"
        and all(not _free(d) for d in info.type.tensor_type.shape.dim)
        and int(np.prod([d.dim_value for d in info.type.tensor_type.shape.dim])) <= _CONTROL_ELEMENTS
    ]


def _numpy_type(info: onnx.ValueInfoProto):
    return onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type or onnx.TensorProto.FLOAT)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, those of If/Loop/Scan bodies after the node that holds them (outer names reach in)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)
            for body in attribute.graphs:
                yield from _nodes(body)


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Small constant tensors: initializers and Constant nodes' values, in bodies too."""
    found = {t.name: t for t in model.graph.initializer if np.prod(t.dims) <= 16}
    values = {name: numpy_helper.to_array(t) for name, t in found.items() if not t.external_data}
    for node in _nodes(model.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.ByteSize() < 1024 and not attribute.t.external_data:
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
                elif attribute.name in ("value_int", "value_ints"):
                    values[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attribute))
    return values


def graph_controls(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, str]]:
    """Control inputs the graph compares with a constant: the constant (first comparison in graph
    order), shaped and typed as the input, and the comparison, for the report."""
    inputs = {i.name: i for i in _inputs(model)}
    controls = set(control_inputs(model))
    if not controls:
        return {}
    constants = _constants(model)
    carries = {name: name for name in controls}  # tensor -> the control input it carries
    found: dict[str, tuple[np.ndarray, str]] = {}
    for node in _nodes(model.graph):
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in carries:
            carries[node.output[0]] = carries[node.input[0]]
        if node.op_type not in _COMPARISONS or len(node.input) != 2:
            continue
        for mine, other in (node.input, node.input[::-1]):
            name = carries.get(mine)
            value = constants.get(other)
            if name is None or name in found or value is None or value.size != 1:
                continue
            info = inputs[name]
            shape = [d.dim_value for d in info.type.tensor_type.shape.dim]
            typed = np.asarray(value).astype(_numpy_type(info)).reshape(shape)
            found[name] = (typed, f"{node.op_type} with {value.reshape(-1)[0]} in the graph")
    return found


def length_candidates(model: onnx.ModelProto) -> list[int]:
    """Lengths the graph's ops suggest for a free axis past the batch: first its small integer
    constants (pads, reshape targets, slice bounds), the product of each one's positive entries
    (``Reshape`` to ``[-1, 4, 128]`` takes multiples of 512) and its kernel sizes and strides,
    smallest first; then their small multiples and pairwise sums (a reflect pad of 64 before a
    kernel of 256 needs 192), smallest first."""
    low, high = _LENGTHS
    lengths: set[int] = set()
    # what the graph compares a value with is a rate or a mode, not a size
    compared = {name for node in _nodes(model.graph) if node.op_type in _COMPARISONS for name in node.input}
    for name, value in _constants(model).items():
        if value.dtype.kind not in "iu" or name in compared:
            continue
        flat = [int(v) for v in value.reshape(-1)]
        lengths.update(flat)
        positive = [v for v in flat if v > 0]
        if len(positive) > 1 and np.prod(positive, dtype=np.float64) <= high:
            lengths.add(int(np.prod(positive)))
    for node in _nodes(model.graph):
        for attribute in node.attribute:
            if attribute.name in ("kernel_shape", "strides", "dilations"):
                lengths.update(int(v) for v in attribute.ints)
    direct = sorted(v for v in lengths if low <= v <= high)
    combined = {v * k for v in direct for k in range(2, 9)} | {a + b for a in direct for b in direct}
    return direct + sorted(v for v in combined - set(direct) if low <= v <= high)


def given_values(model: onnx.ModelProto, given: Mapping[str, object] | None) -> dict[str, np.ndarray]:
    """``--input NAME=VALUE`` values as arrays the input takes: its element type; its declared
    shape where fixed (one number fills it); a single number for an input with free axes becomes
    one element per axis."""
    inputs = {i.name: i for i in _inputs(model)}
    values = {}
    for name, raw in (given or {}).items():
        info = inputs.get(name)
        if info is None:
            raise UsageError(
                f"--input names '{name}', which is not an input of the model (inputs: {', '.join(inputs) or 'none'})"
            )
        try:
            value = np.asarray(raw).astype(_numpy_type(info))
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"--input {name}: {raw!r} does not convert to the input's type") from None
        dims = list(info.type.tensor_type.shape.dim)
        if all(not _free(d) for d in dims):
            shape = [d.dim_value for d in dims]
            if value.size == 1:
                value = np.full(shape, value.reshape(-1)[0], dtype=value.dtype)
            elif value.size == np.prod(shape, dtype=np.int64):
                value = value.reshape(shape)
            else:
                raise UsageError(f"--input {name}: {value.size} values given, the input holds {int(np.prod(shape))}")
        elif value.ndim != len(dims):
            if value.size != 1:
                raise UsageError(f"--input {name}: give one number, or a value of rank {len(dims)} from the API")
            value = value.reshape([1] * len(dims))
        values[name] = value
    return values


def parse_values(specs: list[str]) -> dict[str, object]:
    """``NAME=VALUE`` pairs (``--input``): a number, or numbers separated by commas."""
    values: dict[str, object] = {}
    for spec in specs:
        name, _, text = spec.partition("=")
        try:
            numbers = [float(v) if any(c in v for c in ".eE") else int(v) for v in text.split(",")]
        except ValueError:
            numbers = []
        if not name or not text or not numbers:
            raise UsageError(f"--input expects NAME=VALUE (a number, or numbers separated by commas), got '{spec}'")
        values[name] = numbers[0] if len(numbers) == 1 else numbers
    return values
