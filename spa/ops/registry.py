"""The operators spa knows, composed explicitly: ``DEFAULT`` lists every family's operators.

A caller extends or overrides it without touching spa::

    registry = DEFAULT.with_operators(MyOp())
    spa.prune(model, registry=registry)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx

from spa.core.graph import Node
from spa.ops import (
    contrib,
    conv,
    einsum,
    elementwise,
    fused_conv,
    gather,
    gather_block_quantized,
    integer,
    layout,
    linear,
    matmul_nbits,
    moe,
    norm,
    onnx_attention,
    qlinear,
    quantize,
    recurrent,
    reshape,
    rotary,
    spatial,
)
from spa.ops.base import Operator


def _domain(node: Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


class Registry:
    """Operators by (domain, op type); each key belongs to one operator."""

    def __init__(self, operators: Iterable[Operator]):
        self._by_key: dict[tuple[str, str], Operator] = {}
        for operator in operators:
            for key in operator.keys():
                if key in self._by_key:
                    raise ValueError(f"two operators for {key[1]!r} in domain {key[0] or 'ai.onnx'!r}")
                self._by_key[key] = operator

    def of(self, node: Node) -> Operator | None:
        """The operator of ``node``, or None for an op spa knows nothing about."""
        return self._by_key.get((_domain(node), node.op_type))

    def rule(self, node: Node) -> Operator | None:
        """The operator of ``node`` when it has a coupling rule."""
        operator = self.of(node)
        return operator if operator is not None and operator.couples else None

    def with_operators(self, *operators: Operator) -> Registry:
        """A new registry with ``operators`` added, replacing those of the op types they list."""
        merged = dict(self._by_key)
        for operator in operators:
            merged.update(dict.fromkeys(operator.keys(), operator))
        registry = Registry(())
        registry._by_key = merged
        return registry

    def stand_in_for_inference(self, graph: onnx.GraphProto) -> None:
        """In a copy of a graph made for shape inference, replace each node onnx cannot infer by the
        standard op its operator says has the same output shapes (``Operator.inferred_as``), or by
        the few standard ops it says compute them."""
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            operator = self.of(node)
            stand_in = operator.inferred_as(node) if operator is not None else None
            if stand_in is None:
                nodes.append(node)
            elif isinstance(stand_in, onnx.NodeProto):
                nodes.append(stand_in)
            else:
                nodes.extend(stand_in)
        if len(nodes) != len(graph.node):
            del graph.node[:]
            graph.node.extend(nodes)
        else:
            for node, replacement in zip(graph.node, nodes):
                if node is not replacement:
                    node.CopyFrom(replacement)

    def __iter__(self) -> Iterator[Operator]:
        return iter(dict.fromkeys(self._by_key.values()))

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._by_key


DEFAULT = Registry(
    [
        contrib.BiasActivation(),
        contrib.SkipNorm(),
        contrib.OnnxDomainSkipNorm(),
        contrib.EmbedNorm(),
        contrib.Attention(),
        contrib.MultiHeadAttention(),
        contrib.GroupQueryAttention(),
        conv.Conv(),
        conv.ConvTranspose(),
        einsum.Einsum(),
        elementwise.Unary(),
        elementwise.Broadcasting(),
        elementwise.Softmax(),
        fused_conv.FusedConv(),
        integer.DynamicQuantize(),
        integer.MatMulInteger(),
        integer.ConvInteger(),
        layout.Concat(),
        layout.Split(),
        layout.Slice(),
        gather.Gather(),
        gather_block_quantized.GatherBlockQuantized(),
        layout.Transpose(),
        layout.PixelShuffle(),
        layout.Tile(),
        layout.Expand(),
        layout.ConstantOfShape(),
        linear.Gemm(),
        linear.MatMul(),
        matmul_nbits.MatMulNBits(),
        moe.MoE(),
        moe.QMoE(),
        norm.BatchNorm(),
        norm.GroupNorm(),
        norm.LayerNorm(),
        norm.MicrosoftLayerNorm(),
        norm.MeanVarianceNorm(),
        onnx_attention.Attention(),
        qlinear.QLinearConv(),
        qlinear.QLinearMatMul(),
        qlinear.QGemm(),
        quantize.Dequantize(),
        quantize.Quantize(),
        quantize.MicrosoftDequantize(),
        quantize.MicrosoftQuantize(),
        recurrent.LSTM(),
        recurrent.GRU(),
        recurrent.RNN(),
        reshape.ReshapeFamily(),
        rotary.RotaryEmbedding(),
        rotary.MicrosoftRotaryEmbedding(),
        spatial.Pool(),
        spatial.Pad(),
        spatial.Resize(),
        spatial.Reduce(),
        spatial.ShapeOf(),
    ]
)
