"""Params and FLOPs against counts worked out by hand.

A multiply-add is 2 FLOPs; symbolic axes count as 1 (see spa/reporting/metrics.py for every constant).
"""

import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.cli.commands import main
from spa.cli.render import change as _change
from spa.core.errors import UsageError
from spa.core.graph import ModelGraph
from spa.formats.model import Model
from spa.reporting.metrics import count


def stats(model):
    return count(Model.load(model).graph)


def flops_of(model, op_type):
    """FLOPs of the model's nodes of ``op_type``."""
    return sum(n.flops for n in stats(model).nodes if n.op_type == op_type)


def contrib(g: Graph) -> onnx.ModelProto:
    model = g.build()
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


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
    assert s.node_flops == {"Conv_2": conv, "Conv_4": depthwise, "Gemm_8": gemm, "MatMul_10": matmul}
    assert s.per_op_type() == {"Conv": conv + depthwise, "Gemm": gemm, "MatMul": matmul}


def test_grouped_conv_with_stride_dilation_and_pads_uses_the_inferred_output():
    g = Graph()
    x = g.input("x", [1, 8, 15, 15])
    g.output(
        g.op(
            "Conv", [x, g.weight(6, 4, 3, 3), g.weight(6)], group=2, strides=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    out = (15 + 2 - 2 * (3 - 1) - 1) // 2 + 1  # 7
    assert stats(g.build()).flops == 2 * (6 * out * out) * (4 * 3 * 3) + 6 * out * out


def test_depthwise_conv_with_multiplier():
    g = Graph()
    x = g.input("x", [1, 4, 8, 8])
    g.output(g.op("Conv", [x, g.weight(8, 1, 3, 3)], group=4, pads=[1, 1, 1, 1]))  # 2 outputs per channel
    assert stats(g.build()).flops == 2 * (8 * 8 * 8) * (1 * 3 * 3)


def test_symbolic_batch_counts_per_sample():
    g = Graph()
    x = g.input("x", ["batch", 6])
    g.output(g.op("Gemm", [x, g.weight(6, 4)]))
    assert stats(g.build()).flops == 2 * 6 * 4


def _free_image_convs():
    g = Graph()
    x = g.input("x", ["n", 3, "h", "w"])
    hidden = g.op("Relu", [g.conv(x, 3, 8)])  # 3x3, pads 1: maps as large as the input
    g.output(g.conv(hidden, 8, 2))
    return g.build()


def _convs_flops(positions, hidden=8):
    """positions: batch x height x width."""
    first = 2 * hidden * 27 * positions + hidden * positions  # multiply-adds, bias
    return first + hidden * positions + 2 * 2 * hidden * 9 * positions + 2 * positions  # relu, second conv


def test_free_image_axes_count_1_unless_sizes_are_given():
    model = _free_image_convs()
    free = spa.analyze(model)
    assert free.flops == _convs_flops(1)
    assert free.flops_at == {"x": [1, 3, 1, 1]} and free.unsized_axes == ["x[2]", "x[3]"]
    sized = spa.analyze(model, input_shapes={"x": [2, 3, 16, 12]})
    assert sized.flops == _convs_flops(2 * 16 * 12)
    assert sized.params == free.params and sized.unsized_axes == []
    assert sized.flops_at == {"x": [2, 3, 16, 12]}


def test_inputs_sharing_a_symbol_follow_the_given_sizes():
    # scores = x x^T over the sequence, masked: quadratic in the sequence, which counting at 1 hides
    g = Graph()
    x = g.input("x", ["batch", "seq", 4])
    mask = g.input("mask", ["batch", "seq"])
    scores = g.op("MatMul", [x, g.op("Transpose", [x], perm=[0, 2, 1])])
    g.output(g.op("Mul", [scores, g.op("Unsqueeze", [mask, g.const(np.array([1]))])]))
    report = spa.analyze(g.build(), input_shapes={"x": [2, 5, 4]})
    assert report.flops_at == {"x": [2, 5, 4], "mask": [2, 5]}
    assert report.unsized_axes == []
    matmul = next(n.flops for n in report.stats.nodes if n.op_type == "MatMul")
    assert matmul == 2 * 2 * 5 * 5 * 4


def test_prune_counts_validates_and_times_at_the_given_sizes():
    result = spa.prune(_free_image_convs(), 0.5, "l1", input_shapes={"x": [1, 3, 20, 20]}, bench=True)
    report = result.report
    assert report.flops_before == _convs_flops(400)
    assert report.flops_after == _convs_flops(400, hidden=4)
    assert {"x": [1, 3, 20, 20]} in report.validation.sizes
    assert report.validation.ok and report.options["input_shapes"] == {"x": [1, 3, 20, 20]}
    assert report.validation.latency  # timed: the feeds were built at the given sizes


def test_flops_target_is_met_at_the_given_sizes():
    # a prunable FFN, linear in the sequence, beside scores quadratic in it: at 64 positions the
    # FFN is a third of the FLOPs, at 1 nearly all, so the ratio meeting the target depends on it
    g = Graph()
    x = g.input("x", ["batch", "seq", 4])
    hidden = g.op("Relu", [g.op("MatMul", [x, g.weight(4, 16)])])
    g.output(g.op("MatMul", [hidden, g.weight(16, 4)]))
    g.output(g.op("MatMul", [x, g.op("Transpose", [x], perm=[0, 2, 1])]))
    report = spa.prune(g.build(), criterion="l1", target_flops=0.8, input_shapes={"x": [1, 64, 4]}, check=False).report
    assert report.flops_before == 64 * (2 * 4 * 16 + 16 + 2 * 16 * 4) + 2 * 64 * 64 * 4
    assert 0.75 <= report.flops_after / report.flops_before <= 0.8
    assert report.target.ratio > 0.5


def test_cli_says_where_flops_were_counted(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_free_image_convs(), str(path))
    free = CliRunner().invoke(main, ["analyze", str(path)])
    assert "(free axes x[2], x[3] counted as 1; --input-shape sets them)" in free.output
    sized = CliRunner().invoke(
        main, ["prune", str(path), "--ratio", "0.5", "--no-bench", "--input-shape", "x=1x3x20x20"]
    )
    assert sized.exit_code == 0, sized.output
    assert f"FLOPs:  {_change(_convs_flops(400), _convs_flops(400, hidden=4))} at x=1x3x20x20" in sized.output


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"y": [1, 3, 8, 8]}, "--input-shape names 'y', which is not an input of the model (inputs: x)"),
        ({"x": [1, 3, 8]}, "--input-shape x: 3 sizes given, the input has 4 axes"),
        ({"x": [1, 4, 8, 8]}, "--input-shape x: axis 1 is fixed at 3 by the model, not 4"),
    ],
)
def test_sizes_that_do_not_fit_the_inputs_are_refused(sizes, message):
    with pytest.raises(UsageError) as caught:
        spa.analyze(_free_image_convs(), input_shapes=sizes)
    assert str(caught.value) == message


