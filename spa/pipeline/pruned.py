"""Stage: refit the weights left and cut the planned units; the pruned model, validated and saved."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spa.core import feeds as feed_spec
from spa.core.runlimit import own_context, set_timeout
from spa.core.runtime import counted_sizes, static_batch, unsized_axes
from spa.core.signals import ScratchDirectory
from spa.formats.calib_reader import is_reader, reader_label
from spa.formats.export import ExportCheck, export
from spa.formats.model import Model, Progress, say
from spa.formats.shapes import infer_shapes
from spa.pipeline.checks import validate_pruned
from spa.pipeline.options import CutOptions, RunOptions
from spa.pipeline.reports import GroupReport, PruneReport, Timer, count_model
from spa.pipeline.summary import summarize
from spa.reporting.metrics import ModelStats
from spa.scoring.criteria import release_layer_systems
from spa.transforms.compensate import Compensation
from spa.transforms.compensate import compensate as layerwise_refit
from spa.transforms.cut import apply_plan
from spa.transforms.sequential import sequential_refit
from spa.verify import fidelity
from spa.verify.validate import Validation

if TYPE_CHECKING:
    from spa.pipeline.depth import DepthOutcome
    from spa.pipeline.experts import ExpertRemoval
    from spa.pipeline.planned import PrunePlan


@dataclass
class Chosen:
    """The refit candidate ``refit="auto"`` kept, already cut and measured on the held-out samples."""

    hard: onnx.ModelProto
    fidelity: fidelity.Fidelity


@dataclass
class PrunedModel:
    """A cut model: ``model`` is it in the input's format; ``validate()`` proves it, ``save()``
    writes it and ``report`` tells what was done."""

    plan: PrunePlan
    options: CutOptions
    weights: Model  # the model the cut sliced: the dense one, or its refit
    hard: Model  # the cut, in spa's working form
    after: ModelStats
    compensation: Compensation | None = None
    chosen: Chosen | None = None
    # for models with external data, the cut tensors live in this folder (removed with the result)
    workdir: ScratchDirectory | None = field(default=None, repr=False)
    validation: Validation = field(default_factory=Validation)  # filled by ``validate()``
    seconds: dict[str, float] = field(default_factory=dict)
    experts: ExpertRemoval | None = None  # the experts removed before the cut (``remove_experts``)
    # the residual blocks removed before the width cut (``remove_blocks``): ``dense`` is what they left
    depth: DepthOutcome | None = None

    @property
    def dense(self) -> Model:
        return self.plan.scored.analyzed.model

    @cached_property
    def soft(self) -> Model:
        """The chosen channels zeroed, nothing removed: the reference soft == hard is checked against."""
        weights, analysis = self.weights, self.plan.scored.analyzed.analysis
        return weights.derived(
            apply_plan(weights.proto, weights.graph, analysis, self.plan.units, weights.opset, soft=True)
        )

    @cached_property
    def model(self) -> onnx.ModelProto:
        """The pruned model in the input's own format (dense-shaped with zeroed channels if soft)."""
        return self.encoded("auto")

    def encoded(self, format: str = "auto") -> onnx.ModelProto:
        """``"auto"``: the input's own format (QOperator stays QOperator); ``"qdq"``: quantized ops as
        QuantizeLinear/DequantizeLinear around float ops."""
        if not self.options.soft:
            return self.hard.encoded(format)
        soft = self.soft.encoded(format)
        if format != "auto":  # the working form is shared with the encoding: annotate a copy
            soft = _copy(soft)
        return infer_shapes(soft)

    @own_context
    def validate(self, run: RunOptions | None = None, progress: Progress | None = None) -> Validation:
        """Checker, onnxruntime, same I/O, soft == hard on the exact groups, fidelity on held-out
        calibration samples, and (``run.bench``) latency; the result is kept for ``report``."""
        run = run or self.plan.scored.run
        set_timeout(run.run_timeout)
        feed_spec.use(self.plan.scored.feeds)
        timer = Timer()
        self.validation = validate_pruned(self, run, progress)
        self.seconds = {**self.seconds, "validate": timer.lap("validate")["validate"]}
        return self.validation

    @own_context
    def save(self, path: str | os.PathLike, format: str = "auto", **export_options) -> list[ExportCheck]:
        """Write the pruned model atomically (``format``: see ``encoded``); ``export_options`` are
        ``spa.formats.export.export``'s (ORT format, float16, checks)."""
        feed_spec.use(self.plan.scored.feeds)  # the export checks run the model on the same feeds
        return export(self.model if format == "auto" else self.encoded(format), Path(path), **export_options)

    @property
    def report(self) -> PruneReport:
        return build_report(self)


