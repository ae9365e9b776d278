"""Choices spa makes by measuring, never by assuming: the ratio (or the point on the latency-aware
trajectory) that meets a FLOPs, params or latency target.

Every candidate is a real cut of the model. FLOPs and params are counted on a weightless cut
(new shapes, no data); latency is timed on the execution provider against the dense model,
the two alternating so machine noise hits both alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from spa.core.errors import UsageError
from spa.verify.bench import alternate, timing_session

# the most a target search may remove from each group; every group keeps at least one unit anyway
MAX_RATIO = 0.95
# a latency target is met when the measured fraction is within this relative distance of it
LATENCY_TOLERANCE = 0.05
MAX_LATENCY_PROBES = 8
TARGET_METRICS = ("flops", "params", "latency")


@dataclass(frozen=True)
class Target:
    metric: str  # "flops", "params" or "latency"
    fraction: float  # of the dense model's figure

    def __post_init__(self):
        if self.metric not in TARGET_METRICS:
            raise UsageError(f"unknown target '{self.metric}' (choose from {', '.join(TARGET_METRICS)})")
        if not 0 < self.fraction <= 1:
            raise UsageError(
                f"--target-{self.metric} must be in (0, 1], a fraction of the dense model; got {self.fraction}"
            )


@dataclass
class Probe:
    ratio: float
    fraction: float  # measured, of the dense model's figure


@dataclass
class TargetOutcome:
    metric: str
    goal: float
    ratio: float
    achieved: float
    met: bool
    provider: str | None = None
    probes: list[Probe] = field(default_factory=list)
    # a FLOPs or params target met both ways, timed against each other: how the cut was spread
    # ("one ratio" or "latency-aware") and the median ms of each
    allocation: str | None = None
    allocation_ms: dict[str, float] = field(default_factory=dict)


def reach_structural(
    metric: str, goal: float, measure: Callable[[float], float], out_of_reach_ok: bool = False
) -> TargetOutcome:
    """The smallest ratio whose model keeps at most ``goal`` of the dense FLOPs or params.

    Both only fall as the ratio grows (every group's keep count is monotone), so bisection
    finds it; plans are discrete, so ratios 1e-3 apart give the same model. With
    ``out_of_reach_ok`` an unreachable goal answers the largest ratio, unmet, instead of
    raising: a first guess for another target has no goal of its own to report.
    """
    probes: list[Probe] = []

    def probe(ratio: float) -> float:
        probes.append(Probe(ratio, measure(ratio)))
        return probes[-1].fraction

    if goal >= 1:
        return TargetOutcome(metric, goal, 0.0, 1.0, True, probes=probes)
    floor = probe(MAX_RATIO)
    if floor > goal and out_of_reach_ok:
        return TargetOutcome(metric, goal, MAX_RATIO, floor, False, probes=probes)
    if floor > goal:
        raise UsageError(
            f"--target-{metric} {goal:g} is out of reach: pruning every prunable group by "
            f"{MAX_RATIO:.0%} keeps {floor:.1%} of the {metric} (frozen groups keep the rest; "
            f"see `spa analyze`)"
        )
    low, high, high_fraction = 0.0, MAX_RATIO, floor
    while high - low > 1e-3:
        middle = (low + high) / 2
        fraction = probe(middle)
        if fraction <= goal:
            high, high_fraction = middle, fraction
        else:
            low = middle
    return TargetOutcome(metric, goal, round(high, 4), high_fraction, True, probes=probes)


def reach_latency(goal: float, measure: Callable[[float], float], first_guess: float, provider: str) -> TargetOutcome:
    """A ratio whose model runs in ``goal`` of the dense latency, within LATENCY_TOLERANCE.

    Latency is noisy and only roughly monotone in the ratio, so the search keeps a bracket
    and interpolates inside it (regula falsi, bisection when interpolation would hug an end),
    and answers with the probe closest to the goal.
    """
    probes: list[Probe] = []
    low, low_fraction = 0.0, 1.0
    high, high_fraction = MAX_RATIO, None
    ratio = min(max(first_guess, 0.01), MAX_RATIO)
    for _ in range(MAX_LATENCY_PROBES):
        fraction = measure(ratio)
        probes.append(Probe(round(ratio, 4), fraction))
        if abs(fraction / goal - 1) <= LATENCY_TOLERANCE / 2:  # margin for the noise of a later re-timing
            break
        if fraction > goal:
            low, low_fraction = ratio, fraction
        else:
            high, high_fraction = ratio, fraction
        if high - low < 0.005:
            break
        ratio = _next_ratio(goal, low, low_fraction, high, high_fraction)
    best = min(probes, key=lambda p: abs(p.fraction / goal - 1))
    return TargetOutcome(
        "latency", goal, best.ratio, best.fraction, abs(best.fraction / goal - 1) <= LATENCY_TOLERANCE, provider, probes
    )


def _next_ratio(goal: float, low: float, low_fraction: float, high: float, high_fraction: float | None) -> float:
    margin = 0.1 * (high - low)
    if high_fraction is None:  # nothing fast enough yet: extrapolate the line through the dense point
        slope = (1.0 - low_fraction) / low if low > 0 else 0.0
        guess = low + (low_fraction - goal) / slope if slope > 0 else (low + high) / 2
    elif low_fraction > high_fraction:
        guess = low + (high - low) * (low_fraction - goal) / (low_fraction - high_fraction)
    else:  # noise inverted the bracket: no slope to trust
        guess = (low + high) / 2
    return min(max(guess, low + margin), high - margin)


class LatencyMeter:
    """Times candidate models against the dense one on one execution provider."""

    def __init__(
        self,
        dense: onnx.ModelProto,
        feeds: dict[str, np.ndarray],
        provider: str,
        threads: int,
        custom_ops: tuple[str, ...] = (),
    ):
        self.feeds, self.provider, self.threads, self.custom_ops = feeds, provider, threads, custom_ops
        self.dense = timing_session(dense, provider, threads, custom_ops)
        self.runs = self._runs_for(self.dense)

    def _runs_for(self, session) -> int:
        """Enough runs for about a second per model (noise falls with the count), 10 to 200."""
        times = alternate([session], self.feeds, warmup=2, runs=3)[0]
        return int(min(200, max(10, math.ceil(1.0 / max(float(np.median(times)) / 1000, 1e-6)))))

    def fraction(self, model: onnx.ModelProto) -> float:
        """Median latency of ``model`` over the dense model's, measured alternately."""
        candidate = timing_session(model, self.provider, self.threads, self.custom_ops)
        dense_ms, model_ms = alternate([self.dense, candidate], self.feeds, warmup=3, runs=self.runs)
        return float(np.median(model_ms) / np.median(dense_ms))

    def medians(self, models: list[onnx.ModelProto]) -> list[float]:
        sessions = [timing_session(m, self.provider, self.threads, self.custom_ops) for m in models]
        return [float(np.median(t)) for t in alternate(sessions, self.feeds, warmup=3, runs=self.runs)]
