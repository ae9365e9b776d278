"""Depth pruning: whole residual blocks found, scored, removed, and proved (``--remove-blocks``)."""

from __future__ import annotations

import json
from pathlib import Path

import llm_exports
import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner
from onnx import TensorProto

import spa
from spa.analysis.blocks import find_blocks
from spa.cli.commands import main
from spa.core import decoder
from spa.core.runtime import run, sample_inputs
from spa.formats.checker import checker_complaint
from spa.transforms.depth import remove_blocks

KV, HEADS, SIZE, HIDDEN, VOCAB = 2, 4, 8, 32, 40


def _norm(g: Graph, x: str) -> str:
    return g.op("LayerNormalization", [x, g.const(np.ones(HIDDEN, np.float32)), g.const(np.zeros(HIDDEN, np.float32))])


def _decoder(layers: int = 3, quiet: int | None = None) -> onnx.ModelProto:
    """A pre-norm decoder with its cache as graph I/O: per layer ``h = x + Attn(Norm(x))`` and
    ``y = h + MLP(Norm(h))``; layer ``quiet`` has branches scaled near zero (``f(x) ~ 0``)."""
    g = Graph(seed=3)
    ids = g.input("input_ids", ["batch_size", "sequence_length"], TensorProto.INT64)
    mask = g.input("attention_mask", ["batch_size", "total_sequence_length"], TensorProto.INT64)
    ones = g.op("ReduceSum", [mask, g.const(np.array([1], np.int64))], keepdims=0)
    seqlens = g.op("Cast", [g.op("Sub", [ones, g.const(np.array(1, np.int64))])], to=TensorProto.INT32)
    total = g.op("Gather", [g.op("Shape", [mask]), g.const(np.array(1, np.int64))], axis=0)
    total = g.op("Cast", [total], to=TensorProto.INT32)
    x = g.op("Gather", [g.weight(VOCAB, HIDDEN), ids], axis=0)
    presents = []
    for layer in range(layers):
        scale = 1e-4 if layer == quiet else 0.3
        cache = ["batch_size", KV, "past_sequence_length", SIZE]
        past = [g.input(f"past_key_values.{layer}.{kind}", cache) for kind in ("key", "value")]
        n = _norm(g, x)
        projections = [g.op("MatMul", [n, g.weight(HIDDEN, k * SIZE)]) for k in (HEADS, KV, KV)]
        a, key, value = g.op(
            "GroupQueryAttention",
            [*projections, *past, seqlens, total],
            n_out=3,
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=KV,
        )
        x = g.op("Add", [x, g.op("MatMul", [a, g.weight(HEADS * SIZE, HIDDEN, low=-scale, high=scale)])])
        up = g.op("Relu", [g.op("MatMul", [_norm(g, x), g.weight(HIDDEN, 2 * HIDDEN)])])
        x = g.op("Add", [x, g.op("MatMul", [up, g.weight(2 * HIDDEN, HIDDEN, low=-scale, high=scale)])])
        presents += [(key, f"present.{layer}.key"), (value, f"present.{layer}.value")]
    logits = g.op("MatMul", [_norm(g, x), g.weight(HIDDEN, VOCAB)])
    for tensor in [logits, *(t for t, _ in presents)]:
        g.output(tensor)
    model = g.build()
    for old, new in [(logits, "logits"), *presents]:
        for node in model.graph.node:
            node.input[:] = [new if i == old else i for i in node.input]
            node.output[:] = [new if o == old else o for o in node.output]
        for out in model.graph.output:
            out.name = new if out.name == old else out.name
    return model


def _resnet(projection: bool = True) -> onnx.ModelProto:
    """A stem, two identity blocks ``Relu(x + f(x))``, then a block whose shortcut is a 1x1 conv."""
    g = Graph(seed=5)
    x = g.op("Relu", [g.conv(g.input("image", [1, 3, 8, 8]), 3, 8)])
    for scale in (0.5, 1e-4):
        f = g.op("Conv", [g.op("Relu", [g.conv(x, 8, 8)]), g.weight(8, 8, 3, 3, low=-scale, high=scale)], pads=[1] * 4)
        x = g.op("Relu", [g.op("Add", [x, f])])
    if projection:
        f = g.conv(g.op("Relu", [g.conv(x, 8, 16)]), 16, 16)
        x = g.op("Relu", [g.op("Add", [g.conv(x, 8, 16, k=1), f])])
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    g.output(g.op("Gemm", [pooled, g.weight(10, 16 if projection else 8)], transB=1))
    return g.build()


