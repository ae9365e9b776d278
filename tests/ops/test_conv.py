"""Tests of Conv and ConvTranspose (``spa.ops.conv``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import pytest
from builder import Graph, analysis_of, group_at, initializer, node_attr, prune_exact


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_conv_any_rank_couples_producer_out_with_consumer_in(rank):
    g = Graph()
    x = g.input("x", [1, 3] + [6] * rank)
    a = g.op("Relu", [g.conv(x, 3, 8, rank=rank)])
    y = g.conv(a, 8, 4, rank=rank)
    g.output(y)
    model = g.build()
    analysis = analysis_of(model)
    group = group_at(analysis, a)
    assert group.size == 8 and group.prunable and group.exact
    assert group_at(analysis, x).frozen.endswith("graph input")
    assert group_at(analysis, y).frozen.endswith("graph output")
    result = prune_exact(model)
    conv_weights = [n.input[1] for n in result.model.graph.node if n.op_type == "Conv"]
    assert initializer(result.model, conv_weights[0]).shape[0] == 4
    assert initializer(result.model, conv_weights[1]).shape[1] == 4


def test_depthwise_conv_rewrites_group():
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 8)])
    d = g.op("Relu", [g.conv(a, 8, 8, group=8)])
    g.output(g.conv(d, 8, 2))
    model = g.build()
    analysis = analysis_of(model)
    assert group_at(analysis, a) is group_at(analysis, d)  # depthwise: in and out are one channel
    assert group_at(analysis, a).size == 8
    result = prune_exact(model, 0.5)
    assert node_attr(result.model, "Conv", "group", 1) == 4


def test_depthwise_multiplier_moves_output_blocks_with_input_channel():
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 4)])
    d = g.op("Relu", [g.conv(a, 4, 8, group=4)])  # each input channel owns 2 outputs
    g.output(g.conv(d, 8, 2))
    model = g.build()
    analysis = analysis_of(model)
    assert group_at(analysis, a) is group_at(analysis, d)
    assert group_at(analysis, a).size == 4
    result = prune_exact(model, 0.5)
    assert node_attr(result.model, "Conv", "group", 1) == 2
    dw_weight = [n.input[1] for n in result.model.graph.node if n.op_type == "Conv"][1]
    assert initializer(result.model, dw_weight).shape[:2] == (4, 1)


def test_grouped_conv_removes_channels_evenly_per_group():
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 16)])
    b = g.op("Relu", [g.conv(a, 16, 16, group=4)])
    g.output(g.conv(b, 16, 2))
    model = g.build()
    analysis = analysis_of(model)
    # channel j of each of the 4 groups is one unit: 4 units of 4 channels on each side
    assert group_at(analysis, a).size == 4 and group_at(analysis, b).size == 4
    result = prune_exact(model, 0.5)
    assert node_attr(result.model, "Conv", "group", 1) == 4
    grouped_weight = [n.input[1] for n in result.model.graph.node if n.op_type == "Conv"][1]
    assert initializer(result.model, grouped_weight).shape[:2] == (8, 2)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group):
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    a = g.op("Relu", [g.conv(x, 3, 8)])
    w = g.weight(8, 8 // group, 2, 2)
    up = g.op("Relu", [g.op("ConvTranspose", [a, w, g.weight(8)], strides=[2, 2], group=group)])
    g.output(g.conv(up, 8, 2))
    model = g.build()
    analysis = analysis_of(model)
    assert group_at(analysis, a).prunable and group_at(analysis, up).prunable
    prune_exact(model, 0.5)
