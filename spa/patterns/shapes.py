"""Where shape vectors come from, so size constants can be rewritten after a cut.

A Reshape target may be an initializer, or built at run time by
Shape -> Gather -> Unsqueeze -> Concat. ``trace_vector`` follows such a chain
back and says, per element, whether it is a literal (and exactly where it
lives, so it can be rewritten), a run-time size of some tensor axis (which
follows the cut by itself), or opaque (we cannot know, so the axis freezes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import numpy_helper

from spa.core.graph import ModelGraph, Node
from spa.ops.gather import Gather

_PASS_THROUGH = ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape", "Flatten")


@dataclass(frozen=True)
class Entry:
    kind: str  # "literal" | "runtime" | "opaque"
    value: int | None = None
    # literal: (node name, input index, flat position) where the constant enters the chain
    # runtime: (tensor, axis) whose size this element is
    source: tuple | None = None
    # a run-time size times a literal (the legacy exporter's kv_heads * n_rep in repeat_kv):
    # ((tensor, axis), the literal's Entry), so a rewrite can keep the product right
    product: tuple | None = None


def trace_vector(graph: ModelGraph, node: Node, input_index: int, depth: int = 0) -> list[Entry] | None:
    name = node.input(input_index)
    if not name:
        return None
    values = graph.const_ints(name)
    if values is not None:
        return [Entry("literal", v, (node.name, input_index, p)) for p, v in enumerate(values)]
    producer = graph.producer.get(name)
    if producer is None or depth > 16:
        return _opaque(graph, name)
    op = producer.op_type
    if op == "Concat":
        entries: list[Entry] = []
        for j in range(len(producer.inputs)):
            piece = trace_vector(graph, producer, j, depth + 1)
            if piece is None:
                piece = _opaque(graph, producer.inputs[j])
                if piece is None:
                    return None
            entries.extend(piece)
        return entries
    if op in _PASS_THROUGH:
        return trace_vector(graph, producer, 0, depth + 1) or _opaque(graph, name)
    if op == "Shape":
        rank = len(graph.shape(producer.inputs[0]) or ())
        if not rank:
            return _opaque(graph, name)
        start, end = producer.attr("start", 0), producer.attr("end", rank)
        axes = range(rank)[slice(start, end)]
        return [Entry("runtime", None, (producer.inputs[0], a)) for a in axes]
    if op in _ARITHMETIC and len(producer.inputs) == 2:
        # c // 2 of a run-time size is still a run-time size: it follows the cut by itself,
        # and validation runs the pruned model to confirm the result fits
        left, right = (trace_vector(graph, producer, j, depth + 1) for j in (0, 1))
        if left and right and any(e.kind == "runtime" for e in left + right):
            length = max(len(left), len(right))
            if len(left) in (1, length) and len(right) in (1, length):
                return [_combine(left[k % len(left)], right[k % len(right)], op) for k in range(length)]
    if op == "Where" and _minus_one_to_one(graph, producer):
        # torch's expand(-1): sizes that are -1 become 1; run-time sizes and other literals stay
        base = trace_vector(graph, producer, 2, depth + 1)
        if base is not None and not any(e.kind == "literal" and e.value == -1 for e in base):
            return base
    if op == "Slice":  # shape[-2:], shape[:-2]: the dynamo exporter's way of keeping some sizes
        base = trace_vector(graph, producer, 0, depth + 1)
        bounds = _slice_bounds(graph, producer)
        if base is not None and bounds is not None:
            return base[slice(*bounds)]
    if op in Gather.ops and producer.attr("axis", 0) == 0:
        base = trace_vector(graph, producer, 0, depth + 1)
        picks = graph.const_ints(producer.inputs[1])
        if base is not None and picks is not None:
            return [base[k] for k in picks]
    return _opaque(graph, name)


_ARITHMETIC = ("Div", "Mul", "Add", "Sub")


def _slice_bounds(graph: ModelGraph, node: Node) -> tuple[int, int] | None:
    """Start and stop of a unit-step Slice of a 1-D vector, where both are known before running."""
    steps: list[int] | None
    if node.attr("starts") is not None:  # before opset 10
        starts, ends, axes, steps = node.attr("starts"), node.attr("ends"), node.attr("axes", [0]), [1]
    else:
        starts, ends = static_value(graph, node.input(1)), static_value(graph, node.input(2))
        axes = static_value(graph, node.input(3)) if node.input(3) else [0]
        steps = static_value(graph, node.input(4)) if node.input(4) else [1]
    if starts is None or ends is None or len(starts) != 1 or axes not in ([0], [-1]) or steps != [1]:
        return None
    return int(starts[0]), int(ends[0])  # numpy clamps like ONNX for a unit step


def _combine(a: Entry, b: Entry, op: str) -> Entry:
    if "opaque" in (a.kind, b.kind):
        return Entry("opaque")
    product = None
    if op == "Mul":
        size, factor = (a, b) if b.kind == "literal" else (b, a)
        if size.kind == "runtime" and size.source is not None and len(size.source) == 2 and factor.kind == "literal":
            product = (size.source, factor)
    return Entry("runtime", None, ("derived",), product)


def _minus_one_to_one(graph: ModelGraph, node: Node) -> bool:
    """Where(Equal(v, -1), 1, v): the legacy exporter's guard in front of an Expand shape."""
    cond, ones, v = (node.input(k) for k in range(3))
    equal = graph.producer.get(cond)
    if equal is None or equal.op_type != "Equal" or v not in equal.inputs:
        return False
    other = equal.inputs[1] if equal.inputs[0] == v else equal.inputs[0]
    return _filled(graph, ones) == 1 and _filled(graph, other) == -1


