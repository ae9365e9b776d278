"""Sequential refit: each layer refitted, in graph order, on the inputs the pruned model gives it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builder import Graph, initializer
from click.testing import CliRunner

import spa
from spa.cli.commands import main
from spa.core.errors import UsageError
from spa.transforms import sequential

MODELS = Path(__file__).resolve().parents[1] / "models"
MNIST_CALIB = MODELS / "data" / "mnist_calib.npz"  # 256 samples


def _mlp(widths: tuple[int, ...], seed: int) -> onnx.ModelProto:
    """Gemm layers fc1, fc2, ... between ``widths``, a Relu after each but the last."""
    g = Graph(seed=seed)
    value = g.input("x", ["n", widths[0]])
    for k, (cols, rows) in enumerate(zip(widths, widths[1:]), 1):
        value = g.op("Gemm", [value, g.weight(cols, rows), g.weight(rows)], name=f"fc{k}")
        if k < len(widths) - 1:
            value = g.op("Relu", [value])
    g.output(value)
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
    monkeypatch.setattr(sequential, "RIDGES", (1e-12,))  # plain least squares, to compare with numpy's
    model = _mlp((12, 20, 16, 5), seed=3)
    x = np.random.default_rng(0).standard_normal((200, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    result = spa.prune(
        model, 0.25, "obs", calib=tmp_path / "calib.npz", calib_samples=200, refit="sequential", bench=False
    )
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


def _residual_mlp() -> onnx.ModelProto:
    """x -> h1 -> r (a residual stream) -> h2 -> o; the output is o + r. Pruning h1 moves r, so
    the layer writing o sees its skip connection drift."""
    g = Graph(seed=5)
    x = g.input("x", ["n", 12])

    def linear(value, cols, rows, name):
        return g.op("Add", [g.op("MatMul", [value, g.weight(cols, rows)], name=name), g.weight(rows)])

    h1 = g.op("Relu", [linear(x, 12, 20, "up1")])
    r = linear(h1, 20, 10, "down1")
    h2 = g.op("Relu", [linear(r, 10, 16, "up2")])
    g.output(g.op("Add", [linear(h2, 16, 10, "down2"), r]))
    return g.build()


def _residual_forward(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every MatMul's input and the residual stream r, in numpy from the model's weights."""
    const = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    linears = {}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            bias = next(n for n in model.graph.node if n.op_type == "Add" and node.output[0] in n.input)
            linears[node.name] = (const[node.input[1]], const[next(i for i in bias.input if i in const)])
    seen = {}

    def apply(name, value):
        seen[name] = value
        w, b = linears[name]
        return value @ w + b

    r = apply("down1", np.maximum(apply("up1", x.astype(np.float64)), 0))
    seen["out"] = apply("down2", np.maximum(apply("up2", r), 0)) + r
    seen["r"] = r
    return seen


