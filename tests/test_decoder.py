"""Decoder LLMs with their key/value cache as graph I/O: the feeds spa makes up for them, and
pruning the models onnxruntime-genai's builder and Optimum export (tools/llm_zoo.py)."""

from __future__ import annotations

import json

import llm_exports
import numpy as np
import onnx
import pytest
from builder import Graph
from onnx import TensorProto

import spa
from spa.core import decoder
from spa.core.runtime import run, sample_inputs

KV, HEADS, SIZE, HIDDEN = 2, 4, 8, 16


def _decoder(layers: int = 2, packed: bool = False, heads: int = HEADS) -> onnx.ModelProto:
    """A decoder as onnxruntime-genai lays one out: token ids through an embedding, per layer a
    GroupQueryAttention reading ``past_key_values.N.key/value`` (head size a free axis) and writing
    ``present.N.key/value``, the mask over past and new tokens turned into its sequence lengths."""
    g = Graph()
    ids = g.input("input_ids", ["batch_size", "sequence_length"], TensorProto.INT64)
    mask = g.input("attention_mask", ["batch_size", "total_sequence_length"], TensorProto.INT64)
    ones = g.op("ReduceSum", [mask, g.const(np.array([1], np.int64))], keepdims=0)
    seqlens = g.op("Cast", [g.op("Sub", [ones, g.const(np.array(1, np.int64))])], to=TensorProto.INT32)
    total = g.op("Gather", [g.op("Shape", [mask]), g.const(np.array(1, np.int64))], axis=0)
    total = g.op("Cast", [total], to=TensorProto.INT32)
    x = g.op("Gather", [g.weight(32, HIDDEN), ids], axis=0)
    presents = []
    for layer in range(layers):
        cache = ["batch_size", KV, "past_sequence_length", "kv_cache_dim"]
        past = [g.input(f"past_key_values.{layer}.{kind}", cache) for kind in ("key", "value")]
        if packed:  # as onnxruntime-genai's builder fuses them: one projection and its bias
            qkv = g.op(
                "Add",
                [g.op("MatMul", [x, g.weight(HIDDEN, (heads + 2 * KV) * SIZE)]), g.weight((heads + 2 * KV) * SIZE)],
            )
            projections = [qkv, "", ""]
        else:
            projections = [g.op("MatMul", [x, g.weight(HIDDEN, n * SIZE)]) for n in (heads, KV, KV)]
        a, key, value = g.op(
            "GroupQueryAttention",
            [*projections, *past, seqlens, total],
            n_out=3,
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=KV,
        )
        x = g.op("Add", [x, g.op("MatMul", [a, g.weight(heads * SIZE, HIDDEN)])])
        presents += [(key, f"present.{layer}.key"), (value, f"present.{layer}.value")]
    logits = g.op("MatMul", [x, g.weight(HIDDEN, 32)])
    for tensor in [logits, *(t for t, _ in presents)]:
        g.output(tensor)
    model = g.build()
    for old, new in [(logits, "logits"), *presents]:  # named as the exporters name them
        for node in model.graph.node:
            node.input[:] = [new if i == old else i for i in node.input]
            node.output[:] = [new if o == old else o for o in node.output]
        for out in model.graph.output:
            out.name = new if out.name == old else out.name
    return model


def test_the_cache_is_sized_from_the_attention_op_and_the_mask_spans_past_and_new_tokens():
    model = _decoder()
    cache = decoder.layout(model)
    assert cache is not None and set(cache.heads.values()) == {(KV, SIZE)}  # head size from the projection's width
    feed = decoder.feed(model, cache, 1, 5, 3, np.random.default_rng(0))
    assert feed["past_key_values.0.key"].shape == (1, KV, 5, SIZE)
    assert feed["attention_mask"].shape == (1, 8) and feed["input_ids"].shape == (1, 3)
    assert feed["input_ids"].max() < 32  # ids the embedding holds
    outputs = run(model, feed)
    assert outputs["logits"].shape == (1, 3, 32) and outputs["present.0.key"].shape == (1, KV, 8, SIZE)


def test_the_made_up_feed_is_a_prompt_the_model_runs():
    model = _decoder()
    feed = sample_inputs(model, batch=2)
    assert feed["past_key_values.0.key"].shape == (2, KV, 0, SIZE)
    assert feed["attention_mask"].shape == feed["input_ids"].shape == (2, decoder.NEW)
    assert run(model, feed)["logits"].shape == (2, decoder.NEW, 32)


def test_given_sizes_set_the_past_and_the_new_tokens_together():
    model = _decoder()
    feed = sample_inputs(model, shapes={"input_ids": [1, 3], "past_key_values.0.key": [1, KV, 5, SIZE]})
    assert feed["attention_mask"].shape == (1, 8) and feed["past_key_values.1.value"].shape == (1, KV, 5, SIZE)
    run(model, feed)


