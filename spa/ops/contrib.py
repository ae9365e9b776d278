"""onnxruntime's fused transformer ops (domain com.microsoft), as its optimizer writes them.

``optimize_model(..., model_type="bert")`` folds a BERT layer into Attention (the Q, K and V
projections in one [hidden, 3 * hidden] weight), SkipLayerNormalization (residual add, bias and
LayerNorm) and BiasGelu/FastGelu (bias and activation); its LLM exports use MultiHeadAttention and
GroupQueryAttention, whose Q, K and V come from separate projections. The head structure is in
these ops' ``num_heads`` (and ``kv_num_heads``), not in the graph, so their rules build the head
units themselves.
"""

from __future__ import annotations

import math

import numpy as np

from spa.core.coupling import HEAD_DIM, HEADS, QUERY_HEADS, Dim, Freeze, HeadInfo, LinkSet, Sink, offset, pairs
from spa.core.graph import ModelGraph, Node
from spa.ops import cost
from spa.ops.base import PRESERVES, Operator
from spa.ops.elementwise import Broadcasting

MS = "com.microsoft"


class BiasActivation(Broadcasting):
    """Element-wise with a bias broadcast along the channel axis: gelu(x + bias) and kin."""

    ops = ("BiasGelu", "FastGelu", "Gelu", "QuickGelu", "BiasAdd")
    domain = MS
    costs = {
        "Gelu": cost.gelu,
        "BiasGelu": cost.per_element(1 + cost.GELU),
        "FastGelu": cost.per_element(cost.GELU_TANH, 1),
        "QuickGelu": cost.per_element(3),  # x * sigmoid(alpha * x)
    }
    zero_kinds = dict.fromkeys(ops, PRESERVES)


class SkipNorm(Operator):
    """output = LayerNorm(input + skip + bias) * gamma + beta over the last axis; the sum itself
    is exact, the normalised output is not (like LayerNormalization)."""

    ops = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
    domain = MS
    # a Skip* norm adds 1 for the residual and 1 for its bias to the norm's own
    costs = {
        "SkipLayerNormalization": cost.per_element(1 + cost.MOMENTS + 1, 3, 4),
        "SkipSimplifiedLayerNormalization": cost.per_element(1 + cost.RMS + 1, 3),
    }

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, skip = node.inputs[0], node.inputs[1]
        params = [p for p in node.inputs[2:] if p]  # gamma, beta and bias (no beta when simplified)
        y, stats, total = node.outputs[0], [s for s in node.outputs[1:3] if s], _output(node, 3)
        rank = ctx.rank(x)
        if rank is None:
            links.freeze(dim, f"rank unknown around {node.op_type} '{node.name}'")
            return links.out
        last = rank - 1
        if dim.tensor in stats:
            links.freeze(dim, f"statistics output of {node.op_type} '{node.name}'")
            return links.out
        if dim.tensor in params or dim.axis == last:
            channel = Dim(x, last)
            links.same(channel, Dim(skip, ctx.rank(skip) - 1))
            for p in params:
                links.same(channel, Dim(p, 0))
            if total:
                links.same(channel, Dim(total, last))
            links.same(channel, Dim(y, last), exact=False)
            return links.out
        for other in [skip, y, total, *stats]:
            if other and ctx.rank(other) == rank:
                links.same(Dim(x, dim.axis), Dim(other, dim.axis))
        return links.out


class OnnxDomainSkipNorm(SkipNorm):
    """The same ops where a converter put them in the ONNX domain: counted, not coupled."""

    domain = ""
    couples = False


