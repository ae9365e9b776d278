"""How much each expert of a mixture-of-experts layer contributes: its routing weight times the
size of what it outputs, averaged over the tokens of the statistics.

The router's logits are read through onnxruntime (``exposing``) on the calibration or synthetic
inputs; each token's routing weights are the softmax's top k (renormalised where the layer does).
An expert the router never picks scores 0 however large its weights, and so does one that outputs
nothing when picked.

The output's size is measured for onnxruntime's fused MoE op: the op alone, run on the tokens the
layer read with the router forced to one expert (k = 1), gives that expert's output for every
token, with the op's own activation. For the decomposed forms, whose experts are spread over many
nodes, the product of the Frobenius norms of the expert's stored weights stands for it (a bound on
its output's norm per unit input, up to the activation's slope).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spa.core import runlimit
from spa.core.runtime import session
from spa.core.tensors import to_array
from spa.patterns.moe import FUSED, ExpertLayer
from spa.scoring.statistics import exposing

PROBE_TOKENS = 512  # tokens per layer whose expert outputs are measured (a seeded sample)


def routing_weights(logits: np.ndarray, k: int, normalized: bool) -> np.ndarray:
    """[tokens, experts]: each token's weight on each expert, 0 off its top ``k``."""
    logits = logits.astype(np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    k = min(k, probs.shape[-1])
    top = np.argpartition(-probs, k - 1, axis=-1)[:, :k]
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, top, np.take_along_axis(probs, top, axis=-1), axis=-1)
    if normalized:
        weights /= np.maximum(weights.sum(axis=-1, keepdims=True), 1e-30)
    return weights


def expert_scores(
    model: onnx.ModelProto,
    layers: list[ExpertLayer],
    feeds: Iterable[dict[str, np.ndarray]],
    seed: int = 0,
    custom_ops: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Each layer's score per expert (by ``ExpertLayer.name``): higher matters more."""
    tensors = list(dict.fromkeys([layer.router.logits for layer in layers] + [t for t in _tokens(layers)]))
    run = session(exposing(model, tensors), custom_ops=custom_ops)
    weights: dict[str, list[np.ndarray]] = {layer.name: [] for layer in layers}
    tokens: dict[str, list[np.ndarray]] = {layer.name: [] for layer in layers}
    for feed in feeds:
        values = dict(zip(tensors, runlimit.run(run, tensors, feed)))
        for layer in layers:
            logits = values[layer.router.logits].reshape(-1, layer.experts)
            weights[layer.name].append(routing_weights(logits, layer.k, layer.normalized))
            if layer.tokens is not None:
                tokens[layer.name].append(values[layer.tokens].reshape(len(logits), -1))
    del run
    rng = np.random.default_rng([seed, 23])
    scores = {}
    for layer in layers:
        routed = np.concatenate(weights[layer.name])
        if layer.form == FUSED and tokens[layer.name]:
            rows = np.concatenate(tokens[layer.name])
            pick = np.sort(rng.choice(len(rows), min(PROBE_TOKENS, len(rows)), replace=False))
            norms = _fused_output_norms(model, layer, rows[pick], custom_ops)
            scores[layer.name] = (routed[pick] * norms).mean(axis=0)
        else:
            scores[layer.name] = routed.mean(axis=0) * _weight_norms(model, layer)
    return scores


def _tokens(layers: list[ExpertLayer]) -> list[str]:
    return [layer.tokens for layer in layers if layer.tokens is not None]


def _fused_output_norms(
    model: onnx.ModelProto, layer: ExpertLayer, rows: np.ndarray, custom_ops: tuple[str, ...]
) -> np.ndarray:
    """[tokens, experts]: the norm of each expert's output on each token row, by onnxruntime."""
    node = next(n for n in model.graph.node if n.name == layer.name)
    inits = {t.name: t for t in model.graph.initializer}
    attributes = [a for a in node.attribute if a.name != "k"]
    inputs = ["tokens", "router", *node.input[2:]]
    probe = helper.make_node(node.op_type, inputs, ["expert_out"], domain=node.domain, k=1)
    probe.attribute.extend(attributes)
    stored = [numpy_helper.from_array(to_array(inits[name]), name) for name in dict.fromkeys(node.input[2:]) if name]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[layer.stacked[0]].data_type)
    elem = helper.np_dtype_to_tensor_dtype(dtype) if dtype.kind == "f" else onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [probe],
        "expert_probe",
        [
            helper.make_tensor_value_info("tokens", elem, [None, rows.shape[1]]),
            helper.make_tensor_value_info("router", elem, [None, layer.experts]),
        ],
        [helper.make_tensor_value_info("expert_out", elem, None)],
        stored,
    )
    lone = helper.make_model(graph, opset_imports=list(model.opset_import))
    lone.ir_version = model.ir_version
    run = session(lone, custom_ops=custom_ops)
    x = rows.astype(helper.tensor_dtype_to_np_dtype(elem))
    norms = np.zeros((len(rows), layer.experts))
    for expert in range(layer.experts):
        router = np.full((len(rows), layer.experts), -np.inf, dtype=x.dtype)
        router[:, expert] = 0
        (out,) = runlimit.run(run, ["expert_out"], {"tokens": x, "router": router})
        norms[:, expert] = np.linalg.norm(out.astype(np.float64).reshape(len(rows), -1), axis=-1)
    return norms


def _weight_norms(model: onnx.ModelProto, layer: ExpertLayer) -> np.ndarray:
    inits = {t.name: t for t in model.graph.initializer}
    product = np.ones(layer.experts)
    for name in layer.stacked:
        value = to_array(inits[name]).astype(np.float64)
        if value.ndim >= 3:  # matrices; the biases of [experts, width] are left out
            product *= np.sqrt((value.reshape(layer.experts, -1) ** 2).sum(axis=1))
    return product
