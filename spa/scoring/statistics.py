"""Per-channel statistics of layer inputs, streamed through onnxruntime.

Data-aware criteria and weight compensation need, for each linear layer that
loses input channels, the mean and the second moment (X^T X) of that input.
They come from calibration batches (``--calib``) or, without data, from
synthetic inputs shaped like the model's. Either way the batches run through
onnxruntime with the wanted tensors exposed as outputs, and only running sums
are kept: memory is one batch of activations plus the sums, whatever the
number of samples.
"""

from __future__ import annotations

import os
import stat
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import onnx

from spa.core import decoder, runlimit
from spa.core import feeds as feed_spec
from spa.core.coupling import Dim
from spa.core.errors import UsageError
from spa.core.graph import Size
from spa.core.runtime import batch_size, batches, fixed_values, graph_inputs, session, spa_fed, static_batch
from spa.formats.calib_reader import is_reader, read_reader, reader_label
from spa.formats.calibration import archive_members, first_nonfinite, is_npy, npy_samples, open_regular, stored_array
from spa.ops.gather import Gather
from spa.scoring.calibration_fit import check_fit

# a layer input wider than this keeps per-channel sums only (its full X^T X would not fit)
MAX_GRAM_CHANNELS = 4096
# rows (positions x samples) folded into each tensor's sums over the whole run: max(ROWS_PER_CHANNEL
# x channels, MIN_ROWS). X^T X of C channels needs a few times C rows to be well estimated; a
# 56x56 map gives 3,136 rows per sample, and summing all of them cost more than the rest of OBSPA
ROWS_PER_CHANNEL = 32
MIN_ROWS = 8192
MAX_ROWS_PER_BATCH = 4096
# symbolic axes after the first (sequence length, image size) get this size in synthetic inputs
SYNTHETIC_AXIS = 64
# Synthetic samples: enough rows for X^T X of every layer input (ROWS_PER_CHANNEL rows per
# channel), within a compute budget: 32 samples of ResNet-50 at 224 (8.2 GFLOPs each), which
# keeps OBSPA there well under a minute on 2 cores. A classifier reading 1,568 flattened features
# gets one row per sample; with 32 samples its Hessian had rank 32, and the refit it drove cost
# mnist_cnn at ratio 0.5 more than 30 points against 512 samples (1,024 measured no better).
SYNTHETIC_FLOP_BUDGET = 2.6e11
SYNTHETIC_SAMPLES = (32, 512)


@dataclass
class ChannelStats:
    """Running sums over rows of one tensor's channel axis."""

    count: int
    total: np.ndarray  # (C,) sum of x
    squares: np.ndarray  # (C,) sum of x^2
    gram: np.ndarray | None  # (C, C) sum of x x^T, None above MAX_GRAM_CHANNELS

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_square(self) -> np.ndarray:
        """E[x^2] per channel: the diagonal of the second moment, kept however wide the input."""
        return self.squares / max(self.count, 1)

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.mean_square - self.mean**2, 0.0)

    @property
    def second_moment(self) -> np.ndarray | None:
        return None if self.gram is None else self.gram / max(self.count, 1)

    def add(self, rows: np.ndarray) -> None:
        # one batch's products in float32 (fast BLAS; a bounded number of rows each),
        # accumulated across batches in float64
        rows32 = rows.astype(np.float32, copy=False)
        self.count += rows.shape[0]
        self.total += rows32.sum(axis=0, dtype=np.float64)
        self.squares += np.einsum("ij,ij->j", rows32, rows32, dtype=np.float64)
        if self.gram is not None:
            self.gram += rows32.T @ rows32


