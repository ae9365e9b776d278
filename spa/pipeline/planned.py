"""Stage: decide which units go, by ratio (per name pattern, if asked) or by searching for a target.

A ``PrunePlan`` is immutable and inspectable: ``plan.groups`` lists each planned group with the
units it loses and the layers it slices, and ``plan.drop(group_id)`` is the same plan without one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spa.analysis.groups import Analysis, Group
from spa.core import feeds as feed_spec
from spa.core.errors import UsageError
from spa.core.graph import ModelGraph
from spa.core.runlimit import own_context, set_timeout
from spa.core.runtime import resolve_providers, sample_inputs
from spa.core.signals import ScratchDirectory
from spa.formats.model import Model, Progress, say
from spa.formats.shapes import infer_shapes, with_input_sizes
from spa.pipeline.options import CutOptions, PlanOptions
from spa.pipeline.pruned import PrunedModel, cut
from spa.pipeline.reports import Timer
from spa.planning.plan import Plan, make_plan
from spa.planning.search import (
    LatencyMeter,
    RoundToOutcome,
    Target,
    TargetOutcome,
    pick_round_to,
    reach_latency,
    reach_structural,
)
from spa.reporting.group_layers import group_layers, weight_readers
from spa.reporting.metrics import ModelStats, count
from spa.transforms.cut import apply_plan

if TYPE_CHECKING:
    from spa.pipeline.scored import ScoredModel


@dataclass(frozen=True)
class PlannedGroup:
    """One group the plan cuts."""

    id: int
    units: int  # the group's units: the smallest sets of channels that can go together
    removed: np.ndarray  # the unit labels that go
    layers: list[str]  # the weighted ops whose weights it slices, with the side
    exact: bool  # removal equals zeroing the units: soft == hard is checked on it


@dataclass(frozen=True)
class PrunePlan:
    """The units to remove per group, and how the ratio was reached."""

    scored: ScoredModel
    options: PlanOptions  # with the ratio and multiple a search settled on
    units: Plan = field(repr=False)  # group id -> unit labels to remove
    target: TargetOutcome | None = None  # how the ratio was searched, when a target was given
    round_to_auto: RoundToOutcome | None = None  # what round_to="auto" measured
    seconds: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def groups(self) -> list[PlannedGroup]:
        analysis, op_types = self.scored.analyzed.analysis, self.scored.analyzed.model.op_types
        planned = []
        for gid, units in self.units.removed.items():
            group = analysis.group(gid)
            planned.append(PlannedGroup(gid, group.size, units, group_layers(analysis, group, op_types), group.exact))
        return planned

    def drop(self, group_id: int) -> PrunePlan:
        """This plan without group ``group_id``: its units stay."""
        if group_id not in self.units.removed:
            planned = ", ".join(map(str, self.units.removed)) or "none"
            raise UsageError(f"group {group_id} is not in the plan (planned groups: {planned})")
        return replace(self, units=self.units.restricted_to(g for g in self.units.removed if g != group_id))

    def apply(
        self,
        compensate: bool | None = None,
        refit: str | None = None,
        *,
        soft: bool | None = None,
        options: CutOptions | None = None,
        progress: Progress | None = None,
    ) -> PrunedModel:
        """Refit the weights left (``compensate``, by ``refit``; see ``CutOptions``) and cut."""
        base = options or CutOptions()
        options = replace(
            base,
            compensate=base.compensate if compensate is None else compensate,
            refit=base.refit if refit is None else refit,
            soft=base.soft if soft is None else soft,
        )
        return cut(self, options, progress)


@own_context
def plan(scored: ScoredModel, options: PlanOptions, progress: Progress | None = None) -> PrunePlan:
    """The plan ``options`` ask for: their ratio, or the one a target search finds."""
    run, analyzed = scored.run, scored.analyzed
    set_timeout(run.run_timeout)
    feed_spec.use(scored.feeds)
    timer = Timer(scored.seconds)
    group_ratios = ratios_by_group(analyzed.analysis, options.ratios)
    candidates = Candidates(
        analyzed.model,
        analyzed.analysis,
        scored.scores,
        options.global_rank,
        analyzed.dense,
        not scored.comparable,
        analyzed.sizes,
        group_ratios,
    )
    target, ratio = options.target, options.ratio
    # None: "auto" (the one string PlanOptions allows), settled below by timing candidates
    round_to = options.round_to if isinstance(options.round_to, int) else None
    rounding, outcome = None, None
    if target is not None or round_to is None:
        say(progress, "search")
        meter = None
        if round_to is None or (target is not None and target.metric == "latency"):
            meter = candidates.meter(resolve_providers(list(run.providers) or ["cpu"])[0], run)
        if round_to is None:
            probe_ratio = ratio if target is None else candidates.structural_guess(target, 1)
            assert meter is not None  # made just above for "auto"
            rounding = pick_round_to(probe_ratio, candidates.hard, meter)
            round_to = rounding.chosen
        outcome = candidates.reach(target, round_to, meter) if target else None
        ratio = outcome.ratio if outcome else ratio
        timer.lap("search")
    settled = replace(options, ratio=ratio, round_to=round_to)
    return PrunePlan(scored, settled, candidates.plan(ratio, round_to), outcome, rounding, dict(timer.seconds))


def ratios_by_group(analysis: Analysis, ratios: Mapping[str, float]) -> dict[int, float]:
    """Group id -> ratio, for the prunable groups a pattern of ``ratios`` matches (on the names of
    the weighted ops the group slices); where several match, the pattern given last wins."""
    if not ratios:
        return {}
    names = {node.name for node in analysis.graph.nodes}
    for pattern in ratios:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise UsageError(f"--ratio-for {pattern}: the pattern matches no node of the model")
    chosen = {}
    for group in analysis.prunable_groups:
        layers = layer_names(analysis, group)
        for pattern, ratio in ratios.items():
            if any(fnmatch.fnmatchcase(name, pattern) for name in layers):
                chosen[group.id] = ratio  # a later pattern overrides an earlier one
    return chosen


def layer_names(analysis: Analysis, group: Group) -> list[str]:
    """The names of the weighted ops whose weights ``group`` slices."""
    return list(
        dict.fromkeys(
            node.name for member in analysis.param_dims(group) for node, _ in weight_readers(analysis.graph, member)
        )
    )


def units_to_remove(
    analysis: Analysis,
    scores: dict[int, np.ndarray],
    ratio: float,
    global_rank: bool,
    round_to: int,
    normalise: bool,
    group_ratios: dict[int, float] | None = None,
) -> Plan:
    """``make_plan``, with the groups of ``group_ratios`` at their own ratio (each group ranked on
    its own: per-group ratios and a global ranking are refused together)."""
    if not group_ratios:
        return make_plan(analysis, scores, ratio, global_rank, round_to, normalise)
    removed: dict[int, np.ndarray] = {}
    for each in sorted({ratio, *group_ratios.values()}):
        planned = make_plan(analysis, scores, each, False, round_to, normalise)
        removed.update((gid, units) for gid, units in planned.removed.items() if group_ratios.get(gid, ratio) == each)
    return Plan({g.id: removed[g.id] for g in analysis.prunable_groups if g.id in removed})


class Candidates:
    """Candidate cuts of one scored model, for the searches of :mod:`spa.planning.search`."""

    def __init__(
        self,
        model: Model,
        analysis: Analysis,
        scores: dict[int, np.ndarray],
        global_rank: bool,
        dense: ModelStats,
        normalise: bool,
        sizes: dict[str, list[int]] | None = None,
        group_ratios: dict[int, float] | None = None,
    ):
        self.model, self.analysis, self.scores, self.global_rank = model, analysis, scores, global_rank
        self.dense, self.normalise, self.sizes, self.group_ratios = dense, normalise, sizes, group_ratios
        self._workdirs: list[ScratchDirectory] = []

    def plan(self, ratio: float, round_to: int) -> Plan:
        return units_to_remove(
            self.analysis, self.scores, ratio, self.global_rank, round_to, self.normalise, self.group_ratios
        )

    def hard(self, ratio: float, round_to: int) -> onnx.ModelProto:
        """The cut at ``ratio``, in the input's format: what latency is timed on."""
        m = self.model
        spill = None
        if m.lazy:  # written to scratch folders that last as long as the search
            self._workdirs.append(ScratchDirectory())
            spill = Path(self._workdirs[-1].name) / "candidate.onnx.data"
        return m.derived(
            apply_plan(m.proto, m.graph, self.analysis, self.plan(ratio, round_to), m.opset, spill=spill)
        ).as_input_format

    def kept(self, metric: str, ratio: float, round_to: int) -> float:
        """The fraction of the dense FLOPs or params a candidate keeps, counted on a weightless cut."""
        m = self.model
        cut = apply_plan(m.proto, m.graph, self.analysis, self.plan(ratio, round_to), m.opset, shapes_only=True)
        graph = ModelGraph(with_input_sizes(cut, self.sizes) if self.sizes else infer_shapes(cut))
        stats = count(graph, self.analysis.registry)
        return getattr(stats, metric) / max(getattr(self.dense, metric), 1)

    def structural_guess(self, target: Target, round_to: int) -> float:
        """The ratio meeting a FLOPs or params target; for latency, the ratio keeping that share of
        FLOPs, the usual first guess (latency seldom falls faster than FLOPs)."""
        metric = "flops" if target.metric == "latency" else target.metric
        return reach_structural(
            metric, target.fraction, lambda r: self.kept(metric, r, round_to), out_of_reach_ok=True
        ).ratio

    def meter(self, provider: str, run) -> LatencyMeter:
        dense = self.model.as_input_format
        feeds = sample_inputs(dense, run.seed, shapes=self.sizes)
        return LatencyMeter(dense, feeds, provider, run.threads, tuple(run.custom_ops))

    def reach(self, target: Target, round_to: int, meter: LatencyMeter | None) -> TargetOutcome:
        if target.metric != "latency":
            return reach_structural(target.metric, target.fraction, lambda r: self.kept(target.metric, r, round_to))
        assert meter is not None  # plan makes one for every latency target
        guess = self.structural_guess(target, round_to)
        return reach_latency(target.fraction, lambda r: meter.fraction(self.hard(r, round_to)), guess, meter.provider)
