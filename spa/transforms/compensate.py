"""Between plan and cut: correct the weights that stay for the channels that go.

For every linear layer that loses input channels, the remaining weights and the
bias are refitted by least squares so the layer's output matches the dense
output on the statistics' inputs: the OBS update, with the mean contribution of
the removed channels moved into the bias (``spa.scoring.obs``). The result is a model
with the same graph and new values for those initializers, which the cut then
slices; the soft model zeroes the same channels of the same corrected weights,
so soft == hard still holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from spa.analysis.groups import Analysis
from spa.analysis.layers import LayerIndex
from spa.core.tensors import TensorWriter
from spa.formats.quantized import Store
from spa.planning.plan import Plan
from spa.scoring.criteria import layer_system
from spa.scoring.obs import obs_update
from spa.scoring.statistics import Statistics


@dataclass
class Compensation:
    layers: int = 0  # layers whose remaining weights were refitted
    biases: int = 0  # of them, layers whose bias took the removed channels' mean contribution
    skipped: list[str] = field(default_factory=list)  # layers losing channels that were not, and why
    mean_output_error: float | None = None  # E||dy||^2 / E||y||^2 over refitted layers, from the statistics
    uncompensated_error: float | None = None  # the same without the refit
    refit: str = "layerwise"  # or "sequential": then ``sequential`` says what it did (SequentialRefit)
    sequential: dict | None = None
    held_out_error: dict | None = None  # refit -> mean relative output error on held-out samples, when compared
    requantized: dict | None = None  # refits of quantized weights written back (Requantized.as_dict)

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "biases": self.biases,
            "skipped": self.skipped,
            "mean_output_error": self.mean_output_error,
            "uncompensated_error": self.uncompensated_error,
            "refit": self.refit,
            "sequential": self.sequential,
            "held_out_error": self.held_out_error,
            "requantized": self.requantized,
        }


def compensate(
    model: onnx.ModelProto,
    analysis: Analysis,
    layers: LayerIndex,
    plan: Plan,
    statistics: Statistics,
    spill: Path | None = None,
    step: Callable[[int, int], None] | None = None,
) -> tuple[onnx.ModelProto, Compensation]:
    """The model with refitted weights for every layer the plan takes input channels from;
    ``step(done, total)`` is called layer by layer.

    With ``spill`` (a data file path, for a model whose weights stay on disk), the refitted
    weights are written there as each layer is done and the model refers to them, so no more
    than one layer's refit is held in memory."""
    graph = analysis.graph
    removed = plan.removed_units
    result = Compensation()
    new_values: dict[str, np.ndarray] = {}
    errors, raw_errors = [], []
    store = Store(graph, tuple(layers.layers))
    writer = _Spill(spill, store) if spill is not None else None
    for done, layer in enumerate(layers.layers):
        if step is not None:
            step(done, len(layers.layers))
        if writer is not None:
            new_values = writer.flush(new_values)
        labels = layer.column_labels(analysis.labels)
        gone = np.isin(labels, removed)
        if not gone.any():
            continue
        name = f"{layer.node.op_type} '{layer.node.name}'"
        if not layer.refittable:
            result.skipped.append(f"{name}: its weights are stored in quantization blocks")
            continue
        stats = statistics.of(layer.activation)
        if stats is None:
            result.skipped.append(f"{name}: no statistics for its input")
            continue
        weight = np.asarray(graph.weight(layer.weight))
        if weight.dtype.kind != "f":
            result.skipped.append(f"{name}: weights are not floating point")
            continue
        if stats.gram is None:  # too wide for X^T X: move the removed channels' mean into the bias only
            refit, bias_rows, loss, raw, energy = _diagonal_refit(
                layer, weight, graph.weight(layer.bias) if layer.bias else None, gone, stats
            )
            errors.append(loss / energy)
            raw_errors.append(raw / energy)
            new_values[layer.weight] = refit
            if layer.bias and bias_rows is not None:
                new_values[layer.bias] = bias_rows
                result.biases += 1
            result.layers += 1
            continue
        system = layer_system(analysis, layer, stats)
        q = np.flatnonzero(gone)
        refit, loss = obs_update(system.weights, system.hessian_inv, q)
        dropped = system.weights[:, q]
        # the loss without refit: E||W_Q x_Q||^2, from the second moment's Q block
        second_moment = stats.second_moment
        assert second_moment is not None  # a gram was kept: the wide case took the branch above
        raw = float(np.einsum("ij,jk,ik->", dropped, second_moment[np.ix_(q, q)], dropped))
        errors.append(loss / system.energy)
        raw_errors.append(raw / system.energy)
        new_values.update(layer.tensors(refit, graph.weight))
        result.biases += system.has_bias
        result.layers += 1
    if errors:
        result.mean_output_error = float(np.mean(errors))
        result.uncompensated_error = float(np.mean(raw_errors))
    stored: Mapping[str, np.ndarray | onnx.TensorProto]
    if writer is not None:
        writer.flush(new_values)
        stored = writer.close()
    else:
        stored = store(new_values)
    if store.tally.tensors:
        result.requantized = store.tally.as_dict()
    return _with_values(model, stored), result


class _Spill:
    """Refitted values stored (``Store``) and written to a data file layer by layer: the model
    then holds references to them, as it does to its other weights."""

    def __init__(self, path: Path, store: Store):
        self.writer, self.store = TensorWriter(path, absolute=True), store
        self.stubs: dict[str, onnx.TensorProto] = {}

    def flush(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in self.store(values).items():
            data_type = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
            self.stubs[name] = self.writer.add(name, data_type, np.asarray(value))
        return {}

    def close(self) -> dict[str, onnx.TensorProto]:
        self.writer.close()
        return self.stubs


def _diagonal_refit(layer, weight: np.ndarray, bias, gone: np.ndarray, stats):
    """Uncorrelated channels: the kept weights stay, the removed ones' mean goes into the bias."""
    matrix = layer.matrix(weight)
    all_power = stats.mean_square
    energy = max(float(np.einsum("ij,ij->j", matrix, matrix, dtype=np.float64) @ all_power), 1e-30)
    dropped = matrix[:, gone].astype(np.float64)
    mean, power = stats.mean[gone], all_power[gone]
    columns = np.einsum("ij,ij->j", dropped, dropped)
    raw = float(columns @ power)
    new_bias = None
    loss = raw
    if bias is not None:
        kernel = len(matrix) // bias.size
        shift = (dropped @ mean).reshape(-1, kernel).sum(axis=1)  # a Conv's kernel rows share the bias
        new_bias = (np.asarray(bias, np.float64).reshape(-1) + shift).reshape(bias.shape).astype(bias.dtype)
        loss = float(columns @ np.maximum(power - mean**2, 0.0))
    refit = matrix.copy()
    refit[:, gone] = 0
    return layer.unmatrix(refit, weight.shape).astype(weight.dtype), new_bias, loss, raw, energy


def _with_values(model: onnx.ModelProto, values: Mapping[str, np.ndarray | onnx.TensorProto]) -> onnx.ModelProto:
    if not values:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    replace_initializers(out, values)
    return out


def replace_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray | onnx.TensorProto]) -> None:
    """Give the initializers named in ``values`` those values (arrays, or tensors already written), in place."""
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in values:
            value = values[tensor.name]
            stored = value if isinstance(value, onnx.TensorProto) else numpy_helper.from_array(value, tensor.name)
            model.graph.initializer[index].CopyFrom(stored)
