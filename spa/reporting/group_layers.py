"""The weighted ops a group slices, as reports name them (op, node and which side of its weight)."""

from __future__ import annotations

from spa.analysis.groups import Analysis, Group
from spa.core.graph import ModelGraph
from spa.formats.quantized import quantized_weight
from spa.ops.base import Dim


def group_layers(analysis: Analysis, group: Group, op_types: dict[str, str]) -> list[str]:
    """The weighted ops a group slices, named by their type in the model as given."""
    graph = analysis.graph
    out = []
    for member in analysis.param_dims(group):
        for node, dim in weight_readers(graph, member):
            if dim.tensor not in node.inputs:  # read only from inside one of its subgraphs
                out.append(f"{op_types.get(node.name, node.op_type)} '{node.name}' (inside a subgraph)")
                continue
            index = node.inputs.index(dim.tensor)
            if node.op_type in ("Conv", "ConvTranspose", "Gemm") and index == 2:
                continue  # a bias travels with its weight's output side
            side = weight_side(node.op_type, index, dim.axis, node)
            out.append(f"{op_types.get(node.name, node.op_type)} '{node.name}'{side}")
    return list(dict.fromkeys(out))


def weight_readers(graph: ModelGraph, dim: Dim):
    """The ops reading a weight, seen through a Transpose (a tied lm head multiplies by the
    embedding table transposed) or the DequantizeLinear of a quantized weight, each with the
    weight's axis as that op sees it."""
    for node in graph.consumers.get(dim.tensor, []):
        perm = node.attr("perm") if node.op_type == "Transpose" else None
        if node.outputs[0] in graph.output_names:
            yield node, dim
        elif perm is not None:
            seen = Dim(node.outputs[0], list(perm).index(dim.axis))
            yield from ((reader, seen) for reader in graph.consumers.get(seen.tensor, []))
        elif node.op_type == "DequantizeLinear" and (stored := quantized_weight(graph, node.outputs[0])):
            # its scale and zero point run along its axis
            axis = dim.axis if dim.tensor == stored.data else stored.axis
            yield from weight_readers(graph, Dim(node.outputs[0], axis))
        else:
            yield node, dim


def weight_side(op: str, index: int, axis: int, node) -> str:
    if op in ("Conv", "ConvInteger") and index == 1:
        return " out" if axis == 0 else " in"
    if op == "ConvTranspose" and index == 1:
        return " in" if axis == 0 else " out"
    if op == "Gemm" and index == 1:
        return " out" if (axis == 0) == bool(node.attr("transB", 0)) else " in"
    if op in ("MatMul", "MatMulInteger") and index == 1:
        return " out" if axis == 1 else " in"
    return ""


def is_ffn(group: dict) -> bool:
    """A feed-forward hidden group (``GroupReport`` as a dict): one or two linears write it (up,
    or gate and up) and one reads it (down). The model width has many readers (every q, k, v
    and up projection) and attention groups have a kind."""

    def sides(side: str) -> int:
        return sum(
            x.startswith(("MatMul", "Gemm", "QGemm", "QLinearMatMul")) and x.endswith(side) for x in group["layers"]
        )

    return (
        group.get("kind") is None
        and group["channels"] > 1
        and sides(" in") == 1
        and 1 <= sides(" out") <= 2
        and not any(x.startswith(("Conv", "QLinearConv")) for x in group["layers"])
    )
