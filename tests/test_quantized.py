"""Models already quantized to the QDQ format: weights stored as integers behind DequantizeLinear,
activations passed through QuantizeLinear/DequantizeLinear pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builder import Graph, analysis_of, group_at, initializer, prune_exact
from click.testing import CliRunner
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

import spa
from spa.analysis.layers import linear_layers
from spa.cli.commands import main
from spa.core.graph import ModelGraph
from spa.formats.quantized import quantized_weight
from spa.reporting.group_layers import group_layer_roles
from spa.scoring.criteria import weight_dims

MODELS = Path(__file__).resolve().parent.parent / "models"


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, samples: np.ndarray):
        self._feeds = iter([{name: samples[i : i + 1]} for i in range(len(samples))])

    def get_next(self):
        return next(self._feeds, None)


def _quantized(
    source: Path,
    target: Path,
    samples: np.ndarray,
    per_channel: bool = True,
    weight_type=QuantType.QInt8,
    layout=QuantFormat.QDQ,
) -> Path:
    name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    quantize_static(
        str(source),
        str(target),
        _Batches(name, samples),
        quant_format=layout,
        per_channel=per_channel,
        weight_type=weight_type,
        activation_type=QuantType.QUInt8,
    )
    return target


def _integer_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    read = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name in read and t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    }


@pytest.mark.parametrize(
    "per_channel,weight_type",
    [(True, QuantType.QInt8), (False, QuantType.QInt8), (True, QuantType.QUInt8)],
    ids=["per-channel-int8", "per-tensor-int8", "per-channel-uint8"],
)
def test_qdq_model_prunes_as_its_float_model_does(tmp_path, per_channel, weight_type):
    dense = MODELS / "mini_resnet.onnx"
    samples = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantized = _quantized(dense, tmp_path / "q.onnx", samples, per_channel, weight_type)
    float_groups = analysis_of(onnx.load(str(dense))).prunable_groups
    groups = analysis_of(onnx.load(str(quantized))).prunable_groups
    assert sorted(g.size for g in groups) == sorted(g.size for g in float_groups)

    # uint8 weights have non-zero zero points: the soft model must fill removed slices with them
    result = prune_exact(str(quantized), ratio=0.4, criterion="l1", bench=False)
    # exact counts in both: the float model's layers time differently from the integer kernels
    reference = spa.prune(str(dense), ratio=0.4, criterion="l1", check=False, round_to=1)
    assert result.report.params_after == reference.report.params_after < result.report.params_before
    before, after = _integer_weights(onnx.load(str(quantized))), _integer_weights(result.model)
    assert after.keys() == before.keys()
    assert all(after[k].dtype == before[k].dtype for k in after)
    assert sum(v.size for v in after.values()) < sum(v.size for v in before.values())


def _dequantized_conv_pair(ints: np.ndarray, scales: np.ndarray, domain: str = "") -> onnx.ModelProto:
    """x -> Conv(DQ(ints, scales per output channel)) -> Relu -> Conv(DQ(equal ints)) -> y."""
    g = Graph(opset=17)
    x = g.input("x", [1, 2, 6, 6])
    channels = len(scales)
    first = g.op(
        "DequantizeLinear",
        [g.const(ints, "w1_q"), g.const(scales, "w1_scale"), g.const(np.zeros(channels, np.int8), "w1_zero")],
        axis=0,
        domain=domain,
    )
    h = g.op("Relu", [g.op("Conv", [x, first], pads=[1, 1, 1, 1])])
    second = g.op(
        "DequantizeLinear",
        [
            g.const(np.full((3, channels, 1, 1), 50, np.int8), "w2_q"),
            g.const(np.float32(0.02), "w2_scale"),
            g.const(np.int8(0), "w2_zero"),
        ],
        domain=domain,
    )
    g.output(g.op("Conv", [h, second]))
    return g.build()


@pytest.mark.parametrize("domain", ["", "com.microsoft"])
def test_magnitude_reads_the_dequantized_weight(domain):
    # the integers favour channels 0 and 2, their scales make them the smallest weights
    ints = np.tile(np.array([100, 10, 100, 10], np.int8)[:, None, None, None], (1, 2, 3, 3))
    scales = np.array([0.001, 0.5, 0.001, 0.5], np.float32)
    model = _dequantized_conv_pair(ints, scales, domain)
    graph = ModelGraph(model)
    conv = next(n for n in graph.nodes if n.op_type == "Conv")
    assert np.allclose(graph.weight(conv.inputs[1]), ints * scales[:, None, None, None])

    result = prune_exact(model, ratio=0.5, criterion="l1", compensate=False, bench=False)
    assert np.allclose(initializer(result.model, "w1_scale"), [0.5, 0.5])
    assert initializer(result.model, "w1_q").shape == (2, 2, 3, 3)
    assert initializer(result.model, "w2_q").shape == (3, 2, 1, 1)


def test_analysis_names_the_layers_behind_dequantize():
    ints = np.ones((4, 2, 3, 3), np.int8)
    model = _dequantized_conv_pair(ints, np.ones(4, np.float32))
    report = spa.analyze(model)
    layers = [layer for group in report.groups if group.frozen is None for layer in group.layers]
    assert layers and all(layer.startswith("Conv") for layer in layers), layers


def test_refits_are_written_back_at_the_weights_scales(tmp_path):
    """A trained MNIST CNN quantized with its own calibration images: obs keeps its accuracy at
    ratio 0.3 only because the refit reaches the integer weights."""
    with np.load(MODELS / "data" / "mnist_calib.npz") as calib:
        samples = calib["input"]
    quantized = _quantized(MODELS / "mnist_cnn.onnx", tmp_path / "q.onnx", samples[:64])
    refitted = _obs_keeps_mnist_accuracy_only_with_refits(quantized, tmp_path)
    for name, value in _integer_weights(refitted).items():
        assert value.dtype == np.int8, name
    _assert_bias_scales_follow(refitted)


def _obs_keeps_mnist_accuracy_only_with_refits(quantized: Path, tmp_path: Path) -> onnx.ModelProto:
    """Prunes an int8 mnist_cnn at ratio 0.3 with obs, with and without compensation, asserts what
    the refits did, and returns the compensated model."""
    with np.load(MODELS / "data" / "mnist_calib.npz") as calib:
        np.savez(tmp_path / "calib.npz", input=calib["input"])
    with np.load(MODELS / "data" / "mnist_test.npz") as test:
        images, labels = test["input"], test["label"]

    def accuracy(model: onnx.ModelProto) -> float:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return float((session.run(None, {"input": images})[0].argmax(1) == labels).mean())

    runs = {
        compensate: prune_exact(
            str(quantized),
            ratio=0.3,
            criterion="obs",
            calib=str(tmp_path / "calib.npz"),
            compensate=compensate,
            bench=False,
        )
        for compensate in (False, True)
    }
    assert accuracy(onnx.load(str(quantized))) > 0.97
    assert accuracy(runs[True].model) > 0.97 > 0.6 > accuracy(runs[False].model)
    comp = runs[True].report.compensation
    requantized = (comp["sequential"] or {}).get("requantized") or comp["requantized"]
    # every weight has a scale of its own here, so refits that outgrow it grow it instead of saturating
    assert requantized["tensors"] > 0 and requantized["grown"] > 0 and requantized["saturated"] == 0
    return runs[True].model


def _assert_bias_scales_follow(model: onnx.ModelProto) -> None:
    """onnxruntime's integer Conv reads an int32 bias at input scale times weight scale."""
    graph = ModelGraph(model)
    checked = 0
    for node in graph.nodes:
        if node.op_type != "Conv" or len(node.inputs) < 3:
            continue
        x, w, b = (graph.producer[t] for t in node.inputs[:3])
        x_scale, w_scale, b_scale = (graph.const(n.inputs[1]) for n in (x, w, b))
        assert np.allclose(b_scale, x_scale * w_scale, rtol=1e-6), node.name
        checked += 1
    assert checked >= 2


