"""Prove the pruned model is a valid model, equal to the input where the cut is exact."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from spa.core import decoder, runlimit
from spa.core.errors import UsageError
from spa.core.runtime import (
    Source,
    complete_sizes,
    format_sizes,
    has_free_axes,
    one_line,
    proto_of,
    run_all,
    run_each,
    sample_inputs,
)
from spa.formats import nbits
from spa.formats.checker import checker_complaint, runtime_onnx_domain_ops
from spa.verify import decode
from spa.verify.compare import newly_nonfinite, nonfinite_outputs, relative_error, same_shapes
from spa.verify.fidelity import Fidelity

# soft == hard is checked to this relative error (the exactness contract: below 1e-4)
SOFT_TOLERANCE = 1e-4


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
    latency_asked: bool = False  # whether latency was to be timed (it is not for a model that failed)
    latency_at: dict[str, list[int]] = field(default_factory=dict)  # the input sizes latency was timed at
    sizes: list[dict[str, list[int]]] = field(default_factory=list)  # the input sizes the checks ran at
    # float outputs of the input model holding NaN or inf on the sample inputs: compared where finite
    dense_nonfinite: list[str] = field(default_factory=list)
    nonfinite_weights: list[str] = field(default_factory=list)  # pruned weights holding NaN or inf
    # a decoder with its cache as graph I/O ran a prefill and a decode step fed its own cache
    decode_checked: bool = False
    changed_io: list[str] = field(default_factory=list)  # graph I/O whose declared shapes the cut changed
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data


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
    an output without a shape, or an op onnxruntime registers in the ONNX domain that onnx does not
    know, stops it early, so the model is then checked again with those set aside."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return None
    except Exception as exc:  # the checker raises several unrelated types
        text = str(exc)
        runtime_op = any(f"No Op registered for {op} " in text for op in runtime_onnx_domain_ops())
        if "Field 'shape' of 'type' is required" not in text and not runtime_op:
            return one_line(exc)
    return checker_complaint(onnx.load(str(path), load_external_data=False))


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
    dense_proto = proto_of(dense)
    try:
        feeds, dense_out = _dense_outputs(dense, dense_proto, seed, custom_ops, sizes)
        result.dense_runs = True
    except runlimit.RunTimeout:
        raise
    except _DenseFails as exc:
        result.dense_error = f"onnxruntime cannot run the input model: {one_line(exc.cause)}"
        result.problems.append(result.dense_error)
        return result
    result.sizes = [{name: list(value.shape) for name, value in feed.items()} for feed in feeds]
    step(2, total)
    try:
        pruned_out = run_all(pruned, feeds, custom_ops)
        result.runs = True
    except runlimit.RunTimeout:
        raise
    except Exception as exc:
        result.problems.append(f"onnxruntime cannot run the pruned model: {one_line(exc)}")
        return result
    step(3, total)
    resized = _resized_cache(result, dense_proto, proto_of(pruned), dense_out, pruned_out)
    _compare_outputs(result, dense_proto, proto_of(pruned), dense_out, pruned_out, removed_anything)
    pruned_steps = decode.check(result, dense, pruned, seed, custom_ops)
    step(4, total)
    if soft is not None and hard_exact is not None:
        precise, made = _full_precision(soft), []
        if precise is not None:
            given = (soft, hard_exact)
            soft, hard_exact = _at_full_precision(soft), _at_full_precision(hard_exact)
            made = [m for m, g in zip((soft, hard_exact), given) if isinstance(m, Path) and m != g]
        soft_out = _without(run_all(soft, feeds, custom_ops, precise), resized)
        reuse = hard_exact is pruned and precise is None
        hard_out = _without(pruned_out if reuse else run_all(hard_exact, feeds, custom_ops, precise), resized)
        dense_out = _without(dense_out, resized)
        err, result.soft_compared_before = _soft_hard_error(
            soft, hard_exact, feeds, soft_out, hard_out, dense_out, custom_ops, precise
        )
        if pruned_steps is not None:  # the cache a cut shrinks is only read back on a decode step
            hard_steps = pruned_steps if hard_exact is pruned else decode.steps(hard_exact, seed, custom_ops)
            err = max(err, decode.soft_hard_error(soft, hard_steps, seed, custom_ops))
        for beside in made:  # the float-product graphs written beside the models' data
            beside.unlink(missing_ok=True)
        result.soft_max_rel_error = err
        result.soft_equal = err < SOFT_TOLERANCE
        if not result.soft_equal:
            result.problems.append(f"hard-pruned outputs differ from soft-pruned ones (rel. error {err:.2e})")
    step(5, total)
    return result


class _DenseFails(Exception):
    """onnxruntime cannot run the input model at its first sample size (the cause says why)."""

    def __init__(self, cause: Exception):
        super().__init__()
        self.cause = cause


def _dense_outputs(
    dense: Source, dense_proto: onnx.ModelProto, seed: int, custom_ops, sizes: dict[str, list[int]] | None
) -> tuple[list[dict], list[dict]]:
    """The sample feeds the checks run on, and the input model's outputs on each. The sizes the
    user gives replace the made-up first feed: a model that runs only at those is no failure."""
    given = complete_sizes(dense_proto, sizes)
    feeds = [sample_inputs(dense_proto, seed, shapes=given) if sizes else sample_inputs(dense_proto, seed)]
    extra = []
    if has_free_axes(dense_proto):
        # other sizes, where a size hard-coded by mistake fails: batch 2, then batch 3 with the other
        # free axes (sequence) at 7, where attention over several positions tells heads apart
        extra = [sample_inputs(dense_proto, seed + 1, batch=2), sample_inputs(dense_proto, seed + 2, batch=3, length=7)]
    try:
        dense_out = run_all(dense, feeds, custom_ops)
    except runlimit.RunTimeout:
        raise
    except Exception as exc:
        if sizes:
            raise UsageError(
                f"the input model does not run at the --input-shape sizes ({format_sizes(given)}): {one_line(exc)}"
            ) from None
        raise _DenseFails(exc) from exc
    for feed, out in zip(extra, run_each(dense, extra, custom_ops)):
        if out is not None:  # a size the dense model itself refuses (an image too small) is no test
            feeds.append(feed)
            dense_out.append(out)
    return feeds, dense_out


def _resized_cache(
    result: Validation, dense: onnx.ModelProto, pruned: onnx.ModelProto, dense_out: list[dict], pruned_out: list[dict]
) -> set[str]:
    """The cache outputs whose head axis the cut shrank, taken out of ``dense_out`` and
    ``pruned_out`` (the heads left are compared through the logits, on a decode step too); the
    graph I/O whose declared shapes changed goes to ``result.changed_io``."""
    cache = decoder.layout(dense)
    if cache is None:
        return set()
    presents = set(cache.past.values())
    resized = {
        name
        for d, p in zip(dense_out, pruned_out)
        for name in presents & set(d) & set(p)
        if d[name].shape != p[name].shape and _same_but_heads(d[name].shape, p[name].shape)
    }
    result.changed_io = decoder.changed_io(dense, pruned)
    for outputs in (dense_out, pruned_out):
        outputs[:] = _without(outputs, resized)
    return resized


def _same_but_heads(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) == 4 and a[:1] + a[2:] == b[:1] + b[2:]


def _without(outputs: list[dict], names: set[str]) -> list[dict]:
    return [{k: v for k, v in out.items() if k not in names} for out in outputs] if names else outputs


def _compare_outputs(
    result: Validation,
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    dense_out: list[dict],
    pruned_out: list[dict],
    removed_anything: bool,
) -> None:
    """NaN or inf the input model does not output, the same I/O, and (nothing removed) the same outputs."""
    result.dense_nonfinite = list(dict.fromkeys(n for out in dense_out for n in nonfinite_outputs(out)))
    broken = list(dict.fromkeys(n for d, p in zip(dense_out, pruned_out) for n in newly_nonfinite(d, p)))
    if broken:
        result.problems.append(
            f"the pruned model outputs NaN or inf where the input model's outputs are finite ({', '.join(broken)})"
        )
    same_inputs = [i.name for i in dense.graph.input] == [i.name for i in pruned.graph.input]
    result.io_match = same_inputs and all(same_shapes(d, p) for d, p in zip(dense_out, pruned_out))
    if not result.io_match:
        result.problems.append("input/output names or shapes differ from the dense model")
    if not removed_anything:
        result.dense_equal = relative_error(dense_out[0], pruned_out[0]) == 0.0
        if not result.dense_equal:
            result.problems.append("nothing was removed but outputs differ from the dense model")


# Element-wise ops whose float32 results onnxruntime computes to about 1e-7 absolute, whatever their
# size: a sigmoid of 1e-4 (PP-OCRv4 det's probability map on random input) moves by 5e-4 of itself when
# its input moves by one ulp. On such an output, soft and hard are compared on the op's input instead:
# the op is the same in both, so agreement there proves the cut, and the output check only measured
# the kernel's rounding.
SQUASHING = {"Sigmoid", "Tanh", "Softmax", "LogSoftmax", "HardSigmoid", "Erf", "Exp"}


def _soft_hard_error(
    soft: Source, hard: Source, feeds, soft_out, hard_out, dense_out, custom_ops, precise=None
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
    soft_in = run_all(_with_outputs(soft, inner), feeds, custom_ops, precise)
    hard_in = run_all(_with_outputs(hard, inner), feeds, custom_ops, precise)
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


# onnxruntime's block-quantized matrix products may round their activations to 8 bits
# (MatMulNBits at accuracy_level 4, and DequantizeLinear fused with MatMul, at that level unless
# told otherwise): the last-bit differences any cut makes (a sum over fewer terms) then become whole
# rounding steps, 6.7e-4 of the logits of a 4-layer Llama. soft == hard is a claim about the cut,
# so it is checked with these products in float.
_BLOCK_PRODUCT = nbits.OP_TYPE
_FLOAT_PRODUCTS = {"session.qdq_matmulnbits_accuracy_level": "0"}


def _full_precision(soft: Source) -> dict[str, str] | None:
    """The session entries that keep block-quantized products in float, where ``soft`` has one."""
    blocked = any(
        node.op_type == _BLOCK_PRODUCT or (node.op_type == "DequantizeLinear" and _attr(node, "block_size"))
        for node in proto_of(soft).graph.node
    )
    return dict(_FLOAT_PRODUCTS) if blocked else None


def _at_full_precision(source: Source) -> Source:
    """``source`` with its MatMulNBits computing in float (accuracy_level 0); a model with external
    data gets a graph beside its own, so that the data it names is found."""
    proto = proto_of(source)
    if not any(node.op_type == _BLOCK_PRODUCT and _attr(node, "accuracy_level") > 1 for node in proto.graph.node):
        return source
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in copy.graph.node:
        if node.op_type == _BLOCK_PRODUCT:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
    if isinstance(source, onnx.ModelProto):
        return copy
    beside = source.with_name(f".{source.stem}.float-products.onnx")
    beside.write_bytes(copy.SerializeToString())
    return beside


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)
