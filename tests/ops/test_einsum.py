"""Tests of Einsum (``spa.ops.einsum``): counted at its contraction's cost, never coupled."""

from builder import Graph, analysis_of, group_at

from spa.reporting.metrics import count


def test_einsum_costs_its_contraction_and_freezes_the_channels_it_reads():
    g = Graph()
    x = g.input("x", [2, 3, 4])
    h = g.op("Relu", [g.op("MatMul", [x, g.weight(4, 6)])])
    y = g.op("Einsum", [h, g.weight(2, 6, 5)], equation="bij,bjk->bik")
    g.output(y)
    analysis = analysis_of(g.build())
    einsum = next(n for n in analysis.graph.nodes if n.op_type == "Einsum")
    assert count(analysis.graph).node_flops[einsum.name] == 2 * 2 * 3 * 6 * 5  # a multiply and an add per point
    group = group_at(analysis, h, 2)
    assert "no rule for op Einsum" in group.frozen