def _fake_quantized_weights(opset: int = 17, **dq_attrs) -> onnx.ModelProto:
    """Quantization-aware training's export: float weights through QuantizeLinear and
    DequantizeLinear, one scale per output channel shared by both."""
    g = Graph(opset=opset)
    x = g.input("x", [1, 3, 6, 6])
    scale, zero = g.const(np.full(8, 0.01, np.float32), "scale"), g.const(np.zeros(8, np.int8), "zero")
    weight = g.op("QuantizeLinear", [g.weight(8, 3, 3, 3), scale, zero], axis=0)
    h = g.op(
        "Relu",
        [
            g.op(
                "Conv",
                [x, g.op("DequantizeLinear", [weight, scale, zero], axis=0, **dq_attrs), g.weight(8)],
                pads=[1, 1, 1, 1],
            )
        ],
    )
    g.output(g.op("Conv", [h, g.weight(4, 8, 1, 1)]))
    return g.build()


def test_fake_quantized_weights_prune_and_keep_quantize_scales_when_soft():
    model = _fake_quantized_weights()
    result = prune_exact(model, ratio=0.5, criterion="l2", bench=False)
    assert initializer(result.model, "scale").shape == (4,)
    assert initializer(result.model, "zero").shape == (4,)
    soft = spa.prune(model, ratio=0.5, criterion="l2", soft=True, check=False).model
    assert np.all(initializer(soft, "scale") == 0.01)  # QuantizeLinear divides by it


