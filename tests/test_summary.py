"""Every `spa prune` summary says what happened to accuracy and speed, and at which input sizes
each figure was taken; `--json` carries the same facts."""

import json
import shutil
from pathlib import Path

import onnx
from builder import Graph
from click.testing import CliRunner

import spa
from spa.cli.commands import main
from spa.cli.render import prune_summary
from spa.pipeline import RunOptions
from spa.pipeline.summary import verdict

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "models" / "mnist_cnn.onnx"
MNIST_CALIB = ROOT / "models" / "data" / "mnist_calib.npz"  # 256 samples in [0, 1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _copy(tmp_path: Path, source: Path = MNIST) -> Path:
    path = tmp_path / source.name
    shutil.copy(source, path)
    return path


def test_without_calibration_the_summary_says_accuracy_was_not_measured(tmp_path):
    path, report = _copy(tmp_path), tmp_path / "r.json"
    result = run("prune", path, "--ratio", "0.7", "--no-bench", "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    removed = 1 - data["params_after"] / data["params_before"]
    assert removed > 0.8
    line = f"accuracy: not measured on real data ({removed:.0%} of the parameters removed); --calib DATA measures it"
    assert line in result.output
    assert data["summary"]["accuracy"]["measured"] is False
    assert data["summary"]["accuracy"]["remedy"] == "--calib DATA"
    statistics = data["summary"]["statistics"]
    assert statistics["source"] == "synthetic" and statistics["samples"] == data["statistics"]["samples"]
    assert "latency: not timed (--no-bench)" in result.output
    speed = data["summary"]["speed"]
    assert speed["timed"] is False and speed["why_not"] == "not asked" and speed["verdict"] is None


def test_with_calibration_the_summary_gives_the_held_out_agreement(tmp_path):
    path, report = _copy(tmp_path), tmp_path / "r.json"
    args = ("--calib", MNIST_CALIB, "--calib-samples", "64", "--refit", "layerwise", "--no-bench")
    result = run("prune", path, "--ratio", "0.5", *args, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    fidelity = data["validation"]["fidelity"]["outputs"][0]
    accuracy = data["summary"]["accuracy"]
    assert accuracy["measured"] and accuracy["samples"] == 192 and not accuracy["optimistic"]
    assert accuracy["top1_agreement"] == fidelity["top1_agreement"]
    assert (
        f"accuracy: top-1 agreement {fidelity['top1_agreement']:.1%}, cosine {fidelity['cosine']:.4f} "
        "against the dense model on 192 held-out calibration samples"
    ) in result.output
    assert data["summary"]["statistics"] == {
        "source": "calibration",
        "samples": 64,
        "data": str(MNIST_CALIB),
        "why_none": None,
    }


def test_the_summary_states_the_sizes_flops_validation_and_latency_used(tmp_path):
    g = Graph(opset=17)
    x = g.input("image", ["batch", 3, "h", "w"])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 16)]), 16, 4))
    path, report = tmp_path / "free.onnx", tmp_path / "r.json"
    onnx.save(g.build(), str(path))
    result = run("prune", path, "--ratio", "0.5", "--threads", "1", "--json", report)
    assert result.exit_code == 0, result.output
    sizes = json.loads(report.read_text())["summary"]["sizes"]
    # FLOPs count free axes as 1; validation and latency run at 64x64 images: the summary says so
    assert sizes["flops"] == {"image": [1, 3, 1, 1]} and sizes["latency"] == {"image": [1, 3, 64, 64]}
    assert sizes["validation"][0] == {"image": [1, 3, 64, 64]} and sizes["free_axes"] == ["image[2]", "image[3]"]
    validated = ", ".join("x".join(map(str, s["image"])) for s in sizes["validation"])
    assert (
        f"sizes:  FLOPs at 1x3x1x1; validated at {validated}; timed at 1x3x64x64 (free axes: --input-shape sets them)"
        in result.output
    )


def test_a_criterion_without_statistics_says_so(tmp_path):
    result = run("prune", _copy(tmp_path), "--criterion", "l1", "--no-bench")
    assert result.exit_code == 0, result.output
    assert "scored: l1, no statistics (the criterion reads the weights alone)" in result.output


def test_a_pruned_model_that_is_not_faster_gets_advice_on_what_to_try():
    model = spa.load(MNIST)
    pruned = spa.analyze(model).score("l2").plan(ratio=0.5, round_to=1).apply()
    pruned.validate(RunOptions(bench=False))
    pruned.validation.latency_asked = True
    # a timing in which the pruned model lost: what the summary makes of it, whatever this machine measures
    pruned.validation.latency = [
        {"provider": "CPUExecutionProvider", "threads": 0, "dense_ms": 1.0, "pruned_ms": 1.25, "speedup": 0.8}
    ]
    report = pruned.report
    speed = report.summary.speed
    assert speed.verdict == "slower" and speed.speedup == 0.8
    assert speed.advice[0].startswith("--round-to auto times each layer's widths")
    assert any(a.startswith("--target-latency F") for a in speed.advice)
    text = prune_summary({**report.as_dict(), "export": [], "output": "m.pruned.onnx"})
    assert "latency (CPU, median): 1.00 ms -> 1.25 ms (0.80x, SLOWER)" in text
    assert "        not faster: --round-to auto times each layer's widths and keeps counts the kernels run fast" in text


def test_speed_verdicts_allow_for_timing_noise():
    assert [verdict(s) for s in (2.0, 1.05, 1.02, 0.97, 0.95, 0.5)] == [
        "faster",
        "faster",
        "no faster",
        "no faster",
        "slower",
        "slower",
    ]


def test_a_faster_model_gets_no_advice(tmp_path):
    model = spa.load(MNIST)
    pruned = spa.analyze(model).score("l2").plan(ratio=0.5).apply()
    pruned.validate(RunOptions(bench=False))
    pruned.validation.latency = [
        {"provider": "CPUExecutionProvider", "threads": 0, "dense_ms": 2.0, "pruned_ms": 1.0, "speedup": 2.0}
    ]
    speed = pruned.report.summary.speed
    assert speed.verdict == "faster" and speed.advice == []
