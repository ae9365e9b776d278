"""Tests of onnxruntime's block-quantized MatMulNBits (``spa.ops.matmul_nbits``).

The models are float MatMuls quantized by onnxruntime's own quantizer, so the packing (values,
scales and zero points) is the one onnxruntime runs. Pruning must keep exactly the kept output
channels of a layer, and cut input channels in whole quantization blocks.
"""

import copy
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builder import analysis_of, group_at, initializer, node_attr, prune_exact
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.analysis.layers import linear_layers
from spa.formats import nbits
from spa.reporting.metrics import count

try:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
except ImportError:  # onnxruntime before 1.20 names the module after 4 bits
    from onnxruntime.quantization.matmul_4bits_quantizer import DefaultWeightOnlyQuantConfig
    from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer as MatMulNBitsQuantizer

K, HIDDEN, N, BLOCK = 64, 96, 40, 32  # the hidden width is 3 blocks: zero points pack an odd count


def float_mlp(seed: int = 0, hidden: int = HIDDEN) -> onnx.ModelProto:
    """x @ w1 + b1 -> Relu -> @ w2, the hidden width the one prunable group."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.standard_normal((K, hidden)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, N)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, N])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def quantized(model: onnx.ModelProto, bits: int = 4, symmetric: bool = False) -> onnx.ModelProto:
    """``model`` with its MatMuls quantized by onnxruntime's weight-only quantizer."""
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=symmetric, bits=bits)
    logging.disable(logging.INFO)  # the quantizer logs every node
    try:
        quantizer = MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=config)
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    result = quantizer.model.model
    matmuls = [n.op_type for n in model.graph.node].count("MatMul")
    assert [n.op_type for n in result.graph.node].count("MatMulNBits") == matmuls
    return result


def run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    probe = copy.deepcopy(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {"x": x})


def nbits_node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[0] == name)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["no-zero-points", "zero-points"])
def test_hidden_channels_go_in_whole_blocks_and_kept_outputs_stay_exact(bits, symmetric):
    model = quantized(float_mlp(), bits, symmetric)
    up = nbits_node(model, "x")
    group = group_at(analysis_of(model), "r", 2)
    assert group.prunable and group.exact and group.size == HIDDEN // BLOCK  # one unit per block
    result = prune_exact(model, 0.4)  # soft == hard
    pruned = result.model
    dense_scales = initializer(model, up.input[2])
    kept_rows = [int(np.flatnonzero((dense_scales == row).all(axis=1))[0]) for row in initializer(pruned, up.input[2])]
    assert len(kept_rows) == 2 * BLOCK and kept_rows == sorted(kept_rows)
    new_down = nbits_node(pruned, "r")
    assert (
        node_attr(pruned, "MatMulNBits", "N", 0) == 2 * BLOCK and node_attr(pruned, "MatMulNBits", "K", 1) == 2 * BLOCK
    )
    assert initializer(pruned, new_down.input[1]).shape[:2] == (N, 2)  # two blocks left per output
    if not symmetric:
        zero_points = initializer(pruned, new_down.input[3])
        assert zero_points.shape == (N, 2 * bits // 8)  # repacked: 4-bit blocks two to a byte
    x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    (dense_h,) = run(model, x, ["h"])
    (pruned_h,) = run(pruned, x, ["h"])
    np.testing.assert_allclose(pruned_h, dense_h[..., kept_rows], rtol=1e-5, atol=1e-5)


def test_zero_points_of_kept_blocks_are_repacked_in_order():
    layout = nbits.BlockLayout(k=5 * BLOCK, n=2, bits=4, block_size=BLOCK)
    points = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], dtype=np.uint8)
    packed = nbits.pack(points, 4)
    assert packed.shape == (2, 3) and packed[0, 0] == 1 | 2 << 4  # the low bits hold the first block
    cut = nbits.cut_zero_points(packed, layout, np.array([1]), np.array([0, 2, 4]))
    assert nbits.unpack(cut, 4)[:, :3].tolist() == [[6, 8, 10]]
    flat = nbits.cut_zero_points(packed.reshape(-1), layout, np.array([0, 1]), np.array([3]))
    assert flat.shape == (2,) and nbits.unpack(flat.reshape(2, 1), 4)[:, 0].tolist() == [4, 9]


def test_scores_read_the_dequantized_weight():
    # a block whose integers are the largest but whose scale makes it the smallest goes first
    model = quantized(float_mlp(), 4, symmetric=True)
    down = nbits_node(model, "r")
    scales = next(t for t in model.graph.initializer if t.name == down.input[2])
    values = numpy_helper.to_array(scales).copy()
    values[:, 1] *= 1e-3  # the middle block of the hidden width now weighs next to nothing
    scales.CopyFrom(numpy_helper.from_array(values, scales.name))
    up = nbits_node(model, "x")
    up_scales = next(t for t in model.graph.initializer if t.name == up.input[2])
    up_values = numpy_helper.to_array(up_scales).copy()
    up_values[BLOCK : 2 * BLOCK] *= 1e-3
    up_scales.CopyFrom(numpy_helper.from_array(up_values, up_scales.name))
    pruned = spa.prune(model, ratio=0.3, criterion="l2").model
    kept = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == up.input[2]))
    assert len(kept) == 2 * BLOCK and not np.isin(up_values[BLOCK : 2 * BLOCK], kept).all(axis=1).any()


