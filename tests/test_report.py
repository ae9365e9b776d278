"""spa report: a self-contained HTML page measured on the dense and the pruned model."""

import re
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from builder import Graph
from click.testing import CliRunner

import spa
from spa.cli.commands import main
from spa.formats.model import Model
from spa.reporting.metrics import count
from spa.reporting.report import build_report, render_html

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "mini_resnet.onnx"
EVIL_NAMES = ("<script>alert(1)</script>", '"><img src=x onerror=alert(2)>')


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "mini.pruned.onnx"
    result = run("prune", EXAMPLE, "--ratio", "0.4", "-o", out, "-q", "--no-bench")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def report(pruned):
    return build_report(EXAMPLE, pruned, bench=False)


@pytest.fixture(scope="module")
def page(pruned) -> Path:
    """The page as the CLI writes it, at its default path beside PRUNED."""
    result = run("report", EXAMPLE, pruned, "--no-bench")
    target = pruned.with_name("mini.pruned.report.html")
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {target}\n"
    return target


def test_params_and_flops_are_those_of_each_model(report, pruned, page):
    dense, small = count(Model.load(EXAMPLE).graph), count(Model.load(pruned).graph)
    assert (report.params_before, report.flops_before) == (dense.params, dense.flops)
    assert (report.params_after, report.flops_after) == (small.params, small.flops)
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    assert {layer.name: layer.flops_after for layer in report.layers} == {
        name: small.node_flops[name] for name in (layer.name for layer in report.layers)
    }
    text = page.read_text()
    for figure in (dense.params, small.params, dense.flops, small.flops):
        assert f"{figure:,}" in text


