"""`spa sweep`: a grid pruned point by point, the same figures in-process and in a process pool,
resumed from its JSON, a failing or worker-killing evaluation contained to its point, --pick."""

from __future__ import annotations

import html
import json
import math
import re
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

import click
import onnx
import pytest
from click.testing import CliRunner

import spa.sweep.shared
from spa.cli.commands import main
from spa.cli.commands import prune as prune_command
from spa.sweep.axes import axis_names, scalar_types, stage_fields
from spa.sweep.grid import Point, SweepSpec, command
from spa.sweep.page import pareto, render_page
from spa.sweep.plot import Axis, decimal, nice_ticks, plot

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_rescnn.onnx"
CALIB = ROOT / "models" / "data" / "mnist_calib.npz"
TEST = ROOT / "models" / "data" / "mnist_test.npz"
# quick points: a magnitude criterion, exact channel counts (no width timing), few statistics samples
BASE = ["--criteria", "l2", "--calib", str(CALIB), "--calib-samples", "16", "--round-to", "1"]
# figures that are timings, or the time a point took: they differ from run to run
TIMED = {"dense_ms", "pruned_ms", "speedup", "seconds"}

ACCURACY = """
import numpy as np
import onnxruntime as ort

def accuracy(path):
    data = np.load({test!r})
    x, y = data["input"][::5], data["label"][::5]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return float((session.run(None, {{"input": x}})[0].argmax(1) == y).mean())
"""


SESSION_ACCURACY = """
import numpy as np
import onnxruntime

def accuracy({parameter}):
    assert isinstance({name}, onnxruntime.InferenceSession), type({name})
    data = np.load({test!r})
    x, y = data["input"][::5], data["label"][::5]
    return float(({name}.run(None, {{"input": x}})[0].argmax(1) == y).mean())
"""


def sweep(*args: str):
    return CliRunner().invoke(main, ["sweep", str(MODEL), *BASE, *args])


def points(path: Path) -> list[dict]:
    return json.loads(path.read_text())["points"]


def untimed(found: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k not in TIMED} for p in found]


@pytest.fixture
def accuracy(tmp_path) -> str:
    script = tmp_path / "acc.py"
    script.write_text(ACCURACY.format(test=str(TEST)))
    return f"{script}:accuracy"


def test_process_pool_gives_the_numbers_of_one_process(tmp_path, accuracy):
    # in one process the points that rank alike share one scoring; in the pool each prunes from the file
    grid = ["--ratios", "0.2,0.4", "--compensate", "both", "--eval", accuracy]
    inline = sweep(*grid, "--json", str(tmp_path / "inline.json"))
    assert inline.exit_code == 0, inline.output
    pooled = sweep(*grid, "--jobs", "2", "--json", str(tmp_path / "pool.json"))
    assert pooled.exit_code == 0, pooled.output
    found = points(tmp_path / "inline.json")
    assert untimed(found) == untimed(points(tmp_path / "pool.json"))
    assert [(p["ratio"], p["compensate"], p["status"]) for p in found] == [
        (0.2, True, "ok"),
        (0.2, False, "ok"),
        (0.4, True, "ok"),
        (0.4, False, "ok"),
    ]
    assert found[0]["params"] > found[2]["params"] and found[0]["flops"] > found[2]["flops"]
    assert found[0]["quality"] > found[1]["quality"]  # the refit keeps more of the accuracy
    for point in found:
        assert point["valid"] and point["quality"] == point["eval"] and 0 <= point["eval"] <= 1
        assert point["eval"] > 0.5 or not point["compensate"]
        assert point["dense_ms"] > 0 and point["pruned_ms"] > 0
        assert 0 < point["top1_agreement"] <= 1
        assert point["command"].startswith(f"spa prune {MODEL} --ratio ")


@pytest.mark.parametrize(
    "parameter, takes",
    [
        ("session: onnxruntime.InferenceSession", []),  # asked for by its annotation
        ("session", []),  # by its name
        ("model", ["--eval-takes", "session"]),  # by the option
    ],
)
def test_the_evaluation_receives_a_session_when_it_asks_for_one(tmp_path, accuracy, parameter, takes):
    name = parameter.partition(":")[0]
    script = tmp_path / "session_acc.py"
    script.write_text(SESSION_ACCURACY.format(parameter=parameter, name=name, test=str(TEST)))
    grid = ["--ratios", "0.3", "--compensate", "on"]
    by_session = sweep(*grid, "--eval", f"{script}:accuracy", *takes, "--json", str(tmp_path / "session.json"))
    assert by_session.exit_code == 0, by_session.output
    by_path = sweep(*grid, "--eval", accuracy, "--json", str(tmp_path / "path.json"))
    assert by_path.exit_code == 0, by_path.output
    (session_point,), (path_point,) = points(tmp_path / "session.json"), points(tmp_path / "path.json")
    assert "eval_error" not in session_point, session_point.get("eval_error")
    assert session_point["eval"] == path_point["eval"] > 0.5  # one metric, either way it is handed the model
    assert session_point["key"] != path_point["key"]  # what the function receives names the point