def test_params_and_flops_count_the_values_not_the_bytes():
    model = quantized(float_mlp(), 4)
    analysis = spa.analyze(model)
    assert analysis.params == K * HIDDEN + HIDDEN + HIDDEN * N  # the bias is a float Add
    short = quantized(float_mlp(hidden=HIDDEN - BLOCK // 2), 4)  # the second layer's last block half full
    assert spa.analyze(short).params == (K + 1 + N) * (HIDDEN - BLOCK // 2)  # padding is no parameter
    stats = count(analysis_of(model).graph)
    up, down = nbits_node(model, "x"), nbits_node(model, "r")
    assert stats.node_flops[up.name] == 2 * 6 * K * HIDDEN and stats.node_flops[down.name] == 2 * 6 * HIDDEN * N
    assert "MatMulNBits" not in analysis.unruled_weights


def test_act_order_g_idx_freezes_the_input_channels_with_the_reason():
    model = quantized(float_mlp(), 4)
    down = nbits_node(model, "r")
    g_idx = numpy_helper.from_array((np.arange(HIDDEN) // BLOCK).astype(np.int32), "down_g_idx")
    model.graph.initializer.append(g_idx)
    while len(down.input) < 4:
        down.input.append("")
    down.input.append(g_idx.name)
    group = group_at(analysis_of(model), "r", 2)
    assert not group.prunable and "g_idx" in group.frozen and down.name in group.frozen


@pytest.mark.parametrize("bits", [4, 8])
def test_the_linear_view_is_the_weight_onnxruntime_multiplies_by(bits):
    model = quantized(float_mlp(), bits)
    graph = analysis_of(model).graph
    layers = {layer.node.inputs[0]: layer for layer in linear_layers(graph)}
    up = layers["x"]
    matrix, _, _ = up.float_rows(graph.weight)
    assert matrix.shape == (HIDDEN, K)
    x = np.random.default_rng(2).standard_normal((2, 3, K)).astype(np.float32)
    (h,) = run(model, x, ["h"])
    np.testing.assert_allclose(x @ matrix.T, h, rtol=1e-4, atol=1e-4)
    down = layers["r"]  # its input channels are labelled a block at a time
    labels = down.column_labels(analysis_of(model).labels)
    assert len(labels) == HIDDEN and len(set(labels[:BLOCK].tolist())) == 1 and labels[0] != labels[BLOCK]


def test_scored_with_statistics_and_left_unrefitted_with_the_reason():
    model = quantized(float_mlp(), 4)
    report = prune_exact(model, 0.4).report
    assert report.fallback_groups == 0  # obspa read the layers, not l2
    skipped = " ".join(report.compensation["skipped"])
    assert "stored in quantization blocks" in skipped and nbits_node(model, "r").name in skipped


def _with_accuracy_level_4(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime computes these MatMulNBits in int8: validation must compare them in float."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            node.attribute.append(helper.make_attribute("accuracy_level", 4))
    return model


def test_soft_and_hard_are_compared_with_the_products_in_float(monkeypatch):
    # at accuracy_level 4 onnxruntime rounds the activations to 8 bits, which turns the last-bit
    # differences of any cut into whole rounding steps (6.7e-4 on a 4-layer Llama): soft == hard is
    # checked in float, and the model written keeps the level it was given
    import spa.verify.validate as validate

    runs = []
    real = validate.run_all

    def recording(source, feeds, custom_ops, config=None):
        runs.append((source, config))
        return real(source, feeds, custom_ops, config)

    monkeypatch.setattr(validate, "run_all", recording)
    model = _with_accuracy_level_4(quantized(float_mlp(), 4))
    result = prune_exact(model, 0.4)
    compared = [source for source, config in runs if config]
    assert len(compared) == 2  # the soft model and the hard one
    levels = [a.i for source in compared for n in source.graph.node for a in n.attribute if a.name == "accuracy_level"]
    assert levels == []
    assert all(node_attr(result.model, "MatMulNBits", "accuracy_level", i) == 4 for i in (0, 1))


def test_soft_and_hard_stored_with_external_data_are_compared_in_float_too(monkeypatch, tmp_path):
    # a model with external data is validated from files: the float products must reach them too
    import spa.verify.validate as validate

    runs = []
    real = validate.run_all

    def recording(source, feeds, custom_ops, config=None):
        if config:
            runs.append(onnx.load(str(source), load_external_data=False))
        return real(source, feeds, custom_ops, config)

    monkeypatch.setattr(validate, "run_all", recording)
    model = _with_accuracy_level_4(quantized(float_mlp(), 4))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    prune_exact(str(path), 0.4)
    assert len(runs) == 2 and all(a.name != "accuracy_level" for m in runs for n in m.graph.node for a in n.attribute)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # the input untouched
