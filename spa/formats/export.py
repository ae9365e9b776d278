"""Edge export: float16 weights and onnxruntime's ORT format, each validated before it is written.

Both conversions come from onnxruntime itself: ``onnxruntime.transformers.float16`` converts the
graph, and the ORT file is what ``onnxruntime.tools.convert_onnx_models_to_ort`` writes (a CPU
session saving its optimised graph as a flatbuffer), with that tool's settings for a portable model.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from heapq import heapify, heappop, heappush
from pathlib import Path

import numpy as np
import onnx

from spa.core.errors import OutputError, UsageError, ValidationError
from spa.core.runlimit import RUN_TIMEOUT, RunTimeout, own_context, set_stage, set_timeout
from spa.core.runtime import one_line, outputs_of, refuse_oversized, sample_inputs, session
from spa.core.signals import deferred, remove_quietly
from spa.core.tensors import inlined, is_lazy, to_array, write_external
from spa.formats.checker import checker_complaint
from spa.formats.files import refuse_special, save_model
from spa.verify.compare import newly_nonfinite, relative_error, same_shapes

FP16_MAX = float(np.finfo(np.float16).max)  # 65504

# float16 keeps 11 significant bits: one rounding is at most 2**-11 ~ 4.9e-4 relative. Weights are
# rounded once, and every layer rounds its activations again on hardware that computes in float16
# (accumulating in float32, as GPUs and ARM CPUs do), so errors add up over depth: 1e-2 is about 20
# roundings, room for a few dozen layers. A clamped weight, an overflow to inf or a wrong cast
# gives errors of 1e-1 and more, far above it.
FP16_TOLERANCE = 1e-2

# the ORT file holds the same graph optimised the same way as a session over the .onnx: outputs may
# differ only by float32 reassociation in kernels, orders of magnitude below this
ORT_TOLERANCE = 1e-5

# bytes 4:8 of every ORT format file (flatbuffers' file identifier)
ORT_IDENTIFIER = b"ORTM"

# The conversion tool disables NCHWc because it bakes in the converting CPU's vector width. The
# float16-initializer fusion is the same kind of choice: on a CPU without float16 kernels (x86)
# it stores every float16 weight again as float32, doubling the file that --fp16 was to halve.
_NOT_PORTABLE = ["NchwcTransformer", "FuseFp16InitializerToFp32NodeTransformer"]

FP16_IO = ("float32", "float16")


class Fp16RangeWarning(UserWarning):
    """Some weights exceed float16's range and are clamped to +-65504."""


@dataclass
class ExportCheck:
    target: str  # "float16" or "ORT"
    tolerance: float
    checker: str = "not run"  # the onnx checker for float16; the flatbuffer identifier for ORT
    runs: bool = False
    io_match: bool = False
    max_rel_error: float | None = None
    # weights beyond float16's range, clamped by the conversion (a masking constant such as -1e9 is
    # harmless clamped; a real weight is not, and the output error then says so)
    clamped: list[str] = field(default_factory=list)
    # float16 activations that overflow to inf on the sample inputs (finite in the float32 model)
    overflows: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        data["summary"] = self.summary()
        return data

    def summary(self) -> str:
        error = "not compared" if self.max_rel_error is None else f"rel. err {self.max_rel_error:.1e}"
        text = (
            f"{self.checker}, {'onnxruntime runs' if self.runs else 'does not run'}, "
            f"I/O {'same' if self.io_match else 'differs'}, {error} (tolerance {self.tolerance:.0e})"
        )
        return text + (f", {len(self.clamped)} clamped" if self.clamped else "")

    def raise_if_failed(self) -> None:
        if self.problems:
            raise ValidationError(f"{self.target} model failed validation: " + "; ".join(self.problems))