def test_a_prefill_then_a_decode_step_fed_its_own_cache():
    model = _decoder()
    first, second = decoder.rollout(model, lambda feed: run(model, feed))
    assert first["present.1.key"].shape == (1, KV, decoder.NEW, SIZE)
    assert second["logits"].shape == (1, 1, 32) and second["present.1.key"].shape == (1, KV, decoder.NEW + 1, SIZE)


def test_a_decoder_prunes_with_statistics_and_a_validated_decode_step():
    result = spa.prune(_decoder(), ratio=0.3)
    report = result.report
    assert report.validation.ok, report.validation.problems
    assert report.validation.decode_checked
    assert report.params_after < report.params_before
    assert "no statistics" not in str(report.as_dict())


@pytest.mark.parametrize("packed", [False, True])
def test_heads_prune_with_the_cache_in_graph_io(packed):
    dense = _decoder(packed=packed)
    result = spa.prune(dense, ratio=0.5)
    validation = result.report.validation
    assert validation.ok and validation.decode_checked and validation.soft_equal, validation.problems
    attention = [n for n in result.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert [(node_attr_of(n, "num_heads"), node_attr_of(n, "kv_num_heads")) for n in attention] == [(2, 1)] * 2
    cache = [i for i in result.model.graph.input if i.name.startswith("past_key_values")]
    assert {i.type.tensor_type.shape.dim[1].dim_value for i in cache} == {1}
    changed = {line.split(":")[0] for line in validation.changed_io}
    assert changed == {
        f"{kind}.{layer}.{part}"
        for kind in ("past_key_values", "present")
        for layer in (0, 1)
        for part in ("key", "value")
    }
    first, second = decoder.rollout(result.model, lambda feed: run(result.model, feed))
    assert second["present.0.key"].shape == (1, 1, decoder.NEW + 1, SIZE)


def node_attr_of(node: onnx.NodeProto, name: str) -> int:
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_packed_qkv_is_split_into_the_same_projections():
    from spa.formats.packed_qkv import split_packed_qkv

    dense = _decoder(packed=True)
    split = split_packed_qkv(onnx.ModelProto.FromString(dense.SerializeToString()))
    assert [n.op_type for n in split.graph.node].count("MatMul") == 2 * 3 + 2 * 1 + 1
    first, second = decoder.rollout(dense, lambda feed: run(dense, feed))
    split_first, split_second = decoder.rollout(split, lambda feed: run(split, feed))
    for a, b in ((first, split_first), (second, split_second)):
        assert all(np.allclose(a[name], b[name], rtol=1e-5, atol=1e-6) for name in a)


# ---------------------------------------------------------------- the exporters' own models


@pytest.fixture(scope="module")
def llm_zoo():
    import llm_zoo

    return llm_zoo


def _genai(llm_zoo, name: str):
    return llm_exports.genai(name)


def _optimum(llm_zoo, name: str):
    return llm_exports.optimum(name)


@pytest.mark.parametrize("name", ["llama-genai-fp32", "qwen2-genai-int4"])
def test_genai_exports_run_on_spa_feeds(llm_zoo, name):
    path = _genai(llm_zoo, name)
    model = onnx.load(str(path), load_external_data=False)
    cache = decoder.layout(model)
    assert cache is not None and set(cache.heads.values()) == {(2, 32)}
    result = spa.prune(path, ratio=0.3)
    validation = result.report.validation
    assert validation.dense_runs and validation.runs and validation.decode_checked, validation.problems


def test_genai_fp32_prunes_heads_with_statistics(llm_zoo):
    result = spa.prune(_genai(llm_zoo, "llama-genai-fp32"), ratio=0.3, attention="heads")
    report = result.report
    assert report.validation.ok and report.validation.decode_checked, report.validation.problems
    assert report.params_after < report.params_before
    assert "no statistics" not in str(report.as_dict())
    attention = [n for n in result.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(node_attr_of(n, "num_heads") < 8 for n in attention)
    assert report.validation.changed_io and all(
        line.startswith(("past_key_values.", "present.")) for line in report.validation.changed_io
    )


@pytest.mark.parametrize("name", ["llama-optimum", "phi3-optimum"])
def test_optimum_export_prunes_heads(llm_zoo, name):
    """Optimum appends the new keys and values to the cache with Concat, and repeats the KV heads
    for their query heads with Expand and Reshape; Phi3 rotates part of each head (Slice, Concat
    along head_dim) and packs Q, K and V in one projection: heads are followed through all."""
    result = spa.prune(_optimum(llm_zoo, name), ratio=0.3, attention="heads")
    report = result.report
    assert report.validation.ok and report.validation.decode_checked, report.validation.problems
    assert report.params_after < report.params_before
    assert "no statistics" not in str(report.as_dict())
    heads = [g for g in report.groups if g.kind == "heads"]
    assert len(heads) == 4 and sum(g.removed for g in heads) > 0
    cache = [i for i in result.model.graph.input if i.name.startswith("past_key_values")]
    assert {i.type.tensor_type.shape.dim[1].dim_value for i in cache} == {1}
    # the cache's head size is frozen, and the reason says the head axis alone may shrink
    assert any("of the key/value cache, whose head axis alone may shrink" in (g.frozen or "") for g in report.groups)


def test_the_pruned_genai_folder_gets_its_config_and_generates(llm_zoo, tmp_path):
    from click.testing import CliRunner

    from spa.cli.commands import main

    pytest.importorskip("onnxruntime_genai")
    source = _genai(llm_zoo, "llama-genai-fp32")
    command = ["prune", str(source), "--ratio", "0.3", "--attention", "heads", "-o", str(tmp_path / "model.onnx")]
    done = CliRunner().invoke(main, command)
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]
    pruned = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    attention = [n for n in pruned.graph.node if n.op_type == "GroupQueryAttention"]
    assert config["num_key_value_heads"] == node_attr_of(attention[0], "kv_num_heads") < 2
    assert config["num_attention_heads"] == node_attr_of(attention[0], "num_heads") < 8
    assert (tmp_path / "tokenizer.json").exists()
    tokens = llm_zoo.generate(tmp_path)
    assert len(tokens) == 8 and all(0 <= t < 512 for t in tokens)


def test_the_pruned_optimum_folder_gets_its_config(llm_zoo, tmp_path):
    from click.testing import CliRunner

    from spa.cli.commands import main

    source = _optimum(llm_zoo, "llama-optimum")
    command = ["prune", str(source), "--ratio", "0.3", "--attention", "heads", "-o", str(tmp_path / "model.onnx")]
    done = CliRunner().invoke(main, command)
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "config.json").read_text())
    pruned = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    kv = pruned.graph.input[3].type.tensor_type.shape.dim[1].dim_value
    assert pruned.graph.input[3].name.startswith("past_key_values") and kv < 2
    assert (config["num_key_value_heads"], config["num_attention_heads"]) == (kv, 4 * kv)
    assert json.loads((source.parent / "config.json").read_text())["num_key_value_heads"] == 2  # input untouched
    assert (tmp_path / "tokenizer.json").exists()


