"""Tests of GroupNorm written out (``spa.patterns.groupnorm``), on graphs built by hand.

Both torch exporters write ``nn.GroupNorm(G, C)`` as Reshape [N, C, H, W] -> [N, G, -1],
InstanceNormalization with a scale of ones and a bias of zeros, a Reshape back and a per-channel
Mul and Add. The legacy exporter's targets are [0, G, -1] and the Shape of the input; the dynamo
exporter's are literals ([1, G, -1] and [1, C, H, W]). A unit is a whole group of C/G channels.
"""

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at, initializer, prune_exact
from onnx import numpy_helper

C, SIDE = 8, 6


def group_norm(g, x, groups, form, target=None):
    """nn.GroupNorm(groups, C) over x [1, C, SIDE, SIDE] as ``form`` writes it; returns (output, IN scale)."""
    if form == "legacy":
        into = target or g.const(np.array([0, groups, -1], dtype=np.int64))
        back = g.op("Shape", [x])
    elif form == "dynamo":
        into = target or g.const(np.array([1, groups, -1], dtype=np.int64))
        back = g.const(np.array([1, C, SIDE, SIDE], dtype=np.int64))
    else:  # computed: the batch read at run time, the group count a literal inside the Concat
        batch = g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", [x]), g.const(np.array(0))]), g.const(np.array([0]))])
        pieces = [batch, g.const(np.array([groups], dtype=np.int64)), g.const(np.array([-1], dtype=np.int64))]
        into = g.op("Concat", pieces, axis=0)
        back = g.op("Shape", [x])
    scale = g.const(np.ones(groups, dtype=np.float32))
    grouped = g.op("Reshape", [x, into])
    normed = g.op("InstanceNormalization", [grouped, scale, g.const(np.zeros(groups, dtype=np.float32))])
    y = g.op("Reshape", [normed, back])
    y = g.op("Add", [g.op("Mul", [y, g.weight(C, 1, 1, low=0.5, high=1.5)]), g.weight(C, 1, 1)])
    return y, scale


def group_norm_net(groups, form, shared_target=False):
    """conv -> GroupNorm -> Relu -> conv -> GroupNorm -> Relu -> conv, as a CNN writes it."""
    g = Graph()
    h = g.input("x", [1, 3, SIDE, SIDE])
    target = g.const(np.array([1, groups, -1], dtype=np.int64)) if shared_target else None
    convs, scales = [], []
    for cin in (3, C):
        h = g.conv(h, cin, C)
        convs.append(h)
        h, scale = group_norm(g, h, groups, form, target)
        scales.append(scale)
        h = g.op("Relu", [h])
    g.output(g.conv(h, C, 2))
    return g.build(), convs, scales


def conv_weights(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]


def kept_rows(dense: np.ndarray, pruned: np.ndarray) -> list[int]:
    return [next(i for i, row in enumerate(dense) if np.array_equal(row, kept)) for kept in pruned]


@pytest.mark.parametrize("form", ["legacy", "dynamo", "computed"])
def test_whole_groups_go_and_every_size_follows(form):
    model, convs, scales = group_norm_net(4, form)
    analysis = analysis_of(model)
    for conv in convs:
        group = group_at(analysis, conv)
        assert group.size == 4 and group.exact and group.frozen is None  # 4 groups of 2 channels
    result = prune_exact(model, 0.5, compensate=False)
    assert result.report.validation.soft_equal
    assert [initializer(result.model, s).shape for s in scales] == [(2,), (2,)]  # one scale per group
    rows = kept_rows(conv_weights(model)[0], conv_weights(result.model)[0])  # the first conv keeps its inputs
    assert len(rows) == 4 and all(rows[k] // 2 == rows[k + 1] // 2 for k in (0, 2))  # whole pairs of channels
    assert set(reshape_targets(result.model)) <= {(0, 2, -1), (1, 2, -1), (1, 4, SIDE, SIDE)}


def reshape_targets(model) -> list[tuple]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [
        tuple(inits[n.input[1]].tolist()) for n in model.graph.node if n.op_type == "Reshape" and n.input[1] in inits
    ]


def test_two_group_norms_reading_one_target_lose_groups_independently():
    """The dynamo exporter writes one [1, G, -1] for every GroupNorm of the same G."""
    model, convs, _ = group_norm_net(4, "dynamo", shared_target=True)
    analysis = analysis_of(model)
    assert group_at(analysis, convs[0]).id != group_at(analysis, convs[1]).id
    first, second = (n.name for n in model.graph.node if n.op_type == "Conv" and n.output[0] in convs)
    result = prune_exact(model, 0.5, ratios={first: 0.25}, compensate=False)
    assert result.report.validation.soft_equal
    # one group of four goes in the first GroupNorm, two in the second: into groups and back
    assert sorted(reshape_targets(result.model)) == [(1, 2, -1), (1, 3, -1), (1, 4, SIDE, SIDE), (1, 6, SIDE, SIDE)]


def test_instance_norm_groups_of_one_channel():
    model, convs, scales = group_norm_net(C, "legacy")
    group = group_at(analysis_of(model), convs[0])
    assert group.size == C and group.exact
    result = prune_exact(model, 0.5, compensate=False)
    assert result.report.validation.soft_equal


@pytest.mark.parametrize("form", ["legacy", "dynamo"])
def test_one_group_couples_like_a_layer_norm(form):
    model, convs, _ = group_norm_net(1, form)
    group = group_at(analysis_of(model), convs[0])
    assert not group.exact and "GroupNorm of one group" in group.frozen and "--approximate" in group.frozen
    assert group_at(analysis_of(model, approximate=True), convs[0]).prunable
    result = prune_exact(model, 0.5, approximate=True, compensate=False)
    assert result.report.params_after < result.report.params_before


def test_a_regrouping_reshape_without_the_norm_still_freezes():
    g = Graph()
    h = g.conv(g.input("x", [1, 3, SIDE, SIDE]), 3, C)
    grouped = g.op("Reshape", [h, g.const(np.array([1, 4, -1], dtype=np.int64))], name="regroup")
    g.output(g.op("Relu", [grouped]))
    assert "Reshape 'regroup' regroups this axis with others" in group_at(analysis_of(g.build()), h).frozen