def test_a_decoder_loses_one_of_three_layers_with_its_cache_renumbered():
    model = _decoder(quiet=1)
    result = spa.prune(model, remove_blocks=1)
    depth = result.report.depth
    assert [b["layer"] for b in depth["removed"]] == [1]  # the planted near-identity layer
    assert depth["shifted"] == 0  # no data: nothing to measure a mean on
    assert depth["checks"]["decode_checked"] and depth["checks"]["soft_max_rel_error"] <= 1e-4
    assert result.report.validation.ok, result.report.validation.problems
    names = [i.name for i in result.model.graph.input]
    assert [n for n in names if n.startswith("past")] == [
        f"past_key_values.{k}.{kind}" for k in (0, 1) for kind in ("key", "value")
    ]
    assert {o.name for o in result.model.graph.output} == {"logits"} | {
        f"present.{k}.{kind}" for k in (0, 1) for kind in ("key", "value")
    }
    assert sum(n.op_type == "GroupQueryAttention" for n in result.model.graph.node) == 2
    first, second = decoder.rollout(result.model, lambda feed: run(result.model, feed))
    assert np.isfinite(first["logits"]).all() and np.isfinite(second["logits"]).all()
    assert result.report.params_after < result.report.params_before


def test_block_influence_picks_the_near_identity_block_of_each_model():
    for model, quiet in ((_decoder(quiet=2), 2), (_decoder(quiet=0), 0)):
        depth = spa.prune(model, remove_blocks=1).report.depth
        assert [b["layer"] for b in depth["removed"]] == [quiet]
        scores = {b["layer"]: b["score"] for b in depth["blocks"]}
        assert scores[quiet] < 0.01 < min(s for layer, s in scores.items() if layer != quiet)


