"""A time limit on every run of a model through onnxruntime.

A model decides how long it runs: a 1 kB graph with a ``Loop`` of 2^62 trips never returns, and
spa runs models unattended (statistics, validation, fidelity, latency timing, the searches). Each
run therefore gets ``RunOptions`` whose ``terminate`` flag a timer thread sets once the limit has
passed; onnxruntime checks that flag between kernels, inside loop bodies too, and the run fails,
which :func:`limited` turns into a :class:`RunTimeout` naming the stage.

The limit and the stage live in context variables: :func:`prune` and :func:`export` set them for
their own call only (``own_context``), so nothing needs threading through every caller.
"""

from __future__ import annotations

import contextvars
import functools
import math
import threading
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

from spa.core.errors import ModelLoadError, UsageError

RUN_TIMEOUT = 600.0  # seconds per run of the model; 0 for no limit

_limit: contextvars.ContextVar[float] = contextvars.ContextVar("spa_run_timeout", default=RUN_TIMEOUT)
_stage: contextvars.ContextVar[str] = contextvars.ContextVar("spa_stage", default="run")
# called after every run of the model: a stage with no steps of its own shows its runs as progress
_ticker: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("spa_ticker", default=None)


class RunTimeout(ModelLoadError):
    """A run of the model outlasted the time limit and was stopped."""


def checked_timeout(seconds) -> float:
    """``seconds`` as a limit, refused (UsageError) unless a finite number of at least 0."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise UsageError(f"--run-timeout expects seconds, got {seconds!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--run-timeout must be a number of seconds, at least 0 (0: no limit), got {seconds}")
    return value


def set_timeout(seconds) -> None:
    _limit.set(checked_timeout(seconds))


def set_stage(stage: str, ticker: Callable[[], None] | None = None) -> None:
    """Name the running stage (for a timed-out run's message); ``ticker`` is called after each run."""
    _stage.set(stage)
    _ticker.set(ticker)


def own_context(function):
    """Run ``function`` in a copy of the current context: the limit and stage it sets end with it."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return contextvars.copy_context().run(function, *args, **kwargs)

    return wrapper


@contextmanager
def limited():
    """``RunOptions`` for one ``session.run``, terminated once the limit passes; a run stopped so
    raises :class:`RunTimeout`. The timer starts before the caller's run, so timing the run alone
    does not count the thread's start."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # failures surface as exceptions; keep stderr clean
    limit = _limit.get()
    if not limit:
        yield options
        _tick()
        return
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        options.terminate = True

    timer = threading.Timer(limit, stop)
    timer.daemon = True
    timer.start()
    try:
        yield options
        _tick()
    except Exception:
        if stopped.is_set():
            raise RunTimeout(
                f"{_stage.get()}: a run of the model took longer than {limit:g} s and was stopped "
                f"(--run-timeout sets the limit; 0: none)"
            ) from None
        raise
    finally:
        timer.cancel()


def _tick() -> None:
    ticker = _ticker.get()
    if ticker is not None:
        ticker()


def run(session, names, feeds) -> list:
    """``session.run(names, feeds)`` within the time limit."""
    with limited() as options:
        return session.run(names, fit_empty(session, feeds), options)


def fit_empty(session, feeds: dict) -> dict:
    """``feeds`` with each empty input (a key/value cache before the first token) given the fixed
    axes the session declares: it holds no value a pruned head count could disagree with, so one
    feed serves the input model and a pruned one."""
    fitted = dict(feeds)
    for info in session.get_inputs():
        value = feeds.get(info.name)
        if value is None or value.size or len(info.shape) != value.ndim:
            continue
        shape = [d if isinstance(d, int) and d > 0 else n for d, n in zip(info.shape, value.shape)]
        fitted[info.name] = np.zeros(shape, value.dtype)
    return fitted
