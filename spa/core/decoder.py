"""Feeds for decoder language models that carry their key/value cache as graph I/O.

onnxruntime-genai and Optimum export a decoder with ``past_key_values.N.key/value`` inputs
``[batch, kv_heads, past, head_size]`` and ``present.N.key/value`` outputs, an ``attention_mask``
over past and new tokens, and (Optimum) ``position_ids`` for the new tokens. Filled axis by axis
as any other input, the cache gets a head size nothing computes and a mask that covers the new
tokens only, and the attention refuses the feed. Here the sizes come from the graph: the cache's
head count and head size from the attention op that reads it (GroupQueryAttention's
``kv_num_heads``, the projection's width) or from its declared axes, the mask's length is past
plus new, and position ids count on from the past. ``rollout`` runs a prefill and then one decode
step fed the prefill's own ``present`` outputs, as a generation loop does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from spa.formats.nbits import OP_TYPE as NBITS
from spa.ops.gather import Gather

# the new tokens of a made-up feed (its past is empty) unless a length is asked for
NEW = 4
# the tokens of a made-up prompt for statistics
PROMPT = 16
# past -> present naming of the exporters
_PRESENT_OF = (("past_key_values.", "present."), ("past_key_values_", "present_"), ("past_", "present_"))


@dataclass(frozen=True)
class CacheLayout:
    """The cache inputs (with their present outputs) and the other decoder inputs of a model."""

    past: Mapping[str, str]  # past input -> its present output
    heads: Mapping[str, tuple[int | None, int | None]]  # past input -> (kv heads, head size), None unknown
    ids: str | None
    mask: str | None
    positions: str | None
    vocab: int | None


def _inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return {i.name: i for i in model.graph.input if i.name not in initializers}


def _present_name(name: str, outputs: set[str]) -> str | None:
    for past, present in _PRESENT_OF:
        if name.startswith(past) and present + name[len(past) :] in outputs:
            return present + name[len(past) :]
    return None


def cache_names(inputs: list[str], outputs: list[str]) -> set[str]:
    """The past inputs and present outputs of a key/value cache, by the exporters' naming."""
    found = set()
    for name in inputs:
        present = _present_name(name, set(outputs))
        if present:
            found |= {name, present}
    return found


def layout(model: onnx.ModelProto) -> CacheLayout | None:
    """The model's cache layout, or None when it carries no key/value cache as graph I/O."""
    inputs = _inputs(model)
    outputs = {o.name for o in model.graph.output}
    past = {
        name: present
        for name, info in inputs.items()
        if len(info.type.tensor_type.shape.dim) == 4 and (present := _present_name(name, outputs))
    }
    if not past:
        return None
    names = {name: name.lower() for name in inputs if name not in past}
    ids = next((n for n, low in names.items() if low in ("input_ids", "ids", "tokens")), None)
    mask = next((n for n, low in names.items() if "attention_mask" in low), None)
    positions = next((n for n, low in names.items() if "position_ids" in low), None)
    heads = {name: _cache_heads(model, inputs[name]) for name in past}
    return CacheLayout(past, heads, ids, mask, positions, _vocab(model, ids))


def cache_inputs(model: onnx.ModelProto) -> set[str]:
    """The key/value cache inputs of ``model`` (none for a model without one)."""
    cache = layout(model)
    return set(cache.past) if cache else set()