def _filled(graph: ModelGraph, tensor: str) -> int | None:
    """The one value every element of ``tensor`` holds, where the graph says it without running."""
    const = graph.const(tensor)
    if const is not None:
        values = np.unique(const)
        return int(values[0]) if len(values) == 1 and const.dtype.kind in "iu" else None
    node = graph.producer.get(tensor)
    if node is None:
        return None
    if node.op_type == "ConstantOfShape":
        value = node.attr("value")
        fill = numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1)
        return int(fill[0]) if len(fill) == 1 and fill.dtype.kind in "iu" else None
    if node.op_type == "Mul":
        a, b = (_filled(graph, x) for x in node.inputs[:2])
        return None if a is None or b is None else a * b
    return None


def _opaque(graph: ModelGraph, tensor: str) -> list[Entry] | None:
    shape = graph.shape(tensor)
    if shape is None or len(shape) > 1:
        return None
    length = shape[0] if shape else 1
    if not isinstance(length, int):
        return None
    return [Entry("opaque")] * length


def rewritable(entries: list[Entry] | None, position: int) -> str | None:
    """None if element ``position`` can follow a cut, else the reason it cannot."""
    if entries is None or position >= len(entries):
        return "the shape is computed at run time in a way spa cannot follow"
    if entries[position].kind == "opaque":
        return "its size is computed at run time in a way spa cannot follow"
    return None


