"""Stage: rank the units of every prunable group, from layer-input statistics where the criterion
reads them (calibration data, or synthetic inputs run through the dense model)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from spa.core import feeds as feed_spec
from spa.core import probe
from spa.core.errors import UsageError
from spa.core.runlimit import RunTimeout, own_context, set_timeout
from spa.core.runtime import refuse_oversized
from spa.formats.model import Progress, say
from spa.pipeline.options import PlanOptions, RunOptions, ScoreOptions
from spa.pipeline.planned import PrunePlan, plan
from spa.pipeline.reports import Timer
from spa.scoring import self_calibration
from spa.scoring.calibration_fit import calibration_run_error
from spa.scoring.criteria import CRITERIA, ScoreContext
from spa.scoring.statistics import (
    Statistics,
    choose_prior,
    collect,
    load_calibration,
    prior_probe_samples,
    synthetic_feeds,
    synthetic_sample_count,
)
from spa.verify import fidelity

if TYPE_CHECKING:
    from spa.pipeline.analyzed import AnalyzedModel


@dataclass(frozen=True)
class ScoredModel:
    """An analysed model whose prunable units are ranked: lowest score goes first."""

    analyzed: AnalyzedModel
    options: ScoreOptions
    run: RunOptions
    scores: dict[int, np.ndarray]  # group id -> one score per unit
    statistics: Statistics | None  # layer-input statistics, where they were collected
    # every calibration sample read: the first ``calib_samples`` feed the statistics, the rest
    # measure the pruned model's fidelity
    calibration: dict[str, np.ndarray] | None = field(default=None, repr=False)
    fallback_groups: int = 0  # groups a data-aware criterion scored by l2: no linear layer reads them
    seconds: dict[str, float] = field(default_factory=dict, compare=False)
    # what every later stage feeds the inputs it has no data for (``spa.core.feeds``)
    feeds: feed_spec.FeedSpec = field(default=feed_spec.NO_SPEC, compare=False)
    # what wrote the calibration data when the model did (``--calib-generate``)
    generated: str | None = None

    @property
    def calib_feeds(self) -> dict[str, np.ndarray] | None:
        """The calibration samples the statistics read."""
        if not self.calibration:
            return None
        return {k: v[: self.options.calib_samples] for k, v in self.calibration.items()}

    @property
    def comparable(self) -> bool:
        """Scores mean the same in every group (relative losses): a global ranking needs no normalising."""
        return CRITERIA[self.options.criterion].comparable

    def plan(
        self,
        ratio: float | None = None,
        *,
        ratios: dict[str, float] | None = None,
        global_rank: bool | None = None,
        round_to: int | str | None = None,
        options: PlanOptions | None = None,
        progress: Progress | None = None,
    ) -> PrunePlan:
        """The units to remove: ``ratio`` of every prunable group's units (``ratios``: pattern ->
        ratio for the groups whose weighted ops' names match it, the last matching pattern winning),
        or the ratio ``options``' target asks for."""
        base = options or PlanOptions()
        options = replace(
            base,
            ratio=base.ratio if ratio is None else ratio,
            ratios=base.ratios if ratios is None else ratios,
            global_rank=base.global_rank if global_rank is None else global_rank,
            round_to=base.round_to if round_to is None else round_to,
        )
        return plan(self, options, progress)

    def search(
        self,
        *,
        flops: float | None = None,
        params: float | None = None,
        latency: float | None = None,
        options: PlanOptions | None = None,
        progress: Progress | None = None,
    ) -> PrunePlan:
        """The plan whose ratio meets a target: a fraction of the dense model's FLOPs, params or
        latency (timed on the first of the run's providers)."""
        targets = replace(options or PlanOptions(), target_flops=flops, target_params=params, target_latency=latency)
        return plan(self, targets, progress)


@own_context
def score(
    analyzed: AnalyzedModel,
    options: ScoreOptions,
    run: RunOptions,
    statistics: bool | None = None,
    progress: Progress | None = None,
    timer: Timer | None = None,
) -> ScoredModel:
    """``statistics``: whether to collect layer-input statistics; None: when the criterion reads
    them or calibration data is given."""
    set_timeout(run.run_timeout)
    timer = timer or Timer(analyzed.seconds)
    if statistics is None:
        statistics = options.data_aware or options.has_data
    given = feed_spec.given_values(analyzed.model.proto, analyzed.options.inputs)
    feed_spec.use(feed_spec.FeedSpec(given))  # the calibration data need not hold what --input sets
    calibration, generated = _calibration(analyzed, options, run, progress)
    say(progress, "inputs")  # a model the sample feed does not run is run again at other lengths
    spec = _feed_spec(analyzed, given, calibration, run)
    feed_spec.use(spec)
    calib_feeds = {k: v[: options.calib_samples] for k, v in calibration.items()} if calibration else None
    stats = _statistics(analyzed, calib_feeds, options, run, progress) if statistics else None
    timer.lap("statistics")
    context = ScoreContext(run.seed, stats, analyzed.layers)
    scores = score_groups(analyzed, options.criterion, context, progress)
    seconds = timer.lap("score")
    fallbacks = len(context.fallbacks)
    return ScoredModel(analyzed, options, run, scores, stats, calibration, fallbacks, seconds, spec, generated)


