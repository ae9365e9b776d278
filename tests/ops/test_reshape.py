"""Tests of Reshape, Flatten, Squeeze and Unsqueeze (``spa.ops.reshape``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at, initializer, prune_exact


@pytest.mark.parametrize("how", ["flatten", "reshape", "dynamic_reshape"])
def test_channel_becomes_block_of_features_into_gemm(how):
    g = Graph()
    x = g.input("x", ["batch", 3, 3, 3])
    c = g.op("Relu", [g.conv(x, 3, 4)])  # [N, 4, 3, 3] -> 36 features, 9 per channel
    if how == "flatten":
        f = g.op("Flatten", [c], axis=1)
    elif how == "reshape":
        f = g.op("Reshape", [c, g.const(np.array([-1, 36]))])
    else:  # the legacy exporter's x.view(x.size(0), 36)
        n = g.op(
            "Unsqueeze", [g.op("Gather", [g.op("Shape", [c]), g.const(np.array(0))], axis=0), g.const(np.array([0]))]
        )
        f = g.op("Reshape", [c, g.op("Concat", [n, g.const(np.array([36]))], axis=0)])
    g.output(g.op("Gemm", [f, g.weight(5, 36), g.weight(5)], transB=1))
    model = g.build()
    analysis = analysis_of(model)
    group = group_at(analysis, c)
    assert group.size == 4 and group is group_at(analysis, f)
    result = prune_exact(model, 0.5)
    gemm_weight = next(n.input[1] for n in result.model.graph.node if n.op_type == "Gemm")
    assert initializer(result.model, gemm_weight).shape == (5, 18)


def test_flattening_symbolic_axes_keeps_the_trailing_channel():
    # GPT-2's Conv1D: [batch, seq, C] -> [batch*seq, C] -> Gemm -> back to [batch, seq, C']
    g = Graph()
    x = g.input("x", ["batch", "seq", 8])
    lead = g.op("Slice", [g.op("Shape", [x]), g.const(np.array([0])), g.const(np.array([2]))])

    def conv1d(t, cin, cout):
        flat = g.op("Reshape", [t, g.const(np.array([-1, cin]))])
        y = g.op("Gemm", [flat, g.weight(cin, cout), g.weight(cout)])
        return g.op("Reshape", [y, g.op("Concat", [lead, g.const(np.array([cout]))], axis=0)])

    h = g.op("Relu", [conv1d(x, 8, 16)])
    g.output(conv1d(h, 16, 8))
    model = g.build()
    group = group_at(analysis_of(model), h, 2)
    assert group.size == 16 and group.prunable
    result = prune_exact(model, 0.5)
    gemm_weights = [initializer(result.model, n.input[1]) for n in result.model.graph.node if n.op_type == "Gemm"]
    assert [w.shape for w in gemm_weights] == [(8, 8), (8, 8)]


def test_squeeze_unsqueeze_pass_the_channel():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    c = g.op("Relu", [g.conv(x, 3, 6)])
    s = g.op("Squeeze", [g.op("GlobalAveragePool", [c]), g.const(np.array([2, 3]))])
    u = g.op("Unsqueeze", [g.op("Gemm", [s, g.weight(6, 6), g.weight(6)]), g.const(np.array([2]))])
    g.output(g.op("Squeeze", [u, g.const(np.array([2]))]))
    model = g.build()
    assert group_at(analysis_of(model), c).size == 6
    prune_exact(model, 0.5)
