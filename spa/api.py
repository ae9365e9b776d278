"""The Python API: ``spa.load``, ``spa.analyze`` and ``spa.prune``. The CLI is a thin layer over these.

``spa.prune`` is the one-call form of the staged pipeline (``spa.pipeline``): load -> analyze
(groups) -> score -> plan -> apply (refit and cut) -> validate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import overload

import onnx

from spa.core.errors import SlowerError, ValidationError
from spa.core.runlimit import RUN_TIMEOUT, own_context
from spa.formats.calib_reader import CalibrationReader
from spa.formats.model import Model, Progress, load
from spa.ops.registry import DEFAULT, Registry
from spa.pipeline import (
    AnalyzedModel,
    AnalyzeOptions,
    CutOptions,
    PlanOptions,
    PrunedModel,
    RunOptions,
    ScoreOptions,
    prune_model,
)
from spa.pipeline import analyze as analyze_model
from spa.pipeline.options import REFITS
from spa.pipeline.reports import AnalysisReport, GroupReport, PruneReport, PruneResult
from spa.pipeline.summary import slower_than_dense
from spa.pipeline.usage import ratio_or_default

__all__ = [
    "REFITS",
    "AnalysisReport",
    "GroupReport",
    "Progress",
    "PruneReport",
    "PruneResult",
    "analyze",
    "load",
    "output_path_for",
    "prune",
]


@overload
def analyze(
    model_or_path: Model,
    options: AnalyzeOptions | None = ...,
    *,
    exclude: tuple[str, ...] = ...,
    approximate: bool = ...,
    attention: str = ...,
    input_shapes: dict[str, list[int]] | None = ...,
    progress: Progress | None = ...,
    registry: Registry = ...,
) -> AnalyzedModel: ...
@overload
def analyze(
    model_or_path: str | os.PathLike | onnx.ModelProto,
    options: AnalyzeOptions | None = ...,
    *,
    exclude: tuple[str, ...] = ...,
    approximate: bool = ...,
    attention: str = ...,
    input_shapes: dict[str, list[int]] | None = ...,
    progress: Progress | None = ...,
    registry: Registry = ...,
) -> AnalysisReport: ...
def analyze(
    model_or_path: Model | str | os.PathLike | onnx.ModelProto,
    options: AnalyzeOptions | None = None,
    *,
    exclude: tuple[str, ...] = (),
    approximate: bool = False,
    attention: str = "heads",
    input_shapes: dict[str, list[int]] | None = None,
    progress: Progress | None = None,
    registry: Registry = DEFAULT,
) -> AnalysisReport | AnalyzedModel:
    """Find every coupled channel group of a model, and why each frozen one is frozen.

    Given a ``Model`` (``spa.load``), returns the analysis stage, whose ``score()`` leads on to a
    plan; given a path or ModelProto, returns its ``AnalysisReport`` (``stage.report()``).
    ``options`` replaces the keywords. ``attention`` is the unit of attention layers: whole heads
    (grouped-query: a KV head with its query heads), "head_dim" (one index of head_dim in every
    head), or "query_heads" (the same query head in every KV group). FLOPs are counted with the
    graph inputs at ``input_shapes`` (name -> sizes; inputs sharing a symbolic axis follow), free
    axes otherwise at 1. ``registry``: the operators spa knows
    (``spa.ops.registry.DEFAULT.with_operators(...)`` adds one)."""
    options = options or AnalyzeOptions(tuple(exclude), approximate, attention, input_shapes, registry)
    stage = analyze_model(model_or_path, options, progress)
    return stage if isinstance(model_or_path, Model) else stage.report()


@own_context
def prune(
    model_or_path: str | os.PathLike | onnx.ModelProto | Model,
    ratio: float | None = None,
    criterion: str = "obspa",
    *,
    calib: str | os.PathLike | CalibrationReader | None = None,
    calib_samples: int = 128,
    compensate: bool | None = None,
    synthetic_samples: int | None = None,
    global_rank: bool = False,
    round_to: int | str = "auto",
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
    attention: str = "auto",
    refit: str = "auto",
    input_shapes: dict[str, list[int]] | None = None,
    inputs: dict[str, object] | None = None,
    progress: Progress | None = None,
    run_timeout: float = RUN_TIMEOUT,
    ratios: dict[str, float] | None = None,
    registry: Registry = DEFAULT,
    allow_slower: bool = False,
    remove_experts: float = 0,
    remove_blocks: float | None = None,
    block_score: str = "influence",
    block_unit: str = "layer",
    calib_generate: int | None = None,
    calib_length: int = 128,
    calib_top_k: int | None = None,
) -> PruneResult:
    """Remove the fraction ``ratio`` (None: ``PlanOptions``' 0.3) of the channels of every prunable group.

    ``ratios`` (node name pattern -> ratio) gives the groups whose weighted ops' names match a
    pattern (fnmatch) their own ratio; where several match a group, the pattern given last wins.
    A target (``target_flops``, ``target_params`` or ``target_latency``, each a fraction of the
    dense model's figure) replaces ``ratio`` (given too: ``UsageError``) with the ratio found to
    meet it: FLOPs and params are counted on candidate cuts, latency timed on the first of ``providers``.
    ``round_to="auto"`` (the default) times each layer alone there at candidate widths (cached under
    ``~/.cache/spa/latency``) and keeps each group's count off the spikes of its curve; a latency
    target and ``global_rank`` then spend the cut where it saves the most time per importance lost.
    ``round_to=N`` keeps counts at multiples of N instead (1: exactly the ratio).
    ``bench`` times dense and pruned on the CPU and on every provider named; a pruned model slower
    than the dense one on the first provider (beyond timing noise) raises ``SlowerError`` unless
    ``allow_slower``.
    ``input_shapes`` (input name -> sizes; inputs sharing a symbolic axis follow) is the size
    FLOPs are counted at (free axes otherwise count 1), validation also runs at and latency is
    timed at; the statistics keep their own sizes.
    ``inputs`` (input name -> value: a number, or nested lists) is what every run feeds that input
    instead of the value spa makes up (``{"sr": 16000}``). Without it, a one-element integer input
    the graph compares with a constant takes that constant, a recurrent state stacks samples along
    its batch axis, and where the model does not run at a length of 1 past the batch, the first
    length it runs at (the calibration samples', then the graph's) is used; when none runs, a
    UsageError names the inputs and the feed.
    ``attention`` is the unit of attention layers: "heads" removes whole heads (grouped-query:
    a KV head with its query heads), "head_dim" shrinks head_dim evenly in every head,
    "query_heads" removes query heads evenly in every KV group and keeps K and V; "auto" (the
    default) takes whichever of "heads" and "query_heads" removes the share of heads nearest
    ``ratio`` (whole heads on a tie, with a target, or where no layer shares its KV heads), and the
    report's ``options["attention_unit"]`` says which and why.

    Data: ``calib`` (files, or a ``CalibrationDataReader``: ``ScoreOptions.calib``; the first
    ``calib_samples`` samples are used) feeds the data-driven criteria and compensation; up to
    ``fidelity.SAMPLES`` samples after those measure how far the pruned outputs moved from the dense
    ones (``report.validation.fidelity``; on the samples used when none are left). Without
    it, ``obspa`` and compensation use ``synthetic_samples`` synthetic inputs run through the
    dense model (None: enough for every layer input's X^T X, within a compute budget), image inputs
    drawn from the input prior ``statistics.choose_prior`` finds for the model.
    ``compensate`` refits the weights left in every layer that loses input channels;
    None (the default) means on with calibration data or a data-aware criterion (obspa ranks
    channels by what compensation can recover), off for magnitude criteria without data, where
    synthetic statistics were measured to mislead the refit (all-MiniLM-L6-v2, FFN only: l1 at ratio 0.3
    fell from 0.735 to 0.120 mean cosine with it). ``refit`` is how: "layerwise" fits each layer to
    the dense model's inputs, "sequential" then refits the layers in graph order on the inputs the
    pruned model gives them (``spa.transforms.sequential``); "auto" is sequential with calibration data (when
    held-out samples are left, whichever of the two moves them less) and layer-wise without.
    ``calib_generate`` (decoders with a key/value cache as graph I/O; instead of ``calib``): the
    dense model writes that many token sequences of ``calib_length`` tokens from its BOS token
    (the id in ``genai_config.json`` or ``config.json`` beside the model, else 0), sampled at
    temperature 1 (among the ``calib_top_k`` likeliest, if given) and seeded by ``seed``, and they
    are used as ``calib`` would be.

    Every run of the model (statistics, searches, refit, validation, fidelity, latency) stops after
    ``run_timeout`` seconds (0: no limit) and raises ``spa.core.runlimit.RunTimeout``, a ``ModelLoadError``.
    ``registry`` is the operators spa knows (``spa.ops.registry.DEFAULT.with_operators(...)`` adds one).
    ``remove_experts`` (a whole number, or a fraction of each layer's experts) removes that many
    experts from every mixture-of-experts layer first, with their router columns: those with the
    least routing weight times output on the statistics (``spa.pipeline.experts``); with ``soft``
    the router never picks them instead, which computes the same.

    Returns the pruned model (dense-shaped with zeroed channels if ``soft``) and
    a report. Raises ``UsageError`` for bad options, ``ModelLoadError`` for bad
    input (including a model onnxruntime cannot run) and ``ValidationError``
    when ``check`` is on and a check fails. ``custom_ops`` names onnxruntime
    custom-op libraries to load for validation; none is ever loaded otherwise.

    ``remove_blocks`` (depth pruning) first removes that many whole residual blocks (a fraction
    below 1: of the removable ones), those ``block_score`` ranks lowest ("influence": ShortGPT's
    Block Influence, "l2", "random"); ``block_unit`` says what a transformer's block is ("layer",
    "sublayer": attention and MLP apart, "attention", "mlp"). The width cut then runs on what is
    left, with ``ratio`` 0 unless given. ``report.depth`` lists the blocks, their scores and the checks of the removal.
    """
    targets = (target_flops, target_params, target_latency)
    plan = PlanOptions(
        ratio_or_default(ratio, targets, remove_blocks),
        dict(ratios or {}),
        global_rank,
        round_to,
        *targets,
        remove_experts=remove_experts,
        remove_blocks=remove_blocks,
        block_score=block_score,
        block_unit=block_unit,
    )
    score = ScoreOptions(criterion, calib, calib_samples, synthetic_samples, calib_generate, calib_length, calib_top_k)
    run = RunOptions(seed, check, bench, tuple(providers), threads, tuple(custom_ops), run_timeout, allow_slower)
    cut = CutOptions(compensate, refit, soft)
    groups = AnalyzeOptions(tuple(exclude), approximate, attention, input_shapes, registry, inputs)
    return result_of(prune_model(model_or_path, groups, score, plan, cut, run, progress))


def result_of(pruned: PrunedModel) -> PruneResult:
    """The pruned model in the input's format and its report; ``ValidationError`` where a check failed."""
    report = pruned.report
    if pruned.validation.problems:
        raise ValidationError("pruned model failed validation: " + "; ".join(pruned.validation.problems))
    slower = slower_than_dense(pruned)
    if slower and not pruned.plan.scored.run.allow_slower:
        raise SlowerError(slower)
    return PruneResult(pruned.model, report, pruned.workdir)


def output_path_for(path: Path, soft: bool, extension: str = ".onnx") -> Path:
    suffix = (".soft" if soft else ".pruned") + extension
    return path.with_name(path.name[: -len(".onnx")] + suffix if path.name.endswith(".onnx") else path.name + suffix)