def test_sizes_the_dense_model_cannot_run_are_refused():
    g = Graph()
    x = g.input("x", ["n", 3, "h", "w"])
    g.output(g.op("Conv", [x, g.weight(4, 3, 3, 3)]))  # no padding: 2x2 is too small
    with pytest.raises(UsageError, match="does not run at the --input-shape sizes"):
        spa.prune(g.build(), 0.5, "l1", input_shapes={"x": [1, 3, 2, 2]})


def test_conv_transpose_counts_per_input_element():
    g = Graph()
    x = g.input("x", [1, 4, 3, 3])
    g.output(g.op("ConvTranspose", [x, g.weight(4, 2, 2, 2)], strides=[2, 2]))
    assert stats(g.build()).flops == 2 * (4 * 3 * 3) * (2 * 2 * 2)


def test_grouped_conv_transpose_with_bias():
    g = Graph()
    x = g.input("x", [1, 4, 3, 3])
    g.output(g.op("ConvTranspose", [x, g.weight(4, 3, 2, 2), g.weight(6)], strides=[2, 2], group=2))  # 6 outputs
    assert stats(g.build()).flops == 2 * (4 * 3 * 3) * (3 * 2 * 2) + 6 * 6 * 6


def test_gemm_with_transposed_operands():
    g = Graph()
    a = g.input("a", [6, 3])  # transA: M = 3, K = 6
    g.output(g.op("Gemm", [a, g.weight(5, 6), g.weight(5)], transA=1, transB=1))  # transB: N = 5
    assert stats(g.build()).flops == 2 * 3 * 5 * 6 + 3 * 5


