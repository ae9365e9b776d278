"""Running models on onnxruntime: sessions, input sizes and sample feeds.

Every stage that runs a model (statistics, searches, refits, validation, fidelity, latency,
export checks) opens its sessions and sizes its inputs here, so the rules for both live in
one place, and this module imports nothing from the stages that use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from spa.core import decoder, runlimit
from spa.core import feeds as feed_spec
from spa.core.errors import ModelLoadError, UsageError, ValidationError
from spa.core.staging import is_lazy_proto, release, runnable_file
from spa.core.tensors import data_bytes

# feeds run through a model at a time where its batch axis is free
BATCH = 8

_NUMPY_OF: dict[int, type[np.generic]] = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
}


# a model can declare any input shape; validation refuses to allocate more than this (1 GiB of float32)
MAX_INPUT_ELEMENTS = 2**28


# free height and width of an image input (NCHW, 1-4 channels) when no length is asked for: a
# detector's feature pyramid (PP-OCR det) adds maps downsampled 32x and upsampled back, which a
# 1x1 image cannot do; 64 is a multiple of every stride in common use
IMAGE_SIDE = 64


def input_shapes(model: onnx.ModelProto, batch: int = 1, length: int | None = None) -> dict[str, list[int]]:
    """Static axes as declared; symbolic ones get ``batch`` on the input's batch axis
    (``spa.core.feeds.batch_axes``: a state ``[layers, batch, hidden]`` takes it second), else
    ``length`` when given, else ``IMAGE_SIDE`` for the free height and width of an NCHW image."""
    initializers = {t.name for t in model.graph.initializer}
    batch_axes = feed_spec.batch_axes(model)

    def shape(name: str, dims) -> list[int]:
        # paddle2onnx writes dim_value -1 for a free axis
        static = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in dims]
        image = len(static) == 4 and static[1] is not None and static[1] <= 4
        sizes = []
        for axis, value in enumerate(static):
            if value is not None:
                sizes.append(value)
            elif axis == 0 or axis == batch_axes.get(name):
                sizes.append(batch)
            elif length is not None:
                sizes.append(length)
            else:
                sizes.append(IMAGE_SIDE if image and axis >= 2 else batch)
        return sizes

    return {
        info.name: shape(info.name, info.type.tensor_type.shape.dim)
        for info in model.graph.input
        if info.name not in initializers
    }


def check_input_sizes(model: onnx.ModelProto, sizes: dict[str, list[int]]) -> None:
    """Raise UsageError unless every ``--input-shape`` names a graph input, with its rank, its
    fixed axes as declared and no more elements than validation allocates."""
    declared = {info.name: info for info in graph_inputs(model)}
    for name, shape in sizes.items():
        if name not in declared:
            raise UsageError(
                f"--input-shape names '{name}', which is not an input of the model "
                f"(inputs: {', '.join(declared) or 'none'})"
            )
        dims = declared[name].type.tensor_type.shape.dim
        if len(shape) != len(dims):
            raise UsageError(f"--input-shape {name}: {len(shape)} sizes given, the input has {len(dims)} axes")
        for axis, (dim, size) in enumerate(zip(dims, shape)):
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != size:
                raise UsageError(
                    f"--input-shape {name}: axis {axis} is fixed at {dim.dim_value} by the model, not {size}"
                )
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise UsageError(f"--input-shape {name}: {math.prod(shape)} elements is too large to run")


def complete_sizes(model: onnx.ModelProto, sizes: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """``sizes`` and, for the inputs not named, the sizes their free axes take through a symbol they
    share with a named one (``attention_mask`` [batch, sequence] follows ``input_ids``), their other
    free axes at 1. Inputs sharing no symbol stay out: callers size them as they would unasked."""
    if not sizes:
        return {}
    symbols: dict[str, int] = {}
    for info in graph_inputs(model):
        for dim, size in zip(info.type.tensor_type.shape.dim, sizes.get(info.name, ())):
            if dim.HasField("dim_param"):
                symbols.setdefault(dim.dim_param, size)
    complete = dict(sizes)
    for info in graph_inputs(model):
        dims = info.type.tensor_type.shape.dim
        if info.name in complete or not any(d.HasField("dim_param") and d.dim_param in symbols for d in dims):
            continue
        complete[info.name] = [
            symbols.get(d.dim_param, 1) if d.HasField("dim_param") else d.dim_value if d.dim_value > 0 else 1
            for d in dims
        ]
    return complete


def unsized_axes(model: onnx.ModelProto, sizes: dict[str, list[int]] | None = None) -> list[str]:
    """Free axes past the batch that FLOPs count as 1 because ``sizes`` (completed) leaves them
    unset, as ``input[axis]``."""
    given = complete_sizes(model, sizes)
    return [
        f"{info.name}[{axis}]"
        for info in graph_inputs(model)
        if info.name not in given
        for axis, dim in enumerate(info.type.tensor_type.shape.dim)
        if axis > 0 and not (dim.HasField("dim_value") and dim.dim_value > 0)
    ]


def counted_sizes(model: onnx.ModelProto, sizes: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """The input sizes FLOPs are counted at: ``sizes`` (completed) where given, else as declared
    with free axes at 1."""
    return {**input_shapes(model, batch=1, length=1), **complete_sizes(model, sizes)}


def format_sizes(sizes: dict[str, list[int]]) -> str:
    return ", ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in sizes.items())


def refuse_oversized(model: onnx.ModelProto) -> None:
    """Raise ValidationError when an input is too large to materialise for validation."""
    oversized = oversized_input(model)
    if oversized:
        raise ValidationError(f"{oversized}: too large to run for validation (use --no-validate)")


def oversized_input(model: onnx.ModelProto) -> str | None:
    """The first input too large to materialise for validation, described, or None."""
    for name, shape in input_shapes(model, batch=2).items():
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            return f"input '{name}' declares shape {shape}"
    return None


def sample_inputs(
    model: onnx.ModelProto,
    seed: int = 0,
    batch: int = 1,
    shapes: dict[str, list[int]] | None = None,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic inputs for every graph input; symbolic axes get ``batch`` (``length`` past the
    batch axis, when given, else the current ``FeedSpec``'s) unless ``shapes`` says; control
    values are the ones the graph compares them with, or the ``FeedSpec``'s."""
    spec = feed_spec.current()
    length = length if length is not None else spec.length
    rng = np.random.default_rng(seed)
    types = {info.name: info.type.tensor_type for info in model.graph.input}
    fixed = fixed_values(model)
    feeds: dict[str, np.ndarray] = {}
    for name, shape in planned_shapes(model, batch, shapes, length).items():
        if name not in types:
            continue
        tensor_type = types[name]
        dtype = _NUMPY_OF.get(tensor_type.elem_type, np.float32)
        if name in fixed and name not in (shapes or {}):
            feeds[name] = fixed[name]
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or "mask" in name.lower():
            # an attention mask of zeros hides every key: attention would be uniform whatever Q and K are
            feeds[name] = np.ones(shape, dtype=dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    cache = decoder.layout(model)
    if cache is not None:
        feeds.update(_decoder_feed(model, cache, rng, batch, shapes or {}, length))
    return feeds


def feed_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """The shape of each input ``sample_inputs`` (batch 1) would make, without making it: what a
    model too large to run can still be asked."""
    fixed = fixed_values(model)
    out = {}
    for name, shape in planned_shapes(model, 1, shapes, feed_spec.current().length).items():
        out[name] = list(fixed[name].shape) if name in fixed and name not in (shapes or {}) else list(shape)
    return out


def planned_shapes(
    model: onnx.ModelProto, batch: int, shapes: dict[str, list[int]] | None, length: int | None
) -> dict[str, list[int]]:
    """Each input's shape before control values and decoder feeds: ``input_shapes``, then ``shapes``."""
    return {**input_shapes(model, batch, length), **(shapes or {})}


def _decoder_feed(model, cache: decoder.CacheLayout, rng, batch: int, shapes: dict[str, list[int]], length):
    """The cache, token ids, mask and positions of a decoder, sized together: past and new tokens
    as ``shapes`` set them, else a prompt of ``length`` tokens with an empty past, as generation
    starts: an empty cache fits a model whose cache pruning shrank (``outputs_of``), and
    GroupQueryAttention takes a past beside several new tokens for one sequence only. The cache
    a model writes itself is read back by ``spa.core.decoder.rollout``."""
    tokens = decoder.sizes_from(model, cache, shapes) or (0, length if length is not None else decoder.NEW)
    batch = next((shape[0] for name, shape in shapes.items() if name in cache.past or name == cache.ids), batch)
    made = decoder.feed(model, cache, batch, *tokens, rng)
    return {name: value for name, value in made.items() if name not in shapes}


def fixed_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs fed one value whatever the batch: control values the graph compares with a
    constant, and those the current ``FeedSpec`` sets (``--input``), which win."""
    controls = {name: value for name, (value, _) in feed_spec.graph_controls(model).items()}
    return {**controls, **feed_spec.current().values}


Source = onnx.ModelProto | Path  # a model in memory, or a file (models with external data)

# Above this much external data, sessions skip onnxruntime's weight prepacking, whose packed
# copies would double the memory a large model takes. Below it they prepack as they do for
# inline models: prepacked kernels sum in another order, and a model saved with external data
# must give the same statistics, to the bit, and so the same pruned weights, as saved inline.
PREPACK_MAX_BYTES = 512 << 20


def external_bytes(model: Source) -> int:
    """Bytes of the weights a model keeps in external data (0 for a model held in memory)."""
    proto = proto_of(model)
    return sum(
        data_bytes(tensor.data_type, math.prod(tensor.dims)) or 0
        for tensor in proto.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    )


def proto_of(source: Source) -> onnx.ModelProto:
    return source if isinstance(source, onnx.ModelProto) else onnx.load(str(source), load_external_data=False)


def session(model: Source, threads: int = 0, custom_ops: tuple[str, ...] = (), config: Mapping[str, str] | None = None):
    """A CPU session. Custom-op libraries are loaded only when the user names them; ``config``
    holds session configuration entries."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions; keep stderr clean
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    for library in custom_ops:
        options.register_custom_ops_library(str(library))
    if external_bytes(model) > PREPACK_MAX_BYTES:  # packed weight copies would double its memory
        options.add_session_config_entry("session.disable_prepacking", "1")
    with opened(model) as source:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@contextmanager
def opened(model: Source) -> Iterator[str | bytes]:
    """What onnxruntime opens ``model`` from: its bytes when its weights are in memory, else a
    file with its external data beside it (``spa.core.staging``), removed once the session holds it."""
    if isinstance(model, onnx.ModelProto) and not is_lazy_proto(model):
        yield model.SerializeToString()
    elif isinstance(model, onnx.ModelProto):
        path = runnable_file(model)
        try:
            yield str(path)
        finally:
            release(path)
    else:
        yield str(model)


def run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], custom_ops: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    return outputs_of(session(model, custom_ops=custom_ops), feeds)


