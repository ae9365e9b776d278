"""Which data-free Hessian source serves obspa best: the measurement behind spa's choice.

    python tools/hessian_sources.py [--models mnist_cnn mnist_rescnn ...] [--ratios 0.3]

Without data, obspa's Hessian (and the compensation that reuses it) comes from inputs spa makes
up and runs through the dense model. This script prunes the trained models of ``models/`` with
``obspa``, without and with compensation, swapping only that source, and prints the held-out
accuracy as "without / with":

- identity: no statistics at all (H = I; spa then skips compensation, it has nothing to fit);
- white N(0, 1) and white N(0, 0.25^2): independent pixels;
- 1/f, 1/f^2 and 1/f^3 noise: spatially smooth noise, standardised per sample;
- fixed input priors (``statistics.PRIORS``) drawn from the 1/f^2 field: a smooth image in
  [0, 1], ink strokes on a plain background;
- chosen per model (spa's default): the prior with the most even channel energies
  (``statistics.choose_prior``).

Non-image inputs (the digits MLP's 64 features) get standard normal noise under every
smooth-noise and prior row, so only the white and identity rows differ there.
"""

from __future__ import annotations

import argparse
import contextlib
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
from spa.scoring import statistics  # noqa: E402


def _source(kind: str, value: float):
    """A replacement for ``statistics.synthetic_feeds`` that draws image inputs another way."""

    def feeds(model, samples, seed, prior=None):
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


SMOOTH = statistics.SMOOTH_NOISE
# label: (replacement feeds or None, the prior forced or None for spa's own choice); None: identity
SOURCES = {
    "identity": None,
    "white N(0,1)": (_source("white", 1.0), SMOOTH),
    "white N(0,0.25^2)": (_source("white", 0.25), SMOOTH),
    "smooth noise, 1/f amplitude": (_source("smooth", 1.0), SMOOTH),
    "smooth noise, 1/f^2 amplitude": (None, SMOOTH),
    "smooth noise, 1/f^3 amplitude": (_source("smooth", 3.0), SMOOTH),
    "1/f^2 as a smooth image in [0,1]": (None, statistics.InputPrior(0.0, 1.0)),
    "1/f^2 as strokes, 25% ink 1 on 0": (None, statistics.InputPrior(0.0, 1.0, 0.25)),
    "1/f^2 as strokes, 25% ink -1 on 1": (None, statistics.InputPrior(-1.0, 1.0, 0.25, ink_high=False)),
    "prior chosen per model by channel balance (default)": (None, None),
}


def run(bench, source, ratio: float, compensate: bool, out: Path) -> float:
    patches = []
    if source is None:
        patches.append(mock.patch.object(spa.api, "_statistics", lambda *a, **k: None))
    else:
        feeds, prior = source
        if feeds is not None:
            patches.append(mock.patch.object(spa.api, "synthetic_feeds", feeds))
        if prior is not None:
            patches.append(mock.patch.object(spa.api, "choose_prior", lambda *a, **k: (prior, {})))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
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
            cells = [
                " / ".join(
                    "-" if source is None and comp else f"{run(benches[m], source, r, comp, out):.3f}"
                    for comp in (False, True)
                )
                for m, r in columns
            ]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
