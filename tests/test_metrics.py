"""Params and FLOPs against counts worked out by hand."""
from builder import Graph
from spa.api import _prepare
from spa.metrics import count


def stats(model):
    return count(_prepare(model, None).graph)


def test_conv_gemm_matmul_counts():
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    c = g.op("Conv", [x, g.weight(4, 3, 3, 3), g.weight(4)], pads=[1, 1, 1, 1])  # 4x8x8 outputs
    d = g.op("Conv", [c, g.weight(4, 1, 3, 3)], pads=[1, 1, 1, 1], group=4)  # depthwise, no bias
    f = g.op("Flatten", [d], axis=1)  # 256 features
    y = g.op("Gemm", [f, g.weight(10, 256), g.weight(10)], transB=1)
    z = g.op("MatMul", [y, g.weight(10, 5)])
    g.output(z)
    s = stats(g.build())
    assert s.params == (4 * 3 * 9 + 4) + 4 * 9 + (10 * 256 + 10) + 10 * 5
    conv = 2 * (4 * 8 * 8) * (3 * 9) + 4 * 8 * 8
    depthwise = 2 * (4 * 8 * 8) * 9
    gemm = 2 * 10 * 256 + 10
    matmul = 2 * 5 * 10
    assert s.flops == conv + depthwise + gemm + matmul


def test_symbolic_batch_counts_per_sample():
    g = Graph()
    x = g.input("x", ["batch", 6])
    g.output(g.op("Gemm", [x, g.weight(6, 4)]))
    assert stats(g.build()).flops == 2 * 6 * 4


def test_conv_transpose_counts_per_input_element():
    g = Graph()
    x = g.input("x", [1, 4, 3, 3])
    g.output(g.op("ConvTranspose", [x, g.weight(4, 2, 2, 2)], strides=[2, 2]))
    assert stats(g.build()).flops == 2 * (4 * 3 * 3) * (2 * 2 * 2)
