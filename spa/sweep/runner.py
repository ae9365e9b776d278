"""Where a sweep's points run: this process, a local process pool, or Ray tasks. Each finished
point is handed to ``done`` as it comes, so results stream out while the rest still run."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

from spa.core.errors import UsageError
from spa.formats.files import protected_files
from spa.sweep.grid import Point, SweepSpec, command, point_key
from spa.sweep.point import run_point

Done = Callable[[dict], None]
WORKER_DIED = "the worker running this point died (tried twice)"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def run_pool(spec: SweepSpec, points: list[Point], jobs: int, done: Done) -> None:
    """Points in ``jobs`` processes. A dying worker breaks the whole pool, so the points it took
    down are retried once each in a pool of their own: only the one that kills its worker fails."""
    # spawn: onnxruntime's thread pools do not survive a fork
    context = multiprocessing.get_context("spawn")
    with _worker_threads(max(1, (os.cpu_count() or 1) // jobs)):
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {pool.submit(run_point, spec, p): p for p in points}
            broken = _collect(futures, done)
        for point in broken:
            with ProcessPoolExecutor(1, mp_context=context) as single:
                if _collect({single.submit(run_point, spec, point): point}, done):
                    done(failed(spec, point, WORKER_DIED))


@contextlib.contextmanager
def _worker_threads(count: int):
    """Workers started here run their numeric libraries on ``count`` threads: each sizing its
    thread pool to the whole machine, N workers would fight over the cores (a 12-point sweep of a
    small CNN took 1.5x as long with 2 workers as in one process, on 2 cores). Spawned workers read
    the environment as they start, before anything is imported."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: str(count) for name in THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _collect(futures: dict[Future, Point], done: Done) -> list[Point]:
    """Hands on every finished point; answers those whose worker died."""
    broken = []
    for future in as_completed(futures):
        try:
            result = future.result()
        except BrokenProcessPool:
            broken.append(futures[future])
            continue
        done(result)
    return broken


def run_ray(spec: SweepSpec, points: list[Point], address: str, done: Done) -> None:
    """Points as Ray tasks on the cluster at ``address`` ("local": a Ray instance started for the
    run). Ray retries a task whose worker died once; a second death fails that point."""
    ray = import_ray()
    ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
    try:
        shipped = ray.put(shipped_files(spec))  # once, however many points read them
        task = ray.remote(max_retries=1)(run_shipped)
        refs = {task.remote(spec, p, shipped): p for p in points}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            point = refs.pop(ready[0])
            try:
                done(ray.get(ready[0]))
            except ray.exceptions.RayError as exc:
                done(failed(spec, point, f"{WORKER_DIED}: {type(exc).__name__}"))
    finally:
        if address == "local":
            ray.shutdown()


def shipped_files(spec: SweepSpec) -> dict[str, bytes]:
    """The model and calibration file, to travel through Ray's object store to workers that may not
    see this machine's files. A model with external data, or a folder of calibration files, is
    read by its path: one every node must see."""
    files = {}
    if len(protected_files([Path(spec.model)])) == 1:
        files["model"] = Path(spec.model).read_bytes()
    if spec.calib is not None and Path(spec.calib).is_file():
        files["calib"] = Path(spec.calib).read_bytes()
    return files


def run_shipped(spec: SweepSpec, point: Point, files: dict[str, bytes]) -> dict:
    """``run_point`` on a worker, on copies of the shipped files; the point keeps its own key and command."""
    with tempfile.TemporaryDirectory(prefix="spa-sweep-") as folder:
        model, calib = spec.model, spec.calib
        if "model" in files:
            model = str(Path(folder) / f"model{Path(spec.model).suffix}")
            Path(model).write_bytes(files["model"])
        if "calib" in files and spec.calib is not None:
            calib = str(Path(folder) / f"calib{Path(spec.calib).suffix}")
            Path(calib).write_bytes(files["calib"])
        result = run_point(replace(spec, model=model, calib=calib), point)
    return {**result, "key": point_key(spec, point), "command": command(spec, point)}


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'spa-prune[ray]'") from None
    return ray


def failed(spec: SweepSpec, point: Point, reason: str) -> dict:
    return {
        "key": point_key(spec, point),
        **point.options(),
        "command": command(spec, point),
        "status": "failed",
        "error": reason,
    }