@dataclass
class Statistics:
    source: str  # "calibration" or "synthetic"
    samples: int
    seconds: float
    channels: dict[Dim, ChannelStats] = field(repr=False, default_factory=dict)
    # synthetic statistics: the input prior drawn from, and every candidate prior's channel imbalance
    prior: str | None = None
    imbalance: dict[str, float] = field(default_factory=dict)
    # the inputs the sums came from, kept for refits that rerun them (``spa.transforms.sequential``)
    feeds: dict[str, np.ndarray] | None = field(default=None, repr=False)
    padded_tokens: int = 0  # positions an attention mask marks as padding, left out of the sums

    def of(self, dim: Dim) -> ChannelStats | None:
        return self.channels.get(dim)

    def summary(self) -> dict:
        summary = {
            "source": self.source,
            "samples": self.samples,
            "tensors": len(self.channels),
            "seconds": round(self.seconds, 3),
            "padded_tokens": self.padded_tokens,
        }
        if self.prior is not None:
            summary["input_prior"] = self.prior
            summary["prior_imbalance"] = {name: round(value, 4) for name, value in self.imbalance.items()}
        return summary

    def channel_imbalance(self) -> float:
        """How unevenly the layer inputs' channels carry energy: the coefficient of variation of
        E[x^2] over each tensor's channels, averaged over tensors (those with two or more live
        channels). See ``choose_prior`` for why it is measured."""
        spreads = []
        for entry in self.channels.values():
            energy = entry.mean_square
            if len(energy) > 1 and energy.mean() > 0 and np.isfinite(energy).all():
                spreads.append(energy.std() / energy.mean())
        return float(np.mean(spreads)) if spreads else float("inf")


# inputs -------------------------------------------------------------------------------------


def load_calibration(source, model: onnx.ModelProto, samples: int) -> dict[str, np.ndarray]:
    """Named input arrays with a leading sample axis, from an .npz, an .npy file (single-input
    models), a folder of .npy files, or an object with onnxruntime's ``CalibrationDataReader``
    protocol (``spa.formats.calib_reader``): at most the first ``samples`` of each, and only those
    are read (``spa.formats.calibration`` says how untrusted files are read).

    A folder holds ``<input name>.npy`` per input; a single-input model may instead take any
    number of .npy files, each one sample or a batch of samples, read in name order. Samples
    whose shape the model's fixed axes exclude are refused, and values that are not finite: one
    NaN turns the statistics, and every weight refitted from them, into NaN. Samples whose type
    or range looks wrong for the input get a ``CalibrationWarning`` naming the fix.
    """
    fed = spa_fed(model)  # control values and states need no arrays
    inputs = [i for i in graph_inputs(model) if i.name not in fed]
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in inputs}
    if is_reader(source):
        where = reader_label(source)
        arrays, counts = read_reader(source, ranks, samples)
    else:
        path = Path(source)
        where = f"--calib {path}"
        arrays, counts = _from_path(path, ranks, samples)
    if len(set(counts.values())) != 1:
        raise UsageError(f"{where}: the arrays hold different sample counts ({sorted(set(counts.values()))})")
    check_fit(model, arrays, where)
    feeds = {}
    for info in inputs:
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # what overflows is refused just below
                array = arrays[info.name].astype(_numpy_type(info), copy=False)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UsageError(
                f"{where}: array '{info.name}' does not convert to the input's type ({type(exc).__name__})"
            ) from None
        bad = first_nonfinite(array)
        if bad is not None:
            raise UsageError(f"{where}: array '{info.name}' holds NaN or inf in sample {bad} (counting from 0)")
        feeds[info.name] = array
    return feeds


def _from_path(path: Path, ranks: dict[str, int], samples: int) -> tuple[dict, dict]:
    try:
        folder = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        raise UsageError(f"--calib {path}: no such file or folder") from None
    except OSError as exc:
        raise UsageError(f"--calib {path}: cannot read it ({exc.strerror or exc})") from None
    if folder:
        return _from_folder(path, ranks, samples)
    if is_npy(path):
        return npy_samples(path, ranks, samples)
    return _from_archive(path, ranks, samples)


