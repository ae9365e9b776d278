"""What an operator is: everything spa knows about one operator family, in one class.

An ``Operator`` answers, for the op types it lists in ``ops`` (in ``domain``):

* coupling: ``seeds``, ``link``, ``resolve``, ``rewrite``, ``soft_zero`` and ``soft_fills``,
  in the vocabulary of ``spa.core.coupling``; an operator with ``couples = False`` has no
  coupling rule, and grouping freezes the channels it touches as it does for an unknown op;
* cost: ``flops`` (FLOPs per op type, from ``costs``), the parameter-counting roles of its
  inputs (``quantized_data_inputs``, ``not_parameter_inputs``), and ``isolated``, the op alone at
  chosen widths, which the width cost model times;
* weight roles: which inputs are weights worth ranking (``weight_inputs``), which weight axis
  is the layer's input or output side (``weight_side``), and its (input, output) widths;
* the linear view: ``linear`` sees the op as a ``[rows, input channels]`` matrix;
* zero preservation: ``zero_kinds`` says how a soft-pruned (zero) channel crosses the op.

Operators are composed explicitly into a ``spa.ops.registry.Registry``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spa.core.coupling import Dim, Freeze, Outcome, RuleContext

if TYPE_CHECKING:  # pragma: no cover
    from spa.core.graph import ModelGraph, Node
    from spa.ops.linear_view import LinearLayer
    from spa.transforms.cut import CutContext

CostFn = Callable[["ModelGraph", "Node"], int]

# How a channel that is all zeros in the soft model (its parameters zeroed) crosses an op,
# for the ops whose rule leaves it to this generic judgement (``soft_zero`` returns None):
PRODUCT = "product"  # zero if any member input is zero (a product with it)
NUMERATOR = "numerator"  # zero if the numerator (input 0) is zero
PRESERVES = "preserves"  # zero if every member input is zero: f(0) == 0, or values only moved
SUM = "sum"  # zero if every member input is zero and no input outside the group adds a non-zero


class Operator:
    """Base operator. Subclasses set ``ops`` and override ``link`` (or set ``couples = False``)."""

    ops: tuple[str, ...] = ()
    domain: str = ""
    couples: bool = True  # False: no coupling rule; grouping freezes what the op touches
    costs: Mapping[str, CostFn] = {}  # FLOPs of one node, per op type; absent: the op computes nothing counted
    weight_inputs: tuple[int, ...] = ()  # input slots holding a weight worth ranking
    bias_input: int | None = None  # the slot of a bias, which travels with the weight's output side
    quantized_data_inputs: tuple[int, ...] = ()  # slots holding a quantized weight, whatever its type
    not_parameter_inputs: tuple[int, ...] = ()  # slots never counted as parameters (scales, states)
    scales_only: bool = False  # every floating-point input is a quantization scale (QOperator ops)
    gathers_rows: bool = False  # output holds rows of input 0: a quantized table gathered, then dequantized
    layer_kind: str | None = None  # "dense" or "conv": what reports call a layer of this op
    attends: bool = False  # mixes tokens by attention: a branch holding it is a transformer's attention
    zero_kinds: Mapping[str, str] = {}  # op type -> PRODUCT, NUMERATOR, PRESERVES or SUM

    def keys(self) -> list[tuple[str, str]]:
        return [(self.domain, op) for op in self.ops]

    # ------------------------------------------------------------ coupling

    def seeds(self, node: Node, ctx: RuleContext) -> Iterable[Dim]:
        """Channel dimensions this op offers for pruning (weights' axes, usually)."""
        return ()

    def link(self, node: Node, dim: Dim, ctx: RuleContext) -> Iterable[Outcome]:
        raise NotImplementedError

    def resolve(self, node: Node, dim: Dim, ctx: RuleContext) -> Iterable[Outcome]:
        """Settle a ``Pending`` this rule returned earlier."""
        return [Freeze(dim, f"{node.op_type} '{node.name}': ambiguous split")]

    def rewrite(self, node: Node, cut: CutContext) -> None:
        """Fix attributes and shape constants after channels were removed."""

    def soft_zero(self, node: Node, dim: Dim, input_zero) -> bool | None:
        """Is output ``dim`` of this op all zeros at the removed channels of the soft model?

        ``input_zero(tensor)`` says the same of one input (None where the input has no
        dimension in the group). None here leaves it to the generic judgement in ``groups``,
        which follows ``zero_kind``.
        """
        return None

    def soft_fills(self, node: Node, graph: ModelGraph) -> dict[str, np.ndarray | None]:
        """Initializers of this op whose removed slices the soft model must not set to zero: the
        value to write there instead (broadcast to the tensor), or None to keep the dense values."""
        return {}

    # ------------------------------------------------------------ shapes

    def inferred_as(self, node: onnx.NodeProto) -> onnx.NodeProto | Sequence[onnx.NodeProto] | None:
        """A standard op with the same output shapes, for shape inference of an op onnx does not
        know (None: onnx, or onnxruntime's symbolic inference, knows it); or a few standard ops
        that compute its outputs, their intermediate tensors named after its own output."""
        return None

    # ------------------------------------------------------------ cost

    def flops(self, graph: ModelGraph, node: Node) -> int | None:
        """FLOPs of one node (see ``spa.reporting.metrics`` for the conventions); None for an op
        type without a cost model (data movement), 0 where its shapes are unknown."""
        cost = self.costs.get(node.op_type)
        return None if cost is None else cost(graph, node)

    def isolated(self, graph: ModelGraph, node: Node, in_width: int, out_width: int) -> onnx.ModelProto | None:
        """The node alone with ``in_width`` input and ``out_width`` output channels, its input at the
        size ``graph`` gives it (``spa.ops.isolate``): what the width cost model times. None for an op
        that is not timed on its own (its time is taken to follow its FLOPs)."""
        return None

    def parameter_elements(self, node: Node, index: int, dims: Sequence[int]) -> int:
        """How many weight values the initializer of shape ``dims`` at input ``index`` holds: its
        element count, unless the op packs several values into one element."""
        return math.prod(dims)

    # ------------------------------------------------------------ weight roles

    def weight_inputs_of(self, op_type: str) -> tuple[int, ...]:
        """The input slots of ``op_type`` holding a weight worth ranking."""
        return self.weight_inputs

    def is_weight_input(self, node: Node, index: int) -> bool:
        return index in self.weight_inputs_of(node.op_type)

    def weight_side(self, node: Node, index: int, axis: int) -> str | None:
        """ "in" or "out": the side of the layer that ``axis`` of the weight at input ``index`` indexes."""
        return None

    def layer_widths(self, graph: ModelGraph, node: Node) -> tuple[int | None, int | None] | None:
        """(input, output) channels read off the weight; None for an op that is not a layer."""
        return None

    # ------------------------------------------------------------ linear view

    def linear(self, graph: ModelGraph, node: Node) -> LinearLayer | None:
        """The op as ``y = W x + b`` over one channel axis of its input, or None."""
        return None

    # ------------------------------------------------------------ zero preservation

    def zero_kind(self, node: Node) -> str | None:
        return self.zero_kinds.get(node.op_type)


def static_weight_dims(graph: ModelGraph, node: Node, slot: int = 1) -> list[int | None] | None:
    """The shape of the weight at ``slot``, unknown sizes as None; None when it has no shape."""
    weight = node.input(slot)
    shape = graph.shape(weight) if weight else None
    return [s if isinstance(s, int) else None for s in shape] if shape else None


def times(size: int | None, factor: int) -> int | None:
    return None if size is None else size * factor