def test_soft_model_zeroes_quantized_weights_at_their_zero_points(tmp_path):
    samples = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantized = _quantized(MODELS / "mini_resnet.onnx", tmp_path / "q.onnx", samples, weight_type=QuantType.QUInt8)
    hard = spa.prune(str(quantized), ratio=0.4, criterion="l1", compensate=False, check=False).model
    soft = ModelGraph(
        spa.prune(str(quantized), ratio=0.4, criterion="l1", compensate=False, soft=True, check=False).model
    )
    hard_shapes = {n.output[0]: None for n in hard.graph.node if n.op_type == "DequantizeLinear"}
    checked = 0
    for node in soft.nodes:
        weight = node.outputs[0]
        if weight not in hard_shapes or quantized_weight(soft, weight) is None or soft.weight(weight).ndim != 4:
            continue
        dense_in = soft.shape(weight)[1]
        hard_in = initializer(hard, node.inputs[0]).shape[1]
        zero_columns = int(np.all(soft.weight(weight) == 0, axis=(0, 2, 3)).sum())
        assert zero_columns == dense_in - hard_in, weight  # uint8 zero points are 128, not 0
        checked += dense_in > hard_in
    assert checked >= 3


def _block_quantized_down_projection(scale_rows: int = 2):
    g = Graph(opset=21)
    x = g.input("x", [1, 8])
    data = g.const(np.random.default_rng(0).integers(-8, 8, (8, 4)).astype(np.int8))
    scales = g.const(np.random.default_rng(1).uniform(0.5, 1.5, (scale_rows, 4)).astype(np.float32))
    weight = g.op("DequantizeLinear", [data, scales], axis=0, block_size=4)
    hidden = g.op("Relu", [g.op("MatMul", [x, g.weight(8, 8)])])
    g.output(g.op("MatMul", [hidden, weight]))
    return g.build(), hidden, data


def test_block_quantized_weights_lose_whole_blocks():
    model, hidden, data = _block_quantized_down_projection()
    group = group_at(analysis_of(model), hidden, 1)
    assert group.prunable and group.size == 2  # 8 input channels in blocks of 4
    result = prune_exact(model, 0.5)
    assert initializer(result.model, data).shape == (4, 4)


def test_block_quantized_weights_are_ranked_dequantized():
    model, hidden, data = _block_quantized_down_projection()
    values = {t.name: t for t in model.graph.initializer}
    scales = model.graph.node[0].input[1]
    integers = numpy_helper.to_array(values[data]).copy()
    integers[4:] = 7  # the second block has the largest integers and, scaled, the smallest weights
    scale = numpy_helper.to_array(values[scales]).copy()
    scale[1] = 1e-3
    values[data].CopyFrom(numpy_helper.from_array(integers, data))
    values[scales].CopyFrom(numpy_helper.from_array(scale, scales))
    result = spa.prune(model, ratio=0.5, criterion="l2", check=False)
    assert (initializer(result.model, data) != 7).any()  # the first block stayed


def test_block_quantization_that_does_not_match_its_scales_freezes_with_its_reason():
    model, hidden, _ = _block_quantized_down_projection(scale_rows=3)
    analysis = analysis_of(model)
    assert not group_at(analysis, hidden, 1).prunable
    reasons = " ".join(analysis.frozen_dims.values())
    assert "block-quantized (block_size 4)" in reasons and "not one value per block" in reasons


