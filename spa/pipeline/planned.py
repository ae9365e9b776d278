"""Stage: decide which units go, by ratio (per name pattern, if asked) or by searching for a target.

A ``PrunePlan`` is immutable and inspectable: ``plan.groups`` lists each planned group with the
units it loses and the layers it slices, and ``plan.drop(group_id)`` is the same plan without one.
"""

from __future__ import annotations

import fnmatch
import math
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
from spa.core.runtime import MAX_INPUT_ELEMENTS, feed_shapes, resolve_providers, sample_inputs
from spa.core.signals import ScratchDirectory
from spa.formats.model import Progress, say
from spa.formats.shapes import infer_shapes, with_input_sizes
from spa.pipeline.options import CutOptions, PlanOptions
from spa.pipeline.pruned import PrunedModel, cut
from spa.pipeline.reports import Timer
from spa.planning.allocate import Trajectory
from spa.planning.plan import Plan, keep_count, make_plan, plan_from_keeps
from spa.planning.search import MAX_RATIO, LatencyMeter, Target, TargetOutcome, reach_latency, reach_structural
from spa.planning.widths import WidthTable, measure_table
from spa.reporting.group_layers import group_layers, weight_readers
from spa.reporting.metrics import count
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
    widths: WidthTable | None = None  # the layers' measured width curves (round_to="auto")
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
    """The plan ``options`` ask for: their ratio, or the point a target search finds.

    With ``round_to="auto"`` (the default) the layers' width curves are measured first: each group
    keeps a count off the spikes of its curves, and a latency target or ``global_rank`` spends the
    cut where it buys the most time per importance lost (``spa.planning.allocate``)."""
    run, analyzed = scored.run, scored.analyzed
    set_timeout(run.run_timeout)
    feed_spec.use(scored.feeds)
    timer = Timer(scored.seconds)
    candidates = Candidates(scored, options, ratios_by_group(analyzed.analysis, options.ratios))
    provider = resolve_providers(list(run.providers) or ["cpu"])[0]
    if options.round_to == "auto":
        say(progress, "widths")
        candidates.measure_widths(provider, run, lambda done, total: say(progress, "widths", done, total))
        timer.lap("widths")
    target, ratio, outcome = options.target, options.ratio, None
    if target is not None:
        say(progress, "search")
        if target.metric != "latency" and candidates.can_allocate:
            outcome = candidates.reach_fastest(target, provider, run)
        else:
            outcome = candidates.reach(target, candidates.meter(provider, run) if target.metric == "latency" else None)
        ratio = outcome.ratio
        timer.lap("search")
    settled = replace(options, ratio=ratio)
    return PrunePlan(scored, settled, candidates.plan(ratio), outcome, candidates.table, dict(timer.seconds))


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
    """Candidate cuts of one scored model, for the searches of :mod:`spa.planning.search`.

    A candidate is named by a ratio. Without a width table, with a ratio per group, or for a FLOPs
    or params target, it is each group's share removed (counts off the table's spikes); with a
    table and a latency target or ``global_rank``, it is how far along the latency-aware
    trajectory to go (``ratio / MAX_RATIO`` of its steps; for ``global_rank`` without a target, the
    share of all units removed). A FLOPs target on the trajectory was measured to give less speed
    per FLOP than one ratio on kernel-friendly counts (ResNet-50: 1.82x against 1.97x at half the
    FLOPs, one thread): the isolated timings favour cutting the early, high-resolution layers."""

    def __init__(self, scored: ScoredModel, options: PlanOptions, group_ratios: dict[int, float] | None = None):
        analyzed = scored.analyzed
        self.model, self.analysis, self.scores = analyzed.model, analyzed.analysis, scored.scores
        self.dense, self.normalise, self.sizes = analyzed.dense, not scored.comparable, analyzed.sizes
        self.options, self.group_ratios = options, group_ratios
        self.round_to = options.round_to if isinstance(options.round_to, int) else 1
        self.table: WidthTable | None = None
        self._trajectory: Trajectory | None = None
        self.allocate_structural = False  # a FLOPs or params target on the trajectory (``reach_fastest``)
        self._workdirs: list[ScratchDirectory] = []

    def measure_widths(self, provider: str, run, progress=None) -> None:
        """The width table at the sizes latency is timed at; none for a model too large to run there."""
        sizes = feed_shapes(self.model.proto, self.sizes)
        if any(math.prod(shape) > MAX_INPUT_ELEMENTS for shape in sizes.values()):
            return
        sized = ModelGraph(with_input_sizes(self.model.proto, sizes))
        self.table = measure_table(self.analysis, sized, self.dense.node_flops, provider, run.threads, progress)

    @property
    def can_allocate(self) -> bool:
        return self.table is not None and not self.group_ratios

    @property
    def trajectory(self) -> Trajectory | None:
        target = self.options.target
        latency = target is not None and (target.metric == "latency" or self.allocate_structural)
        if self.table is None or self.group_ratios or not (latency or self.options.global_rank):
            return None
        if self._trajectory is None:
            groups = self.analysis.prunable_groups
            self._trajectory = Trajectory(self.table, groups, self.scores, self.normalise)
        return self._trajectory

    def plan(self, ratio: float) -> Plan:
        trajectory = self.trajectory
        if trajectory is not None:
            if self.options.target is None:
                return plan_from_keeps(self.analysis, self.scores, trajectory.keeps_removing(ratio))
            return plan_from_keeps(self.analysis, self.scores, trajectory.keeps_at(ratio / MAX_RATIO))
        if self.table is not None:
            keeps = {}
            for group in self.analysis.prunable_groups:
                wanted = keep_count(group.size, (self.group_ratios or {}).get(group.id, ratio), 1)
                keeps[group.id] = self.table.fast_count(group.id, wanted)
            return plan_from_keeps(self.analysis, self.scores, keeps)
        return units_to_remove(
            self.analysis,
            self.scores,
            ratio,
            self.options.global_rank,
            self.round_to,
            self.normalise,
            self.group_ratios,
        )

    def hard(self, ratio: float) -> onnx.ModelProto:
        """The cut at ``ratio``, in the input's format: what latency is timed on."""
        m = self.model
        spill = None
        if m.lazy:  # written to scratch folders that last as long as the search
            self._workdirs.append(ScratchDirectory())
            spill = Path(self._workdirs[-1].name) / "candidate.onnx.data"
        return m.derived(
            apply_plan(m.proto, m.graph, self.analysis, self.plan(ratio), m.opset, spill=spill)
        ).as_input_format

    def kept(self, metric: str, ratio: float) -> float:
        """The fraction of the dense FLOPs or params a candidate keeps, counted on a weightless cut."""
        m = self.model
        cut = apply_plan(m.proto, m.graph, self.analysis, self.plan(ratio), m.opset, shapes_only=True)
        graph = ModelGraph(with_input_sizes(cut, self.sizes) if self.sizes else infer_shapes(cut))
        stats = count(graph, self.analysis.registry)
        return getattr(stats, metric) / max(getattr(self.dense, metric), 1)

    def structural_guess(self, target: Target) -> float:
        """The ratio meeting a FLOPs or params target; for latency, the ratio keeping that share of
        FLOPs, the usual first guess (latency seldom falls faster than FLOPs)."""
        metric = "flops" if target.metric == "latency" else target.metric
        return reach_structural(metric, target.fraction, lambda r: self.kept(metric, r), out_of_reach_ok=True).ratio

    def meter(self, provider: str, run) -> LatencyMeter:
        dense = self.model.as_input_format
        feeds = sample_inputs(dense, run.seed, shapes=self.sizes)
        return LatencyMeter(dense, feeds, provider, run.threads, tuple(run.custom_ops))

    def reach_fastest(self, target: Target, provider: str, run) -> TargetOutcome:
        """A FLOPs or params target met both ways, one ratio on kernel-friendly counts and the
        latency-aware trajectory, and the one that runs faster kept: across the models of
        tools/bench_latency.py neither wins everywhere (ResNet-50 at half the FLOPs, one thread: one
        ratio 1.97x, the trajectory 1.82x), so the two are timed against each other."""
        uniform = self.reach(target, None)
        uniform_model = self.hard(uniform.ratio)
        self.allocate_structural = True
        allocated = self.reach(target, None)
        allocated_model = self.hard(allocated.ratio)
        one, aware = self.meter(provider, run).medians([uniform_model, allocated_model])
        self.allocate_structural = aware < one
        chosen = allocated if self.allocate_structural else uniform
        chosen.allocation = "latency-aware" if self.allocate_structural else "one ratio"
        chosen.allocation_ms = {"one ratio": round(one, 4), "latency-aware": round(aware, 4)}
        chosen.provider = provider
        return chosen

    def reach(self, target: Target, meter: LatencyMeter | None) -> TargetOutcome:
        if target.metric != "latency":
            return reach_structural(target.metric, target.fraction, lambda r: self.kept(target.metric, r))
        assert meter is not None  # plan makes one for every latency target
        guess = self.structural_guess(target)
        return reach_latency(target.fraction, lambda r: meter.fraction(self.hard(r)), guess, meter.provider)