def _feed_spec(analyzed: AnalyzedModel, given, calibration, run: RunOptions) -> feed_spec.FeedSpec:
    """What the stages feed: ``given`` (``--input``), the graph's control values, and a length the
    model runs at, tried first at the lengths of the calibration samples."""
    model = analyzed.model
    axes = feed_spec.batch_axes(model.proto)
    hints = [
        size
        for name, value in (calibration or {}).items()
        for axis, size in enumerate(value.shape[1:], start=1)
        if axis != axes.get(name)
    ]
    source = model.path if model.lazy and model.path is not None else model.proto
    return probe.derive(source, model.proto, given, analyzed.sizes, hints, tuple(run.custom_ops))


def score_groups(
    analyzed: AnalyzedModel, criterion: str, context: ScoreContext, progress: Progress | None = None
) -> dict[int, np.ndarray]:
    """One score per unit of every prunable group."""
    prunable = analyzed.analysis.prunable_groups
    scores = {}
    for k, group in enumerate(prunable):
        say(progress, "score", k, len(prunable))
        scores[group.id] = CRITERIA[criterion](analyzed.analysis, group, context)
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


def _calibration(
    analyzed: AnalyzedModel, options: ScoreOptions, run: RunOptions, progress: Progress | None
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The calibration samples, read or generated by the model (with what generated them): the
    first ``calib_samples`` feed the statistics, the ones after them (if any) measure the pruned
    model's fidelity."""
    model = analyzed.model
    if options.calib is not None:
        return load_calibration(options.calib, model.proto, options.calib_samples + fidelity.SAMPLES), None
    if options.calib_generate is None:
        return None, None
    say(progress, "generate")
    written = self_calibration.generate(
        model.proto,
        model.path,
        options.calib_generate,
        options.calib_length,
        run.seed,
        options.calib_top_k,
        tuple(run.custom_ops),
    )
    return written.ids, written.label


def _statistics(
    analyzed: AnalyzedModel,
    calib: dict[str, np.ndarray] | None,
    options: ScoreOptions,
    run: RunOptions,
    progress: Progress | None,
) -> Statistics | None:
    """Input statistics of every linear layer a prunable group feeds: from ``calib`` (named feeds),
    else synthetic.

    None where onnxruntime refuses the model without calibration data: data-free criteria then
    use the identity Hessian.
    """
    analysis, layers, model = analyzed.analysis, analyzed.layers, analyzed.model.proto
    wanted = list(
        dict.fromkeys(layer.activation for group in analysis.prunable_groups for layer in layers.of_group(group.dims))
    )
    if calib is None and not wanted:
        return None
    say(progress, "statistics")
    seed, custom_ops = run.seed, tuple(run.custom_ops)
    if calib is not None:
        try:
            return collect(model, calib, wanted, "calibration", seed, custom_ops)
        except (UsageError, RunTimeout):
            raise
        except Exception as exc:  # the samples fit the declared shapes, yet the graph refuses them
            raise calibration_run_error(exc) from None
    try:
        refuse_oversized(model)
        samples = options.synthetic_samples
        if samples is None:
            shapes = {d.tensor: analysis.graph.shape(d.tensor) for d in wanted}
            samples = synthetic_sample_count(model, wanted, shapes, analyzed.dense.flops)
        prior, imbalance = choose_prior(model, wanted, prior_probe_samples(model, samples), seed, custom_ops)
        feeds = synthetic_feeds(model, samples, seed, prior)
        statistics = collect(model, feeds, wanted, "synthetic", seed, custom_ops)
        statistics.prior, statistics.imbalance, statistics.feeds = prior.name, imbalance, feeds
        return statistics
    except RunTimeout:  # validation would only wait as long again
        raise
    except Exception:  # validation reports a model onnxruntime cannot run; scoring goes on without data
        return None
