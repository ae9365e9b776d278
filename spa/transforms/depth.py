"""Remove residual blocks (``spa.analysis.blocks``): the block's output becomes its input.

Hard removal rewires every reader of a block's output to its input and drops what no output
needs any more. Where the block ends in onnxruntime's fused skip norm (onnxruntime-genai's
``SkipSimplifiedLayerNormalization``, whose fourth output is the residual sum), that node is
replaced by the plain norm of the block input and the sum is aliased to the input. A decoder's
key/value cache inputs and outputs of the removed layers go, and the later ones are renumbered
so the names stay contiguous: runtimes look them up as ``past_key_values.%d.key``.

Soft removal multiplies every branch of the block by zero and keeps everything else: removal
equals that masking, which validation checks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spa.analysis.blocks import FUSED_NORMS, Block
from spa.core import decoder

_FLOAT_TYPES = {onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64}


def remove_blocks(
    model: onnx.ModelProto,
    blocks: Iterable[Block],
    soft: bool = False,
    shifts: Mapping[int, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """``model`` without ``blocks`` (``soft``: with their branches zeroed instead). ``shifts``
    (block index -> a vector along the channel axis): what such a block adds in place of its
    branches, the mean of what they added, so the stream keeps its average."""
    blocks, shifts = list(blocks), dict(shifts or {})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    refused = [b.name for b in blocks if not b.removable]
    if refused:
        raise ValueError(f"not removable: {', '.join(refused)}")
    if soft:
        _zero_branches(out, blocks, shifts)
        return out
    alias: dict[str, str] = {}
    # every shift is placed before any fused norm stops writing its sum (a block's input may be
    # the one before it's): after it, the producer of that input can no longer be found
    sources = {b.index: _shifted(out.graph, b, shifts[b.index]) if b.index in shifts else b.input for b in blocks}
    nodes = {n.name: n for n in out.graph.node}
    gone = set()
    for block in blocks:
        exit, source = block.exit, sources[block.index]
        if exit.fused:
            _plain_norm(nodes[exit.node], source)
        else:  # its readers read the block input instead
            gone |= {exit.node, *([block.post] if block.post else [])}
        if block.output:
            alias[block.output] = source
    _keep(out.graph.node, lambda n: n.name not in gone)
    _rewire(out.graph, alias)
    _drop_dead(out.graph)
    _reread_shapes(out.graph, {name for b in blocks for name in b.cache})
    _drop_cache(out.graph, {name for b in blocks for name in b.cache})
    _drop_dead(out.graph)
    _renumber_cache(out.graph)
    return out


def _shifted(graph: onnx.GraphProto, block: Block, shift: np.ndarray) -> str:
    """``block.input + shift``, computed right after the block input is (graph order kept)."""
    name = f"{block.exit.node}/shift"
    graph.initializer.append(numpy_helper.from_array(shift, f"{name}/value"))
    add = helper.make_node("Add", [block.input, f"{name}/value"], [name], name=name)
    position = _position_after(graph, block.input)
    graph.node.insert(position, add)
    return name


def _position_after(graph: onnx.GraphProto, tensor: str) -> int:
    return next((k + 1 for k, n in enumerate(graph.node) if tensor in n.output), 0)


def _resolved(alias: dict[str, str], name: str) -> str:
    while name in alias:
        name = alias[name]
    return name


def _plain_norm(node: onnx.NodeProto, source: str) -> None:
    """The fused skip norm becomes the plain norm of ``source``: its sum was the block's output."""
    gamma = node.input[2]
    beta = node.input[3] if node.op_type == "SkipLayerNormalization" and len(node.input) > 3 else ""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"}
    plain = helper.make_node(
        FUSED_NORMS[node.op_type],
        [source, gamma, *([beta] if beta else [])],
        [node.output[0]],
        name=node.name,
        axis=-1,
        **attributes,
    )
    node.CopyFrom(plain)


def _rewire(graph: onnx.GraphProto, alias: dict[str, str]) -> None:
    if not alias:
        return
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        node.input[:] = [_resolved(alias, name) if name else name for name in node.input]
    for name in sorted(set(alias) & outputs):  # a graph output keeps its name: an Identity writes it
        graph.node.append(helper.make_node("Identity", [_resolved(alias, name)], [name], name=f"{name}/removed_block"))


