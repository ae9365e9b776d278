"""The Python API: ``spa.analyze`` and ``spa.prune``. The CLI is a thin layer over these.

The whole pipeline, in order: load -> graph -> groups -> score -> plan -> cut -> validate.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from spa.analysis.groups import Analysis, Group, find_groups
from spa.analysis.layers import LayerIndex
from spa.core.errors import ModelLoadError, UsageError, ValidationError
from spa.core.graph import ModelGraph
from spa.core.runlimit import RUN_TIMEOUT, RunTimeout, own_context, set_stage, set_timeout
from spa.core.runtime import (
    check_input_sizes,
    complete_sizes,
    counted_sizes,
    one_line,
    refuse_oversized,
    resolve_providers,
    sample_inputs,
    unsized_axes,
)
from spa.core.signals import ScratchDirectory
from spa.core.tensors import is_lazy, write_beside_data, write_external
from spa.formats.canonicalize import canonicalize
from spa.formats.load import load_model
from spa.formats.qoperator import Expansion, expand
from spa.formats.shapes import check_sizes, infer_shapes, with_input_sizes
from spa.ops.base import ATTENTION_UNITS, rule_for
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
from spa.reporting.group_layers import group_layers, is_ffn  # noqa: F401  (is_ffn: re-exported for the CLI)
from spa.reporting.metrics import ModelStats, bodies, count
from spa.scoring.criteria import CRITERIA, ScoreContext
from spa.scoring.statistics import (
    Statistics,
    choose_prior,
    collect,
    load_calibration,
    prior_probe_samples,
    static_batch,
    synthetic_feeds,
    synthetic_sample_count,
)
from spa.transforms.compensate import Compensation
from spa.transforms.compensate import compensate as layerwise_refit
from spa.transforms.cut import apply_plan, soft_transform
from spa.transforms.sequential import sequential_refit
from spa.verify import fidelity
from spa.verify.bench import compare
from spa.verify.compare import nonfinite_weights
from spa.verify.validate import Validation, validate

# how compensation refits: see ``prune``
REFITS = ("auto", "sequential", "layerwise")
# progress(stage, done, total): called when a stage starts (0 of total) and as it advances
Progress = Callable[[str, int, int], None]


@dataclass
class GroupReport:
    id: int
    channels: int  # units: the smallest sets of indices that can go together
    removed: int
    exact: bool
    frozen: str | None
    layers: list[str]  # weighted ops whose weights this group slices, with the side
    dims: list[str]
    kind: str | None = None  # "heads", "head_dim" or "query_heads": the units of an attention layer, as measured
    heads: int | None = None  # on the graph; heads counts query heads
    head_dim: int | None = None
    kv_heads: int | None = None  # grouped-query attention: K/V heads, each shared by heads / kv_heads query heads
    approximate: str | None = None  # why removal is not equal to zeroing (the norms over these channels)

    @classmethod
    def of(cls, analysis: Analysis, group: Group, removed: int, op_types: dict[str, str]) -> GroupReport:
        head = group.attention
        return cls(
            group.id,
            group.size,
            removed,
            group.exact,
            group.frozen,
            group_layers(analysis, group, op_types),
            [str(d) for d in group.dims],
            head and head.kind,
            head and head.heads,
            head and head.head_dim,
            head and head.kv_heads,
            group.inexact_reason,
        )


@dataclass
class AnalysisReport:
    model: str
    groups: list[GroupReport]
    params: int
    flops: int
    analysis: Analysis = field(repr=False, compare=False)
    stats: ModelStats | None = field(default=None, repr=False, compare=False)
    flops_at: dict[str, list[int]] = field(default_factory=dict)  # input sizes the FLOPs are counted at
    unsized_axes: list[str] = field(default_factory=list)  # free axes past the batch FLOPs count as 1
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # the sizes the caller gave
    unruled_weights: dict[str, int] = field(default_factory=dict)  # op type -> nodes holding weights no rule reads

    @property
    def prunable(self) -> list[GroupReport]:
        return [g for g in self.groups if g.frozen is None and g.channels > 1]

    def as_dict(self) -> dict:
        costs = self.stats or ModelStats(self.params, self.flops)
        return {
            "model": self.model,
            "params": self.params,
            "flops": self.flops,
            "flops_at": self.flops_at,
            "unsized_axes": self.unsized_axes,
            "input_shapes": self.input_shapes,
            "flops_uncounted": costs.uncounted(),
            "flops_by_op_type": costs.per_op_type(),
            "nodes": [asdict(n) for n in costs.nodes],
            "groups_found": len(self.groups),
            "groups_prunable": len(self.prunable),
            "unruled_weights": self.unruled_weights,
            "groups": [asdict(g) for g in self.groups],
        }


@dataclass
class PruneReport:
    model: str
    options: dict
    groups_found: int
    groups_prunable: int
    groups_pruned: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    validation: Validation
    seconds: dict[str, float]
    groups: list[GroupReport]
    target: TargetOutcome | None = None  # how the ratio was searched, when a target was given
    round_to_auto: RoundToOutcome | None = None  # what --round-to auto measured
    statistics: dict | None = None  # where layer-input statistics came from (Statistics.summary)
    compensation: dict | None = None  # what the weight refit did (Compensation.as_dict)
    fallback_groups: int = 0  # groups a data-aware criterion scored by l2: no linear layer reads them
    flops_at: dict[str, list[int]] = field(default_factory=dict)  # input sizes the FLOPs are counted at
    unsized_axes: list[str] = field(default_factory=list)  # free axes past the batch FLOPs count as 1
    flops_uncounted: dict[str, int] = field(default_factory=dict)  # op type -> nodes of unknown shape (dense)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["validation"] = self.validation.as_dict()
        return data


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: PruneReport
    # for models with external data, the cut tensors live in this folder (removed with the result)
    workdir: ScratchDirectory | None = field(default=None, repr=False, compare=False)


@dataclass
class _Prepared:
    name: str
    model: onnx.ModelProto
    graph: ModelGraph
    opset: int
    path: Path | None  # the file it came from, if any
    # quantized ops spa works on in their QDQ form (``spa.formats.qoperator``); the pruned models go back
    expansion: Expansion = field(default_factory=Expansion)
    source: onnx.ModelProto | None = None  # the model as given, where ``model`` is its expanded form

    @property
    def dense(self) -> onnx.ModelProto:
        """The dense model as given: what the pruned one is validated and timed against."""
        return self.model if self.source is None else self.source

    def written(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A model cut from ``model`` in the ops the input came in."""
        return self.expansion.fuse(model)

    def with_weights(self, model: onnx.ModelProto) -> _Prepared:
        return replace(self, model=model, graph=ModelGraph(model))


