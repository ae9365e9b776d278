"""Edge export: float16 conversion and ORT format, each checked against the float32 .onnx model."""

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.core.errors import OutputError, UsageError, ValidationError
from spa.core.runtime import sample_inputs
from spa.formats import export
from spa.formats.export import (
    FP16_TOLERANCE,
    ORT_IDENTIFIER,
    Fp16RangeWarning,
    to_fp16,
    to_ort,
    validate_fp16,
    validate_ort,
)
from spa.formats.load import load_model
from spa.verify.compare import relative_error

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "mini_resnet.onnx"


def _mlp(first_weight: float | None = None) -> onnx.ModelProto:
    """x[batch, 16] -> Reshape (int64 shape) -> MatMul -> Add -> Relu -> Gemm(transB) -> y[batch, 8]."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.3
    if first_weight is not None:
        w1[0, 0] = first_weight
    inits = [
        numpy_helper.from_array(np.array([-1, 16], np.int64), "shape"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 32)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w1"], ["mm"], name="fc1"),
        helper.make_node("Add", ["mm", "b1"], ["biased"], name="bias1"),
        helper.make_node("Relu", ["biased"], ["hidden"], name="act"),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _masked_softmax() -> onnx.ModelProto:
    """Attention-style masking: scores + (-1e9 where masked) -> Softmax."""
    mask = np.zeros((1, 8), np.float32)
    mask[0, 5:] = -1e9
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "mask"], ["masked"]), helper.make_node("Softmax", ["masked"], ["y"], axis=-1)],
        "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(mask, "mask")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _overflowing() -> onnx.ModelProto:
    """Weights within float16's range, an activation beyond it, an output back within it."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "gain"], ["scaled"]),
            helper.make_node("Add", ["scaled", "big"], ["shifted"]),
            helper.make_node("Mul", ["shifted", "small"], ["y"]),
        ],
        "overflowing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [
            numpy_helper.from_array(np.float32(1000), "gain"),
            numpy_helper.from_array(np.float32(65000), "big"),
            numpy_helper.from_array(np.float32(1 / 65000), "small"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _resize_topk() -> onnx.ModelProto:
    """Resize (float scales) -> flatten -> TopK: ops the converter keeps in float32, an int64 output."""
    graph = helper.make_graph(
        [
            helper.make_node("Resize", ["x", "", "scales"], ["up"], mode="linear"),
            helper.make_node("Reshape", ["up", "flat_shape"], ["flat"]),
            helper.make_node("TopK", ["flat", "k"], ["y", "indices"]),
        ],
        "resize_topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 5]),
        ],
        [
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
            numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"),
            numpy_helper.from_array(np.array([5], np.int64), "k"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _elem_types(infos) -> list[int]:
    return [i.type.tensor_type.elem_type for i in infos]


def _cpu_session(source) -> ort.InferenceSession:
    data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mini_resnet() -> onnx.ModelProto:
    return onnx.load(str(EXAMPLE))


@pytest.fixture(scope="module")
def pruned() -> onnx.ModelProto:
    return spa.prune(EXAMPLE, 0.4, check=False).model


@pytest.mark.parametrize("which", ["mini_resnet", "pruned"])
def test_fp16_halves_the_model_and_keeps_float32_io(which, request):
    model = request.getfixturevalue(which)
    half = to_fp16(model)
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert sum(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer) == len(floats) > 0
    assert not any(t.data_type == TensorProto.FLOAT for t in half.graph.initializer)
    assert _elem_types(half.graph.input) == [TensorProto.FLOAT]
    assert _elem_types(half.graph.output) == [TensorProto.FLOAT]
    onnx.checker.check_model(half, full_check=True)
    ratio = half.ByteSize() / model.ByteSize()
    assert 0.45 < ratio < 0.56, ratio

    feeds = sample_inputs(model, seed=3)  # the same float32 arrays feed both
    want = _cpu_session(model).run(None, feeds)[0]
    got = _cpu_session(half).run(None, feeds)[0]
    assert got.dtype == np.float32
    assert 0 < relative_error({"y": want}, {"y": got}) < FP16_TOLERANCE

    check = validate_fp16(model, half, seed=3)
    assert check.ok, check.problems
    assert check.checker == "checker ok" and check.runs and check.io_match
    assert 0 < check.max_rel_error < FP16_TOLERANCE
    assert check.overflows == []


def test_fp16_io_float16_takes_and_returns_float16(mini_resnet):
    half = to_fp16(mini_resnet, keep_io_float32=False)
    assert _elem_types(half.graph.input) == [TensorProto.FLOAT16]
    assert _elem_types(half.graph.output) == [TensorProto.FLOAT16]
    assert not any(n.op_type == "Cast" for n in half.graph.node), "no boundary casts without float32 I/O"
    feeds = {k: v.astype(np.float16) for k, v in sample_inputs(mini_resnet).items()}
    assert _cpu_session(half).run(None, feeds)[0].dtype == np.float16
    check = validate_fp16(mini_resnet, half)
    assert check.ok, check.problems


def test_fp16_leaves_integer_tensors_and_the_input_alone():
    model = _mlp()
    before = model.SerializeToString()
    half = to_fp16(model)
    assert model.SerializeToString() == before, "the input model must not be modified"
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert types == {
        "shape": TensorProto.INT64,
        "w1": TensorProto.FLOAT16,
        "b1": TensorProto.FLOAT16,
        "w2": TensorProto.FLOAT16,
        "b2": TensorProto.FLOAT16,
    }
    shape = next(t for t in half.graph.initializer if t.name == "shape")
    assert numpy_helper.to_array(shape).tolist() == [-1, 16]
    check = validate_fp16(model, half)
    assert check.ok and check.max_rel_error < FP16_TOLERANCE, check.problems
    assert to_fp16(model).SerializeToString() == half.SerializeToString(), "conversion is deterministic"


def test_ops_kept_in_float32_still_run_on_cpu():
    model = _resize_topk()
    half = to_fp16(model)
    assert {t.name: t.data_type for t in half.graph.initializer}["scales"] == TensorProto.FLOAT
    topk = next(n for n in half.graph.node if n.op_type == "TopK")
    producer = {o: n for n in half.graph.node for o in n.output}[topk.input[0]]
    assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT
    assert _elem_types(half.graph.output) == [TensorProto.FLOAT, TensorProto.INT64]
    check = validate_fp16(model, half)
    assert check.ok, check.problems


def test_weights_beyond_fp16_range_are_clamped_with_a_warning_and_fail_validation():
    model = _mlp(first_weight=1e6)
    with pytest.warns(Fp16RangeWarning, match="'w1'"):
        half = to_fp16(model)
    w1 = numpy_helper.to_array(next(t for t in half.graph.initializer if t.name == "w1"))
    assert np.isfinite(w1).all() and np.abs(w1).max() == np.float16(65504)
    check = validate_fp16(model, half)
    assert not check.ok and check.clamped and "'w1'" in check.clamped[0]
    assert any("rel. error" in p and "clamped: 'w1' (max |x| 1.0e+06)" in p for p in check.problems), check.problems
    with pytest.raises(ValidationError, match="float16 model failed validation"):
        check.raise_if_failed()


def test_a_clamped_masking_constant_still_validates():
    model = _masked_softmax()
    with pytest.warns(Fp16RangeWarning, match="'mask'"):
        half = to_fp16(model)
    check = validate_fp16(model, half)
    assert check.ok, check.problems
    assert check.clamped and check.max_rel_error < FP16_TOLERANCE


def test_an_activation_overflowing_fp16_fails_validation():
    model = _overflowing()
    check = validate_fp16(model, to_fp16(model))
    assert check.runs and check.overflows == ["shifted"], check.as_dict()
    assert check.max_rel_error < FP16_TOLERANCE, "the CPU computes in float32, so only the overflow check sees it"
    with pytest.raises(ValidationError, match="activation 'shifted' overflows float16"):
        check.raise_if_failed()


def _with_external_data(folder: Path) -> Path:
    path = folder / "ext.onnx"
    onnx.save(
        onnx.load(str(EXAMPLE)),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    return path


def test_fp16_of_a_model_with_external_data_is_that_of_the_inline_model(tmp_path):
    lazy = load_model(_with_external_data(tmp_path))
    converted, inline = to_fp16(lazy), to_fp16(onnx.load(str(EXAMPLE)))
    assert [numpy_helper.to_array(t).tobytes() for t in converted.graph.initializer] == [
        numpy_helper.to_array(t).tobytes() for t in inline.graph.initializer
    ]


def _ort_outputs(path: Path, feeds) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("build", [lambda: onnx.load(str(EXAMPLE)), _mlp], ids=["mini_resnet", "mlp"])
def test_ort_file_loads_and_matches_the_onnx_model(build, tmp_path):
    model = build()
    out = tmp_path / "model.ort"
    check = to_ort(model, out, seed=1)
    assert check.ok and check.runs and check.io_match, check.problems
    assert out.read_bytes()[4:8] == ORT_IDENTIFIER
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ort"], "no staging left behind"
    feeds = sample_inputs(model, seed=1)
    want = _cpu_session(model).run(None, feeds)
    got = _ort_outputs(out, feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert relative_error(dict(enumerate(want)), dict(enumerate(got))) <= export.ORT_TOLERANCE


def test_ort_of_an_fp16_model_keeps_float16_weights(mini_resnet, tmp_path):
    to_ort(mini_resnet, tmp_path / "fp32.ort")
    half = to_fp16(mini_resnet)
    check = to_ort(half, tmp_path / "fp16.ort")
    assert check.ok, check.problems
    ratio = (tmp_path / "fp16.ort").stat().st_size / (tmp_path / "fp32.ort").stat().st_size
    assert ratio < 0.6, ratio
    feeds = sample_inputs(mini_resnet)
    want = _cpu_session(mini_resnet).run(None, feeds)[0]
    got = _ort_outputs(tmp_path / "fp16.ort", feeds)[0]
    assert relative_error({"y": want}, {"y": got}) < FP16_TOLERANCE


def test_ort_takes_external_data_from_a_path_or_a_lazy_model(tmp_path):
    source = _with_external_data(tmp_path)
    assert to_ort(source, tmp_path / "from_path.ort").ok
    lazy = load_model(source)
    assert to_ort(lazy, tmp_path / "from_lazy.ort").ok
    feeds = sample_inputs(lazy)
    from_path, from_lazy = (_ort_outputs(tmp_path / name, feeds)[0] for name in ("from_path.ort", "from_lazy.ort"))
    np.testing.assert_array_equal(from_path, from_lazy)
    assert not list(tmp_path.glob(".*")), "the lazy model's scratch copy is gone"


def test_validate_ort_rejects_a_file_that_is_not_ort(tmp_path):
    fake = tmp_path / "fake.ort"
    fake.write_bytes(EXAMPLE.read_bytes())
    check = validate_ort(EXAMPLE, fake)
    assert not check.ok and "identifier" in check.problems[0]


def test_ort_failures_leave_nothing_behind(tmp_path, monkeypatch):
    model = _mlp()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputError):
        to_ort(model, blocker / "model.ort")

    folder = tmp_path / "out"
    folder.mkdir()
    unknown_op = _mlp()
    unknown_op.graph.node[3].domain = "com.example"
    unknown_op.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(OutputError, match="cannot convert to ORT format"):
        to_ort(unknown_op, folder / "model.ort")
    assert list(folder.iterdir()) == []

    monkeypatch.setattr(export, "ORT_TOLERANCE", -1.0)  # every comparison now fails
    with pytest.raises(ValidationError, match="ORT model failed validation"):
        to_ort(model, folder / "model.ort")
    assert list(folder.iterdir()) == []
    monkeypatch.undo()

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export.os, "replace", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        to_ort(model, folder / "model.ort")
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_ort_into_an_unwritable_folder_fails_cleanly(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError):
            to_ort(_mlp(), folder / "model.ort")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_export_converts_validates_and_writes(mini_resnet, tmp_path):
    checks = export.export(mini_resnet, tmp_path / "m.ort", ort_format=True, fp16=True, fp16_io="float16")
    assert [c.target for c in checks] == ["float16", "ORT"] and all(c.ok for c in checks)
    assert (tmp_path / "m.ort").read_bytes()[4:8] == ORT_IDENTIFIER

    assert export.export(mini_resnet, tmp_path / "m.onnx", fp16=True, check=False) == []
    written = onnx.load(str(tmp_path / "m.onnx"))
    assert {t.data_type for t in written.graph.initializer} == {TensorProto.FLOAT16}

    with pytest.raises(UsageError, match="--fp16-io"):
        export.export(mini_resnet, tmp_path / "x.onnx", fp16=True, fp16_io="bfloat16")
    assert not (tmp_path / "x.onnx").exists()


def test_prune_cli_writes_a_validated_ort_file_by_default_name(tmp_path):
    from click.testing import CliRunner

    from spa.cli.commands import main

    source = tmp_path / "mini.onnx"
    source.write_bytes(EXAMPLE.read_bytes())
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main, ["prune", str(source), "--format", "ort", "--fp16", "--no-bench", "--json", str(report)]
    )
    assert result.exit_code == 0, result.output
    written = tmp_path / "mini.pruned.ort"
    assert written.read_bytes()[4:8] == ORT_IDENTIFIER
    checks = __import__("json").loads(report.read_text())["export"]
    assert [c["target"] for c in checks] == ["float16", "ORT"] and all(c["ok"] for c in checks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini.onnx", "mini.pruned.ort", "report.json"]


def test_prune_cli_fp16_io_float16_changes_the_interface(tmp_path):
    from click.testing import CliRunner

    from spa.cli.commands import main

    out = tmp_path / "half.onnx"
    result = CliRunner().invoke(
        main, ["prune", str(EXAMPLE), "-o", str(out), "--fp16", "--fp16-io", "float16", "--no-bench", "-q"]
    )
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {TensorProto.FLOAT16}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {TensorProto.FLOAT16}
