"""The runtime configs beside a decoder, rewritten to match the pruned graph.

onnxruntime-genai sizes its key/value cache from ``genai_config.json`` (``num_key_value_heads``,
``num_attention_heads``, ``head_size``, ``hidden_size``), and transformers and Optimum read
``config.json``: a folder whose config still names the dense sizes allocates a cache the pruned
graph refuses. Where the input model's folder holds either, the output folder gets a copy with
the fields the cut changed, and the tokenizer and other side files are copied beside it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import onnx

from spa.formats import nbits
from spa.ops.linear import MatMul

GENAI = "genai_config.json"
TRANSFORMERS = "config.json"
# files beside a model that describe the model rather than hold it: copied as they are
_SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
# the projections whose input widths are a layer's attention width (heads x head size) and FFN
# width, as the onnxruntime-genai builder and the transformers exporters name them
_LAYER = re.compile(r"layers\.(\d+)/(?:self_attn|attn|mlp)/(o_proj|down_proj)/")
_LM_HEAD = re.compile(r"(^|/)lm_head/")


def attention_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Head counts every attention op of ``model`` agrees on (GroupQueryAttention's attributes)."""
    found: dict[str, set[int]] = {"num_attention_heads": set(), "num_key_value_heads": set()}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            found["num_attention_heads"].add(int(attributes["num_heads"]))
            found["num_key_value_heads"].add(int(attributes["kv_num_heads"]))
    return {name: values.pop() for name, values in found.items() if len(values) == 1}


def cache_heads(model: onnx.ModelProto) -> int | None:
    """KV heads every cache input declares, where they agree."""
    heads = {
        info.type.tensor_type.shape.dim[1].dim_value
        for info in model.graph.input
        if info.name.startswith("past_key_values") and len(info.type.tensor_type.shape.dim) == 4
    }
    return heads.pop() if len(heads) == 1 and 0 not in heads else None


def uneven_layers(pruned: onnx.ModelProto) -> bool:
    """Whether the cut left layers with different head counts, which one config cannot say."""
    counts = [
        tuple(int(onnx.helper.get_attribute_value(a)) for a in n.attribute if a.name in ("num_heads", "kv_num_heads"))
        for n in pruned.graph.node
        if n.op_type == "GroupQueryAttention"
    ]
    kv = {
        info.type.tensor_type.shape.dim[1].dim_value
        for info in pruned.graph.input
        if info.name.startswith("past_key_values") and len(info.type.tensor_type.shape.dim) == 4
    }
    return len(set(counts)) > 1 or len(kv) > 1


def write_configs(
    source: Path,
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    output: Path,
    removed_layers: Sequence[int] = (),
    force: bool = False,
) -> list[str]:
    """Rewrite the configs beside ``source`` for ``pruned`` into ``output``'s folder and copy the
    side files; returns what was written, one line each. Nothing where the folders are the same.
    ``removed_layers``: the layer numbers depth pruning removed before ``dense``."""
    folder, target = source.parent, output.parent
    if folder.resolve() == target.resolve() or not any((folder / name).exists() for name in (GENAI, TRANSFORMERS)):
        return []
    if uneven_layers(pruned):
        raise ValueError("the cut left layers with different head counts, which a runtime config cannot describe")
    written = []
    changed, notes = _changes(dense, pruned)
    experts = expert_sizes(pruned)
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix not in _SIDE_SUFFIXES:
            continue
        # the configs describe the model just written: one already there is replaced with --force
        # (else kept, and said); the other side files do not depend on the cut, and are kept
        if (target / path.name).exists() and not (force and path.name in (GENAI, TRANSFORMERS)):
            if path.name in (GENAI, TRANSFORMERS):
                written.append(f"{path.name}: kept the one already there (--force replaces it)")
            continue
        if path.name == GENAI:
            config = json.loads(path.read_text())
            decoder = config.get("model", {}).get("decoder", {})
            applied = _set(decoder, {**changed, **expert_changes(decoder, experts)})
            applied.update(drop_layers(decoder, removed_layers))
            _write(target / path.name, config)
            written.append(f"{path.name}: {_describe(applied)}{_noted(notes, decoder)}")
        elif path.name == TRANSFORMERS:
            config = json.loads(path.read_text())
            applied = _set(config, {**changed, **expert_changes(config, experts)})
            applied.update(drop_layers(config, removed_layers))
            _write(target / path.name, config)
            written.append(f"{path.name}: {_describe(applied)}{_noted(notes, config)}")
        else:
            shutil.copyfile(path, target / path.name)
            written.append(f"{path.name}: copied")
    return written


# the names configs give the experts per layer and the experts each token runs
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K_FIELD = "num_experts_per_tok"


