"""Between plan and cut: correct the weights that stay for the channels that go.

For every linear layer that loses input channels, the remaining weights and the
bias are refitted by least squares so the layer's output matches the dense
output on the statistics' inputs: the OBS update, with the mean contribution of
the removed channels moved into the bias (``spa.obs``). The result is a model
with the same graph and new values for those initializers, which the cut then
slices; the soft model zeroes the same channels of the same corrected weights,
so soft == hard still holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .groups import Analysis
from .layers import LayerIndex
from .obs import augmented_hessian, least_squares
from .plan import Plan
from .statistics import Statistics


@dataclass
class Compensation:
    layers: int = 0  # layers whose remaining weights were refitted
    biases: int = 0  # of them, layers whose bias took the removed channels' mean contribution
    skipped: list[str] = field(default_factory=list)  # layers losing channels that were not, and why
    mean_output_error: float | None = None  # E||dy||^2 / E||y||^2 over refitted layers, from the statistics
    uncompensated_error: float | None = None  # the same without the refit

    def as_dict(self) -> dict:
        return {"layers": self.layers, "biases": self.biases, "skipped": self.skipped,
                "mean_output_error": self.mean_output_error, "uncompensated_error": self.uncompensated_error}


def compensate(model: onnx.ModelProto, analysis: Analysis, layers: LayerIndex, plan: Plan,
               statistics: Statistics) -> tuple[onnx.ModelProto, Compensation]:
    """The model with refitted weights for every layer the plan takes input channels from."""
    graph = analysis.graph
    removed = plan.removed_units
    result = Compensation()
    new_values: dict[str, np.ndarray] = {}
    errors, raw_errors = [], []
    for layer in layers.layers:
        labels = analysis.labels[layer.weight_dim]
        gone = np.isin(labels, removed)
        if not gone.any():
            continue
        name = f"{layer.node.op_type} '{layer.node.name}'"
        stats = statistics.of(layer.activation)
        if stats is None:
            result.skipped.append(f"{name}: no statistics for its input")
            continue
        weight = np.asarray(graph.const(layer.weight))
        if weight.dtype.kind != "f":
            result.skipped.append(f"{name}: weights are not floating point")
            continue
        matrix = layer.matrix(weight.astype(np.float64))
        bias_value = np.asarray(graph.const(layer.bias), np.float64) if layer.bias else None
        kernel = len(matrix) // bias_value.size if bias_value is not None else 1
        second = stats.second_moment if stats.second_moment is not None else np.diag(stats.squares / stats.count)
        hessian = augmented_hessian(second, stats.mean if bias_value is not None else None)
        weights = matrix if bias_value is None else np.hstack([matrix, layer.bias_rows(bias_value, kernel)[:, None]])
        keep = np.flatnonzero(np.append(~gone, True) if bias_value is not None else ~gone)
        refit = least_squares(weights, hessian, keep)
        energy = max(float(np.einsum("ij,ij->", weights @ hessian, weights)), 1e-30)
        masked = weights.copy()
        masked[:, np.flatnonzero(gone)] = 0.0
        errors.append(_error(weights - refit, hessian) / energy)
        raw_errors.append(_error(weights - masked, hessian) / energy)
        channels = matrix.shape[1]
        new_values[layer.weight] = layer.unmatrix(refit[:, :channels], weight.shape).astype(weight.dtype)
        if bias_value is not None:
            new_bias = refit[:, channels].reshape(-1, kernel).sum(axis=1)
            new_values[layer.bias] = new_bias.reshape(bias_value.shape).astype(graph.const(layer.bias).dtype)
            result.biases += 1
        result.layers += 1
    if errors:
        result.mean_output_error = float(np.mean(errors))
        result.uncompensated_error = float(np.mean(raw_errors))
    return _with_values(model, new_values), result


def _error(delta: np.ndarray, hessian: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", delta @ hessian, delta))


def _with_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    if not values:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for index, tensor in enumerate(out.graph.initializer):
        if tensor.name in values:
            out.graph.initializer[index].CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    return out