def test_removal_equals_zeroing_the_branches():
    model = spa.load(_decoder()).proto
    chosen = [find_blocks(model).blocks[1]]
    hard, soft = remove_blocks(model, chosen), remove_blocks(model, chosen, soft=True)
    feed = sample_inputs(soft, 1)
    kept = {i.name for i in hard.graph.input}
    hard_out = run(hard, {k: v for k, v in feed.items() if k in kept})
    soft_out = run(soft, feed)
    np.testing.assert_allclose(hard_out["logits"], soft_out["logits"], rtol=1e-5, atol=1e-5)
    # the layer after the removed one writes its cache under the removed one's number
    np.testing.assert_allclose(hard_out["present.1.key"], soft_out["present.2.key"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(soft_out["logits"], run(model, feed)["logits"], atol=1e-3)


def test_the_soft_result_keeps_every_block_zeroed():
    model = _decoder(quiet=1)
    soft = spa.prune(model, remove_blocks=1, soft=True)
    hard = spa.prune(model, remove_blocks=1)
    assert len(soft.model.graph.input) == len(model.graph.input)
    feed = sample_inputs(soft.model, 2)
    kept = {i.name for i in hard.model.graph.input}
    np.testing.assert_allclose(
        run(soft.model, feed)["logits"],
        run(hard.model, {k: v for k, v in feed.items() if k in kept})["logits"],
        atol=1e-5,
    )


def test_identity_blocks_of_a_cnn_are_removable_and_a_projection_block_is_not():
    blocks = find_blocks(spa.load(_resnet()).proto).blocks
    assert [b.removable for b in blocks] == [True, True, False]
    assert "projection shortcut" in blocks[2].reason
    result = spa.prune(_resnet(), remove_blocks=1)
    assert [b["index"] for b in result.report.depth["removed"]] == [1]  # the one scaled near zero
    assert result.report.validation.ok and result.report.depth["checks"]["soft_max_rel_error"] <= 1e-4
    assert sum(n.op_type == "Add" for n in result.model.graph.node) == 2


def test_a_block_over_a_signed_input_is_not_removable_under_a_relu():
    g = Graph()
    x = g.conv(g.input("image", [1, 4, 6, 6]), 4, 4)  # no Relu: x can be negative
    y = g.op("Relu", [g.op("Add", [x, g.conv(g.op("Relu", [g.conv(x, 4, 4)]), 4, 4)])])
    g.output(y)
    (block,) = find_blocks(spa.load(g.build()).proto).blocks
    assert not block.removable and "Relu(x) is not x" in block.reason


def test_post_norm_layers_are_listed_as_not_removable():
    g = Graph()
    x = g.input("x", [1, 5, 16])
    for _ in range(2):
        f = g.op("MatMul", [g.op("Relu", [g.op("MatMul", [x, g.weight(16, 32)])]), g.weight(32, 16)])
        x = g.op(
            "LayerNormalization",
            [g.op("Add", [x, f]), g.const(np.ones(16, np.float32)), g.const(np.zeros(16, np.float32))],
        )
    g.output(x)
    blocks = find_blocks(spa.load(g.build()).proto).blocks
    # the first block's input is not normalized, but its sum, normalized, is the stream
    assert len(blocks) == 2 and all("post-norm" in (b.reason or "") for b in blocks)


def test_more_blocks_than_removable_is_a_usage_error():
    with pytest.raises(spa.UsageError if hasattr(spa, "UsageError") else Exception, match="removable"):
        spa.prune(_resnet(), remove_blocks=3)
    with pytest.raises(Exception, match="remove-blocks"):
        spa.prune(_resnet(), remove_blocks=1.5)


def test_a_fraction_counts_the_removable_blocks_and_random_is_seeded():
    a = spa.prune(_decoder(), remove_blocks=0.34, block_score="random", seed=4).report.depth
    b = spa.prune(_decoder(), remove_blocks=0.34, block_score="random", seed=4).report.depth
    assert len(a["removed"]) == 1 and a["removed"] == b["removed"]


def test_analyze_lists_the_blocks_with_scores_and_reasons(tmp_path):
    path = tmp_path / "resnet.onnx"
    onnx.save(_resnet(), path)
    out = tmp_path / "analysis.json"
    done = CliRunner().invoke(main, ["analyze", str(path), "--json", str(out)])
    assert done.exit_code == 0, done.output
    blocks = json.loads(out.read_text())["blocks"]
    assert [b["removable"] for b in blocks] == [True, True, False]
    assert blocks[1]["score"] < blocks[0]["score"] and blocks[2]["score"] is None
    assert "projection shortcut" in blocks[2]["reason"]


def test_the_cli_removes_blocks_and_reports_them(tmp_path):
    path = tmp_path / "decoder.onnx"
    onnx.save(_decoder(quiet=0), path)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 3,
                "layer_types": ["full", "sliding", "full"],
                "max_window_layers": 2,
                "hidden_size": HIDDEN,
            }
        )
    )
    out = tmp_path / "out" / "decoder.onnx"
    out.parent.mkdir()
    done = CliRunner().invoke(
        main,
        ["prune", str(path), "--remove-blocks", "1", "--no-bench", "-o", str(out), "--json", str(tmp_path / "r.json")],
    )
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["options"]["remove_blocks"] == 1 and report["groups_pruned"] == 0  # depth alone: --ratio 0
    config = json.loads((out.parent / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["layer_types"] == ["sliding", "full"]
    assert config["max_window_layers"] == 1 and config["hidden_size"] == HIDDEN
    # run again over it: the config beside the new model describes the new model, not the old one
    again = ["prune", str(path), "--remove-blocks", "2", "--no-bench", "-o", str(out), "--force"]
    done = CliRunner().invoke(main, again)
    assert done.exit_code == 0, done.output
    assert json.loads((out.parent / "config.json").read_text())["num_hidden_layers"] == 1
    # another model into that folder without --force: the config there is kept, and the user told
    other = ["prune", str(path), "--remove-blocks", "1", "--no-bench", "-o", str(out.parent / "other.onnx")]
    done = CliRunner().invoke(main, other)
    assert done.exit_code == 0, done.output
    assert "config.json: kept the one already there" in done.output
    assert json.loads((out.parent / "config.json").read_text())["num_hidden_layers"] == 1
    soft = tmp_path / "soft" / "decoder.onnx"
    soft.parent.mkdir()
    done = CliRunner().invoke(
        main, ["prune", str(path), "--remove-blocks", "1", "--soft", "--no-bench", "-o", str(soft)]
    )
    assert done.exit_code == 0, done.output
    assert json.loads((soft.parent / "config.json").read_text())["num_hidden_layers"] == 3  # every layer kept, zeroed


def _zoo_genai() -> Path:
    return llm_exports.genai("llama-genai-fp32")


def test_the_genai_export_loses_a_layer_and_generates(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    source = _zoo_genai()
    # a block is a whole layer: the fused skip norm that ends it also holds the MLP's residual add
    blocks = find_blocks(spa.load(source).proto).blocks
    assert [b.layer for b in blocks] == [0, 1, 2, 3]
    assert all(any("/mlp/" in n for n in b.nodes) and any("/attn/" in n for n in b.nodes) for b in blocks)
    done = CliRunner().invoke(
        main, ["prune", str(source), "--remove-blocks", "1", "--no-bench", "-o", str(tmp_path / "model.onnx")]
    )
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]
    assert config["num_hidden_layers"] == 3
    pruned = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "GroupQueryAttention" for n in pruned.graph.node) == 3
    assert [i.name for i in pruned.graph.input if i.name.endswith(".key")] == [
        f"past_key_values.{k}.key" for k in range(3)
    ]
    import llm_zoo

    tokens = llm_zoo.generate(tmp_path)
    assert len(tokens) == 8 and all(0 <= t < 512 for t in tokens)


def test_sub_blocks_are_attention_and_mlp_apart_and_a_unit_keeps_one_kind_removable():
    model = _decoder()
    assert [b.kind for b in find_blocks(model, "sublayer").blocks] == ["attention", "MLP"] * 3
    assert all(b.removable for b in find_blocks(model, "sublayer").blocks)
    for unit, kind in (("attention", "attention"), ("mlp", "MLP")):
        blocks = find_blocks(model, unit).blocks
        assert [b.removable for b in blocks] == [b.kind == kind for b in blocks]
        assert all(unit in b.reason for b in blocks if not b.removable)
    # the MLP sub-block reads no cache; the attention one reads its layer's
    assert [b.layer for b in find_blocks(model, "sublayer").blocks] == [0, None, 1, None, 2, None]


@pytest.mark.parametrize("unit", ["attention", "mlp"])
def test_a_sub_block_goes_alone_and_the_cache_follows_only_attention(unit):
    result = spa.prune(_decoder(quiet=1), remove_blocks=1, block_unit=unit)
    depth = result.report.depth
    assert depth["checks"]["decode_checked"] and depth["checks"]["soft_max_rel_error"] <= 1e-4
    assert result.report.validation.ok, result.report.validation.problems
    assert result.report.options["block_unit"] == unit
    nodes = result.model.graph.node
    attentions, matmuls = (
        sum(n.op_type == "GroupQueryAttention" for n in nodes),
        sum(n.op_type == "MatMul" for n in nodes),
    )
    past = [i.name for i in result.model.graph.input if i.name.startswith("past")]
    if unit == "attention":  # layer 1's attention and its cache go; every MLP stays
        assert depth["removed_layers"] == [1] and attentions == 2 and matmuls == 3 * 6 + 1 - 4
        assert past == [f"past_key_values.{k}.{kind}" for k in (0, 1) for kind in ("key", "value")]
    else:  # one MLP goes; every attention and cache stays
        assert depth["removed_layers"] == [] and attentions == 3 and matmuls == 3 * 6 + 1 - 2
        assert len(past) == 6
    first, second = decoder.rollout(result.model, lambda feed: run(result.model, feed))
    assert np.isfinite(first["logits"]).all() and np.isfinite(second["logits"]).all()


@pytest.mark.parametrize("unit", ["attention", "mlp"])
def test_the_genai_export_loses_a_sub_block_and_generates(tmp_path, unit):
    pytest.importorskip("onnxruntime_genai")
    source = _zoo_genai()
    done = CliRunner().invoke(
        main,
        [
            "prune",
            str(source),
            "--remove-blocks",
            "1",
            "--block-unit",
            unit,
            "--no-bench",
            "-o",
            str(tmp_path / "model.onnx"),
        ],
    )
    assert done.exit_code == 0, done.output
    # the runtime's layer count is its cache count: it drops with an attention sub-block only
    config = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]
    assert config["num_hidden_layers"] == (3 if unit == "attention" else 4)
    pruned = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    attentions = sum(n.op_type == "GroupQueryAttention" for n in pruned.graph.node)
    mlps = sum(n.op_type == "MatMul" and "/mlp/" in n.name for n in pruned.graph.node)
    assert (attentions, mlps) == ((3, 12) if unit == "attention" else (4, 9))
    import llm_zoo

    tokens = llm_zoo.generate(tmp_path)
    assert len(tokens) == 8 and all(0 <= t < 512 for t in tokens)