def run_all(
    source: Source, feeds: list[dict], custom_ops, config: Mapping[str, str] | None = None
) -> list[dict[str, np.ndarray]]:
    sess = session(source, custom_ops=custom_ops, config=config)
    outputs = [outputs_of(sess, f) for f in feeds]
    del sess
    return outputs


def run_each(source: Source, feeds: list[dict], custom_ops) -> list[dict[str, np.ndarray] | None]:
    """Outputs per feed, None for a feed the model cannot run."""
    if not feeds:
        return []
    sess = session(source, custom_ops=custom_ops)
    outputs: list[dict[str, np.ndarray] | None] = []
    for feed in feeds:
        try:
            outputs.append(outputs_of(sess, feed))
        except runlimit.RunTimeout:
            raise
        except Exception:
            outputs.append(None)
    del sess
    return outputs


def outputs_of(sess, feeds) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, runlimit.run(sess, names, feeds)))


def one_line(exc: BaseException) -> str:
    """One readable line: onnxruntime prefixes its reason with a C++ source location and signature."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = re.sub(r"/\S+\.(cc|h|cpp):\d+ (\S+::)*\S+?\(.*?\) ", "", text[0])
    line = re.sub(r"/\S+\.(cc|h|cpp):\d+ ", "", line)
    return line[:300]


def has_free_axes(model: onnx.ModelProto) -> bool:
    return any(
        d.HasField("dim_param") or not d.HasField("dim_value") or d.dim_value < 0
        for i in model.graph.input
        for d in i.type.tensor_type.shape.dim
    )


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def static_batch(model: onnx.ModelProto) -> int | None:
    """The smallest fixed size of a graph input's batch axis, None when every one is free."""
    static = []
    for info, axis in _batched(model):
        dim = info.type.tensor_type.shape.dim[axis]
        if dim.HasField("dim_value") and dim.dim_value > 0:
            static.append(dim.dim_value)
    return min(static) if static else None