def _declared(info: onnx.ValueInfoProto, axis: int) -> int | None:
    dim = info.type.tensor_type.shape.dim[axis]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _cache_heads(model: onnx.ModelProto, info: onnx.ValueInfoProto) -> tuple[int | None, int | None]:
    """(kv heads, head size) of a cache input: declared, else from the attention op reading it."""
    heads, size = _declared(info, 1), _declared(info, 3)
    if heads and size:
        return heads, size
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and info.name in node.input[3:5]:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            query_heads, kv_heads = int(attributes["num_heads"]), int(attributes["kv_num_heads"])
            packed = len(node.input) < 2 or not node.input[1]
            width = _width(model, node.input[0])
            per_head = query_heads + 2 * kv_heads if packed else query_heads
            return heads or kv_heads, size or (width // per_head if width and width % per_head == 0 else None)
    return heads, size


def _width(model: onnx.ModelProto, tensor: str) -> int | None:
    """The last axis of ``tensor`` where a projection's weight fixes it (MatMul, MatMulNBits, + bias)."""
    # imported here, not with the module: the feed is built wherever a model runs (statistics
    # among them), and only decoders need the dense-layer operator
    from spa.ops.linear import MatMul

    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for _ in range(4):  # through a bias Add or a Cast
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type in MatMul.ops and node.input[1] in initializers:
            return int(initializers[node.input[1]].dims[-1])
        if node.op_type == NBITS:
            return next((int(a.i) for a in node.attribute if a.name == "N"), None)
        if node.op_type not in ("Add", "Cast", "Identity"):
            return None
        tensor = next((i for i in node.input if i and i not in initializers), "")
    return None


def _vocab(model: onnx.ModelProto, ids: str | None) -> int | None:
    """Rows of the embedding table ``ids`` index: token ids beyond it are out of range."""
    if ids is None:
        return None
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in Gather.ops and node.input[1:2] == [ids] and node.input[0] in initializers:
            return int(initializers[node.input[0]].dims[0])
    return None


def sizes_from(model: onnx.ModelProto, cache: CacheLayout, shapes: Mapping[str, list[int]]) -> tuple[int, int] | None:
    """(past, new) tokens a user's ``--input-shape`` sets, or None when it names neither."""
    past = next((shapes[n][2] for n in cache.past if n in shapes), None)
    new = next((shapes[n][1] for n in (cache.ids, cache.positions) if n and n in shapes), None)
    total = shapes[cache.mask][1] if cache.mask and cache.mask in shapes else None
    if total is not None and past is not None and new is None:
        new = total - past
    elif total is not None and new is not None and past is None:
        past = total - new
    if past is None and new is None:
        return None
    return (past if past is not None else 0), (new if new is not None else NEW)


def feed(
    model: onnx.ModelProto,
    cache: CacheLayout,
    batch: int,
    past: int,
    new: int,
    rng: np.random.Generator,
    caches: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """A consistent decoder feed: ``new`` token ids after ``past`` cached ones (random cache values,
    or ``caches``), the mask over both, position ids counting on from the past."""
    inputs = _inputs(model)
    values: dict[str, np.ndarray] = {}
    for name in cache.past:
        if caches is not None:
            values[name] = caches[name]
            continue
        heads, size = cache.heads[name]
        info = inputs[name]
        shape = [batch, heads or 1, past, size or 1]
        values[name] = rng.standard_normal(shape).astype(_dtype(info))
    if cache.ids:
        high = cache.vocab or 1
        values[cache.ids] = rng.integers(0, high, (batch, new)).astype(_dtype(inputs[cache.ids]))
    if cache.mask:
        values[cache.mask] = np.ones((batch, past + new), _dtype(inputs[cache.mask]))
    if cache.positions:
        row = np.arange(past, past + new)
        values[cache.positions] = np.tile(row, (batch, 1)).astype(_dtype(inputs[cache.positions]))
    return values


def _dtype(info: onnx.ValueInfoProto):
    return onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type or onnx.TensorProto.FLOAT)


def rollout(
    model: onnx.ModelProto,
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    seed: int = 0,
    prompt: int = NEW,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The outputs of a prefill of ``prompt`` tokens (empty past), then of one decode step fed the
    prefill's own ``present`` outputs as its past. ``run`` runs a feed on the model."""
    cache = layout(model)
    if cache is None:
        raise ValueError("the model carries no key/value cache")
    rng = np.random.default_rng(seed)
    first = run(feed(model, cache, 1, 0, prompt, rng))
    caches = {name: first[present] for name, present in cache.past.items()}
    second = run(feed(model, cache, 1, prompt, 1, rng, caches))
    return first, second


def changed_io(dense: onnx.ModelProto, pruned: onnx.ModelProto) -> list[str]:
    """Graph inputs and outputs whose declared shapes differ, as ``name: [dims] -> [dims]``."""

    def shapes(model: onnx.ModelProto) -> dict[str, list]:
        return {
            info.name: [
                d.dim_value if d.HasField("dim_value") else d.dim_param for d in info.type.tensor_type.shape.dim
            ]
            for info in [*model.graph.input, *model.graph.output]
        }

    before, after = shapes(dense), shapes(pruned)
    changed = [name for name in before if name in after and before[name] != after[name]]
    return [f"{name}: {before[name]} -> {after[name]}" for name in changed]
