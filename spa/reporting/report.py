"""``spa report``: one self-contained HTML page comparing a dense model with its pruned version.

Every figure is measured on the two files, never estimated from the pruning options: widths from
the weights' shapes, params and FLOPs with :func:`spa.reporting.metrics.count`, latency with
:func:`spa.verify.bench.bench`, the size of each coupled group from the shapes of its member axes.
The page loads nothing: the CSS is inline, the width plot is SVG drawn here, and a
Content-Security-Policy forbids every fetch and every script.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spa import __version__
from spa.analysis.groups import Analysis, Group
from spa.api import GroupReport, analyze
from spa.core.errors import UsageError
from spa.core.graph import ModelGraph, Node
from spa.formats.model import Model
from spa.ops.registry import DEFAULT, Registry
from spa.reporting.metrics import count
from spa.verify.bench import BenchResult
from spa.verify.bench import bench as measure_latency


@dataclass
class Layer:
    """One weighted op of the dense model, matched by node name in the pruned one."""

    name: str
    op_type: str
    in_pruned: bool
    out_before: int | None  # None: the weight's shape is not static
    out_after: int | None  # None: not static, or the layer is absent from the pruned model
    in_before: int | None
    in_after: int | None
    flops_before: int
    flops_after: int | None


@dataclass
class GroupCut:
    id: int
    exact: bool
    frozen: str | None
    layers: list[str]
    channels_before: int  # units: the smallest sets of indices that can go together
    channels_after: int | None  # None: no member axis that holds this group alone could be measured

    @property
    def removed(self) -> int | None:
        return None if self.channels_after is None else self.channels_before - self.channels_after


@dataclass
class Report:
    dense: str
    pruned: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    layers: list[Layer]
    groups: list[GroupCut]  # only groups of more than one channel: single channels cannot shrink
    latency: BenchResult | None  # None: not measured


def report_path_for(pruned: Path) -> Path:
    stem = pruned.name[: -len(".onnx")] if pruned.name.endswith(".onnx") else pruned.name
    return pruned.with_name(stem + ".report.html")


def build_report(
    dense: str | os.PathLike,
    pruned: str | os.PathLike,
    *,
    bench: bool = True,
    threads: int = 0,
    runs: int = 50,
    warmup: int = 5,
    registry: Registry = DEFAULT,
) -> Report:
    """Measure DENSE and PRUNED: widths, params, FLOPs, groups and (unless told not to) CPU latency.

    Raises ``UsageError`` when PRUNED is not a pruned version of DENSE.
    """
    if bench and (runs < 1 or threads < 0):  # before loading anything
        raise UsageError(f"--runs must be at least 1 and --threads at least 0, got {runs} and {threads}")
    # approximate groups count as groups here: whether one was cut is read off the pruned model
    analysis = analyze(dense, approximate=True, registry=registry)
    dense_graph = analysis.analysis.graph
    pruned_graph = Model.load(pruned).graph
    _check_correspondence(dense, pruned, dense_graph, pruned_graph)
    before, after = count(dense_graph, registry), count(pruned_graph, registry)
    layers = _layers(dense_graph, pruned_graph, before.node_flops, after.node_flops, registry)
    if layers and not any(layer.in_pruned for layer in layers):
        raise UsageError(f"{pruned} is not a pruned version of {dense}: none of its layers has the same name")
    groups = [
        _group_cut(analysis.analysis, group, summary, pruned_graph)
        for group, summary in zip(analysis.analysis.groups, analysis.groups)
        if group.size > 1
    ]
    latency = measure_latency([dense, pruned], "CPUExecutionProvider", threads, warmup, runs) if bench else None
    return Report(
        str(dense), str(pruned), before.params, after.params, before.flops, after.flops, layers, groups, latency
    )


def _check_correspondence(dense, pruned, dense_graph: ModelGraph, pruned_graph: ModelGraph) -> None:
    for kind, a, b in (
        ("inputs", dense_graph.inputs, pruned_graph.inputs),
        ("outputs", dense_graph.outputs, pruned_graph.outputs),
    ):
        if a != b:
            raise UsageError(f"{pruned} is not a pruned version of {dense}: graph {kind} {a} vs {b}")


def _layers(
    dense: ModelGraph,
    pruned: ModelGraph,
    flops_before: dict[str, int],
    flops_after: dict[str, int],
    registry: Registry = DEFAULT,
) -> list[Layer]:
    pruned_nodes = {node.name: node for node in pruned.nodes}
    layers = []
    for node in dense.nodes:
        widths = _in_out_widths(dense, node, registry)
        if widths is None:
            continue
        match = pruned_nodes.get(node.name)
        in_after, out_after = (_in_out_widths(pruned, match, registry) if match else None) or (None, None)
        layers.append(
            Layer(
                node.name,
                node.op_type,
                in_pruned=match is not None,
                out_before=widths[1],
                out_after=out_after,
                in_before=widths[0],
                in_after=in_after,
                flops_before=flops_before.get(node.name, 0),
                flops_after=flops_after.get(node.name, 0) if match else None,
            )
        )
    return layers


def _in_out_widths(graph: ModelGraph, node: Node, registry: Registry) -> tuple[int | None, int | None] | None:
    """(input, output) channels of a weighted op read off its weight; None for an op without weights."""
    operator = registry.of(node)
    return operator.layer_widths(graph, node) if operator is not None else None


def _group_cut(analysis: Analysis, group: Group, summary: GroupReport, pruned: ModelGraph) -> GroupCut:
    return GroupCut(
        group.id, group.exact, group.frozen, summary.layers, group.size, _channels_after(analysis, group, pruned)
    )


def _channels_after(analysis: Analysis, group: Group, pruned: ModelGraph) -> int | None:
    """Units of the group left in the pruned model, read off a member axis that holds this group alone.

    An axis shared with other groups (a Concat of two branches) cannot tell whose channels went;
    a unit may span several indices of an axis (a channel flattened into features), so sizes are
    divided by the indices per unit.
    """
    # weights first: their shapes are always static
    for dim in sorted(group.dims, key=lambda d: not analysis.graph.is_initializer(d.tensor)):
        labels = analysis.labels[dim]
        if not np.isin(labels, group.units).all():
            continue
        per_unit = np.unique(labels, return_counts=True)[1]
        size = pruned.static_size(dim.tensor, dim.axis)
        if per_unit.min() != per_unit.max() or size is None or size % int(per_unit[0]):
            continue
        return size // int(per_unit[0])
    return None


# ---------------------------------------------------------------- HTML

_STYLE = """
:root { --ink: #1f2937; --muted: #6b7280; --line: #e5e7eb; --bg: #f5f7fa; --dense: #cbd5e1;
  --pruned: #2563eb; --good: #047857; --good-bg: #ecfdf5; --bad: #b91c1c; --bad-bg: #fef2f2; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 32px 24px 48px; }
h1 { font-size: 24px; margin: 0 0 6px; letter-spacing: -0.01em; }
h2 { font-size: 17px; margin: 0 0 4px; }
p.note { color: var(--muted); margin: 0 0 14px; }
.files { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; color: var(--muted); }
.files code { color: var(--ink); }
section, .card { background: #fff; border: 1px solid var(--line); border-radius: 10px; }
section { padding: 20px 24px; margin-top: 20px; }
.cards { display: grid; grid-template-columns: repeat(3, 1fr); gap: 16px; margin-top: 24px; }
.card { padding: 16px 20px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: 0.06em; }
.card .value { font-size: 28px; font-weight: 600; margin: 2px 0; font-variant-numeric: tabular-nums; }
.card .detail { color: var(--muted); font-size: 13px; font-variant-numeric: tabular-nums; }
.change { display: inline-block; border-radius: 999px; padding: 0 8px; font-size: 12px; font-weight: 600;
  background: #f3f4f6; color: var(--muted); white-space: nowrap; }
.change.down { background: var(--good-bg); color: var(--good); }
.change.up { background: var(--bad-bg); color: var(--bad); }
.plot { overflow-x: auto; }
svg.widths { display: block; max-width: 100%; height: auto; }
svg text { font: 11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; fill: #374151; }
svg .legend text, svg .axis text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  font-size: 12px; fill: var(--muted); }
svg .stripe { fill: #f8fafc; }
svg .grid { stroke: var(--line); }
svg .dense { fill: var(--dense); }
svg .pruned { fill: var(--pruned); }
svg .value { fill: var(--muted); }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th { text-align: left; color: var(--muted); font-weight: 600; border-bottom: 2px solid var(--line);
  padding: 6px 8px; background: #fff; position: sticky; top: 0; }
td { border-bottom: 1px solid var(--line); padding: 5px 8px; vertical-align: top; }
tr:hover td { background: #f9fafb; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; word-break: break-all; }
.muted { color: var(--muted); }
details summary { cursor: pointer; color: var(--pruned); }
footer { color: var(--muted); font-size: 12px; margin-top: 24px; text-align: center; }
@media (max-width: 760px) { .cards { grid-template-columns: 1fr; } }
"""

# nothing may be fetched and no script may run, whatever a model's names contain
_POLICY = "default-src 'none'; style-src 'unsafe-inline'"


def render_html(report: Report) -> str:
    """The whole page as one string: no external resource, every model-derived string escaped."""
    title = f"spa report: {Path(report.pruned).name}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="spa {_e(__version__)}">',
            f"<title>{_e(title)}</title>",
            f"<style>{_STYLE}</style>",
            "</head>",
            "<body><main>",
            _header(report),
            _cards(report),
            _plot_section(report.layers),
            _layer_section(report.layers),
            _group_section(report.groups),
            f"<footer>Generated by spa {_e(__version__)}. Params and FLOPs per sample (symbolic axes count as 1, "
            "a multiply-add as 2 FLOPs), measured on both models' own tensors and inferred shapes.</footer>",
            "</main></body>",
            "</html>",
            "",
        ]
    )


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _header(report: Report) -> str:
    return (
        f'<header><h1>Pruning report</h1><div class="files">'
        f"<span>dense</span><code>{_e(report.dense)}</code>"
        f"<span>pruned</span><code>{_e(report.pruned)}</code></div></header>"
    )


def _cards(report: Report) -> str:
    cards = [
        _card(
            "Parameters",
            _si(report.params_after),
            f"{report.params_before:,} → {report.params_after:,}",
            _change(report.params_before, report.params_after),
        ),
        _card(
            "FLOPs per sample",
            _si(report.flops_after),
            f"{report.flops_before:,} → {report.flops_after:,}",
            _change(report.flops_before, report.flops_after),
        ),
        _latency_card(report.latency),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _card(label: str, value: str, detail: str, change: str) -> str:
    return (
        f'<div class="card"><div class="label">{label}</div><div class="value">{_e(value)}</div>'
        f'<div class="detail">{_e(detail)} {change}</div></div>'
    )


def _latency_card(latency: BenchResult | None) -> str:
    if latency is None:
        return _card("CPU latency (median)", "not measured", "skipped (--no-bench)", "")
    dense, pruned = latency.timings["dense"], latency.timings["pruned"]
    threads = {0: "default threads", 1: "1 thread"}.get(latency.threads, f"{latency.threads} threads")
    detail = (
        f"{dense.median_ms:.3f} → {pruned.median_ms:.3f} ms, "
        f"p90 {dense.p90_ms:.3f} → {pruned.p90_ms:.3f} ms; "
        f"{latency.runs} alternating runs, {threads}, batch {latency.batch}"
    )
    speed = latency.speedup
    assert speed is not None  # both timings were read above
    kind = "down" if speed > 1 else "up" if speed < 1 else ""
    return _card(
        "CPU latency (median)",
        f"{pruned.median_ms:.3f} ms",
        detail,
        f'<span class="change {kind}">{speed:.2f}x speedup</span>',
    )


def _si(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _change(before: int | None, after: int | None) -> str:
    if before is None or after is None or not before:
        return ""
    if after == before:
        return '<span class="change">0%</span>'
    pct = 100.0 * (after - before) / before
    return f'<span class="change {"down" if pct < 0 else "up"}">{pct:+.1f}%</span>'


def _width(value: int | None) -> str:
    return "?" if value is None else str(value)


# --- the width plot: two bars per layer, dense above pruned, in graph order

_LABEL_W, _BARS_W, _VALUE_W = 300, 560, 120
_ROW_H, _BAR_H = 22, 8
_TOP, _BOTTOM = 34, 46
_NAME_CHARS = 40


def _plot_section(layers: list[Layer]) -> str:
    if not layers:
        return '<section><h2>Channel widths</h2><p class="note">The model has no weighted layers.</p></section>'
    return (
        '<section><h2>Channel widths</h2><p class="note">Output channels of every weighted layer in graph '
        f'order, dense and pruned. Hover a row for its full name.</p><div class="plot">{_width_plot(layers)}'
        "</div></section>"
    )


def _width_plot(layers: list[Layer]) -> str:
    widest = max((w for layer in layers for w in (layer.out_before, layer.out_after) if w), default=1)
    step = _tick_step(widest)
    scale = _BARS_W / (math.ceil(widest / step) * step)
    width, height = _LABEL_W + _BARS_W + _VALUE_W, _TOP + len(layers) * _ROW_H + _BOTTOM
    parts = [
        f'<svg class="widths" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Output channels per layer, dense and pruned">',
        _legend(),
    ]
    # stripes, then grid lines, then bars: each layer paints over the one before
    parts += [
        f'<rect class="stripe" x="0" y="{_TOP + k * _ROW_H}" width="{width}" height="{_ROW_H}"/>'
        for k in range(0, len(layers), 2)
    ]
    parts.append(_axis(step, scale, height))
    parts += [_plot_row(k, layer, scale) for k, layer in enumerate(layers)]
    parts.append("</svg>")
    return "\n".join(parts)


def _tick_step(widest: int) -> int:
    """A round step (1, 2 or 5 times a power of ten) giving about five ticks."""
    raw = widest / 5
    if raw <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _legend() -> str:
    x = _LABEL_W
    return (
        f'<g class="legend"><rect class="swatch dense" x="{x}" y="10" width="12" height="12" rx="2"/>'
        f'<text x="{x + 18}" y="20">dense</text>'
        f'<rect class="swatch pruned" x="{x + 80}" y="10" width="12" height="12" rx="2"/>'
        f'<text x="{x + 98}" y="20">pruned</text></g>'
    )


def _plot_row(k: int, layer: Layer, scale: float) -> str:
    top = _TOP + k * _ROW_H
    name = layer.name if len(layer.name) <= _NAME_CHARS else "…" + layer.name[-(_NAME_CHARS - 1) :]
    after = _width(layer.out_after) if layer.in_pruned else "absent"
    parts = [
        f'<g class="row"><title>{_e(layer.name)} ({_e(layer.op_type)}): {_width(layer.out_before)} → '
        f"{_e(after)} output channels</title>"
    ]
    parts.append(f'<text x="{_LABEL_W - 10}" y="{top + 15}" text-anchor="end">{_e(name)}</text>')
    for kind, value, offset in (("dense", layer.out_before, 2), ("pruned", layer.out_after, 3 + _BAR_H)):
        if value:
            parts.append(
                f'<rect class="bar {kind}" x="{_LABEL_W}" y="{top + offset}" '
                f'width="{value * scale:.1f}" height="{_BAR_H}" rx="1.5"/>'
            )
    parts.append(
        f'<text class="value" x="{_LABEL_W + _BARS_W + 10}" y="{top + 15}">'
        f"{_width(layer.out_before)} → {_e(after)}</text></g>"
    )
    return "".join(parts)


def _axis(step: int, scale: float, height: int) -> str:
    bottom = height - _BOTTOM
    parts = ['<g class="axis">']
    tick = 0
    while tick * scale <= _BARS_W + 0.5:
        x = _LABEL_W + tick * scale
        parts.append(
            f'<line class="grid" x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{bottom}"/>'
            f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{tick}</text>'
        )
        tick += step
    parts.append(
        f'<text x="{_LABEL_W + _BARS_W / 2:.0f}" y="{bottom + 36}" text-anchor="middle">output channels</text></g>'
    )
    return "".join(parts)


# --- tables


def _layer_section(layers: list[Layer]) -> str:
    if not layers:
        return ""
    head = (
        '<tr><th class="num">#</th><th>layer</th><th>op</th><th class="num">out channels</th>'
        '<th class="num">in channels</th><th class="num">FLOPs dense</th><th class="num">FLOPs pruned</th>'
        '<th class="num">change</th></tr>'
    )
    rows = [_layer_row(k, layer) for k, layer in enumerate(layers, start=1)]
    narrower = sum(1 for layer in layers if _narrower(layer))
    return (
        f'<section><h2>Layers</h2><p class="note">{len(layers)} weighted layers, {narrower} narrower in the '
        f'pruned model.</p><div class="table-wrap"><table class="layers"><thead>{head}</thead><tbody>'
        + "".join(rows)
        + "</tbody></table></div></section>"
    )


def _narrower(layer: Layer) -> bool:
    before, after = layer.out_before, layer.out_after
    return before is not None and after is not None and after < before


def _layer_row(k: int, layer: Layer) -> str:
    if layer.in_pruned:
        out = f"{_width(layer.out_before)} → {_width(layer.out_after)}"
        inputs = f"{_width(layer.in_before)} → {_width(layer.in_after)}"
        flops_after = f"{layer.flops_after:,}"
    else:
        out = f"{_width(layer.out_before)} → absent"
        inputs = f"{_width(layer.in_before)} → absent"
        flops_after = "absent"
    return (
        f'<tr><td class="num">{k}</td><td><code>{_e(layer.name)}</code></td><td>{_e(layer.op_type)}</td>'
        f'<td class="num">{out}</td><td class="num">{inputs}</td><td class="num">{layer.flops_before:,}</td>'
        f'<td class="num">{flops_after}</td><td class="num">{_change(layer.flops_before, layer.flops_after)}</td>'
        "</tr>"
    )


def _group_section(groups: list[GroupCut]) -> str:
    if not groups:
        return '<section><h2>Coupled groups</h2><p class="note">No group of more than one channel.</p></section>'
    cut = sum(1 for g in groups if g.removed)
    head = (
        '<tr><th class="num">group</th><th class="num">channels</th><th class="num">removed</th><th>kind</th>'
        "<th>status</th><th>layers</th></tr>"
    )
    return (
        '<section><h2>Coupled groups</h2><p class="note">Channels that must shrink together, as '
        f"<code>spa analyze</code> finds them in the dense model: {len(groups)} groups of more than one "
        f"channel, {cut} cut. Sizes after are measured on the pruned model.</p>"
        f'<div class="table-wrap"><table class="groups"><thead>{head}</thead><tbody>'
        + "".join(_group_row(g) for g in groups)
        + "</tbody></table></div></section>"
    )


def _group_row(group: GroupCut) -> str:
    removed = group.removed
    if removed is None:
        removed_cell = '<span class="muted">not measurable</span>'
    elif removed == 0:
        removed_cell = '<span class="muted">0</span>'
    else:
        removed_cell = f"{removed} {_change(group.channels_before, group.channels_after)}"
    if group.frozen:
        status = f'<span class="muted">frozen: {_e(group.frozen)}</span>'
    elif removed:
        status = "cut"
    elif not group.exact:
        status = "kept (approximate: spa prunes it only with --approximate)"
    else:
        status = "prunable, kept"
    kind = "exact" if group.exact else "approximate"
    return (
        f'<tr><td class="num">{group.id}</td>'
        f'<td class="num">{group.channels_before} → {_width(group.channels_after)}</td>'
        f'<td class="num">{removed_cell}</td><td>{kind}</td>'
        f"<td>{status}</td><td>{_layer_list(group.layers)}</td></tr>"
    )


def _layer_list(layers: list[str], shown: int = 4) -> str:
    items = [f"<code>{_e(layer)}</code>" for layer in layers]
    if len(items) <= shown:
        return "<br>".join(items) or '<span class="muted">-</span>'
    return (
        "<br>".join(items[:shown])
        + f"<details><summary>{len(items) - shown} more</summary>"
        + "<br>".join(items[shown:])
        + "</details>"
    )
