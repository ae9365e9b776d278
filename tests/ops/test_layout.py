"""Tests of the layout ops (``spa.ops.layout``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at, prune_exact

from spa.core.coupling import Dim


def test_concat_on_channel_axis_keeps_offsets():
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    a, b = g.op("Relu", [g.conv(x, 3, 4)]), g.op("Relu", [g.conv(x, 3, 6)])
    cat = g.op("Concat", [a, b], axis=1)
    g.output(g.conv(cat, 10, 2))
    model = g.build()
    analysis = analysis_of(model)
    assert group_at(analysis, a).size == 4 and group_at(analysis, b).size == 6
    prune_exact(model, 0.5)


def test_concat_on_spatial_axis_couples_channels_of_all_inputs():
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    a, b = g.op("Relu", [g.conv(x, 3, 5)]), g.op("Relu", [g.conv(x, 3, 5)])
    cat = g.op("Concat", [a, b], axis=2)
    g.output(g.conv(cat, 5, 2))
    model = g.build()
    analysis = analysis_of(model)
    assert group_at(analysis, a) is group_at(analysis, b)
    prune_exact(model, 0.4)


@pytest.mark.parametrize("opset", [11, 17])
def test_split_sizes_follow_the_cut(opset):
    g = Graph(opset=opset)
    x = g.input("x", [1, 3, 6, 6])
    c = g.op("Relu", [g.conv(x, 3, 8)])
    if opset >= 13:
        left, right = g.op("Split", [c, g.const(np.array([3, 5]))], n_out=2, axis=1)
    else:
        left, right = g.op("Split", [c], n_out=2, axis=1, split=[3, 5])
    g.output(g.op("Add", [g.conv(left, 3, 2), g.conv(right, 5, 2)]))
    model = g.build()
    analysis = analysis_of(model)
    assert group_at(analysis, left).size == 3 and group_at(analysis, right).size == 5
    prune_exact(model, 0.5)


def test_slice_on_channel_axis_rewrites_bounds():
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    c = g.op("Relu", [g.conv(x, 3, 10)])
    s = g.op("Slice", [c, g.const(np.array([2])), g.const(np.array([7])), g.const(np.array([1]))])
    g.output(g.op("Add", [g.conv(s, 5, 2), g.conv(c, 10, 2)]))
    model = g.build()
    prune_exact(model, 0.5)


def test_transpose_to_channels_last_and_back():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    c = g.conv(x, 3, 8)
    t = g.op("Transpose", [c], perm=[0, 2, 3, 1])
    h = g.op("Relu", [g.op("MatMul", [t, g.weight(8, 8)])])
    back = g.op("Transpose", [h], perm=[0, 3, 1, 2])
    g.output(g.conv(back, 8, 2))
    model = g.build()
    analysis = analysis_of(model)
    assert group_at(analysis, c) is group_at(analysis, t, 3)
    assert group_at(analysis, h, 3) is group_at(analysis, back)
    prune_exact(model, 0.5)


def test_channel_shuffle_is_a_permutation():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    a, b = g.op("Relu", [g.conv(x, 3, 6)]), g.op("Relu", [g.conv(x, 3, 6)])
    cat = g.op("Concat", [a, b], axis=1)
    r = g.op("Reshape", [cat, g.const(np.array([1, 2, 6, 4, 4]))])
    t = g.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
    shuffled = g.op("Reshape", [t, g.const(np.array([1, 12, 4, 4]))])
    left, right = g.op("Split", [shuffled, g.const(np.array([6, 6]))], n_out=2, axis=1)
    g.output(g.op("Add", [g.conv(left, 6, 2), g.conv(right, 6, 2)]))
    model = g.build()
    analysis = analysis_of(model)
    # channel j of branch a and of branch b travel together through the shuffle, and the
    # split then sends units 0-2 left and 3-5 right: two groups of three units
    assert np.array_equal(analysis.labels[Dim(a, 1)], analysis.labels[Dim(b, 1)])
    assert group_at(analysis, left).size == 3 and group_at(analysis, right).size == 3
    prune_exact(model, 0.5)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_both_modes_and_space_to_depth(mode):
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    c = g.conv(x, 3, 12)  # 12 = 3 * 2 * 2
    d = g.op("Relu", [g.op("DepthToSpace", [c], blocksize=2, mode=mode)])
    e = g.conv(d, 3, 4)
    s = g.op("SpaceToDepth", [g.op("Relu", [e])], blocksize=2)  # 16 channels
    g.output(g.conv(s, 16, 2))
    model = g.build()
    analysis = analysis_of(model)
    assert group_at(analysis, c) is group_at(analysis, d)
    assert group_at(analysis, d).size == 3  # one unit = a channel and its 4 sub-pixels
    assert group_at(analysis, e) is group_at(analysis, s)
    prune_exact(model, 0.34)


def test_tile_and_expand_along_other_axes():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    c = g.op("Relu", [g.conv(x, 3, 6)])
    t = g.op("Tile", [c, g.const(np.array([1, 1, 2, 1]))])
    gap = g.op("GlobalAveragePool", [c])
    e = g.op("Expand", [gap, g.const(np.array([1, 6, 8, 4]))])
    g.output(g.conv(g.op("Add", [t, e]), 6, 2))
    model = g.build()
    analysis = analysis_of(model)
    assert group_at(analysis, c) is group_at(analysis, e)
    prune_exact(model, 0.5)


def test_zeros_shaped_like_a_channel_axis_shrink_with_it():
    g = Graph()
    x = g.input("x", ["batch", 3, 4, 4])
    h = g.op("Relu", [g.conv(x, 3, 6)])
    zeros = g.op("ConstantOfShape", [g.op("Shape", [h])])
    g.output(g.conv(g.op("Add", [h, zeros]), 6, 2))
    model = g.build()
    assert group_at(analysis_of(model), h).prunable
    prune_exact(model, 0.5)
