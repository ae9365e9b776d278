"""Fidelity: dense vs pruned outputs on calibration samples the statistics did not use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner

import spa
from spa.cli.commands import main
from spa.core.runtime import session
from spa.verify import fidelity

MODELS = Path(__file__).resolve().parents[1] / "models"
MNIST_CALIB = MODELS / "data" / "mnist_calib.npz"  # 256 samples


def _outputs(model, x: np.ndarray) -> np.ndarray:
    return session(model).run(None, {"input": x})[0].astype(np.float64)


def test_fidelity_is_measured_on_the_samples_after_the_statistics_ones():
    result = spa.prune(MODELS / "mnist_cnn.onnx", 0.5, "obs", calib=MNIST_CALIB, calib_samples=100, bench=False)
    found = result.report.validation.fidelity
    assert found.source == "held-out calibration samples" and found.samples == 156
    x = np.load(MNIST_CALIB)["input"][100:]
    dense, pruned = _outputs(onnx.load(MODELS / "mnist_cnn.onnx"), x), _outputs(result.model, x)
    (logits,) = found.outputs
    assert logits.name == "logits"
    assert logits.relative_error == pytest.approx(np.linalg.norm(pruned - dense) / np.linalg.norm(dense), rel=1e-6)
    assert logits.top1_agreement == pytest.approx(np.mean(dense.argmax(1) == pruned.argmax(1)))
    cosines = np.sum(dense * pruned, 1) / np.linalg.norm(dense, axis=1) / np.linalg.norm(pruned, axis=1)
    assert logits.cosine == pytest.approx(cosines.mean(), rel=1e-6)
    assert logits.relative_error > 0.01  # half the channels are gone: the outputs did move


def test_the_statistics_samples_are_used_when_none_are_left_over():
    result = spa.prune(MODELS / "mnist_cnn.onnx", 0.3, "obs", calib=MNIST_CALIB, calib_samples=256, bench=False)
    assert result.report.validation.fidelity.source == "calibration samples the statistics used"
    assert result.report.validation.fidelity.samples == 256


def test_nothing_removed_means_outputs_equal_and_no_data_means_no_figure():
    unchanged = spa.prune(MODELS / "mnist_cnn.onnx", 0.0, calib=MNIST_CALIB, bench=False).report.validation.fidelity
    assert unchanged.outputs[0].relative_error == 0.0 and unchanged.outputs[0].top1_agreement == 1.0
    assert unchanged.outputs[0].cosine == pytest.approx(1.0)
    assert spa.prune(MODELS / "mnist_cnn.onnx", 0.3, bench=False).report.validation.fidelity is None


def test_fidelity_ranks_a_data_criterion_above_random_removal():
    errors = {
        criterion: spa.prune(
            MODELS / "mnist_rescnn.onnx", 0.5, criterion, calib=MNIST_CALIB, bench=False, compensate=False
        )
        .report.validation.fidelity.outputs[0]
        .relative_error
        for criterion in ("obs", "random")
    }
    assert errors["obs"] < errors["random"]


def test_a_static_batch_larger_than_the_left_over_samples_uses_the_statistics_ones():
    feeds = {"x": np.arange(10, dtype=np.float32)[:, None]}
    held, source = fidelity.holdout(feeds, used=8, batch=4)
    assert source.startswith("calibration samples the statistics used") and len(held["x"]) == 10
    held, source = fidelity.holdout(feeds, used=8, batch=2)
    assert source == "held-out calibration samples" and held["x"][:, 0].tolist() == [8, 9]


@pytest.mark.parametrize(
    "head,axis,expected", [("Softmax", -1, True), ("Softmax", 1, False), ("LogSoftmax", 2, True), ("Relu", None, False)]
)
def test_argmax_agreement_only_for_class_scores(head, axis, expected):
    g = Graph()
    x = g.input("x", [2, 5, 4])
    attrs = {} if axis is None else {"axis": axis}
    y = g.op(head, [g.op("MatMul", [x, g.weight(4, 6)])], **attrs)
    g.output(y)
    model = g.build()
    model.graph.output[0].type.tensor_type.shape.dim.extend(
        [onnx.TensorShapeProto.Dimension(dim_value=d) for d in (2, 5, 6)]
    )
    assert (y in fidelity._class_score_outputs(model)) == expected
    measured = fidelity.measure(model, model, {"x": np.ones((2, 5, 4), np.float32)}, "test")
    assert (measured.outputs[0].top1_agreement is not None) == expected


def test_cli_prints_and_reports_fidelity(tmp_path):
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "prune",
            str(MODELS / "mnist_cnn.onnx"),
            "--ratio",
            "0.3",
            "--calib",
            str(MNIST_CALIB),
            "-o",
            str(out),
            "--json",
            str(report),
            "--no-bench",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "outputs vs dense on 128 held-out calibration samples:" in result.output
    saved = json.loads(report.read_text())["validation"]["fidelity"]
    assert saved["samples"] == 128 and saved["outputs"][0]["name"] == "logits"
    assert f"rel. error {saved['outputs'][0]['relative_error']:.3f}" in result.output


def test_calibration_data_the_model_cannot_run_is_an_error_even_when_only_fidelity_reads_it(tmp_path):
    np.savez(tmp_path / "small.npz", input=np.zeros((20, 1, 14, 14), np.float32))  # 28x28 expected
    with pytest.raises(spa.UsageError, match=r"axis 2 is fixed at 28, not 14"):
        spa.prune(MODELS / "mnist_cnn.onnx", 0.3, "l1", calib=tmp_path / "small.npz", compensate=False, bench=False)


def _token_model(table: np.ndarray) -> onnx.ModelProto:
    """ids, mask [batch, tokens] -> embedding + mask [batch, tokens, C] and its softmax."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"]),
        helper.make_node("Cast", ["mask"], ["real"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["real", "last"], ["column"]),
        helper.make_node("Add", ["rows", "column"], ["embedded"]),
        helper.make_node("Softmax", ["embedded"], ["scores"], axis=-1),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"]) for n in ("ids", "mask")]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "tokens", table.shape[1]])
        for n in ("embedded", "scores")
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        inputs,
        outputs,
        [
            numpy_helper.from_array(table.astype(np.float32), "table"),
            numpy_helper.from_array(np.array([-1], np.int64), "last"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_padded_positions_are_left_out_of_the_figures():
    rng = np.random.default_rng(3)
    dense_table = rng.standard_normal((20, 5))
    pruned_table = dense_table + 0.1 * rng.standard_normal((20, 5))
    pruned_table[0] = -10 * dense_table[0]  # id 0 pads: far off, another argmax, and never read
    ids = rng.integers(1, 20, (6, 9))
    mask = np.ones((6, 9), np.int64)
    for row, length in enumerate((9, 7, 5, 3, 8, 2)):
        mask[row, length:], ids[row, length:] = 0, 0
    feeds = {"ids": ids, "mask": mask}
    found = fidelity.measure(_token_model(dense_table), _token_model(pruned_table), feeds, "test")
    assert found.padded_positions == int((mask == 0).sum())

    real = mask.astype(bool)
    dense = (dense_table[ids] + mask[..., None])[real]
    pruned = (pruned_table[ids] + mask[..., None])[real]
    embedded, scores = found.outputs
    assert embedded.relative_error == pytest.approx(np.linalg.norm(pruned - dense) / np.linalg.norm(dense))
    cosines = []
    for row in range(6):
        a = (dense_table[ids[row]] + 1)[real[row]].ravel()
        b = (pruned_table[ids[row]] + 1)[real[row]].ravel()
        cosines.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert embedded.cosine == pytest.approx(np.mean(cosines))
    assert scores.top1_agreement == pytest.approx(float((dense.argmax(-1) == pruned.argmax(-1)).mean()))
    # every position counted would move all three figures
    assert not np.isclose(
        scores.top1_agreement, float(((dense_table[ids]).argmax(-1) == (pruned_table[ids]).argmax(-1)).mean())
    )