def test_a_layer_feeding_a_residual_add_also_takes_up_the_drift_of_its_skip_connection(tmp_path, monkeypatch):
    monkeypatch.setattr(sequential, "RIDGES", (1e-12,))
    model = _residual_mlp()
    x = np.random.default_rng(1).standard_normal((300, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    result = spa.prune(
        model, 0.25, "obs", calib=tmp_path / "calib.npz", calib_samples=300, refit="sequential", bench=False
    )
    assert result.report.compensation["sequential"]["layers"] == 2  # down1 and down2 lose input channels
    dense, pruned = _residual_forward(model, x), _residual_forward(result.model, x)
    down2 = next(n for n in model.graph.node if n.name == "down2")
    w, b = initializer(model, down2.input[1]), initializer(model, _bias_of(model, down2))
    # the pruned down2 plus the pruned skip should give the dense down2 plus the dense skip
    wanted = dense["down2"] @ w + b + dense["r"] - pruned["r"]
    design = np.hstack([pruned["down2"], np.ones((len(x), 1))])
    solution = np.linalg.lstsq(design, wanted, rcond=None)[0]
    node = next(n for n in result.model.graph.node if n.name == "down2")
    got_w, got_b = initializer(result.model, node.input[1]), initializer(result.model, _bias_of(result.model, node))
    assert got_w.shape == (12, 10)
    assert np.allclose(got_w, solution[:-1], atol=1e-4) and np.allclose(got_b, solution[-1], atol=1e-4)
    # without the drift term the fit is another one: the test tells them apart
    plain = np.linalg.lstsq(design, dense["down2"] @ w + b, rcond=None)[0]
    assert not np.allclose(got_w, plain[:-1], atol=1e-3)
    assert (
        np.abs(dense["out"] - pruned["out"]).mean()
        < np.abs(
            dense["out"]
            - _residual_forward(
                spa.prune(
                    model, 0.25, "obs", calib=tmp_path / "calib.npz", calib_samples=300, refit="layerwise", bench=False
                ).model,
                x,
            )["out"]
        ).mean()
    )


def _bias_of(model: onnx.ModelProto, matmul: onnx.NodeProto) -> str:
    names = {t.name for t in model.graph.initializer}
    add = next(n for n in model.graph.node if n.op_type == "Add" and matmul.output[0] in n.input)
    return next(i for i in add.input if i in names)


def test_the_ridge_is_cross_validated_larger_when_rows_are_few(tmp_path):
    """96 channels read by 48 rows cannot be fitted without a strong ridge; by 6,000 rows they can."""
    x = np.random.default_rng(2).standard_normal((6000, 16)).astype(np.float32)
    ridges = {}
    for rows in (48, 6000):
        np.savez(tmp_path / "calib.npz", x=x[:rows])
        result = spa.prune(
            _mlp((16, 96, 96, 4), seed=7),
            0.3,
            "obs",
            calib=tmp_path / "calib.npz",
            calib_samples=rows,
            refit="sequential",
            bench=False,
        )
        ridges[rows] = result.report.compensation["sequential"]["ridges"]
        assert len(ridges[rows]) == 2 and set(ridges[rows]) <= set(sequential.RIDGES)
    assert ridges[48][-1] > ridges[6000][-1]
    assert ridges[6000][-1] <= 0.03


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
    report = spa.prune(
        MODELS / "mnist_cnn.onnx", 0.3, "obs", calib=MNIST_CALIB, compensate=False, refit="sequential", bench=False
    ).report
    assert report.compensation is None
    with pytest.raises(UsageError, match="unknown refit"):
        spa.prune(MODELS / "mnist_cnn.onnx", 0.3, refit="greedy", bench=False)


def test_cli_reports_the_refit_and_rejects_an_unknown_one(tmp_path):
    runner = CliRunner()
    out = tmp_path / "p.onnx"
    shown = runner.invoke(
        main,
        [
            "prune",
            str(MODELS / "mnist_rescnn.onnx"),
            "--ratio",
            "0.5",
            "--criterion",
            "obs",
            "--calib",
            str(MNIST_CALIB),
            "--no-bench",
            "-o",
            str(out),
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert "sequential refit: " in shown.output and "held-out output error" in shown.output
    layerwise = runner.invoke(
        main,
        [
            "prune",
            str(MODELS / "mnist_rescnn.onnx"),
            "--ratio",
            "0.5",
            "--criterion",
            "obs",
            "--calib",
            str(MNIST_CALIB),
            "--refit",
            "layerwise",
            "--no-bench",
            "-o",
            str(out),
            "--force",
        ],
    )
    assert layerwise.exit_code == 0 and "sequential refit" not in layerwise.output
    bad = runner.invoke(
        main, ["prune", str(MODELS / "mnist_cnn.onnx"), "--refit", "greedy", "-o", str(tmp_path / "q.onnx")]
    )
    assert bad.exit_code == 2 and not (tmp_path / "q.onnx").exists()


def _masked_encoder() -> onnx.ModelProto:
    """Token embeddings, zeroed at padding by the attention mask, through two linears per token."""
    g = Graph(seed=9)
    ids = g.input("input_ids", ["n", 6], onnx.TensorProto.INT64)
    mask = g.input("attention_mask", ["n", 6], onnx.TensorProto.INT64)
    embedded = g.op("Gather", [g.weight(50, 10), ids])
    scale = g.op("Unsqueeze", [g.op("Cast", [mask], to=onnx.TensorProto.FLOAT), g.const(np.array([-1]))])
    tokens = g.op("Add", [g.op("Mul", [embedded, scale]), g.weight(10)])  # padding still carries the shift
    hidden = g.op("Relu", [g.op("Add", [g.op("MatMul", [tokens, g.weight(10, 24)], name="up"), g.weight(24)])])
    g.output(g.op("Add", [g.op("MatMul", [hidden, g.weight(24, 5)], name="down"), g.weight(5)]))
    return g.build()


def test_padded_positions_stay_out_of_the_statistics_and_the_refit(tmp_path, monkeypatch):
    monkeypatch.setattr(sequential, "RIDGES", (1e-12,))
    model = _masked_encoder()
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 50, (300, 6))
    lengths = rng.integers(2, 7, 300)
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=mask)
    result = spa.prune(
        model, 0.25, "obs", calib=tmp_path / "calib.npz", calib_samples=300, refit="sequential", bench=False
    )
    assert result.report.statistics["padded_tokens"] == int((mask == 0).sum()) > 0
    # the refit of "down" is the least squares over the real tokens only

    def hidden_and_out(m):
        weights = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
        nodes = {n.name: n for n in m.graph.node}
        table = weights[next(n for n in m.graph.node if n.op_type == "Gather").input[0]]
        shift = weights[
            next(
                i
                for n in m.graph.node
                if n.op_type == "Add"
                for i in n.input
                if i in weights and weights[i].shape == table.shape[1:]
            )
        ]
        x = table[ids] * mask[..., None] + shift
        up, down = nodes["up"], nodes["down"]
        h = np.maximum(x @ weights[up.input[1]] + weights[_bias_of(m, up)], 0)
        return h, h @ weights[down.input[1]] + weights[_bias_of(m, down)]

    real = mask.astype(bool)
    dense_hidden, dense_out = hidden_and_out(model)
    pruned_hidden, _ = hidden_and_out(result.model)
    design = np.hstack([pruned_hidden[real], np.ones((int(real.sum()), 1))])
    solution = np.linalg.lstsq(design, dense_out[real], rcond=None)[0]
    down = next(n for n in result.model.graph.node if n.name == "down")
    got_w = initializer(result.model, down.input[1])
    assert got_w.shape == (18, 5)
    assert np.allclose(got_w, solution[:-1], atol=1e-4)
    assert np.allclose(initializer(result.model, _bias_of(result.model, down)), solution[-1], atol=1e-4)
    # over every position, padding included, the fit would be another one
    everywhere = np.hstack([pruned_hidden.reshape(-1, 18), np.ones((ids.size, 1))])
    assert not np.allclose(got_w, np.linalg.lstsq(everywhere, dense_out.reshape(-1, 5), rcond=None)[0][:-1], atol=1e-3)
