"""Ops that act on each element (or each channel) independently."""

from __future__ import annotations

from spa.core.coupling import Dim, LinkSet
from spa.ops import cost
from spa.ops.base import NUMERATOR, PRESERVES, PRODUCT, SUM, Operator

# f(0) == 0 matters for soft == hard: a soft-pruned channel stays zero through these, so
# consumers without weights still see the same values
_ZERO_AT_ZERO = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Tanh", "Erf", "Neg", "Abs", "Sqrt", "HardSwish",
    "Mish", "Sin", "Sign", "Floor", "Ceil", "Round", "Identity", "Dropout", "Cast", "Softsign",
    "ThresholdedRelu", "Shrink", "Clip", "Atan", "Asin", "Sinh", "Tan", "Asinh", "Atanh", "QuickGelu",
)  # fmt: skip
# math functions count 1 per element, like an add
_ONE_PER_ELEMENT = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softplus", "Softsign", "Mish", "Clip", "Sqrt", "Exp", "Log", "Erf", "Sin", "Cos", "Neg", "Abs",
    "Reciprocal",
)  # fmt: skip


class Unary(Operator):
    """Output i depends on input i only; extra inputs are scalars (Clip bounds)."""

    ops = (
        "Relu",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Softsign",
        "Mish",
        "Erf",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "Abs",
        "Sin",
        "Cos",
        "Tan",
        "Asin",
        "Acos",
        "Atan",
        "Sinh",
        "Cosh",
        "Asinh",
        "Acosh",
        "Atanh",
        "Sign",
        "Floor",
        "Ceil",
        "Round",
        "Not",
        "IsNaN",
        "IsInf",
        "Clip",
        "Cast",
        "CastLike",
        "Identity",
        "Dropout",
        "ThresholdedRelu",
        "Shrink",
        "QuickGelu",
    )
    costs = {**dict.fromkeys(_ONE_PER_ELEMENT, cost.per_element(1)), "Gelu": cost.gelu}
    zero_kinds = dict.fromkeys(_ZERO_AT_ZERO, PRESERVES)

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        tensors = [node.inputs[0]] + [o for o in node.outputs if o]
        if dim.tensor not in tensors:  # a scalar side input such as Clip's min
            links.freeze(dim, f"{node.op_type} '{node.name}' takes this as a scalar parameter")
            return links.out
        for other in tensors:
            if other != dim.tensor and ctx.rank(other) == ctx.rank(dim.tensor):
                links.same(dim, Dim(other, dim.axis))
        return links.out


class Broadcasting(Operator):
    """N-ary element-wise ops with numpy broadcasting: residual adds, SE gates, layer-scale."""

    ops: tuple[str, ...] = (
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "Where",
        "PRelu",
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "And",
        "Or",
        "Xor",
        "Mod",
        "BitShift",
        "BitwiseAnd",
        "BitwiseOr",
        "BitwiseXor",
    )
    costs = {
        **dict.fromkeys(("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "PRelu"), cost.per_element(1)),
        **dict.fromkeys(("Sum", "Max", "Min"), cost.variadic(0)),
        "Mean": cost.variadic(1),  # and a divide
    }
    # an input outside the group (a scalar offset, another branch) can add a non-zero value to a sum
    zero_kinds = {
        "Mul": PRODUCT,
        "Div": NUMERATOR,
        "Pow": PRESERVES,
        **dict.fromkeys(("Add", "Sub", "Max", "Min", "Where", "Sum", "Mean"), SUM),
    }
    # a weight multiplied in: a layer scale, a PReLU slope
    _weights = {"Mul": (0, 1), "PRelu": (1,)}

    def weight_inputs_of(self, op_type):
        return self._weights.get(op_type, ())

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        out = node.outputs[0]
        out_rank, rank = ctx.rank(out), ctx.rank(dim.tensor)
        if out_rank is None or rank is None:
            links.freeze(dim, f"rank unknown around {node.op_type} '{node.name}'")
            return links.out
        out_axis = dim.axis if dim.tensor == out else dim.axis + out_rank - rank
        out_dim = Dim(out, out_axis)
        size = ctx.size(dim)
        if size is not None and size == 1 and ctx.size(out_dim) not in (1, None):
            links.freeze(dim, "broadcast along this axis")
            return links.out
        key = ("coupled", node.index, out_axis)
        if links.coupled(dim, key):
            return links.out
        others = [out_dim]
        for name in node.inputs:
            other_rank = ctx.rank(name) if name else None
            if other_rank is None or name == dim.tensor:
                continue
            axis = out_axis - (out_rank - other_rank)
            if axis >= 0:
                others.append(Dim(name, axis))
        links.same_all(dim, others, key)
        return links.out


class Softmax(Operator):
    """Independent along every axis but the normalised one(s)."""

    ops = ("Softmax", "LogSoftmax", "Hardmax")
    costs = dict.fromkeys(("Softmax", "LogSoftmax"), cost.per_element(cost.SOFTMAX))

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        rank = ctx.rank(dim.tensor)
        axis = node.attr("axis", -1 if ctx.opset >= 13 else 1) % rank
        # before opset 13 the input is coerced to 2-D at `axis`: all trailing axes are normalised together
        normalised = dim.axis == axis if ctx.opset >= 13 else dim.axis >= axis
        if normalised:
            links.freeze(dim, f"{node.op_type} '{node.name}' normalises over this axis")
        else:
            other = node.outputs[0] if dim.tensor == node.inputs[0] else node.inputs[0]
            links.same(dim, Dim(other, dim.axis))
        return links.out