def test_calibration_samples_of_token_ids_are_fed_as_prompts(tmp_path):
    """A decoder's samples are prompts: spa adds the empty cache, the mask and the positions."""
    ids = np.random.default_rng(1).integers(0, 32, (6, 5)).astype(np.int64)
    np.save(tmp_path / "input_ids.npy", ids)
    result = spa.prune(_decoder(), ratio=0.5, calib=tmp_path)
    report = result.report
    assert report.validation.ok, report.validation.problems
    assert report.statistics is not None and report.statistics["source"] == "calibration"


def test_int4_packed_qkv_is_split_into_the_same_projections(llm_zoo):
    from spa.formats.packed_qkv import split_packed_qkv

    path = _genai(llm_zoo, "qwen2-genai-int4")
    dense = onnx.load(str(path))
    split = split_packed_qkv(onnx.ModelProto.FromString(dense.SerializeToString()))
    packed = [n for n in dense.graph.node if n.op_type == "MatMulNBits"]
    assert [n.op_type for n in split.graph.node].count("MatMulNBits") == len(packed) + 2 * 4
    for a, b in zip(
        decoder.rollout(dense, lambda feed: run(dense, feed)), decoder.rollout(split, lambda feed: run(split, feed))
    ):
        assert np.array_equal(a["logits"], b["logits"])


def test_a_tied_int4_embedding_prunes_heads_and_the_folder_generates(llm_zoo, tmp_path):
    """Gemma's int4 export gathers its embedding from the LM head's packed weight
    (GatherBlockQuantized): its shapes are inferred, so heads and the FFN prune behind it."""
    from click.testing import CliRunner

    from spa.cli.commands import main

    pytest.importorskip("onnxruntime_genai")
    source = _genai(llm_zoo, "gemma-genai-int4")
    out = tmp_path / "model.onnx"
    done = CliRunner().invoke(
        main, ["prune", str(source), "--ratio", "0.3", "-o", str(out), "--json", str(tmp_path / "r.json")]
    )
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["ok"] and report["params_after"] < report["params_before"]
    heads = [g for g in report["groups"] if g.get("kv_heads")]
    assert len(heads) == 4 and sum(g.get("removed", 0) for g in heads) > 0
    decoder_config = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]
    attention = [
        n for n in onnx.load(str(out), load_external_data=False).graph.node if n.op_type == "GroupQueryAttention"
    ]
    assert decoder_config["num_attention_heads"] == node_attr_of(attention[0], "num_heads") < 8
    assert len(llm_zoo.generate(tmp_path, length=8)) == 4  # after the 4-token prompt


