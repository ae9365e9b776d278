"""One point of a sweep, run where the sweep sends it (this process, a pool worker, a Ray task):
prune, validate, time against the dense model, measure quality. Everything it returns is plain
data, so any backend can carry it back."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spa.core.errors import SpaError, UsageError
from spa.core.runtime import resolve_providers, timing_session
from spa.pipeline import AnalyzeOptions, CutOptions, PlanOptions, PrunedModel, RunOptions, ScoreOptions, prune_model
from spa.sweep.axes import options_of
from spa.sweep.grid import Point, SweepSpec, command, point_key

EVAL_TAKES = ("auto", "session", "path")
# the first parameter names that ask for a session rather than a path
SESSION_NAMES = ("session", "sess", "ort_session", "inference_session")


def stage_options(spec: SweepSpec, point: Point) -> tuple[AnalyzeOptions, ScoreOptions, PlanOptions, CutOptions]:
    """The options of each stage the point prunes with, as ``spa prune`` makes them from its command."""
    return options_of(point.stage_settings(spec))


def run_options(spec: SweepSpec, bench: bool = True) -> RunOptions:
    # a point slower than dense is a finding of the sweep, not a failure
    return RunOptions(
        spec.seed, True, bench, spec.providers, spec.threads, run_timeout=spec.run_timeout, allow_slower=True
    )


def prune_point(spec: SweepSpec, point: Point, bench: bool = True) -> PrunedModel:
    """The point pruned from the file, every stage its own: what ``spa prune`` does."""
    return prune_model(spec.model, *stage_options(spec, point), run_options(spec, bench))


def run_point(spec: SweepSpec, point: Point, prune: Callable[[], PrunedModel] | None = None) -> dict:
    """The point's figures; a failure becomes ``status: failed`` with its one-line reason.
    ``prune`` makes the pruned model where an earlier stage is shared (by default: from the file)."""
    start = time.perf_counter()
    result = {"key": point_key(spec, point), **point.options(), "command": command(spec, point)}
    try:
        pruned = prune() if prune is not None else prune_point(spec, point)
        result.update(_figures(pruned))
        if spec.evaluate is not None:
            result.update(_evaluated(spec, pruned))
        result["quality"] = _quality(result)
        result["status"] = "ok"
    except SpaError as exc:
        result.update(status="failed", error=str(exc))
    except Exception as exc:  # a bug in spa at this point: the others still run
        result.update(status="failed", error=f"internal error: {type(exc).__name__}: {exc}")
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _figures(pruned: PrunedModel) -> dict:
    report = pruned.report
    validation = pruned.validation
    latency = validation.latency[0] if validation.latency else None
    fidelity = validation.fidelity
    first = fidelity.outputs[0] if fidelity is not None and fidelity.outputs else None
    return {
        "params": report.params_after,
        "params_ratio": report.params_after / report.params_before if report.params_before else None,
        "flops": report.flops_after,
        "flops_ratio": report.flops_after / report.flops_before if report.flops_before else None,
        "groups_pruned": report.groups_pruned,
        "valid": not validation.problems,
        "problems": list(validation.problems),
        "dense_ms": latency["dense_ms"] if latency else None,
        "pruned_ms": latency["pruned_ms"] if latency else None,
        "speedup": latency["speedup"] if latency else None,
        "provider": latency["provider"] if latency else None,
        "top1_agreement": first.top1_agreement if first else None,
        "cosine": _finite(first.cosine) if first else None,
        "relative_error": _finite(first.relative_error) if first else None,
        "fidelity_samples": fidelity.samples if fidelity is not None else 0,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or inf


def _quality(result: dict) -> float | None:
    """The user's metric where given, else how closely the pruned outputs follow the dense ones:
    top-1 agreement on class scores, mean cosine otherwise."""
    if "eval" in result:
        return result["eval"]
    if result.get("top1_agreement") is not None:
        return result["top1_agreement"]
    return result.get("cosine")


def _evaluated(spec: SweepSpec, pruned: PrunedModel) -> dict:
    """The user's metric on the pruned model, written to a scratch file: the function receives its
    path, or an onnxruntime session on it (opened as ``spa bench`` opens one: the first provider,
    ``--threads``). Its failure is this point's ``eval_error``, and the sweep goes on."""
    assert spec.evaluate is not None
    with tempfile.TemporaryDirectory(prefix="spa-sweep-") as folder:
        path = Path(folder) / "pruned.onnx"
        pruned.save(path, check=False)
        try:
            function = load_eval(spec.evaluate)
            if spec.eval_takes == "session":
                provider = resolve_providers(list(spec.providers) or ["cpu"])[0]
                number = float(function(timing_session(path, provider, spec.threads)))
            else:
                number = float(function(str(path)))
        except Exception as exc:
            line = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return {"eval": None, "eval_error": line}
    if not math.isfinite(number):
        return {"eval": None, "eval_error": f"the evaluation returned {number}"}
    return {"eval": number}


def eval_takes(function: Callable, asked: str = "auto") -> str:
    """What the evaluation receives: ``asked``, or with "auto" what its first parameter says:
    a session when it is annotated as onnxruntime's ``InferenceSession`` or named ``session``
    (the convention of quantization tools), else the model's path."""
    if asked != "auto":
        return asked
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin or C function without a signature
        return "path"
    if not parameters:
        return "path"
    first = parameters[0]
    annotation = first.annotation
    named = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if named.rpartition(".")[2] == "InferenceSession" or first.name in SESSION_NAMES:
        return "session"
    return "path"


def load_eval(spec: str) -> Callable[[str], Any]:
    """``module:function`` (imported with the working folder on the path, as ``python -m`` does)
    or ``script.py:function``."""
    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise UsageError(f"--eval expects module:function or script.py:function, got '{spec}'")
    try:
        if source.endswith(".py"):
            if not os.path.isfile(source):
                raise UsageError(f"--eval {spec}: no such file '{source}'")
            loader = importlib.util.spec_from_file_location(f"spa_sweep_eval_{Path(source).stem}", source)
            assert loader is not None and loader.loader is not None  # a .py path always has one
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(source)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--eval {spec}: cannot load '{source}' ({type(exc).__name__}: {exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"--eval {spec}: '{source}' has no function '{name}'")
    return function
