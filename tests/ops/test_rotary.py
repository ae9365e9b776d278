"""Tests of RotaryEmbedding (``spa.ops.rotary``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at, initializer, node_attr, prune_exact

from .test_onnx_attention import _sdpa_packed_heads, _sdpa_split_heads


@pytest.mark.parametrize(
    "kv, mode, heads, kv_heads", [(4, "heads", 2, 2), (2, "heads", 2, 1), (2, "query_heads", 2, 2)]
)
def test_rotary_embedding_on_packed_heads_passes_whole_heads(kv, mode, heads, kv_heads):
    model, wq, wk = _sdpa_packed_heads(kv, rotary=True)
    result = prune_exact(model, 0.5, attention=mode)
    assert [node_attr(result.model, "RotaryEmbedding", "num_heads", i) for i in (0, 1)] == [heads, kv_heads]
    assert initializer(result.model, wq).shape == (8, 8)
    assert initializer(result.model, wk).shape == (8, 4 * kv_heads)
    frozen = group_at(analysis_of(model, attention="head_dim"), wq, 1).frozen
    assert "rotates pairs of head_dim" in frozen


def _microsoft_rotary(g: Graph, x: str, **attrs) -> str:
    """com.microsoft RotaryEmbedding of ``x`` [1, 5, heads * 4]: positions 0-4, cos/sin caches [8, 2]."""
    positions = g.const(np.arange(5, dtype=np.int64).reshape(1, 5))
    return g.op("RotaryEmbedding", [x, positions, g.weight(8, 2), g.weight(8, 2)], domain="com.microsoft", **attrs)


def _microsoft_rotary_attention(num_heads_attr: bool, width: int = 12):
    """Q and K [1, 5, width] through com.microsoft RotaryEmbedding (cos/sin caches [8, 2]: heads of
    4) into MultiHeadAttention with three heads; ``num_heads_attr``: the rotary op names its heads,
    else onnxruntime reads the head width off the cache."""
    g = Graph()
    x = g.input("x", [1, 5, 8])
    wq, wk = g.weight(8, width), g.weight(8, width)
    heads = {"num_heads": width // 4} if num_heads_attr else {}
    q, k = (_microsoft_rotary(g, g.op("MatMul", [x, w]), **heads) for w in (wq, wk))
    a = g.op("MultiHeadAttention", [q, k, g.op("MatMul", [x, g.weight(8, 12)])], domain="com.microsoft", num_heads=3)
    g.output(g.op("MatMul", [a, g.weight(12, 6)]))
    return g.build(), wq


@pytest.mark.parametrize("num_heads_attr", [True, False])
def test_onnxruntime_rotary_embedding_passes_whole_heads(num_heads_attr):
    model, wq = _microsoft_rotary_attention(num_heads_attr)
    group = group_at(analysis_of(model), wq, 1)
    assert group.size == 3 and group.prunable and group.exact
    result = prune_exact(model, 0.34)
    assert initializer(result.model, wq).shape == (8, 8)
    assert node_attr(result.model, "MultiHeadAttention", "num_heads") == 2
    if num_heads_attr:
        assert node_attr(result.model, "RotaryEmbedding", "num_heads") == 2


def test_rotary_embedding_keeps_heads_whole_without_an_attention_op():
    # nothing downstream knows the heads: the rotation alone must keep each head's columns together
    g = Graph()
    x = g.input("x", [1, 5, 8])
    w = g.weight(8, 12)
    g.output(g.op("MatMul", [_microsoft_rotary(g, g.op("MatMul", [x, w])), g.weight(12, 6)]))
    model = g.build()
    assert group_at(analysis_of(model), w, 1).size == 3
    assert initializer(prune_exact(model, 0.34).model, w).shape == (8, 8)


def test_rotary_embedding_width_not_in_heads_freezes():
    model, wq = _microsoft_rotary_attention(False, width=10)  # 10 columns are not heads of 4
    assert "does not divide into its heads" in group_at(analysis_of(model), wq, 1).frozen


def test_rotary_embedding_passes_heads_and_keeps_head_dim():
    model, wq, wk = _sdpa_split_heads(kv=4, rotary=True)
    group = group_at(analysis_of(model), wq, 1)
    assert group.size == 4 and group.prunable and group.exact
    result = prune_exact(model, 0.5)
    assert initializer(result.model, wk).shape == (8, 8)
    assert node_attr(result.model, "RotaryEmbedding", "num_heads") == 2
    assert "rotates pairs of head_dim" in group_at(analysis_of(model, attention="head_dim"), wq, 1).frozen
