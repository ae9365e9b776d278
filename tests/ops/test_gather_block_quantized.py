"""Tests of onnxruntime's GatherBlockQuantized (``spa.ops.gather_block_quantized``).

The model is an int4 token embedding tied to the LM head, as onnxruntime-genai's builder writes it:
the embedding gathers rows of the head's packed MatMulNBits weight (reshaped to [vocab, bytes]) with
the head's scales. The hidden width is cut in whole quantization blocks, on both.
"""

import numpy as np
import onnx
import onnxruntime as ort
from builder import analysis_of, group_at, initializer, prune_exact
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.formats import nbits
from spa.formats.model import Model

# the hidden width is 3 blocks; the table is too large to be folded into a copy of its own on load
VOCAB, HIDDEN, FFN, BLOCK, SEQ = 96, 96, 64, 32, 5


def _packed(rng, rows: int, k: int, name: str) -> list[onnx.TensorProto]:
    """A [rows, k] weight as MatMulNBits stores it at 4 bits: packed values and their scales."""
    values = rng.integers(0, 16, (rows, k // BLOCK, BLOCK)).astype(np.uint8)
    scales = rng.uniform(0.05, 0.2, (rows, k // BLOCK)).astype(np.float32)
    return [numpy_helper.from_array(nbits.pack(values, 4), f"{name}_q"), numpy_helper.from_array(scales, f"{name}_s")]


def _nbits(x: str, name: str, k: int, n: int, out: str) -> onnx.NodeProto:
    inputs = [x, f"{name}_q", f"{name}_s"]
    return helper.make_node(
        "MatMulNBits", inputs, [out], name=name, domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK
    )


def tied_embedding(zero_points: bool = False) -> onnx.ModelProto:
    """ids -> embedding (the head's table) -> + MLP -> head: hidden width shared by all."""
    rng = np.random.default_rng(0)
    weights = _packed(rng, VOCAB, HIDDEN, "head") + _packed(rng, FFN, HIDDEN, "up") + _packed(rng, HIDDEN, FFN, "down")
    weights.append(numpy_helper.from_array(np.array([VOCAB, HIDDEN // 2], np.int64), "table_shape"))
    gather_inputs = ["table", "ids", "head_s"]
    if zero_points:
        weights.append(numpy_helper.from_array(np.full((VOCAB, HIDDEN // BLOCK // 2 + 1), 0x88, np.uint8), "zp"))
        gather_inputs.append("zp")
    nodes = [
        helper.make_node("Reshape", ["head_q", "table_shape"], ["table"], name="table"),
        helper.make_node(
            "GatherBlockQuantized",
            gather_inputs,
            ["h"],
            name="embed",
            domain="com.microsoft",
            bits=4,
            block_size=BLOCK,
            gather_axis=0,
            quantize_axis=1,
        ),
        _nbits("h", "up", HIDDEN, FFN, "u"),
        helper.make_node("Relu", ["u"], ["r"]),
        _nbits("r", "down", FFN, HIDDEN, "d"),
        helper.make_node("Add", ["h", "d"], ["s"]),
        _nbits("s", "head", HIDDEN, VOCAB, "logits"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, SEQ, VOCAB])],
        weights,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def embed(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["h"], {"ids": ids})[0]


def test_the_output_shape_is_inferred_and_the_op_is_counted():
    prepared = Model.load(tied_embedding())
    assert prepared.graph.shape("h") == (1, SEQ, HIDDEN)
    assert not any("spa_inferred" in name for name in prepared.graph.shapes)  # the stand-in's own tensor
    analysis = spa.analyze(tied_embedding())
    assert "GatherBlockQuantized" not in analysis.unruled_weights
    assert analysis.params == (VOCAB + FFN) * HIDDEN + FFN * HIDDEN  # values, not bytes; the tied table once


def test_the_hidden_width_couples_with_the_head_in_whole_blocks():
    analysis = analysis_of(tied_embedding())
    group = group_at(analysis, "h", 2)
    assert group is group_at(analysis, "s", 2) is group_at(analysis, "head_s", 1)
    assert group.prunable and group.exact and group.size == HIDDEN // BLOCK  # one unit per block
    assert not group_at(analysis, "table", 0).prunable  # the vocabulary: the logits, and rows picked at run time


def test_pruned_hidden_blocks_leave_the_kept_embedding_values_exact():
    model = tied_embedding()
    result = prune_exact(model, 0.4)  # soft == hard
    pruned = result.model
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, SEQ)).astype(np.int64)
    dense_h, pruned_h = embed(model, ids), embed(pruned, ids)
    kept_blocks = initializer(pruned, "head_s").shape[1]
    assert pruned_h.shape[-1] == kept_blocks * BLOCK < HIDDEN
    dense_blocks = initializer(model, "head_s")
    kept = [
        int(np.flatnonzero((dense_blocks == column[:, None]).all(axis=0))[0])
        for column in initializer(pruned, "head_s").T
    ]
    columns = np.concatenate([np.arange(b * BLOCK, (b + 1) * BLOCK) for b in kept])
    np.testing.assert_allclose(pruned_h, dense_h[..., columns], rtol=1e-6)


def test_zero_points_freeze_the_hidden_width_with_the_reason():
    group = group_at(analysis_of(tied_embedding(zero_points=True)), "h", 2)
    assert not group.prunable and "zero points" in group.frozen and "embed" in group.frozen
