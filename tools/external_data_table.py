"""Prune torchvision models exported the default way (weights in external data) and inlined,
and show that both take the same pipeline and give the same pruned weights.

    python tools/external_data_table.py [--ratio 0.3] [--models resnet18,...] [--dir DIR]

Each model is built with random weights (no download), exported with
``torch.onnx.export(model, (x,), path)`` and nothing else (torch 2.13 writes ``path.data``),
and saved again with its weights inline. ``spa prune PATH --ratio R`` runs on both in fresh
processes; the table gives, for the external-data model, where its statistics came from, how
many layers were compensated, its latency figure, and whether its pruned weights are equal,
bit for bit, to those of the inline copy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0"]


def export(name: str, folder: Path) -> tuple[Path, Path]:
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    from zoo import import_torchvision

    torchvision = import_torchvision()
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    path = folder / f"{name}.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path))
    inline = folder / f"{name}.inline.onnx"
    onnx.save(onnx.load(str(path)), str(inline))
    return path, inline


def prune(path: Path, ratio: float) -> tuple[dict, dict[str, np.ndarray], float]:
    out, report = path.with_suffix(".pruned.onnx"), path.with_suffix(".json")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "spa", "prune", str(path), "--ratio", str(ratio), "-o", str(out), "--json", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{path}: spa prune exited {done.returncode}: {done.stderr.strip()}")
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    return json.loads(report.read_text()), weights, seconds


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def row(name: str, folder: Path, ratio: float) -> str:
    external, inline = export(name, folder)
    report, weights, seconds = prune(external, ratio)
    _, inline_weights, inline_seconds = prune(inline, ratio)
    stats = report.get("statistics") or {}
    compensation = report.get("compensation") or {}
    latency = (report.get("validation") or {}).get("latency") or []
    speed = f"{latency[0]['dense_ms']:.1f} -> {latency[0]['pruned_ms']:.1f} ms" if latency else "not timed"
    data = "yes" if external.with_name(external.name + ".data").exists() else "no"
    return (
        f"| {name} | {data} | {stats.get('source', 'none')} | {compensation.get('layers', 0)} | {speed} | "
        f"{'equal' if same(weights, inline_weights) else 'DIFFER'} | {seconds:.0f} s / {inline_seconds:.0f} s |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dir", help="where to export (default: a temporary folder)")
    args = parser.parse_args(argv)
    print(f"spa prune PATH --ratio {args.ratio}, PATH exported by torch.onnx.export(model, (x,), PATH)\n")
    print("| model | external data | statistics | refitted layers | latency | weights vs inline | time ext / inline |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            print(row(name, folder, args.ratio), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
