"""Tests of Gather (``spa.ops.gather``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
from builder import Graph, analysis_of, group_at, initializer, prune_exact
from onnx import TensorProto
from patterns.test_decomposed import _norm_written_out

import spa
from spa.core.coupling import Dim


def test_gather_constant_indices_on_channel_axis():
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    c = g.op("Relu", [g.conv(x, 3, 8)])
    picked = g.op("Gather", [c, g.const(np.array([0, 2, 5, 7]))], axis=1)
    g.output(g.op("Add", [g.conv(picked, 4, 2), g.conv(c, 8, 2)]))
    prune_exact(g.build(), 0.5)


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