@pytest.mark.parametrize("unit", ["layer", "mlp"])
def test_with_calibration_a_removed_block_adds_back_its_mean_and_moves_the_outputs_less(tmp_path, unit):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, VOCAB, (96, 12)).astype(np.int64))
    runs = {
        compensate: spa.prune(
            _decoder(), remove_blocks=1, block_unit=unit, calib=calib, calib_samples=32, compensate=compensate
        ).report.depth
        for compensate in (True, False)
    }
    assert runs[True]["removed"] == runs[False]["removed"]  # the same block goes either way
    assert runs[True]["shifted"] == 1 and runs[False]["shifted"] == 0
    assert runs[True]["checks"]["soft_max_rel_error"] <= 1e-4  # removal still equals masking
    error = {c: run["fidelity"]["outputs"]["logits"]["relative_error"] for c, run in runs.items()}
    assert error[True] < error[False]


def test_means_that_move_the_outputs_more_than_plain_removal_are_left_out(tmp_path, monkeypatch):
    import spa.pipeline.depth as depth_stage

    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, VOCAB, (96, 12)).astype(np.int64))
    measured = depth_stage.measure_blocks

    def wrong_means(*args, **kwargs):  # a mean far off what the block adds: it must not be kept
        noise = np.random.default_rng(1)
        stats = measured(*args, **kwargs)
        stats.shifts = {i: (50 * noise.standard_normal(v.shape)).astype(v.dtype) for i, v in stats.shifts.items()}
        return stats

    monkeypatch.setattr(depth_stage, "measure_blocks", wrong_means)
    depth = spa.prune(_decoder(), remove_blocks=1, calib=calib, calib_samples=32).report.depth
    assert depth["shifted"] == 0 and depth["shift_errors"]["shifted"] > depth["shift_errors"]["plain"]
    plain = spa.prune(_decoder(), remove_blocks=1, calib=calib, calib_samples=32, compensate=False).report.depth
    assert plain["fidelity"] == depth["fidelity"]  # the model written is plain removal's


