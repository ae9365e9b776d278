"""Tests of element-wise ops (``spa.ops.elementwise``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
from builder import Graph, analysis_of, group_at, initializer, prune_exact


def test_prelu_slope_and_per_channel_constants_are_sliced():
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    slope, scale = g.weight(8, 1, 1), g.weight(8, 1, 1)
    p = g.op("PRelu", [g.conv(x, 3, 8), slope])
    s = g.op("Mul", [p, scale])  # layer-scale
    g.output(g.conv(s, 8, 2))
    model = g.build()
    result = prune_exact(model, 0.5)
    assert initializer(result.model, slope).shape == (4, 1, 1)
    assert initializer(result.model, scale).shape == (4, 1, 1)


def test_residual_add_and_se_gate_couple_every_writer_and_reader():
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    stem = g.op("Relu", [g.conv(x, 3, 8)])
    body = g.conv(g.op("Relu", [g.conv(stem, 8, 8)]), 8, 8)
    pooled = g.op("GlobalAveragePool", [body])
    gate = g.op("Sigmoid", [g.conv(g.op("Relu", [g.conv(pooled, 8, 2, k=1)]), 2, 8, k=1)])
    res = g.op("Add", [g.op("Mul", [body, gate]), stem])
    g.output(g.conv(res, 8, 2))
    model = g.build()
    analysis = analysis_of(model)
    stream = group_at(analysis, res)
    assert stream is group_at(analysis, stem) is group_at(analysis, body) is group_at(analysis, gate)
    assert stream.size == 8 and stream.exact
    prune_exact(model, 0.5)


def test_soft_exactness_tracks_zero_preservation_into_weightless_sinks():
    def model_with(activation):
        g = Graph(opset=17)
        x = g.input("x", [1, 3, 6, 6])
        a = g.op(activation, [g.conv(x, 3, 8)])
        s = g.op("ReduceSum", [a, g.const(np.array([1]))], keepdims=1)  # sums channels, no weight
        g.output(g.op("Add", [g.conv(a, 8, 1), s]))
        return g.build(), a

    relu_model, a = model_with("Relu")
    assert group_at(analysis_of(relu_model), a).exact  # relu(0) == 0: the sum sees zeros
    prune_exact(relu_model, 0.5)
    sigmoid_model, a = model_with("Sigmoid")
    group = group_at(analysis_of(sigmoid_model), a)
    assert not group.exact and "approximate" in group.frozen  # sigmoid(0) == 0.5 reaches the sum


def test_softmax_over_channels_freezes():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    c = g.conv(x, 3, 6)
    g.output(g.conv(g.op("Softmax", [c], axis=1), 6, 2))
    group = group_at(analysis_of(g.build()), c)
    assert "Softmax" in group.frozen
