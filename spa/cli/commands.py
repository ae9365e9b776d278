"""The ``spa`` command: a thin layer over :mod:`spa.api`.

Exit codes: 0 ok; 1 internal error (a bug: please report it); 2 bad usage;
3 unreadable or unsupported model; 4 the pruned model failed validation;
5 the output could not be written.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import warnings
from pathlib import Path

import click

from spa import __version__
from spa.api import REFITS, output_path_for
from spa.api import analyze as api_analyze
from spa.api import prune as api_prune
from spa.core import signals
from spa.core.errors import EXIT_INTERNAL, SpaError, UsageError
from spa.core.runlimit import RUN_TIMEOUT
from spa.core.runtime import format_sizes, parse_shapes
from spa.core.tensors import is_lazy
from spa.formats.export import Fp16RangeWarning, export
from spa.formats.files import check_output_path, output_data_path, protected_files, write_bytes_atomic
from spa.reporting.group_layers import is_ffn
from spa.scoring.criteria import CRITERIA
from spa.scoring.statistics import SMOOTH_NOISE


class _Stages:
    """A progress bar on stderr for the running stage, shown once a stage has taken over a second.

    Only on a terminal: pipelines (stderr not a TTY) and --quiet get clean logs.
    """

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()
        self.stage, self.since = None, time.perf_counter()
        self.bar, self.task = None, None

    def __call__(self, stage: str, done: int = 0, total: int = 1) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self.since = stage, now
            if self.bar is not None:
                self.bar.remove_task(self.task)
                self.task = self.bar.add_task(stage, total=max(total, 1), completed=done)
            return
        if self.bar is None:
            if now - self.since < 1.0:  # quick stages would only flicker
                return
            self.bar = _progress_bar()
            self.bar.start()
            self.task = self.bar.add_task(stage, total=max(total, 1), completed=done)
        self.bar.update(self.task, total=max(total, 1), completed=done)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _progress_bar():
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


def _run(debug: bool, action) -> None:
    with signals.handled():
        _report_failures(debug, action)


def _report_failures(debug: bool, action) -> None:
    try:
        try:
            action()
        finally:
            signals.remove_scratch()
        if signals.received():  # it came while a cleanup held it back
            raise signals.Terminated(signals.received())
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


def _round_to(value: str) -> int | str:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--round-to expects a whole number or 'auto', got '{value}'") from None


def _provider_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if _to_stdout(path):
        click.echo(text, nl=False)
    else:
        write_bytes_atomic(path, text.encode())


def _to_stdout(json_path: Path | None) -> bool:
    return json_path is not None and str(json_path) == "-"


def _check_json_path(json_path: Path | None, reads: list[Path], force: bool) -> None:
    if json_path is not None and not _to_stdout(json_path):
        check_output_path(json_path, reads, force)


def _files_read(model: Path, calib: Path | None, custom_ops) -> list[Path]:
    """What a prune run reads besides the model's own data files: never a place to write."""
    files = [model, *map(Path, custom_ops)]
    if calib is not None:
        files.append(calib)
        if calib.is_dir():
            files.extend(p for p in calib.iterdir())
    return files


