"""Attention heads: removed whole (the default) or head_dim shrunk evenly in every head.

Hand-built attention blocks cover the layouts (separate Q/K/V projections, one fused projection
split three ways, a fused projection reshaped to 5-D), static and dynamic reshape targets, and
the reshape round trip the dynamo exporter uses for Kᵀ. Small random-weight BERT and ViT exports
(tools/zoo.py) cover what real exporters and onnxruntime's fusions write. Every prune runs spa's
validation, which compares the pruned model with the zeroed (soft) one at several sizes: a head
mapped to the wrong indices fails there.
"""

import numpy as np
import onnx
import pytest
from builder import Graph, analysis_of, group_at, initializer, prune_exact
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.core.runtime import run, sample_inputs

E = 8  # width of the block's input


def attention_block(
    heads: int,
    head_dim: int,
    layout: str = "separate",
    dynamic: bool = False,
    seq: int = 5,
    k_round_trip: bool = False,
    scale_from_shape: bool = False,
    expanded_bias: bool = False,
    shared_target: bool = False,
):
    """x -> Q, K, V -> softmax(Q Kᵀ * s) V -> merge heads -> output projection -> y.

    ``dynamic``: batch and sequence are symbolic and the head-split targets are built at run
    time from Shape, with -1 for the head count; the merge target writes hidden as a literal.
    """
    g = Graph(opset=17)
    hidden = heads * head_dim
    x = g.input("x", ["batch", "seq", E] if dynamic else [1, seq, E])
    if dynamic:
        shape = g.op("Shape", [x])
        b, s = (
            g.op("Unsqueeze", [g.op("Gather", [shape, g.const(np.array(i))], axis=0), g.const(np.array([0]))])
            for i in (0, 1)
        )

    def target(*tail):
        if dynamic:
            return g.op("Concat", [b, s, g.const(np.array(tail, dtype=np.int64))], axis=0)
        return g.const(np.array([1, seq, *tail], dtype=np.int64))

    def project(width):
        return g.op("Add", [g.op("MatMul", [x, g.weight(E, width)]), g.weight(width)])

    if layout in ("5d", "5d_slice"):  # [B, S, 3, H, D] -> [3, B, H, S, D], then pick Q, K and V
        qkv = g.op("Reshape", [project(3 * hidden), target(3, heads, -1 if dynamic else head_dim)])
        t = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
        if layout == "5d":
            q, k, v = (g.op("Gather", [t, g.const(np.array(i))], axis=0) for i in range(3))
        else:  # paddle2onnx (PP-OCRv4 rec's SVTR): Slice one of the three, then Squeeze it away
            q, k, v = (
                g.op(
                    "Squeeze",
                    [
                        g.op("Slice", [t, g.const(np.array([i])), g.const(np.array([i + 1])), g.const(np.array([0]))]),
                        g.const(np.array([0])),
                    ],
                )
                for i in range(3)
            )
        k = g.op("Transpose", [k], perm=[0, 1, 3, 2])
    else:
        if layout == "split":
            parts = g.op("Split", [project(3 * hidden), g.const(np.array([hidden] * 3))], n_out=3, axis=2)
        else:
            parts = [project(hidden) for _ in range(3)]
        shared = target(-1 if dynamic else heads, head_dim) if shared_target else None
        split = [g.op("Reshape", [p, shared or target(-1 if dynamic else heads, head_dim)]) for p in parts]
        q, v = (g.op("Transpose", [split[i]], perm=[0, 2, 1, 3]) for i in (0, 2))
        if k_round_trip:  # the dynamo exporter's Kᵀ: [B, H, S, D] -> [-1, S, D] -> [-1, D, S] -> [B, H, D, S]
            k = g.op("Transpose", [split[1]], perm=[0, 2, 1, 3])
            kshape = g.op("Shape", [k])

            def piece(lo, hi):
                return g.op("Slice", [kshape, g.const(np.array([lo])), g.const(np.array([hi]))])

            flat = g.op(
                "Reshape", [k, g.op("Concat", [g.const(np.array([-1])), piece(-2, -1), piece(-1, 2**62)], axis=0)]
            )
            k = g.op(
                "Reshape",
                [
                    g.op("Transpose", [flat], perm=[0, 2, 1]),
                    g.op("Concat", [piece(0, -2), piece(-1, 2**62), piece(-2, -1)], axis=0),
                ],
            )
        else:
            k = g.op("Transpose", [split[1]], perm=[0, 2, 3, 1])
    if scale_from_shape:  # torch's scaled_dot_product_attention: 1/sqrt(q.size(-1)), computed at run time
        size = g.op(
            "Cast",
            [g.op("Slice", [g.op("Shape", [q]), g.const(np.array([-1])), g.const(np.array([2**62]))])],
            to=TensorProto.FLOAT,
        )
        scale = g.op("Div", [g.const(np.array([1.0], np.float32)), g.op("Sqrt", [size])])
    else:
        scale = g.const(np.array(1 / np.sqrt(head_dim), np.float32))
    scores = g.op("Mul", [g.op("MatMul", [q, k]), scale])
    if expanded_bias:  # one [S, S] bias, given at run time, written out for every head by an Expand
        bias = g.op("Expand", [g.input("bias", [1, 1, seq, seq]), g.const(np.array([1, heads, seq, seq]))])
        scores = g.op("Add", [scores, bias])
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    merged = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), target(hidden)])
    g.output(g.op("Add", [g.op("MatMul", [merged, g.weight(hidden, 6)]), g.weight(6)]))
    return g.build()


