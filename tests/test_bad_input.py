"""The bad-input catalogue: each case gets one line, its documented exit code, no partial
output, and an untouched input."""

import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner

import spa
import spa.formats.files
from spa.cli.commands import main

EXAMPLE = Path(__file__).resolve().parents[1] / "models" / "mini_resnet.onnx"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(result, code: int, folder: Path, input_path: Path | None = None, digest=None):
    assert result.exit_code == code, result.output
    assert result.output.startswith("spa: error:") and result.output.count("\n") == 1
    assert "Traceback" not in result.output
    leftovers = [p.name for p in folder.iterdir() if "pruned" in p.name or p.name.startswith(".")]
    assert not leftovers, leftovers
    if input_path is not None:
        assert hashlib.sha256(input_path.read_bytes()).hexdigest() == digest


def save(model, folder: Path, name="m.onnx") -> tuple[Path, str]:
    path = folder / name
    onnx.save(model, str(path))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def small_model(opset=17):
    g = Graph(opset=opset)
    x = g.input("x", [1, 3, 4, 4])
    h = g.op("Relu", [g.conv(x, 3, 4)])
    return g, h


def test_op_from_unknown_domain_is_named(tmp_path):
    g, h = small_model()
    g.output(g.conv(g.op("Frobnicate", [h], domain="com.acme"), 4, 2))
    model = g.build()
    model.opset_import.append(onnx.helper.make_opsetid("com.acme", 1))
    path, digest = save(model, tmp_path)
    result = run("prune", path)
    assert_clean_failure(result, 3, tmp_path, path, digest)
    assert "com.acme" in result.output and "--custom-ops" in result.output


def _first_ir_version_spa_cannot_use() -> int:
    """Derived from the installed onnx and onnxruntime: newer onnxruntime releases run IR versions
    older ones refused, and may run versions past the installed onnx's, which its checker refuses."""
    import onnxruntime as ort

    g, h = small_model()
    g.output(h)
    model = g.build()
    for version in range(model.ir_version, onnx.IR_VERSION + 1):
        model.ir_version = version
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:
            return version
    return onnx.IR_VERSION + 1


def test_ir_version_onnxruntime_or_onnx_cannot_run(tmp_path):
    # Either onnx knows the version and only onnxruntime refuses it, or it is past onnx's too
    # (the checker refuses it): both are an unsupported model, exit 3, with the version named.
    g, h = small_model(opset=17)
    g.output(g.conv(h, 4, 2))
    model = g.build()
    model.ir_version = _first_ir_version_spa_cannot_use()
    path, digest = save(model, tmp_path)
    result = run("prune", path)
    assert_clean_failure(result, 3, tmp_path, path, digest)
    assert "IR version" in result.output or "ir_version" in result.output


def test_opset_onnx_does_not_know(tmp_path):
    g, h = small_model(opset=onnx.defs.onnx_opset_version() + 1)
    g.output(g.conv(h, 4, 2))
    path, digest = save(g.build(), tmp_path)
    result = run("prune", path)
    assert_clean_failure(result, 3, tmp_path, path, digest)
    assert "opset" in result.output


def test_missing_external_data_via_cli(tmp_path):
    g, h = small_model()
    g.output(g.conv(h, 4, 2))
    path = tmp_path / "m.onnx"
    onnx.save(g.build(), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "m.data").unlink()
    result = run("prune", path)
    assert result.exit_code == 3 and "not found" in result.output


def test_nothing_prunable_says_so_and_writes_only_if_asked(tmp_path):
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    g.output(g.conv(x, 3, 2))  # input and output channels are both frozen
    path, digest = save(g.build(), tmp_path)
    result = run("prune", path, "--no-bench")
    assert result.exit_code == 0 and "nothing to prune" in result.output
    assert not (tmp_path / "m.pruned.onnx").exists()
    result = run("prune", path, "--no-bench", "--write-unchanged")
    assert result.exit_code == 0 and (tmp_path / "m.pruned.onnx").exists()
    written = onnx.load(str(tmp_path / "m.pruned.onnx"))
    original = onnx.load(str(path))
    assert [onnx.numpy_helper.to_array(t).tolist() for t in written.graph.initializer] == [
        onnx.numpy_helper.to_array(t).tolist() for t in original.graph.initializer
    ]


