"""Stage 1: read an ONNX file into a canonical, shape-annotated ModelProto."""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from spa.core.errors import ModelLoadError
from spa.core.tensors import (
    LAZY_BYTES,
    data_bytes,
    external_entries,
    read_external,
    remember_file,
    to_array,
    value_count,
)
from spa.formats.checker import checker_complaint
from spa.ops.conv import check_groups
from spa.ops.gather import Gather
from spa.ops.registry import DEFAULT


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load ``path`` with its external data, or raise :class:`ModelLoadError`."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from exc
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (empty graph)")
    if not _text_is_utf8(model):
        raise ModelLoadError(f"{path}: not a valid ONNX model (a name or other text is not valid UTF-8)")
    _load_external_data(model, path.parent)
    _check_structure(model, path)
    return model


def _text_is_utf8(message) -> bool:
    """Whether every string field decodes: protobuf hands undecodable ones back as bytes, which
    then fail far from here (sorting names, writing reports)."""
    if isinstance(message, onnx.TensorProto):  # its data fields are bytes and numbers, and large
        return (
            isinstance(message.name, str)
            and isinstance(message.doc_string, str)
            and all(_text_is_utf8(e) for e in message.external_data)
        )
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            if not all(isinstance(v, str) for v in (value if _repeated(field) else (value,))):
                return False
        elif field.type == field.TYPE_MESSAGE:
            if not all(_text_is_utf8(m) for m in (value if _repeated(field) else (value,))):
                return False
    return True


def _repeated(field) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def _check_structure(model: onnx.ModelProto, path: Path) -> None:
    """Refuse malformed models up front: a corrupt file must fail here with one clear line,
    not deep inside a rule. Unknown op domains pass (they freeze their dims later)."""
    complaint = checker_complaint(model)
    if complaint:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({complaint})")
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        # spa reads ops through onnx's schemas; an onnxruntime newer than onnx may run the model,
        # but what a newer op version means is then unknown to spa and to onnx's shape inference
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelLoadError(
                f"{path}: uses opset {opset.version}, newer than the installed onnx knows "
                f"({newest}); upgrade onnx to prune it"
            )
    for tensor in all_tensors(model.graph):
        problem = _data_problem(tensor)
        if problem:
            raise ModelLoadError(f"{path}: tensor '{_printable(tensor.name)}' {problem}")


def _data_problem(tensor: onnx.TensorProto) -> str | None:
    """Why the tensor's data cannot be the shape it declares, or None.

    The checker counts which fields hold values, not how many values they hold; onnxruntime and
    numpy then fail on the size with errors that name neither the tensor nor the file.
    """
    if any(d < 0 for d in tensor.dims):
        return f"has a negative dimension {list(tensor.dims)}"
    count = _numel(tensor)
    if uses_external_data(tensor):
        return None  # sized against its file by _load_external_data
    if tensor.data_type == onnx.TensorProto.STRING:
        held, expected, unit = len(tensor.string_data), count, "strings"
    elif tensor.HasField("raw_data"):
        expected = data_bytes(tensor.data_type, count)
        if expected is None:
            return f"has data type {tensor.data_type}, which spa cannot read"
        held, unit = len(tensor.raw_data), "bytes"
    else:
        held = sum(len(getattr(tensor, f)) for f in _VALUE_FIELDS)
        expected, unit = value_count(tensor.data_type, count), "values"
    if held != expected:
        return f"declares {count} elements ({expected} {unit}) but holds {held} {unit}"
    return None


_VALUE_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _printable(name: str) -> str:
    return name if len(name) <= 80 else name[:77] + "..."


