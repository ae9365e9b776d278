"""Sequential refit: compensation fitted to the inputs the pruned model actually produces.

Layer-wise compensation (``spa.transforms.compensate``) refits every layer for the dense model's input
statistics. But each layer after the first cut reads inputs that earlier cuts have already
moved, and those errors compound through the network. Here the layers that lose input channels
are refitted in graph order, each by least squares, to give the dense layer's output from the
input the pruned model (every earlier layer already refitted) gives it:

    W' = (W E[x_d x_p^T] + E[d x_p^T] + lam W_kept) (E[x_p x_p^T] + lam I)^-1

x_d is the dense model's input to the layer, x_p the pruned model's over the kept channels, both
augmented with a constant 1 when the layer has a bias (so the bias is refitted too). d is zero
except for a MatMul or Gemm whose output goes into a residual Add: there it is the drift of the
other operand (the skip, s_d - s_p), so the layer also takes up what earlier cuts moved in the
residual stream, which no later layer could otherwise reach (all-MiniLM-L6-v2 at ratio 0.3:
0.890 -> 0.896 mean cosine with the ridge fixed at 0.01). The ridge pulls towards the dense
weights, not towards zero: a ridge towards zero (a prototype) shrank weak channels and took the
PP-OCRv4 recogniser at ratio 0.3 from 0.90 to 0.00 exact match at lam 0.1. Its strength is chosen
per layer by cross-validation over folds of the batches (``RIDGES``): a fixed 1% overfitted the
FFN outputs of all-MiniLM-L6-v2, whose 1,536 channels 128 sentences give some 5 rows each.

Layers that read independent tensors (Q, K and V of one attention; the branches of a block) are
refitted in the same pass; a layer downstream of one refitted in this pass waits for the next.
Each pass runs the pruned model's prefix up to its layers over the samples, with their inputs
exposed and only running sums kept (as ``spa.scoring.statistics`` does); the dense inputs come from one
pass at the start, or, past DENSE_CACHE_BYTES, from the dense prefix beside each pass.

Why it is not the default without data: fitted to synthetic inputs it follows them too closely
(PP-OCRv4 rec at ratio 0.1: 0.750 exact match layer-wise, 0.075 sequential); with calibration
data, ``--refit auto`` keeps it where held-out samples say it moved the outputs less
(docs/criteria.md and docs/results/accuracy.md).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx

from spa.analysis.groups import Analysis
from spa.analysis.layers import LayerIndex, LinearLayer
from spa.core import runlimit
from spa.core.coupling import Dim
from spa.core.graph import ModelGraph
from spa.core.runtime import session
from spa.core.tensors import TensorWriter
from spa.formats.quantized import Store
from spa.planning.plan import Plan
from spa.scoring.statistics import (
    MAX_GRAM_CHANNELS,
    MIN_ROWS,
    ROWS_PER_CHANNEL,
    batches,
    channel_rows,
    exposing,
    padding_masks,
    token_mask,
)
from spa.transforms.compensate import replace_initializers
from spa.transforms.cut import apply_plan, soft_transform

# the dense model's input rows of every refitted layer are kept from one pass when they fit in this
DENSE_CACHE_BYTES = 1 << 30
# the ridge, relative to the mean diagonal of E[x_p x_p^T], is chosen per layer from these by
# FOLDS-fold cross-validation over the batches: a layer read by 8,192 rows of 1,536 channels
# (all-MiniLM-L6-v2's FFN output, 128 sentences) wants far more than one read by 60 channels
RIDGES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
FOLDS = 4
CV_MAX_CHANNELS = 2048  # wider layers keep one fold (4 folds of X^T X would cost 4x the memory)


@dataclass
class SequentialRefit:
    layers: int  # layers refitted
    passes: int  # runs of the dense and the pruned model over the samples
    samples: int
    seconds: float
    # mean over the layers of E||W' x_p - W x_d||^2 / E||W x_d||^2 on the pruned model's inputs:
    # with the layer-wise weights, and with the sequential refit
    layerwise_error: float | None = None
    sequential_error: float | None = None
    ridges: list[float] = field(default_factory=list)  # the cross-validated ridge of each layer, in order
    requantized: dict | None = None  # refits of quantized weights written back (Requantized.as_dict)

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "passes": self.passes,
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "layerwise_error": self.layerwise_error,
            "sequential_error": self.sequential_error,
            "ridges": self.ridges,
            "requantized": self.requantized,
        }


@dataclass
class _Fit:
    """One layer's running sums over matched rows of its dense and pruned inputs, kept per fold of
    the batches so the ridge can be cross-validated."""

    layer: LinearLayer
    keep: np.ndarray  # input channels that stay
    pruned: np.ndarray  # [fold] sum x_p x_p^T over the kept channels (+ 1)
    cross: np.ndarray  # [fold] sum x_d x_p^T over every channel (+ 1) and the kept ones
    counts: np.ndarray  # [fold] rows
    dense: np.ndarray  # sum x_d x_d^T: for the error figures only
    drift: np.ndarray | None = None  # [fold] sum (s_d - s_p) x_p^T, for a layer feeding a residual Add
    drift_dense: np.ndarray | None = None  # sum x_d (s_d - s_p)^T and sum ||s_d - s_p||^2: the error figures
    drift_energy: float = 0.0

    @classmethod
    def empty(cls, layer: LinearLayer, keep: np.ndarray, dense_width: int, outputs: int | None, folds: int) -> _Fit:
        width = len(keep) + (layer.bias is not None)
        dense_width += layer.bias is not None
        return cls(
            layer,
            keep,
            np.zeros((folds, width, width)),
            np.zeros((folds, dense_width, width)),
            np.zeros(folds, dtype=np.int64),
            np.zeros((dense_width, dense_width)),
            np.zeros((folds, outputs, width)) if outputs is not None else None,
            np.zeros((dense_width, outputs)) if outputs is not None else None,
        )

    @property
    def bias(self) -> bool:
        return self.layer.bias is not None

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def add(
        self, fold: int, dense_rows: np.ndarray, pruned_rows: np.ndarray, drift_rows: np.ndarray | None = None
    ) -> None:
        x_d = dense_rows.astype(np.float32, copy=False)
        x_p = pruned_rows[:, self.keep].astype(np.float32, copy=False)
        if self.bias:
            ones = np.ones((len(x_d), 1), np.float32)
            x_d, x_p = np.hstack([x_d, ones]), np.hstack([x_p, ones])
        self.counts[fold] += len(x_d)
        self.pruned[fold] += x_p.T @ x_p
        self.cross[fold] += x_d.T @ x_p
        self.dense += x_d.T @ x_d
        if self.drift is not None and drift_rows is not None:
            drift = drift_rows.astype(np.float32, copy=False)
            self.drift[fold] += drift.T @ x_p
            self.drift_dense += x_d.T @ drift
            self.drift_energy += float(np.einsum("ij,ij->", drift, drift, dtype=np.float64))


def sequential_refit(
    dense: onnx.ModelProto,
    weights: onnx.ModelProto,
    analysis: Analysis,
    layers: LayerIndex,
    plan: Plan,
    opset: int,
    feeds: dict[str, np.ndarray],
    seed: int = 0,
    custom_ops: tuple[str, ...] = (),
    folder: Path | None = None,
) -> tuple[onnx.ModelProto, SequentialRefit]:
    """``weights`` (the dense-shaped model after layer-wise compensation) with every layer that
    loses input channels refitted on the pruned model's own inputs.

    With ``folder`` (a scratch folder, for a model whose weights stay on disk), the soft model
    and the refitted weights are written there as they are made, not held in memory."""
    start = time.perf_counter()
    dense_graph = analysis.graph
    removed = plan.removed_units
    todo = [
        (layer, np.flatnonzero(~np.isin(layer.column_labels(analysis.labels), removed)))
        for layer in layers.layers
        if layer.refittable
    ]
    todo = [
        (layer, keep)
        for layer, keep in todo
        if len(keep) < len(analysis.labels[layer.weight_dim])
        and len(keep) + 1 <= MAX_GRAM_CHANNELS
        and np.asarray(dense_graph.weight(layer.weight)).dtype.kind == "f"
    ]
    order = {node.name: i for i, node in enumerate(dense_graph.nodes)}
    todo.sort(key=lambda item: order[item[0].node.name])
    out = onnx.ModelProto()
    out.CopyFrom(weights)
    # each layer is refitted once, so ``weights`` keeps its layer-wise values for the error figures
    layerwise = ModelGraph(weights)
    zeroed = soft_transform(layerwise, analysis, plan)
    store = Store(dense_graph, tuple(layer for layer, _ in todo))
    spill = folder / "sequential-soft.onnx.data" if folder else None
    soft = apply_plan(weights, layerwise, analysis, plan, opset, soft=True, spill=spill)
    written = _Written(folder) if folder else None
    samples = len(next(iter(feeds.values())))
    outcome = SequentialRefit(0, 0, samples, 0.0)
    before, after = [], []
    rows = _Rows(feeds, dense, seed)
    dense_cache = _dense_rows(dense, dense_graph, todo, rows, session, custom_ops)
    for wave in _waves(dense_graph, todo):
        fits = _collect(dense, soft, dense_graph, wave, rows, dense_cache, session, custom_ops)
        outcome.passes += 1
        values: dict[str, np.ndarray] = {}
        for fit in fits:
            if fit.count == 0:
                continue
            layer = fit.layer
            target = layer.augmented_rows(dense_graph.weight)
            columns = np.append(fit.keep, target.shape[1] - 1) if fit.bias else fit.keep
            current = layer.augmented_rows(layerwise.weight)
            ridge = _choose_ridge(target, columns, fit)
            refit = _solve(target, columns, fit, ridge)
            outcome.ridges.append(ridge)
            before.append(_relative_error(current[:, columns], target, fit))
            after.append(_relative_error(refit, target, fit))
            values.update(_as_tensors(dense_graph, layer, fit, refit))
            outcome.layers += 1
        stored = store(values)
        zeroed_values = {name: zeroed(name, value) for name, value in stored.items()}
        hard_tensors: Mapping[str, np.ndarray | onnx.TensorProto] = stored
        soft_tensors: Mapping[str, np.ndarray | onnx.TensorProto] = zeroed_values
        if written is not None:
            hard_tensors, soft_tensors = written.add(stored), written.add(zeroed_values, soft=True)
        replace_initializers(out, hard_tensors)
        replace_initializers(soft, soft_tensors)
    if written is not None:
        written.close()
    if before:
        outcome.layerwise_error, outcome.sequential_error = float(np.mean(before)), float(np.mean(after))
    if store.tally.tensors:
        outcome.requantized = store.tally.as_dict()
    outcome.seconds = time.perf_counter() - start
    return out, outcome


class _Written:
    """Refitted values written to data files in a scratch folder as each wave ends: for the
    refitted model, and zeroed for its soft form."""

    def __init__(self, folder: Path):
        self.refit = TensorWriter(folder / "sequential.onnx.data", absolute=True)
        self.soft = TensorWriter(folder / "sequential-soft-refit.onnx.data", absolute=True)

    def add(self, values: dict[str, np.ndarray], soft: bool = False) -> dict[str, onnx.TensorProto]:
        writer = self.soft if soft else self.refit
        written = {
            name: writer.add(name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype), np.asarray(value))
            for name, value in values.items()
        }
        writer.flush()  # the next wave runs the soft model, which reads them
        return written

    def close(self) -> None:
        self.refit.close()
        self.soft.close()


def _waves(graph: ModelGraph, todo: list[tuple[LinearLayer, np.ndarray]]):
    """``todo`` (in graph order) cut into runs of layers none of which reads what another one's
    refit changes, each entry with its position in ``todo``: each run is refitted from one pass."""
    wave: list[tuple[int, LinearLayer, np.ndarray]] = []
    downstream: set = set()
    for position, (layer, keep) in enumerate(todo):
        if wave and ("tensor", layer.activation.tensor) in downstream:
            yield wave
            wave, downstream = [], set()
        wave.append((position, layer, keep))
        downstream |= nx.descendants(graph.nx, ("op", layer.node.name))
    if wave:
        yield wave


def _prefix(model: onnx.ModelProto, graph: ModelGraph, tensors: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``tensors``, with them as its outputs: onnxruntime runs
    every node of a graph whatever is fetched, and early layers need only the first few."""
    needed = set()
    for name in tensors:
        needed |= {key for kind, key in nx.ancestors(graph.nx, ("tensor", name)) if kind == "op"}
    prefix = onnx.ModelProto()
    prefix.CopyFrom(model)
    nodes = [node for node in model.graph.node if node.name in needed]
    del prefix.graph.node[:]
    prefix.graph.node.extend(nodes)
    del prefix.graph.output[:]
    return exposing(prefix, tensors)


