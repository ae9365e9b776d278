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
from spa.pipeline.options import CLI_RUN, AnalyzeOptions, CutOptions, PlanOptions, RunOptions, ScoreOptions
from spa.pipeline.planned import PlannedGroup, PrunePlan
from spa.pipeline.pruned import PrunedModel
from spa.pipeline.reports import Timer
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
    "prune_model",
]


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
    # the model runs at the sizes asked for and those that follow them: each must fit
    check_input_sizes(model.proto, complete_sizes(model.proto, dict(groups.input_shapes or {})))
    analyzed = nearest_head_unit(analyze(model, groups, progress, timer=timer), planning, progress, timer)
    removes = planning.ratio > 0 or planning.target is not None or any(planning.ratios.values())
    # nothing to rank or refit when nothing goes (unless a target will pick another ratio)
    statistics = (scoring.data_aware or cutting.compensates(scoring)) and removes
    scored = score(analyzed, scoring, run, statistics, progress, timer)
    pruned = scored.plan(options=planning, progress=progress).apply(options=cutting, progress=progress)
    if run.check:
        pruned.validate(run, progress)
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
