"""The command line."""

from spa.cli.commands import main

__all__ = ["main"]
