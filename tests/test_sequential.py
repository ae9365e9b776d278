"""Sequential refit: each layer refitted, in graph order, on the inputs the pruned model gives it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import spa
from spa import sequential
from spa.cli import main
from spa.errors import UsageError

from builder import Graph, initializer

MODELS = Path(__file__).resolve().parents[1] / "models"
MNIST_CALIB = MODELS / "data" / "mnist_calib.npz"  # 256 samples


def _three_layer_mlp() -> onnx.ModelProto:
    g = Graph(seed=3)
    x = g.input("x", ["n", 12])
    h1 = g.op("Relu", [g.op("Gemm", [x, g.weight(12, 20), g.weight(20)], name="fc1")])
    h2 = g.op("Relu", [g.op("Gemm", [h1, g.weight(20, 16), g.weight(16)], name="fc2")])
    g.output(g.op("Gemm", [h2, g.weight(16, 5), g.weight(5)], name="fc3"))
    return g.build()


def _mlp_forward(model: onnx.ModelProto, x: np.ndarray, upto: str) -> np.ndarray:
    """The input of Gemm ``upto``, computed in numpy from the model's own weights."""
    value = x.astype(np.float64)
    for node in model.graph.node:
        if node.op_type != "Gemm":
            continue
        if node.name == upto:
            return value
        w, b = (initializer(model, name).astype(np.float64) for name in node.input[1:3])
        value = np.maximum(value @ w + b, 0)
    raise AssertionError(upto)


def test_the_last_layer_is_the_least_squares_fit_on_the_pruned_models_own_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(sequential, "DAMPING", 1e-12)  # plain least squares, to compare with numpy's
    model = _three_layer_mlp()
    x = np.random.default_rng(0).standard_normal((200, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    result = spa.prune(model, 0.25, "obs", calib=tmp_path / "calib.npz", calib_samples=200, refit="sequential",
                       bench=False)
    assert result.report.compensation["refit"] == "sequential"
    assert result.report.compensation["sequential"]["layers"] == 2  # fc2 and fc3 lose input channels
    pruned = result.model
    # what fc3 reads in the pruned model (fc2 already refitted), and what the dense fc3 gives
    inputs = _mlp_forward(pruned, x, "fc3")
    dense_in = _mlp_forward(model, x, "fc3")
    dense_fc3 = next(n for n in model.graph.node if n.name == "fc3")
    w3, b3 = (initializer(model, name).astype(np.float64) for name in dense_fc3.input[1:3])
    wanted = dense_in @ w3 + b3
    design = np.hstack([inputs, np.ones((len(x), 1))])
    solution = np.linalg.lstsq(design, wanted, rcond=None)[0]
    fc3 = next(n for n in pruned.graph.node if n.name == "fc3")
    got_w, got_b = initializer(pruned, fc3.input[1]), initializer(pruned, fc3.input[2])
    assert got_w.shape == (12, 5)
    assert np.allclose(got_w, solution[:-1], atol=1e-4) and np.allclose(got_b, solution[-1], atol=1e-4)
    figures = result.report.compensation["sequential"]
    assert figures["sequential_error"] < figures["layerwise_error"]


def test_sequential_moves_held_out_outputs_less_than_layerwise_on_a_trained_cnn():
    errors = {}
    for refit in ("layerwise", "sequential"):
        result = spa.prune(MODELS / "mnist_dwse.onnx", 0.5, "obs", calib=MNIST_CALIB, refit=refit, bench=False)
        assert result.report.validation.soft_equal  # the refit weights are cut like any others
        errors[refit] = result.report.validation.fidelity.outputs[0].relative_error
    assert errors["sequential"] < 0.7 * errors["layerwise"]


def test_auto_keeps_the_refit_that_moves_the_held_out_samples_less():
    result = spa.prune(MODELS / "mnist_rescnn.onnx", 0.5, "obs", calib=MNIST_CALIB, bench=False)
    compensation = result.report.compensation
    held_out = compensation["held_out_error"]
    assert set(held_out) == {"layerwise", "sequential"}
    assert compensation["refit"] == min(held_out, key=held_out.get)
    # the figure it chose by is the one the report gives for the written model
    assert result.report.validation.fidelity.outputs[0].relative_error == pytest.approx(held_out[compensation["refit"]])


def test_without_data_auto_stays_layerwise_and_sequential_runs_on_the_synthetic_inputs():
    auto = spa.prune(MODELS / "mnist_cnn.onnx", 0.3, bench=False).report
    assert auto.compensation["refit"] == "layerwise" and auto.compensation["sequential"] is None
    forced = spa.prune(MODELS / "mnist_cnn.onnx", 0.3, refit="sequential", bench=False).report
    assert forced.compensation["refit"] == "sequential"
    assert forced.compensation["sequential"]["samples"] == forced.statistics["samples"]
    assert forced.validation.soft_equal


def test_no_compensation_means_no_refit_and_a_bad_refit_name_is_a_usage_error():
    report = spa.prune(MODELS / "mnist_cnn.onnx", 0.3, "obs", calib=MNIST_CALIB, compensate=False,
                       refit="sequential", bench=False).report
    assert report.compensation is None
    with pytest.raises(UsageError, match="unknown refit"):
        spa.prune(MODELS / "mnist_cnn.onnx", 0.3, refit="greedy", bench=False)


def test_cli_reports_the_refit_and_rejects_an_unknown_one(tmp_path):
    runner = CliRunner()
    out = tmp_path / "p.onnx"
    shown = runner.invoke(main, ["prune", str(MODELS / "mnist_rescnn.onnx"), "--ratio", "0.5", "--criterion", "obs",
                                 "--calib", str(MNIST_CALIB), "--no-bench", "-o", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "sequential refit: " in shown.output and "held-out output error" in shown.output
    layerwise = runner.invoke(main, ["prune", str(MODELS / "mnist_rescnn.onnx"), "--ratio", "0.5", "--criterion",
                                     "obs", "--calib", str(MNIST_CALIB), "--refit", "layerwise", "--no-bench",
                                     "-o", str(out), "--force"])
    assert layerwise.exit_code == 0 and "sequential refit" not in layerwise.output
    bad = runner.invoke(main, ["prune", str(MODELS / "mnist_cnn.onnx"), "--refit", "greedy", "-o",
                               str(tmp_path / "q.onnx")])
    assert bad.exit_code == 2 and not (tmp_path / "q.onnx").exists()
