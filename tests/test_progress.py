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