def test_layer_widths_are_the_pruned_weights_shapes(report, pruned):
    model = onnx.load(str(pruned))
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    dense_layers = [n.name for n in onnx.load(str(EXAMPLE)).graph.node if n.op_type in ("Conv", "Gemm")]
    assert [layer.name for layer in report.layers] == dense_layers
    for layer in report.layers:
        node = nodes[layer.name]
        shape = weights[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        expected = shape[0] if layer.op_type == "Conv" or trans_b else shape[1]
        assert layer.in_pruned and layer.out_after == expected, layer
    narrower = [layer for layer in report.layers if layer.out_after < layer.out_before]
    assert narrower and report.layers[-1].out_after == report.layers[-1].out_before == 10  # the logits stay


def test_groups_show_what_was_cut(report):
    out_width = {layer.name: layer.out_after for layer in report.layers}
    assert all(g.channels_before > 1 for g in report.groups)
    cut = [g for g in report.groups if g.removed]
    assert cut and all(g.frozen is None for g in cut)
    for group in report.groups:
        for entry in group.layers:  # "Conv '/stem/stem.0/Conv' out": this group is that layer's output channels
            name = re.fullmatch(r"\w+ '(.*)' out", entry)
            if name:
                assert group.channels_after == out_width[name.group(1)], group
    frozen = [g for g in report.groups if g.frozen]
    assert frozen and all(g.removed == 0 for g in frozen)


def test_page_is_self_contained(page):
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "not measured" in text
    for remote in ("http://", "https://", "src=", "href=", "url(", "@import", "<link", "<script", "<img"):
        assert remote not in text.lower(), remote


def test_latency_is_measured_alternately(pruned):
    report = build_report(EXAMPLE, pruned, runs=5, warmup=1, threads=1)
    timings = report.latency.timings
    assert set(timings) == {"dense", "pruned"} and report.latency.runs == 5
    assert all(t.p90_ms >= t.median_ms > 0 for t in timings.values())
    text = render_html(report)
    assert "not measured" not in text and f"{timings['pruned'].median_ms:.3f} ms" in text


def test_mismatched_pair_is_a_usage_error(tmp_path):
    g = Graph()
    x = g.input("other_input", [1, 3, 8, 8])
    g.output(g.conv(x, 3, 4))
    other = tmp_path / "other.onnx"
    onnx.save(g.build(), str(other))
    result = run("report", EXAMPLE, other, "-o", tmp_path / "r.html", "--no-bench")
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("spa: error:")
    assert "not a pruned version" in result.output
    assert not (tmp_path / "r.html").exists()


def test_existing_output_is_refused_without_force(pruned, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("keep me")
    result = run("report", EXAMPLE, pruned, "-o", out, "--no-bench")
    assert result.exit_code == 5 and "exists" in result.output
    assert out.read_text() == "keep me"
    assert run("report", EXAMPLE, pruned, "-o", out, "--no-bench", "--force").exit_code == 0
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_same_models_give_the_same_page(pruned, page, tmp_path):
    out = tmp_path / "again.html"
    assert run("report", EXAMPLE, pruned, "-o", out, "--no-bench").exit_code == 0
    assert out.read_bytes() == page.read_bytes()


def test_bad_runs_is_a_usage_error(pruned, tmp_path):
    result = run("report", EXAMPLE, pruned, "-o", tmp_path / "r.html", "--runs", "0")
    assert result.exit_code == 2 and result.output.startswith("spa: error: --runs")


def test_model_derived_names_are_escaped(tmp_path):
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    hidden = g.op("Conv", [x, g.weight(8, 3, 3, 3), g.weight(8)], name=EVIL_NAMES[0], pads=[1, 1, 1, 1])
    y = g.op("Conv", [g.op("Relu", [hidden]), g.weight(4, 8, 1, 1)], name=EVIL_NAMES[1])
    g.output(y)
    dense, small = tmp_path / "evil.onnx", tmp_path / "evil.pruned.onnx"
    onnx.save(g.build(), str(dense))
    onnx.save(spa.prune(str(dense), ratio=0.5).model, str(small))
    report = build_report(dense, small, bench=False)
    assert [layer.name for layer in report.layers] == list(EVIL_NAMES)
    assert report.layers[0].out_after == 4
    text = render_html(report)
    assert not any(name in text for name in EVIL_NAMES)
    assert "<script" not in text and "<img" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_layer_missing_from_the_pruned_model_is_shown_absent(tmp_path):
    g = Graph()
    x = g.input("x", [1, 3, 8, 8])
    g.output(g.op("Conv", [g.op("Conv", [x, g.weight(4, 3, 1, 1)], name="kept"), g.weight(4, 4, 1, 1)], name="dropped"))
    model = g.build()
    dense, other = tmp_path / "dense.onnx", tmp_path / "other.onnx"
    onnx.save(model, str(dense))
    del model.graph.node[1]
    model.graph.node[0].output[0] = model.graph.output[0].name
    onnx.save(model, str(other))
    report = build_report(dense, other, bench=False)
    assert [(layer.name, layer.in_pruned, layer.out_after) for layer in report.layers] == [
        ("kept", True, 4),
        ("dropped", False, None),
    ]
    assert report.layers[1].flops_after is None and "4 → absent" in render_html(report)


def test_external_data_models_are_read(report, pruned, tmp_path):
    external = tmp_path / "external.onnx"
    onnx.save(
        onnx.load(str(pruned)),
        str(external),
        save_as_external_data=True,
        location="external.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "external.onnx.data").stat().st_size > 0
    from_files = build_report(EXAMPLE, external, bench=False)
    assert (from_files.params_after, from_files.flops_after) == (report.params_after, report.flops_after)
    assert from_files.layers == report.layers and from_files.groups == report.groups


def _chromium() -> str | None:
    return shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(page, report, tmp_path):
    from PIL import Image

    base = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = page.resolve().as_uri()
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    layers = len(report.layers)
    assert '<svg class="widths"' in dom
    assert dom.count('class="bar dense"') == layers and dom.count('class="bar pruned"') == layers
    assert dom.count("<tr>") == 1 + layers + 1 + len(report.groups)  # each table: a header row, then rows
    shot = tmp_path / "shot.png"
    subprocess.run(
        base + [f"--screenshot={shot}", "--window-size=1200,900", url], capture_output=True, timeout=120, check=True
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 100
    pruned_blue = sum(n for n, (r, g, b) in colours if abs(r - 37) + abs(g - 99) + abs(b - 235) < 24)
    assert pruned_blue > 500  # the pruned bars were drawn