class _Rows:
    """Which rows of each layer input enter the sums, the same for the dense and the pruned model
    (the fit pairs them): at most the budget ``spa.scoring.statistics`` uses for X^T X."""

    def __init__(self, feeds: dict[str, np.ndarray], model: onnx.ModelProto, seed: int):
        self.batches = list(batches(model, feeds))
        self.seed = seed
        masks = padding_masks(model)
        self.tokens = [token_mask(feed, masks) for feed in self.batches]  # padded positions stay out

    def pick(self, position: int, batch: int, value: np.ndarray, axis: int, width: int | None = None) -> np.ndarray:
        """``width``: the layer input's channels, when ``value`` is another tensor (a skip connection)
        whose rows must sit at the same positions."""
        # a generator per layer and batch: the pruned model's pass draws the dense pass's rows again
        rng = np.random.default_rng([self.seed, 13, position, batch])
        return channel_rows(value, axis, len(self.batches), rng, width, self.tokens[batch])


def _dense_rows(dense: onnx.ModelProto, graph: ModelGraph, todo, rows: _Rows, session, custom_ops):
    """Every layer's dense input rows (and skip rows, for layers feeding a residual Add), from one
    pass, keyed by (position, "x" or "skip"), when they fit in DENSE_CACHE_BYTES (else None: each
    pass then reruns the dense prefix)."""
    wanted: dict[tuple[int, str], tuple[Dim, int]] = {}
    size = 0
    for position, (layer, _) in enumerate(todo):
        width = _width(graph, layer.activation)
        if width is None:
            return None
        wanted[(position, "x")] = (layer.activation, width)
        skip = _skip(graph, layer)
        skip_width = _width(graph, skip) if skip is not None else 0
        if skip_width is None:
            return None
        if skip is not None:
            wanted[(position, "skip")] = (skip, width)
        size += max(ROWS_PER_CHANNEL * width, MIN_ROWS) * (width + skip_width) * 4
    if size > DENSE_CACHE_BYTES:
        return None
    tensors = list(dict.fromkeys(dim.tensor for dim, _ in wanted.values()))
    run = session(_prefix(dense, graph, tensors), custom_ops=custom_ops)
    cached: dict[tuple[int, str], list[np.ndarray]] = {key: [] for key in wanted}
    for index, feed in enumerate(rows.batches):
        values = dict(zip(tensors, runlimit.run(run, tensors, feed)))
        for (position, kind), (dim, width) in wanted.items():
            cached[(position, kind)].append(rows.pick(position, index, values[dim.tensor], dim.axis, width))
    return cached


