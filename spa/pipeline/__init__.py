"""The pipeline as stages a caller can stop between: analyze, score, plan, apply, validate, save.

model = spa.load("m.onnx")
analysis = spa.analyze(model)              # AnalyzedModel: groups, and why the frozen ones are
scores = analysis.score("obspa")           # ScoredModel
plan = scores.plan(ratio=0.4)              # PrunePlan: plan.groups, plan.drop(group_id)
pruned = plan.apply()                      # PrunedModel
pruned.validate()
pruned.save("m.pruned.onnx")
"""

from __future__ import annotations

import os
from dataclasses import replace

import onnx

from spa.core.coupling import HEADS, QUERY_HEADS
from spa.core.runlimit import set_timeout
from spa.core.runtime import check_input_sizes, complete_sizes, resolve_providers
from spa.formats.model import Model, Progress, load
from spa.pipeline.analyzed import AnalyzedModel, analyze
from spa.pipeline.depth import DepthOutcome, depth_first, end_to_end_latency, measure
from spa.pipeline.experts import ExpertRemoval, remove_model_experts
from spa.pipeline.options import CLI_RUN, AnalyzeOptions, CutOptions, PlanOptions, RunOptions, ScoreOptions
from spa.pipeline.planned import PlannedGroup, PrunePlan
from spa.pipeline.pruned import PrunedModel
from spa.pipeline.reports import Timer, count_model
from spa.pipeline.scored import ScoredModel, score
from spa.pipeline.usage import check_calibration_path, check_patterns
from spa.planning import head_unit
from spa.planning.head_unit import AUTO

__all__ = [
    "CLI_RUN",
    "AnalyzeOptions",
    "AnalyzedModel",
    "CutOptions",
    "PlanOptions",
    "PlannedGroup",
    "PrunePlan",
    "PrunedModel",
    "RunOptions",
    "ScoreOptions",
    "ScoredModel",
    "analyze",
    "collects_statistics",
    "prune_model",
]


def collects_statistics(scoring: ScoreOptions, planning: PlanOptions, cutting: CutOptions) -> bool:
    """Whether layer-input statistics are collected: for a data-aware ranking or a refit, and only
    when something goes (or a target will pick another ratio). ``spa sweep`` asks this too, to
    share one scoring between the points that would collect alike."""
    removes = planning.ratio > 0 or planning.target is not None or any(planning.ratios.values())
    return (scoring.data_aware or cutting.compensates(scoring)) and removes


def _remove_whole_parts(
    model: Model,
    groups: AnalyzeOptions,
    scoring: ScoreOptions,
    planning: PlanOptions,
    cutting: CutOptions,
    run: RunOptions,
    progress: Progress | None,
) -> tuple[Model, PlanOptions, DepthOutcome | None, ExpertRemoval | None]:
    """Whole residual blocks, then whole experts, go before the channels: the width stages prune
    what they leave (and a block removed takes its experts with it)."""
    depth = experts = None
    if planning.remove_blocks is not None:
        model, planning, depth = depth_first(model, groups, planning, scoring, cutting, run, progress)
    # the model runs at the sizes asked for and those that follow them: each must fit
    sizes = complete_sizes(model.proto, dict(groups.input_shapes or {}))
    check_input_sizes(model.proto, sizes)
    if planning.remove_experts:
        dense = count_model(model, model.proto, sizes, groups.registry)
        model, experts = remove_model_experts(model, planning.remove_experts, scoring, run, cutting.soft, progress)
        experts.params_before, experts.flops_before = dense.params, dense.flops
    return model, planning, depth, experts


def prune_model(
    source: Model | str | os.PathLike | onnx.ModelProto,
    groups: AnalyzeOptions,
    scoring: ScoreOptions,
    planning: PlanOptions,
    cutting: CutOptions,
    run: RunOptions,
    progress: Progress | None = None,
) -> PrunedModel:
    """Every stage in turn, validated where ``run.check`` says: what ``spa.prune`` and ``spa prune`` run."""
    set_timeout(run.run_timeout)
    resolve_providers(list(run.providers) or ["cpu"])  # one not installed is refused before any work
    check_calibration_path(scoring.calib)
    timer = Timer()
    model = load(source, progress)
    check_patterns(model.graph, "--ratio-for", planning.ratios)  # before the statistics, not after
    given = model
    model, planning, depth, experts = _remove_whole_parts(model, groups, scoring, planning, cutting, run, progress)
    analyzed = nearest_head_unit(analyze(model, groups, progress, timer=timer), planning, progress, timer)
    scored = score(analyzed, scoring, run, collects_statistics(scoring, planning, cutting), progress, timer)
    pruned = scored.plan(options=planning, progress=progress).apply(options=cutting, progress=progress)
    pruned.experts = experts
    pruned.depth = depth
    if run.check:
        pruned.validate(run, progress)
        if depth is not None and pruned.plan.units.removed and scored.calibration and not cutting.soft:
            # the width stages measured against what the blocks left: this is against the model as given
            depth.end_to_end = measure(
                given.proto, pruned.hard.as_input_format, scored.calibration, scoring.calib_samples, run
            )
        if depth is not None and run.bench and not cutting.soft:
            sizes = complete_sizes(given.proto, dict(groups.input_shapes or {}))
            depth.end_to_end_latency = end_to_end_latency(given, pruned.hard, sizes, run)
    return pruned


def nearest_head_unit(
    analyzed: AnalyzedModel, planning: PlanOptions, progress: Progress | None, timer: Timer
) -> AnalyzedModel:
    """With attention units "auto", the model grouped with the unit nearest the ratio: whole KV heads,
    or query heads evenly in every KV group. A target's ratio is found later, on these groups:
    there, and where no attention layer shares its KV heads, whole heads."""
    options = analyzed.options
    if options.attention != AUTO:
        return analyzed
    choice = head_unit.choose(analyzed.analysis, planning.ratio) if planning.target is None else None
    if choice is None:
        return replace(analyzed, options=replace(options, attention=HEADS))
    if choice.unit == QUERY_HEADS:
        analyzed = analyze(analyzed.model, replace(options, attention=QUERY_HEADS), progress, timer=timer)
    return replace(analyzed, options=replace(options, attention=choice.unit), head_unit=choice.describe(planning.ratio))
