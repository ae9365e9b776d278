"""Stage: depth pruning. Find the residual blocks, score them, remove the lowest, prove the result.

Runs before the width stages, on the loaded model; the width stages then work on what it leaves.
The depth-pruned model is not meant to equal the dense one, so its checks are its own: the
checker, a run with finite outputs, for a decoder a prefill and a decode step from its own cache,
and removal == masking (the hard model against the one whose removed branches are multiplied by
zero). With calibration data, the figures of how far the outputs moved from the dense model's
are measured on the held-out samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from spa.analysis.blocks import BlockAnalysis, find_blocks
from spa.core import decoder
from spa.core.errors import UsageError, ValidationError
from spa.core.runtime import batches, complete_sizes, outputs_of, resolve_providers, run, sample_inputs, session
from spa.formats.checker import checker_complaint
from spa.formats.model import Model, Progress, say
from spa.formats.shapes import infer_shapes
from spa.pipeline.options import AnalyzeOptions, CutOptions, PlanOptions, RunOptions, ScoreOptions
from spa.pipeline.reports import count_model
from spa.planning.search import LatencyMeter
from spa.scoring import self_calibration
from spa.scoring.blocks import measure_blocks, score_blocks
from spa.scoring.statistics import load_calibration, synthetic_feeds
from spa.transforms.depth import remove_blocks
from spa.verify import decode, fidelity
from spa.verify.compare import nonfinite_outputs, relative_error
from spa.verify.validate import SOFT_TOLERANCE

# synthetic samples Block Influence is measured on without calibration data
SYNTHETIC_SAMPLES = 16


@dataclass
class DepthOutcome:
    """What depth pruning found, scored, removed and proved."""

    score: str
    source: str  # what the scores were measured on
    blocks: list[dict]  # every block found: name, kind, removable or the reason, score
    removed: list[dict]  # the blocks removed, lowest score first
    removed_layers: list[int]  # their layer numbers, where they read a key/value cache
    checks: dict = field(default_factory=dict)
    fidelity: dict | None = None  # dense vs depth-pruned on held-out calibration samples
    params_before: int = 0  # of the model before the blocks went
    flops_before: int = 0
    # with a width cut too: the final model against the one given, on the same held-out samples
    end_to_end: dict | None = None
    # with a target: the fraction of the depth-pruned model the width cut was asked for
    width_target: float | None = None
    # how many of the removed blocks add back their mean output (compensation with data)
    shifted: int = 0
    # the output error with the means added back ("shifted") and without ("plain"), and the
    # samples it was measured on ("source"), when both were measured
    shift_errors: dict | None = None
    # with a latency target: the latency of the model the blocks left over the model as given
    latency_fraction: float | None = None
    # with latency timed (bench): the written model against the model as given
    end_to_end_latency: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def block_count(asked: float, removable: int) -> int:
    """``asked`` is a count (a whole number) or a fraction of the removable blocks."""
    count = int(asked) if asked >= 1 else math.floor(asked * removable + 0.5)
    if removable == 0:
        raise UsageError("--remove-blocks: the model has no removable residual block (spa analyze lists why)")
    if count > removable:
        raise UsageError(f"--remove-blocks {asked:g}: the model has only {removable} removable residual blocks")
    return max(count, 1)


def listing(found: BlockAnalysis, scores: dict[int, float] | None) -> list[dict]:
    """Each block as the reports list it."""
    return [
        {
            "index": b.index,
            "name": b.name,
            "kind": b.kind,
            "layer": b.layer,
            "removable": b.removable,
            "reason": b.reason,
            "score": (scores or {}).get(b.index),
        }
        for b in found.blocks
    ]


def block_feeds(model: onnx.ModelProto, calib, samples: int, seed: int) -> tuple[dict[str, np.ndarray], str]:
    if calib is not None:
        return load_calibration(calib, model, samples + fidelity.SAMPLES), "calibration"
    return synthetic_feeds(model, SYNTHETIC_SAMPLES, seed), "synthetic"


def _scoring_feeds(model: Model, scoring: ScoreOptions, run_options: RunOptions) -> tuple[dict[str, np.ndarray], str]:
    """The feeds blocks are scored on: calibration data, the decoder's own generated text
    (``--calib-generate``, as the width stages use it), or synthetic inputs."""
    if scoring.calib is None and scoring.calib_generate is not None:
        written = self_calibration.generate(
            model.proto,
            model.path,
            scoring.calib_generate,
            scoring.calib_length,
            run_options.seed,
            scoring.calib_top_k,
            tuple(run_options.custom_ops),
        )
        return written.ids, written.label
    return block_feeds(model.proto, scoring.calib, scoring.calib_samples, run_options.seed)


def remove_depth(
    model: Model,
    plan: PlanOptions,
    scoring: ScoreOptions,
    run_options: RunOptions,
    cutting: CutOptions,
    progress: Progress | None = None,
) -> tuple[Model, DepthOutcome, onnx.ModelProto]:
    """``model`` without its ``plan.remove_blocks`` lowest-scored residual blocks (``cutting.soft``:
    zeroed), and the model with them removed (the same unless soft: a target is counted and timed
    on it). Where compensation is on and there is data, each removed block may add back its mean."""
    assert plan.remove_blocks is not None
    say(progress, "blocks")
    found = find_blocks(model.proto, plan.block_unit)
    removable = found.removable
    count = block_count(plan.remove_blocks, len(removable))
    feeds, source = None, "none"
    # the mean a removed block leaves behind is measured on data only, never on synthetic inputs
    shift = cutting.compensates(scoring) and scoring.has_data
    if plan.block_score != "random" or scoring.calib is not None or shift:  # calibration also measures fidelity
        feeds, source = _scoring_feeds(model, scoring, run_options)
    used = {k: v[: scoring.calib_samples] for k, v in feeds.items()} if feeds is not None else None
    custom_ops = tuple(run_options.custom_ops)
    # one pass measures both the scores and the means
    wanted = used is not None and (plan.block_score != "random" or shift)
    measured = measure_blocks(model.proto, removable, used, custom_ops) if wanted and used is not None else None
    if plan.block_score == "random" or measured is None:
        scores = score_blocks(model.proto, removable, plan.block_score, used, run_options.seed, custom_ops)
    else:
        scores = measured.scores(plan.block_score)
    chosen = sorted(removable, key=lambda b: (scores[b.index], b.index))[:count]
    means = measured.shifts if shift and measured is not None else {}
    shifts = {b.index: means[b.index] for b in chosen if b.index in means}
    shifts, shift_errors, hard, shifted_fidelity = _worth_shifting(
        model.proto, chosen, shifts, feeds, scoring.calib_samples, run_options
    )
    masked = remove_blocks(model.proto, chosen, soft=True, shifts=shifts)
    outcome = DepthOutcome(
        plan.block_score,
        source if plan.block_score != "random" else "none",
        listing(found, scores),
        [{"index": b.index, "name": b.name, "layer": b.layer, "score": scores[b.index]} for b in chosen],
        sorted(b.layer for b in chosen if b.layer is not None),
        shifted=len(shifts),
        shift_errors=shift_errors,
    )
    if run_options.check:
        say(progress, "validate blocks")
        outcome.checks = check_removal(model.proto, hard, masked, run_options)
        if outcome.checks["problems"]:
            raise ValidationError("depth-pruned model failed validation: " + "; ".join(outcome.checks["problems"]))
        if scoring.calib is not None and feeds is not None:  # the choice of means measured it already
            outcome.fidelity = shifted_fidelity or measure(model.proto, hard, feeds, scoring.calib_samples, run_options)
    # the file the model came from is no longer it: nothing may read it in its place
    return replace(model.derived(infer_shapes(masked) if cutting.soft else hard), path=None), outcome, hard


def _worth_shifting(
    dense: onnx.ModelProto, chosen: list, shifts: dict, feeds, used: int, options: RunOptions
) -> tuple[dict, dict | None, onnx.ModelProto, dict | None]:
    """The shifts, kept only when they move the outputs less than plain removal does, on the
    held-out samples (the scoring ones where none are left). A mean can hurt: two neighbouring
    layers of the trained decoder in tools/eval_lm.py reached perplexity 9.22 without their means
    and 11.22 with them. Also returns the errors, the hard model kept and its fidelity figures
    (``measure``'s, on the same samples), where the two were measured."""
    if not shifts or feeds is None:
        return shifts, None, infer_shapes(remove_blocks(dense, chosen, shifts=shifts)), None
    samples, _ = fidelity.holdout(feeds, used)
    reference = _outputs(dense, samples, tuple(options.custom_ops))
    errors: dict = {}
    candidates = {}
    for label, candidate in (("shifted", shifts), ("plain", {})):
        hard = infer_shapes(remove_blocks(dense, chosen, shifts=candidate))
        figures = measure(dense, hard, feeds, used, options, reference)
        outputs = figures["outputs"]
        errors[label] = float(np.mean([o["relative_error"] for o in outputs.values()])) if outputs else math.inf
        errors["source"] = figures["source"]
        candidates[label] = (candidate, hard, figures)
    kept, hard, figures = candidates["shifted" if errors["shifted"] < errors["plain"] else "plain"]
    return kept, errors, hard, figures


def depth_first(
    model: Model,
    groups: AnalyzeOptions,
    planning: PlanOptions,
    scoring: ScoreOptions,
    cutting: CutOptions,
    run_options: RunOptions,
    progress: Progress | None = None,
) -> tuple[Model, PlanOptions, DepthOutcome]:
    """The blocks removed, and the plan options the width stages then take: a FLOPs or params
    target is of the model as given, so the width cut is asked for what is left of it."""
    sizes = complete_sizes(model.proto, dict(groups.input_shapes or {}))
    before = count_model(model, model.proto, sizes, groups.registry)
    given = model
    model, depth, hard = remove_depth(model, planning, scoring, run_options, cutting, progress)
    depth.params_before, depth.flops_before = before.params, before.flops
    if planning.target is not None and planning.target.metric == "latency":
        say(progress, "time blocks")
        depth.latency_fraction = blocks_latency(given, model.derived(hard), sizes, run_options)
        planning, depth.width_target = width_target(planning, 1.0, depth.latency_fraction)
    elif planning.target is not None:
        left = count_model(model, hard, sizes, groups.registry)
        metric = planning.target.metric
        figures = (before.flops, left.flops) if metric == "flops" else (before.params, left.params)
        planning, depth.width_target = width_target(planning, *figures)
    return model, planning, depth


def blocks_latency(given: Model, left: Model, sizes: dict, run_options: RunOptions) -> float:
    """The latency of the model the blocks left over the model's as given, timed alternately on
    the first provider at the sizes the width search times."""
    _, given_ms, left_ms = latencies(given, left, sizes, run_options)
    return left_ms / given_ms


def latencies(given: Model, left: Model, sizes: dict, run_options: RunOptions) -> tuple[str, float, float]:
    """The first provider, and the median ms of the model as given and of ``left`` timed
    alternately on it."""
    provider = resolve_providers(list(run_options.providers) or ["cpu"])[0]
    dense = given.as_input_format
    feeds = sample_inputs(dense, run_options.seed, shapes=sizes)
    meter = LatencyMeter(dense, feeds, provider, run_options.threads, tuple(run_options.custom_ops))
    given_ms, left_ms = meter.medians([dense, left.as_input_format])
    return provider, given_ms, left_ms


def end_to_end_latency(given: Model, final: Model, sizes: dict, run_options: RunOptions) -> dict:
    """The written model against the model as given: the width stage's own timing is against what
    the blocks left, and with blocks alone it would compare that model with itself."""
    provider, given_ms, final_ms = latencies(given, final, sizes, run_options)
    return {"provider": provider, "given_ms": given_ms, "pruned_ms": final_ms, "speedup": given_ms / final_ms}


def width_target(planning: PlanOptions, before: float, after: float) -> tuple[PlanOptions, float | None]:
    """A FLOPs, params or latency target is a fraction of the model before the blocks went: the
    width cut is asked for what is left of it, as a fraction of the model the blocks left (none
    where the blocks alone met it). Returns the plan options and that fraction."""
    target = planning.target
    if target is None or after <= 0:
        return planning, None
    fraction = target.fraction * before / after
    left: float | None = fraction if fraction < 1 else None
    asked = {metric: left if metric == target.metric else None for metric in ("flops", "params", "latency")}
    ratio = planning.ratio if left is not None else 0.0
    return (
        replace(
            planning,
            ratio=ratio,
            target_flops=asked["flops"],
            target_params=asked["params"],
            target_latency=asked["latency"],
        ),
        min(fraction, 1.0),
    )


def check_removal(dense: onnx.ModelProto, hard: onnx.ModelProto, masked: onnx.ModelProto, options: RunOptions) -> dict:
    """Checker, a finite run, a decode step from the model's own cache, removal == masking."""
    problems: list[str] = []
    complaint = checker_complaint(hard, full_check=True)
    if complaint is not None:
        problems.append(f"onnx checker: {complaint}")
    seed, custom_ops = options.seed, tuple(options.custom_ops)
    checks: dict = {"checker": complaint or "ok", "runs": False, "decode_checked": False, "soft_max_rel_error": None}
    try:
        hard_out: list[dict[str, np.ndarray]]
        masked_out: list[dict[str, np.ndarray]]
        if decoder.layout(hard) is not None:  # a prefill, then a decode step fed its own cache
            hard_out, masked_out = (list(decode.steps(m, seed, custom_ops)) for m in (hard, masked))
            checks["decode_checked"] = True
        else:
            feed = sample_inputs(hard, seed)
            hard_out, masked_out = ([run(m, feed, custom_ops)] for m in (hard, masked))
        checks["runs"] = True
    except Exception as exc:  # the model spa wrote does not run: a failed validation, not bad input
        problems.append(f"the depth-pruned model does not run: {str(exc).splitlines()[0]}")
        return {**checks, "problems": problems}
    for step in hard_out:
        broken = nonfinite_outputs(step)
        if broken:
            problems.append(f"the depth-pruned model outputs NaN or inf ({', '.join(broken)})")
    presents = set(decoder.cache_names([i.name for i in masked.graph.input], [o.name for o in masked.graph.output]))
    error = max(
        relative_error({k: v for k, v in m.items() if k not in presents}, h) for m, h in zip(masked_out, hard_out)
    )
    checks["soft_max_rel_error"] = error
    if not error <= SOFT_TOLERANCE:
        problems.append(f"removing the blocks differs from zeroing them (relative error {error:.2e})")
    return {**checks, "problems": problems}


def measure(
    dense: onnx.ModelProto,
    hard: onnx.ModelProto,
    feeds: dict,
    used: int,
    options: RunOptions,
    reference: dict[str, np.ndarray] | None = None,
) -> dict:
    """Relative error, mean cosine and top-1 agreement of the outputs other than the cache, dense
    against depth-pruned, on the held-out samples (those the scores read when none are left).
    ``reference``: the dense outputs on those samples, where already run."""
    samples, where = fidelity.holdout(feeds, used)
    custom_ops = tuple(options.custom_ops)
    if reference is None:
        reference = _outputs(dense, samples, custom_ops)
    outputs = [reference, _outputs(hard, samples, custom_ops)]
    figures = {}
    for name, expected in outputs[0].items():
        got = outputs[1].get(name)
        if got is None or got.shape != expected.shape or not np.issubdtype(expected.dtype, np.floating):
            continue
        ref, new = expected.astype(np.float64), got.astype(np.float64)
        flat_ref, flat_new = ref.reshape(len(ref), -1), new.reshape(len(new), -1)
        norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_new, axis=1)
        cosine = float(np.mean(np.sum(flat_ref * flat_new, axis=1) / np.where(norms > 0, norms, 1.0)))
        figures[name] = {
            "relative_error": float(np.linalg.norm(new - ref) / (np.linalg.norm(ref) or 1.0)),
            "cosine": cosine,
            "top1_agreement": float(np.mean(ref.argmax(-1) == new.argmax(-1))) if ref.ndim >= 2 else None,
        }
    return {"source": where, "samples": len(next(iter(samples.values()))), "outputs": figures}


def _outputs(model: onnx.ModelProto, feeds: dict, custom_ops: tuple[str, ...]) -> dict[str, np.ndarray]:
    cache = decoder.layout(model)
    presents = set(cache.past.values()) if cache else set()
    sess = session(model, custom_ops=custom_ops)
    parts = [outputs_of(sess, feed) for feed in batches(model, feeds)]
    return {
        name: np.concatenate([p[name] for p in parts])
        for name, first in (parts[0] if parts else {}).items()
        if first.ndim and name not in presents
    }


def removable_blocks(model: Model, block_score: str, calib, samples: int, seed: int, unit: str = "layer") -> list[dict]:
    """The blocks ``spa analyze`` lists: every one found, removable ones with their scores."""
    found = find_blocks(model.proto, unit)
    if not found.removable:
        return listing(found, None)
    feeds = None
    if block_score != "random":
        feeds, source = block_feeds(model.proto, calib, samples, seed)
        if source == "calibration":  # the samples after these measure fidelity
            feeds = {k: v[:samples] for k, v in feeds.items()}
    return listing(found, score_blocks(model.proto, found.removable, block_score, feeds, seed))
