"""Wall time of `spa sweep` on each backend, the overhead Ray adds per point, and whether the
backends agree on every figure but the timings.

    python tools/bench_sweep.py [--out DIR] [--no-ray]

1. A 12-point sweep of ResNet-50 (torchvision's, random weights, exported once by
   tools/bench_latency.py into ~/.cache/spa/bench-latency) with random calibration images (cached in
   ~/.cache/spa/sweep-bench) for fidelity: ratios 0.1 to 0.6, criteria l1 and l2, no compensation,
   channel counts at multiples of 8. Run in-process (--jobs 1), in 2 local processes (--jobs 2)
   and on a local Ray instance (--ray), each as its own `spa sweep` process: the wall time is the
   whole command, start-up included.
2. Ray's overhead per point: sweeps of trivially cheap points (models/digits_mlp.onnx) of 12 and 24
   points, in-process and on Ray. The slope between the two sizes is the cost of one more point;
   the rest is Ray's start-up.
3. The JSON of each backend compared, timings (dense_ms, pruned_ms, speedup, seconds) left out.

Timings depend on the machine and its load: the script prints `uptime` before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
CACHE = Path.home() / ".cache" / "spa" / "sweep-bench"
TIMED = {"dense_ms", "pruned_ms", "speedup", "seconds"}
RESNET_GRID = ["--ratios", "0.1:0.6:0.1", "--criteria", "l1,l2", "--compensate", "off", "--round-to", "8"]
BACKENDS = {"in-process": ["--jobs", "1"], "2 processes": ["--jobs", "2"], "Ray (local)": ["--ray"]}
TINY = ROOT / "models" / "digits_mlp.onnx"
TINY_CALIB = ROOT / "models" / "data" / "digits_calib.npz"


def resnet50() -> tuple[Path, Path]:
    from bench_latency import export

    model = export("resnet50")
    calib = CACHE / "resnet50_calib.npz"
    if not calib.exists():  # 8 images for nothing (l1/l2 read no statistics), 16 held out for fidelity
        CACHE.mkdir(parents=True, exist_ok=True)
        images = np.random.default_rng(0).standard_normal((24, 3, 224, 224)).astype(np.float32)
        np.savez(calib, image=images)
    return model, calib


def sweep(model: Path, args: list[str], out: Path) -> float:
    """Seconds the whole `spa sweep` command took."""
    command = [sys.executable, "-m", "spa", "sweep", str(model), *args, "--json", str(out), "-q"]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start


def untimed(path: Path) -> list[dict]:
    return [{k: v for k, v in p.items() if k not in TIMED} for p in json.loads(path.read_text())["points"]]


def differences(reference: list[dict], other: list[dict]) -> list[str]:
    found = []
    for a, b in zip(reference, other, strict=True):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                found.append(f"{a['command'].split(' --criterion')[0][-12:]}... {key}: {a.get(key)} != {b.get(key)}")
    return found


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Keep each sweep's JSON here [a temporary folder].")
    parser.add_argument("--no-ray", action="store_true", help="Leave Ray out.")
    options = parser.parse_args()
    out = options.out or Path(tempfile.mkdtemp(prefix="spa-bench-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    backends = {k: v for k, v in BACKENDS.items() if not (options.no_ray and "--ray" in v)}
    print(f"before: {uptime()}  ({os.cpu_count()} cores)")

    model, calib = resnet50()
    grid = [*RESNET_GRID, "--calib", str(calib), "--calib-samples", "8"]
    walls, results = {}, {}
    for name, args in backends.items():
        path = out / f"resnet50.{args[-1].lstrip('-')}.json"
        path.unlink(missing_ok=True)  # a fresh sweep, not a resumed one
        walls[name] = sweep(model, [*grid, *args], path)
        results[name] = path
        points = json.loads(path.read_text())["points"]
        inside = sum(p["seconds"] for p in points)
        failed = sum(p["status"] != "ok" for p in points)
        print(
            f"ResNet-50, {len(points)} points, {name:12s}: {walls[name]:6.1f} s wall "
            f"({walls[name] / len(points):.1f} s a point; points' own time {inside:.1f} s; {failed} failed)"
        )
    reference = untimed(results["in-process"])
    for name, path in results.items():
        if name != "in-process":
            diff = differences(reference, untimed(path))
            print(f"{name} vs in-process, timings aside: {'identical' if not diff else f'{len(diff)} differences'}")
            for line in diff[:10]:
                print(f"    {line}")

    if not options.no_ray:
        tiny = {}
        for count, ratios in ((12, "0.05:0.6:0.05"), (24, "0.025:0.6:0.025")):
            for name, args in (("in-process", ["--jobs", "1"]), ("Ray (local)", ["--ray"])):
                path = out / f"tiny.{count}.{args[-1].lstrip('-')}.json"
                path.unlink(missing_ok=True)
                tiny_grid = ["--ratios", ratios, "--criteria", "l2", "--compensate", "off", "--round-to", "1"]
                tiny[count, name] = sweep(TINY, [*tiny_grid, "--calib", str(TINY_CALIB), *args], path)
                print(f"digits_mlp, {count} points, {name:12s}: {tiny[count, name]:5.1f} s wall")
        slope = {name: (tiny[24, name] - tiny[12, name]) / 12 for name in ("in-process", "Ray (local)")}
        fixed = (tiny[12, "Ray (local)"] - 12 * slope["Ray (local)"]) - (
            tiny[12, "in-process"] - 12 * slope["in-process"]
        )
        print(
            f"one more cheap point: {slope['in-process']:.2f} s in-process, {slope['Ray (local)']:.2f} s on Ray "
            f"(2 tasks at once): Ray adds {slope['Ray (local)'] - slope['in-process']:+.2f} s a point, "
            f"and {fixed:.1f} s once (start-up, shutdown)"
        )
    print(f"after: {uptime()}")
    print(f"JSON in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
