"""Write the result tables of the docs from the measured rows in tools/results/*.json.

    python tools/render_results.py            # rewrite the generated parts of docs/
    python tools/render_results.py --check    # exit 1 when a page is out of date

A page asks for a table with a pair of HTML comments; everything between them is replaced and
everything around them (the narrative) is left as written:

    <!-- generated: accuracy-table -->
    ...
    <!-- end generated -->

The rows come from ``tools/eval_accuracy.py --json`` and ``tools/model_table.py --json``. The
tables are rendered here from the JSON alone, without importing spa or the tools that measured
them, so the pages can be rebuilt on any machine that has the rows. Those two tools print their
tables with the functions here too, so a table reads the same in a terminal and in the docs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "results"
DOCS = ROOT / "docs"

# the ratios the tally is stated at; rows at other ratios (ppocr_rec at 0.1) are shown but not tallied
TALLY_RATIOS = (0.2, 0.3, 0.5)
REGION = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def latest_accuracy_rows(rows: list[dict]) -> list[dict]:
    """One row per model, method, ratio and compensation setting: a later row replaces an earlier
    one (a case measured again), in the place the case first had."""
    keyed = {(r["model"], r["method"], r["ratio"], r["compensate"]): r for r in rows}
    return list(keyed.values())


def _accuracy_rows(results: Path) -> list[dict]:
    return latest_accuracy_rows(json.loads((results / "accuracy.json").read_text()))


def accuracy_table(results: Path) -> str:
    return accuracy_pivot(_accuracy_rows(results))


def accuracy_tally(results: Path) -> str:
    return "\n".join(accuracy_claims(_accuracy_rows(results)))


def accuracy_pivot(rows: list[dict]) -> str:
    """One line per model and ratio, one column per criterion and compensation setting."""
    columns = list(dict.fromkeys((r["method"], r["compensate"]) for r in rows if r["method"] != "dense"))
    label = {None: "", False: " off", True: " on"}
    lines = [
        "| model | ratio | params kept | dense | " + " | ".join(f"{m}{label[c]}" for m, c in columns) + " |",
        "|" + "---|" * (4 + len(columns)),
    ]
    dense = {r["model"]: r["metric"] for r in rows if r["method"] == "dense"}
    models = list(dict.fromkeys(r["model"] for r in rows))
    cases = sorted(
        {(r["model"], r["ratio"]) for r in rows if r["method"] != "dense"}, key=lambda c: (models.index(c[0]), c[1])
    )
    for model, ratio in cases:
        here = {(r["method"], r["compensate"]): r for r in rows if (r["model"], r["ratio"]) == (model, ratio)}
        kept = next((r["params_kept"] for (m, _), r in here.items() if m != "onnxsim-wanda"), float("nan"))
        best = max(
            (r["metric"] for r in here.values() if _finite(r["metric"]) and r["method"] != "onnxsim-wanda"),
            default=None,
        )
        cells = []
        for key in columns:
            r = here.get(key)
            if r is None or not _finite(r["metric"]):
                cells.append("-")
                continue
            text = f"{r['metric']:.3f}"
            # the peer is searched to spa's parameter count; where it could not get there, say how far it got
            if key[0] == "onnxsim-wanda" and abs(r["params_kept"] - kept) > 0.02:
                text += f" ({r['params_kept']:.0%} kept)"
            cells.append(f"**{text}**" if r["metric"] == best else text)
        lines.append(
            f"| {model} | {ratio:g} | {kept:.1%} | {dense.get(model, float('nan')):.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def accuracy_claims(rows: list[dict]) -> list[str]:
    """How often each comparison holds over the rows at the tallied ratios, one line per claim;
    ``rows`` as ``latest_accuracy_rows`` leaves them."""
    by_case = {(r["model"], r["method"], r["ratio"], r["compensate"]): r for r in rows}

    def metric(model, method, ratio, comp):
        r = by_case.get((model, method, ratio, comp))
        return r["metric"] if r and _finite(r["metric"]) else None

    def error_of(model, method, ratio, comp):
        r = by_case.get((model, method, ratio, comp))
        return r.get("output_error") if r else None

    def kept_of(model, method, ratio):
        found = [r["params_kept"] for r in rows if (r["model"], r["method"], r["ratio"]) == (model, method, ratio)]
        return found[0] if found else float("nan")

    tallies: dict[str, list[int]] = {}

    def tally(claim, held):
        entry = tallies.setdefault(claim, [0, 0])
        entry[0] += bool(held)
        entry[1] += 1

    cases = sorted({(r["model"], r["ratio"]) for r in rows if r["method"] != "dense" and r["ratio"] in TALLY_RATIOS})
    for model, ratio in cases:
        # what `spa prune --criterion X` does without data: obspa compensates (with synthetic
        # statistics), magnitude and random criteria do not
        ob = metric(model, "obspa", ratio, True)
        for rival in ("l1", "random"):
            other = metric(model, rival, ratio, False)
            if ob is not None and other is not None:
                tally(f"obspa beats {rival}, each as spa runs it without data", ob > other)
        for comp in (False, True):
            ob = metric(model, "obspa", ratio, comp)
            for rival in ("l1", "random"):
                other = metric(model, rival, ratio, comp)
                if ob is not None and other is not None:
                    tally(f"obspa beats {rival} (compensation {'on' if comp else 'off'})", ob > other)
        obs_on, obspa_on = metric(model, "obs", ratio, True), metric(model, "obspa", ratio, True)
        if obs_on is not None and obspa_on is not None:
            tally("obs + compensation beats obspa + compensation", obs_on > obspa_on)
        obs_error, obspa_error = error_of(model, "obs", ratio, True), error_of(model, "obspa", ratio, True)
        if obs_error is not None and obspa_error is not None:
            tally(
                "obs + compensation keeps the outputs closer to dense than obspa + compensation "
                "(relative error on held-out calibration samples)",
                obs_error < obspa_error,
            )
        for method in ("random", "l1", "l2", "obspa", "obs", "activation", "fluctuation"):
            on, off = metric(model, method, ratio, True), metric(model, method, ratio, False)
            if on is not None and off is not None:
                tally("compensation beats no compensation", on > off)
        sim = metric(model, "onnxsim-wanda", ratio, None)
        best = [
            m
            for m in (
                metric(model, c, ratio, comp) for c in ("obs", "activation", "fluctuation") for comp in (False, True)
            )
            if m is not None
        ]
        if sim is not None and best:
            if abs(kept_of(model, "onnxsim-wanda", ratio) - kept_of(model, "obs", ratio)) > 0.02:
                tally("onnxsim structured Wanda could not reach spa's parameter reduction (not compared)", True)
            else:
                tally("spa's best data-driven criterion beats onnxsim structured Wanda", max(best) > sim)
    return [f"- {claim}: {held}/{total}" for claim, (held, total) in tallies.items()]


def count_text(n) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def delta_text(before, after) -> str:
    if before is None or after is None:
        return "-"
    return f"{count_text(after)} ({100 * (after / before - 1):+.0f}%)"


def heads_text(heads: list[dict]) -> str:
    if not heads:
        return "-"
    counts = Counter((h["heads"], h["heads_after"], h["head_dim"], bool(h["frozen"])) for h in heads)
    return ", ".join(f"{n}x {b}->{a} (hd {d}){' frozen' if f else ''}" for (b, a, d, f), n in counts.items())


def _peer_cells(peer: dict | None, spa_row: dict) -> str:
    if peer is None:
        return "| - | - | - |"
    # FLOPs are counted on inferred shapes, which an invalid model does not have
    flops = delta_text(spa_row.get("flops_before"), peer.get("flops_after")) if peer["verdict"] == "valid" else "-"
    return (
        f"| {peer['verdict']} | {delta_text(spa_row.get('params_before'), peer.get('params_after'))} / "
        f"{flops} | {peer['seconds']:.0f} |"
    )


MODEL_TABLE_HEADER = (
    "| model | exporter | params / FLOPs dense | spa | spa params / FLOPs | soft==hard err | heads per layer "
    "(count before->after, head_dim) | FFN pruned/found | other groups pruned | spa s | "
    "onnxsim structured | params / FLOPs | s | onnxsim wanda | params / FLOPs | s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def model_row(row: dict) -> str:
    """A model's line of the model table, from its row as ``tools/model_table.py`` measured it."""
    head = f"| {row['model']} | {row['exporter']}{' (dyn)' if row.get('dynamic') else ''} "
    if "not_built" in row:
        return head + f"| {row['not_built']} |" + " |" * 13
    s = row["spa"]
    if "params_before" not in s:
        return (
            head
            + f"| - | {s['verdict']} | - | - | - | - | - | {s['seconds']:.0f} "
            + _peer_cells(row.get("onnxsim"), s)
            + _peer_cells(row.get("onnxsim_wanda"), s)[1:]
        )
    err = "-" if s["soft_equal"] is None else f"{s['soft_max_rel_error']:.1e}"
    return (
        head + f"| {count_text(s['params_before'])} / {count_text(s['flops_before'])} | {s['verdict']} | "
        f"{delta_text(s['params_before'], s['params_after'])} / {delta_text(s['flops_before'], s['flops_after'])} | "
        f"{err} | {heads_text(s['heads'])} | {s['ffn_pruned']}/{s['ffn_found']} | "
        f"{s['other_pruned']}/{s['other_prunable']} | {s['seconds']:.0f} "
        + _peer_cells(row.get("onnxsim"), s)
        + _peer_cells(row.get("onnxsim_wanda"), s)[1:]
    )


