"""Options that cannot work, refused before any work is done on the model.

A pattern that matches nothing and an option another one silently overrides both give a run
that looks fine and did not do what was asked; they are cheap to catch up front.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from pathlib import Path

from spa.core.errors import UsageError
from spa.core.graph import ModelGraph
from spa.pipeline.options import PlanOptions

# similar node names listed when a pattern matches none
CLOSE_MATCHES = 5


def check_patterns(graph: ModelGraph, flag: str, patterns) -> None:
    """Every node name pattern of ``flag`` (``--exclude``, ``--ratio-for``) must match a node: a
    typo would otherwise protect, or prune, nothing."""
    names = [node.name for node in graph.nodes if node.name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise UsageError(f"{flag} {pattern}: the pattern matches no node of the model{_similar(pattern, names)}")


def _similar(pattern: str, names: list[str]) -> str:
    # a glob is compared by its literal part: '/layer1/*' against '/layer1/conv/Conv'
    literal = pattern.replace("*", "").replace("?", "")
    close = difflib.get_close_matches(literal, names, n=CLOSE_MATCHES, cutoff=0.5)
    if not close:
        close = [name for name in names if literal and literal.lower() in name.lower()][:CLOSE_MATCHES]
    if not close:
        return " (node names are matched as globs: '*' for any text; `spa analyze --json` lists them)"
    return f" (similar node names: {', '.join(close)})"


def check_ratio_and_target(ratio_given: bool, target_given: bool) -> None:
    """A target picks the ratio itself: a ratio given with it would be silently ignored."""
    if ratio_given and target_given:
        raise UsageError(
            "--ratio and --target-flops/--target-params/--target-latency both set the ratio: give one of them"
        )


def ratio_or_default(ratio: float | None, targets, remove_blocks: float | None = None) -> float:
    """The ratio asked for: None is ``PlanOptions``' default, or 0 when whole blocks go and no
    width cut is asked for; one given alongside a target is refused."""
    targeted = any(t is not None for t in targets)
    check_ratio_and_target(ratio is not None, targeted)
    if ratio is None and remove_blocks is not None and not targeted:
        return 0.0  # depth alone
    return PlanOptions.ratio if ratio is None else ratio


def check_calibration_path(calib) -> None:
    """A calibration path that is not there fails now, not after the model was loaded and grouped."""
    if calib is None or not isinstance(calib, (str, os.PathLike)):
        return
    try:
        os.stat(calib)
    except FileNotFoundError:
        raise UsageError(f"--calib {Path(calib)}: no such file or folder") from None
    except OSError as exc:
        raise UsageError(f"--calib {Path(calib)}: cannot read it ({exc.strerror or exc})") from None
