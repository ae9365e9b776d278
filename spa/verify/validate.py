"""Stage 7: prove the pruned model is a valid, equivalent-where-exact model."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from spa.core import runlimit
from spa.core.errors import UsageError, ValidationError
from spa.formats.checker import checker_complaint
from spa.scoring.statistics import graph_inputs
from spa.verify.fidelity import Fidelity

# soft == hard is checked to this relative error (issue 2: below 1e-4)
SOFT_TOLERANCE = 1e-4

_NUMPY_OF = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
}


@dataclass
class Validation:
    checker: str = "not run"  # "ok" or the checker's message
    dense_runs: bool = False
    dense_error: str | None = None
    runs: bool = False
    io_match: bool = False
    soft_equal: bool | None = None  # None: no exact group was pruned, nothing to compare
    soft_max_rel_error: float | None = None
    approximate_groups: int = 0  # pruned groups soft == hard does not hold for: left out of that comparison
    dense_equal: bool | None = None  # only checked when nothing was removed
    # outputs whose soft == hard check was made on the input of their final squashing op (see SQUASHING)
    soft_compared_before: list[str] = field(default_factory=list)
    # dense vs pruned outputs on calibration samples the statistics did not use (spa.verify.fidelity)
    fidelity: Fidelity | None = None
    latency: list[dict] = field(default_factory=list)  # dense vs pruned per provider (spa.verify.bench.LatencyPair)
    sizes: list[dict[str, list[int]]] = field(default_factory=list)  # the input sizes the checks ran at
    # float outputs of the input model holding NaN or inf on the sample inputs: compared where finite
    dense_nonfinite: list[str] = field(default_factory=list)
    nonfinite_weights: list[str] = field(default_factory=list)  # pruned weights holding NaN or inf
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# a model can declare any input shape; validation refuses to allocate more than this (1 GiB of float32)
MAX_INPUT_ELEMENTS = 2**28


# free height and width of an image input (NCHW, 1-4 channels) when no length is asked for: a
# detector's feature pyramid (PP-OCR det) adds maps downsampled 32x and upsampled back, which a
# 1x1 image cannot do; 64 is a multiple of every stride in common use
IMAGE_SIDE = 64


def input_shapes(model: onnx.ModelProto, batch: int = 1, length: int | None = None) -> dict[str, list[int]]:
    """Static axes as declared; symbolic ones get ``batch``, or ``length`` past the first axis when
    given, or ``IMAGE_SIDE`` for the free height and width of an NCHW image."""
    initializers = {t.name for t in model.graph.initializer}

    def shape(dims) -> list[int]:
        # paddle2onnx writes dim_value -1 for a free axis
        static = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in dims]
        image = len(static) == 4 and static[1] is not None and static[1] <= 4
        sizes = []
        for axis, value in enumerate(static):
            if value is not None:
                sizes.append(value)
            elif axis == 0:
                sizes.append(batch)
            elif length is not None:
                sizes.append(length)
            else:
                sizes.append(IMAGE_SIDE if image and axis >= 2 else batch)
        return sizes

    return {
        info.name: shape(info.type.tensor_type.shape.dim) for info in model.graph.input if info.name not in initializers
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
    symbols = {}
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
    first axis, when given) unless ``shapes`` says."""
    rng = np.random.default_rng(seed)
    types = {info.name: info.type.tensor_type for info in model.graph.input}
    feeds = {}
    for name, shape in {**input_shapes(model, batch, length), **(shapes or {})}.items():
        if name not in types:
            continue
        tensor_type = types[name]
        dtype = _NUMPY_OF.get(tensor_type.elem_type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or "mask" in name.lower():
            # an attention mask of zeros hides every key: attention would be uniform whatever Q and K are
            feeds[name] = np.ones(shape, dtype=dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def session(model: Source, threads: int = 0, custom_ops: tuple[str, ...] = ()):
    """A CPU session. Custom-op libraries are loaded only when the user names them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions; keep stderr clean
    if threads:
        options.intra_op_num_threads = threads
    for library in custom_ops:
        options.register_custom_ops_library(str(library))
    if not isinstance(model, onnx.ModelProto):  # a large model: packed weight copies would double it
        options.add_session_config_entry("session.disable_prepacking", "1")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], custom_ops: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    return outputs_of(session(model, custom_ops=custom_ops), feeds)


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
    from spa.core.tensors import to_array

    values = to_array(tensor).reshape(-1)  # a memory map for external data: checked in pieces
    return all(np.isfinite(values[start : start + chunk]).all() for start in range(0, values.size, chunk))


def check(model: Source, result: Validation) -> None:
    # outputs declared without a shape are common and harmless (onnxruntime runs them); nothing else is
    complaint = (
        checker_complaint(model, full_check=True) if isinstance(model, onnx.ModelProto) else _file_complaint(model)
    )
    result.checker = "ok" if complaint is None else complaint
    if complaint is not None:
        result.problems.append(f"onnx checker: {complaint}")


def _file_complaint(path: Path) -> str | None:
    """The checker reads a model with external data from its file, finding the data beside it;
    an output without a shape stops it early, so the model is then checked again without it."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return None
    except Exception as exc:  # the checker raises several unrelated types
        if "Field 'shape' of 'type' is required" not in str(exc):
            return one_line(exc)
    return checker_complaint(onnx.load(str(path), load_external_data=False))


def _symbolic_inputs(model: onnx.ModelProto) -> bool:
    return any(
        d.HasField("dim_param") or not d.HasField("dim_value") or d.dim_value < 0
        for i in model.graph.input
        for d in i.type.tensor_type.shape.dim
    )


Source = onnx.ModelProto | Path  # a model in memory, or a file (models with external data)


def _proto(source: Source) -> onnx.ModelProto:
    return source if isinstance(source, onnx.ModelProto) else onnx.load(str(source), load_external_data=False)


def validate(
    dense: Source,
    pruned: Source,
    soft: Source | None,
    hard_exact: Source | None,
    removed_anything: bool,
    seed: int = 0,
    step=None,
    custom_ops: tuple[str, ...] = (),
    sizes: dict[str, list[int]] | None = None,
) -> Validation:
    """Checker, onnxruntime run, same I/O names and shapes (also at a second batch size where the
    batch axis is symbolic, which catches sizes hard-coded by mistake, and at the user's ``sizes``),
    soft == hard, ratio 0 == dense.

    One onnxruntime session is alive at a time, so a large model is never held twice.
    ``step(done, total)`` is called as the checks advance.
    """
    step = step or (lambda done, total: None)
    total = 5
    result = Validation()
    check(pruned, result)
    step(1, total)
    dense_proto = _proto(dense)
    feeds = [sample_inputs(dense_proto, seed)]
    extra = []
    if _symbolic_inputs(dense_proto):
        # other sizes, where a size hard-coded by mistake fails: batch 2, then batch 3 with the other
        # free axes (sequence) at 7, where attention over several positions tells heads apart
        extra = [sample_inputs(dense_proto, seed + 1, batch=2), sample_inputs(dense_proto, seed + 2, batch=3, length=7)]
    if sizes:
        extra.append(sample_inputs(dense_proto, seed + 3, shapes=complete_sizes(dense_proto, sizes)))
    try:
        dense_out = _run_all(dense, feeds, custom_ops)
        result.dense_runs = True
    except runlimit.RunTimeout:
        raise
    except Exception as exc:
        result.dense_error = f"onnxruntime cannot run the input model: {one_line(exc)}"
        result.problems.append(result.dense_error)
        return result
    for feed, out in zip(extra, _run_each(dense, extra, custom_ops)):
        if out is None and sizes and feed is extra[-1]:
            raise UsageError(
                "the input model does not run at the --input-shape sizes "
                f"({format_sizes(complete_sizes(dense_proto, sizes))})"
            )
        if out is not None:  # a size the dense model itself refuses (an image too small) is no test
            feeds.append(feed)
            dense_out.append(out)
    result.sizes = [{name: list(value.shape) for name, value in feed.items()} for feed in feeds]
    step(2, total)
    try:
        pruned_out = _run_all(pruned, feeds, custom_ops)
        result.runs = True
    except runlimit.RunTimeout:
        raise
    except Exception as exc:
        result.problems.append(f"onnxruntime cannot run the pruned model: {one_line(exc)}")
        return result
    step(3, total)
    result.dense_nonfinite = list(dict.fromkeys(n for out in dense_out for n in nonfinite_outputs(out)))
    broken = list(dict.fromkeys(n for d, p in zip(dense_out, pruned_out) for n in newly_nonfinite(d, p)))
    if broken:
        result.problems.append(
            f"the pruned model outputs NaN or inf where the input model's outputs are finite ({', '.join(broken)})"
        )
    same_inputs = [i.name for i in dense_proto.graph.input] == [i.name for i in _proto(pruned).graph.input]
    result.io_match = same_inputs and all(same_shapes(d, p) for d, p in zip(dense_out, pruned_out))
    if not result.io_match:
        result.problems.append("input/output names or shapes differ from the dense model")
    step(4, total)
    if not removed_anything:
        result.dense_equal = relative_error(dense_out[0], pruned_out[0]) == 0.0
        if not result.dense_equal:
            result.problems.append("nothing was removed but outputs differ from the dense model")
    if soft is not None and hard_exact is not None:
        soft_out = _run_all(soft, feeds, custom_ops)
        hard_out = pruned_out if hard_exact is pruned else _run_all(hard_exact, feeds, custom_ops)
        err, result.soft_compared_before = _soft_hard_error(
            soft, hard_exact, feeds, soft_out, hard_out, dense_out, custom_ops
        )
        result.soft_max_rel_error = err
        result.soft_equal = err < SOFT_TOLERANCE
        if not result.soft_equal:
            result.problems.append(f"hard-pruned outputs differ from soft-pruned ones (rel. error {err:.2e})")
    step(5, total)
    return result


# Element-wise ops whose float32 results onnxruntime computes to about 1e-7 absolute, whatever their
# size: a sigmoid of 1e-4 (PP-OCRv4 det's probability map on random input) moves by 5e-4 of itself when
# its input moves by one ulp. On such an output, soft and hard are compared on the op's input instead:
# the op is the same in both, so agreement there proves the cut, and the output check only measured
# the kernel's rounding.
SQUASHING = {"Sigmoid", "Tanh", "Softmax", "LogSoftmax", "HardSigmoid", "Erf", "Exp"}


def _soft_hard_error(
    soft: Source, hard: Source, feeds, soft_out, hard_out, dense_out, custom_ops
) -> tuple[float, list[str]]:
    """The worst soft/hard error over outputs, and the outputs checked before their squashing op."""
    errors = {
        name: max(
            relative_error({name: s[name]}, {name: h[name]}, dense={name: d[name]})
            for s, h, d in zip(soft_out, hard_out, dense_out)
        )
        for name in soft_out[0]
    }
    bad = [name for name, err in errors.items() if not err < SOFT_TOLERANCE]
    # an infinite error is a NaN or inf the dense model does not have: no squashing op's rounding
    if (
        not bad
        or any(math.isinf(errors[name]) for name in bad)
        or not isinstance(soft, onnx.ModelProto)
        or not isinstance(hard, onnx.ModelProto)
    ):
        return max(errors.values(), default=0.0), []
    producers = {o: n for n in soft.graph.node for o in n.output}
    hard_tensors = {o for n in hard.graph.node for o in n.output}
    before = {}
    for name in bad:
        node = producers.get(name)
        if (
            node is None
            or node.op_type not in SQUASHING
            or node.domain not in ("", "ai.onnx")
            or node.input[0] not in hard_tensors
        ):
            return max(errors.values()), []
        before[name] = node.input[0]
    # the squashing ops keep their input's element type
    types = {o.name: o.type.tensor_type.elem_type for o in soft.graph.output}
    inner = {tensor: types.get(name, onnx.TensorProto.FLOAT) for name, tensor in before.items()}
    soft_in = _run_all(_with_outputs(soft, inner), feeds, custom_ops)
    hard_in = _run_all(_with_outputs(hard, inner), feeds, custom_ops)
    if any(nonfinite_outputs(out) for out in soft_in + hard_in):  # agreement on NaN proves nothing
        return max(errors.values()), []
    for name, tensor in before.items():
        errors[name] = max(relative_error({tensor: s[tensor]}, {tensor: h[tensor]}) for s, h in zip(soft_in, hard_in))
    return max(errors.values()), list(before)


def _with_outputs(model: onnx.ModelProto, outputs: dict[str, int]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(onnx.helper.make_tensor_value_info(n, t, None) for n, t in outputs.items())
    return out


def _run_all(source: Source, feeds: list[dict], custom_ops) -> list[dict[str, np.ndarray]]:
    sess = session(source, custom_ops=custom_ops)
    outputs = [outputs_of(sess, f) for f in feeds]
    del sess
    return outputs


def _run_each(source: Source, feeds: list[dict], custom_ops) -> list[dict[str, np.ndarray] | None]:
    """Outputs per feed, None for a feed the model cannot run."""
    if not feeds:
        return []
    sess = session(source, custom_ops=custom_ops)
    outputs = []
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


def same_shapes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def one_line(exc: BaseException) -> str:
    """One readable line: onnxruntime prefixes its reason with a C++ source location and signature."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = re.sub(r"/\S+\.(cc|h|cpp):\d+ (\S+::)*\S+?\(.*?\) ", "", text[0])
    line = re.sub(r"/\S+\.(cc|h|cpp):\d+ ", "", line)
    return line[:300]
