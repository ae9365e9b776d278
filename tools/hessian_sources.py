"""Which data-free Hessian source serves obspa best: the measurement behind spa's choice.

    python tools/hessian_sources.py [--models mnist_cnn mnist_rescnn ...] [--ratios 0.3]

Without data, obspa's Hessian (and the compensation that reuses it) comes from inputs spa makes
up and runs through the dense model. This script prunes the trained models of ``models/`` with
``obspa``, without and with compensation, swapping only that source, and prints the held-out
accuracy as "without / with":

- identity: no statistics at all (H = I; spa then skips compensation, it has nothing to fit);
- white N(0, 1) and white N(0, 0.25^2): independent pixels;
- 1/f, 1/f^2 (spa's default) and 1/f^3 noise: spatially smooth noise, standardised per sample.

Non-image inputs (the digits MLP's 64 features) get standard normal noise under every
smooth-noise row, so only the white and identity rows differ there.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import eval_accuracy  # noqa: E402
import spa.api  # noqa: E402
from spa import statistics  # noqa: E402


def _source(kind: str, value: float):
    """A replacement for ``statistics.synthetic_feeds`` that draws image inputs another way."""
    def feeds(model, samples, seed):
        out = statistics.synthetic_feeds(model, samples, seed)
        rng = np.random.default_rng([seed, 11])
        for name, array in out.items():
            if array.dtype.kind != "f":
                continue
            spatial = statistics._spatial_axes(list(array.shape))
            if kind == "white":
                out[name] = (value * rng.standard_normal(array.shape)).astype(array.dtype)
            elif spatial:
                out[name] = statistics._smooth_noise(rng, list(array.shape), spatial, value).astype(array.dtype)
        return out
    return feeds


SOURCES = {
    "identity": None,
    "white N(0,1)": ("white", 1.0),
    "white N(0,0.25^2)": ("white", 0.25),
    "1/f": ("smooth", 1.0),
    "1/f^2 (default)": ("smooth", 2.0),
    "1/f^3": ("smooth", 3.0),
}


def run(bench, source, ratio: float, compensate: bool, out: Path) -> float:
    if source is None:
        patch = mock.patch.object(spa.api, "_statistics", lambda *a, **k: None)
    else:
        patch = mock.patch.object(spa.api, "synthetic_feeds", _source(*source))
    with patch:
        eval_accuracy.run_spa(bench, "obspa", ratio, compensate, 128, out)
    return bench.evaluate(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(eval_accuracy.LOCAL))
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.3])
    args = parser.parse_args(argv)
    columns = [(m, r) for m in args.models for r in args.ratios]
    print("| source | " + " | ".join(f"{m} {r:g}" for m, r in columns) + " |")
    print("|---|" + "---|" * len(columns))
    benches = {m: eval_accuracy.local_bench(m) for m in args.models}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        dense = [f"{benches[m].evaluate(benches[m].model):.3f}" for m, _ in columns]
        print("| dense | " + " | ".join(dense) + " |", flush=True)
        for label, source in SOURCES.items():
            cells = [" / ".join("-" if source is None and comp else f"{run(benches[m], source, r, comp, out):.3f}"
                                for comp in (False, True)) for m, r in columns]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
