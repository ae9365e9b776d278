"""The prune options a sweep can vary or fix: the fields of the stages' option dataclasses, named
as there (``remove_blocks``) or as ``spa prune`` spells them (``--remove-blocks``). A field added to
a dataclass with a ``spa prune`` flag of the same name becomes an axis with no sweep code."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any

from spa.core.errors import UsageError
from spa.pipeline.options import AnalyzeOptions, CutOptions, PlanOptions, ScoreOptions

STAGES = (AnalyzeOptions, ScoreOptions, PlanOptions, CutOptions)
# fields the sweep sets through options of its own: a grid of amounts, criteria and compensation,
# and what every point shares
OWN_OPTIONS = {
    "ratio": "--ratios",
    "target_flops": "--target-flops",
    "target_params": "--target-params",
    "target_latency": "--target-latency",
    "criterion": "--criteria",
    "compensate": "--compensate",
    "calib": "--calib",
    "calib_samples": "--calib-samples",
    "round_to": "--round-to",
}
# fields with no ``spa prune`` flag, so no command could reproduce a point that set them
NO_FLAG = {"registry", "inputs", "synthetic_samples", "ratios"}
# where the flag's name is not the field's
FLAGS = {"global_rank": "--global", "input_shapes": "--input-shape"}
# fields whose values the command line spells with hyphens for the API's underscores
HYPHENATED = {"attention"}
Setting = tuple[str, Any]


def stage_fields() -> dict[str, tuple[type, Any, Any]]:
    """Every field of the stages' options: name -> (its dataclass, its type, its default)."""
    found: dict[str, tuple[type, Any, Any]] = {}
    for stage in STAGES:
        hints = typing.get_type_hints(stage)
        for f in dataclasses.fields(stage):
            default = f.default if f.default is not dataclasses.MISSING else None
            found[f.name] = (stage, hints[f.name], default)
    return found


def field_name(text: str) -> str:
    """The field an option names: as the field (``global_rank``) or as its flag (``--global``)."""
    flag = "--" + text.strip().lstrip("-").replace("_", "-")
    by_flag = {f: name for name, f in FLAGS.items()}
    return by_flag.get(flag, flag[2:].replace("-", "_"))


def scalar_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types a field takes (None allowed beside them), or None for anything richer."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = tuple(m for m in members if m is not type(None))
    return kinds if kinds and all(m in (bool, int, float, str) for m in kinds) else None


def axis_names() -> list[str]:
    """The fields ``--set`` can vary."""
    return [
        name
        for name, (_, hint, _) in stage_fields().items()
        if name not in OWN_OPTIONS and name not in NO_FLAG and scalar_types(hint)
    ]


def parse_axis(text: str) -> tuple[str, tuple]:
    """``NAME=V1,V2,...`` -> the field and its values, each checked against the field's type."""
    name, equals, values = text.partition("=")
    name = field_name(name)
    if not equals or not name or not values.strip():
        raise UsageError(f"--set expects NAME=VALUE[,VALUE...], got '{text}'")
    fields = stage_fields()
    if name in OWN_OPTIONS:
        raise UsageError(f"--set {name}: give it with {OWN_OPTIONS[name]}")
    if name not in fields or name not in axis_names():
        known = axis_names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"--set {name}: not a prune option a sweep can vary ({hint}choose from {', '.join(known)})")
    kinds = scalar_types(fields[name][1])
    assert kinds is not None  # axis_names keeps only these
    parsed = tuple(dict.fromkeys(_value(name, kinds, v.strip()) for v in values.split(",") if v.strip()))
    return name, parsed


def _value(name: str, kinds: tuple[type, ...], text: str) -> Any:
    if bool in kinds:
        lowered = text.lower()
        if lowered in ("true", "on", "yes", "1"):
            return True
        if lowered in ("false", "off", "no", "0"):
            return False
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                continue
    if str in kinds:
        return text.replace("-", "_") if name in HYPHENATED else text
    wanted = " or ".join(k.__name__ for k in kinds)
    raise UsageError(f"--set {name}: '{text}' is not a {wanted}")


def options_of(settings: Iterable[Setting]) -> tuple:
    """The four stages' options with ``settings`` over their defaults (a later setting wins);
    a value a dataclass refuses is refused here, with its message."""
    fields = stage_fields()
    chosen: dict[type, dict[str, Any]] = {stage: {} for stage in STAGES}
    for name, value in settings:
        if isinstance(value, tuple) and name == "input_shapes":
            value = {k: list(v) for k, v in value}
        chosen[fields[name][0]][name] = value
    return tuple(stage(**chosen[stage]) for stage in STAGES)


def flag_args(name: str, value: Any) -> list[str]:
    """The ``spa prune`` arguments that set field ``name`` to ``value``."""
    flag = FLAGS.get(name, "--" + name.replace("_", "-"))
    default = stage_fields()[name][2]
    if isinstance(value, bool):
        if value:
            return [flag]
        return ["--no-" + flag[2:]] if default is None else []  # an on/off pair where unset means "decide"
    if name == "input_shapes":
        return [a for key, sizes in value for a in (flag, f"{key}={'x'.join(map(str, sizes))}")]
    if isinstance(value, tuple):  # repeatable options
        return [a for item in value for a in (flag, str(item))]
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return [flag, text.replace("_", "-") if name in HYPHENATED else text]


def describe(settings: Iterable[Setting]) -> str:
    return ", ".join(f"{name} {shown(value)}" for name, value in settings)


def shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