def to_fp16(model: onnx.ModelProto, keep_io_float32: bool = True) -> onnx.ModelProto:
    """A float16 copy of ``model``: float weights, activations and casts become float16.

    With ``keep_io_float32`` the graph's float inputs and outputs stay float32 behind Cast nodes,
    so callers feed the same arrays. onnxruntime's op block list (Range, TopK, CumSum, Min/Max,
    NonMaxSuppression, RoiAlign, the ai.onnx.ml ops...) stays float32, as do Resize scales; integer
    tensors (shapes, indices) are untouched. Weights beyond +-65504 are clamped, with a
    :class:`Fp16RangeWarning`; the input model is not modified.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    clamped = out_of_fp16_range(model)
    if clamped:
        warnings.warn(
            f"{len(clamped)} tensors exceed float16's range and are clamped to +-{FP16_MAX:.0f}: " + ", ".join(clamped),
            Fp16RangeWarning,
            stacklevel=2,
        )
    # the converter edits its argument in place, and reads every weight: a model whose weights
    # stay on disk is converted from an inlined copy (its float32 weights once, plus the result)
    work = inlined(model) if is_lazy(model) else _copy_of(model)
    converted = convert_float_to_float16(work, keep_io_types=keep_io_float32)
    _sort_topologically(converted.graph)
    return converted


def _copy_of(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def out_of_fp16_range(model: onnx.ModelProto) -> list[str]:
    """Float32 weights and constants with finite values beyond float16's range, described."""
    found = []
    for name, tensor in _float_constants(model):
        values = to_array(tensor)
        finite = np.abs(values[np.isfinite(values)]) if values.size else values
        peak = float(finite.max()) if finite.size else 0.0
        if peak > FP16_MAX:
            found.append(f"'{name}' (max |x| {peak:.1e})")
    return found


def _float_constants(model: onnx.ModelProto):
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            yield tensor.name, tensor
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                    yield node.output[0], attr.t


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """The converter appends its Casts at the end of the node list; the checker wants producers
    first. Kahn's algorithm, always taking the earliest ready node, keeps the original order
    wherever it was already valid (and the output deterministic)."""
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    waiting_on = [
        {producer[name] for name in _consumed(node) if name in producer} - {i} for i, node in enumerate(nodes)
    ]
    consumers: dict[int, list[int]] = {}
    for i, producers in enumerate(waiting_on):
        for p in producers:
            consumers.setdefault(p, []).append(i)
    ready = [i for i, producers in enumerate(waiting_on) if not producers]
    heapify(ready)
    order = []
    while ready:
        i = heappop(ready)
        order.append(i)
        for consumer in consumers.get(i, ()):
            waiting_on[consumer].discard(i)
            if not waiting_on[consumer]:
                heappush(ready, consumer)
    placed = set(order)
    order += [i for i in range(len(nodes)) if i not in placed]  # a cycle: left for the checker to report
    graph.ClearField("node")
    graph.node.extend(nodes[i] for i in order)


def _consumed(node: onnx.NodeProto):
    """Names a node reads, including outer-scope names read inside its subgraphs."""
    yield from node.input
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                yield from _consumed(inner)


def validate_fp16(fp32_model: onnx.ModelProto, fp16_model: onnx.ModelProto, seed: int = 0) -> ExportCheck:
    """The onnx checker passes; onnxruntime runs both models on the same sample inputs; I/O names
    and shapes match; outputs agree within ``FP16_TOLERANCE`` of the float32 output's largest
    magnitude, are finite, and no float16 activation overflows.

    onnxruntime's CPU provider has no float16 kernels on x86: it computes such graphs in float32
    behind Casts, which alone would measure only the weights' rounding. Every float16 activation is
    therefore also requested as an output: onnxruntime then stores each one as float16 and feeds
    that copy on (checked on 1.31: the error equals a graph rounding after every op), which is what
    float16 hardware does while accumulating in float32. A value beyond +-65504 reads back as inf,
    so overflow is caught too.
    """
    result = ExportCheck("float16", FP16_TOLERANCE, clamped=out_of_fp16_range(fp32_model))
    _onnx_check(fp16_model, result)
    refuse_oversized(fp32_model)
    feeds = sample_inputs(fp32_model, seed)
    watched = _float16_activations(fp16_model)
    try:
        reference, finite_in_fp32 = _run_watching(fp32_model, feeds, watched)
    except RunTimeout:
        raise
    except Exception as exc:  # onnxruntime raises several unrelated types
        result.problems.append(f"onnxruntime cannot run the float32 model: {one_line(exc)}")
        return result
    try:
        outputs, finite_in_fp16 = _run_watching(fp16_model, feeds, watched)
        result.runs = True
    except RunTimeout:
        raise
    except Exception as exc:
        result.problems.append(f"onnxruntime cannot run the float16 model: {one_line(exc)}")
        return result
    result.io_match = _declared_io(fp32_model) == _declared_io(fp16_model) and same_shapes(reference, outputs)
    if not result.io_match:
        result.problems.append("input/output names or shapes differ from the float32 model")
    result.overflows = [
        name for name, finite in finite_in_fp16.items() if not finite and finite_in_fp32.get(name, True)
    ]
    if result.overflows:
        result.problems.append(
            f"activation '{result.overflows[0]}' overflows float16 (beyond +-{FP16_MAX:.0f}) "
            f"on the sample inputs ({len(result.overflows)} tensors in all)"
        )
    _compare(reference, outputs, result)
    return result