def _from_folder(path: Path, ranks: dict[str, int], samples: int) -> tuple[dict, dict]:
    """The arrays of a folder of .npy files, and how many samples each input's files hold."""
    files = sorted(path.glob("*.npy"))
    if not files:
        raise UsageError(f"--calib {path}: the folder holds no .npy files")
    by_name = {f.stem: f for f in files}
    names = list(ranks)
    if all(n in by_name for n in names):
        arrays, counts = {}, {}
        for name in names:
            with open_regular(by_name[name]) as handle:
                stored = stored_array(handle, str(by_name[name]), os.fstat(handle.fileno()).st_size)
                counts[name], arrays[name] = stored.samples(ranks[name]), stored.read(ranks[name], samples)
        return arrays, counts
    if len(names) != 1:
        raise UsageError(
            f"--calib {path}: a model with inputs {', '.join(names)} needs one .npy file per input, named after it"
        )
    name = names[0]
    parts, total = [], 0
    for file in files:
        if total >= samples:  # the files after the samples used are never opened
            break
        with open_regular(file) as handle:
            part = stored_array(handle, str(file), os.fstat(handle.fileno()).st_size).read(ranks[name], samples - total)
        parts.append(part)
        total += len(part)
    if len({p.shape[1:] for p in parts}) > 1:
        raise UsageError(
            f"--calib {path}: the .npy files hold samples of different shapes "
            f"({sorted({tuple(p.shape[1:]) for p in parts})})"
        )
    return {name: np.concatenate(parts)}, {name: total}


def _from_archive(path: Path, ranks: dict[str, int], samples: int) -> tuple[dict, dict]:
    """The arrays of an .npz archive, and how many samples each holds."""
    try:
        with open_regular(path) as handle, zipfile.ZipFile(handle) as archive:
            members = archive_members(archive, path)
            missing = [n for n in ranks if n not in members]
            if missing:
                raise UsageError(
                    f"--calib {path}: no array for input(s) {', '.join(missing)} "
                    f"(it has {', '.join(sorted(members)) or 'none'})"
                )
            arrays, counts = {}, {}
            for name, rank in ranks.items():
                # typeshed says ZipFile.open returns IO[bytes]; it is a ZipExtFile, which reads into buffers
                with cast(zipfile.ZipExtFile, archive.open(members[name])) as stream:
                    stored = stored_array(stream, f"{path} (array '{name}')", members[name].file_size)
                    counts[name], arrays[name] = stored.samples(rank), stored.read(rank, samples)
            return arrays, counts
    except UsageError:
        raise
    except Exception as exc:  # zipfile and zlib raise several unrelated types for a damaged archive
        raise UsageError(f"--calib {path}: not a readable .npz file ({type(exc).__name__})") from None


def _numpy_type(info: onnx.ValueInfoProto):
    return onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type or onnx.TensorProto.FLOAT)


@dataclass(frozen=True)
class InputPrior:
    """How synthetic image inputs are drawn, from a field of smooth noise (1/f^2 amplitude over
    the image axes) standardised per sample.

    No range: the field itself, N(0, 1) per sample, for inputs normalised that way. A range and no
    coverage: the field as a natural image in [low, high] (mean mid-range, a quarter-range
    deviation, clipped). A range and a coverage: strokes, the field's top ``coverage`` fraction
    drawn as ink on a plain background, as in scans, digits and text lines; ``ink_high`` says
    which end of the range is the ink."""

    low: float | None = None
    high: float | None = None
    coverage: float | None = None
    ink_high: bool = True

    @property
    def name(self) -> str:
        if self.low is None or self.high is None:
            return "smooth noise N(0,1)"
        span = f"[{self.low:g},{self.high:g}]"
        if self.coverage is None:
            return f"smooth image in {span}"
        ink, background = (self.high, self.low) if self.ink_high else (self.low, self.high)
        return f"strokes in {span}: {self.coverage:.0%} ink {ink:g} on {background:g}"

    def draw(self, field: np.ndarray) -> np.ndarray:
        if self.low is None or self.high is None:
            return field
        span = self.high - self.low
        if self.coverage is None:
            return np.clip((self.low + self.high) / 2 + field * span / 4, self.low, self.high)
        rows = field.reshape(len(field), -1)
        cut = np.quantile(rows, 1 - self.coverage, axis=1, keepdims=True)
        peak = rows.max(axis=1, keepdims=True)
        # the square root lifts the strokes' flanks: most ink pixels sit past mid-range
        stroke = np.sqrt(np.clip((rows - cut) / (peak - cut + 1e-8), 0, 1)).reshape(field.shape)
        start, end = (self.low, self.high) if self.ink_high else (self.high, self.low)
        return start + (end - start) * stroke


