"""Tests of LSTM, GRU and RNN (``spa.ops.recurrent``): the gate count each op's weights are stacked
by is what its widths and its cost read. Coupling and pruning are tested in ``tests/test_recurrent.py``."""

import pytest
from builder import Graph, analysis_of

from spa.ops.recurrent import GRU, LSTM, RNN
from spa.reporting.metrics import count


@pytest.mark.parametrize(
    "op_type, gates, per_unit_math",
    [("LSTM", 4, 9), ("GRU", 3, 8), ("RNN", 1, 1)],
)
def test_gate_blocks_give_the_hidden_width_and_the_cost(op_type, gates, per_unit_math):
    steps, batch, inputs, hidden = 5, 2, 3, 4
    g = Graph()
    x = g.input("x", [steps, batch, inputs])
    w, r, b = g.weight(1, gates * hidden, inputs), g.weight(1, gates * hidden, hidden), g.weight(1, 2 * gates * hidden)
    y = g.op(op_type, [x, w, r, b], n_out=2, hidden_size=hidden)[0]
    g.output(y)
    graph = analysis_of(g.build()).graph
    node = next(n for n in graph.nodes if n.op_type == op_type)
    operator = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}[op_type]()
    assert operator.gates == gates
    assert operator.layer_widths(graph, node) == (inputs, hidden)
    rows = gates * hidden
    per_step = 2 * rows * (inputs + hidden) + per_unit_math * hidden + 2 * rows  # products, gate math, biases
    assert count(graph).node_flops[node.name] == per_step * steps * batch