def _batched(model: onnx.ModelProto) -> list[tuple[onnx.ValueInfoProto, int]]:
    axes = feed_spec.batch_axes(model)
    return [(i, axes[i.name]) for i in graph_inputs(model) if axes.get(i.name) is not None]  # type: ignore[misc]


def batch_size(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Samples in ``feeds``: the size of a batched input's batch axis."""
    for info, axis in _batched(model):
        value = feeds.get(info.name)
        if value is not None and value.ndim > axis:
            return value.shape[axis]
    return 1


def batches(model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int = BATCH) -> Iterator[dict]:
    """Feeds cut into batches the model accepts along each input's batch axis: its static batch
    size (the samples left over are dropped), else ``batch`` (the last batch takes the rest).
    Inputs with no batch axis (control values) go whole into every batch; the fixed values of
    inputs ``feeds`` lacks (calibration data need not hold them) are added."""
    axes = {info.name: axis for info, axis in _batched(model)}
    total = batch_size(model, feeds)
    static = static_batch(model)
    size = static or min(batch, total)
    if total < size:
        raise UsageError(f"--calib: {total} sample(s), but the model's batch size is {size}")
    end = total - total % size if static else total
    missing = {k: v for k, v in fixed_values(model).items() if k not in feeds}
    states = [k for k in spa_fed(model) if k not in feeds and k not in missing]
    for start in range(0, end, size):
        stop = min(start + size, end)
        part = {
            k: v[(slice(None),) * axes[k] + (slice(start, stop),)] if k in axes and v.ndim > axes[k] else v
            for k, v in feeds.items()
        }
        if states:  # the zero state a stream starts from
            shapes = input_shapes(model, stop - start, feed_spec.current().length)
            part.update({k: np.zeros(shapes[k], _NUMPY_OF.get(_elem_type(model, k), np.float32)) for k in states})
        yield {**part, **_prompt_inputs(model, part, set(feeds)), **missing}


def _prompt_inputs(model: onnx.ModelProto, part: dict[str, np.ndarray], given: set[str]) -> dict[str, np.ndarray]:
    """For a decoder whose samples hold token ids only: an empty cache, the mask over the ids and
    their positions, as a prompt is fed."""
    cache = decoder.layout(model)
    if cache is None or cache.ids is None or cache.ids not in part or part[cache.ids].ndim != 2:
        return {}
    ids = part[cache.ids]
    made = decoder.feed(model, cache, ids.shape[0], 0, ids.shape[1], np.random.default_rng(0))
    return {name: value for name, value in made.items() if name not in given}


def spa_fed(model: onnx.ModelProto) -> set[str]:
    """Inputs spa feeds itself when calibration data lacks them: fixed values (control inputs,
    ``--input``), recurrent states (an input whose batch axis is not its first), and a decoder's
    cache, mask and positions (its samples are token ids: prompts)."""
    states = {name for name, axis in feed_spec.batch_axes(model).items() if axis}
    cache = decoder.layout(model)
    prompt = {n for n in [*cache.past, cache.mask, cache.positions] if n} if cache and cache.ids else set()
    return set(fixed_values(model)) | states | prompt


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    return next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == name)


