"""The model table of issue #3: spa next to onnxsim 0.8.1's structured pruning, at one ratio.

    pip install onnxsim==0.8.1
    python tools/model_table.py [--ratio 0.3] [--json out.json] [--out table.md] [--no-onnxsim] [names...]

Models and where they come from: tools/table_models.py (exported once under
~/.cache/spa/models-table/, then reused). Every model is pruned by
``spa.prune(criterion="l2", compensate=False)``: weight magnitude against onnxsim's weight
magnitude (``apply_structured_pruning`` ranks by L2 norm too), and fast on full-size models.
spa's own validation runs (checker, onnxruntime, I/O, soft == hard for exact groups, and for
dynamic models batch 2 and batch 3 x sequence 7). onnxsim's ``apply_structured_pruning`` and
``apply_structured_wanda_pruning`` (calibrated on 8 synthetic inputs from
spa.verify.validate.sample_inputs: random normal floats, ones for masks, zeros for other integers) run on the same file at the same ratio. All three outputs then get the same check
(tools/compare_onnxsim.check: full onnx check, onnxruntime runs, same output names and shapes
as the dense model), at every input size spa validates at. Models are run one at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import table_models  # noqa: E402
from compare_onnxsim import check  # noqa: E402

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


def _heads_text(heads: list[dict]) -> str:
    if not heads:
        return "-"
    counts = Counter((h["heads"], h["heads_after"], h["head_dim"], bool(h["frozen"])) for h in heads)
    parts = [f"{n}x {b}->{a} (hd {d}){' frozen' if f else ''}" for (b, a, d, f), n in counts.items()]
    return ", ".join(parts)


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


def _count(n) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _delta(before, after) -> str:
    if before is None or after is None:
        return "-"
    return f"{_count(after)} ({100 * (after / before - 1):+.0f}%)"


def _sim_cells(sim: dict | None, spa_row: dict) -> str:
    if sim is None:
        return "| - | - | - |"
    # FLOPs are counted on inferred shapes, which an invalid model does not have
    flops = _delta(spa_row.get("flops_before"), sim.get("flops_after")) if sim["verdict"] == "valid" else "-"
    return (
        f"| {sim['verdict']} | {_delta(spa_row.get('params_before'), sim.get('params_after'))} / "
        f"{flops} | {sim['seconds']:.0f} |"
    )


HEADER = (
    "| model | exporter | params / FLOPs dense | spa | spa params / FLOPs | soft==hard err | heads per layer "
    "(count before->after, head_dim) | FFN pruned/found | other groups pruned | spa s | "
    "onnxsim structured | params / FLOPs | s | onnxsim wanda | params / FLOPs | s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(row: dict) -> str:
    head = f"| {row['model']} | {row['exporter']}{' (dyn)' if row.get('dynamic') else ''} "
    if "not_built" in row:
        return head + f"| {row['not_built']} |" + " |" * 13
    s = row["spa"]
    if "params_before" not in s:
        return (
            head
            + f"| - | {s['verdict']} | - | - | - | - | - | {s['seconds']:.0f} "
            + _sim_cells(row.get("onnxsim"), s)
            + _sim_cells(row.get("onnxsim_wanda"), s)[1:]
        )
    err = "-" if s["soft_equal"] is None else f"{s['soft_max_rel_error']:.1e}"
    return (
        head + f"| {_count(s['params_before'])} / {_count(s['flops_before'])} | {s['verdict']} | "
        f"{_delta(s['params_before'], s['params_after'])} / {_delta(s['flops_before'], s['flops_after'])} | "
        f"{err} | {_heads_text(s['heads'])} | {s['ffn_pruned']}/{s['ffn_found']} | "
        f"{s['other_pruned']}/{s['other_prunable']} | {s['seconds']:.0f} "
        + _sim_cells(row.get("onnxsim"), s)
        + _sim_cells(row.get("onnxsim_wanda"), s)[1:]
    )


def summary(rows: list[dict]) -> str:
    built = [r for r in rows if "spa" in r]

    def tally(key: str) -> str:
        done = [r[key] for r in built if key in r]
        valid = [x for x in done if x["verdict"] == "valid"]
        if key == "spa":
            smaller = [x for x in valid if x["params_after"] < x["params_before"]]
        else:
            before = {id(r[key]): r["spa"].get("params_before") for r in built if key in r}
            smaller = [
                x for x in valid if x.get("params_after") and before[id(x)] and x["params_after"] < before[id(x)]
            ]
        return f"{key} {len(valid)}/{len(done)} valid ({len(smaller)} of them smaller)"

    return (
        "; ".join(tally(k) for k in ("spa", "onnxsim", "onnxsim_wanda"))
        + f"; {len(rows) - len(built)} models not built"
    )


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
        print(HEADER, flush=True)
    for name, exporter in entries:
        row = measure(name, exporter, args.ratio, not args.no_onnxsim)
        rows = [r for r in rows if (r["model"], r["exporter"]) != (name, exporter)] + [row]
        print(markdown(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))
    order = {key: i for i, key in enumerate(table_models.ENTRIES)}
    rows.sort(key=lambda r: order.get((r["model"], r["exporter"]), len(order)))
    table = HEADER + "\n" + "\n".join(markdown(r) for r in rows) + "\n\n" + summary(rows) + "\n"
    print(table if args.render else summary(rows))
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
