"""Gemm and MatMul: the contraction axis couples A and B, the free axes reach Y."""

from __future__ import annotations

from spa.ops.base import Dim, LinkSet, Rule, Sink, register


@register
class Gemm(Rule):
    ops = ("Gemm",)

    def _axes(self, node):
        a_m, a_k = (1, 0) if node.attr("transA", 0) else (0, 1)
        b_k, b_n = (1, 0) if node.attr("transB", 0) else (0, 1)
        return a_m, a_k, b_k, b_n

    def seeds(self, node, ctx):
        _, _, b_k, b_n = self._axes(node)
        return [Dim(node.inputs[1], b_k), Dim(node.inputs[1], b_n)]

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        if links.answered(node):
            return links.out
        a, b, y, c = node.inputs[0], node.inputs[1], node.outputs[0], node.input(2)
        a_m, a_k, b_k, b_n = self._axes(node)
        links.same(Dim(a, a_k), Dim(b, b_k))
        links.add(Sink((Dim(a, a_k), Dim(b, b_k))))
        links.same(Dim(b, b_n), Dim(y, 1))
        links.same(Dim(a, a_m), Dim(y, 0))
        c_rank = ctx.rank(c) if c else None
        if c_rank:
            links.same(Dim(c, c_rank - 1), Dim(y, 1))
            if c_rank == 2:
                links.same(Dim(c, 0), Dim(y, 0))
        return links.out


@register
class MatMul(Rule):
    ops = ("MatMul",)

    def seeds(self, node, ctx):
        b = node.inputs[1]
        if _weight(ctx.graph, b) and (ctx.rank(b) or 0) >= 2:
            return [Dim(b, ctx.rank(b) - 2), Dim(b, ctx.rank(b) - 1)]
        return []

    def link(self, node, dim, ctx):
        links = LinkSet(ctx)
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
        if ra is None or rb is None or ry is None:
            links.freeze(dim, f"rank unknown around MatMul '{node.name}'")
            return links.out
        if ra < 2 or rb < 2:
            links.freeze(dim, f"MatMul '{node.name}' with a 1-D operand")
            return links.out
        if links.answered(node):
            return links.out
        links.same(Dim(a, ra - 1), Dim(b, rb - 2))
        links.add(Sink((Dim(a, ra - 1), Dim(b, rb - 2))))
        links.same(Dim(b, rb - 1), Dim(y, ry - 1))
        links.same(Dim(a, ra - 2), Dim(y, ry - 2))
        for name, rank in ((a, ra), (b, rb)):  # batch axes broadcast from the right
            for axis in range(rank - 2):
                links.same(Dim(name, axis), Dim(y, axis + ry - rank))
        return links.out


def _weight(graph, tensor: str) -> bool:
    """An initializer, or one read through a Transpose: a tied output embedding (the lm head
    multiplying by the embedding table transposed) when the exporter did not fold it."""
    producer = graph.producer.get(tensor)
    if producer is not None and producer.op_type == "Transpose":
        tensor = producer.inputs[0]
    return graph.is_initializer(tensor)
