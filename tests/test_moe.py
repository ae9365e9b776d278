"""Whole experts out of mixture-of-experts layers (``remove_experts``), in onnxruntime's fused MoE
and QMoE ops and in decomposed top-k routing, and in the exports tools/moe_zoo.py makes.

Removing an expert must compute what masking it does: the soft model (``soft=True``) keeps every
expert and gives the removed ones -inf router logits, so the router never picks them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builder import Graph, initializer, node_attr
from click.testing import CliRunner
from onnx import TensorProto
from test_bad_input import assert_clean_failure, save

import spa
from spa.cli.commands import main
from spa.core.runtime import run, sample_inputs
from spa.core.tensors import inlined

TOKENS, HIDDEN, INTER, EXPERTS = 12, 16, 8, 4


def fused_model(k: int = 2, dead: int | None = None, unrouted: int | None = None, quantized: bool = False):
    """x -> router (MatMul, Add, Reshape) -> MoE (interleaved SwiGLU) -> + x. ``dead``: an expert
    whose output is zero; ``unrouted``: one the router never picks (a large negative bias)."""
    g = Graph(seed=1)
    x = g.input("x", [TOKENS, HIDDEN])
    bias = g.rng.uniform(-0.5, 0.5, EXPERTS).astype(np.float32)
    if unrouted is not None:
        bias[unrouted] = -30
    logits = g.op("Add", [g.op("MatMul", [x, g.weight(HIDDEN, EXPERTS)], name="router"), g.const(bias, "router_bias")])
    logits = g.op("Reshape", [logits, g.const(np.array([-1, EXPERTS], np.int64))])
    fc1 = g.rng.uniform(-1, 1, (EXPERTS, 2 * INTER, HIDDEN)).astype(np.float32)
    fc2 = g.rng.uniform(-1, 1, (EXPERTS, HIDDEN, INTER)).astype(np.float32)
    fc2_bias = g.rng.uniform(-1, 1, (EXPERTS, HIDDEN)).astype(np.float32)
    if dead is not None:
        fc2[dead], fc2_bias[dead] = 0, 0
    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1, activation_alpha=1.702)
    if quantized:
        from ops.test_moe import _quantized

        (q1, s1), (q2, s2) = _quantized(fc1, 8), _quantized(fc2, 8)
        inputs = [x, logits, g.const(q1, "fc1"), g.const(s1), g.weight(EXPERTS, 2 * INTER)]
        inputs += [g.const(q2, "fc2"), g.const(s2), g.const(fc2_bias)]
        y = g.op("QMoE", inputs, domain="com.microsoft", name="moe", expert_weight_bits=8, **attrs)
    else:
        inputs = [x, logits, g.const(fc1, "fc1"), g.weight(EXPERTS, 2 * INTER), g.const(fc2, "fc2"), g.const(fc2_bias)]
        y = g.op("MoE", inputs, domain="com.microsoft", name="moe", **attrs)
    g.output(g.op("Add", [x, y]))
    return g.build()


def dense_dispatch_model(dead: int | None = None, k: int = 2, layers: int = 1, residual: bool = True):
    """Decomposed top-k routing as a framework's MoE layer exports: router -> Softmax -> TopK ->
    renormalised weights scattered into a dense [tokens, experts] matrix; every expert's FFN
    (stacked weights, a batched MatMul) run on every token and summed by that matrix; + x."""
    g = Graph(seed=2)
    x = g.input("x", [TOKENS, HIDDEN])
    for layer in range(layers):
        mixed = _dispatch_layer(g, x, dead, k, suffix="" if layer == 0 else str(layer))
        x = g.op("Add", [x, mixed]) if residual else mixed
    g.output(x)
    return g.build()


def _dispatch_layer(g: Graph, x: str, dead: int | None, k: int, suffix: str) -> str:
    probs = g.op("Softmax", [g.op("MatMul", [x, g.weight(HIDDEN, EXPERTS)], name=f"router{suffix}")], axis=-1)
    top, picked = g.op("TopK", [probs, g.const(np.array([k], np.int64))], n_out=2, axis=-1)
    top = g.op("Div", [top, g.op("ReduceSum", [top, g.const(np.array([-1], np.int64))], keepdims=1)])
    zeros = g.op("ConstantOfShape", [g.op("Shape", [probs])], value=onnx.helper.make_tensor("", 1, [1], [0.0]))
    routing = g.op("ScatterElements", [zeros, picked, top], axis=1)
    w1 = g.rng.uniform(-1, 1, (EXPERTS, HIDDEN, INTER)).astype(np.float32)
    w2 = g.rng.uniform(-1, 1, (EXPERTS, INTER, HIDDEN)).astype(np.float32)
    if dead is not None:
        w2[dead] = 0
    hidden = g.op("Relu", [g.op("MatMul", [x, g.const(w1, f"w1{suffix}")])])  # [experts, tokens, inter]
    out = g.op("MatMul", [hidden, g.const(w2, f"w2{suffix}")])  # [experts, tokens, hidden]
    weights = g.op("Unsqueeze", [g.op("Transpose", [routing], perm=[1, 0]), g.const(np.array([-1], np.int64))])
    return g.op("ReduceSum", [g.op("Mul", [out, weights]), g.const(np.array([0], np.int64))], keepdims=0)


def outputs(model: onnx.ModelProto, seed: int = 3) -> list[np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((TOKENS, HIDDEN)).astype(np.float32)
    return list(run(inlined(model), {"x": x}).values())


def removed_and_masked(model, **kwargs):
    hard = spa.prune(model, ratio=0, **kwargs)
    soft = spa.prune(model, ratio=0, soft=True, **kwargs)
    return hard, soft


@pytest.mark.parametrize("build", [fused_model, dense_dispatch_model], ids=["fused", "decomposed"])
def test_removing_experts_computes_what_masking_them_does(build):
    model = build()
    hard, soft = removed_and_masked(model, remove_experts=1)
    assert hard.report.experts["experts_after"] == [EXPERTS - 1]
    assert soft.report.experts["experts_after"] == [EXPERTS] and soft.report.experts["soft"]
    weight = "fc1" if build is fused_model else "w1"
    assert initializer(hard.model, weight).shape[0] == EXPERTS - 1
    assert initializer(soft.model, weight).shape[0] == EXPERTS
    # the soft model keeps every expert (and adds a masking bias where the router has none)
    assert hard.report.params_after < hard.report.params_before <= soft.report.params_after
    for a, b, dense in zip(outputs(hard.model), outputs(soft.model), outputs(model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert np.abs(a - dense).max() > 1e-3  # an expert that mattered went


@pytest.mark.parametrize("build", [fused_model, dense_dispatch_model], ids=["fused", "decomposed"])
def test_a_dead_expert_goes_first(build):
    for dead in (1, 2):
        report = spa.prune(build(dead=dead), ratio=0, remove_experts=1).report.experts
        assert list(report["removed"].values()) == [[dead]]
        assert min(next(iter(report["scores"].values()))) == next(iter(report["scores"].values()))[dead]


def test_an_expert_the_router_never_picks_goes_first():
    for unrouted in (0, 3):
        report = spa.prune(fused_model(unrouted=unrouted), ratio=0, remove_experts=1).report.experts
        assert list(report["removed"].values()) == [[unrouted]]
        assert report["scores"]["moe"][unrouted] < 1e-6


def test_k_drops_to_the_experts_left_and_a_fraction_counts_per_layer():
    hard, soft = removed_and_masked(fused_model(k=2), remove_experts=0.75)
    assert hard.report.experts["experts_after"] == [1] and hard.report.experts["k_after"] == [1]
    assert node_attr(hard.model, "MoE", "k") == 1
    reshape = next(n for n in hard.model.graph.node if n.op_type == "Reshape")
    assert initializer(hard.model, reshape.input[1]).tolist() == [-1, 1]
    for a, b in zip(outputs(hard.model), outputs(soft.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_quantized_experts_are_removed_too():
    model = fused_model(quantized=True)
    hard, soft = removed_and_masked(model, remove_experts=2)
    assert initializer(hard.model, "fc1").shape[0] == initializer(hard.model, "fc2").shape[0] == EXPERTS - 2
    for a, b in zip(outputs(hard.model), outputs(soft.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_experts_and_expert_channels_prune_together():
    result = spa.prune(fused_model(), ratio=0.5, remove_experts=1, round_to=1)
    assert result.report.validation.ok, result.report.validation.problems
    assert initializer(result.model, "fc2").shape == (EXPERTS - 1, HIDDEN, INTER // 2)
    assert initializer(result.model, "fc1").shape == (EXPERTS - 1, INTER, HIDDEN)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--remove-experts", "4"], "at least one must stay"),
        (["--remove-experts", "1.5"], "whole number or a fraction"),
        (["--remove-experts", "-1"], "whole number or a fraction"),
    ],
)
def test_bad_expert_counts_are_refused(tmp_path, args, message):
    path, digest = save(fused_model(), tmp_path)
    result = CliRunner().invoke(main, ["prune", str(path), *args])
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert message in result.output


def test_a_model_without_experts_is_refused(tmp_path):
    g = Graph()
    x = g.input("x", [2, HIDDEN])
    g.output(g.op("MatMul", [g.op("Relu", [g.op("MatMul", [x, g.weight(HIDDEN, 8)])]), g.weight(8, 4)]))
    path, digest = save(g.build(), tmp_path)
    result = CliRunner().invoke(main, ["prune", str(path), "--remove-experts", "1"])
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "no mixture-of-experts layer" in result.output


# ---------------------------------------------------------------- the exporters' own models


@pytest.fixture(scope="module")
def moe_zoo():
    pytest.importorskip("transformers")
    import moe_zoo

    return moe_zoo


def _genai_export(moe_zoo):
    pytest.importorskip("onnxruntime_genai")  # the builder that writes it
    return moe_zoo.exported("gptoss-genai-fp32") / "model.onnx"


def test_the_genai_moe_export_loses_experts_validates_and_generates(moe_zoo, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    source = _genai_export(moe_zoo)
    report_path = tmp_path / "report.json"
    command = ["prune", str(source), "--ratio", "0.3", "--remove-experts", "1", "-o", str(tmp_path / "model.onnx")]
    done = CliRunner().invoke(main, [*command, "--json", str(report_path)])
    assert done.exit_code == 0, done.output
    report = json.loads(report_path.read_text())
    assert report["experts"]["experts_before"] == [4, 4] and report["experts"]["experts_after"] == [3, 3]
    assert report["validation"]["decode_checked"] and not report["validation"]["problems"]
    assert report["params_after"] < report["params_before"]
    pruned = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    stacked = [t for t in pruned.graph.initializer if t.name.endswith("experts.down_proj.weight")]
    assert len(stacked) == 2 and all(t.dims[0] == 3 and t.dims[2] < 128 for t in stacked)  # experts and channels
    import llm_zoo

    tokens = llm_zoo.generate(tmp_path)
    assert len(tokens) == 8 and all(0 <= t < moe_zoo.VOCAB for t in tokens)


def test_the_genai_moe_export_removes_what_it_masks(moe_zoo):
    source = _genai_export(moe_zoo)
    hard, soft = removed_and_masked(source, remove_experts=2)
    feed = sample_inputs(onnx.load(str(source)), seed=4, batch=2, length=5)
    a, b = run(inlined(hard.model), feed), run(inlined(soft.model), feed)
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)


def test_the_dynamo_export_with_decomposed_routing_loses_experts(moe_zoo, tmp_path):
    source = moe_zoo.exported("mixtral-dynamo") / "model.onnx"
    done = CliRunner().invoke(main, ["prune", str(source), "--remove-experts", "1", "-o", str(tmp_path / "m.onnx")])
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    hard, soft = removed_and_masked(source, remove_experts=1)
    assert len(hard.report.experts["layers"]) == 2
    ids = np.random.default_rng(5).integers(3, moe_zoo.VOCAB, (1, 8))
    dense = run(onnx.load(str(source)), {"input_ids": ids})
    a, b = run(inlined(hard.model), {"input_ids": ids}), run(inlined(soft.model), {"input_ids": ids})
    (name,) = a
    moved = np.abs(a[name] - dense[name]).max()
    assert np.abs(a[name] - b[name]).max() <= 1e-3 * moved  # exact up to rounding, next to what removal moved
    assert TensorProto.FLOAT == hard.model.graph.output[0].type.tensor_type.elem_type


def test_experts_are_ranked_on_calibration_tokens_when_given(moe_zoo, tmp_path):
    source = _genai_export(moe_zoo)
    ids = np.random.default_rng(6).integers(3, moe_zoo.VOCAB, (8, 6)).astype(np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    on_data = spa.prune(source, ratio=0, remove_experts=1, calib=str(tmp_path / "calib.npz")).report.experts
    synthetic = spa.prune(source, ratio=0, remove_experts=1).report.experts
    assert on_data["data"] == "calibration" and synthetic["data"] == "synthetic"
    assert on_data["scores"] != synthetic["scores"]


def test_qmoe_with_separate_mixing_weights_is_refused_by_name(tmp_path):
    model = fused_model(quantized=True)
    node = next(n for n in model.graph.node if n.op_type == "QMoE")
    node.input.extend([""] * (14 - len(node.input)) + [node.input[1]])  # router_weights: mixing apart from picking
    path, digest = save(model, tmp_path)
    result = CliRunner().invoke(main, ["prune", str(path), "--remove-experts", "1"])
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "QMoE 'moe'" in result.output and "mixing weights" in result.output


def test_decomposed_layers_are_told_apart_by_their_residual_add(tmp_path):
    hard, soft = removed_and_masked(dense_dispatch_model(layers=2), remove_experts=1)
    assert hard.report.experts["experts_after"] == [EXPERTS - 1] * 2
    assert initializer(hard.model, "w1").shape[0] == initializer(hard.model, "w11").shape[0] == EXPERTS - 1
    for a, b in zip(outputs(hard.model), outputs(soft.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    path, digest = save(dense_dispatch_model(layers=2, residual=False), tmp_path)
    result = CliRunner().invoke(main, ["prune", str(path), "--remove-experts", "1"])
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "cannot be told apart" in result.output