def _prepare(model_or_path, progress: Progress | None) -> _Prepared:
    if isinstance(model_or_path, onnx.ModelProto):
        name, model, path = model_or_path.graph.name or "<model>", model_or_path, None
    else:
        name, path = str(model_or_path), Path(model_or_path)
        _say(progress, "load")
        model = load_model(model_or_path)
    model = canonicalize(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    source, expansion = None, Expansion()
    if not is_lazy(model):
        expanded, expansion = expand(model, opset)
        if expansion:
            source, model = model, expanded
    model = infer_shapes(model)
    check_sizes(model)
    return _Prepared(name, model, ModelGraph(model), opset, path, expansion, source)


def _say(progress: Progress | None, stage: str, done: int = 0, total: int = 1) -> None:
    set_stage(stage)  # what a run of the model that outlasts --run-timeout was doing
    if progress is not None:
        progress(stage, done, total)


def analyze(
    model_or_path: str | os.PathLike | onnx.ModelProto,
    *,
    exclude: tuple[str, ...] = (),
    approximate: bool = False,
    attention: str = "heads",
    input_shapes: dict[str, list[int]] | None = None,
    progress: Progress | None = None,
) -> AnalysisReport:
    """Find every coupled channel group of a model, and why each frozen one is frozen.

    ``attention`` is the unit of attention layers: whole heads (grouped-query: a KV head with its
    query heads), "head_dim" (one index of head_dim in every head), or "query_heads" (the same
    query head in every KV group). FLOPs are counted with the graph inputs at ``input_shapes``
    (name -> sizes; inputs sharing a symbolic axis follow), free axes otherwise at 1."""
    _check_attention(attention)
    prepared = _prepare(model_or_path, progress)
    check_input_sizes(prepared.model, input_shapes or {})
    _say(progress, "group")
    analysis = find_groups(prepared.graph, prepared.opset, tuple(exclude), approximate, attention)
    stats = _count(prepared, prepared.model, prepared.graph, input_shapes)
    groups = [GroupReport.of(analysis, g, 0, prepared.expansion.op_types) for g in analysis.groups]
    return AnalysisReport(
        prepared.name,
        groups,
        stats.params,
        stats.flops,
        analysis,
        stats,
        counted_sizes(prepared.model, input_shapes),
        unsized_axes(prepared.model, input_shapes),
        dict(input_shapes or {}),
        _unruled_weights(prepared.graph, stats),
    )


def _unruled_weights(graph: ModelGraph, stats: ModelStats) -> dict[str, int]:
    """Op types with no rule that read weights, and how many such nodes: no group starts at them
    and whatever they touch stays whole, so without this line a model of them reads as having
    nothing to prune and no reason why (the QOperator format's QLinearConv, a custom op)."""
    nodes = {node.name: node for node in graph.nodes}
    # a node with bodies counts their weights, which the rules of the ops inside read
    unruled = Counter(
        cost.op_type
        for cost in stats.nodes
        if cost.params and cost.name in nodes and not bodies(nodes[cost.name]) and rule_for(nodes[cost.name]) is None
    )
    return dict(unruled.most_common())


def _count(
    prepared: _Prepared, model: onnx.ModelProto, graph: ModelGraph, sizes: dict[str, list[int]] | None
) -> ModelStats:
    """Params and FLOPs, the FLOPs with the inputs at ``sizes`` (free axes at 1 where none is given);
    each op under the type it has in the model as given."""
    stats = count(ModelGraph(with_input_sizes(model, complete_sizes(model, sizes)))) if sizes else count(graph)
    op_types = prepared.expansion.op_types
    stats.nodes = [replace(node, op_type=op_types.get(node.name, node.op_type)) for node in stats.nodes]
    return stats


@own_context
def prune(
    model_or_path: str | os.PathLike | onnx.ModelProto,
    ratio: float = 0.3,
    criterion: str = "obspa",
    *,
    calib: str | os.PathLike | None = None,
    calib_samples: int = 128,
    compensate: bool | None = None,
    synthetic_samples: int | None = None,
    global_rank: bool = False,
    round_to: int | str = 1,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    exclude: tuple[str, ...] = (),
    soft: bool = False,
    approximate: bool = False,
    seed: int = 0,
    check: bool = True,
    bench: bool = False,
    providers: tuple[str, ...] = ("cpu",),
    threads: int = 0,
    custom_ops: tuple[str, ...] = (),
    attention: str = "heads",
    refit: str = "auto",
    input_shapes: dict[str, list[int]] | None = None,
    progress: Progress | None = None,
    run_timeout: float = RUN_TIMEOUT,
) -> PruneResult:
    """Remove the fraction ``ratio`` of the channels of every prunable group.

    A target (``target_flops``, ``target_params`` or ``target_latency``, each a fraction of the
    dense model's figure) replaces ``ratio`` with the ratio found to meet it: FLOPs and params
    are counted on candidate cuts, latency is timed on the first of ``providers``.
    ``round_to="auto"`` times candidate channel multiples there and keeps the fastest.
    ``bench`` times dense and pruned on the CPU and on every provider named.
    ``input_shapes`` (input name -> sizes; inputs sharing a symbolic axis follow) is the size
    FLOPs are counted at (free axes otherwise count 1), validation also runs at and latency is
    timed at; the statistics keep their own sizes.
    ``attention`` is the unit of attention layers: "heads" removes whole heads (grouped-query:
    a KV head with its query heads), "head_dim" shrinks head_dim evenly in every head,
    "query_heads" removes query heads evenly in every KV group and keeps K and V.

    Data: ``calib`` (an .npz of named input arrays, or a folder of .npy files; the first
    ``calib_samples`` samples are used) feeds the data-driven criteria and compensation; up to
    ``fidelity.SAMPLES`` samples after those measure how far the pruned outputs moved from the dense
    ones (``report.validation.fidelity``; on the samples used when none are left). Without
    it, ``obspa`` and compensation use ``synthetic_samples`` synthetic inputs run through the
    dense model (None: enough for every layer input's X^T X, within a compute budget), image inputs
    drawn from the input prior ``statistics.choose_prior`` finds for the model. ``compensate`` refits the weights left in every layer that loses input channels;
    None (the default) means on with calibration data or a data-aware criterion (obspa ranks
    channels by what compensation can recover), off for magnitude criteria without data, where
    synthetic statistics were measured to mislead the refit (all-MiniLM-L6-v2, FFN only: l1 at ratio 0.3
    fell from 0.735 to 0.120 mean cosine with it). ``refit`` is how: "layerwise" fits each layer to
    the dense model's inputs, "sequential" then refits the layers in graph order on the inputs the
    pruned model gives them (``spa.transforms.sequential``); "auto" is sequential with calibration data (when
    held-out samples are left, whichever of the two moves them less) and layer-wise without.

    Every run of the model (statistics, searches, refit, validation, fidelity, latency) stops after
    ``run_timeout`` seconds (0: no limit) and raises ``spa.core.runlimit.RunTimeout``, a ``ModelLoadError``.

    Returns the pruned model (dense-shaped with zeroed channels if ``soft``) and
    a report. Raises ``UsageError`` for bad options, ``ModelLoadError`` for bad
    input (including a model onnxruntime cannot run) and ``ValidationError``
    when ``check`` is on and a check fails. ``custom_ops`` names onnxruntime
    custom-op libraries to load for validation; none is ever loaded otherwise.
    """
    if not 0 <= ratio < 1:
        raise UsageError(f"--ratio must be in [0, 1), got {ratio}")
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion '{criterion}' (choose from {', '.join(sorted(CRITERIA))})")
    if CRITERIA[criterion].data == "calibration" and calib is None:
        raise UsageError(f"--criterion {criterion} ranks channels by calibration data: give --calib FILE")
    if calib_samples < 1:
        raise UsageError("--calib-samples must be at least 1")
    set_timeout(run_timeout)
    if synthetic_samples is not None and synthetic_samples < 1:
        raise UsageError("synthetic_samples must be at least 1")
    if round_to != "auto" and (not isinstance(round_to, int) or round_to < 1):
        raise UsageError(f"--round-to must be 'auto' or a whole number of at least 1, got {round_to}")
    if compensate is None:
        compensate = calib is not None or CRITERIA[criterion].data is not None
    if refit not in REFITS:
        raise UsageError(f"unknown refit '{refit}' (choose from {', '.join(REFITS)})")
    _check_attention(attention)
    target = _target(target_flops, target_params, target_latency)
    provider_names = resolve_providers(list(providers) or ["cpu"])
    timer = _Timer()
    prepared = _prepare(model_or_path, progress)
    graph, opset = prepared.graph, prepared.opset
    sizes = complete_sizes(prepared.model, input_shapes)
    check_input_sizes(prepared.model, sizes)
    timer.lap("load")
    _say(progress, "group")
    analysis = find_groups(graph, opset, tuple(exclude), approximate, attention)
    timer.lap("group")
    layers = LayerIndex(graph, analysis.labels)
    before = _count(prepared, prepared.model, graph, sizes)
    # nothing to rank or refit at ratio 0 (unless a target will pick another ratio)
    wants_data = (CRITERIA[criterion].data is not None or compensate) and (ratio > 0 or target is not None)
    calibration = _calibration(prepared, calib, calib_samples) if calib is not None else None
    calib_feeds = {k: v[:calib_samples] for k, v in calibration.items()} if calibration else None
    statistics = (
        _statistics(
            prepared, analysis, layers, calib_feeds, synthetic_samples, before.flops, seed, tuple(custom_ops), progress
        )
        if wants_data
        else None
    )
    timer.lap("statistics")
    context = ScoreContext(seed, statistics, layers)
    scores = _score(analysis, criterion, context, progress)
    timer.lap("score")
    normalise = not CRITERIA[criterion].comparable
    candidates = _Candidates(prepared, analysis, scores, global_rank, before, normalise, sizes)
    rounding, outcome = None, None
    if target is not None or round_to == "auto":
        _say(progress, "search")
        meter = None
        if round_to == "auto" or target.metric == "latency":
            meter = candidates.meter(provider_names[0], threads, custom_ops, seed)
        if round_to == "auto":
            probe_ratio = ratio if target is None else candidates.structural_guess(target, 1)
            rounding = pick_round_to(probe_ratio, candidates.hard, meter)
            round_to = rounding.chosen
        outcome = candidates.reach(target, round_to, meter) if target else None
        ratio = outcome.ratio if outcome else ratio
        timer.lap("search")
    plan = make_plan(analysis, scores, ratio, global_rank, round_to, normalise)
    weights, compensation, chosen = prepared, None, None
    if compensate:
        weights, compensation = _compensate(prepared, analysis, layers, plan, statistics)
        if plan.removed and statistics is not None and (refit == "sequential" or (refit == "auto" and calib_feeds)):
            _say(progress, "refit")
            weights, chosen = _sequential(
                prepared,
                weights,
                analysis,
                layers,
                plan,
                calib_feeds or statistics.feeds,
                calibration if refit == "auto" else None,
                calib_samples,
                compensation,
                seed,
                tuple(custom_ops),
            )
        timer.lap("compensate")
    _say(progress, "cut")
    workdir = ScratchDirectory() if is_lazy(prepared.model) else None
    spill = Path(workdir.name) / "pruned.onnx.data" if workdir else None
    hard = (
        chosen.hard
        if chosen
        else infer_shapes(apply_plan(weights.model, weights.graph, analysis, plan, opset, spill=spill))
    )
    after = _count(prepared, hard, ModelGraph(hard), sizes)
    hard = prepared.written(hard)
    # a lazily loaded (large) model is soft-pruned on disk during validation, never in memory
    wanted = soft or (check and not is_lazy(prepared.model))
    soft_model = (
        prepared.written(apply_plan(weights.model, weights.graph, analysis, plan, opset, soft=True)) if wanted else None
    )
    timer.lap("cut")
    validation = Validation()
    if check:
        validation = _validate(
            prepared,
            weights,
            analysis,
            plan,
            hard,
            soft_model,
            seed,
            tuple(custom_ops),
            progress,
            Path(workdir.name) if workdir else None,
            sizes,
        )
        if calibration:
            _say(progress, "fidelity")
            validation.fidelity = (
                chosen.fidelity if chosen else _fidelity(prepared, hard, calibration, calib_samples, tuple(custom_ops))
            )
            validation.problems += fidelity.nonfinite_problems(validation.fidelity)
        if bench:
            _say(progress, "latency")
            validation.latency = _latencies(
                prepared, hard, validation, provider_names, threads, seed, tuple(custom_ops), sizes
            )
        timer.lap("validate")
    report = PruneReport(
        model=prepared.name,
        options={
            "ratio": ratio,
            "criterion": criterion,
            "calib": str(calib) if calib is not None else None,
            "calib_samples": calib_samples,
            "compensate": compensate,
            "global": global_rank,
            "round_to": round_to,
            "exclude": list(exclude),
            "soft": soft,
            "approximate": approximate,
            "seed": seed,
            "attention": attention,
            "refit": refit,
            "input_shapes": sizes,
        },
        groups_found=len(analysis.groups),
        groups_prunable=len(analysis.prunable_groups),
        groups_pruned=len(plan.removed),
        params_before=before.params,
        params_after=after.params,
        flops_before=before.flops,
        flops_after=after.flops,
        validation=validation,
        seconds=timer.seconds,
        groups=[
            GroupReport.of(analysis, g, len(plan.removed.get(g.id, ())), prepared.expansion.op_types)
            for g in analysis.groups
        ],
        target=outcome,
        round_to_auto=rounding,
        statistics=statistics.summary() if statistics else None,
        compensation=compensation.as_dict() if compensation else None,
        fallback_groups=len(context.fallbacks),
        flops_at=counted_sizes(prepared.model, sizes),
        unsized_axes=unsized_axes(prepared.model, sizes),
        flops_uncounted=before.uncounted(),
    )
    if check and not validation.ok:
        raise ValidationError("pruned model failed validation: " + "; ".join(validation.problems))
    return PruneResult(infer_shapes(soft_model) if soft else hard, report, workdir)


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_UNITS:
        raise UsageError(f"attention units must be one of {', '.join(ATTENTION_UNITS)}, got '{attention}'")


def _target(flops: float | None, params: float | None, latency: float | None) -> Target | None:
    given = [
        Target(metric, value)
        for metric, value in (("flops", flops), ("params", params), ("latency", latency))
        if value is not None
    ]
    if len(given) > 1:
        raise UsageError("give one target at a time (--target-flops, --target-params or --target-latency)")
    return given[0] if given else None


class _Candidates:
    """Candidate cuts of one scored model, for the searches of :mod:`spa.planning.search`."""

    def __init__(
        self,
        prepared: _Prepared,
        analysis: Analysis,
        scores: dict[int, np.ndarray],
        global_rank: bool,
        dense: ModelStats,
        normalise: bool,
        sizes: dict[str, list[int]] | None = None,
    ):
        self.prepared, self.analysis, self.scores, self.global_rank, self.dense = (
            prepared,
            analysis,
            scores,
            global_rank,
            dense,
        )
        self.normalise, self.sizes = normalise, sizes

    def plan(self, ratio: float, round_to: int) -> Plan:
        return make_plan(self.analysis, self.scores, ratio, self.global_rank, round_to, self.normalise)

    def hard(self, ratio: float, round_to: int) -> onnx.ModelProto:
        p = self.prepared
        return p.written(apply_plan(p.model, p.graph, self.analysis, self.plan(ratio, round_to), p.opset))

    def kept(self, metric: str, ratio: float, round_to: int) -> float:
        """The fraction of the dense FLOPs or params a candidate keeps, counted on a weightless cut."""
        p = self.prepared
        cut = apply_plan(p.model, p.graph, self.analysis, self.plan(ratio, round_to), p.opset, shapes_only=True)
        stats = count(ModelGraph(with_input_sizes(cut, self.sizes) if self.sizes else infer_shapes(cut)))
        return getattr(stats, metric) / max(getattr(self.dense, metric), 1)

    def structural_guess(self, target: Target, round_to: int) -> float:
        """The ratio meeting a FLOPs or params target; for latency, the ratio keeping that share of
        FLOPs, the usual first guess (latency seldom falls faster than FLOPs)."""
        metric = "flops" if target.metric == "latency" else target.metric
        return reach_structural(
            metric, target.fraction, lambda r: self.kept(metric, r, round_to), out_of_reach_ok=True
        ).ratio

    def meter(self, provider: str, threads: int, custom_ops: tuple[str, ...], seed: int) -> LatencyMeter:
        if is_lazy(self.prepared.model):
            raise UsageError(
                "--target-latency and --round-to auto time the model in memory; models with "
                "external data are not supported by them yet"
            )
        return LatencyMeter(
            self.prepared.dense,
            sample_inputs(self.prepared.dense, seed, shapes=self.sizes),
            provider,
            threads,
            custom_ops,
        )

    def reach(self, target: Target, round_to: int, meter: LatencyMeter | None) -> TargetOutcome:
        if target.metric != "latency":
            return reach_structural(target.metric, target.fraction, lambda r: self.kept(target.metric, r, round_to))
        guess = self.structural_guess(target, round_to)
        return reach_latency(target.fraction, lambda r: meter.fraction(self.hard(r, round_to)), guess, meter.provider)


def _latencies(
    prepared: _Prepared,
    hard: onnx.ModelProto,
    validation: Validation,
    providers: list[str],
    threads: int,
    seed: int,
    custom_ops: tuple[str, ...],
    sizes: dict[str, list[int]],
) -> list[dict]:
    """Dense vs pruned median latency on the CPU and every provider named."""
    if not validation.ok or is_lazy(prepared.model):  # two large sessions at once would double memory
        return []
    feeds = sample_inputs(prepared.dense, seed, shapes=sizes)
    names = list(dict.fromkeys(["CPUExecutionProvider", *providers]))
    return [compare(prepared.dense, hard, feeds, name, threads, custom_ops=custom_ops).as_dict() for name in names]


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 4)
        self._last = now