def test_a_path_taking_evaluation_can_be_forced_to_get_the_path(tmp_path):
    script = tmp_path / "named.py"
    script.write_text("import os\ndef metric(session):\n    return float(os.path.isfile(session))\n")
    out = tmp_path / "sweep.json"
    args = ["--ratios", "0.2", "--compensate", "off", "--eval", f"{script}:metric", "--eval-takes", "path"]
    result = sweep(*args, "--json", str(out))
    assert result.exit_code == 0, result.output
    assert points(out)[0]["eval"] == 1.0, points(out)[0]


def test_set_makes_an_axis_whose_commands_reproduce_each_point(tmp_path):
    out = tmp_path / "sweep.json"
    grid = ["--ratios", "0.4", "--compensate", "off", "--set", "--global=false,true", "--exclude", "/stem/*"]
    inline = sweep(*grid, "--json", str(out), "--csv", str(tmp_path / "sweep.csv"))
    assert inline.exit_code == 0, inline.output
    per_group, ranked_globally = found = points(out)
    assert [p.get("settings") for p in found] == [{"global_rank": False}, {"global_rank": True}]
    assert "--global" not in per_group["command"] and "--global" in ranked_globally["command"]
    assert all("--exclude '/stem/*'" in p["command"] for p in found)
    assert per_group["params"] != ranked_globally["params"]
    assert "global_rank" in (tmp_path / "sweep.csv").read_text().splitlines()[0].split(",")
    for point in found:  # spa prune, given the point's command, writes a model of the point's size
        args = shlex.split(point["command"])[2:] + ["-o", str(tmp_path / "again.onnx"), "--force", "--no-bench"]
        again = CliRunner().invoke(main, ["prune", *args])
        assert again.exit_code == 0, again.output
        pruned = onnx.load(str(tmp_path / "again.onnx"))
        assert sum(onnx.numpy_helper.to_array(t).size for t in pruned.graph.initializer) == point["params"]
    pooled = sweep(*grid, "--jobs", "2", "--json", str(tmp_path / "pool.json"))
    assert pooled.exit_code == 0, pooled.output
    assert untimed(found) == untimed(points(tmp_path / "pool.json"))


def _other_value(name: str):
    """A value of option ``name`` other than its default, as ``spa prune`` accepts it."""
    kinds = scalar_types(stage_fields()[name][1])
    default = stage_fields()[name][2]
    option = next(p for p in prune_command.params if p.name == name)
    if isinstance(option.type, click.Choice):
        return next(c for c in option.type.choices if c.replace("-", "_") != default).replace("-", "_")
    if bool in kinds:
        return not default
    return 1 if int in kinds else 0.5


@pytest.mark.parametrize("name", axis_names())
def test_every_axis_is_an_option_spa_prune_reads_back(name):
    # a field added to the options with a spa prune flag of its name is an axis; its command must
    # set it in spa prune as the sweep set it
    value = _other_value(name)
    point = Point("l2", None, ratio=0.2, settings=((name, value),))
    args = shlex.split(command(SweepSpec(str(MODEL)), point))[3:]
    context = prune_command.make_context("prune", [str(MODEL), *args])
    given = context.params[name]
    assert (given.replace("-", "_") if isinstance(given, str) else given) == value


def test_a_rerun_resumes_and_skips_finished_points(tmp_path, monkeypatch):
    out = tmp_path / "sweep.json"
    first = sweep("--ratios", "0.2", "--compensate", "off", "--json", str(out))
    assert first.exit_code == 0, first.output
    before = points(out)
    ran = []
    real = spa.sweep.shared.run_point

    def counted(spec, point, prune=None):
        ran.append(point.ratio)
        return real(spec, point, prune)

    monkeypatch.setattr(spa.sweep.shared, "run_point", counted)
    second = sweep("--ratios", "0.2,0.4", "--compensate", "off", "--json", str(out))
    assert second.exit_code == 0, second.output
    assert ran == [0.4]
    after = points(out)
    assert [p["ratio"] for p in after] == [0.2, 0.4]
    assert after[0] == before[0]  # carried over untouched, timings included
    # other options make other points: nothing is skipped
    ran.clear()
    third = sweep("--ratios", "0.2", "--compensate", "on", "--json", str(out))
    assert third.exit_code == 0, third.output
    assert ran == [0.2]


