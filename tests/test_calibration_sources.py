"""Calibration data the way the ecosystem provides it: onnxruntime's CalibrationDataReader, one
.npy file, an .npz or a folder; samples that do not fit the model are refused or warned about
with the fix, and every calibration error exits 2 with its whole reason."""

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader
from test_bad_input import assert_clean_failure

import spa
from spa.cli.commands import main
from spa.scoring.calibration_fit import CalibrationWarning, calibration_run_error

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "models" / "mnist_cnn.onnx"
MNIST_CALIB = ROOT / "models" / "data" / "mnist_calib.npz"  # 256 samples in [0, 1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class Samples(CalibrationDataReader):
    """A reader as users write them for onnxruntime.quantization: one sample per call."""

    def __init__(self, images: np.ndarray, endless: bool = False):
        self.images, self.endless, self.calls = images, endless, 0

    def get_next(self):
        self.calls += 1
        if self.calls > len(self.images) and not self.endless:
            return None
        k = (self.calls - 1) % len(self.images)
        return {"input": self.images[k : k + 1]}


class Batches:
    """A reader that is no subclass: the protocol is all spa needs."""

    def __init__(self, items: list[dict]):
        self.items = iter(items)

    def get_next(self):
        return next(self.items, None)


def _images(count: int = 96) -> np.ndarray:
    return np.load(MNIST_CALIB)["input"][:count]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_a_calibration_data_reader_gives_the_same_model_as_the_same_samples_in_a_file(tmp_path):
    images = _images()
    np.savez(tmp_path / "calib.npz", input=images)
    options = {"calib_samples": 64, "refit": "layerwise", "seed": 0}
    from_reader = spa.prune(MNIST, 0.5, calib=Samples(images), **options)
    from_file = spa.prune(MNIST, 0.5, calib=tmp_path / "calib.npz", **options)
    statistics = from_reader.report.statistics
    assert statistics["source"] == "calibration" and statistics["samples"] == 64
    assert from_reader.report.validation.fidelity.samples == 32  # the 32 after the 64 are held out
    assert from_reader.report.options["calib"] == "calibration reader Samples"
    reader_weights, file_weights = _weights(from_reader.model), _weights(from_file.model)
    assert reader_weights.keys() == file_weights.keys()
    for name, value in reader_weights.items():
        np.testing.assert_array_equal(value, file_weights[name])


def test_an_endless_reader_is_read_only_as_far_as_the_samples_used():
    reader = Samples(_images(16), endless=True)
    result = spa.prune(MNIST, 0.3, "l2", calib=reader, calib_samples=8, compensate=False)
    assert result.report.validation.fidelity.samples == 256
    assert reader.calls == 8 + 256  # the statistics' samples and the held-out ones, no more


def test_the_staged_api_scores_with_a_reader():
    scored = spa.analyze(spa.load(MNIST)).score("obspa", data=Samples(_images(32)))
    assert scored.statistics.source == "calibration" and scored.statistics.samples == 32


@pytest.mark.parametrize(
    "reader,message",
    [
        (type("Empty", (), {"get_next": lambda self: None})(), "returned None before giving any sample"),
        (type("Wrong", (), {"get_next": lambda self: {"x": np.zeros((1, 1, 28, 28))}})(), "no array for input"),
        (type("Listy", (), {"get_next": lambda self: [np.zeros((1, 1, 28, 28))]})(), "not a dict of input arrays"),
    ],
)
def test_a_reader_that_gives_no_usable_sample_is_a_usage_error(reader, message):
    with pytest.raises(spa.UsageError, match=message):
        spa.prune(MNIST, 0.3, calib=reader, check=False)


def test_something_that_is_neither_a_path_nor_a_reader_is_refused():
    with pytest.raises(spa.UsageError, match="get_next"):
        spa.prune(MNIST, 0.3, calib=[np.zeros((1, 1, 28, 28))], check=False)


