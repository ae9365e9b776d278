"""LSTM, GRU and RNN: a hidden unit is one channel across every gate block.

With G gate blocks (LSTM iofc: 4, GRU zrh: 3, RNN: 1) and D directions, hidden index j is
row g*H + j of W [D, G*H, I] and of R [D, G*H, H] for every block g, column j of R (the
recurrence reads h_j), entries g*H + j of B [D, 2*G*H] (Wb then Rb blocks), of the LSTM
peepholes P [D, 3*H], and the last axis of the initial states and of Y, Y_h, Y_c. Both
directions index the same H axis, so j goes in both at once. W's input axis contracts X's
last axis, as a linear layer does.

Soft == hard. With its rows of W, R, B and P zeroed, unit j's gate pre-activations are 0 at
every step (``clip`` bounds them to [-clip, clip], and 0 stays 0), and every other unit reads
h_j only through column j of R, which is zeroed too. So zeroing j never changes the other
units, whatever the activations or initial states: the op itself is exact. What is left is
whether unit j's own outputs are zero in the soft model, which matters only to consumers
without a weight of their own (a weightless reduction); ``soft_zero`` answers that from the
activations' values at 0 and the initial states.
"""

from __future__ import annotations

import math

import numpy as np

from spa.core.coupling import Dim, LinkSet, Sink, pairs
from spa.ops import cost
from spa.ops.base import Operator, static_weight_dims

_TIME, _BATCH, _DIRECTION, _HIDDEN, _INPUT = "time", "batch", "direction", "hidden", "input"

# value at 0 of the activations ONNX allows; the two that depend on a parameter are below
_AT_ZERO = {
    "relu": 0.0,
    "tanh": 0.0,
    "sigmoid": 0.5,
    "leakyrelu": 0.0,
    "thresholdedrelu": 0.0,
    "scaledtanh": 0.0,
    "elu": 0.0,
    "softsign": 0.0,
    "softplus": math.log(2.0),
}
_AT_ZERO_DEFAULT_BETA = {"affine": 0.0, "hardsigmoid": 0.5}