def test_batched_and_broadcast_matmul():
    g = Graph()
    a = g.input("a", [2, 8, 16, 32])
    b = g.input("b", [2, 8, 32, 16])
    c = g.input("c", [1, 8, 16, 32])
    d = g.input("d", [2, 1, 32, 16])
    g.output(g.op("MatMul", [a, b]))
    g.output(g.op("MatMul", [c, d]))  # batch broadcasts to [2, 8]
    g.output(g.op("MatMul", [a, g.weight(32, 4)]))
    assert stats(g.build()).flops == 2 * (2 * 8 * 16 * 16) * 32 * 2 + 2 * (2 * 8 * 16 * 4) * 32


def test_integer_matmul_counts_and_its_int8_weight_is_a_param():
    g = Graph()
    a = g.input("a", [4, 6], TensorProto.UINT8)
    w = g.const(np.ones((6, 3), np.int8))
    g.output(g.op("MatMulInteger", [a, w]))
    model = g.build()
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT32
    s = stats(model)
    assert (s.flops, s.params) == (2 * 4 * 3 * 6, 6 * 3)


@pytest.mark.parametrize("equation", ["bhqd,bhkd->bhqk", "...qd,...kd->...qk", "bhqd,bhkd"])
def test_einsum_attention_scores(equation):
    g = Graph(opset=13)
    q = g.input("q", [2, 4, 8, 16])
    k = g.input("k", [2, 4, 10, 16])
    g.output(g.op("Einsum", [q, k], equation=equation))
    # implicit output ("bhqd,bhkd" -> "kq": the labels used once) sums b, h and d: the same index space
    assert stats(g.build()).flops == 2 * 2 * 4 * 8 * 10 * 16


def test_einsum_reduction_of_one_operand():
    g = Graph(opset=13)
    x = g.input("x", [3, 5])
    g.output(g.op("Einsum", [x], equation="ij->i"))
    assert stats(g.build()).flops == 3 * 5


def _scores(b, heads, s, length, d_qk, d_v):
    """QK^T, then 1 (scale) + 5 (softmax) per score, then AV."""
    return 2 * b * s * length * d_qk + 6 * b * heads * s * length + 2 * b * s * length * d_v


def test_decomposed_attention_equals_fused_onnx_attention():
    b, heads, s, length, head = 2, 4, 8, 10, 16
    g = Graph(opset=23)
    q = g.input("q", [b, heads, s, head])
    k = g.input("k", [b, heads, length, head])
    v = g.input("v", [b, heads, length, head])
    scores = g.op("Div", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), g.const(np.float32(4))])
    g.output(g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v]))
    g.output(g.op("Attention", [q, k, v]))
    model = g.build()
    model.ir_version = 11
    s_ = stats(model)
    expected = _scores(b, heads, s, length, heads * head, heads * head)
    assert flops_of(model, "Softmax") == 5 * b * heads * s * length
    assert s_.flops - flops_of(model, "Attention") == expected
    assert flops_of(model, "Attention") == expected


def test_onnx_attention_3d_with_grouped_kv_and_cache():
    g = Graph(opset=23)
    q = g.input("q", [1, 6, 8 * 4])  # 8 query heads of 4
    k = g.input("k", [1, 6, 2 * 4])  # 2 kv heads
    v = g.input("v", [1, 6, 2 * 4])
    past_k = g.input("pk", [1, 2, 10, 4])
    past_v = g.input("pv", [1, 2, 10, 4])
    g.output(g.op("Attention", [q, k, v, "", past_k, past_v], n_out=3, q_num_heads=8, kv_num_heads=2)[0])
    model = g.build()
    model.ir_version = 11
    assert stats(model).flops == _scores(1, 8, 6, 6 + 10, 8 * 4, 8 * 4)


def test_contrib_attention_includes_input_projection():
    b, s, hidden, heads = 2, 8, 16, 4
    g = Graph()
    x = g.input("x", [b, s, hidden])
    g.output(
        g.op(
            "Attention",
            [x, g.weight(hidden, 3 * hidden), g.weight(3 * hidden)],
            domain="com.microsoft",
            num_heads=heads,
        )
    )
    projection = 2 * b * s * hidden * 3 * hidden + b * s * 3 * hidden
    assert stats(contrib(g)).flops == projection + _scores(b, heads, s, s, hidden, hidden)