def test_int4_qdq_from_the_weight_only_quantizer_loses_whole_blocks():
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    g = Graph(opset=21)
    x = g.input("x", [2, 64])
    hidden = g.op("Relu", [g.op("MatMul", [x, g.weight(64, 96)])])
    g.output(g.op("MatMul", [hidden, g.weight(96, 40)]))
    config = DefaultWeightOnlyQuantConfig(block_size=32, bits=4, quant_format=QuantFormat.QDQ)
    quantizer = MatMulNBitsQuantizer(g.build(), algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    int4 = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)]
    assert len(int4) >= 4  # both weights and their zero points are 4-bit
    assert group_at(analysis_of(model), hidden, 1).size == 3  # 96 channels, blocks of 32
    result = prune_exact(model, 0.4)
    nodes = result.model.graph.node
    weight = next(n.input[1] for n in nodes if n.op_type == "MatMul" and n.input[0] == hidden)
    down = next(n for n in nodes if n.output[0] == weight)
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    # one of the three blocks gone: from the int4 data, its scales and its int4 zero points
    assert [shapes[name] for name in down.input[:3]] == [[64, 40], [2, 40], [2, 40]]
    # scored and cut without statistics (no float layer reads the group), and not for want of a run
    assert result.report.compensation["skipped"] == ["all layers: no layer spa refits reads a pruned group"]


def test_cli_says_refits_were_requantized(tmp_path):
    samples = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantized = _quantized(MODELS / "mini_resnet.onnx", tmp_path / "q.onnx", samples)
    out = CliRunner().invoke(main, ["prune", str(quantized), "--ratio", "0.3", "--no-bench"])
    assert out.exit_code == 0, out.output
    assert "quantized weights:" in out.output and "written back quantized" in out.output


def test_dequantize_rule_links_per_axis_parameters():
    g = Graph(opset=17)
    x = g.input("x", [1, 4, 5, 5])
    q = g.op("QuantizeLinear", [x, g.const(np.float32(0.1)), g.const(np.uint8(128))])
    y = g.op(
        "DequantizeLinear",
        [q, g.const(np.full(4, 0.1, np.float32), "s"), g.const(np.full(4, 128, np.uint8), "z")],
        axis=1,
    )
    g.output(g.op("Conv", [g.op("Relu", [g.op("Conv", [y, g.weight(6, 4, 1, 1)])]), g.weight(2, 6, 1, 1)]))
    analysis = analysis_of(g.build())
    group = group_at(analysis, "s", 0)
    assert {d.tensor for d in group.dims} >= {"s", "z", x, q, y}
    assert not group.prunable  # the graph input's channels cannot shrink
    assert helper.get_attribute_value(g.nodes[1].attribute[0]) == 1


