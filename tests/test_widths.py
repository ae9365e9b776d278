"""The width cost model (``spa.planning.widths``), the latency-aware allocation on it
(``spa.planning.allocate``), and the refusal of a pruned model slower than the dense one."""

import json

import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner

import spa
from spa.cli.commands import main
from spa.core.errors import EXIT_SLOWER, SlowerError
from spa.pipeline.options import RunOptions
from spa.planning import widths
from spa.planning.allocate import Trajectory
from spa.planning.widths import LatencyCache, TimedLayer, WidthTable, candidate_counts
from spa.verify import bench
from spa.verify.bench import LatencyPair


def _cnn(width: int = 32, size: int = 24) -> onnx.ModelProto:
    """Convolutions wide enough to time: two groups of ``width`` channels, a depthwise layer."""
    g = Graph()
    x = g.input("x", [1, 3, size, size])
    a = g.op("Relu", [g.conv(x, 3, width)])
    b = g.op("Relu", [g.conv(a, width, width, group=width)])
    c = g.op("Relu", [g.conv(b, width, width)])
    g.output(g.conv(c, width, 4, k=1))
    return g.build()


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "spa" / "latency"


def test_candidate_counts_measure_narrow_groups_whole_and_wide_ones_on_a_ladder():
    assert candidate_counts(12, 768) == list(range(1, 13))  # heads: every count
    assert candidate_counts(64, 64) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert candidate_counts(2048, 2048) == [128 * k for k in range(1, 17)]
    assert candidate_counts(100, 100)[-1] == 100 and candidate_counts(100, 100)[:2] == [8, 16]