def _width(graph: ModelGraph, dim: Dim) -> int | None:
    shape = graph.shape(dim.tensor)
    width = shape[dim.axis] if shape else None
    return width if isinstance(width, int) else None


def _input_channels(graph: ModelGraph, layer: LinearLayer) -> int:
    width = graph.static_size(layer.weight, layer.weight_axis)
    assert width is not None, layer.weight  # a weight is an initializer: its shape is static
    return width


def _skip(graph: ModelGraph, layer: LinearLayer) -> Dim | None:
    """The other input of the residual Add the layer's output (after its bias) goes into, when it
    has one: a MatMul or Gemm whose output, position for position, is summed with a tensor of the
    same shape."""
    if not layer.feeds_residual:
        return None
    out = layer.node.outputs[0]
    if layer.bias is not None and layer.bias_added:
        out = graph.consumers[out][0].outputs[0]
    after = graph.consumers.get(out, [])
    if len(after) != 1 or after[0].op_type != "Add" or len(after[0].inputs) != 2:
        return None
    other = [t for t in after[0].inputs if t != out]
    shape = graph.shape(out)
    if (
        len(other) != 1
        or graph.is_initializer(other[0])
        or not shape
        or not isinstance(shape[-1], int)
        or graph.shape(other[0]) != shape
    ):
        return None
    return Dim(other[0], len(shape) - 1)


