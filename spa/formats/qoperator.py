"""The quantized operator format (QOperator): QLinearConv, QGemm, QLinearAdd and kin compute on
integers, their scales and zero points among their inputs.

spa reads such a model as the QDQ graph it stands for: each op's integer operands dequantized,
the float op, its output quantized again (``expand``). The QDQ rules, statistics and refits then
apply unchanged. The pruned graph is written back in the ops it came in (``Expansion.fuse``): the
cut slices tensors under their own names and rewrites only the float op's attributes (a depthwise
Conv's ``group``), so fusing puts each original op back with those attributes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spa.ops.linear import transposed

MS = "com.microsoft"


@dataclass(frozen=True)
class Form:
    """How one quantized op reads as float ops. Positions are the op's input indices."""

    float_op: str
    operands: tuple[tuple[int, int, int], ...]  # (data, scale, zero point) of each dequantized operand
    output: tuple[int, int] | None  # (scale, zero point) its output is quantized with; None: a float output
    bias: int | None = None  # an int32 bias at the first two operands' scales' product, zero point 0
    attributes: tuple[str, ...] = ()  # the float op's attributes, all others must be at their defaults
    variadic: bool = False  # operands run in threes from ``operands[0]`` to the last input (QLinearConcat)


_POOL = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")
_BINARY = ((0, 1, 2), (3, 4, 5))

FORMS: dict[tuple[str, str], Form] = {
    ("", "QLinearConv"): Form(
        "Conv",
        _BINARY,
        (6, 7),
        bias=8,
        attributes=("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"),
    ),
    ("", "QLinearMatMul"): Form("MatMul", _BINARY, (6, 7)),
    # alpha other than 1 changes the bias's scale: such a QGemm stays as it is
    (MS, "QGemm"): Form("Gemm", _BINARY, (7, 8), bias=6, attributes=("transA", "transB")),
    (MS, "QLinearAdd"): Form("Add", _BINARY, (6, 7)),
    (MS, "QLinearMul"): Form("Mul", _BINARY, (6, 7)),
    (MS, "QLinearSigmoid"): Form("Sigmoid", ((0, 1, 2),), (3, 4)),
    (MS, "QLinearLeakyRelu"): Form("LeakyRelu", ((0, 1, 2),), (3, 4), attributes=("alpha",)),
    (MS, "QLinearAveragePool"): Form("AveragePool", ((0, 1, 2),), (3, 4), attributes=_POOL),
    (MS, "QLinearGlobalAveragePool"): Form("GlobalAveragePool", ((0, 1, 2),), (3, 4)),
    (MS, "QLinearConcat"): Form("Concat", ((2, 3, 4),), (0, 1), attributes=("axis",), variadic=True),
}

# attributes a quantized op may carry at these values and still be its float op
_NEUTRAL = {"channels_last": 0, "alpha": 1.0}