def test_a_failing_evaluation_is_reported_per_point(tmp_path):
    marker = tmp_path / "calls"
    script = tmp_path / "flaky.py"
    # the second model evaluated fails; the first keeps its number and the sweep finishes
    script.write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            def metric(path):
                calls = Path({str(marker)!r})
                calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
                if len(calls.read_text()) == 2:
                    raise RuntimeError("evaluation data missing")
                return 0.5
            """
        )
    )
    out = tmp_path / "sweep.json"
    result = sweep("--ratios", "0.2,0.4", "--compensate", "off", "--eval", f"{script}:metric", "--json", str(out))
    assert result.exit_code == 0, result.output
    first, second = points(out)
    assert first["eval"] == 0.5 and first["quality"] == 0.5 and "eval_error" not in first
    assert second["status"] == "ok" and second["eval"] is None and second["quality"] is None
    assert second["eval_error"] == "RuntimeError: evaluation data missing"
    assert second["params"] < first["params"]  # its other figures are still measured
    assert "eval failed" in result.output


def test_pick_writes_the_fastest_point_meeting_the_bar(tmp_path):
    target = tmp_path / "picked.onnx"
    out = tmp_path / "sweep.json"
    args = ["--ratios", "0.1,0.3", "--compensate", "on", "--json", str(out), "-o", str(target)]
    result = sweep(*args, "--pick", "quality>=0.5")
    assert result.exit_code == 0, result.output
    found = points(out)
    best = max((p for p in found if p["quality"] >= 0.5), key=lambda p: p["speedup"])
    picked = onnx.load(str(target))
    params = sum(onnx.numpy_helper.to_array(t).size for t in picked.graph.initializer)
    assert params == best["params"]
    assert f"picked {best['command']}" in result.output
    # nothing meets the bar: exit 4, nothing written
    target.unlink()
    none = sweep(*args, "--pick", "quality>1.5")
    assert none.exit_code == 4, none.output
    assert none.output.splitlines()[-1].startswith("spa: error: no valid point meets quality>1.5")
    assert not target.exists()


def killer(tmp_path: Path) -> tuple[str, Path]:
    """An evaluation that kills the worker evaluating the smaller model (the higher ratio), every
    time, and counts its tries."""
    script, deaths = tmp_path / "killer.py", tmp_path / "deaths"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            def metric(path):
                if os.path.getsize(path) < os.path.getsize({str(MODEL)!r}) * 0.5:
                    with open({str(deaths)!r}, "a") as log:
                        log.write("x")
                    os.kill(os.getpid(), signal.SIGKILL)
                return 1.0
            """
        )
    )
    return f"{script}:metric", deaths


@pytest.mark.parametrize("backend", [["--jobs", "2"], ["--ray"]], ids=["pool", "ray"])
def test_a_killed_worker_is_retried_once_then_its_point_fails(tmp_path, backend):
    if backend == ["--ray"]:
        pytest.importorskip("ray")
    metric, deaths = killer(tmp_path)
    out = tmp_path / "sweep.json"
    result = sweep("--ratios", "0.1,0.6", "--compensate", "off", *backend, "--eval", metric, "--json", str(out))
    assert result.exit_code == 0, result.output
    kept, killed = points(out)
    assert kept["status"] == "ok" and kept["eval"] == 1.0
    assert killed["status"] == "failed" and "died" in killed["error"]
    assert deaths.read_text() == "xx"  # tried, and retried once


@pytest.mark.parametrize(
    "args",
    [
        ["--ratios", "0.1:0.6"],
        ["--ratios", "0.6:0.1:0.1"],
        ["--ratios", "0.1:0.6:0"],
        ["--ratios", "a,b"],
        ["--ratios", "1.2"],
        ["--ratios", "0.1:0.9:0.00001"],
        ["--target-flops", "0"],
        ["--target-flops", "x"],
        ["--ratios", "0.2", "--criteria", "l2,nope"],
        ["--ratios", "0.2", "--criteria", ","],
        ["--ratios", "0.2", "--jobs", "0"],
        ["--ratios", "0.2", "--eval", "no_such_module_anywhere:f"],
        ["--ratios", "0.2", "--eval", "missing.py:f"],
        ["--ratios", "0.2", "--eval", "nofunction"],
        ["--ratios", "0.2", "--pick", "speed>1"],
        ["--ratios", "0.2", "-o", "x.onnx"],
        ["--ratios", "0.2", "--ray", "--jobs", "2"],
        ["--ratios", "0.2", "--json", "-"],
        ["--ratios", "0.2", "--set", "atention=heads"],
        ["--ratios", "0.2", "--set", "ratio=0.3"],
        ["--ratios", "0.2", "--set", "registry=x"],
        ["--ratios", "0.2", "--set", "refit"],
        ["--ratios", "0.2", "--set", "refit=bogus"],
        ["--ratios", "0.2", "--set", "global_rank=maybe"],
        ["--ratios", "0.2", "--target-latency", "1.5"],
        ["--ratios", "0.2", "--eval-takes", "socket"],
        ["--ratios", "0.2", "--input-shape", "x=0x1"],
        [],
    ],
)
def test_bad_grid_specs_exit_2_in_one_line(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    result = sweep(*args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("spa: error:") and result.output.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_missing_model_exits_3(tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "none.onnx"), "--ratios", "0.2"])
    assert result.exit_code == 3 and result.output.startswith("spa: error:"), result.output