def _collect(
    dense: onnx.ModelProto,
    soft: onnx.ModelProto,
    graph: ModelGraph,
    wave,
    rows: _Rows,
    dense_cache,
    session,
    custom_ops,
) -> list[_Fit]:
    """The sums of one pass: the wave's inputs in the pruned model (and the dense one, unless cached)."""
    skips = {position: _skip(graph, layer) for position, layer, _ in wave}
    tensors = list(
        dict.fromkeys(
            [layer.activation.tensor for _, layer, _ in wave]
            + [dim.tensor for dim in skips.values() if dim is not None]
        )
    )
    pruned_run = session(_prefix(soft, graph, tensors), custom_ops=custom_ops)
    dense_run = None if dense_cache is not None else session(_prefix(dense, graph, tensors), custom_ops=custom_ops)
    fits = []
    for position, layer, keep in wave:
        skip = skips[position]
        outputs = _width(graph, skip) if skip is not None else None
        folds = FOLDS if len(rows.batches) >= FOLDS and len(keep) <= CV_MAX_CHANNELS else 1
        fits.append(_Fit.empty(layer, keep, _input_channels(graph, layer), outputs, folds))

    def dense_rows(index: int, dense_values: dict | None, position: int, kind: str, dim: Dim, width: int) -> np.ndarray:
        if dense_cache is not None:
            return dense_cache[(position, kind)][index]
        assert dense_values is not None  # without a cache the dense prefix ran on this batch
        return rows.pick(position, index, dense_values[dim.tensor], dim.axis, width)

    for index, feed in enumerate(rows.batches):
        pruned_values = dict(zip(tensors, runlimit.run(pruned_run, tensors, feed)))
        dense_values = dict(zip(tensors, runlimit.run(dense_run, tensors, feed))) if dense_run is not None else None
        for fit, (position, layer, _) in zip(fits, wave):
            dim = layer.activation
            if not np.issubdtype(pruned_values[dim.tensor].dtype, np.floating):
                continue
            pruned_rows = rows.pick(position, index, pruned_values[dim.tensor], dim.axis)
            width = pruned_rows.shape[1]
            x_d = dense_rows(index, dense_values, position, "x", dim, width)
            drift = None
            skip = skips[position]
            if skip is not None:
                drift = dense_rows(index, dense_values, position, "skip", skip, width) - rows.pick(
                    position, index, pruned_values[skip.tensor], skip.axis, width
                )
            if x_d.shape == pruned_rows.shape:
                fit.add(index % len(fit.counts), x_d, pruned_rows, drift)
    return fits


