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
  user's model) appears once as a hard link, or as a copy where no link can be made (another
  file system): disk space, never memory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from spa.core.signals import ScratchDirectory, deferred, is_scratch

_staging: ScratchDirectory | None = None
# (absolute path, device, inode, size, mtime) of a data file -> its name in the staging folder:
# a file rewritten under the same path gets a new name, never the stale copy
_staged: dict[tuple, str] = {}
_written = 0


def is_lazy_proto(model: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in model.graph.initializer)


def runnable_file(model: onnx.ModelProto) -> Path:
    """A file holding ``model`` (its initializers still external) that onnxruntime can open;
    the caller removes it once the session is built (:func:`release`)."""
    global _written
    locations = _data_files(model)
    folders = {path.parent for path in locations}
    if len(folders) == 1 and _is_scratch(next(iter(folders))):
        folder, names = next(iter(folders)), {path: path.name for path in locations}
    else:
        folder = _staging_folder()
        names = {path: _stage(path, folder) for path in locations}
    out = onnx.ModelProto()
    out.CopyFrom(model)  # cheap: the weights are references
    for tensor in out.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = names[Path(entry.value)]
    _written += 1
    with deferred():
        path = folder / f"session-{os.getpid()}-{_written}.onnx"
        path.write_bytes(out.SerializeToString())
    return path


def release(path: Path) -> None:
    with deferred(deliver=False):
        try:
            os.unlink(path)
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


def _staging_folder() -> Path:
    global _staging
    if _staging is None or not Path(_staging.name).is_dir():
        _staging = ScratchDirectory()
        _staged.clear()
    return Path(_staging.name)


def _stage(path: Path, folder: Path) -> str:
    info = os.stat(path)
    key = (str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    name = _staged.get(key)
    if name is None:
        name = f"data-{len(_staged)}"
        with deferred():
            try:
                os.link(path, folder / name)
            except OSError:  # another file system, or links not allowed there
                shutil.copyfile(path, folder / name)
            _staged[key] = name
    return name