@click.group()
@click.version_option(__version__, prog_name="spa")
def main() -> None:
    """Structured pruning of ONNX models: smaller and faster, no retraining."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output path [MODEL.pruned.onnx].")
@click.option(
    "--ratio", type=float, default=0.3, show_default=True, help="Fraction of each group's channels to remove."
)
@click.option(
    "--criterion",
    type=click.Choice(sorted(CRITERIA)),
    default="obspa",
    show_default=True,
    help="How channels are ranked (obs, activation and fluctuation need --calib).",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Calibration inputs: an .npz of named arrays, or a folder of .npy files.",
)
@click.option(
    "--calib-samples",
    type=int,
    default=128,
    show_default=True,
    help="Use at most this many calibration samples for the statistics; up to 256 after them "
    "measure how far the pruned outputs moved.",
)
@click.option(
    "--compensate/--no-compensate",
    default=None,
    help="Refit the weights left in layers that lose input channels "
    "[default: on with --calib or a data-aware criterion, off for l1/l2/random without data].",
)
@click.option(
    "--refit",
    type=click.Choice(REFITS),
    default="auto",
    show_default=True,
    help="How compensation refits: layerwise fits each layer to the dense model's inputs; sequential "
    "then refits the layers in graph order on the inputs the pruned model gives them; auto is "
    "sequential with --calib (the one that moves held-out samples less, when any are left) and "
    "layerwise without.",
)
@click.option("--global", "global_rank", is_flag=True, help="Rank channels across groups, not per group.")
@click.option(
    "--round-to",
    default="1",
    show_default=True,
    metavar="N|auto",
    help="Keep channel counts at multiples of N; 'auto' times candidates and keeps the fastest.",
)
@click.option("--target-flops", type=float, metavar="F", help="Prune to this fraction of the dense FLOPs.")
@click.option("--target-params", type=float, metavar="F", help="Prune to this fraction of the dense params.")
@click.option(
    "--target-latency",
    type=float,
    metavar="F",
    help="Prune to this fraction of the dense latency, timed on the first of --providers.",
)
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Protect nodes whose name matches (glob).")
@click.option("--soft", is_flag=True, help="Zero the chosen channels instead of removing them.")
@click.option(
    "--approximate",
    is_flag=True,
    help="Also prune groups where removal is not equal to zeroing: channels a norm mixes, such as a "
    "transformer's hidden (embedding) dimension.",
)
@click.option(
    "--attention",
    type=click.Choice(["heads", "head-dim", "query-heads"]),
    default="heads",
    show_default=True,
    help="Attention units: remove whole heads (grouped-query: a KV head with its query heads), "
    "shrink head_dim evenly in every head, or (grouped-query) remove query heads evenly "
    "in every KV group.",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=AxBxC",
    help="Sizes of an input with free axes: FLOPs are counted, validation also runs and latency is "
    "timed at them (inputs sharing a symbolic axis follow). Repeatable.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the random choices (synthetic inputs, the random criterion); 0 or more.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--no-validate", is_flag=True, help="Skip every check (checker, onnxruntime, soft == hard).")
@click.option(
    "--bench/--no-bench",
    default=True,
    show_default=True,
    help="Measure latency, dense vs pruned, on the CPU and on --providers.",
)
@click.option(
    "--providers",
    default="cpu",
    show_default=True,
    help="Comma-separated execution providers to time on (cpu, cuda, tensorrt, ...).",
)
@click.option(
    "--threads", type=int, default=0, show_default=True, help="Intra-op threads for timing (0: onnxruntime's default)."
)
@click.option(
    "--custom-ops",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="onnxruntime custom-op library to load for validation (never loaded otherwise).",
)
@click.option(
    "--run-timeout",
    type=float,
    default=RUN_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Stop with exit 3 when one run of the model (statistics, search, validation, latency) takes "
    "longer than this; 0: no limit.",
)
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
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def prune(
    model,
    output,
    ratio,
    criterion,
    calib,
    calib_samples,
    compensate,
    refit,
    global_rank,
    round_to,
    target_flops,
    target_params,
    target_latency,
    exclude,
    soft,
    approximate,
    attention,
    input_shapes,
    seed,
    json_path,
    no_validate,
    bench,
    providers,
    threads,
    custom_ops,
    run_timeout,
    out_format,
    fp16,
    fp16_io,
    write_unchanged,
    force,
    quiet,
    debug,
):
    """Prune MODEL and write a smaller, validated model."""

    def action():
        if seed < 0:
            raise UsageError(f"--seed must be 0 or more, got {seed}")
        multiple = _round_to(round_to)
        sizes = parse_shapes(list(input_shapes))
        target = output or output_path_for(model, soft, "." + out_format)
        reads = _files_read(model, calib, custom_ops)
        check_output_path(target, reads, force)
        data_path = None
        if out_format == "onnx" and len(protected_files([model])) > 1:  # weights will be written beside it
            data_path = output_data_path(target, protected_files(reads))
            check_output_path(data_path, reads, force)  # a previous output's data is fair game with --force
        _check_json_path(json_path, [*reads, target, *([data_path] if data_path else [])], force)
        stages = _Stages(quiet)
        try:
            result = api_prune(
                model,
                ratio,
                criterion,
                calib=calib,
                calib_samples=calib_samples,
                compensate=compensate,
                refit=refit,
                global_rank=global_rank,
                round_to=multiple,
                target_flops=target_flops,
                target_params=target_params,
                target_latency=target_latency,
                exclude=tuple(exclude),
                soft=soft,
                approximate=approximate,
                seed=seed,
                check=not no_validate,
                bench=bench and not no_validate,
                providers=_provider_list(providers),
                threads=threads,
                custom_ops=tuple(custom_ops),
                attention=attention.replace("-", "_"),
                input_shapes=sizes,
                progress=stages,
                run_timeout=run_timeout,
            )
            report = result.report.as_dict()
            nothing = result.report.groups_prunable == 0 and not write_unchanged
            checks = []
            if not nothing:
                stages("save")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", Fp16RangeWarning)
                    checks = export(
                        result.model,
                        target,
                        ort_format=out_format == "ort",
                        fp16=fp16,
                        fp16_io=fp16_io,
                        seed=seed,
                        check=not no_validate,
                        run_timeout=run_timeout,
                        data_path=data_path,
                    )
                for warning in caught:
                    if not quiet:
                        click.echo(f"spa: warning: {warning.message}", err=True)
        finally:
            stages.finish()
        report["export"] = [c.as_dict() for c in checks]
        report["output"] = None if nothing else str(target)
        # where the weights went, when they sit beside the model: a name other than <output>.data
        # when that one is a file the input reads
        report["output_data"] = str(data_path) if data_path and not nothing and is_lazy(result.model) else None
        if json_path:
            _write_json(json_path, report)
        if not quiet:
            click.echo(_summary(report), err=_to_stdout(json_path))  # standard output carries the JSON

    _run(debug, action)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Protect nodes whose name matches (glob).")
@click.option("--approximate", is_flag=True, help="Treat approximate groups as prunable.")
@click.option(
    "--attention",
    type=click.Choice(["heads", "head-dim", "query-heads"]),
    default="heads",
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
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the analysis as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every member dimension of every group.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def analyze(model, exclude, approximate, attention, input_shapes, json_path, verbose, debug):
    """List every coupled channel group of MODEL, and why frozen ones are frozen."""

    def action():
        report = api_analyze(
            model,
            exclude=tuple(exclude),
            approximate=approximate,
            attention=attention.replace("-", "_"),
            input_shapes=parse_shapes(list(input_shapes)),
        )
        data = report.as_dict()
        if json_path:
            _check_json_path(json_path, [model], True)
            _write_json(json_path, data)
        click.echo(_analysis_text(data, verbose), err=_to_stdout(json_path))

    _run(debug, action)


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
    default=RUN_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Stop with exit 3 when one run of a model takes longer than this; 0: no limit.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench_command(models, providers, threads, warmup, runs, batch, input_shapes, run_timeout, json_path, debug):
    """Latency of MODEL, or of DENSE and PRUNED measured alternately, on onnxruntime."""
    from spa.core.runtime import resolve_providers
    from spa.verify.bench import bench

    def action():
        shapes = parse_shapes(list(input_shapes))
        results = [
            bench(list(models), provider, threads, warmup, runs, batch, shapes, run_timeout=run_timeout)
            for provider in resolve_providers(list(_provider_list(providers)))
        ]
        if json_path:
            _check_json_path(json_path, list(models), True)
            _write_json(json_path, {"models": [str(m) for m in models], "results": [r.as_dict() for r in results]})
        click.echo(_bench_table(results), err=_to_stdout(json_path))

    _run(debug, action)


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
    from spa.reporting.report import build_report, render_html, report_path_for

    def action():
        target = output or report_path_for(pruned)
        check_output_path(target, [dense, pruned], force)
        report = build_report(dense, pruned, bench=bench, threads=threads, runs=runs)
        write_bytes_atomic(target, render_html(report).encode())
        click.echo(f"wrote {target}")

    _run(debug, action)


def _bench_table(results) -> str:
    lines = ["| provider | threads | batch | model | median ms | p90 ms | samples/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for label, t in r.timings.items():
            lines.append(
                f"| {r.provider} | {r.threads or 'default'} | {r.batch} | {label} | {t.median_ms:.3f} | "
                f"{t.p90_ms:.3f} | {t.throughput:.1f} |"
            )
    speedups = [f"{r.provider}: {r.speedup:.2f}x" for r in results if r.speedup is not None]
    if speedups:
        lines.append("speedup (dense / pruned median): " + ", ".join(speedups))
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _change(before: int, after: int) -> str:
    pct = 100.0 * (after - before) / before if before else 0.0
    return f"{_human(before)} -> {_human(after)} ({pct:+.1f}%)"


def _counted_at(r: dict) -> str:
    """Where FLOPs depend on free axes, the sizes they were counted at."""
    given = r["input_shapes"] if "input_shapes" in r else r["options"]["input_shapes"]
    text = f" at {format_sizes(r['flops_at'])}" if r["unsized_axes"] or given else ""
    if r["unsized_axes"]:
        text += f" (free axes {', '.join(r['unsized_axes'])} counted as 1; --input-shape sets them)"
    if r.get("flops_uncounted"):
        named = ", ".join(f"{op} x{n}" for op, n in r["flops_uncounted"].items())
        text += f" (not counted, output shapes unknown: {named})"
    return text


def _summary(r: dict) -> str:
    v = r["validation"]
    lines = [
        f"groups: {r['groups_found']} found, {r['groups_prunable']} prunable, {r['groups_pruned']} pruned",
        f"params: {_change(r['params_before'], r['params_after'])}",
        f"FLOPs:  {_change(r['flops_before'], r['flops_after'])}{_counted_at(r)}",
    ]
    if v["checker"] != "not run":
        soft = (
            "n/a"
            if v["soft_equal"] is None
            else f"{'equal' if v['soft_equal'] else 'DIFFERENT'} (rel. err {v['soft_max_rel_error']:.1e})"
        )
        if v.get("approximate_groups"):
            soft += f" on exact groups; {v['approximate_groups']} approximate not compared"
        if v.get("dense_nonfinite"):
            soft += (
                f" where finite (the input model's {', '.join(v['dense_nonfinite'])} holds NaN or inf on "
                f"the sample inputs)"
            )
        lines.append(
            f"valid:  checker {v['checker']}, onnxruntime {'runs' if v['runs'] else 'FAILS'}, "
            f"I/O {'same' if v['io_match'] else 'DIFFERENT'}, soft==hard {soft}"
        )
    lines.extend(_fidelity_lines(v.get("fidelity")))
    lines.extend(_data_lines(r))
    for pair in v["latency"]:
        where = pair["provider"].replace("ExecutionProvider", "")
        threads = f", {pair['threads']} thread{'s' if pair['threads'] > 1 else ''}" if pair["threads"] else ""
        lines.append(
            f"latency ({where}{threads}, median): {pair['dense_ms']:.2f} ms -> {pair['pruned_ms']:.2f} ms "
            f"({pair['speedup']:.2f}x)"
        )
    if r["round_to_auto"]:
        auto = r["round_to_auto"]
        timed = ", ".join(f"{m}: {ms:.2f} ms" for m, ms in auto["median_ms"].items())
        lines.append(
            f"round-to auto: {auto['chosen']} (timed at ratio {auto['ratio']:.3f} on "
            f"{auto['provider'].replace('ExecutionProvider', '')}: {timed})"
        )
    if r["target"]:
        t = r["target"]
        state = "met" if t["met"] else "NOT met"
        lines.append(
            f"target: {t['metric']} {t['goal']:g} of dense -> {t['achieved']:.3f} at ratio {t['ratio']:.4f} "
            f"({state}; {len(t['probes'])} candidates measured)"
        )
    for check in r["export"]:
        lines.append(f"{check['target']}: {check['summary']}")
    if r["output"]:
        data = r.get("output_data")
        beside = (
            f" (weights in {data}: {Path(r['output']).name}.data is the input's)"
            if data and Path(data).name != f"{Path(r['output']).name}.data"
            else ""
        )
        lines.append(f"wrote {r['output']}{beside}")
    else:
        lines.append(
            "nothing to prune: every group is frozen (see `spa analyze`); no file written "
            "(--write-unchanged writes a copy)"
        )
    return "\n".join(lines)


FIDELITY_LINES = 4  # outputs listed; the JSON report has every one


def _fidelity_lines(fidelity: dict | None) -> list[str]:
    if not fidelity or not fidelity["outputs"]:
        return []
    lines = [f"outputs vs dense on {fidelity['samples']} {fidelity['source']}:"]
    if not fidelity["source"].startswith("held-out"):
        lines[0] += " (optimistic: the refit fitted them; samples past --calib-samples are held out)"
    if fidelity.get("padded_positions"):
        lines[0] += f" ({fidelity['padded_positions']} padded positions left out)"
    for output in fidelity["outputs"][:FIDELITY_LINES]:
        text = f"        {output['name']}: rel. error {output['relative_error']:.3f}, cosine {output['cosine']:.4f}"
        if output["top1_agreement"] is not None:
            text += f", top-1 agreement {output['top1_agreement']:.1%}"
        lines.append(text)
    if len(fidelity["outputs"]) > FIDELITY_LINES:
        lines.append(f"        ... {len(fidelity['outputs']) - FIDELITY_LINES} more outputs in --json")
    return lines


def _data_lines(r: dict) -> list[str]:
    lines = []
    stats, comp = r.get("statistics"), r.get("compensation")
    criterion = r["options"]["criterion"]
    if stats:
        lines.append(
            f"scored: {criterion}, statistics of {stats['tensors']} layer inputs from {stats['samples']} "
            f"{stats['source']} samples ({stats['seconds']:.1f} s)"
        )
        if stats.get("padded_tokens"):
            lines.append(f"        {stats['padded_tokens']} padded token positions (attention mask 0) left out")
        if stats.get("input_prior"):
            imbalance = stats["prior_imbalance"]
            default = SMOOTH_NOISE.name
            chosen = f"synthetic inputs: {stats['input_prior']}"
            if imbalance and stats["input_prior"] != default:
                chosen += (
                    f" (channel imbalance {imbalance[stats['input_prior']]:.2f}, "
                    f"against {imbalance[default]:.2f} for {default})"
                )
            lines.append("        " + chosen)
    elif criterion in ("obspa",):
        lines.append(f"scored: {criterion} with the identity Hessian (no statistics: the model was not run)")
    if r.get("fallback_groups"):
        lines.append(f"        {r['fallback_groups']} group(s) no linear layer reads were ranked by l2")
    if comp and comp["layers"]:
        lines.append(
            f"compensated: {comp['layers']} layers ({comp['biases']} biases); layer output error "
            f"{comp['uncompensated_error']:.2e} -> {comp['mean_output_error']:.2e} on the statistics"
        )
    sequential = (comp or {}).get("sequential")
    if sequential:
        lines.append(
            f"        sequential refit: {sequential['layers']} layers in {sequential['passes']} passes over "
            f"{sequential['samples']} samples ({sequential['seconds']:.1f} s); output error on the pruned "
            f"model's inputs {sequential['layerwise_error']:.2e} layer-wise -> "
            f"{sequential['sequential_error']:.2e}"
        )
    held_out = (comp or {}).get("held_out_error")
    if held_out:
        lines.append(
            f"        kept the {comp['refit']} refit: held-out output error {held_out['layerwise']:.3f} "
            f"layer-wise, {held_out['sequential']:.3f} sequential"
        )
    requantized = (sequential or {}).get("requantized") or (comp or {}).get("requantized")
    if requantized:
        lines.append(
            f"        quantized weights: {requantized['tensors']} refitted tensors written back quantized, "
            f"{requantized['grown']} scales grown to fit, {requantized['saturated']} of "
            f"{requantized['values']} values saturated"
        )
    for why in (comp or {}).get("skipped", [])[:3]:
        lines.append(f"        not compensated: {why}")
    return lines


def _analysis_text(data: dict, verbose: bool) -> str:
    lines = [
        f"{data['model']}: {data['groups_found']} groups, {data['groups_prunable']} prunable; "
        f"params {_human(data['params'])}, FLOPs {_human(data['flops'])}{_counted_at(data)}"
    ]
    shares = [
        f"{op} {100 * flops / data['flops']:.1f}%"
        for op, flops in data["flops_by_op_type"].items()
        if data["flops"] and flops / data["flops"] >= 0.001
    ]
    if shares:
        lines.append(f"  FLOPs by op: {', '.join(shares)} (--json lists every node)")
    if data.get("unruled_weights"):
        named = ", ".join(f"{op} x{n}" for op, n in data["unruled_weights"].items())
        lines.append(f"  weights left whole (spa has no rule for these ops): {named}")
    attention = [g for g in data["groups"] if g.get("kind")]
    if attention:
        lines.append(f"  attention: {len(attention)} groups whose units are {attention[0]['kind'].replace('_', ' ')}")
        for g in attention:
            shared = ""
            if g.get("kv_heads"):
                each = g["heads"] // g["kv_heads"]
                unit = {
                    "heads": f"a KV head with its {each} query heads",
                    "query_heads": f"one query head in each of the {g['kv_heads']} KV groups",
                }.get(g["kind"])
                shared = f" ({g['kv_heads']} KV heads{', unit: ' + unit if unit else ''})"
            lines.append(
                f"    group {g['id']:>4}: {g['heads']} heads x head_dim {g['head_dim']}{shared}, "
                f"{'prunable' if g['frozen'] is None else 'frozen'}"
            )
    ffn = [g for g in data["groups"] if is_ffn(g)]
    if ffn:
        lines.append(f"  feed-forward: {len(ffn)} hidden groups")
        for g in ffn:
            lines.append(
                f"    group {g['id']:>4}: {g['channels']} ch, {'prunable' if g['frozen'] is None else 'frozen'}"
            )
    for g in data["groups"]:
        if g["channels"] <= 1 and not verbose:
            continue
        state = "prunable" if g["frozen"] is None else "frozen"
        kind = "exact" if g["exact"] else "approximate"
        layers = ", ".join(g["layers"][:4]) + (f", +{len(g['layers']) - 4} more" if len(g["layers"]) > 4 else "")
        lines.append(f"  group {g['id']:>4}: {g['channels']:>5} ch  {state:<8} {kind:<11} {layers or '-'}")
        if g["frozen"]:
            lines.append(f"               why frozen: {g['frozen']}")
        if g.get("approximate") and g["approximate"] not in (g["frozen"] or ""):
            lines.append(f"               approximate: {g['approximate']}")
        if verbose:
            lines.append(f"               dims: {', '.join(g['dims'])}")
    hidden = sum(1 for g in data["groups"] if g["channels"] <= 1)
    if hidden and not verbose:
        lines.append(f"  ({hidden} single-channel groups not shown; --verbose lists them)")
    return "\n".join(lines)
