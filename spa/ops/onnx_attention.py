"""ONNX Attention (opset 23): scaled dot-product attention as one op, as torch's exporter writes
``scaled_dot_product_attention`` from opset 23 on.

Two layouts. Q, K, V as [B, S, heads * head_dim] with ``q_num_heads`` and ``kv_num_heads``
attributes: the head blocks sit side by side on the last axis, as in onnxruntime's
MultiHeadAttention, so the rule is ``HeadsAttention``'s. Or Q [B, Hq, S, D], K [B, Hkv, L, D],
V [B, Hkv, L, Dv], Y [B, Hq, S, Dv]: heads on axis 1 and head_dim on axis 3, each its own axis.

Either way, with Hkv < Hq each KV head serves Hq / Hkv consecutive query heads (the spec repeats
K and V as [h0, h0, h1, h1, ...]), and the past/present caches [B, Hkv, P, D] carry the KV heads on
axis 1. The default scale is 1 / sqrt(D): when D shrinks the dense model's scale is written out.
"""

from __future__ import annotations

import math

import numpy as np

from spa.core.coupling import HEAD_DIM, HEADS, QUERY_HEADS, Dim, HeadInfo, LinkSet, Sink, pairs
from spa.ops import cost
from spa.ops.contrib import HeadsAttention, _output


class Attention(HeadsAttention):
    """Q, K, V, attn_mask, past_key, past_value (, nonpad_kv_seqlen); outputs Y, present_key,
    present_value, qk_matmul_output."""

    ops = ("Attention",)
    domain = ""
    weight_inputs = (1,)

    def flops(self, graph, node):
        """Q, K, V as [B, N, S, H], or [B, S, N*H] with head-count attributes."""
        q, k, v = (cost.input_shape(graph, node, i) for i in range(3))
        if q is None or k is None or v is None or not len(q) == len(k) == len(v) or len(q) not in (3, 4):
            return 0
        size = cost.size
        if len(q) == 4:
            b, heads, s, head = (size(d) for d in q)
            new, d_qk, d_v = size(k[2]), heads * head, heads * size(v[3])
        else:
            heads, kv_heads = node.attr("q_num_heads", 1), node.attr("kv_num_heads", 1)
            b, s, d_qk = (size(d) for d in q)
            new, d_v = size(k[1]), size(v[2]) // kv_heads * heads
        length = new + cost.past_length(cost.input_shape(graph, node, 4), 2)  # past_key is [B, N_kv, P, H]
        return cost.attention_core(b, heads, s, length, d_qk, d_v)

    caches = (4, 5), (1, 2)
    heads_attr, kv_heads_attr = "q_num_heads", "kv_num_heads"

    def unsupported(self, node, ctx):
        name = f"Attention '{node.name}'"
        mask = node.input(3)
        if mask and ctx.rank(mask) == 4 and ctx.size(Dim(mask, 1)) != 1:
            return f"{name} has a per-head attention mask"
        if _output(node, 3):
            return f"{name} writes its scores"
        return None

    def link(self, node, dim, ctx):
        if ctx.rank(node.inputs[0]) == 4:
            return self._link_split_heads(node, dim, ctx)
        return super().link(node, dim, ctx)

    def _link_split_heads(self, node, dim, ctx):
        links = LinkSet(ctx)
        name = f"Attention '{node.name}'"
        q, k, v, y = node.inputs[0], node.input(1), node.input(2), node.outputs[0]
        keys = [t for t in (node.input(4), _output(node, 1)) if t]
        values = [t for t in (node.input(5), _output(node, 2)) if t]
        kv_axes = [Dim(t, 1) for t in (k, v, *keys, *values)]
        qk_width = [Dim(q, 3), Dim(k, 3), *(Dim(t, 3) for t in keys)]
        v_width = [Dim(v, 3), Dim(y, 3), *(Dim(t, 3) for t in values)]
        channels = [Dim(q, 1), Dim(y, 1), *kv_axes, *qk_width, *v_width]
        if dim not in channels:
            links.freeze(dim, f"batch, sequence or mask axis of {name}")
            return links.out
        heads, groups = ctx.size(Dim(q, 1)), ctx.size(Dim(k, 1))
        why = self.unsupported(node, ctx)
        if why is None and any(ctx.rank(t) != 4 for t in (k, v, y, *keys, *values)):
            why = f"{name} mixes 3D and 4D inputs"
        elif why is None and (
            not heads
            or not groups
            or heads % groups
            or any(ctx.size(d) != groups for d in kv_axes)
            or ctx.size(Dim(y, 1)) != heads
        ):
            why = f"{name}: query heads do not divide into its KV heads"
        if why:
            for d in channels:
                links.freeze(d, why)
            return links.out
        # Q·Kᵀ contracts head_dim: a removed index must be zero in Q or K
        for d in qk_width[1:]:
            links.same(qk_width[0], d)
        links.add(Sink((Dim(q, 3), Dim(k, 3))))
        for d in v_width[1:]:
            links.same(v_width[0], d)
        mode = ctx.attention
        if mode == HEADS and groups == 1 < heads:  # multi-query: the one KV head stays
            mode = QUERY_HEADS
        elif mode == QUERY_HEADS and groups == heads:
            mode = HEADS
        rep, query = heads // groups, np.arange(heads)
        links.same(Dim(q, 1), Dim(y, 1))
        if mode == QUERY_HEADS:  # query head r of every KV group is one unit
            links.add(pairs(Dim(q, 1), Dim(q, 1), query, query % rep))
            for d in kv_axes:
                links.freeze(d, f"{name}: K/V heads stay when query heads are the unit")
        else:  # a KV head and the query heads it serves (head_dim mode: the Reshape's choice freezes these)
            links.add(pairs(Dim(q, 1), Dim(k, 1), query, query // rep))
            for d in kv_axes[1:]:
                links.same(Dim(k, 1), d)
        if mode != HEAD_DIM:  # with head_dim units the Reshapes around name the groups that shrink
            ctx.heads[Dim(y, 1)] = HeadInfo(mode, heads, ctx.size(Dim(q, 3)) or 0, groups if groups != heads else None)
        return links.out

    def soft_zero(self, node, dim, input_zero):
        if dim.tensor != node.outputs[0] or dim.axis == 0:
            return None
        # scores times V: where V is zero (a head, or a column of every head) the output is zero
        return input_zero(node.input(2)) is True

    def rewrite(self, node, cut):
        q = node.inputs[0]
        if cut.rank(q) != 4:
            super().rewrite(node, cut)
            return
        keep_dim = cut.kept(Dim(q, 3))
        if keep_dim is not None and node.attr("scale") is None:
            # the default scale is 1/sqrt(head_dim): keep the dense model's
            cut.set_attr(node, "scale", float(1.0 / math.sqrt(cut.old_size(Dim(q, 3)))))
        for attr, axis_of in ((self.heads_attr, Dim(q, 1)), (self.kv_heads_attr, Dim(node.input(1), 1))):
            kept = cut.kept(axis_of)
            if kept is not None and node.attr(attr) is not None:
                cut.set_attr(node, attr, len(kept))
