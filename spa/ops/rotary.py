"""Rotary position embeddings: ONNX RotaryEmbedding (opset 23) and onnxruntime's com.microsoft one.

X is [B, heads, S, head_dim], or [B, S, heads * head_dim] with the heads side by side. Each head
is rotated on its own, pairs of head_dim indices together (i with i + D/2, or 2i with 2i + 1 when
interleaved), so a whole head may go and a single head_dim index may not.
"""

from __future__ import annotations

import numpy as np

from spa.core.coupling import HEAD_DIM, Dim, LinkSet, pairs
from spa.ops.base import Operator
from spa.ops.contrib import MS


class RotaryEmbedding(Operator):
    """ONNX: X, cos_cache, sin_cache, position_ids; the packed layout needs ``num_heads``."""

    ops = ("RotaryEmbedding",)

    def head_width(self, node, ctx) -> int | None:
        """head_dim of the packed layout, or None when the width does not divide into heads."""
        hidden, heads = ctx.size(Dim(node.inputs[0], 2)), int(node.attr("num_heads") or 0)
        if hidden is None or not heads or hidden % heads:
            return None
        return hidden // heads

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, y = node.inputs[0], node.outputs[0]
        name = f"RotaryEmbedding '{node.name}'"
        if dim.tensor not in (x, y):
            links.freeze(dim, f"cache or position input of {name}")
            return links.out
        rank = ctx.rank(x)
        if rank not in (3, 4) or ctx.rank(y) != rank:
            links.freeze(dim, f"{name} on an input of rank {rank}")
        elif dim.axis != rank - 1:  # batch, heads (split layout) and sequence pass through
            links.same(Dim(x, dim.axis), Dim(y, dim.axis))
        elif rank == 4 or ctx.attention == HEAD_DIM:
            links.freeze(dim, f"{name} rotates pairs of head_dim indices")
        elif (width := self.head_width(node, ctx)) is None:
            links.freeze(dim, f"{name}: its width does not divide into its heads")
        else:
            columns = np.arange(ctx.size(Dim(x, 2)))
            links.same(Dim(x, 2), Dim(y, 2))
            links.add(pairs(Dim(x, 2), Dim(x, 2), columns, columns // width * width))  # a head goes whole
        return links.out

    def soft_zero(self, node, dim, input_zero):
        # units sit on the heads axis (1, split layout) or the packed heads (2): whole heads, and a
        # rotation of zeros is zeros
        if dim.tensor != node.outputs[0] or dim.axis not in (1, 2):
            return None
        return input_zero(node.inputs[0]) is True

    def rewrite(self, node, cut):
        x, heads = node.inputs[0], int(node.attr("num_heads") or 0)
        units = Dim(x, 1) if cut.rank(x) == 4 else Dim(x, 2)  # heads, or every column of the packed heads
        kept = cut.kept(units)
        if kept is not None and heads:
            cut.set_attr(node, "num_heads", len(kept) * heads // cut.old_size(units))


class MicrosoftRotaryEmbedding(RotaryEmbedding):
    """onnxruntime's: input, position_ids, cos_cache, sin_cache. Packed without ``num_heads``, the
    head width is twice the cache's last axis (onnxruntime's own reading)."""

    domain = MS

    def head_width(self, node, ctx) -> int | None:
        if node.attr("num_heads") or node.attr("rotary_embedding_dim"):
            return super().head_width(node, ctx)
        hidden, cos = ctx.size(Dim(node.inputs[0], 2)), node.input(2)
        half = ctx.size(Dim(cos, ctx.rank(cos) - 1)) if cos and ctx.rank(cos) else None
        if hidden is None or not half or hidden % (2 * half):
            return None
        return 2 * half
