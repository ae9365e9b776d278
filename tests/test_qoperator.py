"""Models in onnxruntime's quantized operator format (QLinearConv, QGemm, QLinearAdd...): spa prunes
them in the QDQ form they stand for and writes them back in their own ops."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builder import Graph, analysis_of, prune_exact
from click.testing import CliRunner
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from test_quantized import MODELS, _Batches, _obs_keeps_mnist_accuracy_only_with_refits, _quantized

import spa
from spa.cli.commands import main
from spa.formats.canonicalize import canonicalize
from spa.formats.qoperator import FORMS, _domain, expand


def _qoperator(source: Path | onnx.ModelProto, target: Path, samples: np.ndarray, per_channel: bool = True) -> Path:
    if isinstance(source, onnx.ModelProto):
        onnx.save(source, str(target.with_suffix(".float.onnx")))
        source = target.with_suffix(".float.onnx")
    return _quantized(source, target, samples, per_channel, layout=QuantFormat.QOperator)


def _session(model: onnx.ModelProto, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # onnxruntime would fuse the QDQ form back into the integer kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feeds: dict, optimize: bool = True) -> np.ndarray:
    return _session(model, optimize).run(None, feeds)[0]


def _outputs(model: onnx.ModelProto, feeds: dict, names: list[str], optimize: bool = True) -> dict:
    """The values of tensors ``names``, made graph outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    session = _session(exposed, optimize)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _every_form() -> onnx.ModelProto:
    """Conv, LeakyRelu, Sigmoid, Mul, Add, Concat, AveragePool, GlobalAveragePool, MatMul and Gemm:
    what the static quantizer turns into QLinear ops."""
    g = Graph(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("LeakyRelu", [g.conv(x, 3, 6)], alpha=0.2)
    b = g.op("Mul", [a, g.op("Sigmoid", [g.conv(a, 6, 6)])])
    c = g.op("Concat", [g.op("Add", [a, b]), g.conv(b, 6, 4)], axis=1)
    pooled = g.op("AveragePool", [c], kernel_shape=[2, 2], strides=[2, 2])
    flat = g.op("Flatten", [g.op("GlobalAveragePool", [pooled])])
    hidden = g.op("MatMul", [flat, g.weight(10, 12)])
    g.output(g.op("Gemm", [hidden, g.weight(5, 12), g.weight(5)], transB=1))
    return g.build()


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_every_form_reads_as_the_qdq_graph_it_stands_for_and_fuses_back_unchanged(tmp_path):
    samples = np.random.default_rng(0).standard_normal((8, 1, 3, 8, 8)).astype(np.float32)
    quantized = canonicalize(onnx.load(str(_qoperator(_every_form(), tmp_path / "q.onnx", samples[:, 0]))))
    ops = Counter(n.op_type for n in quantized.graph.node)
    assert {
        "QLinearConv",
        "QLinearLeakyRelu",
        "QLinearSigmoid",
        "QLinearMul",
        "QLinearAdd",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearMatMul",
        "QGemm",
    } <= set(ops)
    expanded, expansion = expand(quantized, 17)
    onnx.checker.check_model(expanded)
    assert not {n.op_type for n in expanded.graph.node} & {op for _, op in FORMS}
    assert len(expansion.originals) == sum(ops[op] for _, op in FORMS)
    feeds = {"x": samples[0]}
    # every quantized op's integer output, computed in float by the QDQ form: a tie may round the
    # other way, nothing more (a bias read at a scale 1% off moves thousands of them)
    integers = [n.output[0] for n in quantized.graph.node if (_domain(n), n.op_type) in FORMS]
    ours, theirs = _outputs(expanded, feeds, integers, optimize=False), _outputs(quantized, feeds, integers)
    for name in integers:
        difference = np.abs(ours[name].astype(np.int32) - theirs[name].astype(np.int32))
        assert difference.max() <= 1 and np.count_nonzero(difference) <= 0.002 * difference.size, name
    dense = _run(quantized, feeds)
    fused = expansion.fuse(expanded)
    assert [(n.name, n.op_type, n.domain, list(n.input), list(n.output), _attributes(n)) for n in fused.graph.node] == [
        (n.name, n.op_type, n.domain, list(n.input), list(n.output), _attributes(n)) for n in quantized.graph.node
    ]
    assert {t.name for t in fused.graph.initializer} == {t.name for t in quantized.graph.initializer}
    assert np.array_equal(_run(fused, feeds), dense)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_qoperator_model_prunes_as_its_float_model_does_and_keeps_its_ops(tmp_path, per_channel):
    samples = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    dense = MODELS / "mini_resnet.onnx"
    quantized = _qoperator(dense, tmp_path / "q.onnx", samples, per_channel)
    groups = analysis_of(onnx.load(str(quantized))).prunable_groups
    assert sorted(g.size for g in groups) == sorted(g.size for g in analysis_of(onnx.load(str(dense))).prunable_groups)

    # reports name the ops the model has, not their float forms
    report = spa.analyze(str(quantized))
    assert "QLinearConv '/stem/stem.0/Conv_quant' out" in report.groups[1].layers
    assert {"QLinearConv", "QGemm"} <= set(report.stats.per_op_type()) and "Conv" not in report.stats.per_op_type()
    assert "feed-forward: 1 hidden groups" in CliRunner().invoke(main, ["analyze", str(quantized)]).output

    result = prune_exact(str(quantized), ratio=0.4, criterion="l1", bench=False)
    # exact counts in both: the float model's layers time differently from the integer kernels
    reference = spa.prune(str(dense), ratio=0.4, criterion="l1", check=False, round_to=1)
    assert result.report.params_after == reference.report.params_after < result.report.params_before
    before = onnx.load(str(quantized))
    assert Counter(n.op_type for n in result.model.graph.node) == Counter(n.op_type for n in before.graph.node)
    widths = {n.name: n for n in result.model.graph.node if n.op_type == "QLinearConv"}
    sizes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    pruned_convs = sum(
        sizes[n.input[3]][0] < next(list(t.dims) for t in before.graph.initializer if t.name == n.input[3])[0]
        for n in widths.values()
    )
    assert pruned_convs >= 5
    for node in widths.values():  # per-channel scales and zero points, and the bias, shrink with the weight
        channels = sizes[node.input[3]][0]
        assert np.prod(sizes[node.input[4]]) in (1, channels) and sizes[node.input[8]] == [channels]
    soft = spa.prune(str(quantized), ratio=0.4, criterion="l1", soft=True, check=False).model
    assert Counter(n.op_type for n in soft.graph.node) == Counter(n.op_type for n in before.graph.node)


def test_qoperator_mnist_cnn_refits_stay_in_its_ops(tmp_path):
    with np.load(MODELS / "data" / "mnist_calib.npz") as calib:
        samples = calib["input"][:32]
    quantized = _qoperator(MODELS / "mnist_cnn.onnx", tmp_path / "q.onnx", samples)
    refitted = _obs_keeps_mnist_accuracy_only_with_refits(quantized, tmp_path)
    ops = Counter(n.op_type for n in refitted.graph.node)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 2 and "Conv" not in ops and "Gemm" not in ops
    weights = {t.name: t for t in refitted.graph.initializer}
    conv = next(n for n in refitted.graph.node if n.op_type == "QLinearConv")
    assert weights[conv.input[3]].data_type == onnx.TensorProto.INT8
    assert weights[conv.input[8]].data_type == onnx.TensorProto.INT32


def _with_scaled_qgemm(quantized: onnx.ModelProto) -> onnx.ModelProto:
    """The first QGemm given alpha 0.5: its bias then sits at a scale spa does not read as its own."""
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    qgemm = next(n for n in model.graph.node if n.op_type == "QGemm")
    kept = [a for a in qgemm.attribute if a.name != "alpha"]
    del qgemm.attribute[:]
    qgemm.attribute.extend(kept + [helper.make_attribute("alpha", 0.5)])
    return model


def test_a_quantized_op_spa_cannot_read_exactly_is_named_and_left_whole(tmp_path):
    samples = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    source = MODELS / "mini_resnet.onnx"
    quantized = _with_scaled_qgemm(onnx.load(str(_qoperator(source, tmp_path / "q.onnx", samples))))
    onnx.save(quantized, str(tmp_path / "scaled.onnx"))
    report = spa.analyze(str(tmp_path / "scaled.onnx"))
    assert report.unruled_weights == {"QGemm": 1}
    assert report.params == spa.analyze(str(source)).params
    out = CliRunner().invoke(main, ["analyze", str(tmp_path / "scaled.onnx")])
    assert out.exit_code == 0
    assert "weights left whole (spa has no rule for these ops): QGemm x1" in out.output
    result = prune_exact(str(tmp_path / "scaled.onnx"), ratio=0.4, criterion="l1", bench=False)
    assert result.report.groups_pruned >= 4  # all but the groups the QGemm reads or writes
    kept = next(n for n in result.model.graph.node if n.op_type == "QGemm")
    assert ("alpha", 0.5) in _attributes(kept).items()


def test_an_int8_op_without_its_output_zero_point_stays_int8(tmp_path):
    """The contrib ops' output zero point is optional, 0 in the input's type; QuantizeLinear without
    one would write uint8, and the written model would not run."""
    samples = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    onnx.save(_every_form(), str(tmp_path / "f.onnx"))
    quantize_static(
        str(tmp_path / "f.onnx"),
        str(tmp_path / "q.onnx"),
        _Batches("x", samples),
        quant_format=QuantFormat.QOperator,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True},
    )
    model = onnx.load(str(tmp_path / "q.onnx"))
    add = next(n for n in model.graph.node if n.op_type == "QLinearAdd")
    zero = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[add.input[7]]
    assert zero.dtype == np.int8 and int(zero) == 0
    del add.input[7]
    result = prune_exact(model, ratio=0.3, criterion="l1", bench=False)
    assert result.report.groups_pruned >= 2
    assert len(next(n for n in result.model.graph.node if n.op_type == "QLinearAdd").input) == 7