def _calibration(prepared: _Prepared, calib, calib_samples: int) -> dict[str, np.ndarray]:
    """The calibration samples: the first ``calib_samples`` feed the statistics, the ones after
    them (if any) measure the pruned model's fidelity."""
    if is_lazy(prepared.model):
        raise UsageError("--calib runs the model in memory; models with external data are not supported yet")
    return load_calibration(calib, prepared.model, calib_samples + fidelity.SAMPLES)


def _fidelity(
    prepared: _Prepared,
    hard: onnx.ModelProto,
    calibration: dict[str, np.ndarray],
    used: int,
    custom_ops: tuple[str, ...],
) -> fidelity.Fidelity | None:
    feeds, source = fidelity.holdout(calibration, used, static_batch(prepared.model) or 1)
    try:
        return fidelity.measure(prepared.dense, hard, feeds, source, custom_ops)
    except UsageError:  # fewer samples than the model's static batch: nothing to measure on
        return None
    except RunTimeout:
        raise
    except Exception as exc:  # the samples themselves do not fit the model (the statistics may not have run them)
        raise ModelLoadError(f"onnxruntime could not run the calibration data: {one_line(exc)}") from None


def _statistics(
    prepared: _Prepared,
    analysis: Analysis,
    layers: LayerIndex,
    calib: dict[str, np.ndarray] | None,
    synthetic_samples: int | None,
    dense_flops: int,
    seed: int,
    custom_ops: tuple[str, ...],
    progress: Progress | None,
) -> Statistics | None:
    """Input statistics of every linear layer a prunable group feeds: from ``calib`` (named feeds),
    else synthetic.

    None where the model cannot be run in memory (external data) or onnxruntime refuses it
    without calibration data: data-free criteria then use the identity Hessian.
    """
    wanted = list(
        dict.fromkeys(layer.activation for group in analysis.prunable_groups for layer in layers.of_group(group.dims))
    )
    if calib is None and (is_lazy(prepared.model) or not wanted):
        return None
    _say(progress, "statistics")
    model = prepared.model
    if calib is not None:
        try:
            return collect(model, calib, wanted, "calibration", seed, custom_ops)
        except (UsageError, RunTimeout):
            raise
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime could not run the calibration data: {one_line(exc)}") from None
    try:
        refuse_oversized(model)
        if synthetic_samples is None:
            shapes = {d.tensor: analysis.graph.shape(d.tensor) for d in wanted}
            synthetic_samples = synthetic_sample_count(model, wanted, shapes, dense_flops)
        prior, imbalance = choose_prior(model, wanted, prior_probe_samples(model, synthetic_samples), seed, custom_ops)
        feeds = synthetic_feeds(model, synthetic_samples, seed, prior)
        statistics = collect(model, feeds, wanted, "synthetic", seed, custom_ops)
        statistics.prior, statistics.imbalance, statistics.feeds = prior.name, imbalance, feeds
        return statistics
    except RunTimeout:  # validation would only wait as long again
        raise
    except Exception:  # validation reports a model onnxruntime cannot run; scoring goes on without data
        return None