def test_one_npy_file_feeds_a_single_input_model(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(MNIST, path)
    np.save(tmp_path / "images.npy", _images(40))
    result = run("prune", path, "--calib", tmp_path / "images.npy", "--calib-samples", "32", "--no-bench")
    assert result.exit_code == 0, result.output
    assert "statistics of 4 layer inputs from 32 calibration samples" in result.output
    assert "accuracy: top-1 agreement" in result.output and "on 8 held-out calibration samples" in result.output


def test_one_npy_file_for_a_model_with_two_inputs_says_what_to_give(tmp_path):
    g = Graph(opset=17)
    a, b = g.input("a", [1, 4]), g.input("b", [1, 4])
    g.output(g.op("Add", [g.op("MatMul", [a, g.const(np.ones((4, 8), np.float32))]), g.op("Relu", [b])]))
    path = tmp_path / "m.onnx"
    onnx.save(g.build(), str(path))
    np.save(tmp_path / "a.npy", np.ones((4, 1, 4), np.float32))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run("prune", path, "--calib", tmp_path / "a.npy")
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "one .npy file feeds a model with one input; this one has inputs a, b" in result.output
    assert "an .npz of arrays named after them, or a folder of <input>.npy files" in result.output


def test_8_bit_samples_for_a_float_input_get_a_warning_naming_the_fix(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(MNIST, path)
    np.savez(tmp_path / "u8.npz", input=np.round(_images(40) * 255).astype(np.uint8))
    result = run("prune", path, "--calib", tmp_path / "u8.npz", "--criterion", "l2", "--no-compensate", "--no-bench")
    assert result.exit_code == 0, result.output
    assert (
        f"spa: warning: --calib {tmp_path / 'u8.npz'}: input 'input' is float, the samples are uint8 values 0-255, "
        "fed as they are: if the model expects values in [0, 1], divide by 255"
    ) in result.output
    quiet = run("prune", path, "--calib", tmp_path / "u8.npz", "--criterion", "l2", "--no-bench", "--force", "-q")
    assert quiet.exit_code == 0 and quiet.output == ""


def _scaling_model(op: str, constant: float, then: tuple[str, float] | None = None) -> onnx.ModelProto:
    """An image model whose graph scales its input first: x / 255, or (x - 0.5) / 0.25."""
    g = Graph(opset=17)
    x = g.input("image", ["batch", 1, 8, 8])
    scaled = g.op(op, [x, g.const(np.float32(constant))])
    if then is not None:
        scaled = g.op(then[0], [scaled, g.const(np.float32(then[1]))])
    g.output(g.conv(g.op("Relu", [g.conv(scaled, 1, 8)]), 8, 2))
    return g.build()


@pytest.mark.parametrize(
    "model,samples,fix",
    [
        (_scaling_model("Div", 255.0), np.random.default_rng(0).random((8, 1, 8, 8)), "multiply by 255"),
        (_scaling_model("Sub", 0.5, ("Div", 0.25)), np.full((8, 1, 8, 8), 200.0), "divide by 255"),
        (_scaling_model("Mul", 4.0), np.full((8, 1, 8, 8), 200, np.uint8), "is float, the samples are uint8"),
    ],
)
def test_samples_out_of_the_range_the_graph_scales_for_get_a_warning(model, samples, fix):
    reader = Batches([{"image": samples}])
    with pytest.warns(CalibrationWarning, match=fix):
        spa.prune(model, 0.5, "l2", calib=reader, compensate=False, check=False)


@pytest.mark.parametrize(
    "model,samples",
    [
        (_scaling_model("Div", 255.0), np.full((8, 1, 8, 8), 200, np.uint8)),  # the graph divides by 255 itself
        (_scaling_model("Div", 255.0), np.full((8, 1, 8, 8), 200.0)),
        (_scaling_model("Sub", 0.5, ("Div", 0.25)), np.random.default_rng(0).random((8, 1, 8, 8))),
    ],
)
def test_samples_in_the_range_the_graph_scales_for_get_no_warning(model, samples):
    reader = Batches([{"image": samples}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        spa.prune(model, 0.5, "l2", calib=reader, compensate=False, check=False)


def test_samples_of_a_shape_the_model_fixes_otherwise_exit_2_naming_the_axis(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(MNIST, path)
    np.savez(tmp_path / "big.npz", input=np.zeros((8, 1, 32, 32), np.float32))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run("prune", path, "--calib", tmp_path / "big.npz")
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "input 'input' gets samples of shape [1, 32, 32], the model declares [batch, 1, 28, 28]" in result.output
    assert "(axis 2 is fixed at 28, not 32)" in result.output


def test_samples_the_graph_itself_refuses_exit_2_with_onnxruntimes_reason(tmp_path):
    g = Graph(opset=17)
    x = g.input("x", ["batch", "n"])
    g.output(
        g.op(
            "MatMul",
            [g.op("Relu", [g.op("Add", [x, g.const(np.ones(8, np.float32))])]), g.const(np.ones((8, 4), np.float32))],
        )
    )
    path = tmp_path / "m.onnx"
    onnx.save(g.build(), str(path))
    np.savez(tmp_path / "c.npz", x=np.ones((4, 5), np.float32))  # Add needs n == 8
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run("prune", path, "--calib", tmp_path / "c.npz", "--criterion", "obspa")
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "onnxruntime could not run the calibration data:" in result.output and "5 by 8" in result.output


def test_onnxruntimes_reason_is_kept_whole_past_its_first_line():
    failure = RuntimeError(
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: input for the "
        "following indices\n index: 2 Got: 32 Expected: 28\n Please fix either the inputs/outputs or the model."
    )
    error = calibration_run_error(failure)
    assert error.exit_code == 2
    assert "for the following indices index: 2 Got: 32 Expected: 28 Please fix" in str(error)