SMOOTH_NOISE = InputPrior()
# the input conventions exporters meet: ToTensor's [0, 1], (x - 0.5) / 0.5, raw 8-bit pixels
PRIOR_RANGES = ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0))
PRIORS = (
    SMOOTH_NOISE,
    *(InputPrior(low, high) for low, high in PRIOR_RANGES),
    *(
        InputPrior(low, high, coverage, ink_high)
        for low, high in PRIOR_RANGES
        for ink_high in (True, False)
        for coverage in (0.1, 0.25, 0.5)
    ),
)
# another prior replaces smooth noise only when its channel imbalance is this much lower
PRIOR_MARGIN = 0.9
# the probe of all priors together runs this share of the statistics' samples, with at least
# PRIOR_PROBE_SAMPLES[0] per prior (ResNet-50 at 224: 44 probe runs beside 32)
PRIOR_PROBE_SHARE = 0.5
PRIOR_PROBE_SAMPLES = (2, 16)


def synthetic_feeds(
    model: onnx.ModelProto, samples: int, seed: int, prior: InputPrior = SMOOTH_NOISE
) -> dict[str, np.ndarray]:
    """Inputs the model's own tables make plausible, for data-free statistics.

    Image-shaped float inputs are drawn from ``prior`` (see ``choose_prior``), other float
    inputs are standard normal; integer inputs that index an embedding table get ids drawn over
    that table, and other integer inputs (masks) are ones. Why smooth noise under every prior:
    on the trained MNIST CNNs, white noise drives the first layers' filters in proportion to
    their norms, which real images do not, and its statistics made compensation worse than none;
    smooth noise did not (docs/results/accuracy.md has the measurements).
    """
    return _drawn(model, _noise_fields(model, samples, seed), prior)


def _noise_fields(model: onnx.ModelProto, samples: int, seed: int) -> dict[str, np.ndarray]:
    """``synthetic_feeds`` before any prior: float inputs as float64 noise (smooth over image
    axes), integer inputs already final."""
    rng = np.random.default_rng([seed, 7])
    tables = _embedding_rows(model)
    axes, fixed = feed_spec.batch_axes(model), fixed_values(model)
    fields = {}
    for info in graph_inputs(model):
        if info.name in fixed:  # a control value: the same in every batch
            fields[info.name] = fixed[info.name]
            continue
        shape = _input_shape(info, samples, axes.get(info.name, 0))
        dtype = np.dtype(_numpy_type(info))
        if dtype.kind == "f":
            spatial = _spatial_axes(shape)
            fields[info.name] = _smooth_noise(rng, shape, spatial) if spatial else rng.standard_normal(shape)
        elif dtype.kind in "iu" and info.name in tables:
            fields[info.name] = rng.integers(0, tables[info.name], shape).astype(dtype)
        else:
            fields[info.name] = np.ones(shape, dtype=dtype)
    cache = decoder.layout(model)
    if cache is not None:  # prompts, as a prefill sees them: the statistics of the tokens' own activations
        length = feed_spec.current().length or decoder.PROMPT
        fields.update(decoder.feed(model, cache, samples, 0, length, rng))
    return fields


