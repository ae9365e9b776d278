"""Stage: find every coupled channel group of a model, and why each frozen one is frozen."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property

import onnx

from spa.analysis.groups import Analysis, find_groups
from spa.analysis.layers import LayerIndex
from spa.core.coupling import HEADS
from spa.core.feeds import given_values
from spa.core.graph import ModelGraph
from spa.core.runtime import check_input_sizes, complete_sizes, counted_sizes, unsized_axes
from spa.formats.calib_reader import CalibrationReader
from spa.formats.model import Model, Progress, load, say
from spa.ops.registry import Registry
from spa.pipeline.options import AnalyzeOptions, RunOptions, ScoreOptions
from spa.pipeline.reports import AnalysisReport, GroupReport, Timer, count_model
from spa.pipeline.scored import ScoredModel, score
from spa.pipeline.usage import check_patterns
from spa.planning.head_unit import AUTO
from spa.reporting.metrics import ModelStats, bodies


@dataclass(frozen=True)
class AnalyzedModel:
    """A model with its coupled groups: what can be pruned, and why the rest cannot."""

    model: Model
    options: AnalyzeOptions
    analysis: Analysis  # the groups, the unit labels of every dimension, the frozen dimensions
    sizes: dict[str, list[int]]  # the input sizes asked for, completed through shared symbols
    seconds: dict[str, float] = field(default_factory=dict, compare=False)
    head_unit: str = ""  # with attention "auto": which unit attention layers lose, and why

    @property
    def groups(self):
        return self.analysis.groups

    @property
    def prunable(self):
        return self.analysis.prunable_groups

    @cached_property
    def dense(self) -> ModelStats:
        """Params and FLOPs of the model as given, the FLOPs at ``sizes``."""
        return count_model(self.model, self.model.proto, self.sizes, self.analysis.registry)

    @cached_property
    def layers(self) -> LayerIndex:
        """The linear layers that read each group: what statistics, criteria and refits work on."""
        return LayerIndex(self.model.graph, self.analysis.labels, self.analysis.registry)

    def report(self) -> AnalysisReport:
        """What ``spa.analyze`` returns (and ``spa analyze --json`` writes)."""
        model, given = self.model, dict(self.options.input_shapes or {})
        # FLOPs at the sizes as given, completed once (``sizes`` completed again only adds inputs
        # that share a symbol with a completed one alone)
        same = complete_sizes(model.proto, self.sizes) == self.sizes
        stats = self.dense if same else count_model(model, model.proto, given, self.analysis.registry)
        return AnalysisReport(
            model.name,
            [GroupReport.of(self.analysis, g, 0, model.op_types) for g in self.analysis.groups],
            stats.params,
            stats.flops,
            self.analysis,
            stats,
            counted_sizes(model.proto, given),
            unsized_axes(model.proto, given),
            given,
            unruled_weights(model.graph, stats, self.analysis.registry),
        )

    def score(
        self,
        criterion: str | None = None,
        data: str | os.PathLike | CalibrationReader | None = None,
        *,
        options: ScoreOptions | None = None,
        run: RunOptions | None = None,
        statistics: bool | None = None,
        progress: Progress | None = None,
    ) -> ScoredModel:
        """Rank the units of every prunable group by ``criterion`` (``spa.scoring.criteria``), with
        layer-input statistics from ``data`` (calibration inputs: a path, or an object with
        onnxruntime's ``CalibrationDataReader`` protocol) or synthetic inputs. ``statistics``
        says whether to collect them; None: when the criterion reads them or data is given."""
        options = options or ScoreOptions()
        if criterion is not None or data is not None:
            options = replace(
                options, criterion=criterion or options.criterion, calib=data if data is not None else options.calib
            )
        return score(self, options, run or RunOptions(), statistics, progress)


def analyze(
    model: Model | str | os.PathLike | onnx.ModelProto,
    options: AnalyzeOptions | None = None,
    progress: Progress | None = None,
    *,
    timer: Timer | None = None,
) -> AnalyzedModel:
    """Group a model's channels (``spa.load``'s ``Model``, or what ``spa.load`` takes)."""
    options = options or AnalyzeOptions()
    timer = timer or Timer()
    model = load(model, progress)
    given = dict(options.input_shapes or {})
    check_input_sizes(model.proto, given)
    given_values(model.proto, options.inputs)  # refused before any work
    check_patterns(model.graph, "--exclude", options.exclude)
    sizes = complete_sizes(model.proto, given)
    timer.lap("load")
    say(progress, "group")
    attention = HEADS if options.attention == AUTO else options.attention
    analysis = find_groups(
        model.graph, model.opset, tuple(options.exclude), options.approximate, attention, options.registry
    )
    return AnalyzedModel(model, options, analysis, sizes, timer.lap("group"))


def unruled_weights(graph: ModelGraph, stats: ModelStats, registry: Registry) -> dict[str, int]:
    """Op types with no rule that read weights, and how many such nodes: no group starts at them
    and whatever they touch stays whole, so without this line a model of them reads as having
    nothing to prune and no reason why (the QOperator format's QLinearConv, a custom op)."""
    nodes = {node.name: node for node in graph.nodes}
    # a node with bodies counts their weights, which the rules of the ops inside read
    unruled = Counter(
        cost.op_type
        for cost in stats.nodes
        if cost.params
        and cost.name in nodes
        and not bodies(nodes[cost.name])
        and registry.rule(nodes[cost.name]) is None
    )
    return dict(unruled.most_common())