def test_contrib_attention_with_qkv_hidden_sizes_and_symbolic_axes():
    g = Graph()
    x = g.input("x", ["batch", "seq", 16])
    g.output(
        g.op(
            "Attention",
            [x, g.weight(16, 16 + 16 + 8), g.weight(16 + 16 + 8)],
            domain="com.microsoft",
            num_heads=2,
            qkv_hidden_sizes=[16, 16, 8],
        )
    )
    projection = 2 * 1 * 1 * 16 * (16 + 16 + 8) + 1 * 1 * (16 + 16 + 8)
    assert stats(contrib(g)).flops == projection + _scores(1, 2, 1, 1, 16, 8)


@pytest.mark.parametrize("sizes", [[16, 16], [16, 16, 8, 8]])
def test_contrib_attention_with_malformed_qkv_hidden_sizes_is_counted_without_crashing(sizes):
    # onnxruntime wants exactly three widths and refuses the model otherwise; the cost model runs
    # before that check, so it must count the op as unknown (0) rather than fail to unpack
    g = Graph()
    x = g.input("x", [2, 4, 16])
    g.output(
        g.op(
            "Attention",
            [x, g.weight(16, 40), g.weight(40)],
            domain="com.microsoft",
            num_heads=2,
            qkv_hidden_sizes=sizes,
        )
    )
    assert flops_of(contrib(g), "Attention") == 0


def test_contrib_multi_head_attention_with_bias():
    b, s, length, hidden, heads = 2, 8, 10, 16, 4
    g = Graph()
    q = g.input("q", [b, s, hidden])
    k = g.input("k", [b, length, hidden])
    v = g.input("v", [b, length, hidden])
    g.output(g.op("MultiHeadAttention", [q, k, v, g.weight(3 * hidden)], domain="com.microsoft", num_heads=heads))
    bias = b * s * hidden + b * length * 2 * hidden
    assert stats(contrib(g)).flops == bias + _scores(b, heads, s, length, hidden, hidden)


def test_contrib_multi_head_attention_packed_qkv():
    b, s, heads, head = 1, 5, 2, 8
    g = Graph()
    qkv = g.input("qkv", [b, s, heads, 3, head])
    g.output(g.op("MultiHeadAttention", [qkv], domain="com.microsoft", num_heads=heads))
    assert stats(contrib(g)).flops == _scores(b, heads, s, s, heads * head, heads * head)