class EmbedNorm(Operator):
    """LayerNorm(word[ids] + position[pos] + segment[seg]) * gamma + beta: the tables' columns and
    the output's last axis are one hidden channel, normalised (approximate)."""

    ops = ("EmbedLayerNormalization",)
    domain = MS

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        tables = [node.input(k) for k in (2, 3, 4) if node.input(k)]
        params = [node.input(k) for k in (5, 6) if node.input(k)]
        y, total = node.outputs[0], _output(node, 2)
        on_hidden = (
            (dim.tensor in tables and dim.axis == 1)
            or dim.tensor in params
            or (dim.tensor in (y, total) and dim.axis == 2)
        )
        if not on_hidden:
            links.freeze(dim, f"token or position axis of {node.op_type} '{node.name}'")
            return links.out
        channel = Dim(y, 2)
        for table in tables:
            links.same(channel, Dim(table, 1), exact=False)
        for p in params:
            links.same(channel, Dim(p, 0), exact=False)
        if total:
            links.same(channel, Dim(total, 2), exact=False)
        return links.out


class Attention(Operator):
    """com.microsoft Attention: input [B, S, D_in] times weights [D_in, Wq + Wk + Wv] (Q, K, V
    blocks side by side, each head a contiguous run of its block), plus bias, then attention per
    head; the output [B, S, Wv] holds the heads' V widths side by side.

    ``heads``: a unit is one head, its Q, K and V columns and its output block.
    ``head_dim``: one unit per index d of the Q/K head width (Q and K columns d of every head),
    and one per index of the V head width (V columns and output positions of every head).
    """

    attends = True

    ops = ("Attention",)
    domain = MS
    weight_inputs = (1,)

    def flops(self, graph, node):
        """Includes the QKV input projection: input [B, S, D_in] times weights [D_in, D_q + D_k + D_v]."""
        x, w = cost.input_shape(graph, node, 0), cost.input_shape(graph, node, 1)
        if x is None or w is None or len(x) != 3 or len(w) != 2:
            return 0
        b, s, d_in = (cost.size(d) for d in x)
        widths = node.attr("qkv_hidden_sizes") or [cost.size(w[1]) // 3] * 3
        if len(widths) != 3:  # malformed: onnxruntime itself refuses to load it
            return 0
        d_q, d_k, d_v = widths
        length = s + cost.past_length(cost.input_shape(graph, node, 4), 3)  # past is [2, B, N, P, H]
        width = d_q + d_k + d_v
        projection = 2 * b * s * d_in * width + (b * s * width if node.input(2) else 0)
        return projection + cost.attention_core(b, node.attr("num_heads", 1), s, length, d_q, d_v)

    def seeds(self, node, ctx):
        w = node.inputs[1]
        return [Dim(w, 0), Dim(w, 1)] if ctx.graph.is_initializer(w) else []

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        x, w, bias, y = node.inputs[0], node.inputs[1], node.input(2), node.outputs[0]
        if dim.tensor not in (x, w, bias, y):
            links.freeze(dim, f"mask, cache or bias input of Attention '{node.name}'")
            return links.out
        rank = ctx.rank(x)
        if rank is None or ctx.rank(y) != rank:
            links.freeze(dim, f"rank unknown around Attention '{node.name}'")
            return links.out
        if dim.tensor in (x, y) and dim.axis < rank - 1:  # batch and sequence pass through
            links.same(Dim(x, dim.axis), Dim(y, dim.axis))
            return links.out
        links.same(Dim(x, rank - 1), Dim(w, 0))
        links.add(Sink((Dim(x, rank - 1), Dim(w, 0))))
        if dim == Dim(x, rank - 1) or dim == Dim(w, 0):
            return links.out
        widths = _widths(node, ctx)
        cols, out = Dim(w, 1), Dim(y, rank - 1)
        if bias:
            links.same(cols, Dim(bias, 0))
        why = _unsupported(node, widths, ctx)
        if why:
            links.add(Freeze(cols, why))
            links.add(Freeze(out, why))
            return links.out
        heads = int(node.attr("num_heads"))
        wq, wk, wv = widths
        dq, dv = wq // heads, wv // heads
        q = np.arange(wq)
        v = np.arange(wv)
        v_cols, v_out = v + wq + wk, v
        if ctx.attention != HEAD_DIM:  # without shared K/V heads, query heads are whole heads
            # every column of head h, in Q, K and V, joins output position h * dv: one unit per head
            head_start = (q // dq) * dv
            links.add(
                pairs(
                    cols,
                    out,
                    np.concatenate([q, q + wq, v_cols]),
                    np.concatenate([head_start, head_start, (v // dv) * dv]),
                )
            )
            links.add(pairs(out, out, v_out, (v // dv) * dv))
            ctx.heads[out] = HeadInfo(ctx.attention, heads, dq)
        else:
            # Q and K column d of every head are one unit; V column d of every head and its output positions another
            links.add(pairs(cols, cols, np.concatenate([q, q + wq]), np.concatenate([q % dq, q % dq])))
            links.add(pairs(cols, out, v_cols, v_out))
            links.add(pairs(out, out, v_out, v_out % dv))
            ctx.heads[Dim(w, 1)] = HeadInfo(ctx.attention, heads, dq)
            ctx.heads[out] = HeadInfo(ctx.attention, heads, dv)
        return links.out

    def rewrite(self, node, cut):
        w = node.inputs[1]
        keep = cut.kept(Dim(w, 1))
        if keep is None:
            return
        wq, wk, wv = _widths(node, cut)
        heads = int(node.attr("num_heads"))
        parts = [keep[(keep >= lo) & (keep < hi)] - lo for lo, hi in ((0, wq), (wq, wq + wk), (wq + wk, wq + wk + wv))]
        new_heads, q_width = _head_layout(parts[0], wq // heads, heads)
        _, v_width = _head_layout(parts[2], wv // heads, heads)
        cut.set_attr(node, "num_heads", new_heads)
        new = [len(p) for p in parts]
        if node.attr("qkv_hidden_sizes") is not None or new[0] != new[2]:
            cut.set_attr(node, "qkv_hidden_sizes", new)
        if q_width != wq // heads and node.attr("scale") is None:
            # the default scale is 1/sqrt(head width): keep the dense model's, not the pruned width's
            cut.set_attr(node, "scale", float(1.0 / math.sqrt(wq // heads)))


def _output(node, k: int) -> str:
    return node.outputs[k] if len(node.outputs) > k else ""


def _widths(node, ctx) -> tuple[int, int, int] | None:
    sizes = node.attr("qkv_hidden_sizes")
    if sizes:
        if len(sizes) != 3:  # malformed: onnxruntime itself refuses to load it
            return None
        wq, wk, wv = (int(s) for s in sizes)
        return wq, wk, wv
    total = ctx.size(Dim(node.inputs[1], 1))
    return None if total is None or total % 3 else (total // 3,) * 3


def _unsupported(node, widths, ctx) -> str | None:
    """Why the head layout of this Attention may not shrink, or None."""
    name = f"Attention '{node.name}'"
    heads = node.attr("num_heads")
    if widths is None or not heads or widths[0] != widths[1] or any(w % heads for w in widths):
        return f"{name}: Q/K/V widths do not divide into its heads"
    if node.input(4) or node.input(5) or any(o for o in node.outputs[1:]):
        return f"{name} has a key/value cache or a per-head attention bias"
    if node.attr("do_rotary", 0) or node.attr("past_present_share_buffer", 0):
        return f"{name} applies rotary embeddings or shares its cache buffer"
    return None


def _head_layout(kept: np.ndarray, width: int, heads: int) -> tuple[int, int]:
    """(heads, head width) of the columns a cut keeps out of ``heads`` blocks of ``width``:
    whole heads gone, or the same width left in every head."""
    per_head = np.bincount(kept // width, minlength=heads)
    present = per_head[per_head > 0]
    if len(present) == 0 or np.any(present != present[0]):
        raise ValueError(f"cut keeps uneven head widths {per_head.tolist()}")
    if present[0] == width:
        return len(present), width
    if len(present) != heads:
        raise ValueError("cut removes whole heads and head_dim at once")
    return heads, int(present[0])


class HeadsAttention(Operator):
    """Shared by MultiHeadAttention and GroupQueryAttention: Q [B, S, H * D], K [B, L, G * D] and
    V [B, L, G * Dv] as separate inputs, each head a contiguous block of the last axis, G KV heads
    each shared by H / G query heads (G = H without sharing); the output [B, S, H * Dv] holds the
    heads side by side, and a cache [B, G, P, D] has the KV heads on axis 1.

    ``heads``: a unit is one KV head with its query heads, their Q, K, V and output blocks and
    their cache rows. ``head_dim`` (without shared heads): Q and K column d of every head are one
    unit, V column d of every head and its output positions another. ``query_heads`` (with shared
    heads): the same query head in every KV group, K, V and the cache kept. One KV head has no
    choice to make: its unit is a query head.
    """

    attends = True

    domain = MS
    # (past key and value input indices, present key and value output indices)
    caches: tuple[tuple[int, ...], tuple[int, ...]] = (), ()
    # the attributes holding the head counts; no KV attribute: K and V have as many heads as Q
    heads_attr: str = "num_heads"
    kv_heads_attr: str | None = None

    def heads(self, node) -> int:
        return int(node.attr(self.heads_attr) or 0)

    def kv_heads(self, node) -> int:
        return int(node.attr(self.kv_heads_attr) or 0) if self.kv_heads_attr else self.heads(node)

    def bias(self, node) -> str:
        return ""

    def unsupported(self, node, ctx) -> str | None:
        """Why this node's heads may not shrink (inputs or attributes the rule does not read)."""
        return None

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        name = f"{node.op_type} '{node.name}'"
        q, k, v, y = node.inputs[0], node.input(1), node.input(2), node.outputs[0]
        bias = self.bias(node)
        cache = [
            t for t in [*(node.input(i) for i in self.caches[0]), *(_output(node, i) for i in self.caches[1])] if t
        ]
        channels = [Dim(q, 2), Dim(k, 2), Dim(v, 2), Dim(y, 2)] + ([Dim(bias, 0)] if bias else [])
        on_cache = dim.tensor in cache and dim.axis == 1
        if dim not in channels and not on_cache:
            links.freeze(dim, f"batch, sequence, mask or cache axis of {name}")
            return links.out
        heads, groups = self.heads(node), self.kv_heads(node)
        sizes = [ctx.size(d) for d in channels[:4]] if k and v else None
        why = self.unsupported(node, ctx)
        if why is None and (not k or not v or any(ctx.rank(t) != 3 for t in (q, k, v, y))):
            why = f"{name} takes packed QKV or a K/V already split into heads"
        elif why is None and (
            None in sizes
            or not heads
            or not groups
            or heads % groups
            or sizes[0] % heads
            or sizes[1] % groups
            or sizes[2] % groups
            or sizes[3] % heads
            or sizes[0] // heads != sizes[1] // groups
            or sizes[2] // groups != sizes[3] // heads
        ):
            why = f"{name}: Q/K/V widths do not divide into its heads"
        mode = ctx.attention
        if mode == HEADS and groups == 1 < heads:  # multi-query: no KV head to drop, a query head is the unit
            mode = QUERY_HEADS
        elif mode == QUERY_HEADS and groups == heads:  # nothing shared: query heads are whole heads
            mode = HEADS
        if why is None and mode == HEAD_DIM and (groups != heads or cache):
            why = f"{name}: head_dim units with shared KV heads or a cache"
        if why:
            for d in channels + [Dim(t, 1) for t in cache]:
                if d.tensor:
                    links.freeze(d, why)
            return links.out
        wq, wk, wv, _ = sizes
        dq, dv, rep = wq // heads, wv // groups, heads // groups
        qc, kc, vc, oc = (np.arange(n) for n in sizes)
        cq, ck, cv, out = channels[:4]
        if bias:  # Q, K and V biases side by side, each added to its input
            for part, lo, n in ((cq, 0, wq), (ck, wq, wk), (cv, wq + wk, wv)):
                links.add(offset(Dim(bias, 0), part, n, 0, lo))
        # Q·Kᵀ contracts every head's columns: a removed head must be zero in Q or K
        links.add(Sink((cq, ck)))
        if mode == HEADS:  # every column of KV head g joins the output position of its first query head
            anchor = lambda group: group * rep * dv  # noqa: E731
            links.add(pairs(cq, out, qc, anchor(qc // dq // rep)))
            links.add(pairs(ck, out, kc, anchor(kc // dq)))
            links.add(pairs(cv, out, vc, anchor(vc // dv)))
            links.add(pairs(out, out, oc, anchor(oc // dv // rep)))
            for t in cache:
                n = ctx.size(Dim(t, 1))
                if n != groups:
                    links.freeze(Dim(t, 1), f"{name}: cache {t} does not hold its {groups} KV heads on axis 1")
                    continue
                links.add(pairs(Dim(t, 1), out, np.arange(n), anchor(np.arange(n))))
        elif mode == QUERY_HEADS:  # query head r of every KV group is one unit
            links.add(pairs(cq, out, qc, (qc // dq % rep) * dv))
            links.add(pairs(out, out, oc, (oc // dv % rep) * dv))
            for d in [ck, cv, *(Dim(t, 1) for t in cache)]:
                links.freeze(d, f"{name}: K/V heads stay when query heads are the unit")
        else:
            links.add(pairs(cq, cq, qc, qc % dq))
            links.add(pairs(ck, cq, kc, kc))
            links.add(pairs(cv, out, vc, vc))
            links.add(pairs(out, out, oc, oc % dv))
            ctx.heads[cq] = HeadInfo(mode, heads, dq)
        ctx.heads[out] = HeadInfo(mode, heads, dq if mode != HEAD_DIM else dv, groups if groups != heads else None)
        return links.out

    def soft_zero(self, node, dim, input_zero):
        if dim != Dim(node.outputs[0], 2):
            return None
        # scores times V: a head whose V (and V bias) is zero writes zeros
        parts = [input_zero(t) for t in (node.input(2), self.bias(node)) if t]
        return bool(parts) and all(p is True for p in parts)

    def rewrite(self, node, cut):
        q, k = node.inputs[0], node.input(1)
        keep_q, keep_k = cut.kept(Dim(q, 2)), cut.kept(Dim(k, 2))
        if keep_q is None and keep_k is None:
            return
        heads, groups = self.heads(node), self.kv_heads(node)
        dq = cut.old_size(Dim(q, 2)) // heads
        new_heads, q_width = _head_layout(keep_q, dq, heads) if keep_q is not None else (heads, dq)
        cut.set_attr(node, self.heads_attr, new_heads)
        if self.kv_heads_attr:
            new_groups, _ = _head_layout(keep_k, dq, groups) if keep_k is not None else (groups, dq)
            cut.set_attr(node, self.kv_heads_attr, new_groups)
        if q_width != dq and node.attr("scale") is None:
            cut.set_attr(node, "scale", float(1.0 / math.sqrt(dq)))  # the dense model's default


class MultiHeadAttention(HeadsAttention):
    """query, key, value, bias [Q | K | V], key_padding_mask, attention_bias [B, H or 1, S, L],
    past_key/past_value [B, H, P, D]; outputs output, present_key/present_value, qk."""

    ops = ("MultiHeadAttention",)

    def flops(self, graph, node):
        q = cost.input_shape(graph, node, 0)
        heads = node.attr("num_heads", 1)
        k, v = cost.input_shape(graph, node, 1), cost.input_shape(graph, node, 2)
        widths = None if q is None or len(q) < 3 else _mha_widths(q, k, v, heads)
        if widths is None:
            return 0
        new, d_qk, d_v = widths
        b, s = cost.size(q[0]), cost.size(q[1])
        bias = b * (s * d_qk + new * (d_qk + d_v)) if node.input(3) else 0
        length = new + cost.past_length(cost.input_shape(graph, node, 6), 2)  # past_key is [B, N, P, H]
        return bias + cost.attention_core(b, heads, s, length, d_qk, d_v)

    caches = (6, 7), (1, 2)

    def bias(self, node):
        return node.input(3)

    def unsupported(self, node, ctx):
        name = f"MultiHeadAttention '{node.name}'"
        bias = node.input(5)
        if bias and (ctx.rank(bias) != 4 or ctx.size(Dim(bias, 1)) != 1):
            return f"{name} has a per-head attention bias"
        if node.input(8) or node.input(9) or _output(node, 3):
            return f"{name} reads a beam-search cache or writes its scores"
        b = self.bias(node)
        if b and not ctx.graph.is_initializer(b):
            return f"{name} adds a computed bias"
        return None


class GroupQueryAttention(HeadsAttention):
    """query, key, value, past_key/past_value [B, G, P, D], seqlens_k, total_sequence_length,
    cos/sin caches (rotary, within a head), position_ids, attention_bias, head_sink and the
    quantisation and norm inputs; outputs output, present_key/present_value, output_qk."""

    ops = ("GroupQueryAttention",)

    def flops(self, graph, node):
        """Each of the query heads reads its group's K and V head, so it costs as many full heads."""
        return _gqa_flops(graph, node)

    caches = (3, 4), (1, 2)
    kv_heads_attr = "kv_num_heads"

    def unsupported(self, node, ctx):
        name = f"GroupQueryAttention '{node.name}'"
        if ctx.attention == HEAD_DIM:  # its CPU kernel takes only head_dim a multiple of 8
            return f"{name}: head_dim units (its kernels want head_dim a multiple of 8)"
        bias = node.input(10)
        if bias and (ctx.rank(bias) != 4 or ctx.size(Dim(bias, 1)) != 1):
            return f"{name} has a per-head attention bias"
        if any(node.input(i) for i in range(11, 16)) or _output(node, 3):
            return f"{name} has head sinks, a quantised cache, Q/K norms or writes its scores"
        if node.attr("kv_cache_bit_width", 0) or node.attr("k_quant_type") or node.attr("v_quant_type"):
            return f"{name} quantises its cache"
        return None


def _mha_widths(q, k, v, heads: int) -> tuple[int, int, int] | None:
    """(new key length, Q/K width, V width) for MultiHeadAttention's input layouts."""
    size = cost.size
    if k is None:
        return (size(q[1]), heads * size(q[4]), heads * size(q[4])) if len(q) == 5 else None  # [B,S,N,3,H]
    if len(k) == 5:
        return size(k[1]), size(q[2]), heads * size(k[4])  # packed KV [B, L, N, 2, H]
    if v is None:
        return None
    if len(k) == 4:
        return size(k[2]), size(q[2]), heads * size(v[3])  # per head [B, N, L, H]
    return size(k[1]), size(q[2]), size(v[2])


def _gqa_flops(graph: ModelGraph, node: Node) -> int:
    q, k = cost.input_shape(graph, node, 0), cost.input_shape(graph, node, 1)
    heads = node.attr("num_heads", 1)
    kv_heads = node.attr("kv_num_heads", heads)
    if q is None or len(q) != 3 or (node.input(1) and (k is None or len(k) != 3)):
        return 0
    b, s, width = (cost.size(d) for d in q)
    # packed QKV when key is absent: [B, S, (N + 2 N_kv) H]
    head = cost.size(k[2]) // kv_heads if node.input(1) else width // (heads + 2 * kv_heads)
    d_q, d_kv = heads * head, kv_heads * head
    length = s + cost.past_length(cost.input_shape(graph, node, 3), 2)  # past_key is [B, N_kv, P, H]
    rotary = 3 * b * s * (d_q + d_kv) if node.attr("do_rotary", 0) else 0  # x*cos + rotate(x)*sin
    return rotary + cost.attention_core(b, heads, s, length, d_q, d_q)
