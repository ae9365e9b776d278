"""The ``spa`` command: a thin layer over :mod:`spa.api`.

Exit codes: 0 ok; 1 internal error (a bug: please report it); 2 bad usage;
3 unreadable or unsupported model; 4 the pruned model failed validation;
5 the output could not be written.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from spa import __version__
from spa.api import analyze as api_analyze
from spa.api import output_path_for, result_of
from spa.cli import options as shared
from spa.cli.blocks import blocks_text, listed_blocks
from spa.cli.parsing import (
    check_json_path,
    files_read,
    parse_ratio_for,
    parse_round_to,
    provider_list,
    to_stdout,
    write_json,
)
from spa.cli.render import analysis_text, bench_table, guessed_sizes_warning, prune_summary
from spa.cli.running import Commands, Stages, printed_warnings, run
from spa.cli.sweep import sweep
from spa.core.feeds import parse_values
from spa.core.runtime import parse_shapes, resolve_providers
from spa.core.tensors import is_lazy
from spa.formats.export import Fp16RangeWarning
from spa.formats.files import check_output_path, output_data_path, protected_files, write_bytes_atomic
from spa.formats.runtime_config import write_configs
from spa.pipeline import (
    CLI_RUN,
    AnalyzeOptions,
    CutOptions,
    PlanOptions,
    RunOptions,
    ScoreOptions,
    prune_model,
)
from spa.pipeline.usage import ratio_or_default
from spa.reporting.report import build_report, render_html, report_path_for
from spa.scoring.blocks import BLOCK_SCORES
from spa.scoring.calibration_fit import CalibrationWarning
from spa.scoring.criteria import CRITERIA
from spa.verify.bench import bench

# every default below is the API's (spa.pipeline.options); CLI_RUN says where the CLI's differs
_GROUPS, _SCORE, _PLAN, _CUT = AnalyzeOptions(), ScoreOptions(), PlanOptions(), CutOptions()


@click.group(cls=Commands)
@click.version_option(__version__, prog_name="spa")
def main() -> None:
    """Structured pruning of ONNX models: smaller and faster, no retraining."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output path [MODEL.pruned.onnx].")