def test_contrib_group_query_attention_with_cache_and_rotary():
    b, s, heads, kv_heads, head, past = 1, 8, 4, 2, 16, 12
    g = Graph()
    q = g.input("q", [b, s, heads * head])
    k = g.input("k", [b, s, kv_heads * head])
    v = g.input("v", [b, s, kv_heads * head])
    past_k = g.input("past_k", [b, kv_heads, past, head])
    past_v = g.input("past_v", [b, kv_heads, past, head])
    seqlens = g.input("seqlens_k", [b], TensorProto.INT32)
    total = g.input("total", [], TensorProto.INT32)
    cos = g.input("cos", [past + s, head // 2])
    sin = g.input("sin", [past + s, head // 2])
    g.output(
        g.op(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, seqlens, total, cos, sin],
            n_out=3,
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
        )[0]
    )
    rotary = 3 * b * s * (heads * head + kv_heads * head)
    # each query head reads its group's K/V head: as many full heads as queries
    assert stats(contrib(g)).flops == rotary + _scores(b, heads, s, s + past, heads * head, heads * head)


def test_contrib_group_query_attention_packed_qkv():
    b, s, heads, kv_heads, head = 1, 6, 4, 1, 8
    g = Graph()
    qkv = g.input("qkv", [b, s, (heads + 2 * kv_heads) * head])
    seqlens = g.input("seqlens_k", [b], TensorProto.INT32)
    total = g.input("total", [], TensorProto.INT32)
    g.output(
        g.op(
            "GroupQueryAttention",
            [qkv, "", "", "", "", seqlens, total],
            n_out=3,
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=kv_heads,
        )[0]
    )
    assert stats(contrib(g)).flops == _scores(b, heads, s, s, heads * head, heads * head)


N = 2 * 5 * 16  # elements of the [2, 5, 16] tensors below


@pytest.mark.parametrize(
    "op, domain, extra_inputs, attrs, per_element",
    [
        ("LayerNormalization", "", [[16], [16]], {"axis": -1}, 5 + 1 + 1),  # moments, scale, shift
        ("LayerNormalization", "", [[16]], {"axis": -1}, 5 + 1),
        ("BatchNormalization", "", [[5], [5], [5], [5]], {}, 2),
        ("InstanceNormalization", "", [[5], [5]], {}, 5 + 2),
        ("Softmax", "", [], {"axis": -1}, 5),
        ("Gelu", "", [], {}, 5),
        ("Gelu", "", [], {"approximate": "tanh"}, 9),
        ("SimplifiedLayerNormalization", "", [[16]], {"axis": -1}, 3 + 1),
        ("SkipLayerNormalization", "com.microsoft", [[2, 5, 16], [16], [16], [16]], {}, 1 + 5 + 1 + 1 + 1),
        ("SkipSimplifiedLayerNormalization", "com.microsoft", [[2, 5, 16], [16]], {}, 1 + 3 + 1),
        ("FastGelu", "com.microsoft", [[16]], {}, 9 + 1),
        ("BiasGelu", "com.microsoft", [[16]], {}, 1 + 5),
        ("Gelu", "com.microsoft", [], {}, 5),
    ],
)
def test_per_element_constants(op, domain, extra_inputs, attrs, per_element):
    g = Graph(opset=20)
    x = g.input("x", [2, 5, 16])
    g.output(g.op(op, [x] + [g.weight(*shape) for shape in extra_inputs], domain=domain, **attrs))
    assert flops_of(contrib(g), op) == per_element * N


def test_without_an_inferred_output_shape_element_wise_ops_use_their_inputs():
    g = Graph()
    x, y = g.input("x", [1, 4, 3, 1]), g.input("y", [5])
    g.output(g.op("Add", [x, y]))
    g.output(g.op("BatchNormalization", [x] + [g.weight(4) for _ in range(4)]))
    g.output(g.op("LayerNormalization", [x, g.weight(1)], axis=-1))
    assert count(ModelGraph(g.build())).flops == 4 * 3 * 5 + 2 * 4 * 3 + (5 + 1) * 4 * 3  # no inference run


def test_group_and_rms_normalization():
    g = Graph(opset=23)
    x = g.input("x", [2, 4, 3, 3])
    y = g.op("GroupNormalization", [x, g.weight(4), g.weight(4)], num_groups=2)
    g.output(g.op("RMSNormalization", [y, g.weight(3)], axis=-1))
    model = g.build()
    model.ir_version = 11
    assert stats(model).flops == (5 + 2) * 2 * 4 * 3 * 3 + (3 + 1) * 2 * 4 * 3 * 3


def test_bidirectional_lstm():
    seq, batch, inputs, hidden = 5, 3, 10, 8
    g = Graph()
    x = g.input("x", [seq, batch, inputs])
    w, r, b = g.weight(2, 4 * hidden, inputs), g.weight(2, 4 * hidden, hidden), g.weight(2, 8 * hidden)
    g.output(g.op("LSTM", [x, w, r, b], hidden_size=hidden, direction="bidirectional"))
    # gate products + both bias vectors + 3 sigmoids, 2 tanh, cell update (3), output gate (1)
    per_step = 2 * 4 * hidden * (inputs + hidden) + 2 * 4 * hidden + 9 * hidden
    s = stats(g.build())
    assert s.flops == per_step * seq * batch * 2
    assert s.params == 2 * 4 * hidden * inputs + 2 * 4 * hidden * hidden + 2 * 8 * hidden


def test_lstm_with_peepholes_and_symbolic_sequence():
    hidden = 4
    g = Graph()
    x = g.input("x", ["seq", "batch", 3])
    args = [x, g.weight(1, 4 * hidden, 3), g.weight(1, 4 * hidden, hidden), "", "", "", "", g.weight(1, 3 * hidden)]
    g.output(g.op("LSTM", args, hidden_size=hidden))
    assert stats(g.build()).flops == 2 * 4 * hidden * (3 + hidden) + 9 * hidden + 6 * hidden


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_gru(linear_before_reset):
    seq, batch, inputs, hidden = 4, 2, 6, 5
    g = Graph()
    x = g.input("x", [seq, batch, inputs])
    args = [x, g.weight(1, 3 * hidden, inputs), g.weight(1, 3 * hidden, hidden), g.weight(1, 6 * hidden)]
    g.output(g.op("GRU", args, hidden_size=hidden, linear_before_reset=linear_before_reset))
    # gate products + both biases + 2 sigmoids, reset multiply, tanh, h = (1-z)*n + z*h (4)
    per_step = 2 * 3 * hidden * (inputs + hidden) + 2 * 3 * hidden + 8 * hidden
    assert stats(g.build()).flops == per_step * seq * batch


def test_batch_first_rnn_without_bias():
    batch, seq, inputs, hidden = 3, 7, 4, 6
    g = Graph(opset=14)
    x = g.input("x", [batch, seq, inputs])
    g.output(g.op("RNN", [x, g.weight(1, hidden, inputs), g.weight(1, hidden, hidden)], hidden_size=hidden, layout=1))
    assert stats(g.build()).flops == (2 * hidden * (inputs + hidden) + hidden) * seq * batch


def test_params_count_a_shared_weight_once_and_int8_weights_but_not_their_scales():
    g = Graph()
    x = g.input("x", [1, 8])
    shared = g.weight(8, 8)
    h = g.op("MatMul", [g.op("MatMul", [x, shared]), shared])
    q = g.const(np.arange(24, dtype=np.int8).reshape(8, 3))
    scale, zero = g.const(np.full(3, 0.1, np.float32)), g.const(np.zeros(3, np.int8))
    w = g.op("DequantizeLinear", [q, scale, zero], axis=1)
    g.output(g.op("MatMul", [h, w]))
    g.const(np.ones(100, np.float32), name="unused")
    s = stats(g.build())
    assert s.params == 8 * 8 + 8 * 3
    assert s.flops == 2 * 8 * 8 * 2 + 2 * 3 * 8
    assert [(n.op_type, n.params) for n in s.nodes if n.params] == [("MatMul", 64), ("DequantizeLinear", 24)]


def test_an_int8_embedding_table_gathered_before_it_is_dequantized_is_params():
    # quantize_dynamic's embeddings: Gather the int8 rows, then DequantizeLinear them
    g = Graph()
    ids = g.input("ids", [1, 5], onnx.TensorProto.INT64)
    rows = g.op("Gather", [g.const(np.ones((50, 4), np.int8), "table"), ids])
    g.output(g.op("DequantizeLinear", [rows, g.const(np.float32(0.1)), g.const(np.int8(0))]))
    assert stats(g.build()).params == 50 * 4


def test_qgemm_flops_are_its_gemm_flops():
    g = Graph()
    x = g.input("x", [3, 8], onnx.TensorProto.UINT8)
    scale, zero = g.const(np.float32(0.1)), g.const(np.uint8(0))
    g.output(
        g.op(
            "QGemm",
            [
                x,
                scale,
                zero,
                g.const(np.ones((8, 5), np.int8)),
                scale,
                g.const(np.int8(0)),
                g.const(np.zeros(5, np.int32)),
            ],
            domain="com.microsoft",
        )
    )
    s = stats(g.build())
    assert s.flops == 2 * 3 * 5 * 8 + 3 * 5
    assert s.params == 8 * 5 + 5  # the int8 weight and the int32 bias, not the scales


def test_weights_in_constant_nodes_are_params():
    g = Graph()
    x = g.input("x", [1, 4])
    g.nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.ones((4, 2), np.float32))))
    g.output(g.op("MatMul", [x, "w"]))
    assert stats(g.build()).params == 4 * 2


