"""Canonical forms: weights as initializers whatever the exporter, small constants folded, names
made unique, so the rules see every model alike."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from spa.core.errors import ModelLoadError
from spa.core.tensors import to_array
from spa.ops.gather import Gather


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make weights look the same whatever the exporter (see ``_canonicalize``).

    protobuf decodes strings lazily, so a corrupt name can first fail here, where
    the model is rewritten: that is still a bad input, not a bug.
    """
    try:
        return _canonicalize(model)
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:
        raise ModelLoadError(f"not a valid ONNX model (a name is not valid UTF-8: {exc.reason})") from exc


def _canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make weights look the same whatever the exporter.

    paddle2onnx and tf2onnx keep weights in ``Constant`` nodes and the legacy
    torch exporter routes shared weights through ``Identity``; rules only need
    to understand initializers if both are turned into initializers here.
    Node names are made unique because reports and ``--exclude`` use them.
    """
    model = _copy(model)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    init_names = {t.name for t in graph.initializer}
    kept = []
    rename: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            value = _constant_value(node)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                init_names.add(node.output[0])
                continue
        if node.op_type == "Identity" and node.input and node.input[0] in init_names and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    if rename:
        for node in kept:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        _rename_in_subgraphs(kept, rename)
    kept = _fold_small_constants(kept, model, init_names, outputs)
    del graph.node[:]
    graph.node.extend(kept)
    _unique_node_names(graph)
    _clear_negative_dims(graph)
    _positive_concat_axes(graph)
    _unshare_uniform_initializers(graph)
    return model


def _clear_negative_dims(graph: onnx.GraphProto) -> None:
    """paddle2onnx declares a free batch axis as dim_value -1; ONNX has no such size, and taken as
    a number it would be read as a static axis of -1 elements. It becomes an unnamed free axis."""
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()


def _positive_concat_axes(graph: onnx.GraphProto) -> None:
    """Write a negative Concat axis as its positive equal where an initializer gives the rank.

    paddle2onnx builds Flatten's target as Concat(axis=-1) of a sliced Shape and a constant;
    onnxruntime's symbolic inference only reads a 1-D Concat of sizes with axis 0 and otherwise
    gives up on the whole model, leaving the Reshape, the classifier MatMul and the channels
    that feed it unknown and frozen (PP-OCR's direction classifier).
    """
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        rank = next((ranks[name] for name in node.input if name in ranks), None)
        for attr in node.attribute:
            if attr.name == "axis" and attr.i < 0 and rank and -rank <= attr.i:
                attr.i += rank


# shape arithmetic that exporters leave in the graph (ConstantOfShape -> Equal -> Where feeding an
# Expand); onnx's data propagation stops at several of these ops, leaving axes unknown and freezing
# whole groups. Deterministic ops only, and small tensors only: weights are never folded.
_FOLDABLE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Equal",
    "Where",
    "ConstantOfShape",
    "Cast",
    "Concat",
    "Unsqueeze",
    "Squeeze",
    *Gather.ops,
    "Slice",
    "Reshape",
    "Range",
    "Not",
    "And",
    "Or",
    "Less",
    "Greater",
    "Neg",
    "Abs",
    "Max",
    "Min",
    "Expand",
    "Tile",
    "ReduceProd",
    "Floor",
    "Ceil",
    "Mod",
}
_FOLD_LIMIT = 4096


def _fold_small_constants(nodes: list, model: onnx.ModelProto, init_names: set[str], outputs: set[str]) -> list:
    graph = model.graph
    overridable = {i.name for i in graph.input}  # an initializer that is also an input is a default, not a constant
    small = {
        t.name: t
        for t in graph.initializer
        if element_count(t) <= _FOLD_LIMIT and not uses_external_data(t) and t.name not in overridable
    }
    kept, folded_inputs = [], set()
    for node in nodes:
        values = (
            _folded(node, small, model.opset_import)
            if (node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx") and not set(node.output) & outputs)
            else None
        )
        if values is None:
            kept.append(node)
            continue
        folded_inputs.update(node.input)
        for name, value in zip(node.output, values):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            graph.initializer.append(tensor)
            small[name] = tensor
            init_names.add(name)
    # what only folded ops read is dead now, and would be written into the pruned model
    dead = folded_inputs - _names_read(kept) - outputs - overridable
    if dead:
        alive = [t for t in graph.initializer if t.name not in dead]
        del graph.initializer[:]
        graph.initializer.extend(alive)
    return kept


def _names_read(nodes) -> set[str]:
    """Every tensor name the nodes (and their subgraphs) read."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                names |= _names_read(sub.node) | {o.name for o in sub.output}
    return names


def _folded(node: onnx.NodeProto, small: dict[str, onnx.TensorProto], opsets) -> list | None:
    inputs = [name for name in node.input if name]
    if not all(name in small for name in inputs) or not node.output:
        return None
    from onnx.reference import ReferenceEvaluator

    feeds = {name: numpy_helper.to_array(small[name]) for name in inputs}
    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [onnx.helper.make_tensor_value_info(n, small[n].data_type, None) for n in inputs],
        [onnx.helper.make_tensor_value_info(o, 0, None) for o in node.output],
    )
    try:
        # the model's own opsets: Squeeze, Slice and others changed signature between versions
        values = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=list(opsets))).run(None, feeds)
    except Exception:  # whatever the reference cannot evaluate stays an op
        return None
    assert isinstance(values, list)  # run gives a dict only for intermediate=True
    if any(np.asarray(v).size > _FOLD_LIMIT for v in values):
        return None
    return values


def _unshare_uniform_initializers(graph: onnx.GraphProto) -> None:
    """Give each use of a shared all-equal initializer its own copy.

    Exporters deduplicate initializers by value, so every zero bias of a
    freshly initialised (or BN-folded) network can end up as one tensor used
    by unrelated convs. Left shared, it would couple all their channels.
    Genuinely tied weights (not uniform) stay shared and stay coupled.
    """
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in inits:
                uses.setdefault(name, []).append((node, i))
    taken = set(inits) | {o for n in graph.node for o in n.output}
    for name, places in uses.items():
        tensor = inits[name]
        if len(places) < 2 or element_count(tensor) < 2 or tensor.data_type not in _FLOATS:
            continue
        value = to_array(tensor)
        if not np.all(value == value.flat[0]):
            continue
        for k, (node, i) in enumerate(places[1:], start=1):
            copy_name = f"{name}__{k}"
            while copy_name in taken:
                copy_name += "_"
            taken.add(copy_name)
            graph.initializer.append(numpy_helper.from_array(value, copy_name))
            node.input[i] = copy_name


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def holds_data(tensor: onnx.TensorProto) -> bool:
    if tensor.HasField("raw_data") or uses_external_data(tensor) or element_count(tensor) == 0:
        return True
    return any(
        len(getattr(tensor, f))
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
    )


def element_count(tensor: onnx.TensorProto) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    return n


def _rename_in_subgraphs(nodes, rename: dict[str, str]) -> None:
    for node in nodes:
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                for inner in sub.node:
                    for i, name in enumerate(inner.input):
                        if name in rename:
                            inner.input[i] = rename[name]
                _rename_in_subgraphs(sub.node, rename)


def _attr_graphs(attr: onnx.AttributeProto):
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse and string constants stay as nodes


def _unique_node_names(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        node.name = name


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