@dataclass
class Expansion:
    """What ``expand`` rewrote: each original op by its name, and the tensors it added."""

    originals: dict[str, onnx.NodeProto] = field(default_factory=dict)  # float op's name -> the quantized op
    added_nodes: set[str] = field(default_factory=set)  # the DequantizeLinear and QuantizeLinear it added
    added_tensors: set[str] = field(default_factory=set)  # their outputs, and the constants it computed
    # (bias, its computed scale, a's scale, b's scale) of each op with an int32 bias
    biases: list[tuple[str, str, str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.originals)

    @property
    def op_types(self) -> dict[str, str]:
        """Each float op's name -> the quantized op it stands for: what reports call it."""
        return {name: node.op_type for name, node in self.originals.items()}

    def fuse(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` (an expanded graph, pruned or not) with each quantized op back in place of its
        float form, taking the float op's attributes as the cut left them."""
        if not self:
            return model
        fused = onnx.ModelProto()
        fused.CopyFrom(model)
        graph = fused.graph
        nodes = []
        for node in graph.node:
            if node.name in self.added_nodes:
                continue
            original = self.originals.get(node.name)
            if original is None:
                nodes.append(node)
                continue
            restored = onnx.NodeProto()
            restored.CopyFrom(original)
            form = FORMS[(_domain(original), original.op_type)]
            cut = {a.name: a for a in node.attribute}
            kept = [a for a in original.attribute if a.name not in form.attributes]
            del restored.attribute[:]
            restored.attribute.extend(kept + [cut[name] for name in form.attributes if name in cut])
            nodes.append(restored)
        del graph.node[:]
        graph.node.extend(nodes)
        self._rescale_biases(graph)
        _drop(graph.initializer, self.added_tensors)
        _drop(graph.value_info, self.added_tensors)
        return fused

    def _rescale_biases(self, graph: onnx.GraphProto) -> None:
        """The fused ops read their bias at a's scale times b's as the model now holds them. A refit
        grows b's scale and the bias's computed scale with it; should the two part all the same
        (a bias the refit did not see), the bias is requantized to mean what it meant."""
        tensors = {t.name: t for t in graph.initializer}
        for bias, bias_scale, a_scale, b_scale in self.biases:
            read = _bias_scale(numpy_helper.to_array(tensors[a_scale]), numpy_helper.to_array(tensors[b_scale]))
            held, read = np.broadcast_arrays(
                numpy_helper.to_array(tensors[bias_scale]).reshape(-1).astype(np.float64), read.astype(np.float64)
            )
            if np.array_equal(held, read):
                continue
            values = numpy_helper.to_array(tensors[bias])
            info = np.iinfo(np.int32)
            # a soft model's removed channels hold zero scales: nothing to read there
            ratio = np.divide(held, read, out=np.ones_like(held), where=(read != 0) & (held != 0))
            rescaled = np.rint(values.astype(np.float64).reshape(-1) * ratio)
            tensors[bias].CopyFrom(
                numpy_helper.from_array(
                    np.clip(rescaled, info.min, info.max).astype(np.int32).reshape(values.shape), bias
                )
            )


def _bias_scale(a_scale: np.ndarray, b_scale: np.ndarray) -> np.ndarray:
    """The scale the integer kernels read an int32 bias at, in the scales' own float type."""
    return (a_scale.reshape(()) * b_scale.reshape(-1)).astype(b_scale.dtype)


def _drop(container, names: set[str]) -> None:
    kept = [item for item in container if item.name not in names]
    del container[:]
    container.extend(kept)


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def expand(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, Expansion]:
    """``model`` with every quantized op whose float form is known written as that form, and what
    was rewritten. An op that cannot be read exactly so is left as it is, and freezes what it
    touches like any op without a rule."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    names = _NameSource(
        {t.name for t in graph.initializer}
        | {i.name for i in graph.input}
        | {o for n in graph.node for o in n.output}
        | {n.name for n in graph.node}
    )
    expansion = Expansion()
    rewritten, new_initializers = [], []
    for node in graph.node:
        form = FORMS.get((_domain(node), node.op_type))
        written = _float_form(node, form, initializers, readers, names, opset) if form else None
        if written is None:
            rewritten.append(node)
            continue
        nodes, tensors, bias = written
        if bias is not None:
            expansion.biases.append(bias)
        expansion.originals[node.name] = node
        expansion.added_nodes.update(n.name for n in nodes if n.name != node.name)
        expansion.added_tensors.update(o for n in nodes for o in n.output if o not in node.output)
        expansion.added_tensors.update(t.name for t in tensors)
        rewritten.extend(nodes)
        new_initializers.extend(tensors)
    if not expansion:
        return model, expansion
    expanded = onnx.ModelProto()
    expanded.CopyFrom(model)
    del expanded.graph.node[:]
    expanded.graph.node.extend(rewritten)
    expanded.graph.initializer.extend(new_initializers)
    del expanded.graph.value_info[:]  # the integer tensors inside each op are float now
    return expanded, expansion


class _NameSource:
    def __init__(self, taken: set[str]):
        self.taken = taken

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def _float_form(node, form: Form, initializers, readers: Counter, names: _NameSource, opset: int):
    """The DequantizeLinear, float op and QuantizeLinear ``node`` stands for, the constants they
    need, and its bias's record for ``Expansion.biases``; None where ``node`` is not exactly that."""
    named = [*sum(form.operands, ()), *(form.output or ()), form.bias or 0]
    inputs = list(node.input) + [""] * (max(named) + 1)  # optional inputs left out read as absent
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if any(
        name not in form.attributes and (name not in _NEUTRAL or value != _NEUTRAL[name])
        for name, value in attrs.items()
    ):
        return None
    operands = _operand_positions(form, len(node.input))
    if operands is None or any(inputs[d] == "" or inputs[s] == "" for d, s, _ in operands):
        return None
    requantized = form.output is not None and bool(inputs[form.output[0]])
    if form.output is not None and not requantized and node.op_type != "QGemm":  # QGemm may give floats
        return None
    nodes: list[onnx.NodeProto] = []
    tensors: list[TensorProto] = []
    float_inputs: list[str] = []
    stem = node.name or node.output[0]
    for k, (data, scale, zero) in enumerate(operands):
        axis = _weight_axis(node, k, inputs[data], inputs[scale], initializers)
        if axis is False or (axis is not None and opset < 13):  # DequantizeLinear's axis came in opset 13
            return None
        zero_point = _zero_point(inputs[zero], inputs[scale], initializers, names, tensors)
        if zero_point is None:
            return None
        out = names(f"{inputs[data]}_dequantized")
        attributes: dict[str, Any] = {} if axis is None else {"axis": axis}
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [inputs[data], inputs[scale]] + zero_point,
                [out],
                names(f"{stem}/dequantize_{k}"),
                **attributes,
            )
        )
        float_inputs.append(out)
    bias_record = None
    if form.bias is not None and inputs[form.bias]:
        bias = _bias_dequantized(node, form, inputs, initializers, readers, names, stem)
        if bias is None:
            return None
        bias_node, bias_scale = bias
        nodes.append(bias_node)
        tensors.append(bias_scale)
        float_inputs.append(bias_node.output[0])
        (_, a_scale, _), (_, b_scale, _) = operands
        bias_record = (inputs[form.bias], bias_scale.name, inputs[a_scale], inputs[b_scale])
    result = names(f"{node.output[0]}_float") if requantized else node.output[0]
    float_op = helper.make_node(form.float_op, float_inputs, [result], node.name)
    float_op.attribute.extend(a for a in node.attribute if a.name in form.attributes)
    nodes.append(float_op)
    if requantized and form.output is not None:
        scale, zero = form.output
        output_zero_point = _output_zero_point(inputs[zero], operands[0], inputs, initializers, names, tensors)
        if output_zero_point is None:
            return None
        nodes.append(
            helper.make_node(
                "QuantizeLinear",
                [result, inputs[scale], output_zero_point],
                [node.output[0]],
                names(f"{stem}/quantize"),
            )
        )
    return nodes, tensors, bias_record


def _size(tensor) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _zero_point(zero: str, scale: str, initializers, names: _NameSource, tensors: list) -> list[str] | None:
    """The zero point a DequantizeLinear takes for an operand: as given, or one value spread to
    one per channel where the scale has one per channel (the ops allow that, DequantizeLinear not);
    None where it cannot be written (one scale, a zero point per channel)."""
    scales = _size(initializers[scale]) if scale in initializers else 1
    if not zero:
        return []
    if zero not in initializers:
        return [zero] if scales == 1 else None
    zeros = _size(initializers[zero])
    if zeros == scales:
        return [zero]
    if zeros != 1:
        return None
    value = numpy_helper.to_array(initializers[zero]).reshape(())
    spread = numpy_helper.from_array(np.full(scales, value, value.dtype), names(f"{zero}_per_channel"))
    tensors.append(spread)
    return [spread.name]


def _output_zero_point(zero: str, first, inputs, initializers, names: _NameSource, tensors: list) -> str | None:
    """The output's zero point, or a zero of the first operand's type where the op leaves it out
    (0 in that type, which QuantizeLinear without one would write as uint8 whatever the type)."""
    if zero:
        return zero
    _, _, first_zero = first
    typed = initializers.get(inputs[first_zero]) or initializers.get(inputs[first[0]])
    if typed is None:
        return None
    dtype = helper.tensor_dtype_to_np_dtype(typed.data_type)
    if np.dtype(dtype).kind not in "iu":
        return None
    tensor = numpy_helper.from_array(np.zeros((), dtype), names("zero_point"))
    tensors.append(tensor)
    return tensor.name


def _operand_positions(form: Form, count: int):
    if not form.variadic:
        return form.operands if count > max(max(d, s) for d, s, _ in form.operands) else None
    start = form.operands[0][0]
    if (count - start) % 3 or count <= start:
        return None
    return tuple((i, i + 1, i + 2) for i in range(start, count, 3))


def _weight_axis(node, k: int, data: str, scale: str, initializers) -> int | None | bool:
    """The axis a per-channel scale runs along (None: one scale), or False where it is neither:
    only a constant weight of a product (the second operand) has a scale per output channel."""
    tensor = initializers.get(scale)
    if tensor is None:
        return None  # a computed scale: one value, as the ops require of activations
    size = _size(tensor)
    if size == 1:
        return None
    weight = initializers.get(data)
    if k != 1 or weight is None or len(tensor.dims) != 1:
        return False
    axis = _output_axis(node, weight)
    return axis if axis is not None and weight.dims[axis] == size else False


def _output_axis(node, weight) -> int | None:
    """The axis of a product's weight that indexes its outputs."""
    if node.op_type == "QLinearConv":
        return 0
    if node.op_type == "QGemm":
        return 0 if transposed(node) else 1
    if node.op_type == "QLinearMatMul" and len(weight.dims) == 2:
        return 1
    return None


def _bias_dequantized(node, form: Form, inputs, initializers, readers: Counter, names: _NameSource, stem: str):
    """DequantizeLinear of the int32 bias at a_scale * b_scale: the scale the integer kernels read it
    at, computed as a tensor of its own. Only a bias with one value per output that no other op
    reads: a refit keeps such a bias at that product, anything else could drift from it."""
    (_, a_scale, _), (weight, b_scale, _) = form.operands
    bias, a, b, w = (initializers.get(inputs[i]) for i in (form.bias, a_scale, b_scale, weight))
    if bias is None or a is None or b is None or w is None or bias.data_type != TensorProto.INT32:
        return None
    outputs = w.dims[_output_axis(node, w)]
    if readers[inputs[form.bias]] != 1 or len(bias.dims) != 1 or bias.dims[0] != outputs:
        return None
    product = _bias_scale(numpy_helper.to_array(a), numpy_helper.to_array(b))
    if product.size not in (1, outputs):
        return None
    scale = numpy_helper.from_array(
        product.reshape(()) if product.size == 1 else product, names(f"{inputs[form.bias]}_scale")
    )
    attributes: dict[str, Any] = {"axis": 0} if product.size > 1 else {}
    out = names(f"{inputs[form.bias]}_dequantized")
    return helper.make_node(
        "DequantizeLinear", [inputs[form.bias], scale.name], [out], names(f"{stem}/dequantize_bias"), **attributes
    ), scale


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default
