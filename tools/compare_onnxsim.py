"""spa vs onnxsim 0.8.1's structured pruning on the zoo, at the same ratio.

    pip install onnxsim==0.8.1
    python tools/compare_onnxsim.py --ratio 0.4 [--out table.md] [names...]

For each zoo model and exporter, both tools prune at the same ratio; each
result is checked the same way (onnx full check, onnxruntime runs, same
input/output names and output shapes as the dense model) and its parameter
reduction is measured from the file. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import zoo  # noqa: E402

from spa.core.runtime import run, sample_inputs  # noqa: E402


def params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in (1, 10, 11, 16))


def check(dense: onnx.ModelProto, pruned: onnx.ModelProto, feeds) -> str:
    try:
        onnx.checker.check_model(pruned, full_check=True)
    except Exception as exc:
        return f"checker: {str(exc).splitlines()[0][:60]}"
    try:
        got = run(pruned, feeds)
    except Exception as exc:
        return f"ORT: {str(exc).splitlines()[0][:60]}"
    want = run(dense, feeds)
    if list(got) != list(want) or any(got[k].shape != want[k].shape for k in want):
        return "I/O differs"
    return "valid"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--zoo", default=str(Path.home() / ".cache" / "spa" / "zoo-cmp"))
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)
    from onnxsim import pruning as sim

    import spa

    rows = [
        "| model | exporter | spa | spa params | spa FLOPs | spa s | onnxsim | onnxsim params | onnxsim s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    spa_valid = sim_valid = total = 0
    for name in args.names or zoo.ALL:
        for exporter in zoo.EXPORTERS:
            path = zoo.export(name, exporter, Path(args.zoo))
            dense = spa.api.Model.load(path).model
            feeds = sample_inputs(dense)
            start = time.perf_counter()
            try:
                # magnitude against magnitude: onnxsim's apply_structured_pruning ranks by |W| too
                result = spa.prune(path, ratio=args.ratio, criterion="l2", compensate=False, check=False)
                ours, verdict = result.model, None
                report = result.report
            except Exception as exc:
                ours, verdict, report = None, f"error: {str(exc)[:50]}", None
            spa_s = time.perf_counter() - start
            verdict = verdict or check(dense, ours, feeds)
            start = time.perf_counter()
            try:
                theirs = sim.apply_structured_pruning(str(path), sparsity=args.ratio)
                sim_verdict = check(dense, theirs, feeds)
            except Exception as exc:
                theirs, sim_verdict = None, f"error: {str(exc).splitlines()[0][:50]}"
            sim_s = time.perf_counter() - start
            base = params(dense)
            ours_p = f"{1 - params(ours) / base:.1%}" if ours is not None else "-"
            ours_f = f"{1 - report.flops_after / report.flops_before:.1%}" if report else "-"
            theirs_p = f"{1 - params(theirs) / base:.1%}" if theirs is not None else "-"
            rows.append(
                f"| {name} | {exporter} | {verdict} | -{ours_p} | -{ours_f} | {spa_s:.1f} | "
                f"{sim_verdict} | -{theirs_p} | {sim_s:.1f} |"
            )
            print(rows[-1], flush=True)
            total += 1
            spa_valid += verdict == "valid"
            sim_valid += sim_verdict == "valid"
    summary = f"\nvalid: spa {spa_valid}/{total}, onnxsim {sim_valid}/{total} (ratio {args.ratio})"
    table = "\n".join(rows) + "\n" + summary + "\n"
    print(summary)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