def weights(model, op="MatMul"):
    """The weight of every op of type ``op``, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    return [initializer(model, n.input[1]) for n in model.graph.node if n.op_type == op and n.input[1] in inits]


def kept_columns(dense: np.ndarray, pruned: np.ndarray) -> list[int]:
    """Which columns of the dense weight the pruned one kept (random weights: columns are unique)."""
    return [next(j for j in range(dense.shape[1]) if np.array_equal(dense[:, j], col)) for col in pruned.T]


def whole_heads(columns: list[int], head_dim: int) -> list[int]:
    """The heads ``columns`` consist of, asserting each is a whole contiguous block."""
    heads = sorted({c // head_dim for c in columns})
    assert columns == [h * head_dim + d for h in heads for d in range(head_dim)], columns
    return heads


def reshape_targets(model) -> list[list[int]]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]].tolist() for n in model.graph.node if n.op_type == "Reshape" and n.input[1] in inits]


# ---------------------------------------------------------------- heads, hand-built


@pytest.mark.parametrize("layout", ["separate", "split", "5d", "5d_slice"])
def test_heads_go_whole_and_targets_follow(layout):
    heads, head_dim = 4, 6  # head_dim is the larger factor: a "largest factor" rule would pick it
    model = attention_block(heads, head_dim, layout)
    analysis = analysis_of(model)
    w_q = next(n.input[1] for n in model.graph.node if n.op_type == "MatMul")
    group = group_at(analysis, w_q, 1)
    assert group.prunable and group.exact and group.size == heads
    assert (group.attention.kind, group.attention.heads, group.attention.head_dim) == ("heads", heads, head_dim)

    result = prune_exact(model, 0.5, compensate=False)  # compensation would refit the rows compared below
    dense_w, pruned_w = weights(model), weights(result.model)
    hidden = heads * head_dim
    if layout == "separate":
        kept = [whole_heads(kept_columns(d, p), head_dim) for d, p in zip(dense_w[:3], pruned_w[:3])]
        assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 2
    else:  # one fused weight: its Q, K and V thirds lose the same heads
        columns = kept_columns(dense_w[0], pruned_w[0])
        thirds = [[c - t * hidden for c in columns if t * hidden <= c < (t + 1) * hidden] for t in range(3)]
        kept = [whole_heads(third, head_dim) for third in thirds]
        assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 2
    out_rows = [r for r in range(hidden) if any(np.array_equal(dense_w[-1][r], row) for row in pruned_w[-1])]
    assert whole_heads(out_rows, head_dim) == kept[0]  # the output projection loses the same heads' rows
    targets = reshape_targets(result.model)
    assert [1, 5, 2 * head_dim] in targets  # the merge
    assert ([1, 5, 3, 2, head_dim] if layout.startswith("5d") else [1, 5, 2, head_dim]) in targets
    if layout == "split":
        split = next(n for n in result.model.graph.node if n.op_type == "Split")
        assert initializer(result.model, split.input[1]).tolist() == [2 * head_dim] * 3


def test_head_count_in_an_expand_shape_is_rewritten():
    model = attention_block(4, 3, expanded_bias=True)
    result = prune_exact(model, 0.5)
    expand = next(n for n in result.model.graph.node if n.op_type == "Expand")
    assert initializer(result.model, expand.input[1]).tolist() == [1, 2, 5, 5]


def test_head_mapping_is_contiguous_blocks_not_strides():
    """Head h is indices [h*D, (h+1)*D), not h, h+H, h+2H...: the kept columns are whole blocks,
    and the pruned model equals the zeroed one at every size validation tries."""
    model = attention_block(3, 4)
    w_q = next(n.input[1] for n in model.graph.node if n.op_type == "MatMul")
    analysis = analysis_of(model)
    labels = analysis.labels[next(d for d in analysis.labels if d.tensor == w_q and d.axis == 1)]
    assert labels.tolist() == np.repeat(labels[::4], 4).tolist() and len(set(labels.tolist())) == 3
    result = prune_exact(model, 0.34)
    whole_heads(kept_columns(weights(model)[0], weights(result.model)[0]), 4)


def test_head_dim_mode_couples_q_with_k_and_keeps_v_apart():
    heads, head_dim = 6, 4  # the head count is the larger factor this time
    model = attention_block(heads, head_dim)
    analysis = analysis_of(model, attention="head_dim")
    w_q, w_k, w_v = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"][:3]
    qk, v = group_at(analysis, w_q, 1), group_at(analysis, w_v, 1)
    assert qk is group_at(analysis, w_k, 1) and qk is not v
    assert qk.size == v.size == head_dim and qk.attention.kind == v.attention.kind == "head_dim"
    result = prune_exact(model, 0.5, attention="head_dim")
    dense_w, pruned_w = weights(model), weights(result.model)
    for d, p in zip(dense_w[:3], pruned_w[:3]):
        columns = kept_columns(d, p)
        per_head = [[c % head_dim for c in columns if c // head_dim == h] for h in range(heads)]
        assert all(k == per_head[0] for k in per_head) and len(per_head[0]) == 2  # the same d in every head
    assert [1, 5, heads, 2] in reshape_targets(result.model)


def test_head_dim_read_as_a_float_stays():
    """torch computes the scale from q.size(-1): shrinking head_dim would change it."""
    model = attention_block(4, 6, scale_from_shape=True)
    w_q = next(n.input[1] for n in model.graph.node if n.op_type == "MatMul")
    group = group_at(analysis_of(model, attention="head_dim"), w_q, 1)
    assert "reads this size into a value" in group.frozen
    assert group_at(analysis_of(model), w_q, 1).prunable  # the head count is not in the scale
    prune_exact(model, 0.5)


# ---------------------------------------------------------------- dynamic axes


def check_other_sizes(dense, pruned, sizes=((3, 7), (2, 11))):
    """The pruned model runs at batch/sequence sizes other than validation's, same output shapes."""
    for batch, seq in sizes:
        feeds = sample_inputs(dense, seed=batch, batch=batch, length=seq)
        if "input_ids" in feeds:
            feeds["input_ids"] = np.random.default_rng(batch).integers(0, 100, feeds["input_ids"].shape)
        want, got = run(dense, feeds), run(pruned, feeds)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


