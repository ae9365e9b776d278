"""The staged API: load, analyze, score, plan (inspect, drop), apply, validate, save; the options
shared with the CLI; per-layer ratios by name pattern; the model boundary's format codec."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from test_qoperator import _every_form, _qoperator

import spa
from spa.cli.commands import main
from spa.core.errors import UsageError
from spa.formats.model import Model
from spa.pipeline import CLI_RUN, AnalyzeOptions, CutOptions, PlanOptions, RunOptions, ScoreOptions

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "mini_resnet.onnx"


@pytest.fixture(scope="module")
def scores():
    return spa.analyze(spa.load(EXAMPLE)).score("l2")


def _without_seconds(report) -> dict:
    data = report.as_dict()
    data.pop("seconds")
    return data


def test_the_stages_chained_give_what_the_one_call_gives():
    model = spa.load(EXAMPLE)
    analysis = spa.analyze(model)
    assert analysis.report().as_dict() == spa.analyze(EXAMPLE).as_dict()
    pruned = analysis.score("l1").plan(ratio=0.4, round_to=2).apply()
    validation = pruned.validate()
    one_call = spa.prune(EXAMPLE, 0.4, "l1", round_to=2)
    assert validation.ok and validation.soft_equal
    assert pruned.model.SerializeToString() == one_call.model.SerializeToString()
    assert _without_seconds(pruned.report) == _without_seconds(one_call.report)


def test_a_plan_lists_its_groups_and_drops_one_without_changing_itself(scores):
    plan = scores.plan(ratio=0.5)
    groups = {g.id: g for g in plan.groups}
    assert len(groups) == len(plan.units.removed) > 1
    first = next(iter(groups.values()))
    assert len(first.removed) == first.units // 2 and first.layers and first.exact
    smaller = plan.drop(first.id)
    assert first.id not in {g.id for g in smaller.groups} and first.id in {g.id for g in plan.groups}
    report = smaller.apply().report
    cut = {g.id: g.removed for g in report.groups}
    assert cut[first.id] == 0 and all(cut[g] == len(groups[g].removed) for g in groups if g != first.id)
    assert report.groups_pruned == len(groups) - 1
    with pytest.raises(UsageError, match=f"group {first.id} is not in the plan"):
        smaller.drop(first.id)


def _removed(units: int, ratio: float) -> int:
    return int(math.floor(units * ratio + 0.5))


def _touching(plan, node: str) -> dict[int, int]:
    return {g.id: len(g.removed) for g in plan.groups if any(f"'{node}'" in layer for layer in g.layers)}


def test_ratios_by_pattern_cut_only_the_groups_whose_layers_match(scores):
    units = {g.id: g.size for g in scores.analyzed.prunable}
    plan = scores.plan(ratio=0.0, ratios={"/fc1/*": 0.5})
    fc1 = _touching(plan, "/fc1/Gemm")  # the groups of its input channels (two branches) and of its outputs
    assert len(fc1) == len(plan.groups) == 3
    assert all(removed == _removed(units[gid], 0.5) for gid, removed in fc1.items())
    # fc1's output channels are fc2's input channels: both patterns match that group, the last given wins
    later = scores.plan(ratio=0.0, ratios={"/fc1/*": 0.5, "/fc2/*": 0.25})
    shared = _touching(later, "/fc2/Gemm")
    (gid,) = shared
    assert shared[gid] == _removed(units[gid], 0.25)
    assert all(r == _removed(units[g], 0.5) for g, r in _touching(later, "/fc1/Gemm").items() if g != gid)
    # the groups no pattern matches keep ``ratio``
    mixed = {g.id: len(g.removed) for g in scores.plan(ratio=0.25, ratios={"/fc1/*": 0.75}).groups}
    plain = {g.id: len(g.removed) for g in scores.plan(ratio=0.25).groups}
    assert all(mixed[g] == _removed(units[g], 0.75) for g in fc1)
    assert {g: r for g, r in mixed.items() if g not in fc1} == {g: r for g, r in plain.items() if g not in fc1}


@pytest.mark.parametrize(
    "ratios, message",
    [
        ({"/nothing/*": 0.5}, "matches no node"),
        ({"/fc1/*": 1.0}, r"must be in \[0, 1\)"),
        ({"/fc1/*": -0.1}, "got -0.1"),
    ],
)
def test_bad_ratios_by_pattern_are_usage_errors(scores, ratios, message):
    with pytest.raises(UsageError, match=message):
        scores.plan(ratio=0.3, ratios=ratios)


def test_ratios_by_pattern_and_a_global_ranking_are_refused_together():
    with pytest.raises(UsageError, match="--global"):
        PlanOptions(ratios={"/fc1/*": 0.5}, global_rank=True)


def test_ratio_for_on_the_command_line(tmp_path, scores):
    runner = CliRunner()
    out = tmp_path / "out.onnx"
    args = ["prune", str(EXAMPLE), "-o", str(out), "--criterion", "l2", "--no-bench", "-q", "--ratio", "0"]
    result = runner.invoke(main, [*args, "--ratio-for", "/fc1/*=0.5", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    api = spa.prune(EXAMPLE, 0.0, "l2", ratios={"/fc1/*": 0.5})
    assert onnx.load(str(out)).SerializeToString() == api.model.SerializeToString()
    assert api.report.groups_pruned == len(scores.plan(ratio=0.0, ratios={"/fc1/*": 0.5}).groups) == 3
    for bad, message in [
        ("/nothing/*=0.5", "matches no node"),
        ("/fc1/*=1.5", "must be in [0, 1)"),
        ("/fc1/*", "expects PATTERN=RATIO"),
        ("/fc1/*=half", "expects PATTERN=RATIO"),
    ]:
        result = runner.invoke(main, [*args, "--force", "--ratio-for", bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_every_cli_default_is_the_options_default_but_latency_timing():
    """The click options of `spa prune` read their defaults from the option dataclasses; the one
    difference, latency timing, is CLI_RUN's."""
    command = main.commands["prune"]
    context = click.Context(command)
    params = {p.name: p.get_default(context) for p in command.params if isinstance(p, click.Option)}
    groups, score, plan, cut, run = AnalyzeOptions(), ScoreOptions(), PlanOptions(), CutOptions(), RunOptions()
    assert params["ratio"] == plan.ratio and params["round_to"] == str(plan.round_to)
    assert params["global_rank"] is plan.global_rank is False
    assert params["criterion"] == score.criterion and params["calib_samples"] == score.calib_samples
    assert params["compensate"] is cut.compensate and params["refit"] == cut.refit and params["soft"] is cut.soft
    assert params["attention"].replace("-", "_") == groups.attention and params["approximate"] is groups.approximate
    assert params["seed"] == run.seed and params["threads"] == run.threads and params["run_timeout"] == run.run_timeout
    assert tuple(params["providers"].split(",")) == run.providers
    assert params["no_validate"] is (not run.check)
    assert params["bench"] is CLI_RUN.bench is True and run.bench is False


