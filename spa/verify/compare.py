"""Comparing two models' outputs and weights: relative errors, NaN and inf, shapes."""

from __future__ import annotations

import math

import numpy as np
import onnx

from spa.core.tensors import to_array


def relative_error(
    reference: dict[str, np.ndarray], other: dict[str, np.ndarray], dense: dict[str, np.ndarray] | None = None
) -> float:
    """Largest difference of each output relative to its largest magnitude, worst over outputs.

    ``dense`` (the unpruned model's outputs) also sets the scale: pruning can shrink an output
    towards zero (silero's speech probability falls from 0.56 to 4e-4 at ratio 0.3), and a
    sigmoid's float32 result is only good to about 6e-8 absolute, which is no sign of a wrong cut.

    A NaN or inf agrees only with the same value at the same place in ``other`` (and in ``dense``,
    when given); anywhere else the error is infinite. A plain difference would be NaN there, which
    ``max()`` drops when it comes second and every ``error > tolerance`` check reads as a pass.
    """
    worst = 0.0
    for name, ref in reference.items():
        ref64, got64 = np.asarray(ref, np.float64), np.asarray(other[name], np.float64)
        dense64 = (
            np.asarray(dense[name], np.float64)
            if dense is not None and name in dense and np.size(dense[name])
            else None
        )
        finite = np.isfinite(ref64) & np.isfinite(got64) if ref64.shape == got64.shape else None
        if finite is None:
            if not (np.isfinite(ref64).all() and np.isfinite(got64).all()):
                return math.inf
        elif not finite.all():
            if not _same_values(ref64, got64, ~finite) or (
                dense64 is not None and (dense64.shape != ref64.shape or not _same_values(ref64, dense64, ~finite))
            ):
                return math.inf
            ref64, got64 = ref64[finite], got64[finite]
        if dense64 is not None:
            dense64 = dense64[np.isfinite(dense64)]
        scale = float(np.abs(ref64).max()) if ref64.size else 0.0
        if dense64 is not None and dense64.size:
            scale = max(scale, float(np.abs(dense64).max()))
        diff = float(np.abs(ref64 - got64).max()) if ref64.size else 0.0
        worst = max(worst, diff / (scale + 1e-8))
    return worst


def _same_values(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> bool:
    return bool(np.array_equal(a[where], b[where], equal_nan=True))


def nonfinite_outputs(outputs: dict[str, np.ndarray]) -> list[str]:
    """Float outputs holding NaN or inf."""
    return [
        name
        for name, value in outputs.items()
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all()
    ]


def newly_nonfinite(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> list[str]:
    """Float outputs holding NaN or inf where the reference's same output is finite."""
    found = []
    for name in nonfinite_outputs(outputs):
        value, ref = np.asarray(outputs[name]), reference.get(name)
        if ref is None or np.shape(ref) != value.shape:
            found.append(name)
        elif (~np.isfinite(value) & np.isfinite(np.asarray(ref, np.float64))).any():
            found.append(name)
    return found


def nonfinite_weights(pruned: onnx.ModelProto, dense: onnx.ModelProto) -> list[str]:
    """Float initializers of ``pruned`` (subgraphs included) holding NaN or inf that the dense
    model's tensor of that name does not hold: a refit gone wrong. Constants the input already
    had (a -inf attention mask) are its own business."""
    dense_tensors = {t.name: t for t in _initializers(dense.graph)}
    found = []
    for tensor in _initializers(pruned.graph):
        if tensor.data_type in _CHECKED_FLOATS and not _all_finite(tensor):
            original = dense_tensors.get(tensor.name)
            if original is None or _all_finite(original):
                found.append(tensor.name)
    return found


_CHECKED_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def _initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _initializers(sub)


def _all_finite(tensor: onnx.TensorProto, chunk: int = 1 << 24) -> bool:
    values = to_array(tensor).reshape(-1)  # a memory map for external data: checked in pieces
    return all(np.isfinite(values[start : start + chunk]).all() for start in range(0, values.size, chunk))


def same_shapes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
