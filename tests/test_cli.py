"""The command line as a pipeline sees it: outputs, exit codes, JSON, determinism."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from spa.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "mini_resnet.onnx"


@pytest.fixture
def example(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copy(EXAMPLE, path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_prune_writes_next_to_input_and_prints_summary(example):
    before = _digest(example)
    result = run("prune", example, "--ratio", "0.4", "--no-bench")
    assert result.exit_code == 0, result.output
    out = example.with_name("model.pruned.onnx")
    assert out.exists()
    assert _digest(example) == before, "the input must never be modified"
    assert "groups: 9 found, 7 prunable, 7 pruned" in result.output
    assert "checker ok" in result.output and "soft==hard equal" in result.output
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert sum(t.ByteSize() for t in pruned.graph.initializer) < 0.5 * sum(
        t.ByteSize() for t in onnx.load(str(example)).graph.initializer
    )


def test_json_report_matches_the_model(example, tmp_path):
    report = tmp_path / "report.json"
    result = run("prune", example, "--ratio", "0.4", "--json", report, "--no-bench", "-q")
    assert result.exit_code == 0 and result.output == ""
    data = json.loads(report.read_text())
    assert data["validation"]["ok"] is True
    assert data["groups_pruned"] == 7 and data["params_after"] < data["params_before"]
    pruned = onnx.load(data["output"])
    params = sum(int(__import__("numpy").prod(t.dims)) for t in pruned.graph.initializer if t.data_type == 1)
    assert params == data["params_after"]


def test_soft_keeps_shapes(example):
    result = run("prune", example, "--ratio", "0.4", "--soft", "--no-bench")
    assert result.exit_code == 0, result.output
    soft = onnx.load(str(example.with_name("model.soft.onnx")))
    dense = onnx.load(str(example))
    assert {t.name: list(t.dims) for t in soft.graph.initializer} == {
        t.name: list(t.dims) for t in dense.graph.initializer
    }


def test_existing_output_is_refused_without_force(example):
    out = example.with_name("model.pruned.onnx")
    out.write_bytes(b"keep me")
    result = run("prune", example, "--no-bench")
    assert result.exit_code == 5 and "exists" in result.output
    assert out.read_bytes() == b"keep me"
    assert run("prune", example, "--no-bench", "--force").exit_code == 0


def test_output_equal_to_input_is_refused(example):
    result = run("prune", example, "-o", example, "--force")
    assert result.exit_code == 5 and "input" in result.output


@pytest.mark.parametrize(
    "content,kind", [(b"", "empty"), (b"not an onnx file at all", "garbage"), (None, "missing"), ("dir", "directory")]
)
def test_bad_input_gets_one_line_and_exit_3(tmp_path, content, kind):
    path = tmp_path / "bad.onnx"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    result = run("prune", path)
    assert result.exit_code == 3, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("spa: error:")
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.pruned.onnx"))


def test_truncated_model_is_rejected(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(EXAMPLE.read_bytes()[:5000])
    assert run("prune", path).exit_code == 3


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "7"])
def test_ratio_out_of_range_is_a_usage_error(example, ratio):
    result = run("prune", example, "--ratio", ratio)
    assert result.exit_code == 2 and "--ratio" in result.output
    assert not example.with_name("model.pruned.onnx").exists()


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"xx")
    result = run("prune", path, "--debug")
    assert result.exit_code != 0 and result.exception is not None


def test_analyze_names_frozen_ops_and_nodes(example):
    result = run("analyze", example)
    assert result.exit_code == 0
    assert "why frozen: image[1]: graph input" in result.output
    assert "why frozen: logits[1]: graph output" in result.output
    assert "prunable" in result.output


def test_exclude_protects_matching_nodes(example):
    plain = json.loads(_analysis_json(example))
    excluded = json.loads(_analysis_json(example, "--exclude", "/se_*"))
    assert len([g for g in excluded["groups"] if g["frozen"] is None]) < len(
        [g for g in plain["groups"] if g["frozen"] is None]
    )
    assert any("excluded by --exclude /se_*" in (g["frozen"] or "") for g in excluded["groups"])


def _analysis_json(example, *extra) -> str:
    out = example.with_name(f"analysis{len(extra)}.json")
    assert run("analyze", example, "--json", out, *extra).exit_code == 0
    return out.read_text()


@pytest.mark.parametrize(
    "options", [[], ["--global", "--criterion", "l1"], ["--round-to", "8"], ["--criterion", "random", "--seed", "3"]]
)
def test_output_is_byte_identical_across_runs_and_hash_seeds(example, tmp_path, options):
    digests = set()
    for k, hash_seed in enumerate(["0", "12345"]):
        out = tmp_path / f"out{k}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "spa",
                "prune",
                str(example),
                "-o",
                str(out),
                "--ratio",
                "0.4",
                "-q",
                "--no-validate",
                *options,
            ],
            check=True,
            env=env,
        )
        digests.add(_digest(out))
    assert len(digests) == 1


def test_round_to_keeps_multiples(example, tmp_path):
    out = tmp_path / "r.onnx"
    assert run("prune", example, "-o", out, "--ratio", "0.3", "--round-to", "8", "--no-bench").exit_code == 0
    model = onnx.load(str(out))
    conv_outs = [
        next(t for t in model.graph.initializer if t.name == n.input[1]).dims[0]
        for n in model.graph.node
        if n.op_type == "Conv"
    ]
    assert all(c % 8 == 0 for c in conv_outs if c not in (3, 10)), conv_outs


def test_global_ranking_gives_groups_different_ratios(example):
    import spa

    report = spa.prune(example, ratio=0.4, global_rank=True).report
    ratios = {g.id: g.removed / g.channels for g in report.groups if g.removed}
    assert report.validation.ok and len(set(round(r, 2) for r in ratios.values())) > 1


def test_analyze_lists_the_cost_of_every_node(example, tmp_path):
    report = tmp_path / "analysis.json"
    result = run("analyze", example, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    convs = [n for n in onnx.load(str(example)).graph.node if n.op_type == "Conv"]
    costed = {n["name"]: n for n in data["nodes"]}
    assert all(costed[c.name]["flops"] > 0 and costed[c.name]["params"] > 0 for c in convs)
    assert sum(n["flops"] for n in data["nodes"]) == sum(data["flops_by_op_type"].values()) == data["flops"]
    assert sum(n["params"] for n in data["nodes"]) == data["params"]
    by_op = data["flops_by_op_type"]
    assert max(by_op, key=by_op.get) == "Conv" and "FLOPs by op: Conv" in result.output


def test_calibration_data_feeds_the_criterion_and_the_refit(tmp_path):
    model = ROOT / "models" / "mnist_cnn.onnx"
    report = tmp_path / "report.json"
    out = tmp_path / "pruned.onnx"
    result = run(
        "prune",
        model,
        "--criterion",
        "obs",
        "--calib",
        ROOT / "models" / "data" / "mnist_calib.npz",
        "--calib-samples",
        "64",
        "--ratio",
        "0.3",
        "-o",
        out,
        "--json",
        report,
        "--no-bench",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["statistics"]["source"] == "calibration" and data["statistics"]["samples"] == 64
    assert data["compensation"]["layers"] > 0 and data["options"]["compensate"] is True
    assert "statistics of" in result.output and "compensated:" in result.output


def test_calibration_problems_are_usage_errors_and_write_nothing(example, tmp_path):
    out = example.with_name("model.pruned.onnx")
    result = run("prune", example, "--criterion", "activation")
    assert result.exit_code == 2 and "--calib" in result.output and "Traceback" not in result.output
    import numpy as np

    np.savez(tmp_path / "wrong.npz", other=np.zeros((4, 3, 32, 32), np.float32))
    result = run("prune", example, "--calib", tmp_path / "wrong.npz")
    assert result.exit_code == 2 and "no array for input" in result.output
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert run("prune", example, "--calib", tmp_path / "junk.npz").exit_code == 2
    assert run("prune", example, "--calib", tmp_path / "absent.npz").exit_code == 2
    assert not out.exists()


def test_magnitude_criteria_skip_the_refit_without_data_unless_asked(example, tmp_path):
    report = tmp_path / "r.json"
    assert run("prune", example, "--criterion", "l2", "--json", report, "--no-bench", "--force").exit_code == 0
    assert json.loads(report.read_text())["compensation"] is None
    assert (
        run("prune", example, "--criterion", "l2", "--compensate", "--json", report, "--no-bench", "--force").exit_code
        == 0
    )
    data = json.loads(report.read_text())
    assert data["compensation"]["layers"] > 0 and data["statistics"]["source"] == "synthetic"
