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
            unused |= {chain[0].input[1], *(i for n in chain[1:] for i in n.input if i in initializers)}
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
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
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
    matmul = chain[0]
    weight = to_array(initializers[matmul.input[1]])
    width = weight.shape[1]
    if width % (heads + 2 * kv_heads):
        return None
    size = width // (heads + 2 * kv_heads)
    bounds = np.cumsum([0, heads * size, kv_heads * size, kv_heads * size])
    bias = None
    if len(chain) == 2:
        bias = to_array(initializers[next(i for i in chain[1].input if i in initializers)])
    nodes, parts = [], []
    for index, part in enumerate(("q", "k", "v")):
        lo, hi = bounds[index], bounds[index + 1]
        name = f"{matmul.input[1]}.{part}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight[:, lo:hi]), name))
        out = f"{matmul.output[0]}.{part}"
        nodes.append(onnx.helper.make_node("MatMul", [matmul.input[0], name], [out], name=f"{matmul.name}.{part}"))
        if bias is not None:
            bias_name, added = f"{name}.bias", f"{out}.bias"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias[lo:hi]), bias_name))
            nodes.append(onnx.helper.make_node("Add", [out, bias_name], [added], name=f"{chain[1].name}.{part}"))
            out = added
        parts.append(out)
    while len(attention.input) < 3:
        attention.input.append("")
    attention.input[0], attention.input[1], attention.input[2] = parts
    return nodes
