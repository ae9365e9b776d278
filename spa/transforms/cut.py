"""Stage 6: apply a plan to the model.

Hard mode slices every initializer along its pruned axes and lets each op's
rule fix the attributes and shape constants that encode sizes. Soft mode
keeps every shape and zeroes the same slices instead: the reference the hard
model is checked against.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from spa.analysis.groups import Analysis
from spa.core.coupling import Dim, RuleContext
from spa.core.graph import ModelGraph, Node
from spa.core.tensors import TensorWriter, shell, to_array
from spa.ops.registry import DEFAULT, Registry
from spa.planning.plan import Plan

# shape inference reads small tensors' values (they may be shape constants): those are always cut for real
_SMALL = 4096


class CutContext(RuleContext):
    """What ``Rule.rewrite`` sees: old and new sizes, and ways to change the node."""

    def __init__(self, graph: ModelGraph, opset: int, analysis: Analysis, plan: Plan):
        super().__init__(graph, opset)
        removed = plan.removed_units
        self._kept: dict[Dim, np.ndarray] = {}
        if len(removed):
            for dim, labels in analysis.labels.items():
                mask = ~np.isin(labels, removed)
                if not mask.all():
                    self._kept[dim] = np.flatnonzero(mask)
        self.attr_changes: dict[str, dict[str, object]] = {}
        self.input_consts: dict[tuple[str, int], np.ndarray] = {}
        self.const_edits: dict[tuple[str, int], dict[int, int]] = {}

    # sizes -----------------------------------------------------------------
    def kept(self, dim: Dim) -> np.ndarray | None:
        """Indices that stay along ``dim``, or None when nothing is removed there."""
        return self._kept.get(dim)

    def old_size(self, dim: Dim) -> int | None:
        return self.graph.static_size(dim.tensor, dim.axis)

    def new_size(self, dim: Dim) -> int | None:
        keep = self._kept.get(dim)
        return len(keep) if keep is not None else self.old_size(dim)

    @property
    def pruned_dims(self) -> dict[Dim, np.ndarray]:
        return self._kept

    def initializer_cuts(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        """For each initializer that loses indices: (axis, indices kept) pairs."""
        by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
        for dim, keep in sorted(self._kept.items()):
            if self.graph.is_initializer(dim.tensor):
                by_tensor.setdefault(dim.tensor, []).append((dim.axis, keep))
        return by_tensor

    # edits -----------------------------------------------------------------
    def set_attr(self, node: Node, name: str, value) -> None:
        self.attr_changes.setdefault(node.name, {})[name] = value

    def remove_attr(self, node: Node, name: str) -> None:
        if node.attr(name) is not None:
            self.attr_changes.setdefault(node.name, {})[name] = None

    def set_input_const(self, node: Node, index: int, value: np.ndarray) -> None:
        """Point input ``index`` of ``node`` at a new initializer (never edits a shared one)."""
        self.input_consts[(node.name, index)] = value

    def set_const_element(self, node_name: str, index: int, position: int, value: int) -> None:
        edits = self.const_edits.setdefault((node_name, index), {})
        if edits.get(position, value) != value:
            raise ValueError(f"conflicting size rewrites of input {index} of '{node_name}'")
        edits[position] = value


def soft_transform(graph: ModelGraph, analysis: Analysis, plan: Plan):
    """Zero the plan's slices tensor by tensor, for writing a soft model without holding it."""
    recipe = CutContext(graph, 0, analysis, plan).initializer_cuts()
    fills = soft_fills(graph, analysis.registry)
    return lambda name, value: (
        _cut_array(value, recipe[name], soft=True, fill=fills.get(name, 0)) if name in recipe else value
    )


def soft_fills(graph: ModelGraph, registry: Registry = DEFAULT) -> dict[str, np.ndarray | None]:
    """What the soft model writes where an initializer loses channels, when not zero (``Operator.soft_fills``)."""
    fills: dict[str, np.ndarray | None] = {}
    for node in graph.nodes:
        rule = registry.rule(node)
        if rule is not None:
            fills.update(rule.soft_fills(node, graph))
    return fills