@pytest.mark.parametrize("mode", ["heads", "head_dim"])
@pytest.mark.parametrize("layout,round_trip", [("separate", False), ("separate", True), ("5d", False)])
def test_dynamic_targets_with_minus_one(layout, round_trip, mode):
    model = attention_block(4, 6, layout, dynamic=True, k_round_trip=round_trip)
    w_q = next(n.input[1] for n in model.graph.node if n.op_type == "MatMul")
    group = group_at(analysis_of(model, attention=mode), w_q, 1)
    assert group.prunable and group.attention.kind == mode
    result = prune_exact(model, 0.5, attention=mode)
    assert result.report.params_after < result.report.params_before
    check_other_sizes(model, result.model)
    # the merge writes hidden as a literal: rewritten (-1 and run-time sizes follow by themselves)
    concat_literals = [
        initializer(result.model, n.input[2]).tolist()
        for n in result.model.graph.node
        if n.op_type == "Concat"
        and len(n.input) == 3
        and n.input[2] in {t.name for t in result.model.graph.initializer}
    ]
    assert [12] in concat_literals


def test_one_target_computation_for_q_k_and_v_keeps_their_head_dim_equal():
    """The dynamo exporter computes [batch, seq, -1, D] once for Q, K and V: its literal D can only
    take one value, so a global ranking that would give Q/K and V different widths must not."""
    model = attention_block(4, 6, dynamic=True, shared_target=True)
    w_q, w_k, w_v = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"][:3]
    analysis = analysis_of(model, attention="head_dim")
    assert group_at(analysis, w_q, 1) is group_at(analysis, w_v, 1)
    result = prune_exact(model, 0.5, attention="head_dim", global_rank=True)
    check_other_sizes(model, result.model)


def test_round_trip_links_kt_through_tensors_without_index_space():
    model = attention_block(4, 6, dynamic=True, k_round_trip=True)
    analysis = analysis_of(model)
    w_q, w_k = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"][:2]
    assert group_at(analysis, w_q, 1) is group_at(analysis, w_k, 1)


