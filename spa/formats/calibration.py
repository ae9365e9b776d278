"""Reading calibration arrays from untrusted files: only the samples used, never a special file.

Calibration data often comes from elsewhere, and spa may run unattended as root. So a path is
opened only once it is a regular file (a FIFO named ``x.npy`` would block the read forever, and a
device can be endless or act on being opened), an .npz archive is refused from its zip directory
alone when its members would decompress past ``ARCHIVE_BUDGET`` (a 2 MB archive of zeros can
declare 2 GiB), and of each array only the leading samples spa uses are read and decompressed.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.lib.format as npy

from spa.core.errors import UsageError

# the most an .npz archive's members may decompress to, read from its zip directory before any
# member is opened; above it, the samples used are better kept in an archive of their own, or in a
# folder of .npy files (read without decompression)
ARCHIVE_BUDGET = 1 << 30
READ_CHUNK = 16 << 20


def open_regular(path: Path) -> io.BufferedReader:
    """``path`` opened for reading, refused (UsageError) unless it is a regular file: checked
    before opening, and again on the opened descriptor in case the name was swapped in between
    (the open itself does not block on a FIFO)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UsageError(f"--calib: {path} is not a regular file (FIFOs, devices and sockets are not read)")
        fd = os.open(
            path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
        )
    except OSError as exc:
        raise UsageError(f"--calib: cannot read {path} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"--calib: {path} is not a regular file (FIFOs, devices and sockets are not read)")
    return os.fdopen(fd, "rb")


@dataclass
class StoredArray:
    """An .npy array whose header has been read and whose data has not."""

    where: str  # for messages: the file, or the archive and member
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    stream: io.BufferedIOBase  # positioned at the first data byte
    available: int  # data bytes the file or member holds: no read allocates more

    def samples(self, rank: int) -> int:
        """How many samples it holds for an input of ``rank`` axes (one, without a sample axis)."""
        return self.shape[0] if len(self.shape) == rank else 1

    def read(self, rank: int, limit: int) -> np.ndarray:
        """At most the first ``limit`` samples, with a leading sample axis, for an input of ``rank``
        axes; only their bytes are read (all of them for the rare Fortran-ordered array)."""
        if len(self.shape) == rank - 1:  # one sample
            return self._read(self.shape)[None]
        if len(self.shape) != rank:
            raise UsageError(f"--calib: {self.where} has shape {list(self.shape)}, the input has rank {rank}")
        rows = min(self.shape[0], limit)
        if self.fortran and len(self.shape) > 1:  # samples are not contiguous in Fortran order
            return np.ascontiguousarray(self._read(self.shape)[:rows])
        return self._read((rows, *self.shape[1:]))

    def _read(self, shape: tuple[int, ...]) -> np.ndarray:
        if int(np.prod(shape, dtype=object)) * self.dtype.itemsize > self.available:
            raise UsageError(f"--calib: {self.where} is truncated: its header declares shape {list(self.shape)}")
        try:
            array = np.empty(shape, dtype=self.dtype, order="F" if self.fortran else "C")
        except MemoryError:
            raise UsageError(
                f"--calib: the samples used from {self.where} do not fit in memory (lower --calib-samples)"
            ) from None
        view = array.reshape(-1, order="A").view(np.uint8).data
        filled = 0
        while filled < len(view):
            # in pieces: a compressed member's reader decompresses each request into a copy
            count = self.stream.readinto(view[filled : filled + READ_CHUNK])
            if not count:
                raise UsageError(f"--calib: {self.where} is truncated: its header declares shape {list(self.shape)}")
            filled += count
        return array


def stored_array(stream: io.BufferedIOBase, where: str, size: int) -> StoredArray:
    """The header of the .npy data at ``stream`` (``size`` bytes long, header included); object
    arrays (pickles) are refused."""
    try:
        version = npy.read_magic(stream)
        # version 3 differs from 2 only in allowing UTF-8 field names, which a plain array has none of
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except Exception as exc:  # numpy raises ValueError, EOFError and others for a malformed header
        raise UsageError(f"--calib: {where} is not a readable .npy file ({type(exc).__name__})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise UsageError(f"--calib: {where} holds {dtype} values, not numbers")
    if any(d < 0 for d in shape):
        raise UsageError(f"--calib: {where} declares shape {list(shape)}")
    return StoredArray(where, tuple(shape), dtype, fortran, stream, size - stream.tell())


NPY_MAGIC = b"\x93NUMPY"


def is_npy(path: Path) -> bool:
    """Whether ``path`` (a regular file) is an .npy array, by its magic: an .npz is a zip archive."""
    with open_regular(path) as handle:
        return handle.read(len(NPY_MAGIC)) == NPY_MAGIC


def npy_samples(path: Path, ranks: dict[str, int], samples: int) -> tuple[dict, dict]:
    """The samples of one .npy file, for a model with a single input (``ranks``: name -> rank),
    and how many it holds."""
    if len(ranks) != 1:
        raise UsageError(
            f"--calib {path}: one .npy file feeds a model with one input; this one has inputs "
            f"{', '.join(ranks)}: give an .npz of arrays named after them, or a folder of <input>.npy files"
        )
    ((name, rank),) = ranks.items()
    with open_regular(path) as handle:
        stored = stored_array(handle, str(path), os.fstat(handle.fileno()).st_size)
        return {name: stored.read(rank, samples)}, {name: stored.samples(rank)}


def archive_members(archive: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """An .npz archive's arrays by name, refused when they would decompress past ARCHIVE_BUDGET
    (as the zip directory declares them; a member that decompresses to more is caught by its
    header's shape, which bounds every read)."""
    members = archive.infolist()
    size = sum(m.file_size for m in members)
    if size > ARCHIVE_BUDGET:
        raise UsageError(
            f"--calib {path}: the archive decompresses to {_bytes(size)}, over the "
            f"{_bytes(ARCHIVE_BUDGET)} memory budget for calibration archives"
        )
    return {m.filename[:-4] if m.filename.endswith(".npy") else m.filename: m for m in members}


def _bytes(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def first_nonfinite(array: np.ndarray) -> int | None:
    """The index of the first sample (leading axis) holding NaN or inf, None when all are finite."""
    if array.dtype.kind != "f" or not array.size:
        return None
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None