@own_context
def cut(plan: PrunePlan, options: CutOptions, progress: Progress | None = None) -> PrunedModel:
    """Refit (where ``options`` compensate) and cut ``plan``."""
    scored = plan.scored
    analyzed, run = scored.analyzed, scored.run
    set_timeout(run.run_timeout)
    feed_spec.use(scored.feeds)
    timer = Timer(plan.seconds)
    model, analysis, units = analyzed.model, analyzed.analysis, plan.units
    weights, compensation, chosen = model, None, None
    # a model whose weights stay on disk: refits and the cut are written here, never held whole
    workdir = ScratchDirectory() if model.lazy else None
    folder = Path(workdir.name) if workdir else None
    if options.compensates(scored.options):
        say(progress, "compensate")
        weights, compensation = _compensate(plan, folder, lambda done, total: say(progress, "compensate", done, total))
        sequential = options.refit == "sequential" or (options.refit == "auto" and scored.calib_feeds)
        if units.removed and scored.statistics is not None and sequential:
            say(progress, "refit")
            weights, chosen = _sequential(plan, weights, compensation, options.refit == "auto", folder)
        timer.lap("compensate")
    if folder is not None:
        release_layer_systems(analysis)
    say(progress, "cut")
    spill = folder / "pruned.onnx.data" if folder else None
    if chosen:
        hard = chosen.hard
    else:
        hard = infer_shapes(apply_plan(weights.proto, weights.graph, analysis, units, model.opset, spill=spill))
    after = count_model(model, hard, analyzed.sizes, analyzed.analysis.registry)
    pruned = PrunedModel(plan, options, weights, model.derived(hard), after, compensation, chosen, workdir)
    pruned.seconds = timer.lap("cut")
    return pruned


def _compensate(plan: PrunePlan, folder: Path | None, step) -> tuple[Model, Compensation]:
    scored = plan.scored
    model, analysis, layers = scored.analyzed.model, scored.analyzed.analysis, scored.analyzed.layers
    if scored.statistics is None:
        read = any(layers.of_group(group.dims) for group in analysis.prunable_groups)
        # without a layer to refit, no statistics were wanted: the model was not run at all
        why = (
            "no statistics (onnxruntime could not run the model)"
            if read
            else "no layer spa refits reads a pruned group"
        )
        return model, Compensation(skipped=[f"all layers: {why}"] if plan.units.removed else [])
    spill = folder / "refit.onnx.data" if folder else None
    refitted, outcome = layerwise_refit(model.proto, analysis, layers, plan.units, scored.statistics, spill, step)
    return (model if refitted is model.proto else model.derived(refitted)), outcome


def _sequential(
    plan: PrunePlan, layerwise: Model, compensation: Compensation, choose: bool, folder: Path | None
) -> tuple[Model, Chosen | None]:
    """The sequential refit of ``layerwise``; with ``choose`` and calibration samples past those the
    statistics read, it is kept only if it moves those held-out outputs less than the layer-wise
    refit does, and the kept candidate comes back cut and measured."""
    scored = plan.scored
    model, analysis, layers, run = scored.analyzed.model, scored.analyzed.analysis, scored.analyzed.layers, scored.run
    assert scored.statistics is not None  # the caller refits sequentially only where statistics were collected
    feeds = scored.calib_feeds or scored.statistics.feeds
    assert feeds is not None  # statistics collected without calibration data are synthetic and keep their feeds
    refitted, outcome = sequential_refit(
        model.proto,
        layerwise.proto,
        analysis,
        layers,
        plan.units,
        model.opset,
        feeds,
        run.seed,
        tuple(run.custom_ops),
        folder,
    )
    compensation.sequential = outcome.as_dict()
    compensation.refit = "sequential"
    sequential = model.derived(refitted)
    calibration, used = (scored.calibration if choose else None), scored.options.calib_samples
    held_out, source = (
        fidelity.holdout(calibration, used, static_batch(model.proto) or 1) if calibration else (None, None)
    )
    if held_out is None or source != fidelity.HELD_OUT:
        return sequential, None
    candidates = {}
    for name, candidate in (("layerwise", layerwise), ("sequential", sequential)):
        spill = folder / f"cut-{name}.onnx.data" if folder else None
        hard = infer_shapes(
            apply_plan(candidate.proto, candidate.graph, analysis, plan.units, model.opset, spill=spill)
        )
        measured = fidelity.measure(
            model.as_input_format, model.derived(hard).as_input_format, held_out, source, tuple(run.custom_ops)
        )
        candidates[name] = Chosen(hard, measured)
    errors = {
        name: float(np.mean([o.relative_error for o in c.fidelity.outputs])) if c.fidelity.outputs else 0.0
        for name, c in candidates.items()
    }
    compensation.held_out_error = errors
    if errors["sequential"] <= errors["layerwise"]:
        return sequential, candidates["sequential"]
    compensation.refit = "layerwise"
    return layerwise, candidates["layerwise"]


