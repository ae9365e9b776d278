"""Latency on onnxruntime execution providers, measured the way users deploy.

Sessions use onnxruntime's full graph optimisation (its default, what
deployments run). With two models, runs alternate A B A B so that machine
noise (frequency changes, other load) hits both alike.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from spa.core import runlimit
from spa.core.errors import ModelLoadError, UsageError
from spa.core.runtime import (
    MAX_INPUT_ELEMENTS,
    check_input_sizes,
    complete_sizes,
    input_shapes,
    sample_inputs,
    timing_session,
    unsized_axes,
)


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    mean_ms: float
    throughput: float  # samples per second at the median


@dataclass
class BenchResult:
    provider: str
    threads: int
    batch: int  # samples per run: the leading axis of the first input
    runs: int
    warmup: int
    timings: dict[str, Timing] = field(default_factory=dict)  # model label -> timing
    sizes: dict[str, list[int]] = field(default_factory=dict)  # input name -> the shape it was fed
    guessed: list[str] = field(default_factory=list)  # free axes past the batch spa sized by a guess

    @property
    def speedup(self) -> float | None:
        if len(self.timings) != 2:
            return None
        first, second = self.timings.values()
        return first.median_ms / second.median_ms

    def as_dict(self) -> dict:
        data = asdict(self)
        data["speedup"] = self.speedup
        return data


def _feeds(model_path: Path, batch: int, shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    proto = onnx.load(str(model_path), load_external_data=False)
    check_input_sizes(proto, shapes)
    sizes = complete_sizes(proto, shapes)
    # refused before anything is allocated: --batch 1000000000 would ask numpy for terabytes
    for name, shape in {**input_shapes(proto, batch), **sizes}.items():
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise UsageError(f"input '{name}' of shape {shape} is too large to benchmark (--batch {batch})")
    return sample_inputs(proto, seed, batch=batch, shapes=sizes)


@runlimit.own_context
def bench(
    models: list[str | os.PathLike],
    provider: str = "CPUExecutionProvider",
    threads: int = 0,
    warmup: int = 5,
    runs: int = 50,
    batch: int = 1,
    shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    run_timeout: float = runlimit.RUN_TIMEOUT,
) -> BenchResult:
    """Median and p90 latency of one model, or of two (dense, pruned) measured alternately; a run
    that takes longer than ``run_timeout`` seconds (0: no limit) raises ``RunTimeout``."""
    if not 1 <= len(models) <= 2:
        raise UsageError("bench takes one model, or two to compare")
    if runs < 1 or warmup < 0 or batch < 1 or threads < 0:
        raise UsageError("--runs and --batch must be at least 1, --warmup and --threads at least 0")
    runlimit.set_timeout(run_timeout)
    runlimit.set_stage("bench")
    paths = [Path(m) for m in models]
    for path in paths:
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
    feeds = _feeds(paths[0], batch, shapes or {}, seed)
    samples = alternate([timing_session(p, provider, threads) for p in paths], feeds, warmup, runs)
    first = next(iter(feeds.values()), None)
    samples_per_run = int(first.shape[0]) if first is not None and first.ndim else 1
    result = BenchResult(provider, threads, samples_per_run, runs, warmup)
    result.sizes = {name: list(value.shape) for name, value in feeds.items()}
    result.guessed = unsized_axes(onnx.load(str(paths[0]), load_external_data=False), shapes)
    labels = ["dense", "pruned"] if len(paths) == 2 else [paths[0].name]
    for label, times in zip(labels, samples):
        values = np.array(times)
        median = float(np.median(values))
        result.timings[label] = Timing(
            median, float(np.percentile(values, 90)), float(values.mean()), samples_per_run * 1000.0 / median
        )
    return result


def alternate(sessions, feeds, warmup: int, runs: int) -> list[list[float]]:
    """Milliseconds per run of each session, the sessions taking turns (A B A B)."""
    # outside the timed region; each session gets the inputs it declares (a model with layers
    # removed no longer reads their cache)
    fitted = [runlimit.fit_empty(sess, _declared(sess, feeds)) for sess in sessions]
    for sess, feed in zip(sessions, fitted):
        for _ in range(warmup):
            runlimit.run(sess, None, feed)
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, sess in enumerate(sessions):
            with runlimit.limited() as options:
                start = time.perf_counter()
                sess.run(None, fitted[k], options)
                samples[k].append((time.perf_counter() - start) * 1000)
    return samples


def _declared(session, feeds: dict) -> dict:
    names = {info.name for info in session.get_inputs()}
    return {name: value for name, value in feeds.items() if name in names}


# layout changes onnxruntime inserts around an isolated layer; inside a model its neighbours share
# the layout and they mostly vanish, so a layer's own time leaves them out
LAYOUT_OPS = ("ReorderInput", "ReorderOutput", "Transpose")


def kernel_ms(
    model: onnx.ModelProto,
    feeds,
    provider: str,
    threads: int,
    budget_ms: float = 20.0,
    runs: tuple[int, int] = (5, 50),
    quantile: float = 0.25,
) -> float:
    """The time per run of ``model``'s kernels, from onnxruntime's profiler: what the ops cost,
    without the per-run overhead of a session call or layout changes (``LAYOUT_OPS``). It runs
    for about ``budget_ms`` (within ``runs``, least and most) after one warm-up run, and answers
    a low ``quantile`` of the runs: interference from other work only ever adds time."""
    with tempfile.TemporaryDirectory(prefix="spa-profile-") as folder:
        session = timing_session(model, provider, threads, profile_prefix=str(Path(folder) / "run"))
        runlimit.run(session, None, feeds)
        start, done = time.perf_counter(), 0
        while done < runs[1] and (done < runs[0] or (time.perf_counter() - start) * 1000 < budget_ms):
            runlimit.run(session, None, feeds)
            done += 1
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    totals = _per_run(events)[1:]  # the warm-up run left out
    return float(np.quantile(totals, quantile)) if totals else 0.0


def _per_run(events: list[dict]) -> list[float]:
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    starts = [start for start, _ in calls]
    totals = [0.0] * len(calls)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if event.get("args", {}).get("op_name") in LAYOUT_OPS:
            continue
        k = bisect.bisect_right(starts, event["ts"]) - 1
        if k >= 0 and event["ts"] <= calls[k][1]:
            totals[k] += event["dur"] / 1000
    return totals


# what "slower than dense" takes: see LatencyPair.slower
SLOWER_MARGIN = 0.05
SLOWER_MS = 0.1
SLOWER_RUNS = 0.75


@dataclass
class LatencyPair:
    """The quick dense-vs-pruned figure `spa prune` reports, per execution provider."""

    provider: str
    threads: int
    dense_ms: float
    pruned_ms: float
    slower_runs: float = 0.0  # the share of alternating runs in which the pruned model took longer

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.pruned_ms

    @property
    def slower(self) -> bool:
        """Slower beyond noise: by ``SLOWER_MARGIN`` and ``SLOWER_MS`` at the median, and in
        ``SLOWER_RUNS`` of the alternating runs (a sign test; two timings of one model differ
        by a few percent, and by microseconds of call overhead)."""
        return (
            self.pruned_ms >= self.dense_ms * (1 + SLOWER_MARGIN)
            and self.pruned_ms - self.dense_ms >= SLOWER_MS
            and self.slower_runs >= SLOWER_RUNS
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup, "slower": self.slower}


def compare(
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    feeds,
    provider: str = "CPUExecutionProvider",
    threads: int = 0,
    runs: int = 20,
    warmup: int = 3,
    custom_ops: tuple[str, ...] = (),
    one_at_a_time: bool = False,
) -> LatencyPair:
    """Median ms of two models on one provider, measured alternately; ``one_at_a_time`` (models
    whose weights stay on disk) times one, closes it, then times the other, so that no two
    copies of the weights are open together."""
    if one_at_a_time:
        times = []
        for model in (dense, pruned):
            sess = timing_session(model, provider, threads, custom_ops)
            times += alternate([sess], feeds, warmup, runs)
            del sess
    else:
        sessions = [timing_session(m, provider, threads, custom_ops) for m in (dense, pruned)]
        times = alternate(sessions, feeds, warmup, runs)
    dense_ms, pruned_ms = (float(np.median(t)) for t in times)
    slower_runs = float(np.mean(np.array(times[1]) > np.array(times[0])))
    return LatencyPair(provider, threads, dense_ms, pruned_ms, slower_runs)
