"""Tests of exporters' shape arithmetic (``spa.patterns.shapes``), on graphs built by hand.

Each test asserts the coupling the rule must produce (which dimensions share a
group, how many units it has, what is frozen and why) and, where the group is
prunable, that pruning it gives a valid model whose outputs equal the soft
(zeroed) model's: the check that catches wrong offsets, strides and permutations.
"""

import numpy as np
import onnx
from builder import Graph, analysis_of, group_at, prune_exact
from onnx import TensorProto

from spa.formats.model import Model


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
