"""Tests of onnxruntime's mixture-of-experts ops MoE and QMoE (``spa.ops.moe``).

The expert FFN's channels (FC2's columns, FC1's rows and FC3's) prune in every expert at once,
a fused SwiGLU's gate and up rows together whichever layout holds them; the expert axis stays
whole (experts go by ``remove_experts``, tests/test_moe.py).
"""

import numpy as np
import onnx
import pytest
from builder import Graph, analysis_of, group_at, initializer, prune_exact

from spa.core.coupling import Dim
from spa.core.graph import ModelGraph
from spa.reporting.metrics import count

TOKENS, HIDDEN, INTER, EXPERTS = 6, 16, 8, 4


def moe_model(
    activation: str = "swiglu", fusion: int = 1, k: int = 2, fc3: bool = False, seed: int = 0
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """x -> router (MatMul, Add) -> MoE, and the names of its weights."""
    g = Graph(seed=seed)
    x = g.input("x", [TOKENS, HIDDEN])
    logits = g.op("Add", [g.op("MatMul", [x, g.weight(HIDDEN, EXPERTS)], name="router"), g.weight(EXPERTS)])
    rows = INTER * (2 if activation == "swiglu" and fusion else 1)
    names = {
        "fc1": g.weight(EXPERTS, rows, HIDDEN),
        "fc1_bias": g.weight(EXPERTS, rows),
        "fc2": g.weight(EXPERTS, HIDDEN, INTER),
        "fc2_bias": g.weight(EXPERTS, HIDDEN),
    }
    inputs = [x, logits, names["fc1"], names["fc1_bias"], names["fc2"], names["fc2_bias"]]
    if fc3:
        names["fc3"], names["fc3_bias"] = g.weight(EXPERTS, INTER, HIDDEN), g.weight(EXPERTS, INTER)
        inputs += [names["fc3"], names["fc3_bias"]]
    attrs = dict(k=k, activation_type=activation, normalize_routing_weights=1)
    if activation == "swiglu":
        attrs.update(swiglu_fusion=fusion, activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0)
    g.output(g.op("MoE", inputs, domain="com.microsoft", name="moe", **attrs))
    return g.build(), names


LAYOUTS = [("swiglu", 1, False), ("swiglu", 2, False), ("swiglu", 0, True), ("relu", 0, False), ("silu", 0, True)]
# onnxruntime's CPU MoE runs SwiGLU only with interleaved gate and up rows (swiglu_fusion=1)
# (nor FC3): the other layouts are checked by their grouping alone
RUNS_ON_CPU = [("swiglu", 1, False), ("relu", 0, False), ("silu", 0, False)]


def fc1_rows_of(fusion: int, channels: list[int]) -> list[int]:
    """FC1's rows for ``channels``: gate and up interleaved (1), concatenated (2), or one row each."""
    if fusion == 1:
        return [r for c in channels for r in (2 * c, 2 * c + 1)]
    if fusion == 2:
        return [*channels, *(INTER + c for c in channels)]
    return list(channels)


@pytest.mark.parametrize("activation, fusion, fc3", LAYOUTS)
def test_each_expert_channel_owns_its_fc1_rows_in_the_layout_of_the_activation(activation, fusion, fc3):
    model, names = moe_model(activation, fusion, fc3=fc3)
    analysis = analysis_of(model)
    group = group_at(analysis, names["fc2"], 2)
    assert group.prunable and group.size == INTER
    channel = analysis.labels[Dim(names["fc2"], 2)]
    rows = analysis.labels[Dim(names["fc1"], 1)]
    for c in range(INTER):
        assert sorted(np.flatnonzero(rows == channel[c]).tolist()) == sorted(fc1_rows_of(fusion, [c]))
    if fc3:
        assert np.array_equal(analysis.labels[Dim(names["fc3"], 1)], channel)
    assert np.array_equal(analysis.labels[Dim(names["fc1_bias"], 1)], rows)


@pytest.mark.parametrize("activation, fusion, fc3", RUNS_ON_CPU)
def test_expert_channels_prune_with_soft_equal_to_hard(activation, fusion, fc3):
    model, names = moe_model(activation, fusion, fc3=fc3)
    result = prune_exact(model, ratio=0.5)  # soft == hard: a gate row paired with the wrong up row differs
    fc1, fc2 = initializer(model, names["fc1"]), initializer(model, names["fc2"])
    cut_fc2 = initializer(result.model, names["fc2"])
    assert cut_fc2.shape == (EXPERTS, HIDDEN, INTER // 2)
    columns = cut_fc2.transpose(2, 0, 1)
    kept = [next(c for c in range(INTER) if np.array_equal(fc2[:, :, c], column)) for column in columns]
    assert np.array_equal(initializer(result.model, names["fc1"]), fc1[:, fc1_rows_of(fusion, kept), :])
    if fc3:
        assert np.array_equal(initializer(result.model, names["fc3"]), initializer(model, names["fc3"])[:, kept, :])


def test_the_expert_axis_does_not_prune_as_channels():
    model, names = moe_model()
    analysis = analysis_of(model)
    router = group_at(analysis, [n.output[0] for n in model.graph.node if n.name == "router"][0], 1)
    assert not router.prunable and "--remove-experts" in router.frozen
    assert all(Dim(names[key], 0) not in analysis.labels for key in ("fc1", "fc2"))  # never offered


def test_flops_count_the_experts_each_token_runs_and_params_every_expert():
    def moe_flops(k):
        model, _ = moe_model(k=k)
        stats = count(ModelGraph(_loaded(model)))
        return next(n.flops for n in stats.nodes if n.name == "moe"), stats.params

    one, params = moe_flops(1)
    two, _ = moe_flops(2)
    assert two == 2 * one > 0
    model, _ = moe_model()
    assert params == sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _loaded(model):
    from spa.formats.model import Model

    return Model.load(model).proto


def _quantized(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantization along the last axis, packed as QMoE stores it."""
    scales = np.abs(weight).max(-1) / (2 ** (bits - 1) - 1)
    values = np.clip(np.round(weight / scales[..., None]), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    values = values.astype(np.int32) + 2 ** (bits - 1)
    if bits == 4:
        values = values[..., 0::2] | (values[..., 1::2] << 4)
    return values.astype(np.uint8), scales.astype(np.float32)


def qmoe_model(bits: int = 4, seed: int = 0) -> onnx.ModelProto:
    g = Graph(seed=seed)
    x = g.input("x", [TOKENS, HIDDEN])
    logits = g.op("Add", [g.op("MatMul", [x, g.weight(HIDDEN, EXPERTS)], name="router"), g.weight(EXPERTS)])
    fc1, fc1_scales = _quantized(g.rng.uniform(-1, 1, (EXPERTS, 2 * INTER, HIDDEN)), bits)
    fc2, fc2_scales = _quantized(g.rng.uniform(-1, 1, (EXPERTS, HIDDEN, INTER)), bits)
    inputs = [x, logits, g.const(fc1, "fc1"), g.const(fc1_scales, "fc1_scales"), g.weight(EXPERTS, 2 * INTER)]
    inputs += [g.const(fc2, "fc2"), g.const(fc2_scales, "fc2_scales"), g.weight(EXPERTS, HIDDEN)]
    attrs = dict(k=2, activation_type="swiglu", swiglu_fusion=1, expert_weight_bits=bits, normalize_routing_weights=1)
    g.output(g.op("QMoE", inputs, domain="com.microsoft", name="qmoe", **attrs))
    return g.build()


def test_qmoe_channels_stay_whole_since_fc2_packs_them_and_its_values_count_unpacked():
    model = qmoe_model(bits=4)
    analysis = analysis_of(model)
    channels = group_at(analysis, "fc2", 2)
    assert not channels.prunable and "packs" in channels.frozen
    stats = count(ModelGraph(_loaded(model)))
    packed = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    scales = packed["fc1_scales"] + packed["fc2_scales"]
    assert stats.params == sum(packed.values()) - scales + packed["fc1"] + packed["fc2"]  # two 4-bit values a byte