@pytest.mark.parametrize(
    ("ratio", "unit", "heads", "kv_heads"),
    [(0.3, "query_heads", 6, 2), (0.5, "heads", 4, 1)],
)
def test_the_head_unit_nearest_the_ratio_is_cut(ratio, unit, heads, kv_heads):
    """8 query heads over 2 KV heads: at 0.3, a whole KV head would be 50% of attention and one
    query head per KV group 25%, so query heads go and the cache keeps its layout; at 0.5 whole KV
    heads land on it exactly and the cache shrinks."""
    result = spa.prune(_decoder(heads=8), ratio=ratio, round_to=1)
    report = result.report
    assert report.validation.ok and report.validation.decode_checked, report.validation.problems
    assert (
        report.options["attention"] == unit
        and "50% of an attention layer's heads as whole KV" in report.options["attention_unit"]
    )
    attention = [n for n in result.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert [(node_attr_of(n, "num_heads"), node_attr_of(n, "kv_num_heads")) for n in attention] == [
        (heads, kv_heads)
    ] * 2
    cache = [i for i in result.model.graph.input if i.name.startswith("past_key_values")]
    assert {i.type.tensor_type.shape.dim[1].dim_value for i in cache} == {kv_heads}


def test_a_named_head_unit_is_kept():
    result = spa.prune(_decoder(heads=8), ratio=0.3, round_to=1, attention="heads")
    assert result.report.options["attention"] == "heads" and "attention_unit" not in result.report.options
    attention = [n for n in result.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert {node_attr_of(n, "kv_num_heads") for n in attention} == {1}


def test_the_zoo_export_loses_query_heads_at_a_ratio_whole_kv_heads_would_overshoot(llm_zoo):
    result = spa.prune(_genai(llm_zoo, "llama-genai-int4"), ratio=0.3)
    report = result.report
    assert report.validation.ok and report.validation.decode_checked, report.validation.problems
    assert report.options["attention"] == "query_heads" and not report.validation.changed_io  # the cache as it was
    attention = [n for n in result.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert {(node_attr_of(n, "num_heads"), node_attr_of(n, "kv_num_heads")) for n in attention} == {(6, 2)}


def _down_widths(model: onnx.ModelProto) -> list[int]:
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    return [shapes[n.input[1]][0] for n in model.graph.node if n.op_type == "MatMul" and "down_proj" in n.name]


def test_the_optimum_config_follows_query_heads_ffn_and_hidden_widths(llm_zoo, tmp_path):
    """Query heads cut keep the cache, so the graph's attention width is what says how many heads
    are left; uneven FFN widths leave intermediate_size as it was, and the summary says why."""
    from click.testing import CliRunner

    from spa.cli.commands import main

    source = _optimum(llm_zoo, "llama-optimum")
    out = tmp_path / "model.onnx"
    command = ["prune", str(source), "--ratio", "0.3", "--approximate", "-o", str(out)]
    done = CliRunner().invoke(main, [*command, "--ratio-for", "*layers.0/mlp*=0.5"])
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "config.json").read_text())
    pruned = onnx.load(str(out), load_external_data=False)
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    o_proj = {shapes[n.input[1]][0] for n in pruned.graph.node if n.op_type == "MatMul" and "o_proj" in n.name}
    lm_head = next(shapes[n.input[1]][0] for n in pruned.graph.node if "lm_head" in n.name)
    cache = {i.type.tensor_type.shape.dim[1].dim_value for i in pruned.graph.input if i.name.startswith("past_")}
    assert o_proj == {config["num_attention_heads"] * config["head_dim"]} and config["num_attention_heads"] < 8
    assert cache == {config["num_key_value_heads"]} and config["hidden_size"] == lm_head < 256
    widths = _down_widths(pruned)
    dense_width = llm_zoo.SIZES["intermediate_size"]
    assert len(set(widths)) > 1 and config["intermediate_size"] == dense_width
    assert f"intermediate_size left at {dense_width}: its layers' FFN widths differ" in done.output


def test_an_even_ffn_cut_sets_intermediate_size(llm_zoo, tmp_path):
    from click.testing import CliRunner

    from spa.cli.commands import main

    source = _optimum(llm_zoo, "qwen2-optimum")
    done = CliRunner().invoke(main, ["prune", str(source), "--ratio", "0.3", "-o", str(tmp_path / "model.onnx")])
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "config.json").read_text())
    widths = set(_down_widths(onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)))
    assert widths == {config["intermediate_size"]} and config["intermediate_size"] < llm_zoo.SIZES["intermediate_size"]
