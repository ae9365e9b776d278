"""Accuracy at the same latency: latency-aware allocation against one ratio for every group.

    python tools/latency_accuracy.py [--models digits_mlp mnist_cnn ...] [--targets 0.7 0.5]
                                     [--criterion obspa] [--threads 1] [--out table.md]

For each trained model of ``models/`` (and all-MiniLM-L6-v2 when ``tools/accuracy_suites.py``
can build it), and each latency target, spa prunes twice with calibration data: once with
``--round-to 1`` (one ratio for every group, searched to the latency target) and once with the
default, where the width table orders the cuts by importance lost per millisecond saved. Both
are then re-timed against the dense model (alternating runs) and evaluated with the accuracy
benchmark's metric (``tools/eval_accuracy.py``). "same latency" compares the two at the
latency each measured: the comparison holds when the allocated model is no slower and keeps
at least the uniform model's metric.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import eval_accuracy  # noqa: E402

import spa  # noqa: E402
from spa.formats.export import export  # noqa: E402
from spa.verify.bench import bench  # noqa: E402

METHODS = (("uniform", {"round_to": 1}), ("latency-aware", {}))


def rows_for(name: str, targets, criterion: str, threads: int, runs: int, folder: Path) -> list[dict]:
    suite = eval_accuracy.local_bench(name) if name in eval_accuracy.LOCAL else eval_accuracy.external_bench(name)
    dense_metric = suite.evaluate(suite.model)
    dense_params = eval_accuracy.params(suite.model)
    rows = []
    for target in targets:
        for method, options in METHODS:
            result = spa.prune(
                suite.model,
                criterion=criterion,
                calib=suite.calib,
                target_latency=target,
                threads=threads,
                bench=False,
                **options,
            )
            out = folder / f"{name}.{method}.{target}.onnx"
            export(result.model, out, check=False)
            timed = bench([suite.model, out], threads=threads, runs=runs)
            metric = suite.evaluate(out)
            rows.append(
                {
                    "model": name,
                    "target": target,
                    "method": method,
                    "latency": 1 / timed.speedup,
                    "params": eval_accuracy.params(out) / dense_params,
                    "metric": metric,
                    "dense_metric": dense_metric,
                    "metric_name": suite.metric,
                }
            )
            print(
                f"{name:14} target {target:.2f} {method:14} latency {1 / timed.speedup:.3f}  "
                f"params {rows[-1]['params']:.3f}  {suite.metric} {metric:.4f} (dense {dense_metric:.4f})",
                file=sys.stderr,
                flush=True,
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | target | method | latency (of dense) | params kept | metric | dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target']:.2f} | {r['method']} | {r['latency']:.3f} | {r['params']:.1%} | "
            f"{r['metric_name']} {r['metric']:.4f} | {r['dense_metric']:.4f} |"
        )
    return "\n".join(lines)


def claims(rows: list[dict]) -> list[str]:
    """Per model and target: whether the latency-aware model keeps at least the uniform one's metric
    at no more latency (within the 5% two timings of one model differ by)."""
    out = []
    pairs = {}
    for r in rows:
        pairs.setdefault((r["model"], r["target"]), {})[r["method"]] = r
    held = 0
    for (model, target), pair in pairs.items():
        uniform, aware = pair["uniform"], pair["latency-aware"]
        better = aware["metric"] >= uniform["metric"] and aware["latency"] <= uniform["latency"] * 1.05
        held += better
        out.append(
            f"{model} at {target:.2f}: latency-aware {aware['metric']:.4f} at {aware['latency']:.3f} vs uniform "
            f"{uniform['metric']:.4f} at {uniform['latency']:.3f}: {'holds' if better else 'does not hold'}"
        )
    out.append(f"holds in {held} of {len(pairs)}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(eval_accuracy.LOCAL) + ["minilm"])
    parser.add_argument("--targets", nargs="*", type=float, default=[0.7, 0.5])
    parser.add_argument("--criterion", default="obspa")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            try:
                rows += rows_for(name, args.targets, args.criterion, args.threads, args.runs, Path(folder))
            except Exception as exc:  # a suite that cannot be built here (no wheel cache) is skipped, said
                print(f"{name}: skipped ({exc})", file=sys.stderr)
    text = table(rows) + "\n\n" + "\n".join(f"- {line}" for line in claims(rows))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