def _gate_rows(hidden: int, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit, row) pairs: block g holds unit j at row g*H + j, so every gate of j goes together."""
    return np.tile(np.arange(hidden), blocks), np.arange(blocks * hidden)


def _output(node, index: int) -> str:
    return node.outputs[index] if index < len(node.outputs) else ""


class _Recurrent(Operator):
    gates = 1
    # per hidden unit and step, besides the gate products and biases
    gate_math = 1
    default_activations: tuple[str, ...] = ()
    state_inputs: tuple[int, ...] = (5,)
    state_outputs: tuple[int, ...] = (1,)
    not_parameter_inputs = state_inputs  # data: exporters store zero initial states as initializers

    def flops(self, graph, node):
        x, w = cost.input_shape(graph, node, 0), cost.input_shape(graph, node, 1)
        if x is None or w is None or len(x) != 3 or len(w) != 3:
            return 0
        directions, gate_rows, inputs = (cost.size(d) for d in w)  # W is [directions, gates * H, I]
        hidden = node.attr("hidden_size") or gate_rows // self.gates
        steps, batch = (x[1], x[0]) if node.attr("layout", 0) else (x[0], x[1])
        per_step = 2 * gate_rows * (inputs + hidden) + self.gate_math * hidden
        if node.input(3):
            per_step += 2 * gate_rows  # both bias vectors (Wb and Rb) are added
        per_step += self._peephole_flops(node, hidden)
        return per_step * cost.size(steps) * cost.size(batch) * directions

    def _peephole_flops(self, node, hidden: int) -> int:
        return 0

    def layer_widths(self, graph, node):
        dims = static_weight_dims(graph, node)
        if dims is None or len(dims) != 3:
            return None
        return dims[2], (dims[1] // self.gates if dims[1] is not None else None)

    def seeds(self, node, ctx):
        return [Dim(node.inputs[1], 2), Dim(node.inputs[2], 2)]

    # which axis of which tensor is what ------------------------------------------------------
    def _roles(self, node) -> dict[tuple[str, int], str]:
        batch_first = bool(node.attr("layout", 0))
        x, w, r = node.inputs[:3]
        roles = {
            (w, 0): _DIRECTION,
            (w, 1): _HIDDEN,
            (w, 2): _INPUT,
            (r, 0): _DIRECTION,
            (r, 1): _HIDDEN,
            (r, 2): _HIDDEN,
            (x, 2): _INPUT,
            (x, 1 if batch_first else 0): _TIME,
            (x, 0 if batch_first else 1): _BATCH,
        }
        for slot, _ in self._blocks(node)[2:]:  # B and P
            roles.update({(node.input(slot), 0): _DIRECTION, (node.input(slot), 1): _HIDDEN})
        if node.input(4):
            roles[(node.input(4), 0)] = _BATCH
        # initial and final states: [D, N, H], or [N, D, H] with layout=1
        states = [node.input(i) for i in self.state_inputs] + [_output(node, i) for i in self.state_outputs]
        for name in filter(None, states):
            roles.update(
                {
                    (name, 0): _BATCH if batch_first else _DIRECTION,
                    (name, 1): _DIRECTION if batch_first else _BATCH,
                    (name, 2): _HIDDEN,
                }
            )
        y = _output(node, 0)
        if y:  # [T, D, N, H], or [N, T, D, H] with layout=1
            order = (_BATCH, _TIME, _DIRECTION) if batch_first else (_TIME, _DIRECTION, _BATCH)
            roles.update({(y, axis): role for axis, role in enumerate(order)})
            roles[(y, 3)] = _HIDDEN
        return roles

    def _hidden_dims(self, node) -> list[Dim]:
        """Every axis indexed by hidden units one for one (R's columns first: the hub)."""
        names = [node.input(i) for i in self.state_inputs] + [_output(node, i) for i in self.state_outputs]
        dims = [Dim(node.inputs[2], 2)] + [Dim(n, 2) for n in names if n]
        if _output(node, 0):
            dims.append(Dim(_output(node, 0), 3))
        return dims

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        name = f"{node.op_type} '{node.name}'"
        if node.inputs[1] == node.inputs[2]:
            links.freeze(dim, f"{name} uses one tensor as both W and R")
            return links.out
        roles = self._roles(node)
        role = roles.get((dim.tensor, dim.axis))
        if role == _HIDDEN:
            self._link_hidden(node, dim, links, ctx, name)
        elif role == _INPUT:
            x_in, w_in = Dim(node.inputs[0], 2), Dim(node.inputs[1], 2)
            links.same(x_in, w_in)
            links.add(Sink((x_in, w_in)))
        elif role == _BATCH:
            for (tensor, axis), other in roles.items():
                if other == _BATCH:
                    links.same(dim, Dim(tensor, axis))
        elif role == _TIME:
            links.freeze(dim, f"time axis of {name}: the recurrence runs along it")
        elif role == _DIRECTION:
            links.freeze(dim, f"direction axis of {name}")
        else:
            links.freeze(dim, f"axis {dim.axis} of {name} has no known role")
        return links.out

    def _link_hidden(self, node, dim, links, ctx, name):
        hub = Dim(node.inputs[2], 2)
        hidden = ctx.size(hub)
        declared = node.attr("hidden_size")
        if hidden is None or (declared is not None and declared != hidden):
            reason = (
                f"hidden size of {name} unknown"
                if hidden is None
                else (f"{name} declares hidden_size {declared} but R has {hidden} columns")
            )
            links.freeze(dim, reason)
            links.freeze(hub, reason)
            return
        for slot, blocks in self._blocks(node):
            rows = Dim(node.input(slot), 1)
            size = ctx.size(rows)
            if size != blocks * hidden:
                reason = f"{rows} of {name} is {size}, not {blocks} blocks of hidden size {hidden}"
                links.freeze(rows, reason)
                links.freeze(hub, reason)
                continue
            links.add(pairs(hub, rows, *_gate_rows(hidden, blocks)))
        for other in self._hidden_dims(node)[1:]:
            links.same(hub, other)

    def _blocks(self, node) -> list[tuple[int, int]]:
        """(input slot, blocks of H rows) of the present inputs: W and R one block per gate, B two."""
        return [
            (slot, blocks)
            for slot, blocks in ((1, self.gates), (2, self.gates), (3, 2 * self.gates))
            if node.input(slot)
        ]

    def rewrite(self, node, cut):
        hub = Dim(node.inputs[2], 2)
        if node.attr("hidden_size") is not None and cut.new_size(hub) != cut.old_size(hub):
            cut.set_attr(node, "hidden_size", int(cut.new_size(hub)))

    # soft zeros ---------------------------------------------------------------------------
    def soft_zero(self, node, dim, input_zero):
        if dim.tensor not in node.outputs:
            return None
        if dim not in self._hidden_dims(node):
            return False  # batch or time: nothing zeroes a whole slice of those
        per_direction = self._activations_at_zero(node)
        if per_direction is None:
            return False

        def state_zero(slot: int) -> bool:  # an absent initial state is zeros
            return not node.input(slot) or bool(input_zero(node.input(slot)))

        return all(self._unit_silent(node, values, state_zero, dim.tensor) for values in per_direction)

    def _activations_at_zero(self, node) -> list[tuple[float, ...]] | None:
        """Per direction, each activation's value at 0; None where one cannot be known."""
        per = len(self.default_activations)
        directions = 2 if node.attr("direction", "forward") == "bidirectional" else 1
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in node.attr("activations") or ()]
        names = names or list(self.default_activations)
        if len(names) == per:
            names = names * directions
        if len(names) != per * directions:
            return None
        # runtimes disagree on which activation_beta belongs to which function
        parametrised = node.attr("activation_alpha") is not None or node.attr("activation_beta") is not None
        values = []
        for n in names:
            key = n.lower()
            value = _AT_ZERO.get(key, None if parametrised else _AT_ZERO_DEFAULT_BETA.get(key))
            if value is None:
                return None
            values.append(value)
        return [tuple(values[d * per : (d + 1) * per]) for d in range(directions)]

    def _unit_silent(self, node, values, state_zero, output) -> bool:
        raise NotImplementedError