def test_a_per_channel_scale_with_one_zero_point_prunes(tmp_path):
    """QLinearConv allows a per-channel weight scale beside one zero point; DequantizeLinear wants
    one per channel, so it gets the value spread out, and the model its own zero point back."""
    with np.load(MODELS / "data" / "mnist_calib.npz") as calib:
        samples = calib["input"][:16]
    model = onnx.load(str(_qoperator(MODELS / "mnist_cnn.onnx", tmp_path / "q.onnx", samples)))
    scalar = numpy_helper.from_array(np.int8(0), "one_zero_point")
    model.graph.initializer.append(scalar)
    for node in model.graph.node:
        if node.op_type == "QLinearConv":
            node.input[5] = scalar.name
    assert len(analysis_of(model).prunable_groups) == len(
        analysis_of(onnx.load(str(MODELS / "mnist_cnn.onnx"))).prunable_groups
    )
    result = prune_exact(model, ratio=0.3, criterion="l1", bench=False)
    assert result.report.groups_pruned == 4
    assert all(n.input[5] == scalar.name for n in result.model.graph.node if n.op_type == "QLinearConv")


def test_fusing_requantizes_a_bias_whose_weight_scale_moved_alone(tmp_path):
    """The fused op reads its bias at input scale times weight scale. Should a weight scale change
    without the bias's own (a bias no refit saw), the bias is rewritten to keep its value."""
    with np.load(MODELS / "data" / "mnist_calib.npz") as calib:
        samples = calib["input"][:16]
    model = canonicalize(onnx.load(str(_qoperator(MODELS / "mnist_cnn.onnx", tmp_path / "q.onnx", samples))))
    expanded, expansion = expand(model, 17)
    bias, _, _, weight_scale = expansion.biases[0]
    tensors = {t.name: t for t in expanded.graph.initializer}
    before = numpy_helper.to_array(tensors[bias]).astype(np.float64)
    tensors[weight_scale].CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(tensors[weight_scale]) * 2, weight_scale)
    )
    fused = {t.name: numpy_helper.to_array(t) for t in expansion.fuse(expanded).graph.initializer}
    assert np.abs(fused[bias] * 2.0 - before).max() <= 1.0 and np.abs(before).max() > 10
    untouched = {t.name: numpy_helper.to_array(t) for t in expansion.fuse(expand(model, 17)[0]).graph.initializer}
    assert np.array_equal(untouched[bias], numpy_helper.to_array(tensors[bias]))