def _solve(target: np.ndarray, columns: np.ndarray, fit: _Fit, ridge: float, folds=slice(None)) -> np.ndarray:
    """The ridge least-squares weights over the kept columns (+ bias), pulled towards the dense ones,
    from the sums of ``folds``; ``ridge`` is relative to the mean diagonal of the whole gram."""
    count = fit.counts[folds].sum()
    gram = fit.pruned[folds].sum(axis=0) / count
    channels = len(fit.keep)
    diagonal = np.einsum("kii->i", fit.pruned)[:channels] / fit.count  # the whole gram's, whatever the folds
    scaled = ridge * (float(diagonal.mean()) if channels and diagonal.mean() > 0 else 1.0)
    gram[np.arange(channels), np.arange(channels)] += scaled  # not the bias entry
    prior = np.zeros((len(target), len(columns)))
    prior[:, :channels] = target[:, fit.keep]
    rhs = target @ (fit.cross[folds].sum(axis=0) / count) + scaled * prior
    if fit.drift is not None:
        rhs += fit.drift[folds].sum(axis=0) / count
    try:
        return np.linalg.solve(gram, rhs.T).T
    except np.linalg.LinAlgError:
        return rhs @ np.linalg.pinv(gram, hermitian=True)


def _choose_ridge(target: np.ndarray, columns: np.ndarray, fit: _Fit) -> float:
    """The ridge of RIDGES whose fit on the other folds best predicts each held-out fold (the
    error's part that depends on the weights, from the fold's sums); RIDGES[0] with one fold."""
    folds = len(fit.counts)
    if folds < 2 or (fit.counts == 0).any():
        return RIDGES[0]
    scores = []
    for ridge in RIDGES:
        error = 0.0
        for k in range(folds):
            weights = _solve(target, columns, fit, ridge, np.arange(folds) != k)
            reach = target @ fit.cross[k] + (fit.drift[k] if fit.drift is not None else 0.0)
            error += np.einsum("ij,ij->", weights @ fit.pruned[k], weights) - 2 * np.einsum("ij,ij->", weights, reach)
        scores.append(error)
    return RIDGES[int(np.argmin(scores))]


