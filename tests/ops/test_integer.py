"""Tests of dynamic quantization's integer ops (``spa.ops.integer``): DynamicQuantizeLinear,
MatMulInteger and ConvInteger, as onnxruntime's ``quantize_dynamic`` writes them, seen as the float
layers they compute. Pruning them is tested in ``tests/test_quantized.py``."""

import onnx
from builder import Graph, analysis_of
from onnxruntime.quantization import quantize_dynamic

from spa.analysis.layers import linear_layers
from spa.reporting.metrics import count


def test_integer_products_are_linear_layers_and_their_weights_are_parameters(tmp_path):
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    h = g.op("Relu", [g.conv(x, 3, 8, bias=False)])
    flat = g.op("Flatten", [g.op("GlobalAveragePool", [h])])
    g.output(g.op("MatMul", [flat, g.weight(8, 5)]))
    dense = g.build()
    onnx.save(dense, tmp_path / "dense.onnx")
    quantize_dynamic(str(tmp_path / "dense.onnx"), str(tmp_path / "dynamic.onnx"))
    graph = analysis_of(onnx.load(tmp_path / "dynamic.onnx")).graph
    ops = {n.op_type for n in graph.nodes}
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} <= ops
    layers = {layer.node.op_type: layer for layer in linear_layers(graph)}
    assert layers["ConvInteger"].convolution and layers["ConvInteger"].output_axis == 0
    assert not layers["MatMulInteger"].convolution and layers["MatMulInteger"].output_axis == 1
    assert count(graph).params == count(analysis_of(dense).graph).params == 8 * 3 * 3 * 3 + 8 * 5
