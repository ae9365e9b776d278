"""The weighted ops a group slices, as reports name them (op, node and which side of its weight)."""

from __future__ import annotations

from dataclasses import dataclass

from spa.analysis.groups import Analysis, Group
from spa.core.coupling import Dim
from spa.core.graph import ModelGraph
from spa.formats.quantized import quantized_weight
from spa.ops.quantize import Dequantize


@dataclass(frozen=True)
class LayerRole:
    """One weighted op a group slices: its type in the model as given, its node, the side of its
    weight the group is on ("in", "out" or None) and what kind of layer it is ("dense", "conv" or None)."""

    op: str
    node: str
    side: str | None
    kind: str | None
    in_subgraph: bool = False

    def __str__(self) -> str:
        if self.in_subgraph:
            return f"{self.op} '{self.node}' (inside a subgraph)"
        return f"{self.op} '{self.node}'" + (f" {self.side}" if self.side else "")


def group_layer_roles(analysis: Analysis, group: Group, op_types: dict[str, str]) -> list[LayerRole]:
    """The weighted ops a group slices, named by their type in the model as given."""
    graph, registry = analysis.graph, analysis.registry
    out = []
    for member in analysis.param_dims(group):
        for node, dim in weight_readers(graph, member):
            operator = registry.of(node)
            kind = operator.layer_kind if operator is not None else None
            op = op_types.get(node.name, node.op_type)
            if dim.tensor not in node.inputs:  # read only from inside one of its subgraphs
                out.append(LayerRole(op, node.name, None, kind, in_subgraph=True))
                continue
            index = node.inputs.index(dim.tensor)
            if operator is not None and index == operator.bias_input:
                continue  # a bias travels with its weight's output side
            side = operator.weight_side(node, index, dim.axis) if operator is not None else None
            out.append(LayerRole(op, node.name, side, kind))
    return list(dict.fromkeys(out))


def group_layers(analysis: Analysis, group: Group, op_types: dict[str, str]) -> list[str]:
    """The weighted ops a group slices, as reports print them."""
    return list(dict.fromkeys(str(role) for role in group_layer_roles(analysis, group, op_types)))


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
        elif node.op_type in Dequantize.ops and (stored := quantized_weight(graph, node.outputs[0])):
            # its scale and zero point run along its axis
            axis = dim.axis if dim.tensor == stored.data else stored.axis
            if axis is not None:  # one scale for the whole weight runs along none of its axes
                yield from weight_readers(graph, Dim(node.outputs[0], axis))
        else:
            yield node, dim


def is_ffn(group: dict) -> bool:
    """A feed-forward hidden group (``GroupReport`` as a dict): one or two dense layers write it
    (up, or gate and up) and one reads it (down). The model width has many readers (every q, k, v
    and up projection) and attention groups have a kind."""
    roles = group.get("layer_roles", [])

    def sides(side: str) -> int:
        return sum(role["kind"] == "dense" and role["side"] == side and not role["in_subgraph"] for role in roles)

    return (
        group.get("kind") is None
        and group["channels"] > 1
        and sides("in") == 1
        and 1 <= sides("out") <= 2
        and not any(role["kind"] == "conv" for role in roles)
    )