def test_four_bit_weights_freeze_instead_of_breaking_soft_equals_hard():
    # the soft model cannot write a uint4 zero point: those channels stay (they used to fail validation)
    def uint4(name, values):
        return helper.make_tensor(name, onnx.TensorProto.UINT4, np.shape(values), np.ravel(values).tolist())

    rng = np.random.default_rng(0)
    inits = [
        uint4("w1_q", rng.integers(0, 16, (4, 2, 3, 3))),
        numpy_helper.from_array(np.float32(0.1), "w1_s"),
        uint4("w1_z", 8),
        uint4("w2_q", rng.integers(0, 16, (3, 4, 1, 1))),
        numpy_helper.from_array(np.float32(0.05), "w2_s"),
        uint4("w2_z", 8),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w1_q", "w1_s", "w1_z"], ["w1"]),
        helper.make_node("Conv", ["x", "w1"], ["h0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("DequantizeLinear", ["w2_q", "w2_s", "w2_z"], ["w2"]),
        helper.make_node("Conv", ["h", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "four_bit",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    analysis = analysis_of(model)
    assert not analysis.prunable_groups
    assert any("uint4 data is not supported" in why for why in analysis.frozen_dims.values())
    result = spa.prune(model, ratio=0.5, criterion="l1", compensate=False)
    assert result.report.validation.ok and result.report.params_after == result.report.params_before


def test_stored_refit_replaces_an_earlier_grown_scale():
    """The sequential refit writes into a model whose layer-wise refit already grew a scale: what
    it stores must carry its own scale, or the integers are read at the wrong one."""
    from spa.analysis.layers import linear_layers
    from spa.formats.quantized import Store
    from spa.transforms.compensate import replace_initializers

    ints = np.tile(np.array([100, 10, 100, 10], np.int8)[:, None, None, None], (1, 2, 3, 3))
    dense = _dequantized_conv_pair(ints, np.full(4, 0.01, np.float32))
    graph = analysis_of(dense).graph  # shapes inferred
    layer = next(layer for layer in linear_layers(graph) if quantized_weight(graph, layer.weight).data == "w1_q")
    grown = onnx.ModelProto()
    grown.CopyFrom(dense)
    replace_initializers(grown, {"w1_scale": np.full(4, 0.04, np.float32)})  # an earlier refit grew it 4x
    refit = graph.weight(layer.weight) * 0.5  # fits the dense scale: nothing grows this time
    replace_initializers(grown, Store(graph, (layer,))({layer.weight: refit}))
    assert np.allclose(ModelGraph(grown).weight(layer.weight), refit, atol=0.005)


# ---------------------------------------------------------------- dynamic quantization (integer ops)


def _dynamic(source: Path, target: Path, per_channel: bool = True, weight_type=QuantType.QInt8) -> Path:
    quantize_dynamic(str(source), str(target), per_channel=per_channel, weight_type=weight_type)
    return target


def _integer_op_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    read = {n.input[1] for n in model.graph.node if n.op_type in ("MatMulInteger", "ConvInteger")}
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in read}


@pytest.mark.parametrize(
    "per_channel,weight_type",
    [(True, QuantType.QInt8), (False, QuantType.QInt8), (True, QuantType.QUInt8)],
    ids=["per-channel-int8", "per-tensor-int8", "per-channel-uint8"],
)
def test_dynamically_quantized_model_prunes_as_its_float_model_does(tmp_path, per_channel, weight_type):
    # quantize_dynamic writes DynamicQuantizeLinear -> ConvInteger / MatMulInteger -> Cast -> Mul(scale)
    dense = MODELS / "mini_resnet.onnx"
    quantized = _dynamic(dense, tmp_path / "dyn.onnx", per_channel, weight_type)
    ops = {n.op_type for n in onnx.load(str(quantized)).graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} <= ops
    float_groups = analysis_of(onnx.load(str(dense))).prunable_groups
    analysis = analysis_of(onnx.load(str(quantized)))
    groups = analysis.prunable_groups
    # ranked by the dequantized weights alone: a per-column scale is not a weight of its own
    ranked = {d.tensor for g in groups for d in weight_dims(analysis, g)}
    assert ranked and not any(name.endswith("_scale") for name in ranked), ranked
    # the SE block reads the residual stream through ReduceMean and DynamicQuantizeLinear: still exact
    assert sorted(g.size for g in groups) == sorted(g.size for g in float_groups)
    assert all(g.exact for g in groups)
    # the weights' scales, multiplied in after the integer product, are not params of their own
    assert spa.analyze(str(quantized)).params == spa.analyze(str(dense)).params

    # uint8 weights have zero points of 128: the soft model fills removed slices with them
    result = prune_exact(str(quantized), ratio=0.4, criterion="l1", bench=False)
    # exact counts in both: the float model's layers time differently from the integer kernels
    reference = spa.prune(str(dense), ratio=0.4, criterion="l1", check=False, round_to=1)
    float_sizes = sorted(
        t.size for t in (numpy_helper.to_array(i) for i in reference.model.graph.initializer) if t.ndim >= 2
    )
    before, after = _integer_op_weights(onnx.load(str(quantized))), _integer_op_weights(result.model)
    assert sorted(v.size for v in after.values()) == float_sizes
    assert all(after[k].dtype == before[k].dtype for k in after)


def test_integer_matmul_soft_model_fills_removed_rows_with_zero_points():
    """x -> MatMul -> Relu -> DynamicQuantizeLinear -> MatMulInteger(uint8 weight, zero point 128
    per column) -> Cast -> Mul(scale) -> y: removing hidden units is exact, and the soft model
    keeps the zero points and writes them into the removed rows."""
    g = Graph(opset=17)
    x = g.input("x", [2, 6])
    hidden = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 8)])])
    q, scale, zero = g.op("DynamicQuantizeLinear", [hidden], n_out=3)
    ints = np.random.default_rng(1).integers(0, 256, (8, 3)).astype(np.uint8)
    product = g.op("MatMulInteger", [q, g.const(ints, "w_q"), zero, g.const(np.full(3, 128, np.uint8), "w_zero")])
    rescale = g.op("Mul", [scale, g.const(np.array([0.01, 0.02, 0.03], np.float32), "w_scale")])
    g.output(g.op("Mul", [g.op("Cast", [product], to=onnx.TensorProto.FLOAT), rescale]))
    model = g.build()
    analysis = analysis_of(model)
    group = group_at(analysis, hidden, 1)
    assert group.prunable and group.exact

    result = prune_exact(model, ratio=0.5, criterion="l1", compensate=False, bench=False)
    assert initializer(result.model, "w_q").shape == (4, 3)
    soft = spa.prune(model, ratio=0.5, criterion="l1", compensate=False, soft=True, check=False).model
    assert np.all(initializer(soft, "w_zero") == 128)
    assert int(np.all(initializer(soft, "w_q") == 128, axis=1).sum()) == 4


