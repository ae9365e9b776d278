"""``spa sweep``: prune a grid of settings, measure every point, and show the trade-off."""

from __future__ import annotations

from pathlib import Path

import click

from spa.cli import options as shared
from spa.cli.parsing import files_read, parse_round_to, provider_list
from spa.cli.running import run
from spa.core.errors import ModelLoadError, UsageError, ValidationError
from spa.core.runtime import parse_shapes, resolve_providers
from spa.formats.files import check_output_path, write_bytes_atomic
from spa.pipeline import ScoreOptions
from spa.pipeline.usage import check_calibration_path
from spa.sweep import results
from spa.sweep.axes import parse_axis, stage_fields
from spa.sweep.grid import (
    COMPENSATION,
    Point,
    SweepSpec,
    check_points,
    grid,
    parse_criteria,
    parse_ratios,
    parse_targets,
    point_key,
)
from spa.sweep.page import render_page
from spa.sweep.point import EVAL_TAKES, eval_takes, load_eval, prune_point
from spa.sweep.runner import run_pool, run_ray
from spa.sweep.shared import run_shared

_SCORE = ScoreOptions()


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--ratios", metavar="START:STOP:STEP|R,...", help="Ratios to prune at (STOP included).")
@click.option(
    "--target-flops", "targets_flops", metavar="F,...", help="FLOPs targets (fractions of the dense model's)."
)
@click.option(
    "--target-params", "targets_params", metavar="F,...", help="Params targets (fractions of the dense model's)."
)
@click.option(
    "--target-latency",
    "targets_latency",
    metavar="F,...",
    help="Latency targets (fractions of the dense model's, timed on the first of --providers).",
)
@click.option(
    "--criteria", default=_SCORE.criterion, show_default=True, metavar="C,...", help="Criteria to rank channels by."
)
@click.option(
    "--compensate",
    type=click.Choice(sorted(COMPENSATION)),
    default="auto",
    show_default=True,
    help="Refit the weights left: on, off, both (each point twice), or auto (as spa prune decides).",
)
@click.option(
    "--set",
    "axes",
    multiple=True,
    metavar="NAME=V1,V2,...",
    help="Prune with spa prune's option NAME at each value (refit=layerwise,sequential; the name "
    "as the flag, or as its Python field): one value fixes it, several make an axis of the grid. "
    "Repeatable.",
)
@shared.calib
@shared.calib_samples
@shared.exclude
@shared.approximate
@shared.attention
@shared.input_shape
@shared.refit
@shared.global_rank
@click.option(
    "--eval",
    "evaluate",
    metavar="MODULE:FUNCTION|SCRIPT.py:FUNCTION",
    help="Your metric, the points' quality: called with an onnxruntime session on each pruned model "
    "or with its path (see --eval-takes), returns a number.",
)
@click.option(
    "--eval-takes",
    type=click.Choice(EVAL_TAKES),
    default="auto",
    show_default=True,
    help="What --eval's function receives: an onnxruntime InferenceSession (on the first of "
    "--providers, --threads), or the pruned model's path; auto: a session when its first parameter "
    "is annotated InferenceSession or named session, else the path.",
)
@shared.round_to
@shared.seed
@shared.providers
@shared.threads
@shared.run_timeout
@click.option("--jobs", type=int, default=1, show_default=True, help="Points run at once, in local processes.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run the points as Ray tasks on the cluster at ADDRESS (alone: a local Ray started for the run).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    help="Stream the points here as they finish; a rerun resumes, skipping finished points.",
)
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write the points as CSV.")
@click.option("--html", "html_path", type=click.Path(path_type=Path), help="Write a page with the Pareto fronts.")
@click.option("--pick", "bar", metavar="METRIC>=X", help="Write the fastest valid point meeting the bar.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where --pick writes [MODEL.picked.onnx].")
@click.option("--force", is_flag=True, help="Overwrite existing --csv, --html and --pick outputs.")
@shared.quiet
@shared.debug
def sweep(model: Path, **flags) -> None:
    """Prune MODEL at every point of a grid and measure each: size, FLOPs, latency, quality."""
    run(flags["debug"], lambda: _sweep(model, **flags))