def expert_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Experts per layer and top-k, where every mixture-of-experts layer agrees."""
    from spa.core.graph import ModelGraph  # noqa: PLC0415  (only for models with experts)
    from spa.ops.moe import MoE, QMoE  # noqa: PLC0415
    from spa.patterns.moe import expert_layers  # noqa: PLC0415

    if not any(n.op_type in (*MoE.ops, *QMoE.ops, "TopK") for n in model.graph.node):
        return {}
    layers, _ = expert_layers(ModelGraph(model))
    experts, k = {layer.experts for layer in layers}, {layer.k for layer in layers}
    sizes = {name: next(iter(experts)) for name in EXPERT_FIELDS} if len(experts) == 1 else {}
    return {**sizes, TOP_K_FIELD: k.pop()} if len(k) == 1 else sizes


def expert_changes(config: dict, sizes: dict[str, int]) -> dict[str, int]:
    """The expert counts of the pruned graph (``expert_sizes``) that ``config`` states otherwise: the
    config, not the graph the cut started from, since the experts go before the channels are cut."""
    return {name: value for name, value in sizes.items() if config.get(name) not in (None, value)}


def drop_layers(config: dict, removed: Sequence[int]) -> dict:
    """Fewer layers: ``num_hidden_layers`` counts down, per-layer lists (``layer_types``, sliding
    windows) lose the removed layers' entries; returns what was set."""
    if not removed or not isinstance(config.get("num_hidden_layers"), int):
        return {}
    layers, gone = config["num_hidden_layers"], set(removed)
    applied: dict = {"num_hidden_layers": layers - len(gone)}
    for key, value in config.items():
        if isinstance(value, list) and len(value) == layers and key != "num_hidden_layers":
            applied[key] = [v for k, v in enumerate(value) if k not in gone]
    # Qwen2: the layers below this number use the sliding window; those removed below it lower it
    if isinstance(config.get("max_window_layers"), int):
        applied["max_window_layers"] = config["max_window_layers"] - sum(k < config["max_window_layers"] for k in gone)
    config.update(applied)
    return applied


def _changes(dense: onnx.ModelProto, pruned: onnx.ModelProto) -> tuple[dict[str, int], dict[str, str]]:
    """The config fields the cut changed, and the fields left as they were with the reason."""
    (before, _), (after, notes) = graph_sizes(dense), graph_sizes(pruned)
    changed = {name: value for name, value in after.items() if before.get(name) not in (None, value)}
    return changed, {name: why for name, why in notes.items() if name not in changed}


def graph_sizes(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, str]]:
    """The sizes a runtime config states, as ``model``'s graph has them: head counts, head size,
    hidden and FFN width (under both names the configs use for the head size); and, for a size the
    layers disagree on, why it cannot be stated."""
    sizes = attention_sizes(model)
    kv = cache_heads(model)
    if kv is not None:
        sizes.setdefault("num_key_value_heads", kv)
    widths, notes = _layer_widths(model), {}
    attention, ffn = widths.get("o_proj", set()), widths.get("down_proj", set())
    head_size = _cache_head_size(model)
    if len(attention) == 1:
        width = next(iter(attention))
        if head_size is None and sizes.get("num_attention_heads"):
            head_size = width // sizes["num_attention_heads"]
        if head_size:
            sizes.setdefault("num_attention_heads", width // head_size)
    if head_size:
        sizes["head_size"] = sizes["head_dim"] = head_size
    if len(ffn) == 1:
        sizes["intermediate_size"] = next(iter(ffn))
    elif ffn:
        notes["intermediate_size"] = f"its layers' FFN widths differ ({', '.join(map(str, sorted(ffn)))})"
    hidden = widths.get("lm_head", set())
    if len(hidden) == 1:
        sizes["hidden_size"] = next(iter(hidden))
    return sizes, notes


def _layer_widths(model: onnx.ModelProto) -> dict[str, set[int]]:
    """Input widths of each layer's output and down projections, and of the LM head."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    found: dict[str, set[int]] = {}
    for node in model.graph.node:
        match = _LAYER.search(node.name)
        role = match.group(2) if match else "lm_head" if _LM_HEAD.search(node.name) else None
        width = _input_width(node, shapes) if role else None
        if role and width:
            found.setdefault(role, set()).add(width)
    return found


def _input_width(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int | None:
    if node.op_type == nbits.OP_TYPE:
        return next((int(a.i) for a in node.attribute if a.name == "K"), None)
    weight = shapes.get(node.input[1]) if node.op_type in MatMul.ops and len(node.input) > 1 else None
    return int(weight[0]) if weight and len(weight) == 2 else None


def _cache_head_size(model: onnx.ModelProto) -> int | None:
    """The head size every cache input declares (Optimum's do; the genai builder's is symbolic)."""
    sizes = {
        info.type.tensor_type.shape.dim[3].dim_value
        for info in model.graph.input
        if info.name.startswith("past_key_values") and len(info.type.tensor_type.shape.dim) == 4
    }
    return sizes.pop() if len(sizes) == 1 and 0 not in sizes else None


def _set(config: dict, changed: dict[str, int]) -> dict[str, int]:
    """``changed`` where ``config`` has the field, and what was set; attention heads scale with the
    KV heads where the graph does not say (Optimum's decomposed attention has no head count)."""
    changed = dict(changed)
    if "num_key_value_heads" in changed and "num_attention_heads" not in changed:
        old_kv = config.get("num_key_value_heads")
        if old_kv and config.get("num_attention_heads"):
            changed["num_attention_heads"] = config["num_attention_heads"] // old_kv * changed["num_key_value_heads"]
    applied = {name: value for name, value in changed.items() if name in config}
    config.update(applied)
    return applied


def _noted(notes: dict[str, str], config: dict) -> str:
    """Fields of ``config`` left at their dense value, and why: one number cannot describe them."""
    kept = [f"{name} left at {config[name]}: {why}" for name, why in notes.items() if name in config]
    return "".join(f"; {line}" for line in kept)


def _describe(changed: dict[str, int]) -> str:
    return ", ".join(f"{name}={value}" for name, value in changed.items()) or "unchanged"


def _write(path: Path, config: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(config, indent=4) + "\n")
    partial.replace(path)
