"""Reshape, Flatten, Squeeze, Unsqueeze: channels become blocks or factors.

Axes are paired into runs of equal size product (see ``segments``).
* one axis <-> one axis: identity.
* several axes merge into one (conv -> flatten -> Gemm): channel c of the
  merged-from axis is the block of flat features whose c-coordinate is c.
* one axis splits into several ([C] -> [g, C/g] in a channel shuffle,
  [H*D] -> [H, D] for heads), or several merge into one: the channel is a
  product index, and only one factor can shrink while the others keep their
  size. Coupling every factor would collapse the product into one unit, so the
  factor is chosen once the rest of the graph is known (``Pending``). Around
  attention (see ``attention.axis_role``) it is the head axis, so a unit is a
  whole head (the contiguous block of its head_dim indices), or head_dim, so a
  unit is one index in every head, as ``RuleContext.attention`` says. Elsewhere
  it is the factor other ops already treat as a channel, else the largest.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from spa.core.coupling import HEAD_DIM, HEADS, QUERY_HEADS, Dim, Freeze, HeadInfo, LinkSet, Pending, identity, pairs
from spa.ops.base import PRESERVES, Operator
from spa.patterns.attention import axis_role, repeat_kv
from spa.patterns.groupnorm import group_reshape, one_group
from spa.patterns.roundtrip import round_trip
from spa.patterns.shapes import rewritable, segments, trace_vector


class ReshapeFamily(Operator):
    ops = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
    zero_kinds = dict.fromkeys(ops, PRESERVES)

    def _segment(self, node, dim, ctx):
        x, y = node.inputs[0], node.outputs[0]
        sx, sy = ctx.graph.shape(x), ctx.graph.shape(y)
        if sx is None or sy is None:
            return None
        for ins, outs in segments(sx, sy):
            if dim.tensor == x and dim.axis in ins:
                return (x, ins), (y, outs)
            if dim.tensor == y and dim.axis in outs:
                return (y, outs), (x, ins)
        return None

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        if dim.tensor not in (node.inputs[0], node.outputs[0]):
            links.freeze(dim, f"shape operand of {node.op_type} '{node.name}'")
            return links.out
        seg = self._segment(node, dim, ctx)
        if seg is None:
            trip = round_trip(ctx.graph, node, dim.tensor) if node.op_type == "Reshape" else None
            if trip is not None and trip.partner(dim) is not None:
                links.same(dim, trip.partner(dim))
                reason = trip.fixed_literal(dim)
                if reason:
                    links.freeze(dim, reason)
                return links.out
            links.freeze(dim, f"{node.op_type} '{node.name}' mixes this axis with others of unknown size")
            return links.out
        (_, mine), (theirs_t, theirs) = seg
        if len(mine) > 1 and len(theirs) > 1:
            ins, outs = (mine, theirs) if dim.tensor == node.inputs[0] else (theirs, mine)
            grouping = group_reshape(ctx.graph, node, ins, outs)
            if grouping is not None:
                self._link_groups(node, dim, grouping, links, ctx)
                return links.out
            links.freeze(dim, f"{node.op_type} '{node.name}' regroups this axis with others")
        elif len(mine) == 1 and len(theirs) == 1:
            links.same(dim, Dim(theirs_t, theirs[0]))
            self._check_target(node, dim, theirs[0] if theirs_t == node.outputs[0] else dim.axis, links, ctx)
        elif (single := one_group(ctx.graph, node)) is not None:
            self._link_one_group(node, dim, single, links, ctx)
        else:  # a product of several axes: which factor shrinks is settled once the graph is known
            links.add(Pending(dim))
        return links.out

    def _link_groups(self, node, dim, grouping, links, ctx):
        """GroupNorm written out: a group of C/G channels is one index of G (``patterns.groupnorm``)."""
        if dim not in (grouping.channels, grouping.groups):
            links.freeze(dim, f"the GroupNorm that Reshape '{node.name}' groups normalises over this axis")
            return
        channels = ctx.size(grouping.channels)
        index = np.arange(channels)
        links.add(pairs(grouping.channels, grouping.groups, index, index // grouping.per_group))
        target = grouping.groups if grouping.into_groups else grouping.channels
        self._check_target(node, dim, target.axis, links, ctx)

    def _link_one_group(self, node, dim, single, links, ctx):
        """GroupNorm of one group: C couples across the norm approximately, as through a LayerNorm."""
        if dim != single.channels:
            links.freeze(dim, f"the GroupNorm that Reshape '{node.name}' groups normalises over this axis")
            return
        link = identity(single.channels, single.partner, ctx.size(dim), exact=False)
        link.what = f"GroupNorm of one group written out (InstanceNormalization '{single.norm.name}')"
        links.add(link)
        if not single.into_groups:
            self._check_target(node, dim, 1, links, ctx)

    def resolve(self, node, dim, ctx):
        """Link the one factor of a product that may shrink; freeze the other channel factors.

        The factor is chosen once per Reshape and product, so that every dimension asking
        sees the same answer: in attention the head axis or head_dim, elsewhere the factor
        other ops already treat as a channel, else the largest (a channel shuffle keeps its
        group count).
        """
        links = LinkSet(ctx)
        (mine_t, mine), (theirs_t, theirs) = self._segment(node, dim, ctx)
        (multi_t, multi), (single_t, single) = (
            ((mine_t, mine), (theirs_t, theirs)) if len(mine) > 1 else ((theirs_t, theirs), (mine_t, mine))
        )
        key = (node.name, multi_t, tuple(multi))
        if key not in ctx.choices:
            ctx.choices[key] = self._choose(node, multi_t, multi, ctx)
        chosen = ctx.choices[key]
        if dim.tensor == multi_t and dim.axis != chosen:
            links.freeze(dim, self._merged_reason(node, dim, chosen, ctx))
            return links.out
        sizes = [ctx.graph.shape(multi_t)[a] for a in multi]
        coordinate = _coordinate(sizes, multi.index(chosen))
        links.add(pairs(Dim(multi_t, chosen), Dim(single_t, single[0]), coordinate, np.arange(len(coordinate))))
        self._check_target(node, dim, chosen if multi_t == node.outputs[0] else single[0], links, ctx)
        return links.out

    def _merged_reason(self, node, dim: Dim, chosen: int, ctx) -> str:
        merge = repeat_kv(ctx.graph, node) if ctx.attention == QUERY_HEADS else None
        if merge is not None and dim.tensor == node.inputs[0] and dim.axis == merge.kv_axis:
            # the user's unit, not a limit of the graph: say so, as the fused attention ops do
            return (
                f"{node.op_type} '{node.name}' repeats each K/V head for its query heads: "
                "K/V heads stay when query heads are the unit"
            )
        return (
            f"{node.op_type} '{node.name}' merges this axis with axis {chosen}, the factor of the product that shrinks"
        )

    def _choose(self, node, multi_t, multi, ctx):
        sizes = {a: ctx.graph.shape(multi_t)[a] for a in multi}
        merge = repeat_kv(ctx.graph, node) if multi_t == node.inputs[0] else None
        if merge and sorted(multi) == sorted((merge.kv_axis, merge.rep_axis)):
            # grouped-query attention: a KV head and its query heads go together, or with
            # query_heads the same query head of every group goes and K, V stay
            chosen = merge.rep_axis if ctx.attention == QUERY_HEADS else merge.kv_axis
            heads = ctx.graph.static_size(node.outputs[0], merge.heads_axis)
            head_dim = ctx.graph.static_size(node.outputs[0], -1)
            ctx.heads[Dim(multi_t, chosen)] = HeadInfo(ctx.attention, heads, head_dim, sizes[merge.kv_axis])
            return chosen
        # a split feeding attention (or the merge after it) shrinks the unit the user asked for;
        # the product is read forward from a split, backward from a merge
        roles = {a: axis_role(ctx.graph, multi_t, a, forward=multi_t == node.outputs[0]) for a in multi}
        heads = [a for a in multi if roles[a] == HEADS]
        head_dim = [a for a in multi if roles[a] == HEAD_DIM]
        if len(heads) == 1 and len(head_dim) == 1:
            chosen = head_dim[0] if ctx.attention == HEAD_DIM else heads[0]
            ctx.heads[Dim(multi_t, chosen)] = HeadInfo(ctx.attention, sizes[heads[0]], sizes[head_dim[0]])
            return chosen
        known = [a for a in multi if Dim(multi_t, a) in ctx.known_dims]
        return max(known or multi, key=lambda a: (sizes[a], -a))

    def _check_target(self, node, dim, y_axis, links, ctx):
        """A Reshape's target must be rewritable at the output axis that changes.

        A literal inside a shape computation that several Reshapes read (the dynamo exporter
        builds [batch, seq, -1, 64] once for Q, K and V) can hold one value only: the axes it
        sizes in all of them are linked, so they keep the same size.
        """
        if node.op_type != "Reshape":
            return
        entries = trace_vector(ctx.graph, node, 1)
        reason = rewritable(entries, y_axis)
        if reason:
            links.add(Freeze(dim, f"Reshape '{node.name}' target: {reason}"))
            return
        entry = entries[y_axis]
        static = _runtime_slot(ctx.graph, node, entries, y_axis) is not None
        if entry.kind == "runtime" and len(entry.source) == 2 and not static:
            # a size read at run time from another tensor (torchvision's Swin reshapes the attention
            # output to the C of its input) only follows the cut if that tensor's axis shrinks too.
            # Where that size is a static number with a slot of its own, the cut writes the new size
            # there instead (``rewrite``): the attention heads then prune while C stays
            links.same(Dim(node.outputs[0], y_axis), Dim(*entry.source))
        if entry.kind == "literal" and entry.value not in (-1, 0) and entry.source[0] != node.name:
            for other, position in _literal_readers(ctx).get(entry.source, ()):
                if other is not node:
                    links.same(Dim(node.outputs[0], y_axis), Dim(other.outputs[0], position))

    def rewrite(self, node, cut):
        if node.op_type != "Reshape":
            return
        y = node.outputs[0]
        entries = trace_vector(cut.graph, node, 1)
        for axis in range(len(cut.graph.shape(y) or ())):
            old, new = cut.old_size(Dim(y, axis)), cut.new_size(Dim(y, axis))
            if old == new:
                continue
            entry = entries[axis]
            if entry.kind == "literal" and entry.value not in (-1, 0):
                cut.set_const_element(*entry.source, new)
            elif entry.kind == "runtime" and len(entry.source) == 2 and cut.new_size(Dim(*entry.source)) != new:
                slot = _runtime_slot(cut.graph, node, entries, axis)
                if slot is not None:  # not linked to its source (``_check_target``): a literal takes its place
                    concat, index = slot
                    cut.set_input_const(concat, index, np.array([new], dtype=np.int64))
            elif entry.product is not None:  # size * literal: the literal takes what the size leaves
                (tensor, size_axis), factor = entry.product
                size = cut.new_size(Dim(tensor, size_axis))
                if size and new % size == 0 and new // size != factor.value:
                    cut.set_const_element(*factor.source, new // size)


def _runtime_slot(graph, node, entries: list, position: int):
    """(Concat, input index) that alone feeds element ``position`` of a Reshape's target, where
    a literal may replace it: the element is the size of a static axis (so its value is known
    before running and the cut can compute the new one), it enters the target as a one-element
    int64 input of the Concat that builds it, and nothing but this Reshape reads that Concat.
    None elsewhere: the size then stays read at run time and links to the axis it is read from.
    """
    entry = entries[position]
    if entry.kind != "runtime" or len(entry.source) != 2 or graph.static_size(*entry.source) is None:
        return None
    target = node.input(1)
    concat, readers = graph.producer.get(target), graph.consumers.get(target, [])
    if concat is None or concat.op_type != "Concat" or len(readers) != 1 or readers[0] is not node:
        return None
    start = 0
    for index, piece in enumerate(concat.inputs):
        length = graph.static_size(piece, 0) if len(graph.shape(piece) or ()) == 1 else None
        if length is None:
            return None
        if start <= position < start + length:
            return (concat, index) if length == 1 and graph.dtypes.get(piece) == onnx.TensorProto.INT64 else None
        start += length
    return None


def _literal_readers(ctx) -> dict[tuple, list]:
    """Where each literal of a computed Reshape target ends up: (Reshape, output axis) pairs."""
    if "reshape literals" not in ctx.memo:
        readers: dict[tuple, list] = {}
        for node in ctx.graph.nodes:
            if node.op_type == "Reshape":
                for position, entry in enumerate(trace_vector(ctx.graph, node, 1) or ()):
                    if entry.kind != "literal":
                        continue
                    assert entry.source is not None  # trace_vector says where every literal lives
                    if entry.source[0] != node.name:
                        readers.setdefault(entry.source, []).append((node, position))
        ctx.memo["reshape literals"] = readers
    return ctx.memo["reshape literals"]


def _coordinate(sizes: list[int], which: int) -> np.ndarray:
    """For each flat index over ``sizes`` (row-major), its coordinate along axis ``which``."""
    inner = math.prod(sizes[which + 1 :])
    return (np.arange(math.prod(sizes)) // inner) % sizes[which]