@pytest.fixture(scope="module")
def qoperator(tmp_path_factory):
    samples = np.random.default_rng(0).standard_normal((16, 1, 3, 8, 8)).astype(np.float32)
    path = _qoperator(_every_form(), tmp_path_factory.mktemp("q") / "q.onnx", samples[:, 0])
    return onnx.load(str(path))


def test_a_model_decodes_its_format_and_encodes_it_back(qoperator):
    model = spa.load(qoperator)
    ops = Counter(n.op_type for n in model.proto.graph.node)
    assert "QLinearConv" not in ops and ops["DequantizeLinear"] and ops["Conv"]  # the working QDQ form
    assert model.as_input_format is model.source  # nothing to encode: the model as given
    assert model.encoded("qdq") is model.proto
    derived = model.derived(model.proto)  # a model made from it is encoded back to QOperator
    assert (
        Counter(n.op_type for n in derived.as_input_format.graph.node)["QLinearConv"]
        == Counter(n.op_type for n in qoperator.graph.node)["QLinearConv"]
    )
    plain = Model.load(EXAMPLE)
    assert plain.as_input_format is plain.proto and not plain.codec  # a float model has nothing to encode


def test_save_writes_the_input_format_or_qdq(qoperator, tmp_path):
    pruned = spa.analyze(spa.load(qoperator)).score("l1").plan(ratio=0.3).apply()
    assert pruned.validate().ok
    auto, qdq = tmp_path / "auto.onnx", tmp_path / "qdq.onnx"
    pruned.save(auto)
    pruned.save(qdq, format="qdq")
    written = {path: Counter(n.op_type for n in onnx.load(str(path)).graph.node) for path in (auto, qdq)}
    given = Counter(n.op_type for n in qoperator.graph.node)
    assert (
        written[auto]["QLinearConv"] == given["QLinearConv"]
        and written[auto]["QLinearMatMul"] == given["QLinearMatMul"]
    )
    assert not written[qdq]["QLinearConv"] and written[qdq]["DequantizeLinear"]
    assert onnx.load(str(auto)).SerializeToString() == spa.prune(qoperator, 0.3, "l1").model.SerializeToString()


def test_importing_the_statistics_loads_only_the_operator_it_reads_and_no_validation():
    code = "import sys, spa.scoring.statistics; print(sorted(m for m in sys.modules if m.startswith('spa.')))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = eval(loaded.stdout)
    assert "spa.scoring.statistics" in modules and "spa.core.runtime" in modules
    # token-id inputs are found through Gather's index input: that one operator module, not the registry
    operators = {m for m in modules if m.startswith("spa.ops")}
    assert operators == {"spa.ops", "spa.ops.base", "spa.ops.gather"}
    assert not [m for m in modules if m == "spa.verify.validate" or m == "spa.api"]
