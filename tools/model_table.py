"""The model table: spa next to onnxsim 0.8.1's structured pruning, at one ratio.

    pip install onnxsim==0.8.1
    python tools/model_table.py [--ratio 0.3] [--json out.json] [--out table.md] [--no-onnxsim] [names...]

Models and where they come from: tools/table_models.py (exported once under
~/.cache/spa/models-table/, then reused). Every model is pruned by
``spa.prune(criterion="l2", compensate=False)``: weight magnitude against onnxsim's weight
magnitude (``apply_structured_pruning`` ranks by L2 norm too), and fast on full-size models.
spa's own validation runs (checker, onnxruntime, I/O, soft == hard for exact groups, and for
dynamic models batch 2 and batch 3 x sequence 7). onnxsim's ``apply_structured_pruning`` and
``apply_structured_wanda_pruning`` (calibrated on 8 synthetic inputs from
spa.verify.validate.sample_inputs: random normal floats, ones for masks, zeros for other
integers) run on the same file at the same ratio. All three outputs then get the same check
(tools/compare_onnxsim.check: full onnx check, onnxruntime runs, same output names and shapes
as the dense model), at every input size spa validates at. Models are run one at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import table_models  # noqa: E402
from compare_onnxsim import check  # noqa: E402
from render_results import MODEL_TABLE_HEADER, model_row, model_summary  # noqa: E402

from spa.core.runtime import sample_inputs  # noqa: E402
from spa.reporting.group_layers import is_ffn  # noqa: E402


def _feeds(dense):
    """The sizes spa validates at: declared, and for symbolic axes batch 2 and batch 3 x length 7."""
    feeds = [sample_inputs(dense)]
    symbolic = any(
        not d.HasField("dim_value") or d.dim_value < 0 for i in dense.graph.input for d in i.type.tensor_type.shape.dim
    )
    if symbolic:
        feeds += [sample_inputs(dense, 1, batch=2), sample_inputs(dense, 2, batch=3, length=7)]
    return feeds


def _check_all(dense, pruned, feeds) -> str:
    for feed in feeds:
        try:
            verdict = check(dense, pruned, feed)
        except Exception as exc:  # the dense model itself fails at these sizes
            return f"dense fails: {str(exc).splitlines()[0][:80]}"
        if verdict != "valid":
            return verdict
    return "valid"


def _stats(model):
    """(params, FLOPs) counted by spa on any model, so both tools are measured alike."""
    import spa.api
    from spa.reporting.metrics import count

    try:
        stats = count(spa.api.Model.load(model).graph)
        return stats.params, stats.flops
    except Exception:
        return None, None


def _groups_summary(groups) -> dict:
    """Heads per layer (before -> after, head_dim) and the FFN / other channel groups pruned."""
    heads = [g for g in groups if g.kind == "heads"]
    # a unit may hold several heads (a GQA group: the query heads of one kv head)
    per_layer = [
        (
            g.heads or g.channels,
            g.head_dim,
            (g.heads or g.channels) - g.removed * ((g.heads or g.channels) // g.channels),
            g.frozen,
        )
        for g in heads
    ]
    ffn = [g for g in groups if is_ffn(asdict(g))]
    ffn_ids = {g.id for g in ffn}
    other = [g for g in groups if g.kind is None and g.id not in ffn_ids and g.frozen is None and g.channels > 1]
    return {
        "heads": [{"heads": h, "head_dim": d, "heads_after": a, "frozen": f} for h, d, a, f in per_layer],
        "ffn_found": len(ffn),
        "ffn_prunable": sum(g.frozen is None for g in ffn),
        "ffn_pruned": sum(g.removed > 0 for g in ffn),
        "other_prunable": len(other),
        "other_pruned": sum(g.removed > 0 for g in other),
    }


def run_spa(path: Path, ratio: float, dense, feeds) -> dict:
    import spa

    start = time.perf_counter()
    try:
        result = spa.prune(path, ratio=ratio, criterion="l2", compensate=False, check=True, bench=False)
    except Exception as exc:
        return {"verdict": f"error: {type(exc).__name__}: {str(exc)[:200]}", "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    r, v = result.report, result.report.validation
    verdict = _check_all(dense, result.model, feeds)
    out = {
        "verdict": verdict if v.ok else f"spa validation: {'; '.join(v.problems)[:200]}",
        "params_before": r.params_before,
        "params_after": r.params_after,
        "flops_before": r.flops_before,
        "flops_after": r.flops_after,
        "soft_equal": v.soft_equal,
        "soft_max_rel_error": v.soft_max_rel_error,
        "groups_found": r.groups_found,
        "groups_prunable": r.groups_prunable,
        "groups_pruned": r.groups_pruned,
        "seconds": seconds,
        **_groups_summary(r.groups),
    }
    del result
    gc.collect()
    return out


def run_onnxsim(function: str, path: Path, ratio: float, dense, feeds) -> dict:
    from onnxsim import pruning as sim

    kwargs = {}
    if "wanda" in function:
        # spa's synthetic inputs, 8 samples: onnxsim's own generator fails on paddle2onnx's -1 axes
        kwargs["calibration_data"] = [sample_inputs(dense, seed) for seed in range(8)]
    start = time.perf_counter()
    try:
        pruned = getattr(sim, function)(str(path), sparsity=ratio, **kwargs)
    except Exception as exc:
        return {
            "verdict": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}",
            "seconds": time.perf_counter() - start,
        }
    seconds = time.perf_counter() - start
    params, flops = _stats(pruned)
    out = {
        "verdict": _check_all(dense, pruned, feeds),
        "params_after": params,
        "flops_after": flops,
        "seconds": seconds,
    }
    del pruned
    gc.collect()
    return out


def measure(name: str, exporter: str, ratio: float, with_onnxsim: bool) -> dict:
    import spa.api

    row = {"model": name, "exporter": exporter}
    try:
        path = table_models.path(name, exporter)
    except table_models.NotBuilt as exc:
        row["not_built"] = str(exc)
        return row
    dense = spa.api.Model.load(path).model
    feeds = _feeds(dense)
    row["dynamic"] = len(feeds) > 1
    row["spa"] = run_spa(path, ratio, dense, feeds)
    if with_onnxsim:
        row["onnxsim"] = run_onnxsim("apply_structured_pruning", path, ratio, dense, feeds)
        row["onnxsim_wanda"] = run_onnxsim("apply_structured_wanda_pruning", path, ratio, dense, feeds)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="model names (default: all); name:exporter picks one export")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--json", type=Path, help="write the rows here (rows already there for other models are kept)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--no-onnxsim", action="store_true")
    parser.add_argument("--render", action="store_true", help="print the table of the --json rows, run nothing")
    args = parser.parse_args(argv)
    wanted = [tuple(n.split(":")) if ":" in n else (n, None) for n in args.names]
    entries = [
        (n, e)
        for n, e in table_models.ENTRIES
        if not wanted or any(n == w and (we is None or e == we) for w, we in wanted)
    ]
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    if args.render:
        entries = []
    else:
        print(MODEL_TABLE_HEADER, flush=True)
    for name, exporter in entries:
        row = measure(name, exporter, args.ratio, not args.no_onnxsim)
        rows = [r for r in rows if (r["model"], r["exporter"]) != (name, exporter)] + [row]
        print(model_row(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))
    order = {key: i for i, key in enumerate(table_models.ENTRIES)}
    rows.sort(key=lambda r: order.get((r["model"], r["exporter"]), len(order)))
    table = MODEL_TABLE_HEADER + "\n" + "\n".join(model_row(r) for r in rows) + "\n\n" + model_summary(rows) + "\n"
    print(table if args.render else model_summary(rows))
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