def segments(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Pair runs of axes of equal size product (axes of size 1 carry nothing).

    ``[N, C, H, W] -> [N, C*H*W]`` gives ``[([0], [0]), ([1, 2, 3], [1])]``.
    Symbolic axes pair one-to-one when both are names; where anything else stops the scan
    (``[batch, seq, 768] -> [batch*seq, 768]``, GPT-2's Conv1D), the axes at the end are
    paired from the right, since row-major order keeps a trailing block of equal size intact.
    """
    a = [(i, s) for i, s in enumerate(in_shape) if s != 1]
    b = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    result, i, j = _runs(a, b)
    if i < len(a) and j < len(b):
        tail, _, _ = _runs(a[i:][::-1], b[j:][::-1])
        result += [(ins[::-1], outs[::-1]) for ins, outs in reversed(tail)]
    return result


def _runs(a, b):
    """Runs of equal product from the start of ``a`` and ``b``, and how far they reach."""
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        (ia, sa), (jb, sb) = a[i], b[j]
        if not isinstance(sa, int) or not isinstance(sb, int):
            # two names in step stand for the same axis (batch, or onnx's unk__3 for it); an
            # expression such as '4*batch' merges a static axis in and ends the run
            if not (
                sa == sb or (isinstance(sa, str) and isinstance(sb, str) and sa.isidentifier() and sb.isidentifier())
            ):
                break
            result.append(([ia], [jb]))
            i, j = i + 1, j + 1
            continue
        ins, outs, pa, pb = [ia], [jb], sa, sb
        ni, nj = i + 1, j + 1
        while pa != pb:
            if pa < pb and ni < len(a) and isinstance(a[ni][1], int):
                ins.append(a[ni][0])
                pa *= a[ni][1]
                ni += 1
            elif pb < pa and nj < len(b) and isinstance(b[nj][1], int):
                outs.append(b[nj][0])
                pb *= b[nj][1]
                nj += 1
            else:
                return result, i, j
        result.append((ins, outs))
        i, j = ni, nj
    return result, i, j


def static_value(graph: ModelGraph, tensor: str, depth: int = 0) -> list[int] | None:
    """Evaluate a small integer shape computation whose inputs are all static.

    Exporters compute Slice bounds and sizes from Shape at run time even where
    every axis involved is static (torch.chunk in the legacy exporter). NaN
    marks a symbolic axis, so anything that depends on one comes back None.
    """
    value = _evaluate(graph, tensor, depth)
    if value is None or np.isnan(value).any():
        return None
    return [int(v) for v in value.reshape(-1)]


def _evaluate(graph: ModelGraph, tensor: str, depth: int) -> np.ndarray | None:
    const = graph.const(tensor)
    if const is not None:
        return const.astype(np.float64) if const.dtype.kind in "iuf" else None
    node = graph.producer.get(tensor)
    if node is None or depth > 32:
        return None
    op = node.op_type
    if op == "Shape":
        shape = graph.shape(node.inputs[0])
        if shape is None:
            return None
        full = np.array([s if isinstance(s, int) else np.nan for s in shape], dtype=np.float64)
        return full[slice(node.attr("start", 0), node.attr("end", len(shape)))]
    args = [_evaluate(graph, name, depth + 1) if name else None for name in node.inputs]
    x = args[0]
    if x is None:
        return None
    if op in ("Cast", "Identity"):
        return x
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        return x.reshape(-1)
    if op in Gather.ops and args[1] is not None and node.attr("axis", 0) == 0:
        return x.reshape(-1)[args[1].astype(np.int64)]
    pieces = [a for a in args if a is not None]
    if op == "Concat" and len(pieces) == len(args):
        return np.concatenate([piece.reshape(-1) for piece in pieces])
    if op in ("Add", "Sub", "Mul", "Div") and args[1] is not None:
        y = args[1]
        with np.errstate(all="ignore"):
            return _ARITHMETIC_FUNCTIONS[op](x, y)
    return None


def _truncating_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # ONNX's integer Div truncates towards zero, where floor division would round down
    return np.trunc(a / b)


_ARITHMETIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": _truncating_divide,
}

_FLOAT_TYPES = {1, 10, 11, 16}  # float, float16, double, bfloat16
# inputs that take a vector as a shape, a bound or a count: a size there follows the cut
_SHAPE_OPERANDS = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Split": (1,),
    "Pad": (1, 2, 3),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "TopK": (1,),
    "OneHot": (1,),
    "Trilu": (1,),
}


def size_read_as_value(graph: ModelGraph, shape_node: Node, axis: int) -> Node | None:
    """The op that turns the size of ``axis`` into a number the model computes with, if any.

    A size that only becomes another shape (a Reshape target, an Expand shape, a Slice
    bound, a Range length) follows a cut by itself. One that becomes a float does not: the
    attention scale 1/sqrt(head_dim) computed from Shape changes when head_dim shrinks, and the
    pruned model would compute something else than the dense one.
    """
    if shape_node.op_type == "Shape":
        rank = len(graph.shape(shape_node.inputs[0]) or ())
        start = shape_node.attr("start", 0)
        held: frozenset | None = frozenset({axis - (start % rank if rank and start < 0 else start)})
    else:
        held = None  # Size: one number that every axis enters
    todo = [(shape_node.outputs[0], held)]
    seen = 0
    while todo and seen < 64:
        tensor, held = todo.pop()
        seen += 1
        if held is not None and not held:
            continue
        for node in graph.consumers.get(tensor, []):
            slots = [k for k, name in enumerate(node.inputs) if name == tensor]
            if all(k in _SHAPE_OPERANDS.get(node.op_type, ()) for k in slots):
                continue
            out = node.outputs[0] if node.outputs else ""
            if graph.dtypes.get(out) in _FLOAT_TYPES or (node.op_type == "Cast" and node.attr("to") in _FLOAT_TYPES):
                return node
            moved = _positions_after(graph, node, tensor, held)
            todo.extend((o, moved) for o in node.outputs if o)
    return None


_KEEP_POSITIONS = (
    "Unsqueeze",
    "Squeeze",
    "Identity",
    "Reshape",
    "Flatten",
    "Cast",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Mod",
    "Max",
    "Min",
    "Neg",
    "Abs",
)


def _positions_after(graph: ModelGraph, node: Node, tensor: str, held: frozenset | None) -> frozenset | None:
    """Where the held positions of a vector land in the output of ``node``. None is every
    position: where it cannot be told, all are followed, so that a float further on is found."""
    op = node.op_type
    if held is None:
        return None
    length = graph.static_size(tensor, 0) if len(graph.shape(tensor) or ()) == 1 else None
    if op in Gather.ops and tensor == node.inputs[0] and length:
        picks = graph.const_ints(node.inputs[1])
        if picks is not None:
            return frozenset(k for k, p in enumerate(picks) if p % length in held)
    if op == "Slice" and tensor == node.inputs[0] and length:
        bounds = _slice_bounds(graph, node)
        if bounds is not None:
            begin, end, _ = slice(*bounds).indices(length)
            return frozenset(p - begin for p in held if begin <= p < end)
    if op == "Concat":
        offset = 0
        for name in node.inputs:
            if name == tensor:
                return frozenset(p + offset for p in held)
            size = graph.static_size(name, 0) if graph.shape(name) else 1
            if size is None:
                return None
            offset += size
    return held if op in _KEEP_POSITIONS else None
