"""Tests of the quantized operator format's weighted ops (``spa.ops.qlinear``) as a model holds them:
QLinearConv, QLinearMatMul and QGemm cost what the float ops cost, and their integer weights (not their
scales) are the float model's parameters. Pruning such models is tested in ``tests/test_qoperator.py``."""

import numpy as np
import onnx
from builder import Graph
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from spa.core.graph import ModelGraph
from spa.formats.shapes import infer_shapes
from spa.reporting.metrics import count


class _Samples(CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(0)
        self.items = iter([{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.items, None)


def test_qlinear_ops_cost_and_count_like_the_float_ops(tmp_path):
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(g.conv(x, 3, 8), 8, 4)
    flat = g.op("MatMul", [g.op("Reshape", [h, g.const(np.array([1, 144]))]), g.weight(144, 5)])
    g.output(g.op("Gemm", [flat, g.weight(3, 5), g.weight(3)], transB=1))
    onnx.save(g.build(), tmp_path / "dense.onnx")
    quantize_static(
        str(tmp_path / "dense.onnx"), str(tmp_path / "q.onnx"), _Samples(), quant_format=QuantFormat.QOperator
    )
    dense = count(ModelGraph(infer_shapes(onnx.load(tmp_path / "dense.onnx"))))
    quantized = count(ModelGraph(infer_shapes(onnx.load(tmp_path / "q.onnx"))))
    by_type = {}
    for node in quantized.nodes:
        by_type[node.op_type] = by_type.get(node.op_type, 0) + node.flops
    assert by_type["QLinearConv"] + by_type["QLinearMatMul"] + by_type["QGemm"] == dense.flops
    assert quantized.params == dense.params
