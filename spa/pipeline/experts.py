"""Whole experts out of a mixture-of-experts model, before its channels are pruned.

``PlanOptions.remove_experts`` experts (a count, or a fraction of each layer's) leave every MoE
layer: the ones with the lowest routing weight times output size on the statistics
(``spa.scoring.experts``), each with its router column. With ``CutOptions.soft`` the router is
made never to pick them instead (their logits -inf), which equals removing them. The rest of the
pipeline then prunes the model with fewer experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from spa.core.errors import UsageError
from spa.core.runtime import batches
from spa.formats.model import Model, Progress, say
from spa.formats.shapes import infer_shapes
from spa.patterns.moe import ExpertLayer, expert_layers
from spa.pipeline.options import RunOptions, ScoreOptions
from spa.scoring.experts import expert_scores
from spa.scoring.statistics import load_calibration, synthetic_feeds
from spa.transforms.experts import remove_experts

SYNTHETIC_SEQUENCES = 32  # token sequences drawn for the routing statistics without --calib


@dataclass
class ExpertRemoval:
    """What left each MoE layer, and the scores that chose it."""

    layers: list[str]
    experts_before: list[int]
    experts_after: list[int]
    k_before: list[int]
    k_after: list[int]
    removed: dict[str, list[int]]
    scores: dict[str, list[float]]
    data: str  # "calibration" or "synthetic"
    soft: bool
    params_before: int = 0  # the model's, before any expert went
    flops_before: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def experts_to_remove(count: float, experts: int, layer: str) -> int:
    """How many of a layer's ``experts`` ``count`` (a whole number, or a fraction in (0, 1)) means."""
    removed = int(count * experts + 0.5) if count < 1 else int(count)  # halves round up, not to even
    if removed >= experts:
        raise UsageError(f"--remove-experts {count:g}: layer '{layer}' has {experts} experts; at least one must stay")
    return removed


def remove_model_experts(
    model: Model, count: float, scoring: ScoreOptions, run: RunOptions, soft: bool, progress: Progress | None = None
) -> tuple[Model, ExpertRemoval]:
    """``model`` without ``count`` experts per MoE layer (masked, with ``soft``)."""
    layers, refused = expert_layers(model.graph)
    if not layers:
        why = f": {'; '.join(refused)}" if refused else ""
        raise UsageError(f"--remove-experts: no mixture-of-experts layer spa can remove experts from{why}")
    plan = {layer.name: experts_to_remove(count, layer.experts, layer.name) for layer in layers}
    say(progress, "experts")
    feeds, data = _feeds(model, scoring, run)
    scores = expert_scores(model.proto, layers, batches(model.proto, feeds), run.seed, tuple(run.custom_ops))
    keep = {layer.name: _kept(scores[layer.name], plan[layer.name]) for layer in layers}
    proto = remove_experts(model.proto, layers, keep, soft)
    # no path: what runs the model from its file (statistics, validation) must run this one
    reduced = replace(model.derived(infer_shapes(proto)), path=None)
    return reduced, _record(layers, keep, scores, data, soft)


def _feeds(model: Model, scoring: ScoreOptions, run: RunOptions) -> tuple[dict[str, np.ndarray], str]:
    if scoring.calib is not None:
        return load_calibration(scoring.calib, model.proto, scoring.calib_samples), "calibration"
    samples = scoring.synthetic_samples or SYNTHETIC_SEQUENCES
    return synthetic_feeds(model.proto, samples, run.seed), "synthetic"


def _kept(scores: np.ndarray, removed: int) -> np.ndarray:
    """The experts that stay: all but the ``removed`` lowest scores (ties: the later expert goes)."""
    order = sorted(range(len(scores)), key=lambda e: (scores[e], -e))
    return np.sort(np.array(order[removed:], dtype=np.int64))


def _record(layers: list[ExpertLayer], keep, scores, data: str, soft: bool) -> ExpertRemoval:
    after = [len(keep[layer.name]) for layer in layers]
    return ExpertRemoval(
        layers=[layer.name for layer in layers],
        experts_before=[layer.experts for layer in layers],
        experts_after=[layer.experts if soft else n for layer, n in zip(layers, after)],
        k_before=[layer.k for layer in layers],
        k_after=[layer.k if soft else min(layer.k, n) for layer, n in zip(layers, after)],
        removed={layer.name: sorted(set(range(layer.experts)) - set(keep[layer.name].tolist())) for layer in layers},
        scores={layer.name: [float(s) for s in scores[layer.name]] for layer in layers},
        data=data,
        soft=soft,
    )
