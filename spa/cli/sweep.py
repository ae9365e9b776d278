"""``spa sweep``: prune a grid of settings, measure every point, and show the trade-off."""

from __future__ import annotations

from pathlib import Path

import click

from spa.cli.parsing import files_read, parse_round_to, provider_list
from spa.cli.running import run
from spa.core.errors import ModelLoadError, UsageError, ValidationError
from spa.core.runtime import resolve_providers
from spa.formats.files import check_output_path, write_bytes_atomic
from spa.pipeline import CLI_RUN, PlanOptions, ScoreOptions
from spa.pipeline.usage import check_calibration_path
from spa.sweep import results
from spa.sweep.grid import COMPENSATION, Point, SweepSpec, grid, parse_criteria, parse_ratios, parse_targets, point_key
from spa.sweep.page import render_page
from spa.sweep.point import load_eval, prune_point
from spa.sweep.runner import run_pool, run_ray
from spa.sweep.shared import run_shared

_SCORE, _PLAN = ScoreOptions(), PlanOptions()


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--ratios", metavar="START:STOP:STEP|R,...", help="Ratios to prune at (STOP included).")
@click.option("--target-flops", "targets", metavar="F,...", help="FLOPs targets (fractions of the dense model's).")
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
@click.option("--calib", type=click.Path(path_type=Path), metavar="PATH", help="Calibration inputs (as spa prune).")
@click.option("--calib-samples", type=int, default=_SCORE.calib_samples, show_default=True)
@click.option(
    "--eval",
    "evaluate",
    metavar="MODULE:FUNCTION|SCRIPT.py:FUNCTION",
    help="Your metric: called with each pruned model's path, returns a number (the points' quality).",
)
@click.option("--round-to", default=str(_PLAN.round_to), show_default=True, metavar="N|auto")
@click.option("--seed", type=int, default=CLI_RUN.seed, show_default=True)
@click.option(
    "--providers",
    default=",".join(CLI_RUN.providers),
    show_default=True,
    help="Execution providers; latency is the first one's.",
)
@click.option("--threads", type=int, default=CLI_RUN.threads, show_default=True, help="Intra-op threads for timing.")
@click.option("--run-timeout", type=float, default=CLI_RUN.run_timeout, show_default=True, metavar="SECONDS")
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
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
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
    )
    bar = results.parse_bar(flags["bar"]) if flags["bar"] else None
    target = _check_paths(model, spec, bar is not None, flags)
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
        write_bytes_atomic(flags["html_path"], render_page(str(model), listed).encode())
    if not quiet:
        click.echo(results.table(listed))
    if bar is not None:
        _write_pick(spec, points, listed, bar, target, quiet)


def _grid(flags: dict) -> list[Point]:
    if flags["jobs"] < 1:
        raise UsageError("--jobs must be at least 1")
    if flags["ray_address"] is not None and flags["jobs"] != 1:
        raise UsageError("--jobs runs points in local processes, --ray on Ray: give one of them")
    ratios = parse_ratios(flags["ratios"]) if flags["ratios"] else []
    targets = parse_targets(flags["targets"]) if flags["targets"] else []
    return grid(ratios, targets, parse_criteria(flags["criteria"]), flags["compensate"])


def _check_paths(model: Path, spec: SweepSpec, picking: bool, flags: dict) -> Path | None:
    """Everything a user can get wrong, refused before the first point runs."""
    if not model.is_file():
        raise ModelLoadError(f"{model}: no such file")
    resolve_providers(list(spec.providers) or ["cpu"])
    check_calibration_path(spec.calib)
    for criterion in parse_criteria(flags["criteria"]):
        ScoreOptions(criterion, spec.calib, spec.calib_samples)  # a criterion that needs --calib
    if spec.evaluate is not None:
        load_eval(spec.evaluate)
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
