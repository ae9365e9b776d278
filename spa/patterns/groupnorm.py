"""GroupNorm written out: Reshape [N, C, *S] -> [N, G, -1], InstanceNormalization, Reshape back.

Both torch exporters spell ``nn.GroupNorm`` this way (followed by a per-channel Mul and Add for
the affine weights). The grouped tensor's product space is [G, C/G * prod(S)] in row-major order:
group g is the contiguous block of channels [g * C/G, (g + 1) * C/G), so channel c belongs to
group c // (C/G). Removing a whole group removes one index of G and its C/G channels, and the
statistics of every other group stay as they were: the unit is a whole group.

Removing the same number of channels from every group instead would change the mean and variance
of each group it touches, so it is not exact and not offered. A GroupNorm of one group (a
LayerNorm over C * prod(S)) has a single unit, so its channels do not shrink; one of C groups
(an InstanceNorm) leaves each channel its own group, which the Reshape rule pairs axis for axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spa.core.coupling import Dim
from spa.core.graph import ModelGraph, Node

NORM_OP = "InstanceNormalization"


@dataclass(frozen=True)
class GroupReshape:
    """A Reshape of a GroupNorm written out, seen from both of its sides."""

    channels: Dim  # C, on the [N, C, *S] side
    groups: Dim  # G, on the [N, G, L] side that InstanceNormalization normalises
    per_group: int  # C / G
    into_groups: bool  # the Reshape into groups (its output is grouped), not the one back


def group_reshape(graph: ModelGraph, node: Node, ins: list[int], outs: list[int]) -> GroupReshape | None:
    """The GroupNorm reading of Reshape ``node``, whose axes ``ins`` (of its input) and ``outs`` (of
    its output) are one run of equal size product, or None where it is not one.

    One side is [N, C, *S] with the run C, *S; the other is the rank-3 [N, G, L] that an
    InstanceNormalization reads (the Reshape into groups) or writes (the Reshape back), with the
    run G, L. G must divide C, and both sides must be static along the run.
    """
    if node.op_type != "Reshape":
        return None
    x, y = node.inputs[0], node.outputs[0]
    for grouped, grouped_axes, plain, plain_axes, is_output in ((y, outs, x, ins, True), (x, ins, y, outs, False)):
        if grouped_axes != [1, 2] or plain_axes[:1] != [1] or len(plain_axes) < 2:
            continue
        if len(graph.shape(grouped) or ()) != 3 or not _normalised(graph, grouped, is_output):
            continue
        channels, groups = graph.static_size(plain, 1), graph.static_size(grouped, 1)
        rest = [graph.static_size(plain, a) for a in plain_axes[1:]]
        if channels is None or groups is None or None in rest or channels % groups:
            continue
        if graph.static_size(grouped, 2) != channels // groups * math.prod(rest):  # type: ignore[arg-type]
            continue
        return GroupReshape(Dim(plain, 1), Dim(grouped, 1), channels // groups, is_output)
    return None


def _normalised(graph: ModelGraph, grouped: str, is_output: bool) -> bool:
    """Is ``grouped`` the input (into groups) or the output (back) of an InstanceNormalization?"""
    if is_output:
        return any(n.op_type == NORM_OP and n.inputs[0] == grouped for n in graph.consumers.get(grouped, []))
    producer = graph.producer.get(grouped)
    return producer is not None and producer.op_type == NORM_OP


@dataclass(frozen=True)
class OneGroup:
    """A GroupNorm of one group written out: [N, C, *S] -> [N, 1, L] -> InstanceNormalization -> back."""

    channels: Dim  # C, on this Reshape's plain side
    partner: Dim  # C on the plain side of the other Reshape of the pair
    norm: Node  # the InstanceNormalization between them
    into_groups: bool


def one_group(graph: ModelGraph, node: Node) -> OneGroup | None:
    """The one-group GroupNorm that Reshape ``node`` opens or closes, or None.

    Its statistics span every channel, so a channel removed changes them for the others: the
    channels couple across the norm only approximately, as through a LayerNorm.
    """
    if node.op_type != "Reshape":
        return None
    x, y = node.inputs[0], node.outputs[0]
    if _is_one_group(graph, y):
        for reader in graph.consumers.get(y, []):
            back = (
                _only_reader(graph, reader.outputs[0]) if reader.op_type == NORM_OP and reader.inputs[0] == y else None
            )
            if back is not None and back.op_type == "Reshape" and _same_layout(graph, x, back.outputs[0]):
                return OneGroup(Dim(x, 1), Dim(back.outputs[0], 1), reader, True)
    norm = graph.producer.get(x)
    if _is_one_group(graph, x) and norm is not None and norm.op_type == NORM_OP:
        into = graph.producer.get(norm.inputs[0])
        if into is not None and into.op_type == "Reshape" and _same_layout(graph, into.inputs[0], y):
            return OneGroup(Dim(y, 1), Dim(into.inputs[0], 1), norm, False)
    return None


def _is_one_group(graph: ModelGraph, tensor: str) -> bool:
    shape = graph.shape(tensor)
    return shape is not None and len(shape) == 3 and shape[1] == 1


def _same_layout(graph: ModelGraph, a: str, b: str) -> bool:
    """Both [N, C, *S] with the same static channel count (the tensor around the norm)."""
    sa, sb = graph.shape(a), graph.shape(b)
    return sa is not None and sb is not None and len(sa) == len(sb) >= 3 and isinstance(sa[1], int) and sa[1] == sb[1]


def _only_reader(graph: ModelGraph, tensor: str) -> Node | None:
    readers = graph.consumers.get(tensor, [])
    return readers[0] if len(readers) == 1 else None
