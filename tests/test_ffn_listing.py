"""``spa analyze`` lists feed-forward hidden groups: plain (up -> act -> down) and gated (SwiGLU)."""

from __future__ import annotations

from builder import Graph

import spa
from spa.cli.render import analysis_text as _analysis_text
from spa.reporting.group_layers import is_ffn


def _block(gated: bool):
    g = Graph()
    x = g.input("x", [1, 5, 8])
    up = g.op("MatMul", [x, g.weight(8, 16)])
    if gated:
        gate = g.op("MatMul", [x, g.weight(8, 16)])
        hidden = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    else:
        hidden = g.op("Relu", [g.op("Add", [up, g.weight(16)])])
    y = g.op("Add", [g.op("MatMul", [hidden, g.weight(16, 8)]), x])
    g.output(g.op("MatMul", [y, g.weight(8, 3)]))
    return g.build()


def test_plain_and_gated_hidden_groups_are_listed_and_the_width_is_not():
    for gated in (False, True):
        report = spa.analyze(_block(gated))
        data = report.as_dict()
        ffn = [g for g in data["groups"] if is_ffn(g)]
        assert [g["channels"] for g in ffn] == [16]
        assert sum(g["layers"][0].endswith(" out") for g in ffn) == 1
        width = [g for g in data["groups"] if g["channels"] == 8]
        assert width and not any(is_ffn(g) for g in width)
        text = _analysis_text(data, verbose=False)
        assert "feed-forward: 1 hidden groups" in text and f"group {ffn[0]['id']:>4}: 16 ch, prunable" in text
