"""Exceptions that the CLI maps to documented exit codes.

Every failure a user can cause raises a subclass of :class:`SpaError`; anything
else reaching the CLI is a bug in spa and exits with ``EXIT_INTERNAL``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2  # click's own code for bad options; we reuse it for bad values
EXIT_BAD_MODEL = 3
EXIT_VALIDATION = 4
EXIT_OUTPUT = 5
EXIT_SLOWER = 6


class SpaError(Exception):
    """Base class: a clear, one-line, user-facing failure."""

    exit_code = EXIT_INTERNAL


class UsageError(SpaError):
    """An option value is out of range or inconsistent."""

    exit_code = EXIT_USAGE


class ModelLoadError(SpaError):
    """The input is not a model spa can read (not ONNX, truncated, missing data...)."""

    exit_code = EXIT_BAD_MODEL


class ValidationError(SpaError):
    """The pruned model failed a check; nothing was written."""

    exit_code = EXIT_VALIDATION


class OutputError(SpaError):
    """The output could not be written (exists, unwritable, disk full...)."""

    exit_code = EXIT_OUTPUT


class SlowerError(SpaError):
    """The pruned model runs slower than the dense one on the timed provider; nothing was written."""

    exit_code = EXIT_SLOWER
