"""Latency on onnxruntime execution providers, measured the way users deploy.

Sessions use onnxruntime's full graph optimisation (its default, what
deployments run). With two models, runs alternate A B A B so that machine
noise (frequency changes, other load) hits both alike.
"""

from __future__ import annotations

import math
import os
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
    for sess in sessions:
        for _ in range(warmup):
            runlimit.run(sess, None, feeds)
    fitted = [runlimit.fit_empty(sess, feeds) for sess in sessions]  # outside the timed region
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, sess in enumerate(sessions):
            with runlimit.limited() as options:
                start = time.perf_counter()
                sess.run(None, fitted[k], options)
                samples[k].append((time.perf_counter() - start) * 1000)
    return samples


@dataclass
class LatencyPair:
    """The quick dense-vs-pruned figure `spa prune` reports, per execution provider."""

    provider: str
    threads: int
    dense_ms: float
    pruned_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.pruned_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


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
    return LatencyPair(provider, threads, dense_ms, pruned_ms)