def _load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Check every external reference, then load the data, or for large models leave it on disk.

    A reference must stay inside the model's folder (no ``..``, absolute paths or symlinks
    out of it), name a regular file, and its byte range must fit the file and match the
    tensor's declared size. The rule covers every tensor in the model: initializers and
    Constant values of the main graph and of every If/Loop/Scan body, however deep.
    Only the main graph's initializers stay on disk (lazily read by spa.core.tensors); the rest
    are read now, so nothing spa later writes can still refer to a file it did not check.
    """
    weights = [t for t in model.graph.initializer if uses_external_data(t)]
    others = [t for t in nested_tensors(model.graph) if uses_external_data(t)]
    if not weights and not others:
        return
    root = base_dir.resolve()
    ranges = [_checked_range(tensor, base_dir, root) for tensor in weights + others]
    lazy = len(weights) if sum(length for _, _, length in ranges) >= LAZY_BYTES else 0
    for k, (tensor, (target, offset, length)) in enumerate(zip(weights + others, ranges)):
        if k < lazy:  # memory stays free: spa.core.tensors reads it when needed
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = str(target)
            continue
        data = read_external(target, offset, length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = bytes(data)


def _checked_range(tensor: onnx.TensorProto, base_dir: Path, root: Path) -> tuple[Path, int, int]:
    """The file, offset and length a tensor's external data entry names, once they pass the rules."""
    entries = external_entries(tensor)
    problem = _entry_problem(tensor, entries)
    if problem:
        raise ModelLoadError(f"external data of tensor '{_printable(tensor.name)}': {problem}")
    location = entries.get("location", "")
    if not location:
        raise ModelLoadError(f"tensor '{tensor.name}' keeps its data in an external file but names none")
    try:
        target = (base_dir / location).resolve()  # resolves symlinks too
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        raise ModelLoadError(
            f"external data location of tensor '{tensor.name}' is not a usable file name ('{_shown(location)}')"
        ) from None
    if Path(location).is_absolute() or not target.is_relative_to(root):
        raise ModelLoadError(
            f"external data of tensor '{tensor.name}' points outside the model's folder "
            f"('{_shown(location)}'); refusing to read it"
        )
    try:
        info = target.stat()
    except (OSError, ValueError):
        raise ModelLoadError(f"external data file '{_shown(location)}' of tensor '{tensor.name}' not found") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block forever, a device never ends
        raise ModelLoadError(f"external data file '{_shown(location)}' of tensor '{tensor.name}' is not a regular file")
    remember_file(target, info)
    expected = data_bytes(tensor.data_type, _numel(tensor)) or 0
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else (expected or info.st_size - offset)
    except ValueError:
        raise ModelLoadError(
            f"tensor '{tensor.name}' has an external data offset or length that is not a whole number"
        ) from None
    if expected and length != expected:
        raise ModelLoadError(
            f"tensor '{tensor.name}' declares {expected} bytes but its external data "
            f"holds {length} at offset {offset} of a {info.st_size}-byte file"
        )
    if offset < 0 or length < 0 or offset + length > info.st_size:
        raise ModelLoadError(
            f"tensor '{tensor.name}' reads {length} bytes at offset {offset} of its "
            f"{info.st_size}-byte external data file '{_shown(location)}'"
        )
    return target, offset, length


def _entry_problem(tensor: onnx.TensorProto, entries: dict[str, str]) -> str | None:
    """What makes the entry unreadable before any file is looked at, or None."""
    if any(d < 0 for d in tensor.dims):
        return f"the tensor has a negative dimension {list(tensor.dims)}"
    if data_bytes(tensor.data_type, 0) is None:
        return f"data type {tensor.data_type} cannot be stored as external data"
    for key in ("offset", "length"):
        value = entries.get(key)
        if value is not None and not re.fullmatch(r"[0-9]{1,19}", value):
            return f"{key} '{_printable(value)}' is not a whole number of bytes"
    location = entries.get("location", "")
    if "\0" in location:
        return "its location contains a NUL byte"
    if len(location.encode(errors="surrogateescape")) > _PATH_MAX or any(
        len(part.encode(errors="surrogateescape")) > _NAME_MAX for part in location.split("/")
    ):
        return f"its location is too long to be a file name ({len(location)} characters)"
    return None


_PATH_MAX, _NAME_MAX = 4096, 255  # Linux's limits: longer names cannot be opened, only fail oddly


def _shown(location: str, limit: int = 80) -> str:
    """A location as it can be printed on one line: control characters escaped, long ones cut."""
    text = location.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def external_tensors(model: onnx.ModelProto):
    """Every tensor in the model that keeps its data in a file: main graph and subgraphs."""
    return (t for t in all_tensors(model.graph) if uses_external_data(t))


def all_tensors(graph: onnx.GraphProto):
    """Initializers, sparse initializers and attribute tensors of ``graph`` and, recursively, of the
    graphs its nodes' attributes hold (If branches, Loop and Scan bodies)."""
    yield from graph.initializer
    yield from nested_tensors(graph)


def nested_tensors(graph: onnx.GraphProto):
    """``all_tensors`` but the graph's own initializers."""
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):  # whatever the declared type: a runtime may still read it
                yield from all_tensors(attr.g)
            for sub in attr.graphs:
                yield from all_tensors(sub)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
        if _numel(t) <= _FOLD_LIMIT and not uses_external_data(t) and t.name not in overridable
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
        if len(places) < 2 or _numel(tensor) < 2 or tensor.data_type not in _FLOATS:
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


def _holds_data(tensor: onnx.TensorProto) -> bool:
    if tensor.HasField("raw_data") or uses_external_data(tensor) or _numel(tensor) == 0:
        return True
    return any(
        len(getattr(tensor, f))
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
    )


def _numel(tensor: onnx.TensorProto) -> int:
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
    model.graph.value_info.extend(inferred.graph.value_info)
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
                    f"tensor '{_printable(info.name)}' has size {size} on axis {axis}, which no "
                    f"model that runs can have"
                )
        if None not in static and math.prod(static) > _ELEMENT_LIMIT:
            raise ModelLoadError(
                f"tensor '{_printable(info.name)}' would hold {math.prod(static)} elements, more than any machine can"
            )
        shapes[info.name] = static
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    for node in graph.node:
        check_groups(node, shapes, _printable)


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
    engine.initializers_ = {name: t for name, t in engine.initializers_.items() if _holds_data(t)}
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
        if _numel(tensor) <= 64:
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