# ---------------------------------------------------------------- exported models


def window_attention(heads: int, head_dim: int, shared_target: bool = False, seq: int = 5):
    """torchvision's Swin as the legacy exporter writes it: the heads merge back to the width C
    read at run time from the block's input (Shape(x)[2]), and the block adds its input back, so
    C is the residual stream and never shrinks while the heads may. ``shared_target``: the same
    target also reshapes x itself, so its C entry must keep its run-time value."""
    g = Graph(opset=17)
    width = heads * head_dim
    x = g.input("x", [1, seq, width])
    shape = g.op("Shape", [x])
    target = g.op(
        "Concat",
        [
            g.op("Unsqueeze", [g.op("Gather", [shape, g.const(np.array(i))], axis=0), g.const(np.array([0]))])
            for i in range(3)
        ],
        axis=0,
    )
    if shared_target:
        x_again = g.op("Reshape", [x, target])
    q, k, v = (
        g.op(
            "Transpose",
            [
                g.op(
                    "Reshape",
                    [g.op("MatMul", [x, g.weight(width, width)]), g.const(np.array([1, seq, heads, head_dim]))],
                )
            ],
            perm=perm,
        )
        for perm in ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3])
    )
    scores = g.op("Mul", [g.op("MatMul", [q, k]), g.const(np.array(1 / np.sqrt(head_dim), np.float32))])
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    merged = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), target])
    g.output(g.op("Add", [x_again if shared_target else x, g.op("MatMul", [merged, g.weight(width, width)])]))
    return g.build()


def test_merge_to_a_width_read_at_run_time_lets_heads_go():
    """The merge's C is a static number: the cut writes the pruned width in its place, rather than
    tying the heads to C (frozen: a graph input and output) as a run-time size would need."""
    heads, head_dim = 4, 3
    model = window_attention(heads, head_dim)
    w_q = next(n.input[1] for n in model.graph.node if n.op_type == "MatMul")
    group = group_at(analysis_of(model), w_q, 1)
    assert group.prunable and group.size == heads and group.attention.kind == "heads"
    result = prune_exact(model, 0.5, criterion="l2", compensate=False)
    assert len(whole_heads(kept_columns(weights(model)[0], weights(result.model)[0]), head_dim)) == 2
    concat = next(n for n in result.model.graph.node if n.op_type == "Concat")
    inits = {t.name for t in result.model.graph.initializer}
    # batch and sequence are still read from x; C became the literal of the pruned width
    assert [name in inits for name in concat.input] == [False, False, True]
    assert initializer(result.model, concat.input[2]).tolist() == [2 * head_dim]


def test_run_time_width_shared_with_another_reshape_keeps_the_heads():
    """Where the target also reshapes x, a literal would change what that Reshape makes: the
    size stays read at run time, which ties the heads to C, so they stay."""
    model = window_attention(4, 3, shared_target=True)
    w_q = next(n.input[1] for n in model.graph.node if n.op_type == "MatMul")
    assert group_at(analysis_of(model), w_q, 1).frozen
    prune_exact(model, 0.5, criterion="l2", compensate=False)


@pytest.fixture(scope="module")
def attention_model():
    import zoo
    from conftest import zoo_dir

    pytest.importorskip("transformers")
    return lambda name, exporter: zoo.export_attention(name, exporter, zoo_dir())


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bert_export_loses_whole_heads(attention_model, exporter):
    path = attention_model("tiny_bert", exporter)
    report = spa.analyze(path)
    heads = [g for g in report.groups if g.kind == "heads"]
    assert len(heads) == 2 and all(g.heads == 4 and g.head_dim == 16 and g.frozen is None for g in heads)
    result = spa.prune(path, ratio=0.25)  # one head of four in each layer
    assert result.report.validation.ok and result.report.validation.soft_equal
    dense = onnx.load(str(path))
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    pruned_w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    projections = [
        n
        for n in result.model.graph.node
        if n.op_type == "MatMul" and n.input[1] in pruned_w and dense_w[n.input[1]].shape == (64, 64)
    ]
    shapes = sorted(pruned_w[n.input[1]].shape for n in projections)
    assert shapes == [(48, 64)] * 2 + [(64, 48)] * 6  # Q, K, V lose one head's columns, the output its rows
    for n in projections:
        if pruned_w[n.input[1]].shape == (64, 48):
            whole_heads(kept_columns(dense_w[n.input[1]], pruned_w[n.input[1]]), 16)
    check_other_sizes(dense, result.model)


