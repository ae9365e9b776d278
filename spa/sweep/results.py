"""A sweep's results: the JSON it streams and resumes from, the CSV, the terminal table, and the
choice ``--pick`` makes."""

from __future__ import annotations

import csv
import io
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

from spa.core.errors import UsageError
from spa.formats.files import write_bytes_atomic
from spa.sweep.grid import describe

# the columns of the CSV, in order; the JSON keeps every field
COLUMNS = (
    "ratio",
    "target_flops",
    "target_params",
    "target_latency",
    "criterion",
    "compensate",
    "status",
    "params",
    "params_ratio",
    "flops",
    "flops_ratio",
    "dense_ms",
    "pruned_ms",
    "speedup",
    "valid",
    "top1_agreement",
    "cosine",
    "eval",
    "quality",
    "error",
    "eval_error",
    "seconds",
    "command",
)
METRICS = ("quality", "speedup", "params_ratio", "flops_ratio", "pruned_ms")
COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def finished_points(path: Path | None) -> dict[str, dict]:
    """The points an earlier sweep into ``path`` completed, by key: a rerun skips them. Failed
    points are run again: what failed them may be fixed."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        points = data["points"]
        return {p["key"]: p for p in points if p.get("status") == "ok"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{path} is not a sweep's JSON to resume from: remove it or name another --json") from None


def write_json(path: Path, header: dict, points: list[dict]) -> None:
    text = json.dumps({**header, "points": points}, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode())


def csv_text(points: list[dict]) -> str:
    """One row a point; each ``--set`` axis is a column of its own, after the amount."""
    axes = list(dict.fromkeys(name for p in points for name in p.get("settings") or {}))
    columns = [*COLUMNS[:4], *axes, *COLUMNS[4:]]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for point in points:
        row = {**point, **(point.get("settings") or {})}
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return out.getvalue()


def table(points: list[dict]) -> str:
    rows = [("point", "params", "FLOPs", "speedup", "valid", "quality", "status")]
    for p in points:
        ok = p.get("status") == "ok"
        rows.append(
            (
                describe(p),
                _percent(p.get("params_ratio")) if ok else "",
                _percent(p.get("flops_ratio")) if ok else "",
                f"{p['speedup']:.2f}x" if ok and p.get("speedup") else "",
                ("yes" if p.get("valid") else "no") if ok else "",
                f"{p['quality']:.4f}" if ok and p.get("quality") is not None else "",
                "ok" if ok and not p.get("eval_error") else _failure(p),
            )
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else ""


def _failure(point: dict) -> str:
    reason = point.get("error") or f"eval failed: {point.get('eval_error')}"
    return reason if len(reason) <= 60 else reason[:57] + "..."


@dataclass(frozen=True)
class Bar:
    """``--pick``'s condition: METRIC OP NUMBER."""

    metric: str
    comparison: str
    value: float

    def met(self, point: dict) -> bool:
        got = point.get(self.metric)
        return point.get("status") == "ok" and got is not None and COMPARISONS[self.comparison](got, self.value)


def parse_bar(text: str) -> Bar:
    match = re.fullmatch(r"\s*(\w+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", text)
    if match is None or match[1] not in METRICS:
        raise UsageError(f"--pick expects METRIC>=NUMBER (METRIC: {', '.join(METRICS)}; also <=, >, <), got '{text}'")
    try:
        value = float(match[3])
    except ValueError:
        raise UsageError(f"--pick expects a number after '{match[2]}', got '{match[3]}'") from None
    return Bar(match[1], match[2], value)


def pick(points: list[dict], bar: Bar) -> dict | None:
    """The fastest valid point meeting ``bar``: the highest speedup over the dense model (timed
    alternately in one process, so steadier than a latency compared across workers), smaller
    FLOPs breaking ties."""
    meeting = [p for p in points if bar.met(p) and p.get("valid")]
    if not meeting:
        return None
    return max(meeting, key=lambda p: (p.get("speedup") or 0.0, -(p.get("flops_ratio") or 1.0)))
