"""How a command runs: its progress bar, and every failure turned into one line and an exit code."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from spa.core import signals
from spa.core.errors import EXIT_INTERNAL, SpaError

if TYPE_CHECKING:  # rich is imported only once a bar is shown, to keep startup quick
    from rich.progress import Progress, TaskID


class Stages:
    """A progress bar on stderr for the running stage, shown once a stage has taken over a second.

    Only on a terminal: pipelines (stderr not a TTY) and --quiet get clean logs.
    """

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()
        self.stage: str | None = None
        self.since = time.perf_counter()
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def __call__(self, stage: str, done: int = 0, total: int = 1) -> None:
        """``total`` 0: a count of runs with no known end (a pulsing bar)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self.since = stage, now
            if self.bar is not None:
                assert self.task is not None  # a bar is only ever created together with its task
                self.bar.remove_task(self.task)
                self.task = self.bar.add_task(stage, total=_total(total), completed=done)
            return
        if self.bar is None:
            if now - self.since < 1.0:  # quick stages would only flicker
                return
            self.bar = progress_bar()
            self.bar.start()
            self.task = self.bar.add_task(stage, total=_total(total), completed=done)
        assert self.task is not None  # set together with the bar
        self.bar.update(self.task, total=_total(total), completed=done)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _total(total: int) -> int | None:
    return total if total > 0 else None


def progress_bar() -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("spa: {task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


class Commands(click.Group):
    """The ``spa`` group: click's own usage errors (an unknown option, a value of the wrong type)
    print in spa's style, one line and exit 2, like every other usage error."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `spa` alone: the help is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "spa"
            message = " ".join(exc.format_message().split())
            click.echo(f"spa: error: {message} (see '{command} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"spa: error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("spa: interrupted", err=True)
            sys.exit(128 + signal.SIGINT)
        sys.exit(code if isinstance(code, int) else 0)


@contextlib.contextmanager
def printed_warnings(quiet: bool, *kinds: type[Warning]):
    """Warnings of ``kinds`` printed as they come, one ``spa: warning:`` line each (none with --quiet)."""

    def show(message, category, *args, **kwargs) -> None:
        if not quiet:
            click.echo(f"spa: warning: {message}", err=True)

    with warnings.catch_warnings():
        for kind in kinds:
            warnings.simplefilter("always", kind)
        warnings.showwarning = show
        yield


def run(debug: bool, action) -> None:
    with signals.handled():
        report_failures(debug, action)


def report_failures(debug: bool, action) -> None:
    try:
        try:
            action()
        finally:
            signals.remove_scratch()
        if (signum := signals.received()) is not None:  # it came while a cleanup held it back
            raise signals.Terminated(signum)
    except SpaError as exc:
        if debug:
            raise
        click.echo(f"spa: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:  # SIGINT, SIGTERM or SIGHUP: the shell's status for that signal
        signum = getattr(exc, "signum", signal.SIGINT)
        click.echo(
            "spa: interrupted" if signum == signal.SIGINT else f"spa: stopped by {signal.Signals(signum).name}",
            err=True,
        )
        sys.exit(128 + signum)
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            raise
        click.echo(f"spa: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", err=True)
        sys.exit(EXIT_INTERNAL)
