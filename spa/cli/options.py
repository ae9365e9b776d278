"""Options ``spa prune`` and ``spa sweep`` both take, declared once so they mean the same in both."""

from __future__ import annotations

from pathlib import Path

import click

from spa.analysis.blocks import BLOCK_UNITS
from spa.pipeline import CLI_RUN, AnalyzeOptions, CutOptions, PlanOptions, ScoreOptions
from spa.pipeline.options import REFITS

# every default below is the API's (spa.pipeline.options); CLI_RUN says where the CLI's differs
_GROUPS, _SCORE, _PLAN, _CUT = AnalyzeOptions(), ScoreOptions(), PlanOptions(), CutOptions()

calib = click.option(
    "--calib",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Calibration inputs: an .npz of named arrays, an .npy file (single-input models), or a folder of .npy files.",
)
calib_samples = click.option(
    "--calib-samples",
    type=int,
    default=_SCORE.calib_samples,
    show_default=True,
    help="Use at most this many calibration samples for the statistics; up to 256 after them "
    "measure how far the pruned outputs moved.",
)
refit = click.option(
    "--refit",
    type=click.Choice(REFITS),
    default=_CUT.refit,
    show_default=True,
    help="How compensation refits: layerwise fits each layer to the dense model's inputs; sequential "
    "then refits the layers in graph order on the inputs the pruned model gives them; auto is "
    "sequential with --calib (the one that moves held-out samples less, when any are left) and "
    "layerwise without.",
)
block_unit = click.option(
    "--block-unit",
    type=click.Choice(BLOCK_UNITS),
    default=_PLAN.block_unit,
    show_default=True,
    help="What one residual block of a transformer is: a whole layer, its attention and its MLP "
    "apart (sublayer), or only attention or only MLP sub-blocks. CNN blocks are the same in every unit.",
)
global_rank = click.option("--global", "global_rank", is_flag=True, help="Rank channels across groups, not per group.")
round_to = click.option(
    "--round-to",
    default=str(_PLAN.round_to),
    show_default=True,
    metavar="N|auto",
    help="'auto': time each layer alone at candidate widths (cached) and keep every count off the "
    "spikes of its width curve; --target-latency and --global then cut where it saves the most time. "
    "N: keep channel counts at multiples of N (1: exactly the ratio).",
)
exclude = click.option("--exclude", multiple=True, metavar="PATTERN", help="Protect nodes whose name matches (glob).")
approximate = click.option(
    "--approximate",
    is_flag=True,
    help="Also prune groups where removal is not equal to zeroing: channels a norm mixes, such as a "
    "transformer's hidden (embedding) dimension.",
)
attention = click.option(
    "--attention",
    type=click.Choice(["auto", "heads", "head-dim", "query-heads"]),
    default=_GROUPS.attention.replace("_", "-"),
    show_default=True,
    help="Attention units: remove whole heads (grouped-query: a KV head with its query heads), "
    "shrink head_dim evenly in every head, or (grouped-query) remove query heads evenly "
    "in every KV group; auto: whichever of whole heads and query heads lands nearer the ratio.",
)
input_shape = click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=AxBxC",
    help="Sizes of an input with free axes: FLOPs are counted, validation also runs and latency is "
    "timed at them (inputs sharing a symbolic axis follow). Repeatable.",
)
seed = click.option(
    "--seed",
    type=int,
    default=CLI_RUN.seed,
    show_default=True,
    help="Seed of the random choices (synthetic inputs, the random criterion); 0 or more.",
)
providers = click.option(
    "--providers",
    default=",".join(CLI_RUN.providers),
    show_default=True,
    help="Comma-separated execution providers to time on (cpu, cuda, tensorrt, ...).",
)
threads = click.option(
    "--threads",
    type=int,
    default=CLI_RUN.threads,
    show_default=True,
    help="Intra-op threads for timing (0: onnxruntime's default).",
)
run_timeout = click.option(
    "--run-timeout",
    type=float,
    default=CLI_RUN.run_timeout,
    show_default=True,
    metavar="SECONDS",
    help="Stop with exit 3 when one run of the model (statistics, search, validation, latency) takes "
    "longer than this; 0: no limit.",
)
quiet = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
debug = click.option("--debug", is_flag=True, help="Show tracebacks.")
