"""Tests of the normalisations (``spa.ops.norm``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import pytest
from builder import Graph, analysis_of, group_at, initializer, node_attr, prune_exact

from spa.reporting.metrics import count


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


def test_mean_variance_normalization_is_counted_and_freezes_its_channels():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    h = g.op("Relu", [g.conv(x, 3, 6)])
    g.output(g.conv(g.op("MeanVarianceNormalization", [h]), 6, 2))
    analysis = analysis_of(g.build())
    mvn = next(n for n in analysis.graph.nodes if n.op_type == "MeanVarianceNormalization")
    assert count(analysis.graph).node_flops[mvn.name] == 5 * 6 * 4 * 4  # the moments, per element
    assert "no rule for op MeanVarianceNormalization" in group_at(analysis, h).frozen


def _rms_norm_between_matmuls(domain: str):
    g = Graph(opset=22)
    x = g.input("x", [1, 4, 6])
    h = g.op("MatMul", [x, g.weight(6, 8)])
    n = g.op("SimplifiedLayerNormalization", [h, g.weight(8, low=0.5)], axis=-1, epsilon=1e-5, domain=domain)
    g.output(g.op("MatMul", [n, g.weight(8, 3)]))
    return g.build(), n


@pytest.mark.parametrize("domain", ["", "com.microsoft"])
def test_simplified_layer_norm_couples_its_channels_in_either_domain(domain):
    # onnxruntime-genai writes it in the ONNX domain, onnxruntime's optimizer in its own
    model, n = _rms_norm_between_matmuls(domain)
    assert "approximate" in group_at(analysis_of(model), n, 2).frozen
    group = group_at(analysis_of(model, approximate=True), n, 2)
    assert group.prunable and group.size == 8


def test_simplified_layer_norm_in_the_onnx_domain_prunes_and_validates():
    model, n = _rms_norm_between_matmuls("")  # the only domain onnxruntime runs it in
    scale = next(n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization").input[1]
    result = prune_exact(model, 0.5, approximate=True)
    assert initializer(result.model, scale).shape == (4,)  # the norm's scale lost the removed channels
