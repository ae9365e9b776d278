"""One test (at least) per operator rule, on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
from builder import Graph, analysis_of, group_at, initializer, node_attr, prune_exact
from onnx import TensorProto

import spa
from spa.formats.model import Model
from spa.ops.registry import RULES, Dim


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


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 1)])
def test_gemm_transposes(trans_a, trans_b):
    g = Graph()
    x = g.input("x", [6, 2] if trans_a else [2, 6])
    w1 = g.weight(10, 6) if trans_b else g.weight(6, 10)
    h = g.op("Relu", [g.op("Gemm", [x, w1, g.weight(10)], transA=trans_a, transB=trans_b)])
    y = g.op("Gemm", [h, g.weight(3, 10), g.weight(3)], transB=1)
    g.output(y)
    model = g.build()
    assert group_at(analysis_of(model), h).size == 10
    prune_exact(model, 0.3)


def test_matmul_against_constant_weight():
    g = Graph()
    x = g.input("x", [2, 5, 6])
    h = g.op("Relu", [g.op("Add", [g.op("MatMul", [x, g.weight(6, 12)]), g.weight(12)])])
    g.output(g.op("MatMul", [h, g.weight(12, 4)]))
    model = g.build()
    assert group_at(analysis_of(model), h, 2).size == 12
    prune_exact(model, 0.5)


def test_contraction_with_an_activation_of_unknown_width_freezes_the_weight_too():
    # BERT's head merge reaches the output projection with an unknown last axis: the weight's
    # input side must not shrink on its own
    g = Graph()
    x = g.input("x", [2, 5, "k"])
    w = g.weight(6, 12)
    g.output(g.op("MatMul", [g.op("Relu", [g.op("MatMul", [x, w])]), g.weight(12, 4)]))
    analysis = analysis_of(g.build())
    assert "unknown" in group_at(analysis, w, 0).frozen
    assert group_at(analysis, w, 1).frozen is None


@pytest.mark.parametrize("norm", ["BatchNormalization", "InstanceNormalization"])
def test_per_channel_norms_slice_their_parameters(norm):
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    c = g.conv(x, 3, 8)
    params = [g.weight(8, low=0.5), g.weight(8)]
    if norm == "BatchNormalization":
        params += [g.weight(8), g.weight(8, low=0.5, high=1.5)]
    n = g.op("Relu", [g.op(norm, [c] + params)])
    g.output(g.conv(n, 8, 2))
    model = g.build()
    assert group_at(analysis_of(model), n).size == 8
    result = prune_exact(model, 0.5)
    assert initializer(result.model, params[0]).shape == (4,)


def test_group_norm_removes_whole_groups():
    g = Graph(opset=21)
    x = g.input("x", [1, 3, 6, 6])
    c = g.conv(x, 3, 8)
    n = g.op("GroupNormalization", [c, g.weight(8, low=0.5), g.weight(8)], num_groups=4)
    g.output(g.conv(g.op("Relu", [n]), 8, 2))
    model = g.build()
    group = group_at(analysis_of(model), n)
    assert group.size == 4 and group.exact  # a unit is a whole group of 2 channels
    result = prune_exact(model, 0.5)
    assert node_attr(result.model, "GroupNormalization", "num_groups") == 2


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


def test_gather_constant_indices_on_channel_axis():
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    c = g.op("Relu", [g.conv(x, 3, 8)])
    picked = g.op("Gather", [c, g.const(np.array([0, 2, 5, 7]))], axis=1)
    g.output(g.op("Add", [g.conv(picked, 4, 2), g.conv(c, 8, 2)]))
    prune_exact(g.build(), 0.5)


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


def test_op_without_rule_freezes_and_is_named():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    c = g.op("Relu", [g.conv(x, 3, 6)])
    cs = g.op("CumSum", [c, g.const(np.array(1))], name="running_total")
    g.output(g.conv(cs, 6, 2))
    group = group_at(analysis_of(g.build()), c)
    assert not group.prunable
    assert "CumSum" in group.frozen and "running_total" in group.frozen


def test_layer_norm_over_channels_is_approximate():
    g = Graph()
    x = g.input("x", [1, 4, 6])
    h = g.op("MatMul", [x, g.weight(6, 8)])
    n = g.op("LayerNormalization", [h, g.weight(8, low=0.5), g.weight(8)], axis=-1)
    g.output(g.op("MatMul", [n, g.weight(8, 3)]))
    model = g.build()
    group = group_at(analysis_of(model), n, 2)
    assert not group.exact and "approximate" in group.frozen
    group = group_at(analysis_of(model, approximate=True), n, 2)
    assert group.prunable and not group.exact


def _reduce_mean(g, x, name):
    """ReduceMean over the last axis, keeping it; opset 18 moved the axes to an input."""
    if g.opset >= 18:
        return g.op("ReduceMean", [x, g.const(np.array([-1]))], keepdims=1, name=name)
    return g.op("ReduceMean", [x], axes=[-1], keepdims=1, name=name)


def _norm_written_out(g, h, kind, divide):
    """LayerNorm or RMSNorm over h's last axis as exporters spell them out, with weight (and bias)."""
    two, eps = g.const(np.array(2.0, dtype=np.float32)), g.const(np.array(1e-5, dtype=np.float32))
    if kind == "layer":
        base = g.op("Sub", [h, _reduce_mean(g, h, "mean")])
        stat = _reduce_mean(g, g.op("Pow", [base, two]), "variance")
    else:
        base, stat = h, _reduce_mean(g, g.op("Pow", [h, two]), "mean_square")
    root = g.op("Sqrt", [g.op("Add", [stat, eps])])
    y = g.op("Div", [base, root]) if divide else g.op("Mul", [base, g.op("Reciprocal", [root])])
    y = g.op("Mul", [y, g.weight(8, low=0.5)])
    return g.op("Add", [y, g.weight(8)]) if kind == "layer" else y


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("kind,divide", [("layer", True), ("layer", False), ("rms", True), ("rms", False)])
def test_norm_written_out_is_one_approximate_norm(kind, divide, opset):
    g = Graph(opset=opset)
    x = g.input("x", [1, 4, 6])
    w1, w2 = g.weight(6, 8), g.weight(8, 3)
    h = g.op("MatMul", [x, w1])
    n = _norm_written_out(g, h, kind, divide)
    g.output(g.op("MatMul", [n, w2]))
    model = g.build()
    analysis = analysis_of(model)
    group = group_at(analysis, h, 2)
    assert group_at(analysis, n, 2) is group
    assert {Dim(w1, 1), Dim(w2, 0)} <= set(group.dims) and not group.exact
    name = (
        "LayerNorm written out (ReduceMean 'mean')"
        if kind == "layer"
        else "RMSNorm written out (ReduceMean 'mean_square')"
    )
    assert name in group.inexact_reason and "approximate" in group.frozen  # one norm, named once
    assert group.inexact_reason.count("written out") == 1
    group = group_at(analysis_of(model, approximate=True), h, 2)
    assert group.prunable
    result = spa.prune(model, ratio=0.5, approximate=True)
    assert result.report.validation.ok, result.report.validation.problems
    assert result.report.validation.approximate_groups == 1
    assert initializer(result.model, w1).shape == (6, 4) and initializer(result.model, w2).shape == (4, 3)


