"""Writing files so that a failure never leaves a partial output behind."""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from spa.core.errors import OutputError, UsageError
from spa.core.signals import deferred, remove_quietly
from spa.core.tensors import is_lazy, write_external

# protobuf cannot serialise a message over 2 GiB; stay clear of the limit
_EXTERNAL_THRESHOLD = 1_800_000_000


def check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    _check_name_length(output)
    """Refuse, before any work, an output that would replace a file the run reads, something
    that is not a regular file, or (without ``force``) an existing file.

    ``inputs`` are the files the run reads: model files bring every external data file they
    reference along (see :func:`protected_files`).
    """
    for given in inputs:
        if _same_file(output, given):
            raise OutputError(f"{output}: refusing to overwrite a file this run reads or writes")
    refuse_input(output, protected_files(inputs))
    refuse_special(output)
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


def refuse_input(output: Path, protected: list[Path]) -> None:
    for path in protected:
        if _same_file(output, path):
            raise OutputError(f"{output}: refusing to overwrite '{path}', which the input model reads")


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names: the same path once symlinks are resolved, or a hard link."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def refuse_special(output: Path) -> None:
    """spa replaces regular files only: renaming over /dev/null or a FIFO would break the system
    or the pipeline that owns it. A symlink counts as what it points to."""
    try:
        mode = os.stat(output).st_mode
    except (OSError, ValueError):
        return  # nothing there (or a dangling link): the write creates a regular file
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise UsageError(f"{output}: is {kind}; spa only writes regular files")


def protected_files(paths: list[Path]) -> list[Path]:
    """The given files and, for ONNX models among them, every external data file they reference
    (main graph and subgraphs), whether or not the reference is one spa would follow."""
    found = []
    for path in paths:
        found.append(Path(path))
        found.extend(_referenced_files(Path(path)))
    return found


def _referenced_files(path: Path) -> list[Path]:
    try:
        info = path.stat()
    except (OSError, ValueError):
        return []
    if not stat.S_ISREG(info.st_mode):  # never open a FIFO or a device to look inside
        return []
    # relative to the folder of the name given, as the loader reads them, even through a symlink
    return list(_references_of(str(path), info.st_size, info.st_mtime_ns))


@functools.lru_cache(maxsize=16)  # each output check asks again; parse a large model once
def _references_of(name: str, size: int, mtime_ns: int) -> tuple[Path, ...]:
    path = Path(name)
    try:
        if not _mentions_external_data(path):
            return ()
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model: loading it reports that in its own words
        return ()
    from spa.core.tensors import external_entries
    from spa.formats.walk import external_tensors

    files = []
    for tensor in external_tensors(model):
        location = external_entries(tensor).get("location", "")
        try:
            files.append((path.parent / location).resolve())
        except (OSError, ValueError):
            pass
    return tuple(files)


def _mentions_external_data(path: Path, chunk: int = 16 << 20) -> bool:
    """Whether the file holds the key every external data entry carries: a scan, cheaper than
    parsing a large model twice."""
    key = b"location"
    with open(path, "rb") as handle:
        tail = b""
        while block := handle.read(chunk):
            if key in tail + block:
                return True
            tail = block[-len(key) :]
    return False


def output_data_path(output: Path, protected: list[Path]) -> Path:
    """Where the weights of ``output`` go when it keeps them beside it: ``<output>.data``, unless
    the input reads a file of that name (a model whose data file is ``m.pruned.onnx.data``),
    then the first free ``<output>.<n>.data``. The model records the name, so readers follow."""
    candidate = output.with_name(f"{output.name}.data")
    n = 1
    while any(_same_file(candidate, p) for p in protected):
        candidate = output.with_name(f"{output.name}.{n}.data")
        n += 1
    return candidate


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
        raise OutputError(
            f"{str(output)[:60]}...: file name too long for this filesystem "
            f"({len(os.fsencode(output.name))} bytes; choose a shorter output name)"
        )


def write_bytes_atomic(path: Path, data: bytes) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        with deferred():  # a signal now would leave the file unrecorded
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        refuse_special(path)  # again: the path may have changed since the run began
        with deferred():  # once in place, the file is complete: a signal waits until after
            os.replace(tmp, path)
            tmp = None
    except OSError as exc:
        if tmp is not None:
            remove_quietly(tmp)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        if tmp is not None:
            remove_quietly(tmp)
        raise


def save_model(model: onnx.ModelProto, path: str | os.PathLike, data_path: str | os.PathLike | None = None) -> None:
    """Save atomically; large models keep their weights in ``data_path`` (by default
    ``<name>.data``) beside them."""
    path = Path(path)
    lazy = is_lazy(model)
    _refuse_foreign_references(model, path, lazy)
    if not lazy and model.ByteSize() < _EXTERNAL_THRESHOLD:
        write_bytes_atomic(path, model.SerializeToString())
        return
    parent = path.parent if str(path.parent) else Path(".")
    sources = _data_sources(model)  # what the weights are read from while they are written
    refuse_input(path, sources)
    data_path = Path(data_path) if data_path is not None else output_data_path(path, sources)
    refuse_input(data_path, sources)
    data_name = data_path.name
    staging = None
    try:
        with deferred():
            staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
        write_external(model, staging, path.name, data_name=data_name)  # streams tensor by tensor
        refuse_special(parent / data_name)
        refuse_special(path)
        with deferred():  # the two renames put the output in place together, or not at all
            os.replace(staging / data_name, parent / data_name)
            os.replace(staging / path.name, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if staging is not None:
            remove_quietly(staging)


def _data_sources(model: onnx.ModelProto) -> list[Path]:
    from spa.core.tensors import external_entries

    return sorted(
        {Path(external_entries(t)["location"]) for t in model.graph.initializer if external_entries(t).get("location")}
    )


def _refuse_foreign_references(model: onnx.ModelProto, path: Path, lazy: bool) -> None:
    """Never write a model whose tensors point at files elsewhere (an absolute system path, a
    ``..`` escape): only the main graph's lazily read weights, which are written out beside it."""
    from spa.formats.walk import all_tensors, nested_tensors

    for tensor in nested_tensors(model.graph) if lazy else all_tensors(model.graph):
        if uses_external_data(tensor):
            raise OutputError(
                f"{path}: tensor '{tensor.name}' refers to external data spa did not read; "
                f"refusing to write a model that points at other files"
            )


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
