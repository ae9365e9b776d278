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
from spa.sweep.axes import Setting, flag_args, options_of, shown
from spa.sweep.axes import describe as axes_describe

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
    eval_takes: str = "path"  # what the evaluation receives: "path" or "session"
    options: tuple[Setting, ...] = field(default=())  # prune options every point shares (--attention ...)


# the amounts a point prunes by: a ratio, or one target
AMOUNTS = ("ratio", "target_flops", "target_params", "target_latency")


@dataclass(frozen=True)
class Point:
    """One prune of the grid: a ratio or a target, a criterion, compensation on/off/default, and a
    value for each ``--set`` axis."""

    criterion: str
    compensate: bool | None
    ratio: float | None = None
    target_flops: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    settings: tuple[Setting, ...] = ()

    def options(self) -> dict:
        found = {name: getattr(self, name) for name in AMOUNTS}
        found.update(criterion=self.criterion, compensate=self.compensate)
        if self.settings:
            found["settings"] = dict(self.settings)
        return found

    def label(self) -> str:
        return describe(self.options())

    def stage_settings(self, spec: SweepSpec) -> list[Setting]:
        """Every option the point prunes with, as (field, value): the shared ones, then its own."""
        amount = [(name, getattr(self, name)) for name in AMOUNTS if getattr(self, name) is not None]
        if self.ratio is None:
            amount.append(("ratio", 0.0))  # a target replaces the ratio
        own = [("criterion", self.criterion), ("calib_samples", spec.calib_samples), ("round_to", spec.round_to)]
        if spec.calib is not None:
            own.append(("calib", spec.calib))
        if self.compensate is not None:
            own.append(("compensate", self.compensate))
        return [*spec.options, *amount, *own, *self.settings]


def describe(point: dict, short: bool = False) -> str:
    """A point's options in words (``ratio 0.2, l2, compensated, remove_blocks 1``), or tersely
    for a plot (``r0.2 l2+c remove_blocks=1``)."""
    name, value = next(((n, point[n]) for n in AMOUNTS if point.get(n) is not None), ("ratio", 0.0))
    word = name.removeprefix("target_")
    settings = point.get("settings") or {}
    if short:
        comp = {None: "", True: "+c", False: "-c"}[point.get("compensate")]
        extra = "".join(f" {k}={shown(v)}" for k, v in settings.items())
        return f"{word[0]}{value:g} {point['criterion']}{comp}{extra}"
    comp = {None: "", True: ", compensated", False: ", not compensated"}[point.get("compensate")]
    extra = f", {axes_describe(settings.items())}" if settings else ""
    return f"{word} {value:g}, {point['criterion']}{comp}{extra}"


def command(spec: SweepSpec, point: Point, output: str | None = None) -> str:
    """The ``spa prune`` line that prunes ``point`` again, as the sweep did."""
    args = ["spa", "prune", spec.model]
    for name in AMOUNTS:
        if getattr(point, name) is not None:
            args += [f"--{name.replace('_', '-')}", f"{getattr(point, name):g}"]
    args += ["--criterion", point.criterion]
    if point.compensate is not None:
        args.append("--compensate" if point.compensate else "--no-compensate")
    if spec.calib is not None:
        args += ["--calib", spec.calib, "--calib-samples", str(spec.calib_samples)]
    args += ["--round-to", str(spec.round_to), "--seed", str(spec.seed)]
    args += ["--providers", ",".join(spec.providers), "--threads", str(spec.threads), "--allow-slower"]
    for name, value in dict([*spec.options, *point.settings]).items():  # an axis replaces a shared value
        args += flag_args(name, value)
    if output is not None:
        args += ["-o", output]
    return shlex.join(args)


def point_key(spec: SweepSpec, point: Point) -> str:
    """Names a point by everything that decides its figures, so a resumed sweep skips only its own points."""
    text = command(spec, point) + f" eval={spec.evaluate or ''}"
    if spec.eval_takes != "path":  # keeps the keys of sweeps that passed paths
        text += f" eval_takes={spec.eval_takes}"
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


def parse_targets(option: str, text: str) -> list[float]:
    targets = _numbers(option, text)
    for target in targets:
        if not 0 < target <= 1:
            raise UsageError(f"{option} values must be in (0, 1], got {target:g}")
    return targets


def parse_criteria(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise UsageError("--criteria expects one or more criteria separated by commas")
    for name in names:
        if name not in CRITERIA:
            raise UsageError(f"unknown criterion '{name}' in --criteria (choose from {', '.join(sorted(CRITERIA))})")
    return list(dict.fromkeys(names))


def grid(
    amounts: list[tuple[str, float]],
    criteria: list[str],
    compensate: str,
    axes: list[tuple[str, tuple]] = (),  # type: ignore[assignment]
) -> list[Point]:
    """Every combination, in the order the amounts were given (ratios, then each target), then
    criteria, compensation and the axes: the order the table and the JSON list them in."""
    values = [[(name, v) for v in vs] for name, vs in axes]
    points = [
        Point(criterion, comp, **{name: amount}, settings=tuple(settings))
        for (name, amount), criterion, comp, *settings in itertools.product(
            amounts, criteria, COMPENSATION[compensate], *values
        )
    ]
    if not points:
        raise UsageError(
            "the grid is empty: give --ratios or a target (--target-flops, --target-params, --target-latency)"
        )
    if len(points) > MAX_POINTS:
        raise UsageError(f"the grid has {len(points)} points; at most {MAX_POINTS}")
    return list(dict.fromkeys(points))


def check_points(spec: SweepSpec, points: list[Point]) -> None:
    """Each point's options made as ``spa prune`` makes them: a value a stage refuses (an unknown
    attention unit, a depth out of range) exits 2 before any point runs."""
    for point in points:
        options_of(point.stage_settings(spec))


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