def _compensate(
    prepared: _Prepared, analysis: Analysis, layers: LayerIndex, plan: Plan, statistics: Statistics | None
) -> tuple[_Prepared, Compensation]:
    if statistics is None:
        why = "external data" if is_lazy(prepared.model) else "no statistics (onnxruntime could not run the model)"
        return prepared, Compensation(skipped=[f"all layers: {why}"] if plan.removed else [])
    model, outcome = layerwise_refit(prepared.model, analysis, layers, plan, statistics)
    if model is prepared.model:
        return prepared, outcome
    return prepared.with_weights(model), outcome


@dataclass
class _Chosen:
    """The refit candidate ``--refit auto`` kept, already cut and measured on the held-out samples."""

    hard: onnx.ModelProto
    fidelity: fidelity.Fidelity


def _sequential(
    prepared: _Prepared,
    layerwise: _Prepared,
    analysis: Analysis,
    layers: LayerIndex,
    plan: Plan,
    feeds: dict[str, np.ndarray],
    calibration: dict[str, np.ndarray] | None,
    used: int,
    compensation: Compensation,
    seed: int,
    custom_ops: tuple[str, ...],
) -> tuple[_Prepared, _Chosen | None]:
    """The sequential refit of ``layerwise``; given ``calibration`` with samples past ``used``, it is
    kept only if it moves those held-out outputs less than the layer-wise refit does, and the kept
    candidate comes back cut and measured."""
    model, outcome = sequential_refit(
        prepared.model, layerwise.model, analysis, layers, plan, prepared.opset, feeds, seed, custom_ops
    )
    compensation.sequential = outcome.as_dict()
    compensation.refit = "sequential"
    sequential = prepared.with_weights(model)
    held_out, source = (
        fidelity.holdout(calibration, used, static_batch(prepared.model) or 1) if calibration else (None, None)
    )
    if held_out is None or source != fidelity.HELD_OUT:
        return sequential, None
    candidates = {}
    for name, candidate in (("layerwise", layerwise), ("sequential", sequential)):
        hard = infer_shapes(apply_plan(candidate.model, candidate.graph, analysis, plan, prepared.opset))
        candidates[name] = _Chosen(
            hard, fidelity.measure(prepared.dense, prepared.written(hard), held_out, source, custom_ops)
        )
    errors = {
        name: float(np.mean([o.relative_error for o in c.fidelity.outputs])) if c.fidelity.outputs else 0.0
        for name, c in candidates.items()
    }
    compensation.held_out_error = errors
    if errors["sequential"] <= errors["layerwise"]:
        return sequential, candidates["sequential"]
    compensation.refit = "layerwise"
    return layerwise, candidates["layerwise"]


