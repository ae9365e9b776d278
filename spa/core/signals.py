"""Termination signals stop spa the way Ctrl-C does, and scratch space never outlives it.

SIGTERM (what ``timeout``, docker and CI send) and SIGHUP would otherwise kill the process
on the spot, skipping every ``finally`` and leaving temporary files and scratch folders
behind. :func:`handled` makes them raise :class:`Terminated`, a ``KeyboardInterrupt``, so
they unwind through exactly the cleanup that SIGINT does; the command then exits with
``128 + signal number`` (130, 143, 129), the status a shell reports for a signal.

Two gaps remain in a plain "raise from the handler" scheme, and :func:`deferred` closes them:
a signal between creating a file and recording it for removal, and one in the middle of a
removal. Inside ``deferred()`` the signal is noted and raised when the block ends. Once a
signal has been raised, later ones are ignored so that the cleanup it started can finish.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path

HANDLED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
SCRATCH_PREFIX = "spa-"


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when spa receives SIGINT, SIGTERM or SIGHUP."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: int | None = None  # the first signal, once one came
_raised = False
_held = 0


@contextmanager
def handled():
    """Route the termination signals to :class:`Terminated` inside the block (main thread only;
    a signal that is ignored on entry, as ``nohup`` and background jobs arrange, stays ignored).
    The previous handlers come back afterwards."""
    global _received, _raised
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received, _raised = None, False
    previous = {}
    for signum in HANDLED:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _on_signal(signum, frame) -> None:
    global _received, _raised
    if _received is None:
        _received = signum
    if _raised or _held:
        return
    _raised = True
    raise Terminated(_received)


@contextmanager
def deferred(deliver: bool = True):
    """Hold a signal that arrives inside the block until it ends (then raise it, if ``deliver``)."""
    global _held, _raised
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if deliver and not _held and _received is not None and not _raised:
        _raised = True
        raise Terminated(_received)


def received() -> int | None:
    """The signal that stopped spa, if one did."""
    return _received


_SCRATCH: set[str] = set()


class ScratchDirectory:
    """A private folder ``$TMPDIR/spa-*``, removed with the object, at exit, or by
    :func:`remove_scratch`, whichever comes first."""

    def __init__(self):
        with deferred():
            self.name = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
            _SCRATCH.add(self.name)
            self._finalizer = weakref.finalize(self, _remove_tree, self.name)

    def cleanup(self) -> None:
        self._finalizer()

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _remove_tree(name: str) -> None:
    # never raises: this runs from finalizers, where an exception would only be printed
    with deferred(deliver=False):
        shutil.rmtree(name, ignore_errors=True)
        _SCRATCH.discard(name)


def is_scratch(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is one of this process's scratch folders (never a user's)."""
    resolved = Path(folder).resolve()
    return any(Path(name).resolve() == resolved for name in _SCRATCH)


def remove_scratch() -> None:
    """Remove every scratch folder still present: the command's last step on any exit path."""
    for name in list(_SCRATCH):
        _remove_tree(name)


def remove_quietly(path: str | os.PathLike) -> None:
    """Remove a file or folder of spa's own, ignoring one already gone."""
    with deferred(deliver=False):
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
