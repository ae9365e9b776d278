"""Where a sweep's points run: this process, a local process pool, or Ray tasks. Each finished
point is handed to ``done`` as it comes, so results stream out while the rest still run."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from spa.core.errors import UsageError
from spa.sweep.grid import Point, SweepSpec, command, point_key
from spa.sweep.point import run_point

Done = Callable[[dict], None]
WORKER_DIED = "the worker running this point died (tried twice)"


def run_pool(spec: SweepSpec, points: list[Point], jobs: int, done: Done) -> None:
    """Points in ``jobs`` processes. A dying worker breaks the whole pool, so the points it took
    down are retried once each in a pool of their own: only the one that kills its worker fails."""
    # spawn: onnxruntime's thread pools do not survive a fork
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(run_point, spec, p): p for p in points}
        broken = _collect(futures, done)
    for point in broken:
        with ProcessPoolExecutor(1, mp_context=context) as single:
            if _collect({single.submit(run_point, spec, point): point}, done):
                done(failed(spec, point, WORKER_DIED))


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
        task = ray.remote(max_retries=1)(run_point)
        refs = {task.remote(spec, p): p for p in points}
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
