"""The vocabulary of channel coupling: what an operator's rule answers about its dimensions.

A rule knows one operator family. Asked about one channel dimension of one of
its op's tensors, it answers with:

* ``Link``: indices of that dimension that are the same channel as indices of
  another dimension (identity, offset, block, stride or permutation, all given
  as explicit index pairs so one union-find handles every kind);
* ``Freeze``: this dimension cannot shrink, and why;
* ``Sink``: the op consumes the channel without a weight that the soft model
  zeroes (e.g. ReduceSum over channels), so soft == hard needs the value zero;
* ``Pending``: an ambiguous Reshape split, resolved once the rest is known.

After a cut, ``rewrite`` fixes the attributes and shape constants of the op
(``group``, Reshape targets, Split sizes, Slice bounds...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from spa.core.graph import ModelGraph, Node


class Dim(NamedTuple):
    """One axis of one tensor."""

    tensor: str
    axis: int

    def __str__(self) -> str:
        return f"{self.tensor}[{self.axis}]"


@dataclass
class Link:
    """Index ``a_index[i]`` of ``a`` is the same channel as ``b_index[i]`` of ``b``."""

    a: Dim
    b: Dim
    a_index: np.ndarray
    b_index: np.ndarray
    exact: bool = True  # False where removal is not equal to zeroing (norms over channels)
    what: str = ""  # for an inexact link, the op that makes it so (filled in from the node when empty)


@dataclass(frozen=True)
class Freeze:
    dim: Dim
    reason: str


@dataclass(frozen=True)
class Sink:
    """A contraction or reduction that consumes the channel.

    Soft pruning zeroes parameters only, so soft == hard needs at least one of
    ``dims`` (the operands multiplied together) to be zero at the removed
    channel: always true when one of them is a weight, which the soft model zeroes.
    ``exact`` is False where removal also changes a divisor (ReduceMean).
    """

    dims: tuple[Dim, ...]
    exact: bool = True
    what: str = ""  # for an inexact sink, what reduces (a norm written out, or the op)


@dataclass(frozen=True)
class Pending:
    dim: Dim


Outcome = Link | Freeze | Sink | Pending

# what a unit of an attention layer is: a whole head (with grouped-query attention, a KV head
# and the query heads sharing it), one index of head_dim in every head, or (grouped-query) the
# same query head in every KV group, K and V kept
HEADS, HEAD_DIM, QUERY_HEADS = "heads", "head_dim", "query_heads"
ATTENTION_UNITS = (HEADS, HEAD_DIM, QUERY_HEADS)


@dataclass(frozen=True)
class HeadInfo:
    """An attention layer as the graph shows it; ``kind`` says which of its axes shrinks."""

    kind: str  # one of ATTENTION_UNITS
    heads: int  # query heads
    head_dim: int
    kv_heads: int | None = None  # set where K/V heads are shared by several query heads (repeat_kv)


class RuleContext:
    """What rules may ask about the model while grouping."""

    def __init__(self, graph: ModelGraph, opset: int, attention: str = "heads"):
        if attention not in ATTENTION_UNITS:
            raise ValueError(f"attention units must be one of {ATTENTION_UNITS}, got {attention!r}")
        self.graph = graph
        self.opset = opset
        self.attention = attention
        self.known_dims: set[Dim] = set()  # dims reached so far: settles ambiguous Reshape products
        self.choices: dict = {}  # Reshape product -> the factor that shrinks, fixed once chosen
        self.heads: dict[Dim, HeadInfo] = {}  # the axis that shrinks in each attention layer, for reports
        self.memo: dict = {}  # what rules compute once per model (which Reshapes share a target literal)

    def rank(self, tensor: str) -> int | None:
        shape = self.graph.shape(tensor)
        return None if shape is None else len(shape)

    def dim(self, tensor: str, axis: int) -> Dim | None:
        """A dimension with a non-negative axis, or None when the rank is unknown."""
        rank = self.rank(tensor)
        if rank is None or not -rank <= axis < rank:
            return None
        return Dim(tensor, axis % rank)

    def size(self, dim: Dim) -> int | None:
        return self.graph.static_size(dim.tensor, dim.axis)


def identity(a: Dim, b: Dim, n: int, exact: bool = True) -> Link:
    idx = np.arange(n, dtype=np.int64)
    return Link(a, b, idx, idx, exact)


def offset(a: Dim, b: Dim, n: int, b_offset: int, a_offset: int = 0) -> Link:
    idx = np.arange(n, dtype=np.int64)
    return Link(a, b, idx + a_offset, idx + b_offset)


def pairs(a: Dim, b: Dim, a_index, b_index, exact: bool = True) -> Link:
    return Link(a, b, np.asarray(a_index, dtype=np.int64), np.asarray(b_index, dtype=np.int64), exact)


@dataclass
class LinkSet:
    """Accumulates outcomes so rules can be written as short imperative code."""

    ctx: RuleContext
    out: list = field(default_factory=list)

    def same(self, a: Dim | None, b: Dim | None, exact: bool = True) -> None:
        """Couple two dimensions index for index, freezing on size mismatch."""
        if a is None or b is None or a == b:
            return
        na, nb = self.ctx.size(a), self.ctx.size(b)
        if na is None or nb is None:
            reason = f"size of {b if nb is None else a} is unknown"
        elif na != nb:
            if nb == 1 or na == 1:
                return  # broadcast: nothing to remove on the size-1 side
            reason = f"{a} and {b} have different sizes {na} and {nb}"
        else:
            self.out.append(identity(a, b, na, exact))
            return
        # both sides: the one asked about may be either, and an uncoupled partner must not shrink alone
        self.out.extend((Freeze(a, reason), Freeze(b, reason)))

    def same_all(self, dim: Dim, others, key) -> None:
        """``same(dim, other)`` for each of ``others``: the members of one class of dims that an
        N-ary op (Sum, Concat, Split) couples index for index, ``key`` naming the class.

        Asked in turn about each of N members, a pairwise answer is N squared links. Once one
        answer coupled its asker to every member without a freeze, any later answer only repeats
        links between dims already connected and already queued: ``coupled`` says which askers
        may skip it (before building ``others``, which alone is N per asker).
        """
        start = len(self.out)
        for other in others:
            self.same(dim, other)
        added = self.out[start:]
        if key not in self.ctx.memo and not any(isinstance(item, Freeze) for item in added):
            self.ctx.memo[key] = {dim} | {item.b for item in added}

    def answered(self, node: Node) -> bool:
        """Has the node already given the answer that follows, and marks it given.

        For the part of a rule that answers with the whole op's coupling whichever of its dims
        asked (a MatMul's, a Conv's): asked again by another dim, it would only repeat links
        and sinks the walk already holds, between dims already queued.
        """
        key = ("answered", node.index)
        if key in self.ctx.memo:
            return True
        self.ctx.memo[key] = True
        return False

    def coupled(self, dim: Dim, key) -> bool:
        """Did an earlier ``same_all`` of class ``key`` couple ``dim`` to all its members?"""
        linked = self.ctx.memo.get(key)
        return linked is not None and dim in linked

    def add(self, item: Outcome) -> None:
        self.out.append(item)

    def freeze(self, dim: Dim, reason: str) -> None:
        self.out.append(Freeze(dim, reason))
