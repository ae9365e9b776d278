"""Tests of ONNX Attention (``spa.ops.onnx_attention``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
import onnx
import pytest
from builder import Graph, analysis_of, group_at, initializer, node_attr, prune_exact


def _opset23(g: Graph) -> onnx.ModelProto:
    model = g.build()
    model.ir_version = 10  # opset 23 wants IR 10 or later
    return model


def _sdpa_split_heads(kv=2, cache=False, rotary=False):
    """torch's opset-23 export of scaled_dot_product_attention: each projection reshaped to
    [1, 5, heads, 4] and transposed to [1, heads, 5, 4] into Attention; 4 query heads, ``kv`` KV heads.
    ``rotary``: Q and K through RotaryEmbedding first, as the export of a Llama writes it."""
    g = Graph(opset=23)
    x = g.input("x", [1, 5, 8])
    wq, wk, wv = g.weight(8, 16), g.weight(8, 4 * kv), g.weight(8, 4 * kv)

    def split(w, heads):
        shaped = g.op("Reshape", [g.op("MatMul", [x, w]), g.const(np.array([1, 5, heads, 4], np.int64))])
        return g.op("Transpose", [shaped], perm=[0, 2, 1, 3])

    inputs = [split(wq, 4), split(wk, kv), split(wv, kv)]
    if rotary:
        cos, sin = g.weight(1, 5, 2), g.weight(1, 5, 2)
        inputs[:2] = [g.op("RotaryEmbedding", [t, cos, sin], num_heads=heads) for t, heads in zip(inputs, (4, kv))]
    if cache:  # a constant past [B, KV heads, P, D]
        inputs += ["", g.weight(1, kv, 2, 4), g.weight(1, kv, 2, 4)]
    outs = g.op("Attention", inputs, n_out=3 if cache else 1, is_causal=0)
    y = outs[0] if cache else outs
    merged = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.const(np.array([1, 5, 16], np.int64))])
    g.output(g.op("MatMul", [merged, g.weight(16, 6)]))
    return _opset23(g), wq, wk


@pytest.mark.parametrize(
    "kv, cache, mode, units, q_width, kv_width",
    [
        (4, False, "heads", 4, 8, 8),  # whole heads
        (4, True, "heads", 4, 8, 8),  # the past's head axis goes with them
        (2, False, "heads", 2, 8, 4),  # a KV head with its two query heads
        (2, False, "query_heads", 2, 8, 8),  # the same query head in both groups, K and V kept
        (1, False, "heads", 4, 8, 4),  # one KV head: a query head is the unit
        (2, False, "head_dim", 4, 8, 4),  # Q and K column d of every head
    ],
)
def test_onnx_attention_split_heads(kv, cache, mode, units, q_width, kv_width):
    model, wq, wk = _sdpa_split_heads(kv, cache)
    group = group_at(analysis_of(model, attention=mode), wq, 1)
    assert group.size == units and group.prunable and group.exact
    result = prune_exact(model, 0.5, attention=mode)
    assert initializer(result.model, wq).shape == (8, q_width)
    assert initializer(result.model, wk).shape == (8, kv_width)
    scale = [a for n in result.model.graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "scale"]
    assert (mode == "head_dim") == bool(scale)  # a narrower head_dim keeps the dense 1/sqrt(4)
    if scale:
        assert onnx.helper.get_attribute_value(scale[0]) == pytest.approx(0.5)


def _sdpa_packed_heads(kv=2, mask_heads=0, rotary=False):
    """Attention on [1, 5, heads * 4] with q_num_heads=4 and kv_num_heads=``kv``; ``mask_heads``:
    a float mask [1, mask_heads, 5, 5] (0: none); ``rotary``: Q and K through RotaryEmbedding on
    the packed heads."""
    g = Graph(opset=23)
    x = g.input("x", [1, 5, 8])
    wq, wk = g.weight(8, 16), g.weight(8, 4 * kv)
    q, k, v = g.op("MatMul", [x, wq]), g.op("MatMul", [x, wk]), g.op("MatMul", [x, g.weight(8, 4 * kv)])
    if rotary:
        cos, sin = g.weight(1, 5, 2), g.weight(1, 5, 2)
        q, k = (g.op("RotaryEmbedding", [t, cos, sin], num_heads=heads) for t, heads in ((q, 4), (k, kv)))
    inputs = [q, k, v] + ([g.weight(1, mask_heads, 5, 5)] if mask_heads else [])
    a = g.op("Attention", inputs, q_num_heads=4, kv_num_heads=kv)
    g.output(g.op("MatMul", [a, g.weight(16, 6)]))
    return _opset23(g), wq, wk


@pytest.mark.parametrize(
    "kv, mode, heads, kv_heads",
    [(4, "heads", 2, 2), (2, "heads", 2, 1), (2, "query_heads", 2, 2), (4, "head_dim", 4, 4)],
)
def test_onnx_attention_packed_heads_rewrites_the_head_counts(kv, mode, heads, kv_heads):
    model, wq, _ = _sdpa_packed_heads(kv)
    result = prune_exact(model, 0.5, attention=mode)
    assert node_attr(result.model, "Attention", "q_num_heads") == heads
    assert node_attr(result.model, "Attention", "kv_num_heads") == kv_heads
    assert initializer(result.model, wq).shape == (8, 8)
    if mode == "head_dim":
        assert node_attr(result.model, "Attention", "scale") == pytest.approx(0.5)


def test_onnx_attention_per_head_mask_freezes():
    model, wq, _ = _sdpa_packed_heads(4, mask_heads=4)
    assert "per-head attention mask" in group_at(analysis_of(model), wq, 1).frozen
    model, wq, _ = _sdpa_packed_heads(4, mask_heads=1)  # one mask for every head
    assert group_at(analysis_of(model), wq, 1).prunable