def _reread_shapes(graph: onnx.GraphProto, past: set[str]) -> None:
    """What still reads a removed cache input reads only its shape (``find_blocks`` allows no other
    reader): the same cache of a kept layer has the same shape."""
    kept = [i.name for i in graph.input if i.name not in past]
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in past:
                pattern = re.sub(r"\d+", r"\\d+", re.escape(name), count=1)
                twin = next((other for other in kept if re.fullmatch(pattern, other)), None)
                if twin is None:
                    raise ValueError(f"no kept layer's cache can stand in for {name}")
                node.input[k] = twin


def _drop_cache(graph: onnx.GraphProto, past: set[str]) -> None:
    presents = set(decoder.cache_names(sorted(past), [o.name for o in graph.output])) - past
    _keep(graph.input, lambda v: v.name not in past)
    _keep(graph.output, lambda v: v.name not in presents)


def _keep(field, wanted) -> None:
    kept = [item for item in field if wanted(item)]
    if len(kept) != len(field):
        del field[:]
        field.extend(kept)


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Nodes no graph output needs, then the initializers and shapes nothing reads."""
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output if o):
            kept.append(node)
            live.update(i for i in node.input if i)
            live.update(_subgraph_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    _keep(graph.initializer, lambda t: t.name in live)
    _keep(graph.value_info, lambda v: v.name in live)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attribute in node.attribute:
        for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            for inner in body.node:
                names.update(inner.input)
                names.update(_subgraph_reads(inner))
    return names


def _renumber_cache(graph: onnx.GraphProto) -> None:
    """Cache names numbered 0, 1, ... again after layers went."""
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    names = sorted(decoder.cache_names(inputs, outputs))
    numbers = sorted({int(m.group(1)) for name in names if (m := re.search(r"(\d+)", name))})
    new = {old: k for k, old in enumerate(numbers)}
    rename = {}
    for name in names:
        match = re.search(r"(\d+)", name)
        if match and new[int(match.group(1))] != int(match.group(1)):
            rename[name] = name[: match.start()] + str(new[int(match.group(1))]) + name[match.end() :]
    if not rename:
        return
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for info in [*graph.input, *graph.output, *graph.value_info]:
        info.name = rename.get(info.name, info.name)


def _zero_branches(model: onnx.ModelProto, blocks: list[Block], shifts: dict[int, np.ndarray]) -> None:
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    zeros: dict[int, str] = {}
    added = []
    for block in blocks:
        for add in block.adds:
            elem = types.get(add.branch, onnx.TensorProto.FLOAT)
            if elem not in zeros:
                zeros[elem] = f"spa_zero_{onnx.TensorProto.DataType.Name(elem).lower()}"
                value = np.zeros((), _FLOAT_TYPES.get(elem, np.float32))
                graph.initializer.append(numpy_helper.from_array(value, zeros[elem]))
            zeroed = f"{add.branch}/zeroed"
            added.append((add.node, helper.make_node("Mul", [add.branch, zeros[elem]], [zeroed], name=zeroed)))
            if add is block.exit and block.index in shifts:  # the shift rides on the last branch
                shifted = f"{zeroed}/shift"
                graph.initializer.append(numpy_helper.from_array(shifts[block.index], f"{shifted}/value"))
                added.append((add.node, helper.make_node("Add", [zeroed, f"{shifted}/value"], [shifted], name=shifted)))
                zeroed = shifted
            node = nodes[add.node]
            node.input[:] = [zeroed if i == add.branch else i for i in node.input]
    # each Mul goes right before the add it feeds: the graph stays in topological order
    position = {n.name: k for k, n in enumerate(graph.node)}
    ordered = sorted(
        [(position[n.name], 1, n) for n in graph.node] + [(position[target], 0, mul) for target, mul in added],
        key=lambda item: (item[0], item[1]),
    )
    del graph.node[:]
    graph.node.extend(node for _, _, node in ordered)