def _drawn(model: onnx.ModelProto, fields: dict[str, np.ndarray], prior: InputPrior) -> dict[str, np.ndarray]:
    """The feeds: image fields drawn through ``prior``, every input in its own type."""
    feeds = {}
    caches = decoder.cache_inputs(model)  # a key/value cache is no image, whatever its shape
    for info in graph_inputs(model):
        value = fields[info.name]
        if value.dtype.kind == "f" and info.name not in caches and _spatial_axes(list(value.shape)):
            value = prior.draw(value)
        feeds[info.name] = value.astype(_numpy_type(info), copy=False)
    return feeds


def _input_shape(info: onnx.ValueInfoProto, samples: int, batch_axis: int | None = 0) -> list[int]:
    """A graph input's shape with ``samples`` on its batch axis and its other free axes at the
    length the model was found to run at, else SYNTHETIC_AXIS."""
    length = feed_spec.current().length or SYNTHETIC_AXIS
    return [
        samples if axis == batch_axis else d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else length
        for axis, d in enumerate(info.type.tensor_type.shape.dim)
    ]


def choose_prior(
    model: onnx.ModelProto, wanted: list[Dim], samples: int, seed: int, custom_ops: tuple[str, ...] = ()
) -> tuple[InputPrior, dict[str, float]]:
    """The input prior whose statistics look most like the model's own data, and each prior's score.

    Each prior in ``PRIORS`` is run for ``samples`` samples and scored by the channel imbalance
    of the layer inputs (``Statistics.channel_imbalance``). Why that score: a network trained
    with normalisation layers carries roughly even channel energies on its own data, and inputs
    unlike that data excite a few channels out of all proportion. On the trained MNIST CNNs the
    real test images measure 0.4-0.7, N(0, 1) smooth noise 1.3-1.7 and ink strokes on a black
    background 0.6-0.9; those strokes made obspa with compensation at ratio 0.3 go from 0.593 to
    0.942 (residual CNN) and from 0.167 to 0.905 (depthwise/SE). Smooth noise stays unless another
    prior measures ``PRIOR_MARGIN`` lower, so near ties keep the default. The priors are image
    priors: models without an image-shaped float input (token ids, feature vectors) have
    nothing to choose. On the digits MLP, which has no normalisation layers and reads 64 flat
    pixels, the score did not track accuracy: it preferred 8-bit strokes, and they cost the
    refit 20 points at ratio 0.3.
    """
    caches = decoder.cache_inputs(model)
    floats = [i for i in graph_inputs(model) if np.dtype(_numpy_type(i)).kind == "f" and i.name not in caches]
    if not any(_spatial_axes(_input_shape(i, 1)) for i in floats):
        return SMOOTH_NOISE, {}
    # the probe's own seed, so the chosen prior is not scored on the samples it then draws; one
    # noise field serves every prior
    fields = _noise_fields(model, samples, seed + 1)
    scores = {}
    for prior in PRIORS:
        probe = collect(model, _drawn(model, fields, prior), wanted, "synthetic", seed, custom_ops, gram=False)
        scores[prior.name] = probe.channel_imbalance()
    best = min(PRIORS, key=lambda p: scores[p.name])
    chosen = best if scores[best.name] < PRIOR_MARGIN * scores[SMOOTH_NOISE.name] else SMOOTH_NOISE
    return chosen, scores


