"""Tests of onnxruntime's fused transformer ops (``spa.ops.contrib``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at, initializer, node_attr, prune_exact
from onnx import TensorProto

from spa.core.coupling import Dim


@pytest.mark.parametrize("mode", ["heads", "head_dim"])
def test_onnxruntime_attention_removes_heads_or_head_dim(mode):
    # QKV in one weight [in, 3 * 12], three heads of 4; the head count lives in num_heads
    g = Graph()
    x = g.input("x", [1, 5, 8])
    w = g.weight(8, 36)
    a = g.op("Attention", [x, w, g.weight(36)], domain="com.microsoft", num_heads=3)
    g.output(g.op("MatMul", [a, g.weight(12, 6)]))
    model = g.build()
    analysis = analysis_of(model, attention=mode)
    if mode == "heads":
        group = group_at(analysis, w, 1)
        assert group.size == 3 and group.prunable and group.exact and group.attention.heads == 3
        result = prune_exact(model, 0.34)
        assert node_attr(result.model, "Attention", "num_heads") == 2
        assert initializer(result.model, w).shape == (8, 24)
        return
    v = group_at(analysis, a, 2)  # the output positions carry V's head_dim
    columns = {int(analysis.group_of_unit[u]) for u in analysis.labels[Dim(w, 1)]}
    assert len(columns) == 2 and v.id in columns  # Q and K columns in one group, V's in the other
    assert all(analysis.group(gid).size == 4 and analysis.group(gid).attention.kind == "head_dim" for gid in columns)
    result = prune_exact(model, 0.5, attention=mode)
    assert node_attr(result.model, "Attention", "num_heads") == 3
    assert initializer(result.model, w).shape == (8, 18)
    assert node_attr(result.model, "Attention", "scale") == pytest.approx(0.5)  # the dense 1/sqrt(4)


def test_onnxruntime_attention_with_a_cache_keeps_its_heads():
    g = Graph()
    x = g.input("x", [1, 5, 8])
    past = g.input("past", [2, 1, 3, 2, 4])
    w = g.weight(8, 36)
    a, _ = g.op("Attention", [x, w, g.weight(36), "", past], n_out=2, domain="com.microsoft", num_heads=3)
    g.output(g.op("MatMul", [a, g.weight(12, 6)]))
    assert "cache" in group_at(analysis_of(g.build()), w, 1).frozen


def _multihead_attention(bias=True, head_bias=0, cache=False, dv=4):
    """Q, K and V projections (three heads of 4, V heads of ``dv``) into MultiHeadAttention."""
    g = Graph()
    x = g.input("x", [1, 5, 8])
    wq = g.weight(8, 12)
    q, k, v = g.op("MatMul", [x, wq]), g.op("MatMul", [x, g.weight(8, 12)]), g.op("MatMul", [x, g.weight(8, 3 * dv)])
    inputs = [q, k, v, g.weight(24 + 3 * dv) if bias else "", "", g.weight(1, head_bias, 5, 5) if head_bias else ""]
    if cache:  # a constant past [B, heads, P, D]: its head axis is sliced with the heads
        inputs += [g.weight(1, 3, 2, 4), g.weight(1, 3, 2, dv)]
    a = g.op("MultiHeadAttention", inputs, n_out=3 if cache else 1, domain="com.microsoft", num_heads=3)
    g.output(g.op("MatMul", [a[0] if cache else a, g.weight(3 * dv, 6)]))
    return g.build(), wq, a[0] if cache else a


@pytest.mark.parametrize("kind", ["bias", "no_bias", "narrow_v", "bias_shared_by_heads", "cache"])
def test_onnxruntime_multihead_attention_removes_whole_heads(kind):
    model, wq, _ = _multihead_attention(
        bias=kind != "no_bias",
        dv=2 if kind == "narrow_v" else 4,
        head_bias=1 if kind == "bias_shared_by_heads" else 0,
        cache=kind == "cache",
    )
    group = group_at(analysis_of(model), wq, 1)
    assert group.size == 3 and group.prunable and group.exact and group.attention.heads == 3
    result = prune_exact(model, 0.34)
    assert node_attr(result.model, "MultiHeadAttention", "num_heads") == 2
    assert initializer(result.model, wq).shape == (8, 8)


def test_onnxruntime_multihead_attention_head_dim_keeps_the_dense_scale():
    model, wq, _ = _multihead_attention()
    result = prune_exact(model, 0.5, attention="head_dim")
    assert node_attr(result.model, "MultiHeadAttention", "num_heads") == 3
    assert initializer(result.model, wq).shape == (8, 6)
    assert node_attr(result.model, "MultiHeadAttention", "scale") == pytest.approx(0.5)  # the dense 1/sqrt(4)


def test_onnxruntime_multihead_attention_per_head_bias_freezes():
    model, wq, _ = _multihead_attention(head_bias=3)
    assert "per-head attention bias" in group_at(analysis_of(model), wq, 1).frozen


def _group_query_attention(kv=2, cache=None):
    """4 query heads of 8 (the CPU kernel wants head_dim a multiple of 8) sharing ``kv`` KV heads;
    ``cache``: None, "const" (a past in initializers) or "io" (past inputs, present outputs)."""
    g = Graph()
    x = g.input("x", [1, 5, 8])
    wq, wk = g.weight(8, 32), g.weight(8, 8 * kv)
    q, k, v = g.op("MatMul", [x, wq]), g.op("MatMul", [x, wk]), g.op("MatMul", [x, g.weight(8, 8 * kv)])
    past = 3 if cache else 0
    if cache == "io":
        inputs = [q, k, v, g.input("past_key", [1, kv, past, 8]), g.input("past_value", [1, kv, past, 8])]
    elif cache == "const":
        inputs = [q, k, v, g.weight(1, kv, past, 8), g.weight(1, kv, past, 8)]
    else:
        inputs = [q, k, v, "", ""]
    inputs += [g.const(np.array([past + 4], np.int32)), g.const(np.array(past + 5, np.int32))]
    outs = g.op(
        "GroupQueryAttention", inputs, n_out=3 if cache else 1, domain="com.microsoft", num_heads=4, kv_num_heads=kv
    )
    a = outs[0] if cache else outs
    g.output(g.op("MatMul", [a, g.weight(32, 6)]))
    if cache == "io":
        g.output(outs[1])
        g.output(outs[2])
    return g.build(), wq, wk


@pytest.mark.parametrize(
    "kv, cache, mode, units, heads, kv_heads",
    [
        (2, None, "heads", 2, 2, 1),  # a KV head with its two query heads
        (2, "const", "heads", 2, 2, 1),  # the past's KV head axis goes with them
        (2, None, "query_heads", 2, 2, 2),  # the same query head in both groups, K and V kept
        (1, None, "heads", 4, 2, 1),  # one KV head: a query head is the unit
    ],
)
def test_onnxruntime_group_query_attention_removes_kv_groups(kv, cache, mode, units, heads, kv_heads):
    model, wq, wk = _group_query_attention(kv, cache)
    group = group_at(analysis_of(model, attention=mode), wq, 1)
    assert group.size == units and group.prunable and group.exact and group.attention.kv_heads == kv
    result = prune_exact(model, 0.5, attention=mode)
    assert node_attr(result.model, "GroupQueryAttention", "num_heads") == heads
    assert node_attr(result.model, "GroupQueryAttention", "kv_num_heads") == kv_heads
    assert initializer(result.model, wq).shape == (8, 8 * heads)
    assert initializer(result.model, wk).shape == (8, 8 * kv_heads)


def test_onnxruntime_group_query_attention_with_a_kv_cache_in_graph_io_keeps_its_heads():
    model, wq, wk = _group_query_attention(2, "io")
    analysis = analysis_of(model)
    group = group_at(analysis, wq, 1)
    assert group is group_at(analysis, wk, 1) and group.size == 2  # the coupling is built, then frozen
    assert "graph input" in group.frozen or "graph output" in group.frozen
    assert "head_dim units" in group_at(analysis_of(model, attention="head_dim"), wq, 1).frozen


@pytest.mark.parametrize("act", ["BiasGelu", "FastGelu"])
def test_onnxruntime_ffn_and_skip_layer_norm(act):
    g = Graph()
    x = g.input("x", [1, 5, 8])
    h = g.op(act, [g.op("MatMul", [x, g.weight(8, 16)]), g.weight(16)], domain="com.microsoft")
    y = g.op("MatMul", [h, g.weight(16, 8)])
    n = g.op(
        "SkipLayerNormalization",
        [y, x, g.weight(8, low=0.5), g.weight(8), g.weight(8)],
        domain="com.microsoft",
        epsilon=1e-5,
    )
    g.output(g.op("MatMul", [g.op("Relu", [n]), g.weight(8, 3)]))
    model = g.build()
    analysis = analysis_of(model)
    ffn = group_at(analysis, h, 2)
    assert ffn.size == 16 and ffn.prunable and ffn.exact
    hidden = group_at(analysis, n, 2)
    assert group_at(analysis, y, 2) is hidden and not hidden.exact  # normalised over these channels
    result = prune_exact(model, 0.5)
    assert result.report.params_after < result.report.params_before


def test_onnxruntime_embed_layer_norm_is_the_hidden_channel():
    g = Graph()
    ids = g.input("ids", [1, 5], TensorProto.INT32)
    word = g.weight(20, 8)
    out, _ = g.op(
        "EmbedLayerNormalization",
        [ids, "", word, g.weight(16, 8), "", g.weight(8, low=0.5), g.weight(8)],
        n_out=2,
        domain="com.microsoft",
        epsilon=1e-5,
    )
    g.output(g.op("MatMul", [out, g.weight(8, 3)]))
    analysis = analysis_of(g.build(), approximate=True)
    group = group_at(analysis, word, 1)
    assert group is group_at(analysis, out, 2) and group.prunable and not group.exact