_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}


def resolve_providers(names: list[str]) -> list[str]:
    """Map short names (cpu, cuda, tensorrt...) to onnxruntime's, refusing ones not installed."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    resolved = []
    for name in names:
        full = _PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise UsageError(f"execution provider '{name}' is not available here (installed: {', '.join(available)})")
        resolved.append(full)
    return resolved


def parse_shapes(specs: list[str]) -> dict[str, list[int]]:
    """``name=1x3x224x224`` pairs, for inputs with dynamic axes."""
    shapes = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise UsageError(f"--input-shape expects NAME=AxBxC, got '{spec}'") from None
        if not name or any(d <= 0 for d in shapes[name]):
            raise UsageError(f"--input-shape expects NAME=AxBxC with positive sizes, got '{spec}'")
    return shapes


def timing_session(
    source: onnx.ModelProto | Path,
    provider: str = "CPUExecutionProvider",
    threads: int = 0,
    custom_ops: tuple[str, ...] = (),
    profile_prefix: str | None = None,
):
    """A session as deployments open one: full graph optimisation, on ``provider`` with the CPU
    provider behind it for ops the accelerator lacks (onnxruntime's own placement); with
    ``profile_prefix``, onnxruntime's profiler writes each node's time to a file with that prefix."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for library in custom_ops:
        options.register_custom_ops_library(str(library))
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    in_memory = isinstance(source, onnx.ModelProto)
    try:
        with opened(source) as opened_source:
            return ort.InferenceSession(opened_source, options, providers=providers)
    except Exception as exc:
        where = "the model" if in_memory else str(source)
        raise ModelLoadError(
            f"{where}: onnxruntime cannot open it on {provider}: {str(exc).strip().splitlines()[0][:200]}"
        ) from exc
