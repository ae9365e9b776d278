"""Tests of the registry (``spa.ops.registry``): ops it does not know, a caller's own operators,
and the layout that keeps what spa knows about an operator in one module with one test file."""

import re
from pathlib import Path

import numpy as np
import pytest
from builder import Graph, analysis_of, group_at
from onnx import TensorProto, helper

import spa
from spa.ops import conv
from spa.ops.base import PRESERVES, Operator
from spa.ops.cost import per_element
from spa.ops.elementwise import Unary
from spa.ops.registry import DEFAULT, Registry


def test_op_without_rule_freezes_and_is_named():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    c = g.op("Relu", [g.conv(x, 3, 6)])
    cs = g.op("CumSum", [c, g.const(np.array(1))], name="running_total")
    g.output(g.conv(cs, 6, 2))
    group = group_at(analysis_of(g.build()), c)
    assert not group.prunable
    assert "CumSum" in group.frozen and "running_total" in group.frozen


def test_layers_past_an_op_without_shapes_name_that_op_as_the_cause():
    # the unknown op loses every shape after it: the MLP behind it freezes at its own MatMuls,
    # and the reason says where the shapes were lost and what to do about it
    g = Graph()
    x = g.input("x", [2, 16])
    first = g.weight(16, 16)
    mystery = g.op("Mystery", [g.op("MatMul", [x, first])], domain="example.custom", name="mystery")
    up = g.weight(16, 32)
    g.output(g.op("MatMul", [g.op("Relu", [g.op("MatMul", [mystery, up])]), g.weight(32, 4)]))
    model = g.build()
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    analysis = analysis_of(model)
    frozen = group_at(analysis, up).frozen
    assert frozen and "shapes are unknown from Mystery 'mystery' on" in frozen and "value_info" in frozen
    before = group_at(analysis, first).frozen
    assert "no rule for op Mystery" in before and "shapes are unknown" not in before  # the op itself, named once


class Double(Unary):
    """A custom element-wise op (x * 2) that spa does not ship: what a caller adds."""

    ops = ("Double",)
    domain = "example.custom"
    costs = {"Double": per_element(1)}
    zero_kinds = {"Double": PRESERVES}


def _with_custom_op():
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    c = g.op("Double", [g.op("Relu", [g.conv(x, 3, 6)])], domain="example.custom")
    g.output(g.conv(c, 6, 2))
    model = g.build()
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    # onnx infers no shape for an op it does not know: the model declares it
    model.graph.value_info.append(helper.make_tensor_value_info(c, TensorProto.FLOAT, [1, 6, 4, 4]))
    return model, c


def test_a_caller_adds_an_operator_with_its_own_registry():
    model, c = _with_custom_op()
    dense = spa.analyze(model)
    six = [g for g in dense.groups if g.channels == 6]
    assert len(six) == 1 and "no rule for op Double" in six[0].frozen
    registry = DEFAULT.with_operators(Double())
    extended = spa.analyze(model, registry=registry)
    six = [g for g in extended.groups if g.channels == 6]
    assert len(six) == 1 and six[0].frozen is None and six[0].exact
    assert extended.flops == dense.flops + 6 * 4 * 4  # the op's own cost, one per element
    result = spa.prune(model, 0.5, "l1", registry=registry, check=False)
    widths = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert sorted(w[0] for w in widths.values() if len(w) == 4) == [2, 3]  # the 6 channels halved


def _node_of(model, tensor: str) -> str:
    return next(n.name for n in model.graph.node if tensor in n.output)


def test_each_op_type_belongs_to_one_operator_and_can_be_replaced():
    with pytest.raises(ValueError, match="two operators for 'Conv'"):
        Registry([conv.Conv(), conv.Conv()])
    replacement = conv.Conv()
    registry = DEFAULT.with_operators(replacement)
    assert ("", "Conv") in registry and sum(op is replacement for op in registry) == 1
    assert not any(op is replacement for op in DEFAULT)  # the default registry is left alone


OPS_TESTS = Path(__file__).parent
# op types a test file may leave unnamed: each shares its family's rule (and its test) with a tested sibling
SHARE_A_TESTED_RULE = {
    "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign",
    "Mish", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Sin", "Cos", "Tan", "Asin", "Acos",
    "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Sign", "Floor", "Ceil", "Round", "Not", "IsNaN",
    "IsInf", "Clip", "Cast", "CastLike", "Identity", "Dropout", "ThresholdedRelu", "Shrink", "QuickGelu",
    "Sub", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
    "LogSoftmax", "Hardmax", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool",
    "Upsample", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare",
    "ReduceLogSum", "ReduceLogSumExp",
    "ArgMax", "ArgMin", "Size", "SimplifiedLayerNormalization", "RMSNormalization",
    "SkipSimplifiedLayerNormalization", "BiasAdd",
}  # fmt: skip


def test_every_operator_is_exercised_by_the_test_file_of_its_module():
    """A new operator needs a test: ``spa/ops/<family>.py`` is tested in ``tests/ops/test_<family>.py``,
    which builds at least one of each operator's op types (and every one not sharing a tested rule)."""
    untested, missing = [], []
    for operator in DEFAULT:
        family = type(operator).__module__.rsplit(".", 1)[1]
        path = OPS_TESTS / f"test_{family}.py"
        source = path.read_text() if path.exists() else ""
        named = [op for op in operator.ops if f'"{op}"' in source]
        if not named:
            missing.append(f"{type(operator).__name__} ({path.name})")
        untested += [op for op in operator.ops if op not in named]
    assert not missing, f"operators with no test naming them: {missing}"
    assert set(untested) <= SHARE_A_TESTED_RULE, f"op types with no test: {sorted(set(untested) - SHARE_A_TESTED_RULE)}"


# op types whose names other modules may hold: the general product, which norms written out and
# shape arithmetic are made of (a layer scale is one use of it), and the QDQ format's own op,
# which both format codecs name
GENERAL = {"Mul", "DequantizeLinear"}


def _weighted(operator: Operator, op_type: str) -> bool:
    overrides = any(getattr(type(operator), m) is not getattr(Operator, m) for m in ("layer_widths", "linear"))
    return bool(
        operator.weight_inputs_of(op_type) or operator.quantized_data_inputs or operator.layer_kind or overrides
    )


def test_each_weighted_op_type_is_named_in_at_most_two_modules():
    """What spa knows about a weighted op lives in its operator's module (and, for the quantized
    operator format, in its codec): no table elsewhere names it."""
    spa_dir = Path(spa.__file__).parent
    sources = {path: path.read_text() for path in spa_dir.rglob("*.py")}
    weighted = {op for operator in DEFAULT for op in operator.ops if _weighted(operator, op)} - GENERAL
    assert {"Conv", "Gemm", "MatMul", "LSTM", "Gather", "PRelu", "QLinearConv", "Attention"} <= weighted
    spread = {}
    for op in sorted(weighted):
        literal = re.compile(rf"[\"']{op}[\"']")
        modules = sorted(str(path.relative_to(spa_dir)) for path, text in sources.items() if literal.search(text))
        if len(modules) > 2:
            spread[op] = modules
    assert not spread, f"weighted op types named in more than two modules: {spread}"
