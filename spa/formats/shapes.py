"""Shapes: every tensor annotated (onnx's inference, then onnxruntime's symbolic one), sizes no
running model can have refused, and copies of a model at other input sizes."""

from __future__ import annotations

import math

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from spa.core.errors import ModelLoadError
from spa.core.tensors import to_array
from spa.formats.canonicalize import element_count, holds_data
from spa.formats.load import printable
from spa.ops.conv import check_groups
from spa.ops.registry import DEFAULT


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Annotate every tensor with a shape, static where possible.

    onnx's inference runs first (with data propagation, so Shape->Gather->Concat
    targets resolve). Where it leaves tensors unknown, onnxruntime's symbolic
    inference is tried, because it understands contrib ops and keeps symbolic
    batch/sequence names consistent through Reshape.
    """
    del model.graph.value_info[:]
    skeleton = _without_weight_data(model)
    DEFAULT.stand_in_for_inference(skeleton.graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = skeleton
    if _unknown_count(inferred) > 0:
        try:
            symbolic = _symbolic_shapes(inferred)
            if symbolic is not None and _unknown_count(symbolic) < _unknown_count(inferred):
                inferred = symbolic
        except Exception:
            pass
    _settle_reshape_splits(inferred)
    produced = {name for node in model.graph.node for name in node.output}  # not the stand-ins' own tensors
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name in produced)
    for ours, theirs in zip(model.graph.output, inferred.graph.output):
        if not ours.type.tensor_type.HasField("shape") and theirs.type.tensor_type.HasField("shape"):
            ours.CopyFrom(theirs)
    return model


# no machine holds more: such sizes come from a corrupt or hostile model, and the rules would
# allocate an index per channel
_AXIS_LIMIT, _ELEMENT_LIMIT = 2**31 - 1, 2**40


def check_sizes(model: onnx.ModelProto) -> None:
    """Refuse inferred sizes that no model that runs can have (negative, or beyond any memory),
    and convolutions whose channels do not divide into their groups, before the rules rely on them."""
    graph = model.graph
    shapes = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = info.type.tensor_type.shape.dim
        static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        for axis, size in enumerate(static):
            if size is not None and not 0 <= size <= _AXIS_LIMIT:
                raise ModelLoadError(
                    f"tensor '{printable(info.name)}' has size {size} on axis {axis}, which no model that runs can have"
                )
        known = [size for size in static if size is not None]
        if len(known) == len(static) and math.prod(known) > _ELEMENT_LIMIT:
            raise ModelLoadError(
                f"tensor '{printable(info.name)}' would hold {math.prod(known)} elements, more than any machine can"
            )
        shapes[info.name] = static
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    for node in graph.node:
        check_groups(node, shapes, printable)


def with_input_sizes(model: onnx.ModelProto, sizes: dict[str, list[int]]) -> onnx.ModelProto:
    """A weightless copy of ``model`` whose inputs named in ``sizes`` have those sizes, every tensor's
    shape inferred again: what FLOPs at a deployment size are counted on (free axes count 1)."""
    skeleton = _without_weight_data(model)
    for info in skeleton.graph.input:
        if info.name in sizes:
            for dim, size in zip(info.type.tensor_type.shape.dim, sizes[info.name]):
                dim.Clear()
                dim.dim_value = size
    for info in skeleton.graph.output:  # inferred again from the new sizes, not kept symbolic
        info.type.tensor_type.ClearField("shape")
    return infer_shapes(skeleton)


def _settle_reshape_splits(model: onnx.ModelProto) -> None:
    """Give a Reshape's one unknown output axis its size where the shared symbols cancel.

    torch's dynamo export splits heads with the target [batch, seq, -1, head_dim], its batch and
    seq read from another input's Shape; both inferences leave the -1 unknown ([batch, seq, 64] ->
    [batch, seq, ?, 8]), the Reshape's axes cannot be paired, and the heads freeze. The input's
    axes and the output's known ones are compared as products: symbols present on both sides
    cancel, and what is left, all numbers, gives the unknown axis. Its symbol is replaced by the
    number in every tensor, since inference gives one symbol one meaning.
    """
    graph = model.graph
    infos = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    settled: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        source, target = infos.get(node.input[0]), infos.get(node.output[0])
        if (
            source is None
            or target is None
            or not source.type.tensor_type.HasField("shape")
            or not target.type.tensor_type.HasField("shape")
        ):
            continue
        dims_in = [_dim_term(d, settled) for d in source.type.tensor_type.shape.dim]
        dims_out = [_dim_term(d, settled) for d in target.type.tensor_type.shape.dim]
        unknown = [k for k, d in enumerate(dims_out) if d is None or (isinstance(d, str) and d.startswith("unk__"))]
        if len(unknown) != 1 or any(d is None for d in dims_in):
            continue
        known_out = [d for k, d in enumerate(dims_out) if k != unknown[0]]
        symbols_in = sorted(d for d in dims_in if isinstance(d, str))
        if symbols_in != sorted(d for d in known_out if isinstance(d, str)):
            continue
        numerator = math.prod(d for d in dims_in if isinstance(d, int))
        denominator = math.prod(d for d in known_out if isinstance(d, int))
        if denominator <= 0 or numerator % denominator:
            continue
        dim = target.type.tensor_type.shape.dim[unknown[0]]
        if dim.HasField("dim_param"):
            settled[dim.dim_param] = numerator // denominator
        dim.dim_value = numerator // denominator
    if settled:
        for info in infos.values():
            for dim in info.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and dim.dim_param in settled:
                    dim.dim_value = settled[dim.dim_param]


def _dim_term(dim, settled: dict[str, int]) -> int | str | None:
    """A static size, a symbol, or None (unnamed and unknown)."""
    if dim.HasField("dim_value"):
        return dim.dim_value
    if dim.HasField("dim_param"):
        return settled.get(dim.dim_param, dim.dim_param)
    return None


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic inference, driven here because its ``infer_shapes`` throws away a
    partial result and, when it does, saves the model into the current directory."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    engine = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess rank, verbose
    engine._preprocess(model)
    # the skeleton's weights have dims but no data: the engine would try to read them as values (a bias
    # added to a MatMul) and give up on the whole model; as graph inputs their shapes still count
    engine.initializers_ = {name: t for name, t in engine.initializers_.items() if holds_data(t)}
    while engine.run_:
        engine._infer_impl()
    engine._update_output_from_vi()
    _settle_computed_sizes(engine)
    return engine.out_mp_


def _settle_computed_sizes(engine) -> None:
    """Write as numbers the computed sizes that simplify to one.

    onnxruntime's inference gives a Reshape of [T, 1, 2, 512] to [0, 0, -1] the last axis
    floor((1024*T + 1024)/(T + 1)) and does not cancel it (T is itself a floor expression);
    left symbolic, the axis is unknown to the rules and its group freezes (ddddocr's LSTM head).
    The expressions are the engine's own sympy objects: no model string is ever parsed.
    """
    import sympy

    settled: dict[str, int | None] = {}
    graph = engine.out_mp_.graph
    for info in list(graph.value_info) + list(graph.output):
        for dim in info.type.tensor_type.shape.dim:
            if not dim.HasField("dim_param"):
                continue
            text = dim.dim_param
            if text not in settled:
                settled[text] = _integer_value(sympy, engine.symbolic_dims_.get(text))
            if settled[text] is not None:
                dim.dim_value = settled[text]


def _integer_value(sympy, expr) -> int | None:
    # only quotients fail to cancel; simplify is slow on large expressions, which stay symbolic
    if not isinstance(expr, sympy.Expr) or not expr.free_symbols or expr.count_ops() > 40:
        return None
    if not any(isinstance(node, sympy.Pow) and node.exp.is_negative for node in sympy.preorder_traversal(expr)):
        return None
    try:
        value = sympy.simplify(expr)
    except Exception:
        return None
    return int(value) if value.is_Integer and value > 0 else None


def _without_weight_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers keep dims and type but no data.

    Shape inference serialises the whole model; weights are most of it and only
    their shapes matter, while small integer constants (Reshape targets) are
    kept whole for data propagation.
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    declared = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if element_count(tensor) <= 64:
            graph.initializer.append(
                numpy_helper.from_array(to_array(tensor), tensor.name) if uses_external_data(tensor) else tensor
            )
            continue
        stub = graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        if tensor.name not in declared:  # the declared shape stands in for the missing data
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def _unknown_count(model: onnx.ModelProto) -> int:
    """Tensors without a shape, plus axes that are neither static nor a graph input's named axis."""
    graph = model.graph
    named = {d.dim_param for i in graph.input for d in i.type.tensor_type.shape.dim if d.HasField("dim_param")}
    infos = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    infos.update({t.name: None for t in graph.initializer})
    unknown = 0
    for node in graph.node:
        for name in node.output:
            if not name:
                continue
            info = infos.get(name, False)
            if info is False or (info is not None and not info.type.tensor_type.HasField("shape")):
                unknown += 1
            elif info is not None:
                unknown += sum(
                    1
                    for d in info.type.tensor_type.shape.dim
                    if not d.HasField("dim_value") and d.dim_param not in named
                )
    return unknown
