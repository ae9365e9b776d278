"""The CLI's stage progress: drawn on a terminal once a stage runs past a second, never in logs."""

import io
import sys

import spa.cli.running as cli


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _drive(monkeypatch, quiet: bool, stream) -> str:
    clock = iter([0.0, 0.0, 0.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(sys, "stderr", stream)
    stages = cli.Stages(quiet)
    stages("statistics", 0, 8)
    stages("statistics", 3, 8)  # 0.5 s in: too early to draw
    drawn_early = stream.getvalue()
    stages("statistics", 5, 8)  # 2 s in: drawn
    stages("score", 1, 4)
    stages.finish()
    return drawn_early, stream.getvalue()


def test_bar_appears_after_a_second_on_a_terminal(monkeypatch):
    early, text = _drive(monkeypatch, False, _Terminal())
    assert early == ""
    assert "statistics" in text and "5/8" in text


def test_no_bar_when_quiet_or_not_a_terminal(monkeypatch):
    assert _drive(monkeypatch, True, _Terminal())[1] == ""
    assert _drive(monkeypatch, False, io.StringIO())[1] == ""


def _updates(**options) -> dict[str, list[tuple[int, int]]]:
    from pathlib import Path

    import spa

    seen: dict[str, list[tuple[int, int]]] = {}
    model = Path(__file__).resolve().parents[1] / "models" / "mini_resnet.onnx"

    def progress(stage: str, done: int, total: int) -> None:
        seen.setdefault(stage, []).append((done, total))

    spa.prune(model, 0.3, progress=progress, **options)
    return seen


def test_every_long_stage_reports_as_it_advances():
    # statistics batch by batch, compensation layer by layer, validation and latency run by run:
    # a stage that only announced its start left the terminal still for a minute on mobilenet_v3_small
    seen = _updates(bench=True)
    for stage in ("statistics", "compensate", "validate", "latency"):
        assert len(seen[stage]) > 3, (stage, seen[stage])
        assert max(done for done, _ in seen[stage]) > 1, (stage, seen[stage])
    assert all(total == 0 for done, total in seen["statistics"] if done)  # runs, with no known end
    layers = seen["compensate"][-1][1]
    assert layers > 1 and [done for done, _ in seen["compensate"][1:]] == list(range(layers))


def test_runs_with_no_known_end_draw_a_count(monkeypatch):
    clock = iter([0.0, 0.0, 2.0, 3.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    stages = cli.Stages(False)
    stages("latency")
    stages("latency", 5, 0)
    stages.finish()
    assert "5/?" in stream.getvalue()