@pytest.mark.parametrize("spec", ["y=1x3x8x8", "x=1x3x8", "x=1x3xA", "x=1x3x2x2"])
def test_input_shapes_that_do_not_fit_the_model(tmp_path, spec):
    # unknown input, wrong rank, not a size, and sizes the dense model cannot run (3x3, no padding)
    g = Graph()
    x = g.input("x", ["n", 3, "h", "w"])
    h = g.op("Relu", [g.op("Conv", [x, g.weight(4, 3, 3, 3)])])
    g.output(g.conv(h, 4, 2))
    path, digest = save(g.build(), tmp_path)
    assert_clean_failure(run("prune", path, "--no-bench", "--input-shape", spec), 2, tmp_path, path, digest)


def test_disk_full_mid_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    shutil.copy(EXAMPLE, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spa.formats.files.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    result = run("prune", path, "--no-bench")
    assert_clean_failure(result, 5, tmp_path, path, digest)
    assert "No space left" in result.output


def test_unwritable_destination(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(EXAMPLE, path)
    result = run("prune", path, "-o", "/proc/spa-cannot-write-here.onnx", "--no-bench")
    assert result.exit_code == 5 and result.output.startswith("spa: error:")
    result = run("prune", path, "-o", tmp_path / "no" / "such" / "dir.onnx", "--no-bench")
    assert result.exit_code == 5 and "no such directory" in result.output


def test_declared_shapes_in_the_billions_allocate_nothing(tmp_path):
    g = Graph()
    x = g.input("x", [100000, 3, 1000, 1000])
    h = g.op("Relu", [g.conv(x, 3, 4, k=1)])
    g.output(g.conv(h, 4, 2, k=1))
    path, digest = save(g.build(), tmp_path)
    result = run("prune", path)
    assert_clean_failure(result, 4, tmp_path, path, digest)
    assert "too large" in result.output
    # without validation it prunes: nothing in spa itself allocates by declared shapes
    result = run("prune", path, "--no-validate", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0
    weights = [np.prod(t.dims) for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer]
    assert sum(weights) < sum(np.prod(t.dims) for t in onnx.load(str(path)).graph.initializer)


# --- options that cannot work are refused before any work ----------------------------------


def test_exclude_pattern_matching_no_node_lists_similar_names(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(EXAMPLE, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run("prune", path, "--exclude", "/se_reduce/conv")  # the node is /se_reduce/Conv
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "--exclude /se_reduce/conv: the pattern matches no node" in result.output
    assert "similar node names: /se_reduce/Conv" in result.output
    assert_clean_failure(run("analyze", path, "--exclude", "/nowhere/*"), 2, tmp_path, path, digest)


def test_exclude_patterns_that_match_are_accepted(tmp_path):
    result = run("analyze", EXAMPLE, "--exclude", "/se_*", "--exclude", "/fc1/Gemm")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("ratio", ["0.5", "0.3"])  # 0.3 is the default: given, it still conflicts
def test_ratio_with_a_target_is_refused(tmp_path, ratio):
    path = tmp_path / "m.onnx"
    shutil.copy(EXAMPLE, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run("prune", path, "--ratio", ratio, "--target-flops", "0.5")
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "--ratio and --target-flops/--target-params/--target-latency" in result.output


def test_ratio_with_a_target_is_refused_by_the_api():
    with pytest.raises(spa.UsageError, match="--ratio and --target"):
        spa.prune(EXAMPLE, 0.3, target_params=0.5)
    assert spa.prune(EXAMPLE, target_params=0.5, check=False).report.target.metric == "params"


@pytest.mark.parametrize(
    "args,named",
    [
        (["--ratio", "abc"], "'--ratio': 'abc' is not a valid float"),
        (["--no-such-option"], "No such option '--no-such-option'"),
        (["--criterion", "l7"], "'--criterion': 'l7' is not one of"),
    ],
)
def test_click_usage_errors_share_the_one_line_style(tmp_path, args, named):
    path = tmp_path / "m.onnx"
    shutil.copy(EXAMPLE, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run("prune", path, *args)
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert named in result.output and "--help" in result.output


def test_missing_calibration_data_is_refused_before_the_model_is_read(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not a model: the calibration path is checked first")
    result = run("prune", path, "--calib", tmp_path / "nothere.npz")
    assert_clean_failure(result, 2, tmp_path)
    assert "--calib" in result.output and "no such file or folder" in result.output


def test_a_ratio_for_pattern_matching_no_node_is_refused_before_the_statistics():
    stages = []
    with pytest.raises(spa.UsageError, match=r"--ratio-for /fc9/\*: the pattern matches no node.*similar node names"):
        spa.prune(EXAMPLE, ratios={"/fc9/*": 0.5}, progress=lambda stage, *_: stages.append(stage))
    assert "statistics" not in stages and "score" not in stages
