"""Which unit an attention layer with grouped-query heads loses: whole KV heads or query heads.

With 2 KV heads, the smallest cut of whole KV heads (a KV head with its query heads) is half the
attention: ``--ratio 0.3`` would remove 50%. Removing query heads evenly in every KV group keeps
the cache layout and comes in steps of one query head per group (8 query heads over 2 KV heads:
25%). ``auto`` takes whichever lands nearer the ratio asked for, KV heads on a tie, since they
also shrink the cache and the keys and values computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from spa.analysis.groups import Analysis
from spa.core.coupling import HEADS, QUERY_HEADS
from spa.planning.plan import keep_count

AUTO = "auto"


@dataclass(frozen=True)
class HeadUnitChoice:
    unit: str  # HEADS or QUERY_HEADS
    kv_fraction: float  # of the heads one attention layer loses with whole KV heads
    query_fraction: float  # ... with query heads evenly per KV group

    def describe(self, ratio: float) -> str:
        chosen = "query heads evenly in every KV group (cache kept)" if self.unit == QUERY_HEADS else "whole KV heads"
        return (
            f"{chosen}: --ratio {ratio:g} removes {self.kv_fraction:.0%} of an attention layer's heads as whole KV "
            f"heads, {self.query_fraction:.0%} as query heads"
        )


def _cut_fraction(units: int, ratio: float) -> float:
    return (units - keep_count(units, ratio, 1)) / units


def choose(analysis: Analysis, ratio: float) -> HeadUnitChoice | None:
    """The unit nearest ``ratio`` over the prunable grouped-query attention layers; None where there
    are none (no choice to make)."""
    layers = [
        g.attention
        for g in analysis.prunable_groups
        if g.attention is not None
        and g.attention.kind == HEADS
        and g.attention.kv_heads
        and g.attention.heads > g.attention.kv_heads
    ]
    if not layers or ratio <= 0:
        return None
    kv = [_cut_fraction(h.kv_heads, ratio) for h in layers if h.kv_heads]
    query = [_cut_fraction(h.heads // h.kv_heads, ratio) for h in layers if h.kv_heads]
    kv_miss, query_miss = sum(abs(f - ratio) for f in kv), sum(abs(f - ratio) for f in query)
    unit = QUERY_HEADS if query_miss < kv_miss else HEADS
    return HeadUnitChoice(unit, sum(kv) / len(kv), sum(query) / len(query))