def _score(
    analysis: Analysis, criterion: str, context: ScoreContext, progress: Progress | None
) -> dict[int, np.ndarray]:
    prunable = analysis.prunable_groups
    scores = {}
    for k, group in enumerate(prunable):
        _say(progress, "score", k, len(prunable))
        scores[group.id] = CRITERIA[criterion](analysis, group, context)
    if CRITERIA[criterion].comparable:
        _rescale_fallbacks(scores, context.fallbacks)
    return scores


def _rescale_fallbacks(scores: dict[int, np.ndarray], fallbacks: list[int]) -> None:
    """Put l2-scored groups on the scale of the others' relative losses, so --global treats them
    like a typical group rather than never or always pruning them."""
    typical = [float(np.mean(s)) for gid, s in scores.items() if gid not in fallbacks and len(s)]
    if not typical:
        return
    level = float(np.median(typical))
    for gid in fallbacks:
        mean = float(np.mean(scores[gid]))
        if mean > 0:
            scores[gid] = scores[gid] / mean * level


def _validate(
    prepared: _Prepared,
    weights: _Prepared,
    analysis: Analysis,
    plan: Plan,
    hard,
    soft_model,
    seed: int,
    custom_ops: tuple[str, ...],
    progress: Progress | None,
    workdir: Path | None,
    sizes: dict[str, list[int]],
) -> Validation:
    dense, graph = prepared.model, prepared.graph
    refuse_oversized(dense)
    _say(progress, "validate")
    validation = _prove(
        prepared,
        weights,
        analysis,
        plan,
        hard,
        soft_model,
        seed,
        lambda done, total: _say(progress, "validate", done, total),
        custom_ops,
        workdir,
        sizes,
    )
    if not validation.dense_runs:
        raise ModelLoadError(validation.dense_error + _custom_op_hint(graph, custom_ops))
    validation.nonfinite_weights = nonfinite_weights(hard, prepared.dense)
    if validation.nonfinite_weights:
        validation.problems.append(
            f"pruned weights hold NaN or inf: {', '.join(validation.nonfinite_weights[:5])}"
            + (f" and {len(validation.nonfinite_weights) - 5} more" if len(validation.nonfinite_weights) > 5 else "")
        )
    return validation


