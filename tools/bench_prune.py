"""Wall time and peak memory to prune a model, next to the floor of merely loading and saving it.

    python tools/bench_prune.py [--model resnet50] [--exporter legacy] [--repeat 3]

Each measurement runs in a fresh process (so peak RSS is that step's own);
the figure is the median of --repeat runs. "prune" is `spa.prune` with the
magnitude criterion, without onnxruntime validation, plus saving the result;
"prune+validate" adds the checker, the onnxruntime runs and soft == hard;
"obspa" is the default: synthetic statistics, greedy OBS and compensation (no
validation). The figures spa is held to: a prune under 3x the load-and-save
floor, and obspa on ResNet-50 under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

STEP = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import onnx, spa, spa.formats.files
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if {step!r} == "load+save":
    onnx.save(onnx.load({path!r}), {out!r})
elif {step!r} == "obspa":
    result = spa.prune({path!r}, ratio=0.4, check=False)
else:
    result = spa.prune({path!r}, ratio=0.4, criterion="l2", check={step!r} == "prune+validate")
    spa.formats.files.save_model(result.model, {out!r})
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "peak_mb": peak / 1024, "growth_mb": (peak - base) / 1024}}))
"""


def measure(step: str, path: Path, out: Path) -> dict:
    code = STEP.format(root=str(ROOT), step=step, path=str(path), out=str(out))
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import zoo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--exporter", default="legacy", choices=zoo.EXPORTERS)
    parser.add_argument("--zoo", default=str(Path.home() / ".cache" / "spa" / "zoo-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    path = zoo.export(args.model, args.exporter, Path(args.zoo))
    out = Path(args.zoo) / "bench.out.onnx"
    size_mb = path.stat().st_size / 2**20
    print(f"{args.exporter}/{args.model}: {size_mb:.1f} MiB on disk")
    print("| step | seconds (median) | peak RSS MiB | RSS growth MiB |")
    print("|---|---|---|---|")
    results = {}
    for step in ("load+save", "prune", "prune+validate", "obspa"):
        runs = [measure(step, path, out) for _ in range(args.repeat)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[step] = med
        print(f"| {step} | {med['seconds']:.2f} | {med['peak_mb']:.0f} | {med['growth_mb']:.0f} |", flush=True)
    ratio = results["prune"]["seconds"] / results["load+save"]["seconds"]
    print(f"\nprune / load+save time: {ratio:.2f}x (target < 3x)")
    out.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
