"""One scatter plot of the sweep's page as inline SVG: quality against a cost, the Pareto front
joined and named, round-numbered axes with a grid, the dense model's cost marked."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass

from spa.sweep.grid import describe

WIDTH, HEIGHT = 900, 420
LEFT, RIGHT, TOP, BOTTOM = 78, 20, 18, 58
CHAR = 6.2  # the width of one 11px label character, near enough to keep labels apart
OFFSETS = ((7, 14), (7, -8), (-7, 14), (-7, -8), (7, 26), (-7, 26), (7, -20), (-7, -20))


@dataclass(frozen=True)
class Axis:
    field: str
    label: str
    shown: Callable[[float, float], str]  # a value, the step between ticks -> its tick text


def pareto(points: list[dict], x: str) -> list[dict]:
    """The points no other beats on both: lower ``x`` and higher quality. Ordered by ``x``."""
    front: list[dict] = []
    for point in sorted(points, key=lambda p: (p[x], -p["quality"])):
        if not front or point["quality"] > front[-1]["quality"]:
            front.append(point)
    return front


def plot(points: list[dict], axis: Axis, quality: str, dense: float | None) -> str:
    """``points`` (each with ``axis.field`` and ``quality``) against ``axis``; ``dense`` is the
    dense model's value on it, drawn as a dashed line, or None."""
    xs = [p[axis.field] for p in points] + ([dense] if dense is not None else [])
    ys = [p["quality"] for p in points]
    xticks, yticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    sx = _scale(LEFT, WIDTH - RIGHT, xticks)
    sy = _scale(HEIGHT - BOTTOM, TOP, yticks)
    front = pareto(points, axis.field)
    best = {id(p) for p in front}
    svg = [
        f'<svg width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">',
        *_grid(xticks, yticks, sx, sy, axis, _step(xticks), _step(yticks)),
        f'<text class="axis" x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT - 14}" '
        f'text-anchor="middle">{_e(axis.label)}</text>',
        f'<text class="axis" x="16" y="{(TOP + HEIGHT - BOTTOM) / 2:.0f}" '
        f'transform="rotate(-90 16 {(TOP + HEIGHT - BOTTOM) / 2:.0f})" text-anchor="middle">{_e(quality)}</text>',
    ]
    if dense is not None:
        at = sx(dense)
        svg.append(f'<line class="dense" x1="{at:.1f}" y1="{TOP}" x2="{at:.1f}" y2="{HEIGHT - BOTTOM}"/>')
        svg.append(f'<text x="{at - 4:.1f}" y="{TOP + 10}" text-anchor="end">dense</text>')
    svg.append(
        '<polyline class="front" points="{}"/>'.format(
            " ".join(f"{sx(p[axis.field]):.1f},{sy(p['quality']):.1f}" for p in front)
        )
    )
    for p in sorted(points, key=lambda p: id(p) in best):  # the front's points drawn on top
        tip = f"{describe(p)}\nquality {p['quality']:.4g}, {axis.label} {p[axis.field]:.4g}\n{p['command']}"
        svg.append(
            f'<circle class="{"pt best" if id(p) in best else "pt"}" cx="{sx(p[axis.field]):.1f}" '
            f'cy="{sy(p["quality"]):.1f}" r="5"><title>{_e(tip)}</title></circle>'
        )
    svg += _labels(front, [(sx(p[axis.field]), sy(p["quality"])) for p in points], axis.field, sx, sy)
    svg.append("</svg>")
    return "\n".join(svg)


def _labels(front: list[dict], dots: list[tuple[float, float]], field: str, sx, sy) -> list[str]:
    """The front's points named beside them, each where it covers no other label or point; a name
    with no free place is left to the point's tooltip."""
    taken: list[tuple[float, float, float, float]] = [(x - 5, y - 5, x + 5, y + 5) for x, y in dots]
    labels = []
    for p in front:
        x, y, text = sx(p[field]), sy(p["quality"]), describe(p, short=True)
        width = CHAR * len(text)
        for dx, dy in OFFSETS:
            left = x + dx if dx > 0 else x + dx - width
            box = (left, y + dy - 10, left + width, y + dy + 2)
            inside = box[0] >= LEFT and box[2] <= WIDTH - RIGHT and box[1] >= TOP - 4 and box[3] <= HEIGHT - BOTTOM
            if inside and not any(_overlap(box, other) for other in taken):
                taken.append(box)
                labels.append(f'<text x="{box[0]:.1f}" y="{y + dy:.1f}">{_e(text)}</text>')
                break
    return labels


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart) that span ``low``..``high``."""
    if high <= low:
        span = abs(low) * 0.1 or 1.0
        low, high = low - span, high + span
    raw = (high - low) / (count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step + 1e-9) * step
    ticks = [first]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(first + len(ticks) * step)
    return ticks


def _step(ticks: list[float]) -> float:
    return ticks[1] - ticks[0] if len(ticks) > 1 else 1.0


def _scale(start: float, end: float, ticks: list[float]):
    """Pixels from values, the ticks spanning the plot with a little room at either end."""
    pad = (ticks[-1] - ticks[0]) * 0.03
    low, high = ticks[0] - pad, ticks[-1] + pad
    return lambda v: start + (v - low) / (high - low) * (end - start)


def _grid(xticks, yticks, sx, sy, axis: Axis, xstep: float, ystep: float) -> list[str]:
    marks = []
    for v in xticks:
        at = sx(v)
        marks.append(f'<line class="grid" x1="{at:.1f}" y1="{TOP}" x2="{at:.1f}" y2="{HEIGHT - BOTTOM}"/>')
        marks.append(
            f'<text x="{at:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{axis.shown(v, xstep)}</text>'
        )
    for v in yticks:
        at = sy(v)
        marks.append(f'<line class="grid" x1="{LEFT}" y1="{at:.1f}" x2="{WIDTH - RIGHT}" y2="{at:.1f}"/>')
        marks.append(f'<text x="{LEFT - 6}" y="{at + 4:.1f}" text-anchor="end">{decimal(v, ystep)}</text>')
    return marks


def decimal(value: float, step: float) -> str:
    """``value`` with as many decimals as ticks ``step`` apart need."""
    power = math.floor(math.log10(step) + 1e-9)
    places = max(0, -power + (1 if round(step / 10**power, 6) == 2.5 else 0))
    return f"{value:.{places}f}"


def count(value: float, step: float) -> str:
    """A count of parameters, in thousands or millions."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if max(abs(value), step) >= size:
            return decimal(value / size, step / size) + suffix
    return decimal(value, step)


def _e(value) -> str:
    return html.escape(str(value), quote=True)