def test_adjacent_fused_layers_go_together_with_their_means_and_removal_equals_masking():
    """Two neighbouring layers of the builder's export: the second's input is the first's fused
    norm sum, which stops existing when the first goes; its mean must still be added after it."""
    model = spa.load(_zoo_genai()).proto
    first, second = find_blocks(model).removable[:2]
    hidden = next(t.dims[-1] for t in model.graph.initializer if "embed_tokens" in t.name)
    shifts = {b.index: np.full(hidden, 0.01 * (b.index + 1), np.float32) for b in (first, second)}
    hard = remove_blocks(model, [first, second], shifts=shifts)
    soft = remove_blocks(model, [first, second], soft=True, shifts=shifts)
    assert checker_complaint(hard, full_check=True) is None
    feed = sample_inputs(soft, 1)
    kept = {i.name for i in hard.graph.input}
    hard_out, soft_out = run(hard, {k: v for k, v in feed.items() if k in kept}), run(soft, feed)
    np.testing.assert_allclose(hard_out["logits"], soft_out["logits"], rtol=1e-4, atol=1e-4)
    unshifted = run(remove_blocks(model, [first, second]), {k: v for k, v in feed.items() if k in kept})
    assert not np.allclose(unshifted["logits"], hard_out["logits"], atol=1e-4)  # the means are in


def test_depth_and_width_share_one_params_target():
    model = _decoder(quiet=1)
    report = spa.prune(model, remove_blocks=1, target_params=0.6, round_to=1).report
    assert report.depth["removed"][0]["layer"] == 1 and report.groups_pruned > 0
    assert report.params_after <= 0.6 * report.params_before
    assert 0 < report.depth["width_target"] < 1


def test_a_decoder_losing_a_layer_and_its_cache_is_timed_for_a_latency_target():
    # the model the blocks left no longer reads the removed layer's cache: it is timed without it
    report = spa.prune(_decoder(quiet=1), remove_blocks=1, target_latency=0.3, allow_slower=True).report
    assert report.depth["removed_layers"] == [1] and report.depth["latency_fraction"] > 0
    assert report.validation.ok, report.validation.problems