def _body(nodes, outputs, inputs=()):
    return helper.make_graph(
        nodes, "body", list(inputs), [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    )


def _with_body_shapes(model):
    """spa's inference annotates the main graph only; onnx's annotates bodies too."""
    return onnx.shape_inference.infer_shapes(model)


def test_if_counts_its_costlier_branch_and_the_weights_of_both():
    g = Graph()
    c = g.input("c", [], TensorProto.BOOL)
    x = g.input("x", [3, 4])
    w = g.weight(4, 5)
    local = helper.make_node("Constant", [], ["wl"], value=numpy_helper.from_array(np.ones((4, 5), np.float32)))
    then = _body([helper.make_node("MatMul", [x, w], ["t0"]), helper.make_node("Relu", ["t0"], ["t"])], ["t"])
    other = _body([local, helper.make_node("MatMul", [x, "wl"], ["e"])], ["e"])
    g.output(g.op("If", [c], then_branch=then, else_branch=other))
    s = stats(_with_body_shapes(g.build()))
    assert s.flops == 2 * 3 * 5 * 4 + 3 * 5
    assert s.params == 4 * 5 + 4 * 5
    assert s.per_op_type() == {"If": s.flops}


def test_loop_counts_its_body_once_and_scan_once_per_step():
    g = Graph()
    x = g.input("x", [6, 4])
    w = g.weight(4, 4)
    state = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4])
    row = helper.make_tensor_value_info("r", TensorProto.FLOAT, [4])
    scan_body = _body(
        [
            helper.make_node("MatMul", ["h", w], ["hw"]),
            helper.make_node("Add", ["hw", "r"], ["h2"]),
            helper.make_node("Identity", ["h2"], ["out"]),
        ],
        ["h2", "out"],
        [state, row],
    )
    h0 = g.input("h0", [1, 4])
    g.output(g.op("Scan", [h0, x], n_out=2, body=scan_body, num_scan_inputs=1)[0])
    loop_inputs = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [6, 4]),
    ]
    loop_body = _body(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("MatMul", ["v", w], ["v2"])],
        ["cond_out", "v2"],
        loop_inputs,
    )
    loop_body.output[0].type.tensor_type.elem_type = TensorProto.BOOL
    g.output(g.op("Loop", [g.const(np.int64(3)), g.const(np.bool_(True)), x], body=loop_body))
    s = stats(_with_body_shapes(g.build()))
    scan = 6 * (2 * 1 * 4 * 4 + 4)
    loop = 2 * 6 * 4 * 4
    assert s.per_op_type() == {"Scan": scan, "Loop": loop}
    assert s.params == 4 * 4  # read by both bodies, counted once


