"""Untrusted numbers and runaway runs: non-finite calibration data, weights and outputs; models
that never stop; calibration files that are FIFOs or archives that decompress past the budget."""

import hashlib
import math
import os
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import spa
import spa.api
import spa.formats.calibration
import spa.scoring.statistics
from spa.cli.commands import main
from spa.core import runlimit
from spa.core.errors import UsageError
from spa.formats.export import ExportCheck, _compare
from spa.scoring.statistics import load_calibration
from spa.verify.compare import relative_error
from spa.verify.fidelity import measure, nonfinite_problems
from spa.verify.validate import validate

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(result, code: int, folder: Path, input_path: Path, digest: str):
    assert result.exit_code == code, result.output
    assert result.output.startswith("spa: error:") and result.output.count("\n") == 1, result.output
    assert not [p.name for p in folder.iterdir() if "pruned" in p.name or p.name.startswith(".")]
    assert hashlib.sha256(input_path.read_bytes()).hexdigest() == digest


def save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> tuple[Path, str]:
    path = folder / name
    onnx.save(model, str(path))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def mlp(extra_output: str | None = None) -> onnx.ModelProto:
    """x [N, 6] -> Gemm -> Relu -> Gemm -> y: one prunable group of 16 channels."""
    g = Graph()
    x = g.input("x", ["N", 6])
    h = g.op("Relu", [g.op("Gemm", [x, g.weight(6, 16), g.weight(16)])])
    g.output(g.op("Gemm", [h, g.weight(16, 4), g.weight(4)]))
    if extra_output == "log":  # NaN wherever the sample input is negative
        g.output(g.op("Log", [x]))
    return g.build()


# --- calibration data ------------------------------------------------------------------------


def prune_with_nan_in_sample_17(folder: Path):
    """``spa prune`` of ``mlp()`` with calibration data whose sample 17 holds a NaN; returns the
    CLI result and the input model's path and digest."""
    path, digest = save(mlp(), folder)
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    x[17, 3] = np.nan
    np.savez(folder / "calib.npz", x=x)
    return run("prune", path, "--calib", folder / "calib.npz", "--no-bench"), path, digest


def test_nan_in_calibration_data_is_refused_naming_array_and_sample(tmp_path):
    result, path, digest = prune_with_nan_in_sample_17(tmp_path)
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "'x'" in result.output and "sample 17" in result.output and "NaN" in result.output


def test_values_that_overflow_the_inputs_type_are_refused(tmp_path):
    x = np.zeros((5, 6))
    x[2, 0] = 1e300  # finite in float64, inf in the model's float32
    np.savez(tmp_path / "calib.npz", x=x)
    with pytest.raises(UsageError, match="'x' holds NaN or inf in sample 2"):
        load_calibration(tmp_path / "calib.npz", mlp(), 10)


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