def _custom_op_hint(graph: ModelGraph, custom_ops) -> str:
    domains = sorted({n.domain for n in graph.nodes if n.domain not in ("", "ai.onnx", "com.microsoft")})
    if domains and not custom_ops:
        return f" (ops from domain {', '.join(domains)}: spa loads no custom-op library unless given --custom-ops)"
    return ""


def _prove(
    prepared: _Prepared,
    weights: _Prepared,
    analysis: Analysis,
    plan: Plan,
    hard,
    soft_model,
    seed,
    step,
    custom_ops,
    workdir: Path | None,
    sizes: dict[str, list[int]],
) -> Validation:
    """Validate in memory, or through files in ``workdir`` for models with external data.

    ``weights`` is the model the cut sliced (compensated, or the dense one): the soft reference
    zeroes its channels, while I/O and runnability are checked against the dense model.
    """
    dense, graph, opset = weights.model, weights.graph, prepared.opset
    exact_ids = [gid for gid in plan.removed if analysis.group(gid).exact]
    lazy = workdir is not None
    hard_source = write_beside_data(hard, workdir, "pruned.onnx") if lazy else hard
    exact_plan, hard_exact = plan, hard_source
    if len(exact_ids) < len(plan.removed):  # compare only what is meant to be equal: the exact groups' cut
        exact_plan, soft_model = plan.restricted_to(exact_ids), None
        spill = workdir / "exact.onnx.data" if lazy else None
        hard_exact = prepared.written(infer_shapes(apply_plan(dense, graph, analysis, exact_plan, opset, spill=spill)))
        if lazy:
            hard_exact = write_beside_data(hard_exact, workdir, "exact.onnx")
    if lazy:
        soft = write_external(dense, workdir, "soft.onnx", soft_transform(graph, analysis, exact_plan))
    else:
        soft = soft_model or prepared.written(apply_plan(dense, graph, analysis, exact_plan, opset, soft=True))
    if not exact_ids:
        hard_exact = soft = None
    validation = validate(
        prepared.path if lazy else prepared.dense,
        hard_source,
        soft,
        hard_exact,
        removed_anything=bool(plan.removed),
        seed=seed,
        step=step,
        custom_ops=custom_ops,
        sizes=sizes,
    )
    validation.approximate_groups = len(plan.removed) - len(exact_ids)
    return validation


def output_path_for(path: Path, soft: bool, extension: str = ".onnx") -> Path:
    suffix = (".soft" if soft else ".pruned") + extension
    return path.with_name(path.name[: -len(".onnx")] + suffix if path.name.endswith(".onnx") else path.name + suffix)