def test_bert_head_dim_mode(attention_model):
    path = attention_model("tiny_bert", "legacy")
    result = spa.prune(path, ratio=0.25, attention="head_dim")
    kinds = [g.kind for g in result.report.groups if g.removed]
    assert kinds.count("head_dim") == 4  # Q/K and V in each of two layers
    check_other_sizes(onnx.load(str(path)), result.model)


def test_onnxruntime_fused_bert(attention_model):
    """Attention (QKV in one weight, num_heads attribute), SkipLayerNormalization, BiasGelu."""
    path = attention_model("tiny_bert", "ort")
    dense = onnx.load(str(path))
    assert {n.op_type for n in dense.graph.node} >= {"Attention", "SkipLayerNormalization", "BiasGelu"}
    result = spa.prune(path, ratio=0.5)
    report = result.report
    assert report.validation.ok and report.validation.soft_equal
    assert sum(1 for g in report.groups if g.kind == "heads" and g.removed == 2) == 2
    assert sum(1 for g in report.groups if g.removed == 64) == 2  # the FFN, through BiasGelu
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    for node in (n for n in result.model.graph.node if n.op_type == "Attention"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == 2
        w = initializer(result.model, node.input[1])
        assert w.shape == (64, 96) and initializer(result.model, node.input[2]).shape == (96,)
        columns = kept_columns(dense_w[node.input[1]], w)
        kept = [whole_heads([c - t * 64 for c in columns if t * 64 <= c < (t + 1) * 64], 16) for t in range(3)]
        assert kept[0] == kept[1] == kept[2]
    from spa.formats.model import Model
    from spa.reporting.metrics import count

    before, after = (count(Model.load(m).graph).node_flops for m in (dense, result.model))
    attention = [n.name for n in dense.graph.node if n.op_type == "Attention"]
    assert all(after[name] < 0.6 * before[name] for name in attention)
    check_other_sizes(dense, result.model)


def test_onnxruntime_fused_bert_head_dim_keeps_the_scale(attention_model):
    path = attention_model("tiny_bert", "ort")
    result = spa.prune(path, ratio=0.25, attention="head_dim")
    assert result.report.validation.ok and result.report.validation.soft_equal
    node = next(n for n in result.model.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == 4 and attrs["scale"] == pytest.approx(0.25)  # 1/sqrt(16), the dense width's


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_vit_fused_in_proj_thirds_lose_the_same_heads(attention_model, exporter):
    path = attention_model("tiny_vit", exporter)
    result = spa.prune(path, ratio=0.5)
    assert result.report.validation.ok and result.report.validation.soft_equal
    dense = onnx.load(str(path), load_external_data=True)
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    pruned_w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    fused = [
        n.input[1]
        for n in result.model.graph.node
        if n.op_type == "MatMul" and n.input[1] in pruned_w and dense_w[n.input[1]].shape == (64, 192)
    ]
    assert len(fused) == 2
    for name in fused:
        assert pruned_w[name].shape == (64, 96)
        columns = kept_columns(dense_w[name], pruned_w[name])
        kept = [whole_heads([c - t * 64 for c in columns if t * 64 <= c < (t + 1) * 64], 16) for t in range(3)]
        assert kept[0] == kept[1] == kept[2] and len(kept[0]) == 2


def test_analyze_lists_heads_per_layer(attention_model, tmp_path):
    import json

    from click.testing import CliRunner

    from spa.cli.commands import main

    path = attention_model("tiny_bert", "legacy")
    out = CliRunner().invoke(main, ["analyze", str(path), "--json", str(tmp_path / "a.json")])
    assert out.exit_code == 0, out.output
    assert "attention: 2 groups whose units are heads" in out.output
    assert out.output.count("4 heads x head_dim 16, prunable") == 2
    groups = json.loads((tmp_path / "a.json").read_text())["groups"]
    assert sorted((g["kind"], g["heads"], g["head_dim"]) for g in groups if g["kind"]) == [("heads", 4, 16)] * 2
    out = CliRunner().invoke(main, ["analyze", str(path), "--attention", "head-dim"])
    assert "attention: 4 groups whose units are head dim" in out.output


# ---------------------------------------------------------------- grouped-query attention


def gqa_block(heads: int, kv_heads: int, head_dim: int, legacy: bool = False, seq: int = 5):
    """Grouped-query attention: K and V have ``kv_heads`` heads, each repeated for heads / kv_heads
    query heads by repeat_kv (Unsqueeze, Expand, merge Reshape).

    Two exporters' forms: literal shapes [1, kv, n_rep, S, D] and [1, H, S, D] (dynamo, static), or
    (``legacy``) dynamic batch and sequence with the Expand shape built from Shape, guarded by
    Where(shape == -1, 1, shape), and the merged head count computed as kv * n_rep at run time.
    """
    g = Graph(opset=17)
    n_rep = heads // kv_heads
    x = g.input("x", ["batch", "seq", E] if legacy else [1, seq, E])

    def size(tensor, axis):
        return g.op(
            "Unsqueeze",
            [g.op("Gather", [g.op("Shape", [tensor]), g.const(np.array(axis))], axis=0), g.const(np.array([0]))],
        )

    def vector(*parts):  # literals and run-time sizes, concatenated
        return g.op("Concat", [p if isinstance(p, str) else g.const(np.array([p])) for p in parts], axis=0)

    b, s = (size(x, 0), size(x, 1)) if legacy else (1, seq)

    def split(width, count):
        y = g.op("Add", [g.op("MatMul", [x, g.weight(E, width)]), g.weight(width)])
        return g.op(
            "Transpose", [g.op("Reshape", [y, vector(b, s, -1 if legacy else count, head_dim)])], perm=[0, 2, 1, 3]
        )

    def repeat(t):  # [B, kv, S, D] -> [B, H, S, D], each KV head n_rep times in a row
        if legacy:
            shape = vector(b, size(t, 1), n_rep, size(t, 2), size(t, 3))
            ones = g.op(
                "ConstantOfShape", [g.op("Shape", [shape])], value=numpy_helper.from_array(np.array([1], np.int64))
            )
            guard = g.op("Equal", [shape, g.op("Mul", [ones, g.const(np.array(-1))])])
            shape = g.op("Where", [guard, ones, shape])
            merged = g.op(
                "Mul", [g.op("Gather", [g.op("Shape", [t]), g.const(np.array(1))], axis=0), g.const(np.array(n_rep))]
            )
            target = vector(b, g.op("Unsqueeze", [merged, g.const(np.array([0]))]), size(t, 2), size(t, 3))
        else:
            shape, target = vector(1, kv_heads, n_rep, seq, head_dim), vector(1, heads, seq, head_dim)
        copies = g.op("Expand", [g.op("Unsqueeze", [t, g.const(np.array([2]))]), shape])
        return g.op("Reshape", [copies, target])

    q, k, v = split(heads * head_dim, heads), split(kv_heads * head_dim, kv_heads), split(kv_heads * head_dim, kv_heads)
    k, v = repeat(k), repeat(v)
    scores = g.op(
        "Mul",
        [
            g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]),
            g.const(np.array(1 / np.sqrt(head_dim), np.float32)),
        ],
    )
    context = g.op("Transpose", [g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3])
    merged = g.op("Reshape", [context, vector(b, s, -1) if legacy else vector(1, seq, heads * head_dim)])
    g.output(g.op("Add", [g.op("MatMul", [merged, g.weight(heads * head_dim, 6)]), g.weight(6)]))
    return g.build()


