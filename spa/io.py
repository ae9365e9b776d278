"""Writing files so that a failure never leaves a partial output behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .errors import OutputError
from .tensors import is_lazy, write_external

# protobuf cannot serialise a message over 2 GiB; stay clear of the limit
_EXTERNAL_THRESHOLD = 1_800_000_000


def check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    _check_name_length(output)
    resolved = output.resolve()
    if any(resolved == p.resolve() for p in inputs):
        raise OutputError(f"{output}: refusing to overwrite the input model")
    if output.is_dir():
        raise OutputError(f"{output}: is a directory")
    if output.exists() and not force:
        raise OutputError(f"{output}: exists (use --force to overwrite)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parent}: no such directory")
    try:  # probe now rather than fail after pruning; os.access says yes to root on read-only mounts
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputError(f"{parent}: not writable ({exc.strerror or exc})") from exc


# the atomic write's temporary name beside the output: "." + name + "." + 8 random + ".tmp"
_TEMP_NAME_EXTRA = 14


def _check_name_length(output: Path) -> None:
    """A name the filesystem cannot hold (often derived from a long input name, as
    ``NAME.pruned.onnx``) fails here with one line, not as an error from deep in a write."""
    try:
        limit = os.pathconf(output.parent if str(output.parent) else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(output.name)) + _TEMP_NAME_EXTRA > limit:
        raise OutputError(f"{str(output)[:60]}...: file name too long for this filesystem "
                          f"({len(os.fsencode(output.name))} bytes; choose a shorter output name)")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Save atomically; large models keep their weights in ``<name>.data`` beside them."""
    path = Path(path)
    if not is_lazy(model) and model.ByteSize() < _EXTERNAL_THRESHOLD:
        write_bytes_atomic(path, model.SerializeToString())
        return
    parent = path.parent if str(path.parent) else Path(".")
    data_name = f"{path.name}.data"
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        write_external(model, staging, path.name)  # streams tensor by tensor
        os.replace(staging / data_name, parent / data_name)
        os.replace(staging / path.name, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        for leftover in staging.glob("*"):
            _remove_quietly(leftover)
        staging.rmdir()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _remove_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
