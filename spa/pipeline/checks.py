"""The checks of a pruned model: validation, fidelity on held-out calibration samples, latency."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spa.core.errors import ModelLoadError, UsageError
from spa.core.graph import ModelGraph
from spa.core.runlimit import RunTimeout
from spa.core.runtime import Source, refuse_oversized, resolve_providers, sample_inputs, static_batch
from spa.core.tensors import write_beside_data, write_external
from spa.formats.model import Progress, say
from spa.formats.shapes import infer_shapes
from spa.pipeline.options import RunOptions
from spa.scoring.calibration_fit import calibration_run_error
from spa.transforms.cut import apply_plan, soft_transform
from spa.verify import fidelity
from spa.verify.bench import compare
from spa.verify.compare import nonfinite_weights
from spa.verify.validate import Validation, validate

if TYPE_CHECKING:
    from spa.pipeline.pruned import PrunedModel


def validate_pruned(pruned: PrunedModel, run: RunOptions, progress: Progress | None = None) -> Validation:
    """Validation, then fidelity (given calibration data) and latency (``run.bench``)."""
    scored = pruned.plan.scored
    validation = _validate(pruned, run, progress)
    if scored.calibration:
        say(progress, "fidelity")
        if pruned.chosen:
            validation.fidelity = pruned.chosen.fidelity
        else:
            validation.fidelity = _fidelity(pruned, scored.calibration, scored.options.calib_samples, run)
        validation.problems += fidelity.nonfinite_problems(validation.fidelity)
    validation.latency_asked = run.bench
    if run.bench:
        say(progress, "latency")
        validation.latency = _latencies(pruned, validation, run)
    return validation


def _validate(pruned: PrunedModel, run: RunOptions, progress: Progress | None) -> Validation:
    dense = pruned.dense
    refuse_oversized(dense.proto)
    say(progress, "validate")
    validation = _prove(pruned, run, lambda done, total: say(progress, "validate", done, total))
    if not validation.dense_runs:
        assert validation.dense_error is not None  # validate sets it whenever the input model does not run
        raise ModelLoadError(validation.dense_error + _custom_op_hint(dense.graph, run.custom_ops))
    validation.nonfinite_weights = nonfinite_weights(_hard(pruned), dense.as_input_format)
    if validation.nonfinite_weights:
        named = validation.nonfinite_weights
        validation.problems.append(
            f"pruned weights hold NaN or inf: {', '.join(named[:5])}"
            + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        )
    return validation


def _custom_op_hint(graph: ModelGraph, custom_ops) -> str:
    domains = sorted({n.domain for n in graph.nodes if n.domain not in ("", "ai.onnx", "com.microsoft")})
    if domains and not custom_ops:
        return f" (ops from domain {', '.join(domains)}: spa loads no custom-op library unless given --custom-ops)"
    return ""


def _prove(pruned: PrunedModel, run: RunOptions, step) -> Validation:
    """Validate in memory, or through files in a scratch folder for models with external data.

    The soft reference zeroes the channels of the model the cut sliced (refitted, or the dense
    one), while I/O and runnability are checked against the dense model.
    """
    dense, weights, plan = pruned.dense, pruned.weights, pruned.plan.units
    analysis = pruned.plan.scored.analyzed.analysis
    exact_ids = [gid for gid in plan.removed if analysis.group(gid).exact]
    workdir = Path(pruned.workdir.name) if pruned.workdir else None  # set for lazy models only
    hard = _hard(pruned)  # the cut, even where the result is the soft model
    hard_source: Source = write_beside_data(hard, workdir, "pruned.onnx") if workdir is not None else hard
    exact_plan = plan
    hard_exact: Source | None = hard_source
    soft: Source | None = pruned.soft.as_input_format if workdir is None else None
    if len(exact_ids) < len(plan.removed):  # compare only what is meant to be equal: the exact groups' cut
        exact_plan, soft = plan.restricted_to(exact_ids), None
        spill = workdir / "exact.onnx.data" if workdir is not None else None
        cut = infer_shapes(apply_plan(weights.proto, weights.graph, analysis, exact_plan, dense.opset, spill=spill))
        exact_model = dense.derived(cut).as_input_format
        hard_exact = write_beside_data(exact_model, workdir, "exact.onnx") if workdir is not None else exact_model
    if workdir is not None:
        soft = write_external(weights.proto, workdir, "soft.onnx", soft_transform(weights.graph, analysis, exact_plan))
    elif soft is None:
        cut = apply_plan(weights.proto, weights.graph, analysis, exact_plan, dense.opset, soft=True)
        soft = dense.derived(cut).as_input_format
    if not exact_ids:
        hard_exact = soft = None
    if workdir is None:
        dense_source: Source = dense.as_input_format
    elif dense.path is not None:
        dense_source = dense.path
    else:  # a ModelProto still reading its weights from files: onnxruntime needs a file to open
        dense_source = write_external(dense.as_input_format, workdir, "dense.onnx")
    validation = validate(
        dense_source,
        hard_source,
        soft,
        hard_exact,
        removed_anything=bool(plan.removed),
        seed=run.seed,
        step=step,
        custom_ops=tuple(run.custom_ops),
        sizes=pruned.plan.scored.analyzed.sizes,
    )
    validation.approximate_groups = len(plan.removed) - len(exact_ids)
    return validation


def _fidelity(
    pruned: PrunedModel, calibration: dict[str, np.ndarray], used: int, run: RunOptions
) -> fidelity.Fidelity | None:
    dense = pruned.dense
    feeds, source = fidelity.holdout(calibration, used, static_batch(dense.proto) or 1)
    try:
        return fidelity.measure(dense.as_input_format, _hard(pruned), feeds, source, tuple(run.custom_ops))
    except UsageError:  # fewer samples than the model's static batch: nothing to measure on
        return None
    except RunTimeout:
        raise
    except Exception as exc:  # the samples themselves do not fit the model (the statistics may not have run them)
        raise calibration_run_error(exc) from None


def _latencies(pruned: PrunedModel, validation: Validation, run: RunOptions) -> list[dict]:
    """Dense vs pruned median latency on the CPU and every provider named."""
    dense = pruned.dense
    if not validation.ok:
        return []
    feeds = sample_inputs(dense.as_input_format, run.seed, shapes=pruned.plan.scored.analyzed.sizes)
    validation.latency_at = {name: list(value.shape) for name, value in feeds.items()}
    names = list(dict.fromkeys(["CPUExecutionProvider", *resolve_providers(list(run.providers) or ["cpu"])]))
    hard = _hard(pruned)
    return [
        compare(
            dense.as_input_format,
            hard,
            feeds,
            name,
            run.threads,
            custom_ops=tuple(run.custom_ops),
            one_at_a_time=dense.lazy,
        ).as_dict()
        for name in names
    ]


def _hard(pruned: PrunedModel) -> onnx.ModelProto:
    """The cut in the input's format: fidelity and latency measure it even for a soft result."""
    return pruned.hard.as_input_format