def _relative_error(weights: np.ndarray, target: np.ndarray, fit: _Fit) -> float:
    """E||W' x_p - W x_d - d||^2 / E||W x_d||^2 from the fit's sums, d the drift the skip connection
    brings (s_d - s_p) for a layer feeding a residual Add, else 0."""
    energy = float(np.einsum("ij,jk,ik->", target, fit.dense, target))
    pruned, cross = fit.pruned.sum(axis=0), fit.cross.sum(axis=0)
    error = (
        float(np.einsum("ij,jk,ik->", weights, pruned, weights))
        - 2 * float(np.einsum("ij,jk,ik->", weights, cross.T, target))
        + energy
    )
    if fit.drift is not None and fit.drift_dense is not None:  # both kept for a residual layer, or neither
        error += (
            -2 * float(np.einsum("ij,ij->", weights, fit.drift.sum(axis=0)))
            + 2 * float(np.einsum("ij,ji->", target, fit.drift_dense))
            + fit.drift_energy
        )
    return max(error, 0.0) / energy if energy > 0 else 0.0


def _as_tensors(graph: ModelGraph, layer: LinearLayer, fit: _Fit, refit: np.ndarray) -> dict:
    """The layer's initializers from the refit over the kept columns (+ bias): removed columns are zero."""
    rows = np.zeros((len(refit), _input_channels(graph, layer) + fit.bias))
    rows[:, fit.keep] = refit[:, : len(fit.keep)]
    if fit.bias:
        rows[:, -1] = refit[:, -1]
    return layer.tensors(rows, graph.weight)
