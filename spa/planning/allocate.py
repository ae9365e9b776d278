"""Latency-aware allocation: how many units each group keeps when layers cost different times.

One ratio for every group spends the same share of each layer, whatever the layer costs. Here
the groups give up units one step at a time, and each step is the one that costs the least
importance per millisecond saved (the idea of HALP, Shen et al., NeurIPS 2022), the
milliseconds read off the measured width table (``spa.planning.widths``). A step may jump
several rungs of a group's ladder at once: a count that saves nothing over a wider one (the
width curve is flat there) is never stopped at.

The steps form one trajectory from the dense model down; a target search only chooses where
on it to stop, so every stopping point is a model the greedy order produced, and the fraction
kept only falls along it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spa.analysis.groups import Group
from spa.planning.widths import WidthTable, candidate_counts

# the most a step may remove from a group is bounded by this share kept (every group keeps a unit)
MIN_KEEP_SHARE = 0.05
# an untimed group of at most this many units may stop at any count
UNTIMED_EVERY_COUNT = 64


@dataclass(frozen=True)
class Step:
    group: int
    keep: int  # the group's units after this step
    predicted_ms: float  # the table's time of all its layers after this step
    removed: int  # units removed from all groups so far


class Trajectory:
    """The greedy order of steps for one scored model and one width table."""

    def __init__(self, table: WidthTable, groups: list[Group], scores: dict[int, np.ndarray], normalise: bool):
        self.table = table
        self.sizes = {g.id: g.size for g in groups}
        self.total_units = sum(self.sizes.values())
        self.losses = {g.id: _removal_losses(scores[g.id], normalise) for g in groups}
        self.ladders = {g.id: [c for c in self._ladder(g) if c >= _least(g.size)] for g in groups}
        self.neighbours = self._neighbours()
        self.steps = self._walk()

    def keeps_after(self, steps: int) -> dict[int, int]:
        """Each group's keep count after the first ``steps`` steps."""
        keep = dict(self.sizes)
        for step in self.steps[: max(steps, 0)]:
            keep[step.group] = step.keep
        return keep

    def keeps_at(self, position: float) -> dict[int, int]:
        """Keep counts ``position`` (0 to 1) of the way along the trajectory: the knob target searches turn."""
        return self.keeps_after(int(round(min(max(position, 0.0), 1.0) * len(self.steps))))

    def keeps_removing(self, ratio: float) -> dict[int, int]:
        """Keep counts that remove ``ratio`` of all units (rounded), in the trajectory's order; the
        last step taken is cut short where it would remove more than that."""
        goal = int(math.floor(ratio * self.total_units + 0.5))
        keep, removed = dict(self.sizes), 0
        for step in self.steps:
            if removed >= goal:
                break
            take = min(keep[step.group] - step.keep, goal - removed)
            keep[step.group] -= take
            removed += take
        return keep

    def _ladder(self, group: Group) -> list[int]:
        """The counts a group may step to: those its curves were measured at; for a group too
        small to time, every count (a ladder for a wide one, to bound the walk)."""
        measured = self.table.candidates.get(group.id)
        if measured:
            return measured
        return (
            list(range(1, group.size + 1))
            if group.size <= UNTIMED_EVERY_COUNT
            else candidate_counts(group.size, group.size)
        )

    def _neighbours(self) -> dict[int, set[int]]:
        """Groups whose layers' times change with each group's count (they share a layer)."""
        near: dict[int, set[int]] = {gid: {gid} for gid in self.sizes}
        for layer in self.table.layers:
            sharing = [g for g in layer.sides.values() if g in near]
            for g in sharing:
                near[g].update(sharing)
        return near

    def _walk(self) -> list[Step]:
        keep = dict(self.sizes)
        total = sum(self.table.layer_ms(layer, keep.__getitem__) for layer in self.table.layers)
        best = {gid: self._best_move(gid, keep) for gid in self.sizes}
        steps: list[Step] = []
        removed = 0
        while True:
            moves = [(move, gid) for gid, move in best.items() if move is not None]
            if not moves:
                return steps
            (_, count, saved), gid = min(moves)
            removed += keep[gid] - count
            keep[gid] = count
            total -= saved
            steps.append(Step(gid, count, total, removed))
            for other in self.neighbours[gid]:
                best[other] = self._best_move(other, keep)

    def _best_move(self, gid: int, keep: dict[int, int]) -> tuple[tuple[int, float], int, float] | None:
        """((tier, cost), count, ms saved) of the group's cheapest next step: tier 0 steps save time,
        costed by importance lost per ms; tier 1 steps save none, costed per unit (they come last,
        so that a FLOPs or params target past what time alone reaches can still be met)."""
        current = keep[gid]
        layers = [self.table.layers[k] for k in self.table.by_group.get(gid, [])]
        now = sum(self.table.layer_ms(layer, keep.__getitem__) for layer in layers)
        loss = self.losses[gid]
        best = None
        for count in self.ladders[gid]:
            if count >= current:
                break
            trial = {**keep, gid: count}
            saved = now - sum(self.table.layer_ms(layer, trial.__getitem__) for layer in layers)
            lost = loss[self.sizes[gid] - count] - loss[self.sizes[gid] - current]
            cost = (0, lost / saved) if saved > 1e-9 else (1, lost / (current - count))
            if best is None or (cost, -count) < (best[0], -best[1]):
                best = (cost, count, saved)
        return best


def _least(size: int) -> int:
    return max(1, math.ceil(size * MIN_KEEP_SHARE))


def _removal_losses(scores: np.ndarray, normalise: bool) -> np.ndarray:
    """``losses[j]``: the importance of the group's ``j`` least important units, which go first.
    Scores are divided by their mean where criteria leave them on per-layer scales."""
    values = np.asarray(scores, dtype=np.float64)
    mean = values.mean() if values.size else 0.0
    if normalise and mean > 0:
        values = values / mean
    return np.concatenate([[0.0], np.cumsum(np.sort(values))])