def test_integer_matmul_on_a_dequantized_float_weight_is_no_linear_layer():
    # MatMulInteger wants an integer weight; a DequantizeLinear's float one is malformed input
    # (onnxruntime refuses it), and the rescaling here has no weight scale: the layer view must
    # say "not a layer" rather than index the factors it could not find
    g = Graph(opset=17)
    x = g.input("x", [2, 6])
    hidden = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 8)])])
    q, scale, zero = g.op("DynamicQuantizeLinear", [hidden], n_out=3)
    w = g.op("DequantizeLinear", [g.const(np.ones((8, 3), np.int8)), g.const(np.array(0.1, np.float32))])
    product = g.op("MatMulInteger", [q, w, zero])
    g.output(g.op("Mul", [g.op("Cast", [product], to=onnx.TensorProto.FLOAT), scale]))
    graph = ModelGraph(g.build())
    assert quantized_weight(graph, w) is not None  # the layer view gets past its first check
    assert [layer.node.op_type for layer in linear_layers(graph)] == ["MatMul"]


def test_a_shared_per_tensor_scale_does_not_put_its_weights_layer_in_a_group():
    # the one-value scale of a Conv weight is also a Mul operand, so its axis joins the MatMul
    # group; it runs along no axis of the weight, so that group slices no side of the Conv
    g = Graph(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    scale = g.const(np.array([0.1], np.float32), "w_scale")
    w = g.op("DequantizeLinear", [g.const(np.ones((4, 3, 3, 3), np.int8), "w_q"), scale])
    g.output(g.op("Conv", [x, w], pads=[1, 1, 1, 1]))
    v = g.input("v", [2, 6])
    scaled = g.op("Mul", [g.op("MatMul", [v, g.weight(6, 1)]), scale])
    g.output(g.op("MatMul", [scaled, g.weight(1, 3)]))
    analysis = analysis_of(g.build())
    group = group_at(analysis, scale, 0)
    roles = group_layer_roles(analysis, group, {})
    assert sorted((r.op, r.side) for r in roles if r.kind) == [("MatMul", "in"), ("MatMul", "out")]


def test_dynamic_quantization_of_a_channel_that_is_not_zero_is_approximate():
    # Sigmoid(0) = 0.5: a soft-pruned channel still sets DynamicQuantizeLinear's range
    g = Graph(opset=17)
    x = g.input("x", [2, 6])
    hidden = g.op("Sigmoid", [g.op("MatMul", [x, g.weight(6, 8)])])
    q, scale, zero = g.op("DynamicQuantizeLinear", [hidden], n_out=3)
    product = g.op("MatMulInteger", [q, g.const(np.ones((8, 3), np.int8)), zero])
    g.output(g.op("Mul", [g.op("Cast", [product], to=onnx.TensorProto.FLOAT), scale]))
    group = group_at(analysis_of(g.build(), approximate=True), hidden, 1)
    assert not group.exact and "stays non-zero" in group.inexact_reason


def test_integer_conv_weights_read_dequantized_and_refit_at_their_scale(tmp_path):
    """A trained MNIST CNN quantized dynamically: criteria read ConvInteger's and MatMulInteger's
    weights times the scale in the Mul after them, and refits are written back into the integers."""
    quantized = _dynamic(MODELS / "mnist_cnn.onnx", tmp_path / "dyn.onnx")
    graph = ModelGraph(onnx.load(str(quantized)))
    dense = ModelGraph(onnx.load(str(MODELS / "mnist_cnn.onnx")))
    conv = next(n for n in graph.nodes if n.op_type == "ConvInteger")
    float_conv = next(n for n in dense.nodes if n.op_type == "Conv")
    weight = graph.weight(conv.inputs[1])
    assert weight.dtype == np.float32
    assert np.abs(weight - dense.const(float_conv.inputs[1])).max() < 0.01 * np.abs(weight).max()

    refitted = _obs_keeps_mnist_accuracy_only_with_refits(quantized, tmp_path)
    assert all(v.dtype == np.int8 for v in _integer_op_weights(refitted).values())


def test_integer_matmul_by_a_constant_left_operand_fills_it_with_its_zero_point():
    """A constant uint8 A (zero point 128) times a quantized activation: removing rows of A must
    leave exactly what zeroing would, so the soft model writes 128 there, not 0. A weightless
    sum over those rows makes any difference reach the output."""
    g = Graph(opset=17)
    x = g.input("x", [6, 5])
    q, scale, zero = g.op("DynamicQuantizeLinear", [g.op("Relu", [g.op("MatMul", [x, g.weight(5, 5)])])], n_out=3)
    left = g.const(np.random.default_rng(0).integers(0, 256, (4, 6)).astype(np.uint8), "left_q")
    product = g.op("MatMulInteger", [left, q, g.const(np.uint8(128), "left_zero"), zero])
    y = g.op(
        "Mul", [g.op("Cast", [product], to=onnx.TensorProto.FLOAT), g.op("Mul", [scale, g.const(np.float32(0.01))])]
    )
    g.output(g.op("MatMul", [g.op("Transpose", [g.op("Relu", [y])], perm=[1, 0]), g.weight(4, 3)]))
    g.output(g.op("ReduceSum", [y, g.const(np.array([0], np.int64))], keepdims=0))
    model = g.build()
    assert group_at(analysis_of(model), y, 0).exact
    result = prune_exact(model, ratio=0.5, criterion="l1", compensate=False, bench=False)
    assert initializer(result.model, "left_q").shape == (2, 6)


def test_a_weight_scale_is_read_only_where_the_rescaling_says_which_factor_it_is():
    # the rescaling Mul's factor is a product of two constants: either could be the weight's scale
    g = Graph(opset=17)
    x = g.input("x", [2, 6])
    q, _, zero = g.op("DynamicQuantizeLinear", [g.op("Relu", [g.op("MatMul", [x, g.weight(6, 8)])])], n_out=3)
    product = g.op("MatMulInteger", [q, g.const(np.ones((8, 3), np.int8), "w_q"), zero])
    factor = g.op("Mul", [g.const(np.float32(0.5)), g.const(np.array([0.1, 0.2, 0.3], np.float32))])
    g.output(g.op("Mul", [g.op("Cast", [product], to=onnx.TensorProto.FLOAT), factor]))
    assert quantized_weight(ModelGraph(g.build()), "w_q") is None


def test_a_rescaling_factor_cast_from_float16_prunes():
    # the rescaling Mul's two inputs are both Cast outputs: the integer product's and the scale's
    g = Graph(opset=17)
    x = g.input("x", [2, 6])
    hidden = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 8)])])
    q, scale, zero = g.op("DynamicQuantizeLinear", [hidden], n_out=3)
    product = g.op("MatMulInteger", [q, g.const(np.ones((8, 3), np.int8), "w_q"), zero])
    scale16 = g.op("Mul", [g.op("Cast", [scale], to=onnx.TensorProto.FLOAT16), g.const(np.float16(0.01))])
    g.output(
        g.op(
            "Mul",
            [g.op("Cast", [product], to=onnx.TensorProto.FLOAT), g.op("Cast", [scale16], to=onnx.TensorProto.FLOAT)],
        )
    )
    result = prune_exact(g.build(), ratio=0.5, criterion="l1", compensate=False, bench=False)
    assert initializer(result.model, "w_q").shape == (4, 3)
