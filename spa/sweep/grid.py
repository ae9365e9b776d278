"""The grid of a sweep: what each point prunes with, its key, and the command that reproduces it."""

from __future__ import annotations

import hashlib
import itertools
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from spa.core.errors import UsageError
from spa.pipeline.options import check_ratio
from spa.scoring.criteria import CRITERIA

# how many points one grid may hold: a typo in a range (0.1:0.6:0.0001) should not start days of work
MAX_POINTS = 1000
COMPENSATION = {"auto": (None,), "on": (True,), "off": (False,), "both": (True, False)}


@dataclass(frozen=True)
class SweepSpec:
    """What every point shares: the model, its data, how it is timed and judged."""

    model: str
    calib: str | None = None
    calib_samples: int = 128
    round_to: int | str = "auto"
    seed: int = 0
    providers: tuple[str, ...] = ("cpu",)
    threads: int = 0
    run_timeout: float = 0.0
    evaluate: str | None = None  # module:function or script.py:function
    extra: tuple[str, ...] = field(default=())  # kept for the reproducing command only


@dataclass(frozen=True)
class Point:
    """One prune of the grid: a ratio or a FLOPs target, a criterion, compensation on/off/default."""

    criterion: str
    compensate: bool | None
    ratio: float | None = None
    target_flops: float | None = None

    def options(self) -> dict:
        return {
            "ratio": self.ratio,
            "target_flops": self.target_flops,
            "criterion": self.criterion,
            "compensate": self.compensate,
        }

    def label(self) -> str:
        amount = f"ratio {self.ratio:g}" if self.ratio is not None else f"flops {self.target_flops:g}"
        comp = {None: "", True: ", compensated", False: ", not compensated"}[self.compensate]
        return f"{amount}, {self.criterion}{comp}"


def command(spec: SweepSpec, point: Point, output: str | None = None) -> str:
    """The ``spa prune`` line that prunes ``point`` again, as the sweep did."""
    args = ["spa", "prune", spec.model]
    if point.ratio is not None:
        args += ["--ratio", f"{point.ratio:g}"]
    else:
        args += ["--target-flops", f"{point.target_flops:g}"]
    args += ["--criterion", point.criterion]
    if point.compensate is not None:
        args.append("--compensate" if point.compensate else "--no-compensate")
    if spec.calib is not None:
        args += ["--calib", spec.calib, "--calib-samples", str(spec.calib_samples)]
    args += ["--round-to", str(spec.round_to), "--seed", str(spec.seed)]
    args += ["--providers", ",".join(spec.providers), "--threads", str(spec.threads), "--allow-slower"]
    if output is not None:
        args += ["-o", output]
    return shlex.join(args)


def point_key(spec: SweepSpec, point: Point) -> str:
    """Names a point by everything that decides its figures, so a resumed sweep skips only its own points."""
    text = command(spec, point) + f" eval={spec.evaluate or ''}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_ratios(text: str) -> list[float]:
    """``START:STOP:STEP`` (STOP included when the steps land on it) or ``R1,R2,...``."""
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise UsageError(f"--ratios expects START:STOP:STEP or a comma-separated list, got '{text}'")
        start, stop, step = (_number("--ratios", p) for p in parts)
        if step <= 0 or stop < start:
            raise UsageError(f"--ratios {text}: STEP must be above 0 and STOP at least START")
        if (stop - start) / step + 1 > MAX_POINTS:
            raise UsageError(f"--ratios {text} makes more than {MAX_POINTS} points")
        count = int((stop - start) / step + 1e-9) + 1
        ratios = [round(start + k * step, 10) for k in range(count)]
    else:
        ratios = _numbers("--ratios", text)
    for ratio in ratios:
        check_ratio("--ratios", ratio)
    return ratios


def parse_targets(text: str) -> list[float]:
    targets = _numbers("--target-flops", text)
    for target in targets:
        if not 0 < target <= 1:
            raise UsageError(f"--target-flops values must be in (0, 1], got {target:g}")
    return targets


def parse_criteria(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise UsageError("--criteria expects one or more criteria separated by commas")
    for name in names:
        if name not in CRITERIA:
            raise UsageError(f"unknown criterion '{name}' in --criteria (choose from {', '.join(sorted(CRITERIA))})")
    return list(dict.fromkeys(names))


def grid(ratios: list[float], targets: list[float], criteria: list[str], compensate: str) -> list[Point]:
    """Every combination, ratios first: the order the table and the JSON list them in."""
    points = [
        Point(criterion, comp, ratio=ratio)
        for ratio, criterion, comp in itertools.product(ratios, criteria, COMPENSATION[compensate])
    ] + [
        Point(criterion, comp, target_flops=target)
        for target, criterion, comp in itertools.product(targets, criteria, COMPENSATION[compensate])
    ]
    if not points:
        raise UsageError("the grid is empty: give --ratios or --target-flops")
    if len(points) > MAX_POINTS:
        raise UsageError(f"the grid has {len(points)} points; at most {MAX_POINTS}")
    return list(dict.fromkeys(points))


def _numbers(option: str, text: str) -> list[float]:
    values = [_number(option, part) for part in text.split(",") if part.strip()]
    if not values:
        raise UsageError(f"{option} expects numbers separated by commas, got '{text}'")
    return values


def _number(option: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{option} expects numbers, got '{text.strip()}'") from None


def model_label(path: str) -> str:
    return Path(path).name
