"""Tests of norms written out as element-wise ops (``spa.patterns.decomposed``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at, initializer

import spa
from spa.core.coupling import Dim


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