def concat_literals(model) -> list[list[int]]:
    """The literal pieces of every Concat that builds a shape, per Concat, in graph order."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [[int(inits[i][0]) for i in n.input if i in inits] for n in model.graph.node if n.op_type == "Concat"]


def expand_shapes(model) -> list[list[int]]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]].tolist() for n in model.graph.node if n.op_type == "Expand" and n.input[1] in inits]


@pytest.mark.parametrize("legacy", [False, True])
def test_gqa_removes_a_kv_head_with_its_query_heads(legacy):
    heads, kv_heads, head_dim = 6, 3, 4  # 2 query heads per KV head
    model = gqa_block(heads, kv_heads, head_dim, legacy)
    w_q, w_k, w_v = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"][:3]
    analysis = analysis_of(model)
    group = group_at(analysis, w_q, 1)
    assert group is group_at(analysis, w_k, 1) is group_at(analysis, w_v, 1)
    assert group.prunable and group.exact and group.size == kv_heads
    info = group.attention
    assert (info.kind, info.heads, info.head_dim, info.kv_heads) == ("heads", heads, head_dim, kv_heads)
    # unit of KV head g: its K/V columns and the columns of query heads 2g and 2g + 1
    q_labels = analysis.labels[next(d for d in analysis.labels if d.tensor == w_q and d.axis == 1)]
    k_labels = analysis.labels[next(d for d in analysis.labels if d.tensor == w_k and d.axis == 1)]
    assert q_labels.tolist() == np.repeat(k_labels[::head_dim], 2 * head_dim).tolist()

    result = prune_exact(model, 0.34, compensate=False)  # one KV group of three
    dense_w, pruned_w = weights(model), weights(result.model)
    kv_kept = whole_heads(kept_columns(dense_w[1], pruned_w[1]), head_dim)
    assert len(kv_kept) == 2 and whole_heads(kept_columns(dense_w[2], pruned_w[2]), head_dim) == kv_kept
    q_kept = whole_heads(kept_columns(dense_w[0], pruned_w[0]), head_dim)
    assert q_kept == [2 * g + r for g in kv_kept for r in range(2)]
    out_rows = [r for r in range(heads * head_dim) if any(np.array_equal(dense_w[-1][r], row) for row in pruned_w[-1])]
    assert whole_heads(out_rows, head_dim) == q_kept
    literals = concat_literals(result.model)
    if legacy:  # the KV count and kv * n_rep are sizes at run time: only head_dim and n_rep are literals
        assert [-1, head_dim] in literals and [2] in literals  # n_rep stays
        check_other_sizes(model, result.model)
    else:  # the Expand's KV count becomes 1 (the input's size), the merges count 4 query heads
        assert expand_shapes(result.model) == [[1, 1, 2, 5, head_dim]] * 2
        # Q split, K and V splits, the two repeat_kv merges, the output merge
        assert reshape_targets(result.model) == [[1, 5, 4, head_dim]] + [[1, 5, 2, head_dim]] * 2 + [
            [1, 4, 5, head_dim]
        ] * 2 + [[1, 5, 4 * head_dim]]


@pytest.mark.parametrize("legacy", [False, True])
def test_gqa_query_heads_mode_removes_the_same_query_head_in_every_group(legacy):
    heads, kv_heads, head_dim = 6, 2, 4  # 3 query heads per KV head
    model = gqa_block(heads, kv_heads, head_dim, legacy)
    w_q, w_k = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"][:2]
    analysis = analysis_of(model, attention="query_heads")
    group = group_at(analysis, w_q, 1)
    assert group.prunable and group.size == 3 and group.attention.kv_heads == kv_heads
    assert "K/V heads stay when query heads are the unit" in group_at(analysis, w_k, 1).frozen  # K and V keep theirs

    result = prune_exact(model, 0.34, attention="query_heads", compensate=False)
    dense_w, pruned_w = weights(model), weights(result.model)
    q_kept = whole_heads(kept_columns(dense_w[0], pruned_w[0]), head_dim)
    assert len(q_kept) == 4 and [h - 3 for h in q_kept[2:]] == q_kept[:2]  # the same two in both groups
    assert pruned_w[1].shape == dense_w[1].shape
    literals = concat_literals(result.model)
    if legacy:  # n_rep is a literal twice: in the Expand shape and in the run-time kv * n_rep
        assert [2] in literals and 2 in {
            int(initializer(result.model, n.input[1]))
            for n in result.model.graph.node
            if n.op_type == "Mul" and n.input[1] in {t.name for t in result.model.graph.initializer}
        }
        check_other_sizes(model, result.model)
    else:  # the copies: 2 of 3 in each group; the merges count 4 query heads
        assert expand_shapes(result.model) == [[1, 2, 2, 5, head_dim]] * 2
        assert reshape_targets(result.model) == [[1, 5, 4, head_dim]] + [[1, 5, 2, head_dim]] * 2 + [
            [1, 4, 5, head_dim]
        ] * 2 + [[1, 5, 4 * head_dim]]


def test_mqa_removes_query_heads_and_keeps_the_one_kv_head():
    model = gqa_block(4, 1, 3, legacy=True)
    w_q, w_k = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"][:2]
    analysis = analysis_of(model)
    group = group_at(analysis, w_q, 1)
    assert group.prunable and group.size == 4 and group.attention.heads == 4
    result = prune_exact(model, 0.5, compensate=False)
    dense_w, pruned_w = weights(model), weights(result.model)
    assert len(whole_heads(kept_columns(dense_w[0], pruned_w[0]), 3)) == 2
    assert pruned_w[1].shape == dense_w[1].shape
    check_other_sizes(model, result.model)


def kept_rows(dense: np.ndarray, pruned: np.ndarray) -> list[int]:
    return kept_columns(dense.T, pruned.T)


def _llama_sizes(exporter: str):
    # the opset-23 export's RotaryEmbedding gets cos/sin caches of batch 1, which onnxruntime
    # accepts for inputs of batch 1 only: the dense model itself fails at batch 2
    return ((1, 7), (1, 11)) if exporter == "dynamo23" else ((3, 7), (2, 11))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "dynamo23"])
def test_llama_gqa_export_loses_whole_kv_groups(attention_model, exporter):
    """8 query heads, 2 KV heads of head_dim 8: one unit is a KV head with its 4 query heads."""
    path = attention_model("tiny_llama_gqa", exporter)
    report = spa.analyze(path)
    heads = [g for g in report.groups if g.kind == "heads"]
    # the dynamo export builds every repeat_kv shape once for both layers: they lose the same KV head
    assert len(heads) == (2 if exporter == "legacy" else 1)
    assert all((g.heads, g.head_dim, g.kv_heads, g.channels, g.frozen) == (8, 8, 2, 2, None) for g in heads)
    result = spa.prune(path, ratio=0.5, compensate=False)  # compensation would refit the rows compared below
    assert result.report.validation.ok and result.report.validation.soft_equal
    dense = onnx.load(str(path))
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    pruned_w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    projections = [
        n.input[1]
        for n in dense.graph.node
        if n.op_type == "MatMul" and n.input[1] in dense_w and dense_w[n.input[1]].shape in ((64, 64), (64, 16))
    ]
    q, k, v, o = (projections[i::4] for i in range(4))  # per layer: q, k, v, o
    for layer in range(2):
        assert pruned_w[k[layer]].shape == pruned_w[v[layer]].shape == (64, 8)
        assert pruned_w[q[layer]].shape == (64, 32) and pruned_w[o[layer]].shape == (32, 64)
        kv = whole_heads(kept_columns(dense_w[k[layer]], pruned_w[k[layer]]), 8)
        assert whole_heads(kept_columns(dense_w[v[layer]], pruned_w[v[layer]]), 8) == kv
        query = [4 * g + r for g in kv for r in range(4)]
        assert whole_heads(kept_columns(dense_w[q[layer]], pruned_w[q[layer]]), 8) == query
        assert whole_heads(kept_rows(dense_w[o[layer]], pruned_w[o[layer]]), 8) == query
    if exporter == "dynamo":  # literal head counts: the Expand's KV count becomes 1, the merges count 4 heads
        literals = concat_literals(result.model)
        assert [1, 4, 8] in literals and [4, 8] in literals
    check_other_sizes(dense, result.model, _llama_sizes(exporter))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "dynamo23"])
def test_llama_gqa_query_heads_mode(attention_model, exporter):
    path = attention_model("tiny_llama_gqa", exporter)
    result = spa.prune(path, ratio=0.5, attention="query_heads")
    assert result.report.validation.ok and result.report.validation.soft_equal
    removed = [g for g in result.report.groups if g.removed]
    assert all(
        g.kind == "query_heads" and g.kv_heads == 2 and g.channels == 4 and g.removed == 2 for g in removed if g.kind
    )
    dense = onnx.load(str(path))
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    pruned_w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for name, w in dense_w.items():
        if w.shape == (64, 16):
            assert pruned_w[name].shape == (64, 16)  # K and V keep both heads
        elif w.shape == (64, 64) and pruned_w[name].shape == (64, 32):  # Q: the same 2 of 4 heads in each group
            kept = whole_heads(kept_columns(w, pruned_w[name]), 8)
            assert [h - 4 for h in kept[2:]] == kept[:2] and all(h < 4 for h in kept[:2])
    check_other_sizes(dense, result.model, _llama_sizes(exporter))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "dynamo23"])
def test_llama_mqa_export_loses_query_heads(attention_model, exporter):
    """One KV head for all 8 query heads: it cannot go, so the unit is a query head."""
    path = attention_model("tiny_llama_mqa", exporter)
    result = spa.prune(path, ratio=0.5)
    assert result.report.validation.ok and result.report.validation.soft_equal
    heads = [g for g in result.report.groups if g.kind == "heads"]
    assert heads and all(g.channels == 8 and g.removed == 4 for g in heads)
    dense = onnx.load(str(path))
    dense_w = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    pruned_w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    shapes = sorted(pruned_w[n].shape for n, w in dense_w.items() if w.shape in ((64, 64), (64, 8)))
    assert shapes == [(32, 64)] * 2 + [(64, 8)] * 4 + [(64, 32)] * 2  # o; K, V whole; Q
    check_other_sizes(dense, result.model, _llama_sizes(exporter))


def test_analyze_lists_kv_heads(attention_model):
    from click.testing import CliRunner

    from spa.cli.commands import main

    path = attention_model("tiny_llama_gqa", "legacy")
    out = CliRunner().invoke(main, ["analyze", str(path)])
    assert out.exit_code == 0, out.output
    assert out.output.count("8 heads x head_dim 8 (2 KV heads, unit: a KV head with its 4 query heads), prunable") == 2
    out = CliRunner().invoke(main, ["analyze", str(path), "--attention", "query-heads"])
    assert out.output.count("unit: one query head in each of the 2 KV groups), prunable") == 2