def _onnx_check(model: onnx.ModelProto, result: ExportCheck) -> None:
    complaint = checker_complaint(model, full_check=True)
    result.checker = "checker ok" if complaint is None else "checker failed"
    if complaint is not None:
        result.problems.append(f"onnx checker: {complaint}")


def _float16_activations(fp16_model: onnx.ModelProto) -> set[str]:
    graph = fp16_model.graph
    constant = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    return {
        info.name
        for info in graph.value_info
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 and info.name not in constant
    }


def _run_watching(model: onnx.ModelProto, feeds: dict[str, np.ndarray], watched: set[str]):
    """The model's outputs, and for each watched activation it computes, whether all its values
    are finite (in the model's own type: float16 in a float16 model), from one onnxruntime run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    produced = [name for node in model.graph.node for name in node.output if name in watched]
    # declared without a type: onnxruntime gives each tensor its own
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in produced)
    sess = session(probe)
    values = outputs_of(sess, _feeds_for(sess, feeds))
    outputs = [info.name for info in model.graph.output]
    return {name: values[name] for name in outputs}, {name: bool(np.isfinite(values[name]).all()) for name in produced}


def _feeds_for(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same sample values, cast to float16 where the session takes float16."""
    return {
        i.name: feeds[i.name].astype(np.float16) if i.type == "tensor(float16)" else feeds[i.name]
        for i in sess.get_inputs()
    }


def _declared_io(model: onnx.ModelProto) -> tuple:
    initializers = {t.name for t in model.graph.initializer}

    def shape(info):
        return tuple(d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim)

    return (
        [(i.name, shape(i)) for i in model.graph.input if i.name not in initializers],
        [(o.name, shape(o)) for o in model.graph.output],
    )


def _compare(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], result: ExportCheck) -> None:
    if not same_shapes(reference, outputs):
        return  # already reported as an I/O mismatch; values of different shapes do not compare
    broken = newly_nonfinite(reference, outputs)
    if broken:
        result.problems.append(
            f"{result.target} outputs contain inf or NaN where the reference's are finite ({', '.join(broken)})"
        )
        return
    result.max_rel_error = relative_error(reference, outputs)
    if not result.max_rel_error <= result.tolerance:  # NaN included
        clamped = f"; clamped: {', '.join(result.clamped)}" if result.clamped else ""
        result.problems.append(
            f"outputs differ from the float32 model (rel. error {result.max_rel_error:.2e} "
            f"> {result.tolerance:.0e}){clamped}"
        )


Source = onnx.ModelProto | Path  # in memory, or a file (a model with external data)


def to_ort(model: Source, out_path: Path, seed: int = 0, check: bool = True) -> ExportCheck | None:
    """Write ``model`` to ``out_path`` in onnxruntime's ORT format, as the conversion tool does
    (CPU provider, ``ORT_ENABLE_ALL`` fixed optimisations, its portability exclusions).

    With ``check``, the written file is loaded back and compared with the .onnx model
    (:func:`validate_ort`) before it takes its place; a failed check raises ``ValidationError``,
    a write failure ``OutputError``, and either leaves nothing behind. Weights kept as external
    data end up inside the one ORT file.
    """
    out_path = Path(out_path)
    staging = None
    try:
        with deferred():  # a signal here would leave the folder unrecorded
            staging = _staging_dir(out_path)
        source = model
        if isinstance(model, onnx.ModelProto) and is_lazy(model):  # onnxruntime reads its weights from files
            source = write_external(model, staging, "source.onnx")
        staged = staging / out_path.name
        _convert(source, staged, out_path)
        result = validate_ort(source, staged, seed) if check else None
        if result is not None:
            result.raise_if_failed()
        _fsync(staged)
        refuse_special(out_path)  # again: the path may have changed since the run began
        with deferred():  # once in place, the file is complete: a signal waits until after
            os.replace(staged, out_path)
        return result
    except OSError as exc:
        raise OutputError(f"{out_path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if staging is not None:
            remove_quietly(staging)


def _staging_dir(out_path: Path) -> Path:
    """A private folder beside the output, so the final rename stays on one file system."""
    parent = out_path.parent if str(out_path.parent) else Path(".")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=parent))
    except OSError as exc:
        raise OutputError(f"{out_path}: cannot write ({exc.strerror or exc})") from exc


