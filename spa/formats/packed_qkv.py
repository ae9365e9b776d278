"""GroupQueryAttention fed packed QKV, split into its query, key and value projections.

onnxruntime-genai's builder fuses the Q, K and V projections into one MatMul of width
``(num_heads + 2 * kv_num_heads) * head_size`` whose output GroupQueryAttention reads as packed
QKV (no key and value inputs). A head is then three blocks far apart in one weight, which the
attention rule cannot follow through the packing; fed separate Q, K and V, it prunes them as
whole KV heads with their query heads. The op takes either form, so the split is exact: the three
MatMuls compute the packed one's columns.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from spa.core.tensors import to_array
from spa.formats.nbits import OP_TYPE as NBITS
from spa.ops.linear import MatMul

MATMUL = MatMul.ops[0]


def split_packed_qkv(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every packed-QKV GroupQueryAttention whose projection is a MatMul by a weight
    (and a bias Add) fed three projections instead; the model itself where there is none."""
    graph = model.graph
    packed = [n for n in graph.node if _packed_attention(n)]
    if not packed:
        return model
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    added: dict[str, list[onnx.NodeProto]] = {}  # the projection's first node -> the split ones
    dropped: set[str] = set()
    unused: set[str] = set()
    for attention in packed:
        chain = _projection(attention.input[0], producers, initializers, readers, outputs)
        heads, kv_heads = (int(_attr(attention, a)) for a in ("num_heads", "kv_num_heads"))
        split = _split(graph, attention, chain, initializers, heads, kv_heads) if chain else None
        if chain and split:
            added[chain[0].name] = split
            dropped |= {n.name for n in chain}
            unused |= {i for n in chain for i in n.input[1:] if i in initializers}
    nodes = []
    for node in graph.node:
        nodes += [copy(n) for n in added.get(node.name, [])]
        if node.name not in dropped:
            nodes.append(copy(node))
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [copy(t) for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def copy(message):
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def _packed_attention(node: onnx.NodeProto) -> bool:
    return (
        node.op_type == "GroupQueryAttention"
        and node.domain == "com.microsoft"
        and (len(node.input) < 2 or not node.input[1])
        and (len(node.input) < 3 or not node.input[2])
    )


def _attr(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), 0)


def _projection(tensor, producers, initializers, readers, outputs) -> list[onnx.NodeProto] | None:
    """[MatMul] or [MatMul, bias Add] producing ``tensor``, read by nothing else."""
    chain: list[onnx.NodeProto] = []
    node = producers.get(tensor)
    if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        bias = [i for i in node.input if i in initializers]
        if len(bias) != 1 or len(initializers[bias[0]].dims) != 1 or readers.get(bias[0]) != 1:
            return None
        chain.append(node)
        node = producers.get(next(i for i in node.input if i not in initializers))
    if node is not None and node.op_type == NBITS and node.domain == "com.microsoft":
        # int4/int8 blocks by output row: B [N, blocks, blob], scales, zero points and bias per row
        weights = [i for i in node.input[1:] if i]
        if len(node.input) > 4 and node.input[4]:  # g_idx reorders the blocks: left fused
            return None
        if any(i not in initializers or readers.get(i) != 1 for i in weights):
            return None
        chain.insert(0, node)
        return chain if all(readers.get(n.output[0], 0) == 1 and n.output[0] not in outputs for n in chain) else None
    if node is None or node.op_type != MATMUL or node.domain not in ("", "ai.onnx"):
        return None
    weight = initializers.get(node.input[1])
    if weight is None or len(weight.dims) != 2 or readers.get(node.input[1]) != 1:
        return None
    chain.insert(0, node)
    inner = [n.output[0] for n in chain]
    if any(readers.get(t, 0) != 1 or t in outputs for t in inner):
        return None
    return chain


def _split(graph, attention, chain, initializers, heads: int, kv_heads: int) -> list[onnx.NodeProto] | None:
    """The Q, K and V projections (weights added to ``graph``) that replace ``chain``; ``attention``
    reads them. None where the packed width does not divide into the heads."""
    projection = chain[0]
    width = _out_width(projection, initializers)
    if width % (heads + 2 * kv_heads):
        return None
    size = width // (heads + 2 * kv_heads)
    bounds = np.cumsum([0, heads * size, kv_heads * size, kv_heads * size])
    bias_name = next((i for i in chain[1].input if i in initializers), None) if len(chain) == 2 else None
    bias = to_array(initializers[bias_name]) if bias_name else None
    nodes, parts = [], []
    for index, part in enumerate(("q", "k", "v")):
        lo, hi = int(bounds[index]), int(bounds[index + 1])
        out = f"{projection.output[0]}.{part}"
        nodes.append(_rows(graph, projection, initializers, lo, hi, part, out))
        if bias is not None and bias_name is not None:
            name, added = f"{bias_name}.{part}", f"{out}.bias"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias[lo:hi]), name))
            nodes.append(onnx.helper.make_node("Add", [out, name], [added], name=f"{chain[1].name}.{part}"))
            out = added
        parts.append(out)
    while len(attention.input) < 3:
        attention.input.append("")
    attention.input[0], attention.input[1], attention.input[2] = parts
    return nodes


def _out_width(projection: onnx.NodeProto, initializers) -> int:
    if projection.op_type == NBITS:
        return int(_attr(projection, "N"))
    return int(initializers[projection.input[1]].dims[1])


def _rows(graph, projection, initializers, lo: int, hi: int, part: str, out: str) -> onnx.NodeProto:
    """``projection`` computing output columns ``lo:hi`` only, its weights sliced into ``graph``."""
    inputs = [projection.input[0]]
    for name in projection.input[1:]:
        if not name:
            inputs.append(name)
            continue
        value = to_array(initializers[name])
        if projection.op_type == MATMUL:
            value = value[:, lo:hi]
        else:  # MatMulNBits: every weight input is laid out by output row, flat or not
            rows = int(_attr(projection, "N"))
            value = value.reshape(rows, -1)[lo:hi].reshape((hi - lo, *value.shape[1:]) if value.ndim > 1 else -1)
        sliced = f"{name}.{part}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), sliced))
        inputs.append(sliced)
    node = onnx.helper.make_node(
        projection.op_type, inputs, [out], name=f"{projection.name}.{part}", domain=projection.domain
    )
    node.attribute.extend(projection.attribute)
    if projection.op_type == NBITS:
        kept = [a for a in node.attribute if a.name != "N"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("N", hi - lo)])
    return node
