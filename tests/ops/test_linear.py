"""Tests of Gemm and MatMul (``spa.ops.linear``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at, prune_exact


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


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Gemm-transB"])
def test_isolated_dense_layer_runs_alone_at_the_widths_asked(op):
    import onnxruntime as ort

    from spa.core.graph import ModelGraph
    from spa.formats.shapes import infer_shapes
    from spa.ops.isolate import materialised
    from spa.ops.registry import DEFAULT

    g = Graph()
    x = g.input("x", [4, 16] if op.startswith("Gemm") else [2, 5, 16])
    if op == "MatMul":
        y = g.op("MatMul", [x, g.weight(16, 8)])
    elif op == "Gemm":
        y = g.op("Gemm", [x, g.weight(16, 8), g.weight(8)])
    else:
        y = g.op("Gemm", [x, g.weight(8, 16), g.weight(8)], transB=1)
    g.output(y)
    graph = ModelGraph(infer_shapes(g.build()))
    node = graph.nodes[0]
    lone = DEFAULT.of(node).isolated(graph, node, 12, 6)
    assert lone is not None and not lone.graph.initializer[0].raw_data  # weights filled only when timed
    lone = materialised(lone)
    shape = [d.dim_value for d in lone.graph.input[0].type.tensor_type.shape.dim]
    assert shape[-1] == 12
    session = ort.InferenceSession(lone.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.ones(shape, np.float32)})
    assert out.shape == (*shape[:-1], 6)


def test_a_product_of_two_activations_is_not_timed_as_a_layer():
    from spa.core.graph import ModelGraph
    from spa.formats.shapes import infer_shapes
    from spa.ops.registry import DEFAULT

    g = Graph()
    a, b = g.input("a", [2, 4, 8]), g.input("b", [2, 8, 4])
    g.output(g.op("MatMul", [a, b]))
    graph = ModelGraph(infer_shapes(g.build()))
    assert DEFAULT.of(graph.nodes[0]).isolated(graph, graph.nodes[0], 8, 4) is None
