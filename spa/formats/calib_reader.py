"""Calibration samples from a reader object, the protocol of onnxruntime's ``CalibrationDataReader``.

Users who quantized a model with ``onnxruntime.quantization`` already wrote one: ``get_next()``
returns a dict of input name -> array (one sample, or a batch of them), and None at the end.
spa reads only the samples it uses, so a reader that never ends is fine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from spa.core.errors import UsageError


@runtime_checkable
class CalibrationReader(Protocol):
    def get_next(self) -> Mapping[str, np.ndarray] | None: ...


def is_reader(source: object) -> bool:
    return callable(getattr(source, "get_next", None))


def reader_label(reader: object) -> str:
    """How messages and reports name a reader: it has no path."""
    return f"calibration reader {type(reader).__name__}"


def read_reader(reader: CalibrationReader, ranks: dict[str, int], samples: int) -> tuple[dict, dict]:
    """At most the first ``samples`` samples of every input named in ``ranks`` (name -> rank),
    with a leading sample axis, and how many were read; as ``load_calibration``'s file readers."""
    where = reader_label(reader)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ranks}
    total = 0
    while total < samples:
        item = reader.get_next()
        if item is None:
            break
        if not isinstance(item, Mapping):
            raise UsageError(f"{where}: get_next() returned {type(item).__name__}, not a dict of input arrays")
        missing = [name for name in ranks if name not in item]
        if missing:
            raise UsageError(
                f"{where}: get_next() gave no array for input(s) {', '.join(missing)} "
                f"(it gave {', '.join(map(str, item)) or 'none'})"
            )
        arrays = {name: _samples(item[name], rank, f"{where}: input '{name}'") for name, rank in ranks.items()}
        counts = {len(a) for a in arrays.values()}
        if len(counts) > 1:
            raise UsageError(f"{where}: one get_next() gave arrays of different sample counts ({sorted(counts)})")
        for name, array in arrays.items():
            parts[name].append(array)
        total += counts.pop()
    if total == 0:
        raise UsageError(f"{where}: get_next() returned None before giving any sample")
    stacked = {}
    for name, pieces in parts.items():
        if len({p.shape[1:] for p in pieces}) > 1:
            raise UsageError(
                f"{where}: input '{name}' has samples of different shapes ({sorted({p.shape[1:] for p in pieces})})"
            )
        stacked[name] = np.concatenate(pieces)[:samples]
    return stacked, {name: len(array) for name, array in stacked.items()}


def _samples(value: object, rank: int, where: str) -> np.ndarray:
    """``value`` with a leading sample axis: an array of the input's rank is a batch, one axis
    fewer is one sample."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # whatever the reader returned is not array-like
        raise UsageError(f"{where} is not an array ({type(exc).__name__})") from None
    if array.dtype.kind not in "biuf":
        raise UsageError(f"{where} holds {array.dtype} values, not numbers")
    if array.ndim == rank - 1:
        return array[None]
    if array.ndim != rank:
        raise UsageError(f"{where} has shape {list(array.shape)}, the input has rank {rank}")
    return array
