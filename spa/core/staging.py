"""Files onnxruntime can open for models whose weights stay on disk.

A lazily loaded model (``spa.core.tensors``) refers to its data files by absolute path, and
onnxruntime reads external data only through relative names inside the model file's own
folder (it refuses absolute paths and symbolic links that lead out of it). Building a session
from serialized bytes would need the weights inline, which is the copy of the whole model that
lazy loading exists to avoid. So the proto is written, without its weights, to a folder where
every data file it reads sits under a relative name:

- where all its data files already live in one of spa's scratch folders (a cut or a refit
  spilled there), that folder;
- otherwise a scratch folder of this process, where each data file from elsewhere (the
  user's model) appears as a hard link while the session is built, or as a copy kept for the
  run where no link can be made (another file system): disk space, never memory.

The links go as soon as onnxruntime holds the weights: a data file with a second link is
refused by ``onnx.load`` (it takes it for a hard-link attack), and the user's file must read
as it did once spa has opened its sessions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from spa.core.signals import ScratchDirectory, deferred, is_scratch

_staging: ScratchDirectory | None = None
# (absolute path, device, inode, size, mtime) of a data file -> the name of its copy in the
# staging folder: a file rewritten under the same path gets a new copy, never the stale one
_copies: dict[tuple, str] = {}
# session file -> the links made for it, removed with it
_links: dict[Path, list[Path]] = {}
_written = 0


def is_lazy_proto(model: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in model.graph.initializer)


def runnable_file(model: onnx.ModelProto) -> Path:
    """A file holding ``model`` (its initializers still external) that onnxruntime can open;
    the caller removes it once the session is built (:func:`release`)."""
    global _written
    locations = _data_files(model)
    links: list[Path] = []
    _written += 1
    if _is_scratch_of(locations):
        folder, names = locations[0].parent, {path: path.name for path in locations}
    else:
        folder = _staging_folder()
        names = {path: _stage(path, folder, f"{_written}-{k}", links) for k, path in enumerate(locations)}
    out = onnx.ModelProto()
    out.CopyFrom(model)  # cheap: the weights are references
    for tensor in out.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = names[Path(entry.value)]
    with deferred():
        path = folder / f"session-{os.getpid()}-{_written}.onnx"
        path.write_bytes(out.SerializeToString())
        _links[path] = links
    return path


def release(path: Path) -> None:
    """Remove a file of :func:`runnable_file` and the links made for it."""
    with deferred(deliver=False):
        for name in [path, *_links.pop(path, [])]:
            try:
                os.unlink(name)
            except OSError:
                pass


def _data_files(model: onnx.ModelProto) -> list[Path]:
    files = []
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.append(Path(entry.value))
    return list(dict.fromkeys(files))


def _is_scratch(folder: Path) -> bool:
    return is_scratch(folder) and folder.is_dir()


def _is_scratch_of(locations: list[Path]) -> bool:
    """Whether every data file lies in one of spa's own scratch folders."""
    folders = {path.parent for path in locations}
    return len(folders) == 1 and _is_scratch(next(iter(folders)))


def _staging_folder() -> Path:
    global _staging
    if _staging is None or not Path(_staging.name).is_dir():
        _staging = ScratchDirectory()
        _copies.clear()
    return Path(_staging.name)


def _stage(path: Path, folder: Path, name: str, links: list[Path]) -> str:
    """``path`` under a name in ``folder``: a link for one session, else a copy for the run."""
    info = os.stat(path)
    key = (str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key in _copies:
        return _copies[key]
    with deferred():
        try:
            os.link(path, folder / f"link-{name}")
            links.append(folder / f"link-{name}")
            return f"link-{name}"
        except OSError:  # another file system, or links not allowed there
            shutil.copyfile(path, folder / f"copy-{name}")
            _copies[key] = f"copy-{name}"
            return f"copy-{name}"
