"""The options of every stage, shared by the Python API and the CLI, so each default is defined once.

Each dataclass checks its own values when made, and raises ``UsageError`` (exit 2 on the
command line) with the flag's name, the message the command line prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from spa.analysis.blocks import BLOCK_UNITS
from spa.core.coupling import ATTENTION_UNITS
from spa.core.errors import UsageError
from spa.core.runlimit import RUN_TIMEOUT, checked_timeout
from spa.formats.calib_reader import CalibrationReader, is_reader
from spa.ops.registry import DEFAULT, Registry
from spa.planning.head_unit import AUTO
from spa.planning.search import Target
from spa.scoring.blocks import BLOCK_SCORES
from spa.scoring.criteria import CRITERIA

# how compensation refits: see ``CutOptions``
REFITS = ("auto", "sequential", "layerwise")


@dataclass(frozen=True)
class AnalyzeOptions:
    """What is grouped, and the input sizes the model is counted, validated and timed at."""

    exclude: tuple[str, ...] = ()  # node name patterns (fnmatch) whose channels stay whole
    approximate: bool = False  # also prune groups where removal is not equal to zeroing (norms)
    # attention units: "heads" (grouped-query: a KV head with its query heads), "head_dim" (one
    # index of head_dim in every head), "query_heads" (the same query head in every KV group), or
    # "auto": whichever of heads and query_heads lands nearer the ratio (``spa.planning.head_unit``);
    # heads wherever no ratio is known (analysis alone, a target)
    attention: str = AUTO
    # input name -> sizes (inputs sharing a symbolic axis follow); free axes otherwise count 1
    input_shapes: Mapping[str, list[int]] | None = None
    # the operators spa knows (``DEFAULT.with_operators(...)`` adds a caller's own)
    registry: Registry = field(default=DEFAULT, compare=False)
    # input name -> the value every run feeds it (a number, or nested lists), instead of the one
    # spa makes up: a sample rate, a flag, a recurrent state
    inputs: Mapping[str, object] | None = None

    def __post_init__(self) -> None:
        if self.attention not in (*ATTENTION_UNITS, AUTO):
            raise UsageError(
                f"attention units must be one of {', '.join((*ATTENTION_UNITS, AUTO))}, got '{self.attention}'"
            )


@dataclass(frozen=True)
class ScoreOptions:
    """How units are ranked, and the data the ranking and the refit read."""

    criterion: str = "obspa"
    # an .npz of named input arrays, an .npy file (single-input models), a folder of .npy files,
    # or an object with onnxruntime's CalibrationDataReader protocol (``get_next()``); the first
    # ``calib_samples`` feed the statistics, up to ``spa.verify.fidelity.SAMPLES`` after them
    # measure the pruned outputs
    calib: str | os.PathLike[str] | CalibrationReader | None = None
    calib_samples: int = 128
    # synthetic inputs run without ``calib`` (None: enough for every layer input's X^T X, within a budget)
    synthetic_samples: int | None = None
    # a decoder writes this many token sequences of ``calib_length`` from its BOS token
    # (``spa.scoring.self_calibration``), used as ``calib`` would be
    calib_generate: int | None = None
    calib_length: int = 128
    calib_top_k: int | None = None  # None: sample from the whole vocabulary

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion '{self.criterion}' (choose from {', '.join(sorted(CRITERIA))})")
        if self.calib is not None and not isinstance(self.calib, (str, os.PathLike)) and not is_reader(self.calib):
            raise UsageError(
                "calibration data must be a path or an object with get_next() (onnxruntime's "
                f"CalibrationDataReader protocol), got {type(self.calib).__name__}"
            )
        if CRITERIA[self.criterion].data == "calibration" and not self.has_data:
            raise UsageError(f"--criterion {self.criterion} ranks channels by calibration data: give --calib FILE")
        if self.calib_samples < 1:
            raise UsageError("--calib-samples must be at least 1")
        if self.synthetic_samples is not None and self.synthetic_samples < 1:
            raise UsageError("synthetic_samples must be at least 1")
        self._check_generate()

    def _check_generate(self) -> None:
        if self.calib_generate is None:
            return
        if self.calib is not None:
            raise UsageError("--calib-generate and --calib both give calibration data: choose one")
        if self.calib_generate < 1:
            raise UsageError("--calib-generate must be at least 1")
        if self.calib_length < 2:
            raise UsageError("--calib-length must be at least 2 (the BOS token and one generated)")
        if self.calib_top_k is not None and self.calib_top_k < 1:
            raise UsageError("--calib-top-k must be at least 1")

    @property
    def has_data(self) -> bool:
        """Calibration data is given or generated."""
        return self.calib is not None or self.calib_generate is not None

    @property
    def data_aware(self) -> bool:
        """The criterion reads layer-input statistics."""
        return CRITERIA[self.criterion].data is not None


@dataclass(frozen=True)
class PlanOptions:
    """How much of each group goes: a ratio (per name pattern, if asked), or a target to search for."""

    ratio: float = 0.3
    # node name pattern (fnmatch, on the weighted ops a group slices) -> the ratio of the groups it
    # matches; a group several patterns match takes the ratio of the one given last
    ratios: Mapping[str, float] = field(default_factory=dict)
    global_rank: bool = False  # rank units across groups, not per group
    # "auto": counts on the fast side of each layer's measured width curve (``spa.planning.widths``);
    # a number: counts at multiples of it
    round_to: int | str = "auto"
    # a fraction of the dense model's FLOPs, params or latency (one at a time): replaces ``ratio``
    target_flops: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    # whole residual blocks to remove first (depth pruning): a count, or a fraction (below 1) of
    # the removable ones; ``block_score`` ranks them, the lowest going (``spa.scoring.blocks``)
    remove_blocks: float | None = None
    block_score: str = "influence"
    # what one block of a transformer is: "layer", or its attention and MLP apart ("sublayer"),
    # or only one of those kinds ("attention", "mlp"); ``spa.analysis.blocks``
    block_unit: str = "layer"
    # experts removed from every mixture-of-experts layer: a whole number, or a fraction of each
    # layer's experts (``spa.pipeline.experts``); 0 keeps them all
    remove_experts: float = 0

    def __post_init__(self) -> None:
        check_ratio("--ratio", self.ratio)
        check_expert_count(self.remove_experts)
        check_blocks(self.remove_blocks, self.block_score, self.block_unit)
        for pattern, ratio in self.ratios.items():
            check_ratio(f"--ratio-for {pattern}", ratio)
        if self.ratios and self.global_rank:
            raise UsageError("--ratio-for sets each group's own ratio; --global ranks across groups: give one of them")
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise UsageError(f"--round-to must be 'auto' or a whole number of at least 1, got {self.round_to}")
        self.target  # noqa: B018  (refuses two targets at once)

    @property
    def target(self) -> Target | None:
        given = [
            Target(metric, value)
            for metric, value in (
                ("flops", self.target_flops),
                ("params", self.target_params),
                ("latency", self.target_latency),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise UsageError("give one target at a time (--target-flops, --target-params or --target-latency)")
        return given[0] if given else None


def check_expert_count(count: float) -> None:
    if count < 0 or (count >= 1 and count != int(count)):
        raise UsageError(f"--remove-experts must be a whole number or a fraction in (0, 1), got {count:g}")


def check_blocks(remove_blocks: float | None, block_score: str, block_unit: str = "layer") -> None:
    if block_score not in BLOCK_SCORES:
        raise UsageError(f"unknown block score '{block_score}' (choose from {', '.join(BLOCK_SCORES)})")
    if block_unit not in BLOCK_UNITS:
        raise UsageError(f"unknown block unit '{block_unit}' (choose from {', '.join(BLOCK_UNITS)})")
    if remove_blocks is None:
        return
    if not remove_blocks > 0 or (remove_blocks >= 1 and remove_blocks != int(remove_blocks)):
        raise UsageError(
            f"--remove-blocks must be a whole number of blocks or a fraction in (0, 1), got {remove_blocks:g}"
        )


def check_ratio(what: str, ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise UsageError(f"{what} must be in [0, 1), got {ratio}")


@dataclass(frozen=True)
class CutOptions:
    """What is written: removed or zeroed channels, and how the weights left are refitted."""

    # refit the weights left in layers that lose input channels; None: on with calibration data or
    # a data-aware criterion, off for magnitude criteria without data (synthetic statistics were
    # measured to mislead that refit)
    compensate: bool | None = None
    # "layerwise" fits each layer to the dense model's inputs; "sequential" then refits the layers in
    # graph order on the inputs the pruned model gives them; "auto": sequential with calibration data
    # (when held-out samples are left, whichever of the two moves them less), layer-wise without
    refit: str = "auto"
    soft: bool = False  # zero the chosen channels instead of removing them

    def __post_init__(self) -> None:
        if self.refit not in REFITS:
            raise UsageError(f"unknown refit '{self.refit}' (choose from {', '.join(REFITS)})")

    def compensates(self, score: ScoreOptions) -> bool:
        return self.compensate if self.compensate is not None else score.has_data or score.data_aware


@dataclass(frozen=True)
class RunOptions:
    """How spa runs the model (statistics, searches, refits, validation, latency) and what it checks."""

    seed: int = 0  # of the random choices: synthetic inputs, sample inputs, the random criterion
    check: bool = True  # validate the pruned model: checker, onnxruntime, soft == hard, fidelity
    bench: bool = False  # time dense and pruned on the CPU and every provider: see CLI_RUN
    providers: tuple[str, ...] = ("cpu",)  # latency targets and width curves are timed on the first
    threads: int = 0  # intra-op threads for timing (0: onnxruntime's default)
    custom_ops: tuple[str, ...] = ()  # onnxruntime custom-op libraries; none is loaded otherwise
    run_timeout: float = RUN_TIMEOUT  # seconds one run of the model may take (0: no limit)
    # a pruned model timed slower than the dense one (``bench``) is refused unless this is set
    allow_slower: bool = False

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise UsageError(f"--seed must be 0 or more, got {self.seed}")
        checked_timeout(self.run_timeout)


# The one default the CLI does not share: `spa prune` times dense and pruned latency, because it
# prints a summary for a person who came for a faster model; the API's callers (tests, scripts,
# searches over many settings) time what they need, and timing costs seconds per call.
CLI_RUN = RunOptions(bench=True)