def _given_sizes(pruned: PrunedModel) -> tuple[int, int] | None:
    """Params and FLOPs of the model as given, where blocks or experts went before the cut (blocks
    go first, so theirs are the earlier)."""
    first = pruned.depth or pruned.experts
    return (first.params_before, first.flops_before) if first else None


def build_report(pruned: PrunedModel) -> PruneReport:
    plan = pruned.plan
    scored = plan.scored
    analyzed = scored.analyzed
    model, analysis, score, sizes = analyzed.model, analyzed.analysis, scored.options, analyzed.sizes
    options = {
        "ratio": plan.options.ratio,
        "criterion": score.criterion,
        "calib": scored.generated or calib_label(score.calib),
        "calib_samples": score.calib_samples,
        "compensate": pruned.options.compensates(score),
        "global": plan.options.global_rank,
        "round_to": plan.options.round_to,
        "exclude": list(analyzed.options.exclude),
        "soft": pruned.options.soft,
        "approximate": analyzed.options.approximate,
        "seed": scored.run.seed,
        "attention": analyzed.options.attention,
        "refit": pruned.options.refit,
        "input_shapes": sizes,
    }
    if analyzed.head_unit:  # only when chosen: reports of runs that name their unit stay as they were
        options["attention_unit"] = analyzed.head_unit
    if plan.options.ratios:  # only when given: reports of runs without them stay as they were
        options["ratios"] = dict(plan.options.ratios)
    if plan.options.remove_experts:
        options["remove_experts"] = plan.options.remove_experts
    if pruned.depth is not None:
        options["remove_blocks"], options["block_score"] = plan.options.remove_blocks, plan.options.block_score
        options["block_unit"] = plan.options.block_unit
    given = _given_sizes(pruned)
    return PruneReport(
        model=model.name,
        options=options,
        groups_found=len(analysis.groups),
        groups_prunable=len(analysis.prunable_groups),
        groups_pruned=len(plan.units.removed),
        params_before=given[0] if given else analyzed.dense.params,
        params_after=pruned.after.params,
        flops_before=given[1] if given else analyzed.dense.flops,
        flops_after=pruned.after.flops,
        validation=pruned.validation,
        seconds=pruned.seconds,
        groups=[
            GroupReport.of(analysis, g, len(plan.units.removed.get(g.id, ())), model.op_types) for g in analysis.groups
        ],
        target=plan.target,
        widths=plan.widths.summary() if plan.widths else None,
        statistics=scored.statistics.summary() if scored.statistics else None,
        compensation=pruned.compensation.as_dict() if pruned.compensation else None,
        fallback_groups=scored.fallback_groups,
        flops_at=counted_sizes(model.proto, sizes),
        unsized_axes=unsized_axes(model.proto, sizes),
        flops_uncounted=analyzed.dense.uncounted(),
        summary=summarize(pruned, scored.generated or calib_label(score.calib)),
        experts=pruned.experts.as_dict() if pruned.experts else None,
        depth=pruned.depth.as_dict() if pruned.depth else None,
    )


def calib_label(calib) -> str | None:
    """The calibration data as the report names it: its path, or the reader's class."""
    if calib is None:
        return None
    return reader_label(calib) if is_reader(calib) else str(calib)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
