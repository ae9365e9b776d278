"""Reading an ONNX file: its structure, its external data and every tensor's size checked before
anything relies on them. Canonical forms are in ``spa.formats.canonicalize``, shapes in
``spa.formats.shapes``."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from spa.core.errors import ModelLoadError
from spa.core.tensors import (
    LAZY_BYTES,
    data_bytes,
    external_entries,
    read_external,
    remember_file,
    value_count,
)
from spa.formats.canonicalize import element_count
from spa.formats.checker import checker_complaint
from spa.formats.walk import all_tensors, nested_tensors


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
            raise ModelLoadError(f"{path}: tensor '{printable(tensor.name)}' {problem}")


def _data_problem(tensor: onnx.TensorProto) -> str | None:
    """Why the tensor's data cannot be the shape it declares, or None.

    The checker counts which fields hold values, not how many values they hold; onnxruntime and
    numpy then fail on the size with errors that name neither the tensor nor the file.
    """
    if any(d < 0 for d in tensor.dims):
        return f"has a negative dimension {list(tensor.dims)}"
    count = element_count(tensor)
    if uses_external_data(tensor):
        return None  # sized against its file by _load_external_data
    if tensor.data_type == onnx.TensorProto.STRING:
        held, expected, unit = len(tensor.string_data), count, "strings"
    elif tensor.HasField("raw_data"):
        raw_bytes = data_bytes(tensor.data_type, count)
        if raw_bytes is None:
            return f"has data type {tensor.data_type}, which spa cannot read"
        held, expected, unit = len(tensor.raw_data), raw_bytes, "bytes"
    else:
        held = sum(len(getattr(tensor, f)) for f in _VALUE_FIELDS)
        expected, unit = value_count(tensor.data_type, count), "values"
    if held != expected:
        return f"declares {count} elements ({expected} {unit}) but holds {held} {unit}"
    return None


_VALUE_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def printable(name: str) -> str:
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
        raise ModelLoadError(f"external data of tensor '{printable(tensor.name)}': {problem}")
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
    expected = data_bytes(tensor.data_type, element_count(tensor)) or 0
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
            return f"{key} '{printable(value)}' is not a whole number of bytes"
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
