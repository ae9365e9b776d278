"""If / Loop / Scan: channels that cross a subgraph boundary stay whole, the rest still prunes.

Each model has two conv paths from the same input: one whose channels a control-flow node reads
(explicitly, or implicitly from inside a body), and a free conv -> conv path beside it that must
still shrink. Pruning runs with validation on (checker, onnxruntime, I/O, soft == hard).
"""

from __future__ import annotations

import numpy as np
import onnx
from builder import Graph, analysis_of, group_at, initializer, prune_exact
from onnx import TensorProto, helper, numpy_helper

from spa.core.runtime import run, sample_inputs

SHAPE = [1, 3, 8, 8]


def _free_path(g: Graph, x: str) -> tuple[str, str]:
    """conv(3->12) -> relu -> conv(12->4): the group that must prune; returns (hidden, output)."""
    hidden = g.op("Relu", [g.conv(x, 3, 12)])
    return hidden, g.conv(hidden, 12, 4, k=1)


def _body(name: str, nodes, inputs, outputs, inits=()) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, inputs, outputs, list(inits))


def _value(name: str, elem=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def _if_model(branch_weight: bool = False) -> tuple[onnx.ModelProto, str, str]:
    """Both branches of an If read conv output ``r`` from the outer scope; each branch has an
    initializer of its own. With ``branch_weight`` the then-branch also reads the free path's
    second conv weight (an outer initializer) directly."""
    g = Graph()
    x = g.input("x", SHAPE)
    cond = g.input("cond", [], TensorProto.BOOL)
    r = g.op("Relu", [g.conv(x, 3, 8)])
    hidden, free = _free_path(g, x)
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32).reshape(1, 8, 1, 1), "then_scale")
    then_nodes = [helper.make_node("Mul", [r, "then_scale"], ["then_out"])]
    if branch_weight:
        w_free = g.nodes[-1].input[1]  # the weight of the free path's second conv
        then_nodes += [
            helper.make_node("ReduceSum", [w_free], ["w_sum"], keepdims=0),
            helper.make_node("Add", ["then_out", "w_sum"], ["then_y"]),
        ]
    else:
        then_nodes += [helper.make_node("Identity", ["then_out"], ["then_y"])]
    shift = numpy_helper.from_array(np.full((1, 8, 1, 1), 0.25, np.float32), "else_shift")
    # an outer Identity of an initializer, read in the branch: loading folds the Identity away and
    # must rename the branch's read too
    alias = g.op("Identity", [g.const(np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8, 1, 1))])
    then_branch = _body("then", then_nodes, [], [_value("then_y")], [scale])
    else_branch = _body(
        "else",
        [
            helper.make_node("Sub", [r, "else_shift"], ["shifted"]),
            helper.make_node("Mul", ["shifted", alias], ["else_y"]),
        ],
        [],
        [_value("else_y")],
        [shift],
    )
    y = g.op("If", [cond], then_branch=then_branch, else_branch=else_branch, name="if")
    out = g.op("Add", [g.conv(y, 8, 4, k=1), free])
    g.output(out)
    return g.build(), r, hidden


