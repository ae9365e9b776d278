"""Points run in one process share what they can: the points that rank channels alike (one
criterion, and statistics or none) are analyzed and scored once, then each is planned, cut and
measured on its own. The figures are those of pruning each point from the file."""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import groupby

from spa.core.errors import SpaError
from spa.core.runlimit import own_context, set_timeout
from spa.formats.model import load
from spa.pipeline import AnalyzeOptions, CutOptions, PrunedModel, ScoredModel, ScoreOptions, analyze
from spa.pipeline.scored import score
from spa.sweep.grid import Point, SweepSpec
from spa.sweep.point import plan_options, run_options, run_point
from spa.sweep.runner import failed


def needs_statistics(spec: SweepSpec, point: Point) -> bool:
    """Whether layer-input statistics are collected for ``point``: as ``prune_model`` decides."""
    scoring = ScoreOptions(point.criterion, spec.calib, spec.calib_samples)
    removes = (point.ratio or 0) > 0 or point.target_flops is not None
    return (scoring.data_aware or CutOptions(point.compensate).compensates(scoring)) and removes


@own_context
def run_shared(spec: SweepSpec, points: list[Point], done: Callable[[dict], None]) -> None:
    def ranking(point: Point) -> tuple[str, bool]:
        return point.criterion, needs_statistics(spec, point)

    for (criterion, statistics), members in groupby(sorted(points, key=ranking), key=ranking):
        group = list(members)
        set_timeout(spec.run_timeout)
        try:
            # analyzed afresh for each scoring: scorings cache per-layer systems on the analysis
            analyzed = analyze(load(spec.model), AnalyzeOptions())
            scored = score(
                analyzed, ScoreOptions(criterion, spec.calib, spec.calib_samples), run_options(spec), statistics
            )
        except SpaError as exc:
            for point in group:
                done(failed(spec, point, str(exc)))
            continue
        for point in group:
            done(run_point(spec, point, functools.partial(_cut, scored, spec, point)))


def _cut(scored: ScoredModel, spec: SweepSpec, point: Point) -> PrunedModel:
    set_timeout(spec.run_timeout)
    pruned = scored.plan(options=plan_options(spec, point)).apply(options=CutOptions(point.compensate))
    pruned.validate(run_options(spec))
    return pruned