def apply_plan(
    model: onnx.ModelProto,
    graph: ModelGraph,
    analysis: Analysis,
    plan: Plan,
    opset: int,
    soft: bool = False,
    spill: Path | None = None,
    shapes_only: bool = False,
) -> onnx.ModelProto:
    """The cut model. With ``spill`` (a data file path), every external tensor is streamed
    there and the model refers to it, so a large model's cut never sits in memory.

    ``shapes_only`` gives cut weights their new dims but no data: enough to count params and
    FLOPs of a candidate plan (target searches) without touching the weights.
    """
    cut = CutContext(graph, opset, analysis, plan)
    out = shell(model)
    new_shapes: dict[str, tuple[int, ...]] = {}
    recipe = cut.initializer_cuts()
    fills = soft_fills(graph, analysis.registry) if soft else {}
    writer = TensorWriter(spill, absolute=True) if spill is not None else None
    try:
        for tensor in model.graph.initializer:
            if shapes_only and tensor.name in recipe and math.prod(tensor.dims) > _SMALL:
                out.graph.initializer.append(_dims_only(tensor, recipe[tensor.name]))
            elif tensor.name in recipe:  # one tensor at a time: never two copies of the weights
                dense = graph.const(tensor.name)
                assert dense is not None, tensor.name  # the graph was read from this model's initializers
                value = _cut_array(dense, recipe[tensor.name], soft, fills.get(tensor.name, 0))
                new_shapes[tensor.name] = value.shape
                out.graph.initializer.append(
                    writer.add(tensor.name, tensor.data_type, value)
                    if writer
                    else numpy_helper.from_array(value, tensor.name)
                )
                del value
            elif writer and uses_external_data(tensor):  # onnxruntime reads one folder: gather it all
                out.graph.initializer.append(writer.add(tensor.name, tensor.data_type, to_array(tensor)))
            else:
                out.graph.initializer.append(tensor)
    finally:
        if writer:
            writer.close()
    if soft:
        return out
    touched = {dim.tensor for dim in cut.pruned_dims}
    for node in graph.nodes:
        rule = analysis.registry.rule(node)
        if rule is not None and touched.intersection(node.inputs + node.outputs):
            rule.rewrite(node, cut)
    _apply_node_edits(out, graph, cut)
    _fix_declared_shapes(out, new_shapes)
    _fix_io_shapes(out, cut)
    del out.graph.value_info[:]
    return out


def _dims_only(tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]]) -> onnx.TensorProto:
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type)
    dims = list(tensor.dims)
    for axis, keep in axes:
        dims[axis] = len(keep)
    stub.dims.extend(dims)
    return stub


def _cut_array(
    value: np.ndarray, axes: list[tuple[int, np.ndarray]], soft: bool, fill: np.ndarray | float | None = 0
) -> np.ndarray:
    """Slice ``value`` to the kept indices, or (``soft``) write ``fill`` over the others; a
    ``fill`` of None leaves the soft value as it is."""
    for axis, keep in axes:
        if soft:
            if fill is None:
                return value
            drop = np.setdiff1d(np.arange(value.shape[axis]), keep)
            value = value.copy()
            index: list[slice | np.ndarray] = [slice(None)] * value.ndim
            index[axis] = drop
            value[tuple(index)] = np.broadcast_to(np.asarray(fill, value.dtype), value.shape)[tuple(index)]
        else:
            value = np.take(value, keep, axis=axis)
    return np.ascontiguousarray(value)


def _apply_node_edits(out: onnx.ModelProto, graph: ModelGraph, cut: CutContext) -> None:
    taken = {t.name for t in out.graph.initializer} | {v for n in graph.nodes for v in n.outputs}
    protos = {n.name: n for n in out.graph.node}
    replaced: set[str] = set()

    def new_name(base: str) -> str:
        k = 0
        while f"{base}_spa{k}" in taken:
            k += 1
        taken.add(f"{base}_spa{k}")
        return f"{base}_spa{k}"

    def repoint(node_name: str, index: int, value: np.ndarray) -> None:
        proto = protos[node_name]
        old = proto.input[index] if index < len(proto.input) else ""
        name = new_name(old or f"{node_name}_in{index}")
        out.graph.initializer.append(numpy_helper.from_array(value, name))
        while len(proto.input) <= index:
            proto.input.append("")
        proto.input[index] = name
        if old:
            replaced.add(old)

    for (node_name, index), edits in sorted(cut.const_edits.items()):
        value = np.array(graph.const(protos[node_name].input[index]))
        flat = value.reshape(-1)
        for position, element in edits.items():
            flat[position] = element
        repoint(node_name, index, flat.reshape(value.shape))
    for (node_name, index), value in sorted(cut.input_consts.items()):
        repoint(node_name, index, value)
    for node_name, changes in sorted(cut.attr_changes.items()):
        proto = protos[node_name]
        for name, attribute in changes.items():
            kept = [a for a in proto.attribute if a.name != name]
            del proto.attribute[:]
            proto.attribute.extend(kept)
            if attribute is not None:
                proto.attribute.append(onnx.helper.make_attribute(name, attribute))
    used_now = {name for n in out.graph.node for name in n.input} | {o.name for o in out.graph.output}
    used_now |= {name for n in graph.nodes for name in n.implicit_inputs}
    orphans = replaced - used_now
    if orphans:
        kept = [t for t in out.graph.initializer if t.name not in orphans]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)


def _fix_declared_shapes(out: onnx.ModelProto, new_shapes: dict[str, tuple[int, ...]]) -> None:
    """Old-style models also list initializers as graph inputs, with their shapes."""
    for value_info in out.graph.input:
        if value_info.name in new_shapes:
            dims = value_info.type.tensor_type.shape.dim
            for d, size in zip(dims, new_shapes[value_info.name]):
                d.Clear()
                d.dim_value = size


def _fix_io_shapes(out: onnx.ModelProto, cut: CutContext) -> None:
    """Graph I/O a cut shrinks (only a decoder's key/value cache, on its head axis) declares its
    new size where the axis is fixed."""
    for value_info in [*out.graph.input, *out.graph.output]:
        dims = value_info.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            kept = cut.kept(Dim(value_info.name, axis))
            if kept is not None and d.HasField("dim_value"):
                d.dim_value = len(kept)