def test_a_removed_blocks_mean_is_the_mean_of_what_it_added(tmp_path):
    """A planted MLP that adds ``c`` plus almost nothing: its measured mean is ``c``."""
    from spa.scoring.blocks import block_shifts
    from spa.scoring.statistics import load_calibration

    model = spa.load(_decoder(quiet=1)).proto
    block = next(b for b in find_blocks(model, "mlp").removable if b.index == 3)  # layer 1's MLP (quiet)
    planted = np.linspace(-1, 1, HIDDEN).astype(np.float32)
    exit = next(n for n in model.graph.node if n.name == block.exit.node)
    model.graph.initializer.append(onnx.numpy_helper.from_array(planted, "planted"))
    model.graph.node.insert(
        list(model.graph.node).index(exit), onnx.helper.make_node("Add", [block.exit.branch, "planted"], ["biased"])
    )
    exit.input[:] = ["biased" if i == block.exit.branch else i for i in exit.input]
    block = next(b for b in find_blocks(model, "mlp").removable if b.index == 3)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, VOCAB, (16, 12)).astype(np.int64))
    shift = block_shifts(model, [block], load_calibration(calib, model, 16))[3]
    np.testing.assert_allclose(shift, planted, atol=2e-3)


def test_depth_and_width_share_one_latency_target():
    """The blocks' share of the latency is timed, and the width search is asked for the rest."""
    report = spa.prune(_resnet(), remove_blocks=1, target_latency=0.05, allow_slower=True).report
    depth = report.depth
    assert depth["removed"] and 0 < depth["latency_fraction"]
    # a target no removal of one block reaches: the width cut is asked for what is left of it
    assert depth["width_target"] == pytest.approx(0.05 / depth["latency_fraction"])
    assert report.target.metric == "latency" and report.target.goal == pytest.approx(depth["width_target"])
    assert report.groups_pruned > 0


def test_a_fused_post_norm_encoder_is_not_removable():
    """BERT as onnxruntime's optimizer fuses it: SkipLayerNormalization's first output is the stream."""
    g = Graph()
    x = g.input("x", [1, 5, 16])
    gamma, beta = g.const(np.ones(16, np.float32)), g.const(np.zeros(16, np.float32))
    x = g.op("LayerNormalization", [x, gamma, beta])
    for _ in range(2):
        f = g.op("MatMul", [g.op("Relu", [g.op("MatMul", [x, g.weight(16, 32)])]), g.weight(32, 16)])
        x = g.op("SkipLayerNormalization", [x, f, gamma, beta], domain="com.microsoft")
    g.output(x)
    blocks = find_blocks(spa.load(g.build()).proto).blocks
    assert len(blocks) == 2 and all("post-norm" in (b.reason or "") for b in blocks)


def test_optimum_layer_zero_goes_and_its_past_length_is_read_from_a_kept_layer():
    path = llm_exports.optimum("llama-optimum")
    model = spa.load(path).proto
    blocks = find_blocks(model).blocks
    assert [b.removable for b in blocks] == [True] * 4
    hard = remove_blocks(model, [blocks[0]])
    first, second = decoder.rollout(hard, lambda feed: run(hard, feed))
    assert np.isfinite(second["logits"]).all()
    assert [i.name for i in hard.graph.input if i.name.endswith(".key")] == [
        f"past_key_values.{k}.key" for k in range(3)
    ]


def _encoder() -> onnx.ModelProto:
    """A pre-norm encoder whose last layer's output is the graph output: softmax attention, an MLP."""
    g = Graph(seed=7)
    x = g.input("x", [1, 6, HIDDEN])
    for _ in range(2):
        n = _norm(g, x)
        q, k, v = (g.op("MatMul", [n, g.weight(HIDDEN, HIDDEN)]) for _ in range(3))
        scores = g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])])], axis=-1)
        x = g.op("Add", [x, g.op("MatMul", [g.op("MatMul", [scores, v]), g.weight(HIDDEN, HIDDEN)])])
        up = g.op("Relu", [g.op("MatMul", [_norm(g, x), g.weight(HIDDEN, 2 * HIDDEN)])])
        x = g.op("Add", [x, g.op("MatMul", [up, g.weight(2 * HIDDEN, HIDDEN)])])
    g.output(x)
    return g.build()