def test_the_table_is_measured_once_then_read_from_the_cache(cache_home):
    scored = spa.analyze(spa.load(_cnn(32, 24))).score("l2")
    first = scored.plan(0.3)
    assert first.widths is not None and first.widths.measured_points > 0
    files = list(cache_home.glob("CPUExecutionProvider-*-t*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())
    again = scored.plan(0.3)
    assert again.widths.measured_points == 0 and again.widths.cached_points == first.widths.measured_points
    assert [layer.dense_ms for layer in again.widths.layers] == [layer.dense_ms for layer in first.widths.layers]
    # another thread count is another machine as far as kernels go: measured again, its own file
    other = spa.analyze(spa.load(_cnn(32, 24))).score("l2", run=RunOptions(threads=1)).plan(0.3)
    assert other.widths.measured_points > 0 and len(list(cache_home.glob("*.json"))) == 2


def test_an_unreadable_cache_is_measured_again(cache_home):
    cache = LatencyCache("CPUExecutionProvider", 0)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text("{not json")
    assert LatencyCache("CPUExecutionProvider", 0).entries == {}


def _table(curves: dict[int, dict[int, float]], size: int = 96) -> WidthTable:
    layers = [
        TimedLayer(f"n{gid}", {"out": gid}, (size, size), True, c[max(c)], {"joint": c}, True)
        for gid, c in curves.items()
    ]
    return WidthTable(layers, {gid: size for gid in curves}, {gid: sorted(c) for gid, c in curves.items()})


def test_fast_count_steps_off_a_spike_to_the_nearest_count_that_is_not_on_one():
    # a depthwise layer at 95 of 96 channels runs 4x slower than at 96 (measured on AVX-512)
    spike = {64: 0.03, 72: 0.05, 80: 0.04, 88: 0.05, 95: 0.23, 96: 0.05}
    table = _table({0: spike})
    assert table.fast_count(0, 95) == 96  # no count near 95 is faster than 96
    assert table.fast_count(0, 81) == 80
    assert table.fast_count(0, 73) == 80  # 72 is as slow as 88 and slower than 80: not on the fast side
    flat = _table({0: {c: 1.0 + c / 1000 for c in (64, 72, 80, 88, 96)}})
    assert flat.fast_count(0, 81) == 80  # no spike: the ladder's count nearest the ratio


def test_untimed_groups_keep_the_exact_count():
    table = _table({0: {8: 0.1, 16: 0.2}}, size=16)
    assert table.fast_count(5, 11) == 11


def test_allocation_takes_time_where_it_costs_the_least_importance():
    # two groups of equal importance; group 0's layer costs ten times group 1's
    curves = {0: {c: c * 1.0 for c in (8, 16, 24, 32)}, 1: {c: c * 0.1 for c in (8, 16, 24, 32)}}
    table = _table(curves, size=32)
    scores = {0: np.ones(32), 1: np.ones(32)}
    groups = [spa.analysis.groups.Group(g, [], np.arange(32), None, True) for g in (0, 1)]
    trajectory = Trajectory(table, groups, scores, normalise=True)
    assert [s.group for s in trajectory.steps[:3]] == [0, 0, 0]
    keeps = trajectory.keeps_at(0.5)
    assert keeps[0] < keeps[1]
    # the predicted time only falls along the way
    times = [s.predicted_ms for s in trajectory.steps]
    assert all(b <= a + 1e-12 for a, b in zip(times, times[1:]))


def test_allocation_does_not_stop_on_a_count_that_saves_nothing():
    flat_then_drop = {8: 1.0, 16: 1.0, 24: 4.0, 32: 4.0}  # 32 -> 24 saves nothing; 24 -> 16 saves 3 ms
    table = _table({0: flat_then_drop}, size=32)
    groups = [spa.analysis.groups.Group(0, [], np.arange(32), None, True)]
    trajectory = Trajectory(table, groups, {0: np.ones(32)}, normalise=True)
    assert trajectory.steps[0].keep == 16


def test_global_ranking_with_a_table_removes_the_share_of_units_asked(cache_home):
    result = spa.prune(_cnn(32, 24), ratio=0.4, global_rank=True, criterion="l2")
    removed = sum(g.removed for g in result.report.groups)
    total = sum(g.channels for g in result.report.groups if g.frozen is None and g.channels > 1)
    assert result.report.validation.ok and 0.4 * total <= removed < 0.6 * total


def _slow_pair(monkeypatch):
    def slow(dense, pruned, feeds, provider="CPUExecutionProvider", threads=0, **kwargs):
        return LatencyPair(provider, threads, 1.0, 1.5, slower_runs=1.0)

    monkeypatch.setattr(spa.pipeline.checks, "compare", slow)


def test_a_pruned_model_slower_than_dense_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    _slow_pair(monkeypatch)
    model = tmp_path / "model.onnx"
    onnx.save(_cnn(16, 8), model)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["prune", str(model), "-o", str(out), "--criterion", "l2"])
    assert result.exit_code == EXIT_SLOWER == 6, result.output
    assert "slower than the dense one" in result.output and "--allow-slower" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    allowed = CliRunner().invoke(main, ["prune", str(model), "-o", str(out), "--criterion", "l2", "--allow-slower"])
    assert allowed.exit_code == 0 and out.exists() and "SLOWER" in allowed.output
    with pytest.raises(SlowerError):
        spa.prune(_cnn(16, 8), criterion="l2", bench=True)
    assert spa.prune(_cnn(16, 8), criterion="l2", bench=True, allow_slower=True).report.validation.ok


def test_slower_means_beyond_timing_noise():
    assert LatencyPair("cpu", 1, 1.0, 1.2, slower_runs=0.9).slower
    assert not LatencyPair("cpu", 1, 1.0, 1.2, slower_runs=0.6).slower  # the runs disagree
    assert not LatencyPair("cpu", 1, 1.0, 1.03, slower_runs=1.0).slower  # within 5%
    assert not LatencyPair("cpu", 1, 0.04, 0.09, slower_runs=1.0).slower  # tens of microseconds: how it is stored


def test_kernel_time_counts_each_run_s_kernels_without_layout_changes():
    def kernel(op, ts, dur):
        return {"cat": "Node", "name": f"{op}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"name": "model_run", "ts": 0, "dur": 500},
        kernel("ReorderInput", 10, 50),
        kernel("Conv", 70, 100),
        kernel("ReorderOutput", 180, 40),
        {"name": "model_run", "ts": 1000, "dur": 500},
        kernel("Conv", 1010, 120),
        kernel("Relu", 1140, 30),
    ]
    assert bench._per_run(events) == pytest.approx([0.1, 0.15])
    g = Graph()
    x = g.input("x", [1, 16, 16, 16])
    g.output(g.conv(x, 16, 16))
    feeds = {"x": np.ones((1, 16, 16, 16), np.float32)}
    assert bench.kernel_ms(g.build(), feeds, "CPUExecutionProvider", 1, budget_ms=5) > 0


def test_machine_id_is_stable_and_short():
    assert widths.machine_id() == widths.machine_id() and len(widths.machine_id()) == 12


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="onnxruntime-gpu is not installed",
)
def test_the_width_table_is_measured_on_cuda_when_it_is_the_provider(cache_home):
    result = spa.prune(_cnn(64, 56), ratio=0.3, criterion="l2", providers=("cuda",), threads=1)
    assert result.report.validation.ok and result.report.widths["layers"] == 4
    assert list(cache_home.glob("CUDAExecutionProvider-*.json"))