def _sweep(model: Path, quiet: bool, debug: bool, **flags) -> None:
    points = _grid(flags)
    spec = SweepSpec(
        str(model),
        str(flags["calib"]) if flags["calib"] is not None else None,
        flags["calib_samples"],
        parse_round_to(flags["round_to"]),
        flags["seed"],
        provider_list(flags["providers"]),
        flags["threads"],
        flags["run_timeout"],
        flags["evaluate"],
        eval_takes(load_eval(flags["evaluate"]), flags["eval_takes"]) if flags["evaluate"] else "path",
        _shared_options(flags),
    )
    bar = results.parse_bar(flags["bar"]) if flags["bar"] else None
    target = _check_paths(model, spec, points, bar is not None, flags)
    header = {"model": str(model), "calib": spec.calib, "eval": spec.evaluate, "points_total": len(points)}
    order = {point_key(spec, p): k for k, p in enumerate(points)}
    finished = {k: v for k, v in results.finished_points(flags["json_path"]).items() if k in order}
    collected = dict(finished)

    def done(result: dict) -> None:
        collected[result["key"]] = result
        listed = sorted(collected.values(), key=lambda p: order[p["key"]])
        if flags["json_path"]:
            results.write_json(flags["json_path"], header, listed)
        if not quiet:
            state = result["status"] if not result.get("eval_error") else "eval failed"
            click.echo(f"spa: point {len(collected)}/{len(points)}: {result['command']}: {state}", err=True)

    todo = [p for p in points if point_key(spec, p) not in finished]
    if finished and not quiet:
        click.echo(f"spa: resuming: {len(finished)} of {len(points)} points already done", err=True)
    _run(spec, todo, flags, done)
    listed = sorted(collected.values(), key=lambda p: order[p["key"]])
    if flags["csv_path"]:
        write_bytes_atomic(flags["csv_path"], results.csv_text(listed).encode())
    if flags["html_path"]:
        write_bytes_atomic(flags["html_path"], render_page(str(model), listed, spec.evaluate).encode())
    if not quiet:
        click.echo(results.table(listed))
    if bar is not None:
        _write_pick(spec, points, listed, bar, target, quiet)


def _grid(flags: dict) -> list[Point]:
    if flags["jobs"] < 1:
        raise UsageError("--jobs must be at least 1")
    if flags["ray_address"] is not None and flags["jobs"] != 1:
        raise UsageError("--jobs runs points in local processes, --ray on Ray: give one of them")
    amounts = [("ratio", r) for r in parse_ratios(flags["ratios"])] if flags["ratios"] else []
    for metric in ("flops", "params", "latency"):
        text = flags[f"targets_{metric}"]
        if text:
            amounts += [(f"target_{metric}", t) for t in parse_targets(f"--target-{metric}", text)]
    axes = dict(parse_axis(text) for text in flags["axes"])  # a name given twice: the last wins
    return grid(amounts, parse_criteria(flags["criteria"]), flags["compensate"], list(axes.items()))


def _shared_options(flags: dict) -> tuple:
    """The prune options every point takes from the command line, those that differ from the
    default only, so a plain sweep's commands and keys name none of them."""
    given = {
        "exclude": tuple(flags["exclude"]),
        "approximate": flags["approximate"],
        "attention": flags["attention"].replace("-", "_"),
        "input_shapes": tuple((k, tuple(v)) for k, v in parse_shapes(list(flags["input_shapes"])).items()),
        "refit": flags["refit"],
        "global_rank": flags["global_rank"],
    }
    defaults = stage_fields()
    return tuple((name, value) for name, value in given.items() if value not in (defaults[name][2], ()))


def _check_paths(model: Path, spec: SweepSpec, points: list[Point], picking: bool, flags: dict) -> Path | None:
    """Everything a user can get wrong, refused before the first point runs."""
    if not model.is_file():
        raise ModelLoadError(f"{model}: no such file")
    resolve_providers(list(spec.providers) or ["cpu"])
    check_calibration_path(spec.calib)
    for criterion in parse_criteria(flags["criteria"]):
        ScoreOptions(criterion, spec.calib, spec.calib_samples)  # a criterion that needs --calib
    check_points(spec, points)
    reads = files_read(model, flags["calib"], ())
    if flags["json_path"] is not None and str(flags["json_path"]) == "-":
        raise UsageError("--json needs a file: the sweep writes it as points finish and resumes from it")
    if flags["json_path"]:  # an existing one is resumed, never refused
        check_output_path(flags["json_path"], reads, True)
    written = [p for p in (flags["json_path"],) if p]
    for path in (flags["csv_path"], flags["html_path"]):
        if path:
            check_output_path(path, reads + written, flags["force"])
            written.append(path)
    if not picking:
        if flags["output"] is not None:
            raise UsageError("-o names where --pick writes the model it picks: give --pick")
        return None
    target = flags["output"] or model.with_name(model.name.removesuffix(".onnx") + ".picked.onnx")
    check_output_path(target, reads + written, flags["force"])
    return target


def _run(spec: SweepSpec, points: list[Point], flags: dict, done) -> None:
    if not points:
        return
    if flags["ray_address"] is not None:
        run_ray(spec, points, flags["ray_address"], done)
    elif flags["jobs"] > 1 and len(points) > 1:
        run_pool(spec, points, min(flags["jobs"], len(points)), done)
    else:
        run_shared(spec, points, done)


def _write_pick(spec, points, listed, bar, target, quiet) -> None:
    chosen = results.pick(listed, bar)
    if chosen is None:
        raise ValidationError(f"no valid point meets {bar.metric}{bar.comparison}{bar.value:g}; nothing written")
    point = next(p for p in points if point_key(spec, p) == chosen["key"])
    pruned = prune_point(spec, point, bench=False)  # the same options give the same model
    pruned.save(target, seed=spec.seed, run_timeout=spec.run_timeout)
    if not quiet:
        click.echo(f"spa: picked {chosen['command']} ({bar.metric} {chosen[bar.metric]:.4g}); wrote {target}")


__all__ = ["sweep"]