def test_an_encoders_last_layer_goes_and_its_output_keeps_its_name():
    model = spa.load(_encoder()).proto
    blocks = find_blocks(model).blocks
    assert [b.kind for b in blocks] == ["transformer layer"] * 2 and all(b.removable for b in blocks)
    hard, soft = remove_blocks(model, [blocks[1]]), remove_blocks(model, [blocks[1]], soft=True)
    assert [o.name for o in hard.graph.output] == [o.name for o in model.graph.output]
    assert sum(n.op_type == "Softmax" for n in hard.graph.node) == 1
    feed = sample_inputs(model, 3)
    np.testing.assert_allclose(
        run(hard, feed)[model.graph.output[0].name], run(soft, feed)[model.graph.output[0].name], atol=1e-5
    )
    result = spa.prune(_encoder(), remove_blocks=1, ratio=0.3, soft=True)
    assert result.report.validation.ok and len(result.model.graph.output) == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--remove-blocks", "3"], "only 2 removable"),
        (["--remove-blocks", "1.5"], "whole number"),
        (["--remove-blocks", "0"], "whole number"),
    ],
)
def test_bad_block_counts_fail_cleanly_and_write_nothing(tmp_path, flags, message):
    from test_bad_input import assert_clean_failure, save

    path, digest = save(_resnet(), tmp_path)
    done = CliRunner().invoke(main, ["prune", str(path), "--no-bench", *flags])
    assert_clean_failure(done, 2, tmp_path, path, digest)
    assert message in done.output


def test_a_model_without_residual_blocks_is_refused_with_the_reason(tmp_path):
    from test_bad_input import assert_clean_failure, save

    g = Graph()
    g.output(g.op("Relu", [g.conv(g.input("x", [1, 3, 4, 4]), 3, 4)]))
    path, digest = save(g.build(), tmp_path)
    done = CliRunner().invoke(main, ["prune", str(path), "--no-bench", "--remove-blocks", "1"])
    assert_clean_failure(done, 2, tmp_path, path, digest)
    assert "no removable residual block" in done.output


def test_blocks_removed_are_written_even_where_no_channel_group_is_prunable(tmp_path):
    path = tmp_path / "resnet.onnx"
    onnx.save(_resnet(), path)
    out = tmp_path / "out.onnx"
    done = CliRunner().invoke(
        main, ["prune", str(path), "--remove-blocks", "1", "--exclude", "*", "--no-bench", "-o", str(out)]
    )
    assert done.exit_code == 0, done.output
    assert sum(n.op_type == "Add" for n in onnx.load(str(out)).graph.node) == 2


@pytest.fixture(scope="module")
def attention_model():
    import zoo
    from conftest import zoo_dir

    pytest.importorskip("transformers")
    return lambda name, exporter: zoo.export_attention(name, exporter, zoo_dir())


@pytest.mark.parametrize(
    "name, exporter", [("tiny_llama_gqa", "legacy"), ("tiny_llama_gqa", "dynamo"), ("tiny_vit", "dynamo")]
)
def test_torch_exports_of_pre_norm_transformers_lose_a_layer(attention_model, name, exporter):
    """TorchScript and dynamo exports: the mask added to the scores (broadcast over the heads) is no
    residual stream, however much of the graph it depends on."""
    path = attention_model(name, exporter)
    blocks = find_blocks(spa.load(path).proto).blocks
    assert [b.kind for b in blocks] == ["transformer layer"] * 2 and all(b.removable for b in blocks)
    result = spa.prune(path, remove_blocks=1)
    assert result.report.validation.ok and result.report.depth["checks"]["soft_max_rel_error"] <= 1e-4


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "ort"])
def test_bert_exports_are_post_norm_and_not_removable(attention_model, exporter):
    blocks = find_blocks(spa.load(attention_model("tiny_bert", exporter)).proto).blocks
    assert len(blocks) == 2 and all("post-norm" in (b.reason or "") for b in blocks)


def test_two_reads_of_one_projection_are_no_projection_shortcut():
    """GELU's tanh form adds x and 0.044715 x^3 of one projection x: not two computed paths."""
    g = Graph()
    x = g.op("MatMul", [g.input("x", [1, 4, 8]), g.weight(8, 8)])
    cubed = g.op("Mul", [g.const(np.float32(0.044715)), g.op("Pow", [x, g.const(np.float32(3))])])
    g.output(g.op("MatMul", [g.op("Tanh", [g.op("Add", [x, cubed])]), g.weight(8, 8)]))
    assert find_blocks(spa.load(g.build()).proto).blocks == []