def test_channel_mean_that_is_no_norm_keeps_the_plain_description():
    # a spatial-attention gate from the mean over channels: approximate as before, but not a norm
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    c = g.op("Relu", [g.conv(x, 3, 8)])
    m = g.op("ReduceMean", [c], axes=[1], keepdims=1, name="channel_mean")
    gate = g.op("Sigmoid", [g.conv(m, 1, 1)])
    g.output(g.conv(g.op("Mul", [c, gate]), 8, 2))
    group = group_at(analysis_of(g.build()), c)
    assert not group.exact and "approximate" in group.frozen
    assert "ReduceMean 'channel_mean'" in group.inexact_reason and "written out" not in group.inexact_reason


def test_centring_alone_is_no_norm():
    g = Graph()
    x = g.input("x", [1, 4, 6])
    h = g.op("MatMul", [x, g.weight(6, 8)])
    centred = g.op("Sub", [h, _reduce_mean(g, h, "mean")])
    g.output(g.op("MatMul", [centred, g.weight(8, 3)]))
    group = group_at(analysis_of(g.build()), h, 2)
    assert not group.exact and "ReduceMean 'mean'" in group.inexact_reason
    assert "written out" not in group.inexact_reason


def test_tied_output_embedding_is_the_hidden_group():
    # ids -> table rows -> residual block -> RMSNorm -> logits = h @ table^T, the table shared
    g = Graph()
    ids = g.input("ids", [1, 5], TensorProto.INT64)
    table, w1, w2 = g.weight(20, 8), g.weight(8, 16), g.weight(16, 8)
    h = g.op("Gather", [table, ids], axis=0)
    r = g.op("Add", [h, g.op("MatMul", [g.op("Relu", [g.op("MatMul", [h, w1])]), w2])])
    n = _norm_written_out(g, r, "rms", divide=False)
    head = g.op("Transpose", [table], perm=[1, 0])
    g.output(g.op("MatMul", [n, head]))
    model = g.build()
    analysis = analysis_of(model)
    hidden = group_at(analysis, table, 1)
    assert {Dim(h, 2), Dim(r, 2), Dim(n, 2), Dim(head, 0), Dim(w1, 0), Dim(w2, 1)} <= set(hidden.dims)
    assert not hidden.exact and "approximate" in hidden.frozen
    assert "graph output" in group_at(analysis, table, 0).frozen  # the vocabulary: logits keep their width
    assert group_at(analysis, w1, 1).prunable  # the MLP in between stays exact
    result = spa.prune(model, ratio=0.5, approximate=True)
    assert result.report.validation.ok, result.report.validation.problems
    assert initializer(result.model, table).shape == (20, 4)
    assert initializer(result.model, w1).shape == (4, 8) and initializer(result.model, w2).shape == (8, 4)