def prior_probe_samples(model: onnx.ModelProto, synthetic_samples: int) -> int:
    """Samples per prior: all priors together run ``PRIOR_PROBE_SHARE`` of the statistics'
    samples, each within ``PRIOR_PROBE_SAMPLES``, rounded up to the model's static batch."""
    low, high = PRIOR_PROBE_SAMPLES
    per_prior = int(synthetic_samples * PRIOR_PROBE_SHARE // len(PRIORS))
    batch = static_batch(model) or 1
    return -(-min(high, max(low, per_prior)) // batch) * batch


def synthetic_sample_count(
    model: onnx.ModelProto, wanted: list[Dim], shapes: Mapping[str, Sequence[Size] | None], graph_flops: float
) -> int:
    """How many synthetic samples to draw: enough rows per channel for the narrowest-in-rows layer
    input, at most what the compute budget allows, within ``SYNTHETIC_SAMPLES``. ``graph_flops``
    is the FLOPs of one run at the graph's own shapes (its static batch, symbolic axes as 1)."""
    low, high = SYNTHETIC_SAMPLES
    needed = low
    for dim in wanted:
        shape = shapes.get(dim.tensor)
        if not shape or dim.axis >= len(shape):
            continue
        sizes = [d if isinstance(d, int) and d > 0 else SYNTHETIC_AXIS for d in shape]
        channels = sizes[dim.axis]
        rows_per_sample = max(1, int(np.prod(sizes)) // (channels * sizes[0]) if dim.axis else 1)
        needed = max(needed, -(-ROWS_PER_CHANNEL * channels // rows_per_sample))
    # symbolic axes count as 1 in the FLOPs of the graph; synthetic inputs make them SYNTHETIC_AXIS
    symbolic = max(
        (
            sum(1 for d in list(i.type.tensor_type.shape.dim)[1:] if not d.HasField("dim_value"))
            for i in graph_inputs(model)
        ),
        default=0,
    )
    cost = max(graph_flops / (static_batch(model) or 1), 1.0) * SYNTHETIC_AXIS**symbolic
    affordable = int(SYNTHETIC_FLOP_BUDGET // cost)
    return int(min(high, max(low, min(needed, affordable))))


def _spatial_axes(shape: list[int]) -> tuple[int, int] | None:
    """The two image axes of an NCHW or NHWC batch (a 1-4 channel axis beside them), else None."""
    if len(shape) != 4:
        return None
    if shape[1] <= 4 < min(shape[2], shape[3]):
        return 2, 3
    if shape[3] <= 4 < min(shape[1], shape[2]):
        return 1, 2
    return None


def _smooth_noise(rng, shape: list[int], axes: tuple[int, int], exponent: float = 2.0) -> np.ndarray:
    """Noise whose amplitude falls as 1/f^exponent over the image axes, standardised per sample."""
    white = np.moveaxis(rng.standard_normal(shape), axes, (-2, -1))
    height, width = white.shape[-2:]
    frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    frequency[0, 0] = 1.0 / max(height, width)  # the mean gets the largest scale's weight, not infinity
    smooth = np.fft.irfft2(np.fft.rfft2(white) / frequency**exponent, s=(height, width))
    smooth = np.moveaxis(smooth, (-2, -1), axes)
    per_sample = tuple(range(1, smooth.ndim))
    return (smooth - smooth.mean(axis=per_sample, keepdims=True)) / (smooth.std(axis=per_sample, keepdims=True) + 1e-8)


def _embedding_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs used (directly or through a Cast) as Gather indices: the table's row count."""
    initializers = {t.name: t for t in model.graph.initializer}
    alias = {i.name: i.name for i in graph_inputs(model)}
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape") and node.input and node.input[0] in alias:
            alias[node.output[0]] = alias[node.input[0]]
        if (
            node.op_type in Gather.ops
            and len(node.input) > 1
            and node.input[1] in alias
            and node.input[0] in initializers
        ):
            table = initializers[node.input[0]]
            if table.dims:
                name = alias[node.input[1]]
                rows[name] = min(rows.get(name, table.dims[0]), table.dims[0])
    return rows


# collection ---------------------------------------------------------------------------------


def collect(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    wanted: list[Dim],
    source: str,
    seed: int = 0,
    custom_ops: tuple[str, ...] = (),
    gram: bool = True,
) -> Statistics:
    """Run ``feeds`` through the model and sum each wanted tensor's rows along its channel axis
    (and their products X^T X, unless ``gram`` is off)."""
    start = time.perf_counter()
    tensors = list(dict.fromkeys(d.tensor for d in wanted))
    exposed = exposing(model, tensors)
    run = session(exposed, custom_ops=custom_ops)
    rng = np.random.default_rng([seed, 11])
    stats: dict[Dim, ChannelStats] = {}
    samples = padded = 0
    batch_list = list(batches(model, feeds))
    masks = padding_masks(model)
    for feed in batch_list:
        values = dict(zip(tensors, runlimit.run(run, tensors, feed)))
        samples += batch_size(model, feed)
        tokens = token_mask(feed, masks)
        padded += int((~tokens).sum()) if tokens is not None else 0
        for dim in wanted:
            value = values[dim.tensor]
            if value.ndim == 0 or not np.issubdtype(value.dtype, np.floating):
                continue
            rows = channel_rows(value, dim.axis, len(batch_list), rng, tokens=tokens)
            entry = stats.get(dim)
            if entry is None:
                width = rows.shape[1]
                entry = stats[dim] = ChannelStats(
                    0,
                    np.zeros(width),
                    np.zeros(width),
                    np.zeros((width, width)) if gram and width <= MAX_GRAM_CHANNELS else None,
                )
            entry.add(rows)
        del values
    return Statistics(source, samples, time.perf_counter() - start, stats, padded_tokens=padded)


def channel_rows(
    value: np.ndarray,
    axis: int,
    batch_count: int,
    rng: np.random.Generator,
    width: int | None = None,
    tokens: np.ndarray | None = None,
) -> np.ndarray:
    """One batch's rows of ``value`` along its channel ``axis``, a random subset when there are more
    than this batch's share of the budget (ROWS_PER_CHANNEL per channel, at least MIN_ROWS, over
    ``batch_count`` batches). ``width`` sets the budget's channels instead of ``value``'s, so that
    another tensor's rows at the same positions can be drawn with the same generator state.
    ``tokens`` ([batch, tokens] booleans, ``token_mask``) leaves out the padded positions of a
    [batch, tokens, channels] value."""
    rows = np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])
    if tokens is not None and value.ndim == 3 and axis == 2 and value.shape[:2] == tokens.shape:
        rows = rows[tokens.reshape(-1)]
    budget = max(ROWS_PER_CHANNEL * (width or rows.shape[1]), MIN_ROWS)
    cap = min(MAX_ROWS_PER_BATCH, -(-budget // batch_count))
    if len(rows) > cap:
        rows = rows[np.sort(rng.choice(len(rows), cap, replace=False))]
    return rows


def padding_masks(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that can be attention masks: integer or boolean, [batch, tokens], indexing no
    embedding table (token and token-type ids do)."""
    tables = _embedding_rows(model)
    return [
        i.name
        for i in graph_inputs(model)
        if np.dtype(_numpy_type(i)).kind in "iub" and i.name not in tables and len(i.type.tensor_type.shape.dim) == 2
    ]


def token_mask(feed: dict[str, np.ndarray], masks: list[str]) -> np.ndarray | None:
    """Which positions of a batch are real tokens, from the first of ``masks`` in ``feed`` that holds
    only 0 and 1 and pads something; None when nothing is padded.

    Why leave padding out: a calibration batch of sentences padded to one length is mostly padding
    (all-MiniLM-L6-v2's 128 news sentences at 64 tokens: over half), and the model's output there
    is never read, so fitting layers to it spends the refit on rows that do not matter."""
    for name in masks:
        value = feed.get(name)
        if value is not None and value.ndim == 2 and np.isin(value, (0, 1)).all() and not value.all():
            return value.astype(bool)
    return None


def exposing(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """The model with ``tensors`` added as graph outputs (typed where shape inference knew them)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    present = {o.name for o in exposed.graph.output}
    for name in tensors:
        if name not in present:
            info = known.get(name)
            exposed.graph.output.append(info if info is not None else onnx.ValueInfoProto(name=name))
    return exposed