def _spa(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    # a subprocess: a regression would block forever, and the timeout turns that into a failure
    return subprocess.run(
        [sys.executable, "-m", "spa", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@needs_fifo
def test_a_fifo_named_like_an_array_in_a_calibration_folder_is_refused_without_blocking(tmp_path):
    path, digest = save(mlp(), tmp_path)
    folder = tmp_path / "calib"
    folder.mkdir()
    os.mkfifo(folder / "x.npy")  # nobody ever writes to it: opening it for reading would block
    result = _spa("prune", path, "--calib", folder, "--no-bench")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("spa: error:") and result.stderr.count("\n") == 1
    assert "not a regular file" in result.stderr and "x.npy" in result.stderr
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


@needs_fifo
def test_a_fifo_given_as_the_calibration_archive_is_refused_without_blocking(tmp_path):
    path, _ = save(mlp(), tmp_path)
    os.mkfifo(tmp_path / "calib.npz")
    result = _spa("prune", path, "--calib", tmp_path / "calib.npz", "--no-bench")
    assert result.returncode == 2 and "not a regular file" in result.stderr, result.stderr


def test_a_device_is_never_read_as_calibration_data(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "x.npy").symlink_to("/dev/zero")  # endless: reading it would never finish
    with pytest.raises(UsageError, match="not a regular file"):
        load_calibration(folder, mlp(), 8)


def _declare_size(archive: Path, size: int) -> None:
    """Rewrite the uncompressed size the zip directory and local header declare for every member,
    leaving the data alone: what a zip bomb's directory says, without writing gigabytes."""
    data = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        start = data.find(signature)
        while start >= 0:
            data[start + offset : start + offset + 4] = size.to_bytes(4, "little")
            start = data.find(signature, start + 4)
    archive.write_bytes(bytes(data))


def test_an_archive_declaring_2_gib_is_refused_from_its_directory(tmp_path):
    path, digest = save(mlp(), tmp_path)
    archive = tmp_path / "calib.npz"
    np.savez_compressed(archive, x=np.zeros((64, 6), np.float32))
    _declare_size(archive, (2 << 30) + 128)
    result = run("prune", path, "--calib", archive, "--no-bench")
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "2.0 GiB" in result.output and "1.0 GiB" in result.output and "budget" in result.output


def test_an_archive_over_the_budget_is_refused_and_one_within_it_read(tmp_path, monkeypatch):
    archive = tmp_path / "calib.npz"
    np.savez_compressed(archive, x=np.zeros((4096, 6), np.float32))  # 96 KiB of zeros, compressed to little
    assert load_calibration(archive, mlp(), 8)["x"].shape == (8, 6)
    monkeypatch.setattr(spa.formats.calibration, "ARCHIVE_BUDGET", 64 << 10)
    with pytest.raises(UsageError, match=r"decompresses to 96\.\d KiB, over the 64\.0 KiB"):
        load_calibration(archive, mlp(), 8)


@pytest.mark.parametrize("form", ["npz", "npz-compressed", "npy-folder"])
def test_only_the_samples_used_are_read(tmp_path, form):
    x = np.zeros((65536, 256), np.float32)  # 64 MiB
    x[:8] = np.arange(8 * 256, dtype=np.float32).reshape(8, 256)
    g = Graph()
    g.output(g.op("Relu", [g.input("x", ["N", 256])]))
    if form == "npy-folder":
        source = tmp_path / "calib"
        source.mkdir()
        np.save(source / "x.npy", x)
    else:
        source = tmp_path / "calib.npz"
        (np.savez_compressed if form == "npz-compressed" else np.savez)(source, x=x)
    del x
    tracemalloc.start()
    try:
        loaded = load_calibration(source, g.build(), 8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(loaded["x"], np.arange(8 * 256, dtype=np.float32).reshape(8, 256))
    assert peak < 4 << 20, peak  # a whole array read would be 64 MiB


def test_a_folder_of_sample_files_is_read_only_as_far_as_needed(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for k in range(4):
        np.save(folder / f"s{k}.npy", np.full((6,), k, np.float32))
    (folder / "s9.npy").write_bytes(b"not an array")  # after the samples used: never opened
    loaded = load_calibration(folder, mlp(), 3)["x"]
    assert loaded.shape == (3, 6) and loaded[:, 0].tolist() == [0, 1, 2]
    with pytest.raises(UsageError, match="s9.npy"):
        load_calibration(folder, mlp(), 10)


def test_a_truncated_array_is_a_usage_error(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "x.npy", np.ones((10, 6), np.float32))
    data = (folder / "x.npy").read_bytes()
    (folder / "x.npy").write_bytes(data[:-40])
    assert load_calibration(folder, mlp(), 8)["x"].shape == (8, 6)  # the samples used are whole
    with pytest.raises(UsageError, match="truncated"):
        load_calibration(folder, mlp(), 10)
    # a header declaring 8 TiB per sample allocates nothing it cannot fill
    with open(folder / "x.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (4, 2**41)})
    with pytest.raises(UsageError, match="truncated"):
        load_calibration(folder, mlp(), 2)


def test_object_arrays_are_refused(tmp_path):
    archive = tmp_path / "calib.npz"
    with zipfile.ZipFile(archive, "w") as handle, handle.open("x.npy", "w") as member:
        np.lib.format.write_array(member, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="not numbers"):
        load_calibration(archive, mlp(), 8)


# --- weights and outputs ---------------------------------------------------------------------


def _poisoning_refit(monkeypatch):
    """The layer-wise refit, with NaN written into every weight it refits: a refit gone wrong."""
    real = spa.pipeline.pruned.layerwise_refit

    def poisoned(model, *args):
        refitted, outcome = real(model, *args)
        before = {t.name: t for t in model.graph.initializer}
        for tensor in refitted.graph.initializer:
            if tensor.name in before and tensor.raw_data != before[tensor.name].raw_data:
                values = numpy_helper.to_array(tensor).copy()
                values.flat[0] = np.nan
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
        return refitted, outcome

    monkeypatch.setattr(spa.pipeline.pruned, "layerwise_refit", poisoned)


def test_nan_weights_fail_validation(tmp_path, monkeypatch):
    _poisoning_refit(monkeypatch)
    path, digest = save(mlp(), tmp_path)
    result = run("prune", path, "--ratio", "0.5", "--no-bench")
    assert_clean_failure(result, 4, tmp_path, path, digest)
    assert "weights hold NaN or inf" in result.output
    assert "outputs NaN or inf where the input model's outputs are finite" in result.output
    assert "hard-pruned outputs differ from soft-pruned ones (rel. error inf)" in result.output


def test_nan_calibration_data_that_slipped_past_the_loader_fails_validation(tmp_path, monkeypatch):
    """The reported case behind the loader's check: one NaN sample made every refitted weight NaN,
    and soft==hard read 'equal (rel. err 0.0e+00)'. Validation alone must catch it too."""
    monkeypatch.setattr(spa.scoring.statistics, "first_nonfinite", lambda array: None)
    result, path, digest = prune_with_nan_in_sample_17(tmp_path)
    assert_clean_failure(result, 4, tmp_path, path, digest)
    assert "weights hold NaN or inf" in result.output and "equal" not in result.output


def test_a_nan_error_is_never_equal():
    finite, nan = {"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, np.nan])}
    assert relative_error(finite, nan) == math.inf and relative_error(nan, finite) == math.inf
    # the same NaN in both agrees only where the dense model has it too
    assert relative_error(nan, nan) == 0.0
    assert relative_error(nan, nan, dense=finite) == math.inf
    assert relative_error(nan, nan, dense=nan) == 0.0
    assert relative_error({"y": np.array([np.inf])}, {"y": np.array([-np.inf])}) == math.inf


def test_soft_and_hard_both_nan_are_not_reported_equal(tmp_path):
    dense = mlp()
    broken = onnx.ModelProto()
    broken.CopyFrom(dense)
    weight = broken.graph.initializer[2]  # the second Gemm's weight: every output reads it
    values = numpy_helper.to_array(weight).copy()
    values[0, 0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    result = validate(dense, broken, broken, broken, removed_anything=True)
    assert result.soft_equal is False and result.soft_max_rel_error == math.inf
    assert any("NaN or inf where the input model's outputs are finite" in p for p in result.problems)
    assert not result.ok


def test_the_input_models_own_nan_outputs_are_reported_not_hidden(tmp_path):
    path, _ = save(mlp(extra_output="log"), tmp_path)
    result = run("prune", path, "--ratio", "0.5", "--no-bench", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    valid = next(line for line in result.output.splitlines() if line.startswith("valid:"))
    assert "soft==hard equal" in valid and "holds NaN or inf on the sample inputs" in valid
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["dense_nonfinite"] == [mlp(extra_output="log").graph.output[1].name]


def test_float16_and_ort_checks_fail_on_new_nan():
    reference = {"y": np.array([[1.0, np.nan, 3.0]], np.float32)}
    same_nan = {"y": np.array([[1.0, np.nan, 3.0]], np.float32)}
    moved_nan = {"y": np.array([[np.nan, 2.0, 3.0]], np.float32)}
    ok, bad = ExportCheck("ORT", 1e-5), ExportCheck("ORT", 1e-5)
    _compare(reference, same_nan, ok)
    _compare(reference, moved_nan, bad)
    assert ok.ok and ok.max_rel_error == 0.0
    assert not bad.ok and "inf or NaN" in bad.problems[0]


def test_fidelity_flags_outputs_that_turn_nan_on_calibration_data():
    dense = mlp()
    broken = onnx.ModelProto()
    broken.CopyFrom(dense)
    weight = broken.graph.initializer[2]
    values = numpy_helper.to_array(weight).copy()
    values[:, 1] = np.nan  # output column 1 only
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 6)).astype(np.float32)}
    fidelity = measure(dense, broken, feeds, "held-out calibration samples")
    assert fidelity.outputs[0].nonfinite == 16 and fidelity.outputs[0].relative_error == math.inf
    assert "NaN or inf on held-out calibration samples" in nonfinite_problems(fidelity)[0]
    assert nonfinite_problems(measure(dense, dense, feeds, "held-out calibration samples")) == []


# --- time limits -----------------------------------------------------------------------------


def looping(prunable: bool = False, trips: int = 2**62) -> onnx.ModelProto:
    """x [1, 6] -> Loop (``trips`` times: add 1) -> y; with ``prunable``, a Gemm -> Relu -> Gemm after
    it, whose statistics need the loop's result. A 2^62-trip model is well under 1 kB."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 6]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 6]),
        ],
        [numpy_helper.from_array(np.ones((1, 6), np.float32), "one")],
    )
    g = Graph()
    x = g.input("x", [1, 6])
    looped = g.op("Loop", [g.const(np.array(trips, np.int64)), g.const(np.array(True)), x], body=body)
    if prunable:
        looped = g.op(
            "Gemm",
            [g.op("Relu", [g.op("Gemm", [looped, g.weight(6, 16), g.weight(16)])]), g.weight(16, 4), g.weight(4)],
        )
    g.output(looped)
    return g.build()


def test_the_run_limit_stops_a_loop_of_2_62_trips():
    import onnxruntime as ort

    model = looping()
    assert len(model.SerializeToString()) < 1024
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def limited_run():
        runlimit.set_timeout(0.5)
        runlimit.set_stage("a test")
        return runlimit.run(sess, None, {"x": np.zeros((1, 6), np.float32)})

    with pytest.raises(runlimit.RunTimeout, match="a test: a run of the model took longer than 0.5 s"):
        runlimit.own_context(limited_run)()
    short = ort.InferenceSession(looping(trips=3).SerializeToString(), providers=["CPUExecutionProvider"])
    assert runlimit.run(short, None, {"x": np.zeros((1, 6), np.float32)})[0].tolist() == [[3.0] * 6]


def test_a_model_that_never_stops_fails_validation_cleanly(tmp_path):
    path, digest = save(looping(), tmp_path)
    result = run("prune", path, "--run-timeout", "1")
    assert_clean_failure(result, 3, tmp_path, path, digest)
    assert result.output.startswith("spa: error: validate: a run of the model took longer than 1 s")


def test_a_model_that_never_stops_is_stopped_in_the_statistics(tmp_path):
    path, digest = save(looping(prunable=True), tmp_path)
    result = run("prune", path, "--run-timeout", "1")
    assert_clean_failure(result, 3, tmp_path, path, digest)
    assert result.output.startswith("spa: error: statistics: a run of the model took longer than 1 s")


def test_the_python_api_takes_the_same_limit(tmp_path):
    with pytest.raises(runlimit.RunTimeout, match="statistics"):
        spa.prune(looping(prunable=True), 0.5, run_timeout=0.5)
    with pytest.raises(UsageError, match="--run-timeout"):
        spa.prune(mlp(), 0.5, run_timeout=-1)


def test_bench_is_limited_too(tmp_path):
    path, _ = save(looping(), tmp_path)
    result = run("bench", path, "--run-timeout", "0.5")
    assert result.exit_code == 3 and result.output.startswith("spa: error: bench: a run of the model")


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_bad_run_timeout_is_a_usage_error(tmp_path, value):
    path, digest = save(mlp(), tmp_path)
    assert_clean_failure(run("prune", path, "--run-timeout", value), 2, tmp_path, path, digest)


@pytest.mark.parametrize("conversion", ["fp16", "ort"])
def test_export_checks_are_limited_too(tmp_path, conversion):
    from spa.formats.export import export

    target = tmp_path / ("m.ort" if conversion == "ort" else "m.onnx")
    stage = "ORT check" if conversion == "ort" else "float16 check"
    with pytest.raises(runlimit.RunTimeout, match=stage):
        export(looping(), target, ort_format=conversion == "ort", fp16=conversion == "fp16", run_timeout=0.5)
    assert list(tmp_path.iterdir()) == []