def _convert(source: Source, staged: Path, out_path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(staged)
    options.add_session_config_entry("session.save_model_format", "ORT")
    # the tool's default: int8 QDQ kept as uint8, which every CPU runs fast ("1" only for --target_platform arm)
    options.add_session_config_entry("session.qdqisint8allowed", "0")
    serialized = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    try:
        ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"], disabled_optimizers=_NOT_PORTABLE)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OutputError(f"{out_path}: cannot convert to ORT format ({one_line(exc)})") from exc


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def validate_ort(model: Source, ort_path: Path, seed: int = 0) -> ExportCheck:
    """The file is in ORT format; onnxruntime loads it; its inputs and outputs (names, types,
    shapes) are the .onnx model's; outputs on the same sample inputs agree within ``ORT_TOLERANCE``.

    ``model`` is the .onnx model in memory, or its path (a model with external data).
    """
    import onnxruntime as ort

    result = ExportCheck("ORT", ORT_TOLERANCE)
    ort_path = Path(ort_path)
    with open(ort_path, "rb") as handle:
        identified = handle.read(8)[4:8] == ORT_IDENTIFIER
    result.checker = "ORT flatbuffer" if identified else "not an ORT file"
    if not identified:
        result.problems.append(f"{ort_path.name} does not carry the ORT format identifier")
        return result
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    refuse_oversized(proto)
    feeds = sample_inputs(proto, seed)
    try:
        onnx_session = session(model)
        reference, onnx_io = outputs_of(onnx_session, feeds), _session_io(onnx_session)
        del onnx_session  # one session of a large model at a time
    except RunTimeout:
        raise
    except Exception as exc:
        result.problems.append(f"onnxruntime cannot run the .onnx model: {one_line(exc)}")
        return result
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.add_session_config_entry("session.load_model_format", "ORT")  # whatever the file is called
        ort_session = ort.InferenceSession(str(ort_path), options, providers=["CPUExecutionProvider"])
        outputs = outputs_of(ort_session, feeds)
        result.runs = True
    except RunTimeout:
        raise
    except Exception as exc:
        result.problems.append(f"onnxruntime cannot run the ORT file: {one_line(exc)}")
        return result
    result.io_match = _session_io(ort_session) == onnx_io and same_shapes(reference, outputs)
    if not result.io_match:
        result.problems.append("input/output names, types or shapes differ from the .onnx model")
    _compare(reference, outputs, result)
    return result


def _session_io(sess) -> tuple:
    return (
        [(i.name, i.type, i.shape) for i in sess.get_inputs()],
        [(o.name, o.type, o.shape) for o in sess.get_outputs()],
    )


@own_context
def export(
    model: onnx.ModelProto,
    target: str | os.PathLike,
    *,
    ort_format: bool = False,
    fp16: bool = False,
    fp16_io: str = "float32",
    seed: int = 0,
    check: bool = True,
    run_timeout: float = RUN_TIMEOUT,
    data_path: str | os.PathLike | None = None,
) -> list[ExportCheck]:
    """Convert a (validated) pruned model as asked, validate each conversion, and write it
    atomically to ``target``: ``.onnx`` (external data beside it when large, in ``data_path``
    if given) or ORT format.

    Returns the checks that ran, in order; raises ``ValidationError`` when one fails (nothing is
    written then) and ``OutputError`` when writing fails. Each run of a check stops after
    ``run_timeout`` seconds (0: no limit) with ``spa.core.runlimit.RunTimeout``.
    """
    target = Path(target)
    if fp16_io not in FP16_IO:
        raise UsageError(f"--fp16-io must be one of {', '.join(FP16_IO)}, got '{fp16_io}'")
    set_timeout(run_timeout)
    checks = []
    if fp16:
        set_stage("float16 check")
        converted = to_fp16(model, keep_io_float32=fp16_io == "float32")
        if check:
            checks.append(validate_fp16(model, converted, seed))
            checks[-1].raise_if_failed()
        model = converted
    if ort_format:
        set_stage("ORT check")
        ort_check = to_ort(model, target, seed, check)
        checks += [ort_check] if ort_check else []
    else:
        save_model(model, target, data_path)
    return checks
