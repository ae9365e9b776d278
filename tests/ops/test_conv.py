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


def _isolated_output(model, node_index, in_width, out_width):
    """The node alone at the widths asked, materialised and run: its output shape and weight shape."""
    import numpy as np
    import onnxruntime as ort

    from spa.core.graph import ModelGraph
    from spa.formats.shapes import infer_shapes
    from spa.ops.isolate import materialised
    from spa.ops.registry import DEFAULT

    graph = ModelGraph(infer_shapes(model))
    node = graph.nodes[node_index]
    lone = DEFAULT.of(node).isolated(graph, node, in_width, out_width)
    if lone is None:
        return None
    lone = materialised(lone)
    shape = [d.dim_value for d in lone.graph.input[0].type.tensor_type.shape.dim]
    session = ort.InferenceSession(lone.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones(shape, np.float32)})
    return y.shape, tuple(lone.graph.initializer[0].dims), lone.graph.node[0]


def test_isolated_conv_runs_alone_at_the_widths_asked():
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 16)])
    d = g.conv(a, 16, 16, group=16)
    g.output(g.conv(d, 16, 4, k=1))
    model = g.build()
    y, w, _ = _isolated_output(model, 0, 3, 12)
    assert y == (1, 12, 8, 8) and w == (12, 3, 3, 3)
    y, w, node = _isolated_output(model, 2, 10, 10)  # depthwise: the group count follows the width
    assert y == (1, 10, 8, 8) and w == (10, 1, 3, 3)
    assert next(a.i for a in node.attribute if a.name == "group") == 10
    y, w, _ = _isolated_output(model, 3, 9, 4)
    assert y == (1, 4, 8, 8) and w == (4, 9, 1, 1)


def test_grouped_conv_that_is_not_depthwise_is_not_timed_alone():
    g = Graph()
    x = g.input("x", [1, 8, 8, 8])
    g.output(g.conv(x, 8, 8, group=2))
    assert _isolated_output(g.build(), 0, 6, 6) is None
