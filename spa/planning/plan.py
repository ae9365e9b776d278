"""Stage 5: decide which units go, from scores and the user's budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from spa.analysis.groups import Analysis


@dataclass
class Plan:
    """Units to remove, per group id. Empty arrays are left out."""

    removed: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def removed_units(self) -> np.ndarray:
        if not self.removed:
            return np.zeros(0, dtype=np.int64)
        return np.sort(np.concatenate(list(self.removed.values())))

    def restricted_to(self, group_ids) -> Plan:
        keep = set(group_ids)
        return Plan({g: u for g, u in self.removed.items() if g in keep})


def keep_count(n: int, ratio: float, round_to: int) -> int:
    keep = n - int(math.floor(n * ratio + 0.5))
    keep = max(keep, 1)
    if round_to > 1 and keep < n:
        keep = min(n, max(round_to, int(math.ceil(keep / round_to)) * round_to))
    return keep


def _order(scores: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Ascending score, ties broken by unit label, so plans never depend on sort stability."""
    return np.lexsort((units, scores))


def make_plan(
    analysis: Analysis,
    scores: dict[int, np.ndarray],
    ratio: float,
    global_rank: bool = False,
    round_to: int = 1,
    normalise: bool = True,
) -> Plan:
    """``normalise``: divide each group's scores by their mean before a global ranking (magnitudes
    differ per layer); criteria whose scores are already comparable (relative losses) skip it."""
    groups = analysis.prunable_groups
    plan = Plan()
    if ratio <= 0 or not groups:
        return plan
    if not global_rank:
        for group in groups:
            keep = keep_count(group.size, ratio, round_to)
            if keep < group.size:
                order = _order(scores[group.id], group.units)
                plan.removed[group.id] = np.sort(group.units[order[: group.size - keep]])
        return plan
    # global: one ranking over every prunable unit, scores made comparable by each group's mean
    entries: list[tuple[float, int, int]] = []
    for group in groups:
        score = scores[group.id]
        mean = score.mean()
        normalised = score / mean if normalise and mean > 0 else score
        entries.extend((float(s), group.id, int(u)) for s, u in zip(normalised, group.units))
    entries.sort()
    budget = int(math.floor(len(entries) * ratio + 0.5))
    left = {g.id: g.size for g in groups}
    chosen: dict[int, list[int]] = {}
    for _score, gid, unit in entries:
        if budget == 0:
            break
        if left[gid] > 1:
            chosen.setdefault(gid, []).append(unit)
            left[gid] -= 1
            budget -= 1
    for group in groups:
        picked = chosen.get(group.id, [])
        keep = keep_count(group.size, len(picked) / group.size, round_to) if picked else group.size
        if keep < group.size:
            by_score = [u for u in picked][: group.size - keep]
            plan.removed[group.id] = np.sort(np.array(by_score, dtype=np.int64))
    return plan


def plan_from_keeps(analysis: Analysis, scores: dict[int, np.ndarray], keeps: dict[int, int]) -> Plan:
    """The plan in which each group keeps ``keeps[group id]`` units (absent: all), its least
    important going first."""
    plan = Plan()
    for group in analysis.prunable_groups:
        keep = keeps.get(group.id, group.size)
        if keep < group.size:
            order = _order(scores[group.id], group.units)
            plan.removed[group.id] = np.sort(group.units[order[: group.size - keep]])
    return plan
