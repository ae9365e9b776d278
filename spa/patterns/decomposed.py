"""LayerNorm and RMSNorm written out as elementary ops, recognised from their ReduceMean.

Exporters often spell a norm over the last axis as

    LayerNorm: m = ReduceMean(x); d = x - m; v = ReduceMean(d ** 2); y = d / Sqrt(v + eps)
    RMSNorm:   v = ReduceMean(x ** 2); y = x * Reciprocal(Sqrt(v + eps))   (or x / Sqrt(...))

The element-wise ops already couple x, d and y channel for channel (the statistic broadcasts along
the reduced axis), and the ReduceMean is an inexact sink: dropping a channel changes the mean's
divisor and the statistics of the channels that stay. What this module adds is the name: a group
normalised this way is reported as a norm, not as an anonymous average. A ReduceMean whose result
never comes back to divide or centre its own input (a channel mean feeding a gate, a pooled
feature) is not a norm and keeps the generic description.
"""

from __future__ import annotations

# ops that turn a statistic into another one without mixing in other tensors' channels: the
# epsilon add, the root, its reciprocal, a cast back to the model's precision
_STATISTIC_STEPS = {"Add", "Sqrt", "Reciprocal", "Cast", "Pow", "Div", "Mul"}


def norm_kind(graph, reduce) -> str | None:
    """``"LayerNorm"`` or ``"RMSNorm"`` when ReduceMean ``reduce`` is a statistic of a norm written
    out, else None. Names the norm by its mean's ReduceMean for LayerNorm (both of its ReduceMeans
    then describe the same norm)."""
    source = reduce.inputs[0]
    squared = _squared(graph, source)
    base = squared if squared is not None else source
    if not _comes_back(graph, reduce.outputs[0], base, squared is not None):
        return None
    if squared is None:  # the mean itself, subtracted from its input: a norm if the difference is scaled
        return "LayerNorm" if _scaled(graph, reduce) else None
    return "LayerNorm" if _centred_by(graph, base) is not None else "RMSNorm"


def norm_name(graph, reduce) -> str | None:
    """How a report names the norm ``reduce`` belongs to, or None when it is not one."""
    kind = norm_kind(graph, reduce)
    if kind is None:
        return None
    anchor = reduce
    if kind == "LayerNorm":
        squared = _squared(graph, reduce.inputs[0])
        mean = _centred_by(graph, squared) if squared is not None else None
        anchor = mean or reduce
    return f"{kind} written out (ReduceMean '{anchor.name}')"


def _squared(graph, tensor: str) -> str | None:
    """``u`` when ``tensor`` is u ** 2 or u * u."""
    node = graph.producer.get(tensor)
    if node is None:
        return None
    if node.op_type == "Pow" and _scalar(graph, node.inputs[1]) == 2.0:
        return node.inputs[0]
    if node.op_type == "Mul" and len(node.inputs) == 2 and node.inputs[0] == node.inputs[1]:
        return node.inputs[0]
    return None


def _centred_by(graph, tensor: str):
    """The ReduceMean m when ``tensor`` is x - m with m = ReduceMean(x)."""
    node = graph.producer.get(tensor)
    if node is None or node.op_type != "Sub":
        return None
    x, m = node.inputs[0], node.inputs[1]
    mean = graph.producer.get(m)
    if mean is not None and mean.op_type == "ReduceMean" and mean.inputs[0] == x:
        return mean
    return None


def _scaled(graph, mean) -> bool:
    """Is some x - mean divided by the root of its own mean square (a variance ReduceMean)?"""
    for sub in graph.consumers.get(mean.outputs[0], []):
        if sub.op_type != "Sub":
            continue
        for square in graph.consumers.get(sub.outputs[0], []):
            if _squared(graph, square.outputs[0]) == sub.outputs[0]:
                for variance in graph.consumers.get(square.outputs[0], []):
                    if variance.op_type == "ReduceMean" and norm_kind(graph, variance) == "LayerNorm":
                        return True
    return False


def _comes_back(graph, statistic: str, base: str, squared: bool, depth: int = 6) -> bool:
    """Does ``statistic`` reach an op that centres (mean) or scales (root of a square) ``base``?

    Follows the statistic through scalar steps (epsilon, Sqrt, Reciprocal, Cast) a few ops deep."""
    frontier = [statistic]
    for _ in range(depth):
        reached: list[str] = []
        for tensor in frontier:
            for node in graph.consumers.get(tensor, []):
                others = [t for t in node.inputs if t and t != tensor]
                if squared and node.op_type == "Mul" and base in others:
                    return True
                if squared and node.op_type == "Div" and tuple(node.inputs[:2]) == (base, tensor):
                    return True
                if not squared and node.op_type == "Sub" and tuple(node.inputs[:2]) == (base, tensor):
                    return True
                if node.op_type in _STATISTIC_STEPS and all(_scalar(graph, t) is not None for t in others):
                    reached.extend(o for o in node.outputs if o)
        frontier = reached
        if not frontier:
            return False
    return False


def _scalar(graph, tensor: str) -> float | None:
    value = graph.const(tensor)
    if value is None or value.size != 1 or value.dtype.kind not in "fiu":
        return None
    return float(value.reshape(-1)[0])
