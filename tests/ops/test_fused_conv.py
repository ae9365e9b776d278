"""Tests of com.microsoft FusedConv (``spa.ops.fused_conv``) on models onnxruntime itself fused: a
Conv and its activation saved as one op by a session optimized at the extended level."""

import numpy as np
import onnx
import onnxruntime as ort
from builder import Graph, analysis_of, group_at, prune_exact
from onnx import numpy_helper

import spa


def _fused(model: onnx.ModelProto, tmp_path, name: str) -> onnx.ModelProto:
    """The model as onnxruntime rewrites it for its CPU kernels (ORT_ENABLE_EXTENDED)."""
    source, target = tmp_path / f"{name}.onnx", tmp_path / f"{name}-fused.onnx"
    onnx.save(model, source)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return onnx.load(target)


def _two_convs(activation: str, sink: bool = False):
    g = Graph(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    a = g.op(activation, [g.conv(x, 3, 8)])
    y = g.conv(a, 8, 4)
    if sink:  # a sum over the channels, with no weight that the soft model zeroes
        y = g.op("Add", [y, g.op("ReduceSum", [a, g.const(np.array([1]))], keepdims=1)])
    g.output(y)
    return g.build()


def _fused_output(model: onnx.ModelProto) -> str:
    node = next(n for n in model.graph.node if n.op_type == "FusedConv")
    assert node.domain == "com.microsoft"
    return node.output[0]


def test_onnxruntime_fused_conv_prunes_with_soft_equal_to_hard(tmp_path):
    model = _fused(_two_convs("Relu"), tmp_path, "relu")
    out = _fused_output(model)
    group = group_at(analysis_of(model), out)
    assert group.prunable and group.exact and group.size == 8
    result = prune_exact(model, 0.5)
    widths = sorted(list(t.dims) for t in result.model.graph.initializer if len(t.dims) == 4)
    assert widths == [[4, 3, 3, 3], [4, 4, 3, 3]]  # 8 channels halved between the two convs


def test_fused_and_unfused_forms_cost_the_same_and_prune_to_the_same_weights(tmp_path):
    dense = _two_convs("Relu")
    fused = _fused(dense, tmp_path, "relu")
    assert spa.analyze(fused).flops == spa.analyze(dense).flops  # the activation counts as its own node did
    # the default run: synthetic statistics, OBS scores and the refit, which fits W x + b in both forms
    pruned = [spa.prune(m, 0.5).model for m in (dense, fused)]
    weights = [sorted((numpy_helper.to_array(t) for t in m.graph.initializer), key=np.shape) for m in pruned]
    assert len(weights[0]) == len(weights[1])
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_sigmoid_fused_in_keeps_a_removed_channel_non_zero_for_a_weightless_sink(tmp_path):
    relu = _fused(_two_convs("Relu", sink=True), tmp_path, "relu-sink")
    assert group_at(analysis_of(relu), _fused_output(relu)).exact  # relu(0) == 0: the sum sees zeros
    prune_exact(relu, 0.5)
    sigmoid = _fused(_two_convs("Sigmoid", sink=True), tmp_path, "sigmoid-sink")
    group = group_at(analysis_of(sigmoid), _fused_output(sigmoid))
    assert not group.exact and "approximate" in group.frozen  # sigmoid(0) == 0.5 reaches the sum
