"""How far pruning moved the model's outputs, measured on the user's own inputs.

soft == hard proves the cut; it says nothing about what removing channels costs. Without
retraining, that cost is the number a user needs before shipping, and spa can only measure it
where it has real inputs: calibration samples. Synthetic inputs are no measure of it: the refit
is fitted to their statistics, so on PP-OCRv4 rec at ratio 0.3 the outputs keep 91% top-1 agreement
with the dense model on synthetic inputs and 74% on rendered text lines, where exact match is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from spa.core.runtime import batches, outputs_of, session
from spa.ops.linear import Gemm, MatMul
from spa.scoring.statistics import padding_masks, token_mask

# held-out calibration samples measured (beyond those the statistics used), at most
SAMPLES = 256
HELD_OUT = "held-out calibration samples"
# outputs read as class scores, whose argmax is the prediction: their last axis is the class axis
CLASS_SCORE_PRODUCERS = {"Softmax", "LogSoftmax"}
LINEAR_HEADS = {*Gemm.ops, *MatMul.ops, "Add"}


@dataclass
class OutputFidelity:
    # over every sample; [batch, tokens, ...] outputs leave the padded positions out of all three
    name: str
    relative_error: float  # ||pruned - dense|| / ||dense||
    cosine: float  # mean over samples of cos(dense, pruned), each sample's output flattened
    top1_agreement: float | None = None  # class-score outputs only: argmax over the last axis agrees
    # values that are NaN or inf where the dense output is finite (the error is then infinite);
    # where the dense output itself is not finite, the figures leave the position out
    nonfinite: int = 0


@dataclass
class Fidelity:
    source: str  # "held-out calibration samples", or "calibration samples the statistics used"
    samples: int
    outputs: list[OutputFidelity] = field(default_factory=list)
    # positions an attention mask marks as padding (see statistics.token_mask): nothing reads the
    # model's outputs there, so they are left out of the figures
    padded_positions: int = 0


def holdout(feeds: dict[str, np.ndarray], used: int, batch: int = 1) -> tuple[dict[str, np.ndarray], str]:
    """The samples after the first ``used`` (up to SAMPLES; at least ``batch``, the model's static
    batch size), else the first ones, with their source."""
    total = len(next(iter(feeds.values())))
    if total - used >= batch:
        return {k: v[used : used + SAMPLES] for k, v in feeds.items()}, HELD_OUT
    return {k: v[:SAMPLES] for k, v in feeds.items()}, "calibration samples the statistics used"


def measure(
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    source: str,
    custom_ops: tuple[str, ...] = (),
) -> Fidelity:
    dense_out = _outputs(session(dense, custom_ops=custom_ops), dense, feeds)
    pruned_out = _outputs(session(pruned, custom_ops=custom_ops), dense, feeds)
    scores = _class_score_outputs(dense)
    tokens = token_mask(feeds, padding_masks(dense))
    result = Fidelity(
        source,
        len(next(iter(dense_out.values()))) if dense_out else 0,
        padded_positions=int((~tokens).sum()) if tokens is not None else 0,
    )
    for name, reference in dense_out.items():
        got = pruned_out[name]
        if not np.issubdtype(reference.dtype, np.floating) or reference.shape != got.shape or reference.size == 0:
            continue
        ref64, got64 = reference.astype(np.float64), got.astype(np.float64)
        output_tokens = tokens if tokens is not None and ref64.shape[:2] == tokens.shape else None
        if output_tokens is not None:
            kept = output_tokens.reshape(output_tokens.shape + (1,) * (ref64.ndim - 2))
            ref64, got64 = np.where(kept, ref64, 0.0), np.where(kept, got64, 0.0)
        nonfinite = int((~np.isfinite(got64) & np.isfinite(ref64)).sum())
        unmeasured = ~np.isfinite(ref64)  # the dense model's own NaN or inf: nothing to measure against
        if unmeasured.any():
            ref64, got64 = np.where(unmeasured, 0.0, ref64), np.where(unmeasured, 0.0, got64)
        if nonfinite:
            result.outputs.append(OutputFidelity(name, math.inf, math.nan, None, nonfinite))
            continue
        norm = float(np.linalg.norm(ref64))
        error = float(np.linalg.norm(got64 - ref64)) / norm if norm else float(np.linalg.norm(got64) > 0)
        top1 = _top1_agreement(ref64, got64, output_tokens) if name in scores else None
        result.outputs.append(OutputFidelity(name, error, _mean_cosine(ref64, got64), top1))
    return result


def nonfinite_problems(fidelity: Fidelity | None) -> list[str]:
    """Validation problems: outputs the pruned model turns to NaN or inf on the user's own inputs."""
    if fidelity is None:
        return []
    broken = [f"{o.name} ({o.nonfinite} values)" for o in fidelity.outputs if o.nonfinite]
    if not broken:
        return []
    return [
        f"the pruned model outputs NaN or inf on {fidelity.source} where the input model's outputs are "
        f"finite: {', '.join(broken)}"
    ]


def _outputs(run, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    parts = [outputs_of(run, feed) for feed in batches(model, feeds)]
    # outputs without a leading sample axis (a scalar loss, a shape) are not compared
    return {
        name: np.concatenate([p[name] for p in parts])
        for name, first in (parts[0] if parts else {}).items()
        if first.ndim
    }


def _mean_cosine(reference: np.ndarray, got: np.ndarray) -> float:
    a, b = reference.reshape(len(reference), -1), got.reshape(len(got), -1)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    norms = norm_a * norm_b
    both_zero = (norm_a == 0) & (norm_b == 0)
    cosines = np.where(norms > 0, np.einsum("ij,ij->i", a, b) / np.where(norms > 0, norms, 1.0), both_zero * 1.0)
    return float(cosines.mean())


def _top1_agreement(reference: np.ndarray, got: np.ndarray, tokens: np.ndarray | None = None) -> float | None:
    if reference.ndim < 2 or reference.shape[-1] < 2:
        return None
    agree = reference.argmax(-1) == got.argmax(-1)
    if tokens is not None and agree.ndim >= 2:
        agree = agree[tokens]  # the real positions, each with the axes after [batch, tokens]
    return float(agree.mean()) if agree.size else None


def _class_score_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs that hold class scores on their last axis: a softmax over it, or a [batch, classes]
    linear head. Others (embeddings, feature maps, boxes) get no argmax agreement: it means nothing."""
    producers = {o: n for n in model.graph.node for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    default_axis = -1 if opset >= 13 else 1  # Softmax's axis default changed in opset 13
    found = set()
    for info in model.graph.output:
        node = producers.get(info.name)
        if node is None:
            continue
        rank = len(info.type.tensor_type.shape.dim) if info.type.tensor_type.HasField("shape") else None
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), default_axis)
        if node.op_type in CLASS_SCORE_PRODUCERS and (axis == -1 or (rank is not None and axis == rank - 1)):
            found.add(info.name)
        elif node.op_type in LINEAR_HEADS and rank == 2:
            found.add(info.name)
    return found
