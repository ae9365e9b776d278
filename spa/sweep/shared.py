"""Points run in one process share what they can: the points that rank channels alike (the same
analysis and scoring options, and statistics or none) are analyzed and scored once, then each is planned, cut and
measured on its own. The figures are those of pruning each point from the file."""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import groupby

from spa.core.errors import SpaError
from spa.core.runlimit import own_context, set_timeout
from spa.formats.model import load
from spa.pipeline import PrunedModel, ScoredModel, analyze, collects_statistics
from spa.pipeline.scored import score
from spa.sweep.grid import Point, SweepSpec
from spa.sweep.point import run_options, run_point, stage_options
from spa.sweep.runner import failed


@own_context
def run_shared(spec: SweepSpec, points: list[Point], done: Callable[[dict], None]) -> None:
    def ranking(point: Point) -> tuple:
        grouping, scoring, planning, cutting = stage_options(spec, point)
        return repr(grouping), repr(scoring), collects_statistics(scoring, planning, cutting)

    for _, members in groupby(sorted(points, key=ranking), key=ranking):
        group = list(members)
        grouping, scoring, planning, cutting = stage_options(spec, group[0])
        set_timeout(spec.run_timeout)
        try:
            # analyzed afresh for each scoring: scorings cache per-layer systems on the analysis
            analyzed = analyze(load(spec.model), grouping)
            scored = score(analyzed, scoring, run_options(spec), collects_statistics(scoring, planning, cutting))
        except SpaError as exc:
            for point in group:
                done(failed(spec, point, str(exc)))
            continue
        for point in group:
            done(run_point(spec, point, functools.partial(_cut, scored, spec, point)))


def _cut(scored: ScoredModel, spec: SweepSpec, point: Point) -> PrunedModel:
    set_timeout(spec.run_timeout)
    _, _, planning, cutting = stage_options(spec, point)
    pruned = scored.plan(options=planning).apply(options=cutting)
    pruned.validate(run_options(spec))
    return pruned
