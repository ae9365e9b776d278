"""Tests of QuantizeLinear and DequantizeLinear (``spa.ops.quantize``) as parameter counting sees them:
the integer data of a quantized weight is a parameter, its scale and zero point are not.
Coupling and pruning of QDQ models are tested in ``tests/test_quantized.py``."""

import numpy as np
from builder import Graph, analysis_of

from spa.reporting.metrics import count


def test_a_quantized_weight_counts_its_data_not_its_scale_or_zero_point():
    g = Graph()
    x = g.input("x", [1, 6])
    scale, zero = g.const(np.float32(0.1)), g.const(np.uint8(128))
    xq = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, scale, zero]), scale, zero])
    data = g.const(np.ones((6, 4), np.int8))
    w = g.op("DequantizeLinear", [data, g.const(np.full(4, 0.02, np.float32)), g.const(np.zeros(4, np.int8))], axis=1)
    g.output(g.op("MatMul", [xq, w]))
    assert count(analysis_of(g.build()).graph).params == 6 * 4
