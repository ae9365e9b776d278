"""Does spa's fidelity figure (dense vs pruned outputs on held-out calibration samples) track accuracy?

    python tools/fidelity_check.py [--models mnist_cnn ...] [--ratios 0.3 0.5]

Prunes each trained model of ``models/`` with every criterion, with and without compensation,
given the model's 256 calibration samples (the first 128 feed the statistics, the other 128 are
held out for the fidelity figure). Prints per row the test accuracy, the report's held-out top-1
agreement and relative error, and the agreement on the 128 samples the statistics used; then per
model the Spearman rank correlation of test accuracy with each figure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from eval_accuracy import LOCAL, local_bench  # noqa: E402

import spa  # noqa: E402
from spa.verify import fidelity  # noqa: E402

CRITERIA = ("random", "l1", "obspa", "obs")


def spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(LOCAL))
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.3, 0.5])
    args = parser.parse_args(argv)
    print(
        "| model | ratio | criterion | compensation | test accuracy | held-out agreement | held-out rel. error "
        "| in-sample agreement |\n|---|---|---|---|---|---|---|---|"
    )
    summary = []
    for name in args.models:
        bench = local_bench(name)
        calib = dict(np.load(bench.calib))
        used = {k: v[:128] for k, v in calib.items()}
        rows = []
        for ratio in args.ratios:
            for criterion in CRITERIA:
                for compensate in (False, True):
                    result = spa.prune(
                        bench.model, ratio, criterion, calib=bench.calib, compensate=compensate, bench=False
                    )
                    held = result.report.validation.fidelity.outputs[0]
                    inside = fidelity.measure(onnx.load(bench.model), result.model, used, "in-sample").outputs[0]
                    with tempfile.TemporaryDirectory() as tmp:
                        path = Path(tmp) / "pruned.onnx"
                        onnx.save(result.model, path)
                        accuracy = bench.evaluate(path)
                    rows.append((accuracy, held.top1_agreement, held.relative_error, inside.top1_agreement))
                    print(
                        f"| {name} | {ratio:g} | {criterion} | {'on' if compensate else 'off'} | {accuracy:.3f} | "
                        f"{held.top1_agreement:.3f} | {held.relative_error:.3f} | {inside.top1_agreement:.3f} |",
                        flush=True,
                    )
        accuracy, agreement, error, inside = map(list, zip(*rows))
        summary.append(
            f"| {name} | {len(rows)} | {spearman(accuracy, agreement):.2f} | "
            f"{spearman(accuracy, [-e for e in error]):.2f} | {spearman(accuracy, inside):.2f} |"
        )
    print(
        "\nSpearman correlation of test accuracy with each figure:\n\n| model | prunes | held-out agreement "
        "| held-out -rel. error | in-sample agreement |\n|---|---|---|---|---|"
    )
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
