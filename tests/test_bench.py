"""spa bench: alternating dense/pruned latency on onnxruntime providers."""

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from click.testing import CliRunner

from spa.cli.commands import main
from spa.verify.bench import bench

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "mini_resnet.onnx"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "pruned.onnx"
    assert CliRunner().invoke(main, ["prune", str(EXAMPLE), "-o", str(out), "-q", "--no-bench"]).exit_code == 0
    return out


def test_pair_reports_median_p90_throughput_and_speedup(pruned, tmp_path):
    report = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        ["bench", str(EXAMPLE), str(pruned), "--runs", "10", "--warmup", "2", "--threads", "1", "--json", str(report)],
    )
    assert result.exit_code == 0, result.output
    assert "| CPUExecutionProvider | 1 | 1 | dense |" in result.output and "speedup" in result.output
    data = json.loads(report.read_text())["results"][0]
    dense, small = data["timings"]["dense"], data["timings"]["pruned"]
    assert data["runs"] == 10 and dense["p90_ms"] >= dense["median_ms"] > 0
    assert data["speedup"] == pytest.approx(dense["median_ms"] / small["median_ms"])
    assert dense["throughput"] == pytest.approx(1000 / dense["median_ms"])


def test_input_shape_sets_dynamic_axes():
    result = bench([EXAMPLE], runs=3, warmup=0, shapes={"image": [4, 3, 32, 32]})
    assert result.batch == 4
    timing = next(iter(result.timings.values()))
    assert timing.throughput == pytest.approx(4000 / timing.median_ms)


@pytest.mark.parametrize("args", [["--providers", "no-such-provider"], ["--input-shape", "image=2xA"], ["--runs", "0"]])
def test_bad_options_are_usage_errors(args):
    result = CliRunner().invoke(main, ["bench", str(EXAMPLE), *args])
    assert result.exit_code == 2 and result.output.startswith("spa: error:")


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="onnxruntime-gpu is not installed"
)
def test_cuda_provider(pruned):
    result = bench([EXAMPLE, pruned], provider="CUDAExecutionProvider", runs=10)
    assert result.provider == "CUDAExecutionProvider" and result.speedup > 0


def test_prune_refuses_a_provider_that_is_not_installed(tmp_path):
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["prune", str(EXAMPLE), "-o", str(out), "--providers", "cpu,no-such"])
    assert result.exit_code == 2 and "no-such" in result.output and not out.exists()


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="onnxruntime-gpu is not installed"
)
def test_prune_times_on_cuda_besides_the_cpu():
    import spa

    result = spa.prune(EXAMPLE, ratio=0.4, bench=True, providers=("cuda",))
    timed = {pair["provider"]: pair for pair in result.report.validation.latency}
    assert set(timed) == {"CPUExecutionProvider", "CUDAExecutionProvider"}
    assert all(pair["dense_ms"] > 0 and pair["pruned_ms"] > 0 for pair in timed.values())


def _free_image_model(tmp_path) -> Path:
    import onnx
    from builder import Graph

    g = Graph()
    x = g.input("image", ["batch", 3, "height", "width"])
    g.output(g.op("Relu", [g.conv(x, 3, 4)]))
    path = tmp_path / "free.onnx"
    onnx.save(g.build(), path)
    return path


def test_bench_states_its_sizes_and_warns_when_a_free_axis_was_guessed(tmp_path):
    model = _free_image_model(tmp_path)
    report = tmp_path / "bench.json"
    guessed = CliRunner().invoke(main, ["bench", str(model), "--runs", "2", "--warmup", "0", "--json", str(report)])
    assert guessed.exit_code == 0, guessed.output
    assert "sizes: image=1x3x64x64" in guessed.output
    assert "image[2], image[3] are free axes that spa sized by a guess" in guessed.output
    assert json.loads(report.read_text())["results"][0]["guessed"] == ["image[2]", "image[3]"]
    given = CliRunner().invoke(
        main, ["bench", str(model), "--runs", "2", "--warmup", "0", "--input-shape", "image=1x3x40x48"]
    )
    assert given.exit_code == 0 and "sizes: image=1x3x40x48" in given.output and "guess" not in given.output
