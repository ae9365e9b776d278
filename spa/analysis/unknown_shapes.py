"""Where unknown shapes start: a group frozen because its sizes are unknown names the op that lost
them, which is what the user can act on (declare its output shapes, or give spa an operator for it),
rather than the layer far downstream where the missing size was noticed."""

from __future__ import annotations

from spa.core.graph import ModelGraph, Node
from spa.ops.registry import Registry


class ShapeOrigins:
    """The first node upstream of a node whose inputs have shapes and whose outputs have none."""

    def __init__(self, graph: ModelGraph, registry: Registry):
        self.graph, self.registry = graph, registry
        self._found: dict[str, Node | None] = {}

    def cause(self, node: Node) -> str | None:
        """Why shapes are unknown around ``node``, naming the op where they start; None when every
        tensor ``node`` touches has a shape."""
        if all(self.graph.shape(t) is not None for t in (*node.inputs, *node.outputs) if t):
            return None
        origin = self._origin(node)
        if origin is None:
            return None
        what = f"{origin.op_type} '{origin.name}'"
        if self.registry.of(origin) is None:
            domain = origin.domain or "ai.onnx"
            return (
                f"shapes are unknown from {what} on: spa has no operator for {origin.op_type} ({domain}) and "
                "neither onnx nor onnxruntime infers its output shape; give its outputs shapes in the model's "
                "value_info, or add an operator for it (see Adding an operator in the docs)"
            )
        return (
            f"shapes are unknown from {what} on: neither onnx nor onnxruntime infers its output shape here; "
            "give its outputs shapes in the model's value_info, or --input-shape for free input axes"
        )

    def _origin(self, node: Node) -> Node | None:
        if node.name in self._found:
            return self._found[node.name]
        found, seen, stack = None, set(), [node]
        while stack and found is None:
            current = stack.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            unknown = [t for t in current.inputs if t and self.graph.shape(t) is None]
            if not unknown:
                if any(self.graph.shape(t) is None for t in current.outputs if t):
                    found = current
                continue
            stack.extend(self.graph.producer[t] for t in unknown if t in self.graph.producer)
        self._found[node.name] = found
        return found
