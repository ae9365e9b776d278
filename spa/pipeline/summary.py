"""What a prune did to accuracy and speed, in the terms a user decides on.

The report's other fields say what was cut and proved; these say whether the result is worth
using: how accuracy was (or was not) measured, at which input sizes each figure was taken, and
whether the pruned model runs faster, with what to try when it does not. ``spa prune`` prints
them and ``--json`` carries them, from this one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spa.core.runtime import counted_sizes, resolve_providers, unsized_axes
from spa.verify.fidelity import HELD_OUT, Fidelity
from spa.verify.validate import Validation

if TYPE_CHECKING:
    from spa.pipeline.pruned import PrunedModel

# a pruned model this much faster (or slower) than the dense one, by median latency, is called
# so; closer than that is within what two timings of the same model differ by
SPEED_MARGIN = 0.05
# FLOPs falling less than this leave latency where it was, whatever the channel multiple
SMALL_FLOPS_CUT = 0.10


@dataclass
class StatisticsSource:
    source: str  # "calibration", "synthetic" or "none"
    samples: int = 0
    data: str | None = None  # the calibration data (path or reader), or the synthetic input prior
    why_none: str | None = None  # where no statistics were collected


@dataclass
class Accuracy:
    measured: bool
    source: str | None = None  # the samples it was measured on (``spa.verify.fidelity``)
    samples: int = 0
    optimistic: bool = False  # measured on samples the refit fitted, none held out
    top1_agreement: float | None = None  # lowest over class-score outputs
    cosine: float | None = None  # lowest over outputs
    relative_error: float | None = None  # highest over outputs
    why_not: str | None = None
    remedy: str | None = None  # the option that measures it


@dataclass
class InputSizes:
    flops: dict[str, list[int]] = field(default_factory=dict)  # free axes past the batch at 1
    validation: list[dict[str, list[int]]] = field(default_factory=list)
    latency: dict[str, list[int]] = field(default_factory=dict)
    free_axes: list[str] = field(default_factory=list)  # axes no --input-shape sized: each figure picks its own


@dataclass
class Speed:
    timed: bool
    provider: str | None = None  # the first provider timed (the CPU)
    dense_ms: float | None = None
    pruned_ms: float | None = None
    speedup: float | None = None
    verdict: str | None = None  # "faster", "no faster" or "slower"
    why_not: str | None = None
    advice: list[str] = field(default_factory=list)  # options to try when it is not faster


@dataclass
class Summary:
    statistics: StatisticsSource
    accuracy: Accuracy
    sizes: InputSizes
    speed: Speed


def summarize(pruned: PrunedModel, calib_label: str | None) -> Summary:
    scored = pruned.plan.scored
    analyzed = scored.analyzed
    validation = pruned.validation
    sizes = InputSizes(
        counted_sizes(analyzed.model.proto, analyzed.sizes),
        validation.sizes,
        validation.latency_at,
        unsized_axes(analyzed.model.proto, analyzed.sizes),
    )
    return Summary(
        statistics_source(pruned, calib_label),
        accuracy(validation, calib_label is not None),
        sizes,
        speed(pruned),
    )


def statistics_source(pruned: PrunedModel, calib_label: str | None) -> StatisticsSource:
    scored = pruned.plan.scored
    stats = scored.statistics
    if stats is not None:
        data = calib_label if stats.source == "calibration" else stats.prior
        return StatisticsSource(stats.source, stats.samples, data)
    if not scored.options.data_aware and not pruned.options.compensates(scored.options):
        why = "the criterion reads the weights alone"
    elif not pruned.plan.units.removed:
        why = "nothing was removed"
    elif scored.analyzed.model.lazy:
        why = "the model has external data"
    else:
        why = "onnxruntime could not run the model on synthetic inputs"
    return StatisticsSource("none", why_none=why)


def accuracy(validation: Validation, calibrated: bool) -> Accuracy:
    measured = validation.fidelity
    if measured is not None and measured.outputs:
        return _measured(measured)
    if not calibrated:
        return Accuracy(False, why_not="no calibration data", remedy="--calib DATA")
    if validation.checker == "not run":
        return Accuracy(False, why_not="validation was skipped", remedy="leave out --no-validate")
    return Accuracy(False, why_not="no float output of the model could be compared on the calibration samples")


def _measured(fidelity: Fidelity) -> Accuracy:
    outputs = fidelity.outputs
    agreements = [o.top1_agreement for o in outputs if o.top1_agreement is not None]
    return Accuracy(
        True,
        fidelity.source,
        fidelity.samples,
        fidelity.source != HELD_OUT,
        min(agreements) if agreements else None,
        min(o.cosine for o in outputs),
        max(o.relative_error for o in outputs),
        remedy=None if fidelity.source == HELD_OUT else "more calibration samples than --calib-samples",
    )


def speed(pruned: PrunedModel) -> Speed:
    validation = pruned.validation
    if not validation.latency:
        return Speed(False, why_not=_why_not_timed(pruned))
    first = validation.latency[0]
    result = Speed(
        True,
        first["provider"],
        first["dense_ms"],
        first["pruned_ms"],
        first["speedup"],
        verdict(first["speedup"]),
    )
    if result.verdict != "faster" and pruned.plan.units.removed:
        result.advice = advice_for(pruned)
    return result


def verdict(speedup: float) -> str:
    if speedup >= 1 + SPEED_MARGIN:
        return "faster"
    if speedup <= 1 - SPEED_MARGIN:
        return "slower"
    return "no faster"


def advice_for(pruned: PrunedModel) -> list[str]:
    """``speed_advice`` for what ``pruned`` did: its options, and how far its FLOPs fell."""
    dense, after = pruned.plan.scored.analyzed.dense, pruned.after
    flops_cut = 1 - after.flops / dense.flops if dense.flops else 0.0
    return speed_advice(pruned.plan.options, pruned.plan.widths is not None, flops_cut)


def speed_advice(options, measured_widths: bool, flops_cut: float) -> list[str]:
    """What spa's options can do for a pruned model that is not faster."""
    advice = []
    if flops_cut < SMALL_FLOPS_CUT:
        advice.append(f"FLOPs fell only {flops_cut:.0%}, too little to show in latency: a higher --ratio removes more")
    if not measured_widths:
        advice.append("--round-to auto times each layer's widths and keeps counts the kernels run fast")
    if options.target_latency is None:
        advice.append("--target-latency F searches for the ratio that reaches a latency goal")
    return advice


def slower_than_dense(pruned: PrunedModel) -> str | None:
    """What to tell a user whose pruned model runs slower than the dense one on the provider spa
    timed for them (the first asked for), beyond timing noise; None when it is not."""
    latency = pruned.validation.latency if pruned.validation else []
    providers = pruned.plan.scored.run.providers
    timed = resolve_providers(list(providers) or ["cpu"])[0]
    pair = next((p for p in latency if p["provider"] == timed), None)
    if pair is None or not pair["slower"] or not pruned.plan.units.removed:
        return None
    where = timed.replace("ExecutionProvider", "")
    return (
        f"the pruned model is slower than the dense one on {where}: {pair['dense_ms']:.2f} ms -> "
        f"{pair['pruned_ms']:.2f} ms ({pair['speedup']:.2f}x); nothing written. "
        + "; ".join(advice_for(pruned) + ["--allow-slower writes it anyway"])
    )


def _why_not_timed(pruned: PrunedModel) -> str:
    validation = pruned.validation
    if validation.checker == "not run":
        return "validation was skipped"
    if not validation.latency_asked:
        return "not asked"
    if pruned.dense.lazy:
        return "the model has external data"
    return "the pruned model failed validation"
