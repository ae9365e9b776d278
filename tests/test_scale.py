"""Grouping work grows with the graph, not with its square.

An N-ary op (Sum, Concat, Split) is asked about each of its N members, and answering each
with a link to every other member made N squared links: thousands of branches took minutes
and gigabytes. These tests count links (work, not time) and check the groups are still the
right ones. Timings are printed by tools/bench_scale.py.
"""

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at

from spa.analysis.groups import _Walk
from spa.core.coupling import Dim, RuleContext
from spa.formats.model import Model

WIDTH = 6


def _fan_in(n: int, combine: str):
    """x -> n MatMul branches -> combined -> one MatMul; the branch outputs and their weights'
    output axes in one group, unless concatenated (then each branch is its own block)."""
    g = Graph()
    x = g.input("x", [1, 8])
    branches = [g.op("MatMul", [x, g.weight(8, WIDTH)]) for _ in range(n)]
    if combine == "Sum":
        total = g.op("Sum", branches)
    elif combine == "Adds":
        total = branches[0]
        for branch in branches[1:]:
            total = g.op("Add", [total, branch])
    else:
        total = g.op("Concat", branches, axis=1)
    width = WIDTH * (n if combine == "Concat" else 1)
    g.output(g.op("MatMul", [total, g.weight(width, 3)]))
    return g.build(), branches, total


def _fan_out(n: int):
    """x -> MatMul -> Split into n -> n MatMul branches -> Sum."""
    g = Graph(opset=18)  # Split's num_outputs
    x = g.input("x", [1, 8])
    parts = g.op("Split", [g.op("MatMul", [x, g.weight(8, WIDTH * n)])], n_out=n, axis=1, num_outputs=n, name="split")
    g.output(g.op("Sum", [g.op("MatMul", [p, g.weight(WIDTH, 3)]) for p in parts]))
    return g.build()


def _links(model) -> int:
    prepared = Model.load(model)
    walk = _Walk(prepared.graph, RuleContext(prepared.graph, prepared.opset), {})
    walk.run()
    return len(walk.links)


@pytest.mark.parametrize("combine", ["Sum", "Adds"])
def test_summed_branches_are_one_group(combine):
    n = 40
    model, branches, total = _fan_in(n, combine)
    analysis = analysis_of(model)
    group = group_at(analysis, total)
    assert group.size == WIDTH and group.prunable and group.exact
    weights = [node.input[1] for node in model.graph.node if node.op_type == "MatMul"][:n]
    expected = {Dim(b, 1) for b in branches} | {Dim(w, 1) for w in weights} | {Dim(total, 1)}
    assert expected <= set(group.dims)
    # every branch weight's input axis is the graph input's channel: one frozen group
    assert group_at(analysis, "x").frozen.endswith("graph input")
    assert all(group_at(analysis, w, 0) is group_at(analysis, "x") for w in weights)


def test_concatenated_branches_keep_their_own_blocks():
    n = 40
    model, branches, total = _fan_in(n, "Concat")
    analysis = analysis_of(model)
    concat = analysis.labels[Dim(total, 1)]
    for k, branch in enumerate(branches):
        np.testing.assert_array_equal(analysis.labels[Dim(branch, 1)], concat[k * WIDTH : (k + 1) * WIDTH])
    weights = [node.input[1] for node in model.graph.node if node.op_type == "MatMul"][:n]
    groups = [group_at(analysis, branch) for branch in branches]
    assert len({g.id for g in groups}) == n
    for group, branch, weight in zip(groups, branches, weights):
        assert group.size == WIDTH and group.prunable and group.exact
        assert {Dim(branch, 1), Dim(weight, 1), Dim(total, 1)} <= set(group.dims)


def test_split_parts_are_one_group_each():
    n = 40
    model = _fan_out(n)
    analysis = analysis_of(model)
    split = next(node for node in model.graph.node if node.op_type == "Split")
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    whole, weights = split.input[0], [node.input[1] for node in matmuls[1:]]
    groups = [group_at(analysis, part) for part in split.output]
    assert len({g.id for g in groups}) == n
    for group, part, weight in zip(groups, split.output, weights):
        assert group.size == WIDTH and group.prunable and group.exact
        assert {Dim(part, 1), Dim(weight, 0), Dim(whole, 1), Dim(matmuls[0].input[1], 1)} <= set(group.dims)


@pytest.mark.parametrize(
    "build",
    [lambda n: _fan_in(n, "Sum")[0], lambda n: _fan_in(n, "Concat")[0], _fan_out],
    ids=["Sum", "Concat", "Split"],
)
def test_links_grow_linearly_with_the_branches(build):
    # each member asked in turn used to link itself to every other: 100 branches, 10,000 links
    small, large = _links(build(50)), _links(build(100))
    assert large <= 2 * small + 10
    assert large < 10 * 100