class LSTM(_Recurrent):
    ops = ("LSTM",)
    gates = 4
    gate_math = 9  # 3 sigmoids, 2 tanh, c = f*c + i*g (3), h = o*tanh(c) (1)
    default_activations = ("Sigmoid", "Tanh", "Tanh")
    state_inputs = (5, 6)
    state_outputs = (1, 2)
    not_parameter_inputs = state_inputs

    def _blocks(self, node):
        return super()._blocks(node) + ([(7, 3)] if node.input(7) else [])  # peepholes for i, o, f

    def _peephole_flops(self, node, hidden: int) -> int:
        return 6 * hidden if node.input(7) else 0  # 3 multiplies, 3 adds

    def _unit_silent(self, node, values, state_zero, output):
        f, g, h = values
        # the gates of a zeroed unit are f(0) (input_forget couples i to 1 - f) and the cell input g(0)
        inputs = (f, 1.0 - f) if node.attr("input_forget", 0) else (f,)
        cell_zero = state_zero(6) and all(i * g == 0 for i in inputs)
        if output == _output(node, 2):
            return cell_zero
        # initial_h reaches Y_h only for empty sequences; required anyway, to stay simple
        return state_zero(5) and (f == 0 or (cell_zero and h == 0))


class GRU(_Recurrent):
    ops = ("GRU",)
    gates = 3
    # 2 sigmoids, tanh, r applied to h or to R*h (1: the same count with linear_before_reset),
    # h = (1-z)*n + z*h (4)
    gate_math = 8
    default_activations = ("Sigmoid", "Tanh")

    def _unit_silent(self, node, values, state_zero, output):
        f, g = values
        # h_t = (1 - z) * g(0) + z * h_{t-1} with z = f(0), whichever linear_before_reset says:
        # the reset gate multiplies R's zeroed rows either way
        return state_zero(5) and (1.0 - f) * g == 0


class RNN(_Recurrent):
    ops = ("RNN",)
    gates = 1
    gate_math = 1  # the activation
    default_activations = ("Tanh",)

    def _unit_silent(self, node, values, state_zero, output):
        (f,) = values
        return state_zero(5) and f == 0
