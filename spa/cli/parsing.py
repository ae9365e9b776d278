"""Reading the command line's values, and writing its JSON where asked."""

from __future__ import annotations

import json
from pathlib import Path

import click

from spa.core.errors import UsageError
from spa.formats.files import check_output_path, write_bytes_atomic


def parse_round_to(value: str) -> int | str:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--round-to expects a whole number or 'auto', got '{value}'") from None


def provider_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if to_stdout(path):
        click.echo(text, nl=False)
    else:
        write_bytes_atomic(path, text.encode())


def to_stdout(json_path: Path | None) -> bool:
    return json_path is not None and str(json_path) == "-"


def check_json_path(json_path: Path | None, reads: list[Path], force: bool) -> None:
    if json_path is not None and not to_stdout(json_path):
        check_output_path(json_path, reads, force)


def files_read(model: Path, calib: Path | None, custom_ops) -> list[Path]:
    """What a prune run reads besides the model's own data files: never a place to write."""
    files = [model, *map(Path, custom_ops)]
    if calib is not None:
        files.append(calib)
        if calib.is_dir():
            files.extend(p for p in calib.iterdir())
    return files


def parse_ratio_for(specs: list[str]) -> dict[str, float]:
    """``PATTERN=RATIO`` pairs (``--ratio-for``), in the order given: a later pattern wins."""
    ratios = {}
    for spec in specs:
        pattern, _, value = spec.rpartition("=")
        try:
            ratios[pattern] = float(value)
        except ValueError:
            pattern = ""
        if not pattern:
            raise UsageError(f"--ratio-for expects PATTERN=RATIO, got '{spec}'")
    return ratios
