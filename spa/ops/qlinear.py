"""The quantized operator format's weighted ops (QLinearConv, QLinearMatMul, QGemm), as a model
holds them before ``spa.formats.qoperator`` expands them: counted, not coupled. Their integer
weights are parameters; every floating-point input is a scale."""

from __future__ import annotations

from spa.ops import cost
from spa.ops.base import Operator
from spa.ops.linear import gemm_cost

MS = "com.microsoft"


class _QOperator(Operator):
    couples = False
    scales_only = True


class QLinearConv(_QOperator):
    """x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B."""

    ops = ("QLinearConv",)
    costs = {"QLinearConv": cost.convolution(3, 8)}
    quantized_data_inputs = (3, 8)
    not_parameter_inputs = (1, 2, 4, 5, 6, 7)


class QLinearMatMul(_QOperator):
    """a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point."""

    ops = ("QLinearMatMul",)
    costs = {"QLinearMatMul": cost.matmul(3)}
    quantized_data_inputs = (0, 3)
    not_parameter_inputs = (1, 2, 4, 5, 6, 7)


class QGemm(_QOperator):
    """A, a_scale, a_zero_point, B, b_scale, b_zero_point, C, y_scale, y_zero_point."""

    ops = ("QGemm",)
    domain = MS
    costs = {"QGemm": gemm_cost(3, 6)}
    quantized_data_inputs = (0, 3, 6)