def test_a_json_that_is_not_a_sweep_is_refused(tmp_path):
    out = tmp_path / "other.json"
    out.write_text('{"model": "x"}')
    result = sweep("--ratios", "0.2", "--json", str(out))
    assert result.exit_code == 2 and "not a sweep's JSON" in result.output, result.output
    assert out.read_text() == '{"model": "x"}'


def test_ray_runs_the_same_points(tmp_path):
    pytest.importorskip("ray")
    grid = ["--ratios", "0.2,0.4", "--compensate", "off"]
    inline = sweep(*grid, "--json", str(tmp_path / "inline.json"))
    on_ray = sweep(*grid, "--ray", "--json", str(tmp_path / "ray.json"))
    assert inline.exit_code == 0 and on_ray.exit_code == 0, on_ray.output
    assert untimed(points(tmp_path / "inline.json")) == untimed(points(tmp_path / "ray.json"))
    # the workers pruned copies of the files, shipped through Ray's object store; each point
    # still names the user's own files
    assert all(f"spa prune {MODEL} " in p["command"] for p in points(tmp_path / "ray.json"))


def test_pareto_front_keeps_the_points_nothing_beats():
    found = [
        {"pruned_ms": 1.0, "quality": 0.90},
        {"pruned_ms": 2.0, "quality": 0.95},
        {"pruned_ms": 2.5, "quality": 0.93},  # slower and worse than the one before
        {"pruned_ms": 3.0, "quality": 0.99},
        {"pruned_ms": 0.5, "quality": 0.50},
    ]
    assert [p["pruned_ms"] for p in pareto(found, "pruned_ms")] == [0.5, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("low, high", [(0.806, 0.987), (0.08432, 0.2665), (30850, 332800), (0.5, 0.5), (12.0, 980.0)])
def test_axis_ticks_are_round_numbers_spanning_the_data(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and 3 <= len(ticks) <= 7
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
    assert len({decimal(t, step) for t in ticks}) == len(ticks)  # each tick reads differently


def test_front_labels_never_cover_each_other():
    # a crowded front: every point better and slower than the one before, a few pixels apart
    crowded = [
        {
            "status": "ok",
            "ratio": r / 100,
            "criterion": "l2",
            "compensate": None,
            "quality": 0.5 + r / 200,
            "pruned_ms": 1 + r / 100,
            "command": "spa prune m.onnx",
        }
        for r in range(40)
    ]
    svg = plot(crowded, Axis("pruned_ms", "latency", decimal), "quality", None)
    boxes = []
    for x, y, text in re.findall(r'<text x="([\d.]+)" y="([\d.]+)">([^<]+)</text>', svg):
        boxes.append((float(x), float(y) - 10, float(x) + 6.2 * len(text), float(y) + 2))
    assert len(boxes) >= 5  # some are named; the rest keep their tooltip
    for k, a in enumerate(boxes):
        for b in boxes[k + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_the_page_is_self_contained_and_escapes_commands():
    point = {
        "status": "ok",
        "ratio": 0.2,
        "criterion": "l2",
        "compensate": None,
        "quality": 0.9,
        "pruned_ms": 1.0,
        "dense_ms": 2.0,
        "params": 10,
        "flops": 20,
        "speedup": 1.2,
        "command": "spa prune '<m>.onnx' --ratio 0.2",
    }
    page = render_page("<m>.onnx", [point, {**point, "ratio": 0.4, "quality": 0.8, "pruned_ms": 0.5, "params": 5}])
    assert page.count("<svg") == 2 and page.count("<circle") == 4
    assert "<script" not in page and "http" not in page.replace('http-equiv="Content-Security-Policy"', "")
    assert "&lt;m&gt;.onnx" in page and "<m>" not in page


def test_the_page_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine")
    out = tmp_path / "sweep.json"
    page = tmp_path / "sweep.html"
    result = sweep("--ratios", "0.2,0.4", "--compensate", "off", "--json", str(out), "--html", str(page))
    assert result.exit_code == 0, result.output
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    # the browser parsed two plots of both points, and a row per point naming its command
    assert dom.count("<svg") == 2 and dom.count("<circle") == 4
    for point in points(out):
        assert html.escape(point["command"], quote=False) in dom