@click.option(
    "--ratio", type=float, default=_PLAN.ratio, show_default=True, help="Fraction of each group's channels to remove."
)
@click.option(
    "--ratio-for",
    multiple=True,
    metavar="PATTERN=R",
    help="Remove the fraction R of the groups whose weighted layers' node names match PATTERN (glob), "
    "instead of --ratio; where several patterns match a group, the last given wins. Repeatable.",
)
@click.option(
    "--criterion",
    type=click.Choice(sorted(CRITERIA)),
    default=_SCORE.criterion,
    show_default=True,
    help="How channels are ranked (obs, activation and fluctuation need --calib or --calib-generate).",
)
@shared.calib
@shared.calib_samples
@click.option(
    "--calib-generate",
    type=int,
    metavar="N",
    help="Decoder language models: let the dense model write N token sequences from its BOS token "
    "(sampled, seeded by --seed) and use them as --calib data.",
)
@click.option(
    "--calib-length",
    type=int,
    default=_SCORE.calib_length,
    show_default=True,
    help="Tokens in each sequence --calib-generate writes, the BOS token included.",
)
@click.option(
    "--calib-top-k", type=int, metavar="K", help="--calib-generate samples among the K likeliest tokens only."
)
@click.option(
    "--compensate/--no-compensate",
    default=_CUT.compensate,
    help="Refit the weights left in layers that lose input channels "
    "[default: on with --calib or a data-aware criterion, off for l1/l2/random without data].",
)
@shared.refit
@shared.global_rank
@shared.round_to
@click.option(
    "--allow-slower",
    is_flag=True,
    help="Write the pruned model even when it runs slower than the dense one on the timed provider "
    "(otherwise exit 6, nothing written).",
)
@click.option("--target-flops", type=float, metavar="F", help="Prune to this fraction of the dense FLOPs.")
@click.option("--target-params", type=float, metavar="F", help="Prune to this fraction of the dense params.")
@click.option(
    "--target-latency",
    type=float,
    metavar="F",
    help="Prune to this fraction of the dense latency, timed on the first of --providers.",
)
@click.option(
    "--remove-blocks",
    type=float,
    metavar="N",
    help="Depth pruning: first remove N whole residual blocks (transformer layers, identity blocks "
    "of CNNs), or the fraction N (below 1) of the removable ones; --ratio then defaults to 0.",
)
@click.option(
    "--block-score",
    type=click.Choice(BLOCK_SCORES),
    default=_PLAN.block_score,
    show_default=True,
    help="How blocks are ranked, lowest removed first: influence (1 - cos(block input, output)), "
    "l2 (||f(x)|| / ||x||) or random (--seed).",
)
@shared.block_unit
@shared.exclude
@click.option("--soft", is_flag=True, help="Zero the chosen channels instead of removing them.")
@click.option(
    "--remove-experts",
    type=float,
    default=_PLAN.remove_experts,
    metavar="N|F",
    help="Remove N experts (or the fraction F of them) from every mixture-of-experts layer, with their "
    "router columns: those with the least routing weight times output on the statistics. With --soft "
    "the router never picks them instead.",
)
@shared.approximate
@shared.attention
@shared.input_shape
@click.option(
    "--input",
    "input_values",
    multiple=True,
    metavar="NAME=VALUE",
    help="Feed input NAME this value in every run, instead of the one spa makes up: a sample rate, "
    "a flag, a length (a number, or numbers separated by commas). Repeatable.",
)
@shared.seed
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--no-validate", is_flag=True, help="Skip every check (checker, onnxruntime, soft == hard).")
@click.option(
    "--bench/--no-bench",
    default=CLI_RUN.bench,
    show_default=True,
    help="Measure latency, dense vs pruned, on the CPU and on --providers.",
)
@shared.providers
@shared.threads
@click.option(
    "--custom-ops",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="onnxruntime custom-op library to load for validation (never loaded otherwise).",
)
@shared.run_timeout
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["onnx", "ort"]),
    default="onnx",
    show_default=True,
    help="Output format: ONNX, or onnxruntime's ORT format for mobile.",
)
@click.option("--fp16", is_flag=True, help="Convert the pruned model to float16 (validated against float32).")
@click.option(
    "--fp16-io",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="With --fp16: element type of the model's inputs and outputs.",
)
@click.option("--write-unchanged", is_flag=True, help="Write the output even when nothing is prunable.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@shared.quiet
@shared.debug
def prune(model: Path, **flags) -> None:
    """Prune MODEL and write a smaller, validated model."""
    run(flags["debug"], lambda: _prune(model, **flags))


def _runtime_config(model: Path, pruned, hard, target: Path, quiet: bool, force: bool) -> list[str]:
    """The configs beside the input (genai_config.json, config.json) rewritten beside the output."""
    try:
        # a soft result keeps every layer, the removed ones zeroed
        removed = pruned.depth.removed_layers if pruned.depth and not pruned.options.soft else []
        dense = pruned.plan.scored.analyzed.model.proto
        return write_configs(Path(model), dense, hard, Path(target), removed, force)
    except ValueError as exc:
        if not quiet:
            click.echo(f"spa: warning: runtime config not written: {exc}", err=True)
        return [f"not written: {exc}"]


def _run_options(flags: dict) -> RunOptions:
    check = not flags["no_validate"]
    return RunOptions(
        flags["seed"],
        check,
        flags["bench"] and check,
        provider_list(flags["providers"]),
        flags["threads"],
        tuple(flags["custom_ops"]),
        flags["run_timeout"],
        flags["allow_slower"],
    )


def _stage_options(flags: dict) -> tuple[AnalyzeOptions, ScoreOptions, PlanOptions, CutOptions]:
    """The stages' options from ``spa prune``'s flags."""
    targets = [flags[f"target_{m}"] for m in _TARGETS]
    ratio = ratio_or_default(flags["ratio"] if _given("ratio") else None, targets, flags["remove_blocks"])
    analyze = AnalyzeOptions(
        tuple(flags["exclude"]),
        flags["approximate"],
        flags["attention"].replace("-", "_"),
        parse_shapes(list(flags["input_shapes"])),
        inputs=parse_values(list(flags["input_values"])),
    )
    score = ScoreOptions(
        flags["criterion"],
        flags["calib"],
        flags["calib_samples"],
        calib_generate=flags["calib_generate"],
        calib_length=flags["calib_length"],
        calib_top_k=flags["calib_top_k"],
    )
    plan = PlanOptions(
        ratio,
        parse_ratio_for(list(flags["ratio_for"])),
        flags["global_rank"],
        parse_round_to(flags["round_to"]),
        target_flops=flags["target_flops"],
        target_params=flags["target_params"],
        target_latency=flags["target_latency"],
        remove_experts=flags["remove_experts"],
        remove_blocks=flags["remove_blocks"],
        block_score=flags["block_score"],
        block_unit=flags["block_unit"],
    )
    return analyze, score, plan, CutOptions(flags["compensate"], flags["refit"], flags["soft"])


def _prune(model: Path, output, out_format, json_path, write_unchanged, force, quiet, debug, **flags) -> None:
    run_options = _run_options(flags)
    check = run_options.check
    stage_options = _stage_options(flags)
    target = output or output_path_for(model, flags["soft"], "." + out_format)
    reads = files_read(model, flags["calib"], flags["custom_ops"])
    check_output_path(target, reads, force)
    data_path = None
    if out_format == "onnx" and len(protected_files([model])) > 1:  # weights will be written beside it
        data_path = output_data_path(target, protected_files(reads))
        check_output_path(data_path, reads, force)  # a previous output's data is fair game with --force
    check_json_path(json_path, [*reads, target, *([data_path] if data_path else [])], force)
    stages = Stages(quiet)
    try:
        with printed_warnings(quiet, CalibrationWarning):
            pruned = prune_model(model, *stage_options, run_options, stages)
        result = result_of(pruned)
        report = result.report.as_dict()
        nothing = (
            result.report.groups_prunable == 0
            and not write_unchanged
            and not result.report.experts
            and not result.report.depth
        )
        checks = []
        if not nothing:
            stages("save")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", Fp16RangeWarning)
                checks = pruned.save(
                    target,
                    ort_format=out_format == "ort",
                    fp16=flags["fp16"],
                    fp16_io=flags["fp16_io"],
                    seed=run_options.seed,
                    check=check,
                    run_timeout=run_options.run_timeout,
                    data_path=data_path,
                )
            for warning in caught:
                if not quiet:
                    click.echo(f"spa: warning: {warning.message}", err=True)
            report["runtime_config"] = _runtime_config(model, pruned, result.model, target, quiet, force)
    finally:
        stages.finish()
    report["export"] = [c.as_dict() for c in checks]
    report["output"] = None if nothing else str(target)
    # where the weights went, when they sit beside the model: a name other than <output>.data
    # when that one is a file the input reads
    report["output_data"] = str(data_path) if data_path and not nothing and is_lazy(result.model) else None
    if json_path:
        write_json(json_path, report)
    if not quiet:
        click.echo(prune_summary(report), err=to_stdout(json_path))  # standard output carries the JSON


_TARGETS = ("flops", "params", "latency")


def _given(option: str) -> bool:
    """Whether the user gave ``option`` (its default does not count)."""
    source = click.get_current_context().get_parameter_source(option)
    return source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Protect nodes whose name matches (glob).")
@click.option("--approximate", is_flag=True, help="Treat approximate groups as prunable.")
@click.option(
    "--attention",
    type=click.Choice(["heads", "head-dim", "query-heads"]),
    default="heads",  # auto needs the ratio, which only prune has
    show_default=True,
    help="Attention units: whole heads (grouped-query: a KV head with its query heads), one index "
    "of head_dim in every head, or one query head in every KV group.",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=AxBxC",
    help="Sizes of an input with free axes, to count FLOPs at (inputs sharing a symbolic axis follow). Repeatable.",
)
@click.option(
    "--block-score",
    type=click.Choice(BLOCK_SCORES),
    default=_PLAN.block_score,
    show_default=True,
    help="How the residual blocks listed are scored (influence and l2 run the model on synthetic inputs).",
)
@shared.block_unit
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the analysis as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every member dimension of every group.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def analyze(model, exclude, approximate, attention, input_shapes, block_score, block_unit, json_path, verbose, debug):
    """List every coupled channel group of MODEL, and why frozen ones are frozen, and its residual blocks."""

    def action():
        sizes = parse_shapes(list(input_shapes))
        report = api_analyze(model, AnalyzeOptions(tuple(exclude), approximate, attention.replace("-", "_"), sizes))
        data = report.as_dict()
        data["blocks"] = listed_blocks(model, block_score, CLI_RUN.seed, block_unit)
        if json_path:
            check_json_path(json_path, [model], True)
            write_json(json_path, data)
        click.echo(analysis_text(data, verbose), err=to_stdout(json_path))
        if data["blocks"]:
            click.echo(blocks_text(data["blocks"]), err=to_stdout(json_path))

    run(debug, action)


@main.command(name="bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--providers",
    default="cpu",
    show_default=True,
    help="Comma-separated execution providers (cpu, cuda, tensorrt, ...); each is measured.",
)
@click.option("--threads", type=int, default=0, show_default=True, help="Intra-op threads (0: onnxruntime's default).")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--runs", type=int, default=50, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True, help="Size of symbolic (dynamic) axes.")
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=AxBxC",
    help="Full shape of one input (for dynamic axes other than batch).",
)
@click.option(
    "--run-timeout",
    type=float,
    default=CLI_RUN.run_timeout,
    show_default=True,
    metavar="SECONDS",
    help="Stop with exit 3 when one run of a model takes longer than this; 0: no limit.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench_command(models, providers, threads, warmup, runs, batch, input_shapes, run_timeout, json_path, debug):
    """Latency of MODEL, or of DENSE and PRUNED measured alternately, on onnxruntime."""

    def action():
        shapes = parse_shapes(list(input_shapes))
        results = [
            bench(list(models), provider, threads, warmup, runs, batch, shapes, run_timeout=run_timeout)
            for provider in resolve_providers(list(provider_list(providers)))
        ]
        if json_path:
            check_json_path(json_path, list(models), True)
            write_json(json_path, {"models": [str(m) for m in models], "results": [r.as_dict() for r in results]})
        warning = guessed_sizes_warning(results)
        if warning:
            click.echo(warning, err=True)
        click.echo(bench_table(results), err=to_stdout(json_path))

    run(debug, action)


@main.command(name="report")
@click.argument("dense", type=click.Path(path_type=Path))
@click.argument("pruned", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output path [PRUNED.report.html].")
@click.option("--bench/--no-bench", default=True, show_default=True, help="Measure CPU latency, dense vs pruned.")
@click.option("--threads", type=int, default=0, show_default=True, help="Intra-op threads (0: onnxruntime's default).")
@click.option("--runs", type=int, default=50, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def report_command(dense, pruned, output, bench, threads, runs, force, debug):
    """A self-contained HTML page comparing DENSE with PRUNED: widths, params, FLOPs, latency, groups."""

    def action():
        target = output or report_path_for(pruned)
        check_output_path(target, [dense, pruned], force)
        report = build_report(dense, pruned, bench=bench, threads=threads, runs=runs)
        write_bytes_atomic(target, render_html(report).encode())
        click.echo(f"wrote {target}")

    run(debug, action)


main.add_command(sweep)
