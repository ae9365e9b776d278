"""Initializer values without copying large models into memory.

Models with external data (at least ``LAZY_BYTES`` of it; by default any) load *lazily*:
their tensors keep an ``external_data`` reference, rewritten to the absolute
path of a file that was checked to sit inside the model's folder. Values are
then read on demand and never held, and models are written back one
tensor at a time, so peak memory stays near the size of what the cut creates.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

LAZY_BYTES = int(os.environ.get("SPA_LAZY_BYTES", 0))
INLINE_LIMIT = 1024  # tensors smaller than this many bytes stay inside the .onnx file

# types stored several to a byte (low bits first), by bits per element; getattr: older onnx lacks some
PACKED_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (
        ("UINT4", 4),
        ("INT4", 4),
        ("FLOAT4E2M1", 4),
        ("UINT2", 2),
        ("INT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(onnx.TensorProto, name)
}


def data_bytes(data_type: int, count: int) -> int | None:
    """Bytes that ``count`` elements of ``data_type`` take in raw_data or an external file
    (4-bit values two to a byte); None for types without a binary form (strings, undefined)."""
    if data_type in PACKED_BITS:
        return packed_bytes(data_type, count)
    if data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):  # a type number this onnx does not know
        return None


def packed_bytes(data_type: int, count: int) -> int:
    """Bytes that ``count`` values of a packed type (one of ``PACKED_BITS``) take, rounded up."""
    return -(-count * PACKED_BITS[data_type] // 8)


def value_count(data_type: int, count: int) -> int:
    """Entries that ``count`` elements of ``data_type`` take in the typed fields (int32_data...):
    4-bit values two to an entry, 2-bit four, complex numbers two entries each."""
    bits = PACKED_BITS.get(data_type)
    if bits in (2, 4):
        return -(-count * bits // 8)
    if data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return 2 * count
    return count


def external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_lazy(model: onnx.ModelProto) -> bool:
    """True when some tensor still refers to its data on disk (a lazily loaded model)."""
    return any(uses_external_data(t) for t in model.graph.initializer)


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's value: read from disk on demand for lazy external data, else an array."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    entries = external_entries(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    if not count:
        return np.zeros(shape, dtype=dtype)
    offset = int(entries.get("offset", 0))
    if tensor.data_type in PACKED_BITS:  # several values to a byte: unpacked, as onnx does
        packed = read_external(Path(entries["location"]), offset, packed_bytes(tensor.data_type, count))
        inline = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=shape, raw_data=bytes(packed))
        value = numpy_helper.to_array(inline)
        value.flags.writeable = False
        return value
    data = read_external(Path(entries["location"]), offset, count * np.dtype(dtype).itemsize)
    value = np.frombuffer(data, dtype=dtype).reshape(shape)
    value.flags.writeable = False  # as the read-only memory maps it replaced were: callers copy to change
    return value


# The identity (device, inode, size, mtime) of each external data file when its references were
# checked. Data is read, never memory-mapped: a mapped file that shrinks under the reader kills it
# with SIGBUS, which no Python code can catch, while a read just comes back short. Comparing the
# identity before and after each read turns a file that was replaced, truncated or rewritten
# under spa into one clear load error.
_IDENTITIES: dict[str, tuple[int, int, int, int]] = {}


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def remember_file(path: Path, info: os.stat_result) -> None:
    _IDENTITIES[str(path)] = _identity(info)


def read_external(path: Path, offset: int, length: int) -> bytearray:
    """``length`` bytes at ``offset`` of an external data file, or ``ModelLoadError`` when the file
    is not the one that was checked any more or holds fewer bytes."""
    from spa.core.errors import ModelLoadError

    changed = ModelLoadError(f"{path}: changed while spa was reading it (rerun once it is complete)")
    try:
        # non-blocking: a FIFO swapped in for the file must not hang the open
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
            info = os.fstat(handle.fileno())
            expected = _IDENTITIES.get(str(path))
            if not stat.S_ISREG(info.st_mode) or (expected is not None and _identity(info) != expected):
                raise changed
            data = bytearray(length)
            view, done = memoryview(data), 0
            handle.seek(offset)
            while done < length:
                got = handle.readinto(view[done:])
                if not got:
                    raise ModelLoadError(
                        f"{path}: ends {length - done} bytes short of what the model reads "
                        f"(truncated while spa was reading it?)"
                    )
                done += got
            if expected is not None and _identity(os.fstat(handle.fileno())) != expected:
                raise changed
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read external data ({exc.strerror or exc})") from exc
    return data


def shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything but the initializers (copying those would duplicate the weights)."""
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(out.graph, field, value)
    return out


def inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every external initializer read into it (for tools that need values in the proto)."""
    out = shell(model)
    for tensor in model.graph.initializer:
        out.graph.initializer.append(
            numpy_helper.from_array(to_array(tensor), tensor.name) if uses_external_data(tensor) else tensor
        )
    return out


def _copy_field(target, field, value) -> None:
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


Transform = Callable[[str, np.ndarray], np.ndarray]


class TensorWriter:
    """Appends tensors to one data file (page-aligned) and hands back their TensorProtos.

    ``absolute`` references (used for spa's own scratch files) keep the result lazily
    readable wherever the model proto travels; relative ones are for files users get.
    """

    def __init__(self, path: Path, absolute: bool = False):
        self.path = Path(path)
        self.handle = open(self.path, "wb")
        self.location = str(self.path.resolve()) if absolute else self.path.name

    def add(self, name: str, data_type: int, value: np.ndarray) -> onnx.TensorProto:
        if value.nbytes < INLINE_LIMIT:
            return numpy_helper.from_array(np.asarray(value), name)
        padding = -self.handle.tell() % 4096  # page-aligned, so readers can map tensors directly
        self.handle.write(b"\0" * padding)
        offset = self.handle.tell()
        if data_type in PACKED_BITS:  # numpy holds one value a byte; the file holds them packed
            packed = numpy_helper.from_array(np.asarray(value), name).raw_data
            self.handle.write(packed)
            length = len(packed)
        else:
            _write_array(self.handle, value)
            length = value.nbytes
        stub = onnx.TensorProto()
        stub.name, stub.data_type = name, data_type
        stub.dims.extend(value.shape)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, entry in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            item = stub.external_data.add()
            item.key, item.value = key, entry
        return stub

    def flush(self) -> None:
        """Make what was added readable by others (onnxruntime) while more is still to come."""
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def write_external(
    model: onnx.ModelProto, folder: Path, name: str, transform: Transform | None = None, data_name: str | None = None
) -> Path:
    """Write ``folder/name`` and ``folder/<data_name>`` (``name.data`` by default), streaming one
    tensor at a time.

    ``transform(name, array)`` may change each initializer on the way (soft pruning
    zeroes slices this way without materialising a second copy of the model).
    """
    out = shell(model)
    writer = TensorWriter(Path(folder) / (data_name or f"{name}.data"))
    try:
        for tensor in model.graph.initializer:
            value = to_array(tensor)
            if transform is not None:
                value = transform(tensor.name, value)
            out.graph.initializer.append(writer.add(tensor.name, tensor.data_type, value))
            del value
    finally:
        writer.close()
    path = Path(folder) / name
    path.write_bytes(out.SerializeToString())
    return path


def _write_array(handle, value: np.ndarray, chunk: int = 64 << 20) -> None:
    flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, chunk):
        handle.write(flat[start : start + chunk].tobytes())


def write_beside_data(model: onnx.ModelProto, folder: Path, name: str) -> Path:
    """Write only the proto, next to data files it already refers to by absolute path.

    Used for spa's scratch copies: the cut already streamed its tensors into ``folder``,
    so onnxruntime can load the model from there without the weights being written twice.
    """
    folder = Path(folder).resolve()
    out = onnx.ModelProto()
    out.CopyFrom(model)  # cheap: the big tensors are references, not data
    for tensor in out.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and Path(entry.value).is_absolute():
                if Path(entry.value).parent != folder:
                    raise ValueError(f"tensor {tensor.name} is stored outside {folder}")
                entry.value = Path(entry.value).name
    path = folder / name
    path.write_bytes(out.SerializeToString())
    return path