def _loop_model() -> tuple[onnx.ModelProto, str, str, str]:
    """A Loop carries conv output ``r`` (an explicit loop input) and its body reads conv output
    ``s`` from the outer scope: v <- v * s + 1, three times."""
    g = Graph()
    x = g.input("x", SHAPE)
    r = g.op("Relu", [g.conv(x, 3, 8)])
    s = g.op("Sigmoid", [g.conv(x, 3, 8)])
    hidden, free = _free_path(g, x)
    one = numpy_helper.from_array(np.ones((1, 8, 1, 1), np.float32), "body_one")
    body = _body(
        "loop_body",
        [
            helper.make_node("Mul", ["v_in", s], ["scaled"]),
            helper.make_node("Add", ["scaled", "body_one"], ["v_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        [_value("i", TensorProto.INT64, []), _value("cond_in", TensorProto.BOOL, []), _value("v_in")],
        [_value("cond_out", TensorProto.BOOL, []), _value("v_out")],
        [one],
    )
    trips, keep_going = g.const(np.array(3, np.int64)), g.const(np.array(True))
    v = g.op("Loop", [trips, keep_going, r], body=body, name="loop")
    out = g.op("Add", [g.conv(v, 8, 4, k=1), free])
    g.output(out)
    return g.build(), r, s, hidden


def _scan_model() -> tuple[onnx.ModelProto, str, str, str]:
    """A Scan over the rows (axis 2) of conv output ``r``; its body also reads ``s``, a slice of
    another conv's output, from the outer scope, and sums the scaled rows into its state."""
    g = Graph()
    x = g.input("x", SHAPE)
    r = g.op("Relu", [g.conv(x, 3, 8)])
    s_conv = g.op("Sigmoid", [g.conv(x, 3, 8)])
    s = g.op("ReduceMean", [s_conv], axes=[2], keepdims=0)  # [1, 8, 8]: one weight per channel and column
    hidden, free = _free_path(g, x)
    body = _body(
        "scan_body",
        [
            helper.make_node("Mul", ["row", s], ["scaled"]),
            helper.make_node("Add", ["acc_in", "scaled"], ["acc_out"]),
            helper.make_node("Identity", ["scaled"], ["row_out"]),
        ],
        [_value("acc_in", shape=[1, 8, 8]), _value("row", shape=[1, 8, 8])],
        [_value("acc_out", shape=[1, 8, 8]), _value("row_out", shape=[1, 8, 8])],
    )
    acc0 = g.const(np.zeros((1, 8, 8), np.float32))
    acc, rows = g.op(
        "Scan", [acc0, r], n_out=2, body=body, num_scan_inputs=1, scan_input_axes=[2], scan_output_axes=[2], name="scan"
    )
    mixed = g.op("Add", [rows, g.op("Unsqueeze", [acc, g.const(np.array([2], np.int64))])])
    out = g.op("Add", [g.conv(mixed, 8, 4, k=1), free])
    g.output(out)
    return g.build(), r, s_conv, hidden


def _assert_frozen(analysis, tensor: str, *words: str) -> None:
    group = group_at(analysis, tensor)
    assert group.frozen is not None, f"{tensor} should be frozen"
    for word in words:
        assert word in group.frozen, group.frozen


def _assert_prunes_validly(model: onnx.ModelProto, hidden: str, frozen_weights: list[str]) -> None:
    """The free path shrinks, the frozen convs keep every channel, and the result is valid with
    soft == hard (prune_exact raises otherwise) and runs with the dense model's output shape."""
    analysis = analysis_of(model)
    free_group = group_at(analysis, hidden)
    assert free_group.prunable
    result = prune_exact(model, ratio=0.5, criterion="l2", compensate=False)
    v = result.report.validation
    assert v.checker == "ok" and v.runs and v.io_match and v.soft_equal, v
    pruned = result.model
    free_w = next(
        n.input[1]
        for n in model.graph.node
        if n.op_type == "Conv"
        and n.output[0] in {p.input[0] for p in model.graph.node if p.op_type == "Relu" and p.output[0] == hidden}
    )
    assert initializer(pruned, free_w).shape[0] == 6  # 12 -> 6 channels
    for name in frozen_weights:
        assert initializer(pruned, name).shape == initializer(model, name).shape
    feeds = sample_inputs(model)
    assert [a.shape for a in run(pruned, feeds).values()] == [a.shape for a in run(model, feeds).values()]


def _conv_weight(model: onnx.ModelProto, conv_output_consumer: str) -> str:
    """The weight of the conv whose output the activation producing ``conv_output_consumer`` reads."""
    act = next(n for n in model.graph.node if n.output[0] == conv_output_consumer)
    return next(n.input[1] for n in model.graph.node if n.output[0] == act.input[0])


def test_if_branches_reading_a_conv_output_freeze_its_channels():
    model, r, hidden = _if_model()
    analysis = analysis_of(model)
    _assert_frozen(analysis, r, "used inside a subgraph of If 'if'")
    _assert_prunes_validly(model, hidden, [_conv_weight(model, r)])


def test_if_true_and_false_give_the_dense_outputs():
    model, _, _ = _if_model()
    result = prune_exact(model, ratio=0.0, criterion="l2", compensate=False)
    for flag in (True, False):
        feeds = {**sample_inputs(model), "cond": np.array(flag)}
        dense, pruned = run(model, feeds), run(result.model, feeds)
        assert all(np.array_equal(dense[k], pruned[k]) for k in dense)


def test_an_outer_weight_read_inside_a_branch_freezes_its_group():
    model, r, hidden = _if_model(branch_weight=True)
    analysis = analysis_of(model)
    _assert_frozen(analysis, hidden, "used inside a subgraph of If 'if'")
    _assert_frozen(analysis, r, "used inside a subgraph of If 'if'")
    result = prune_exact(model, ratio=0.5, criterion="l2", compensate=False)
    for node in model.graph.node:
        if node.op_type == "Conv":
            assert initializer(result.model, node.input[1]).shape == initializer(model, node.input[1]).shape


def test_loop_state_and_outer_reads_freeze_their_channels():
    model, r, s, hidden = _loop_model()
    analysis = analysis_of(model)
    _assert_frozen(analysis, r, "Loop")
    _assert_frozen(analysis, s, "used inside a subgraph of Loop 'loop'")
    _assert_prunes_validly(model, hidden, [_conv_weight(model, r), _conv_weight(model, s)])


def test_scan_input_and_outer_reads_freeze_their_channels():
    model, r, s, hidden = _scan_model()
    analysis = analysis_of(model)
    _assert_frozen(analysis, r, "Scan")
    # s reaches the body through a ReduceMean, which links its channels back to the conv's
    _assert_frozen(analysis, s, "used inside a subgraph of Scan 'scan'")
    _assert_prunes_validly(model, hidden, [_conv_weight(model, r), _conv_weight(model, s)])
