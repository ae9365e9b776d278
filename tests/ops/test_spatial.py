"""Tests of pooling, padding, resizing and reductions (``spa.ops.spatial``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at, prune_exact
from onnx import TensorProto


@pytest.mark.parametrize("pool,exact", [("ReduceMean", True), ("ReduceMax", True), ("ReduceLogSumExp", False)])
def test_a_spatial_reduction_keeps_a_zero_channel_zero_for_a_weightless_sink(pool, exact):
    # a zero channel's spatial mean or max is zero, its log-sum-exp is not (log of the pixel count)
    g = Graph(opset=17)
    x = g.input("x", [1, 3, 6, 6])
    a = g.op("Relu", [g.conv(x, 3, 8)])
    pooled = g.op(pool, [a], axes=[2, 3], keepdims=1)
    s = g.op("ReduceSum", [pooled, g.const(np.array([1]))], keepdims=1)  # sums channels, no weight
    g.output(g.op("Add", [g.conv(a, 8, 1), s]))
    model = g.build()
    assert group_at(analysis_of(model, approximate=True), a).exact == exact
    if exact:
        prune_exact(model, 0.5)


def test_pool_pad_resize_and_spatial_reduce_pass_channels():
    g = Graph(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    c = g.op("Relu", [g.conv(x, 3, 8)])
    p = g.op("MaxPool", [c], kernel_shape=[2, 2], strides=[2, 2])
    p = g.op("AveragePool", [p], kernel_shape=[1, 1])
    p = g.op("Pad", [p, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]))])
    r = g.op("Resize", [p, "", g.const(np.array([1, 1, 2, 2], dtype=np.float32))], mode="nearest")
    m = g.op("ReduceMean", [r], axes=[2, 3], keepdims=1)
    g.output(g.conv(m, 8, 2, k=1))
    model = g.build()
    analysis = analysis_of(model)
    group = group_at(analysis, c)
    assert group is group_at(analysis, m) and group.prunable
    prune_exact(model, 0.5)


def test_a_size_read_into_a_value_freezes_its_axis():
    g = Graph()
    x = g.input("x", ["batch", 3, 4, 4])
    h = g.op("Relu", [g.conv(x, 3, 6)])
    channels = g.op("Gather", [g.op("Shape", [h]), g.const(np.array(1))], axis=0)
    scaled = g.op("Div", [h, g.op("Cast", [channels], to=TensorProto.FLOAT)])
    g.output(g.conv(scaled, 6, 2))
    group = group_at(analysis_of(g.build()), h)
    assert "reads this size into a value" in group.frozen