def test_body_nodes_without_shapes_count_zero():
    g = Graph()
    c = g.input("c", [], TensorProto.BOOL)
    x = g.input("x", [3, 4])
    w = g.weight(4, 5)
    branch = _body([helper.make_node("MatMul", [x, w], ["t0"]), helper.make_node("Relu", ["t0"], ["t"])], ["t"])
    g.output(g.op("If", [c], then_branch=branch, else_branch=branch))
    s = stats(g.build())
    # spa's inference leaves the body's t0 without a shape: the Relu counts 0, while the MatMul
    # reads tensors of the enclosing graph, whose shapes are known
    assert s.flops == 2 * 3 * 5 * 4
    assert s.params == 4 * 5


def test_torch_lstm_and_mlp_match_counts_from_the_modules(tmp_path):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(10, 16, num_layers=2, bidirectional=True)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.ReLU(), torch.nn.Linear(24, 5))

        def forward(self, x):
            return self.mlp(self.lstm(x)[0])

    seq, batch = 7, 3
    net = Net().eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.randn(seq, batch, 10),), str(path), dynamo=False)
    s = count(Model.load(path).graph)

    lstm = 0
    for layer in range(2):
        inputs = net.lstm.input_size if layer == 0 else 2 * net.lstm.hidden_size
        h = net.lstm.hidden_size
        per_step = 2 * 4 * h * (inputs + h) + 2 * 4 * h + 9 * h
        lstm += per_step * seq * batch * 2
    rows = seq * batch  # the MLP maps every [seq, batch] position
    first, second = net.mlp[0], net.mlp[2]
    mlp = rows * (
        2 * first.in_features * first.out_features
        + first.out_features  # MatMul + bias
        + first.out_features  # ReLU
        + 2 * second.in_features * second.out_features
        + second.out_features
    )
    assert s.flops == lstm + mlp
    assert s.params == sum(p.numel() for p in net.parameters())


def test_ops_past_an_op_shape_inference_does_not_know_are_named_not_counted_as_zero(tmp_path):
    """A Conv reading the output of an unknown op has no output shape: its FLOPs cannot be counted,
    and both the report and the CLI say so rather than counting 0 in silence."""
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    mystery = g.op("Mystery", [g.conv(x, 3, 4)], domain="com.example")
    g.output(g.conv(mystery, 4, 2))
    model = g.build()
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    report = spa.analyze(str(path))
    assert report.stats.uncounted() == {"Conv": 1}
    assert report.flops == 2 * (4 * 8 * 8) * (3 * 9) + 4 * 8 * 8  # the first Conv only
    out = CliRunner().invoke(main, ["analyze", str(path)])
    assert out.exit_code == 0 and "(not counted, output shapes unknown: Conv x1)" in out.output