def model_summary(rows: list[dict]) -> str:
    """How many models each pruner made valid, and smaller."""
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


def model_table(results: Path) -> str:
    # the rows stay in the order model_table.py measured and stored them
    rows = json.loads((results / "model_table.json").read_text())
    return MODEL_TABLE_HEADER + "\n" + "\n".join(model_row(r) for r in rows) + "\n\n" + model_summary(rows)


TABLES = {"accuracy-table": accuracy_table, "accuracy-tally": accuracy_tally, "model-table": model_table}


def render_page(text: str, results: Path) -> str:
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"unknown generated table '{name}' (known: {', '.join(TABLES)})")
        return match[1] + "\n" + TABLES[name](results) + "\n\n" + match[4]

    return REGION.sub(fill, text)


def render(docs: Path = DOCS, results: Path = RESULTS, check: bool = False) -> list[Path]:
    """Fill every generated region under ``docs``; returns the pages that changed (or would)."""
    changed = []
    for page in sorted(docs.rglob("*.md")):
        text = page.read_text()
        new = render_page(text, results)
        if new != text:
            changed.append(page)
            if not check:
                page.write_text(new)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder to fill (default: docs/)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON rows are")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page is out of date")
    args = parser.parse_args(argv)
    changed = render(args.docs, args.results, args.check)
    for page in changed:
        print(f"{'out of date' if args.check else 'rewrote'}: {page}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