def test_softmax_over_channels_freezes():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    c = g.conv(x, 3, 6)
    g.output(g.conv(g.op("Softmax", [c], axis=1), 6, 2))
    group = group_at(analysis_of(g.build()), c)
    assert "Softmax" in group.frozen


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


def test_onnx_attention_per_head_mask_freezes():
    model, wq, _ = _sdpa_packed_heads(4, mask_heads=4)
    assert "per-head attention mask" in group_at(analysis_of(model), wq, 1).frozen
    model, wq, _ = _sdpa_packed_heads(4, mask_heads=1)  # one mask for every head
    assert group_at(analysis_of(model), wq, 1).prunable


def test_rotary_embedding_passes_heads_and_keeps_head_dim():
    model, wq, wk = _sdpa_split_heads(kv=4, rotary=True)
    group = group_at(analysis_of(model), wq, 1)
    assert group.size == 4 and group.prunable and group.exact
    result = prune_exact(model, 0.5)
    assert initializer(result.model, wk).shape == (8, 8)
    assert node_attr(result.model, "RotaryEmbedding", "num_heads") == 2
    assert "rotates pairs of head_dim" in group_at(analysis_of(model, attention="head_dim"), wq, 1).frozen


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


def test_every_rule_is_exercised_here():
    """A new rule needs a test: this lists the ops no test above builds."""
    import inspect
    import sys

    source = inspect.getsource(sys.modules[__name__])
    source += (Path(__file__).parent / "test_recurrent.py").read_text()  # LSTM, GRU, RNN, ConstantOfShape
    source += (Path(__file__).parent / "test_quantized.py").read_text()  # QuantizeLinear, DequantizeLinear
    untested = sorted(op for _, op in RULES if f'"{op}"' not in source)
    allowed = {
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Softsign",
        "Mish",
        "Erf",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "Abs",
        "Sin",
        "Cos",
        "Tan",
        "Asin",
        "Acos",
        "Atan",
        "Sinh",
        "Cosh",
        "Asinh",
        "Acosh",
        "Atanh",
        "Sign",
        "Floor",
        "Ceil",
        "Round",
        "Not",
        "IsNaN",
        "IsInf",
        "Clip",
        "Cast",
        "CastLike",
        "Identity",
        "Dropout",
        "ThresholdedRelu",
        "Shrink",
        "QuickGelu",
        "Sub",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "Where",
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "And",
        "Or",
        "Xor",
        "Mod",
        "BitShift",
        "BitwiseAnd",
        "BitwiseOr",
        "BitwiseXor",
        "LogSoftmax",
        "Hardmax",
        "LpPool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "MaxRoiPool",
        "Upsample",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceSumSquare",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ArgMax",
        "ArgMin",
        "Size",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "RMSNormalization",
        "SkipSimplifiedLayerNormalization",
        "BiasAdd",
    }
    # the families above share their rule (and its test) with a tested sibling
    assert set(untested) <= allowed, f"ops with a rule but no test: {sorted(set(untested) - allowed)}"


def test_exporter_shape_arithmetic_is_folded_so_axes_stay_known():
    # BERT's legacy export builds an Expand shape from ConstantOfShape -> Mul -> Equal -> Where;
    # onnx's inference stops there, the axis turns unknown and every group behind it froze
    g = Graph(opset=17)
    x = g.input("x", [1, 4, 8])
    ones = g.op(
        "ConstantOfShape",
        [g.const(np.array([3], np.int64))],
        value=onnx.helper.make_tensor("v", TensorProto.INT64, [1], [1]),
    )
    minus = g.op("Mul", [ones, g.const(np.array(-1, np.int64))])
    target = g.const(np.array([1, 4, 8], np.int64))
    shape = g.op("Where", [g.op("Equal", [target, minus]), ones, target])
    bias = g.op("Expand", [g.weight(1, 4, 8), shape])
    h = g.op("Relu", [g.op("Add", [g.op("MatMul", [g.op("Add", [x, bias]), g.weight(8, 16)]), g.weight(16)])])
    g.output(g.op("MatMul", [h, g.weight(16, 8)]))
    model = g.build()
    prepared = Model.load(model)
    assert not any(n.op_type in ("ConstantOfShape", "Where", "Equal") for n in prepared.graph.nodes)
    assert prepared.graph.shape(bias) == (1, 4, 8)
    assert group_at(analysis_of(model), h, 2).frozen is None
    prune_exact(model, 0.5)
