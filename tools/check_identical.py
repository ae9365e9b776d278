"""Digest of what spa writes for the zoo, to show a refactor changed no output.

    python tools/check_identical.py --out before.json              # on the old tree
    python tools/check_identical.py --out after.json --compare before.json

Every cached zoo model (``tools/zoo.py``; build it first) and every model in
``models/`` is pruned with a magnitude criterion, global ranking and rounding;
models up to ``--heavy-bytes`` also with the default run (statistics, OBS scores,
refit) and soft pruning, and attention models with head_dim units. QDQ and
QOperator models quantized by onnxruntime from the shipped CNNs cover the
format codecs. Each run records the SHA-256 of the
serialized pruned model and the report's figures, or the error it ended in;
``--compare`` prints every run whose digest differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import spa  # noqa: E402

# every model
CONFIGS = {"l1-global-round8": dict(ratio=0.5, criterion="l1", global_rank=True, round_to=8)}
# models up to --heavy-bytes: the data-aware default (statistics, OBS scores, refit) is the slow part
HEAVY_CONFIGS = {"default": dict(ratio=0.4), "soft": dict(ratio=0.3, soft=True)}
ATTENTION_CONFIGS = {"head_dim": dict(ratio=0.25, attention="head_dim")}


def zoo_models(zoo: Path) -> list[Path]:
    return sorted(p for p in zoo.rglob("*.onnx") if not p.name.endswith(".data"))


def quantized_models(work: Path) -> list[Path]:
    """QDQ and QOperator forms of the shipped CNNs, quantized with seeded calibration data."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    made = []
    for name in ("mnist_cnn", "mini_resnet"):
        source = ROOT / "models" / f"{name}.onnx"
        model = onnx.load(source)
        inp = model.graph.input[0]
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        rng = np.random.default_rng(0)
        samples = [{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]

        class Reader(CalibrationDataReader):
            def __init__(self, samples=samples):
                self.items = iter(samples)

            def get_next(self):
                return next(self.items, None)

        for form in (QuantFormat.QDQ, QuantFormat.QOperator):
            out = work / f"{name}-{form.name.lower()}.onnx"
            if not out.exists():
                quantize_static(str(source), str(out), Reader(), quant_format=form)
            made.append(out)
    return made


def digest(path: Path, options: dict) -> dict:
    started = time.perf_counter()
    try:
        result = spa.prune(str(path), **options)
    except spa.SpaError as error:
        return {"error": f"{type(error).__name__}: {error}"}
    report = result.report
    return {
        "sha256": hashlib.sha256(result.model.SerializeToString()).hexdigest(),
        "params": [report.params_before, report.params_after],
        "groups": report.groups_prunable,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, default=None, help="the cached zoo folder (default: the tests' cache)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="an earlier digest file: print what differs")
    parser.add_argument("--only", default="", help="substring a model's path must contain")
    parser.add_argument(
        "--heavy-bytes",
        type=int,
        default=2_000_000,
        help="models up to this size also run the default and soft option sets",
    )
    args = parser.parse_args()
    if args.zoo is None:
        import torch

        args.zoo = Path.home() / ".cache" / "spa" / f"zoo-2-torch{torch.__version__.split('+')[0]}"
    work = Path(tempfile.gettempdir()) / "spa-identical"
    work.mkdir(exist_ok=True)
    models = zoo_models(args.zoo) + sorted((ROOT / "models").glob("*.onnx")) + quantized_models(work)
    models = [m for m in models if args.only in str(m)]
    results: dict[str, dict] = {}
    for path in models:
        key = str(path.relative_to(args.zoo)) if args.zoo in path.parents else path.name
        configs = dict(CONFIGS)
        if path.stat().st_size <= args.heavy_bytes:
            configs.update(HEAVY_CONFIGS)
        if "attention" in path.parts:
            configs.update(ATTENTION_CONFIGS)
        for config, options in configs.items():
            results[f"{key} {config}"] = outcome = digest(path, options)
            print(f"{key:50} {config:18} {outcome.get('sha256', outcome.get('error'))[:60]}", flush=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    differ = [
        k
        # with --only, the runs left out are not differences
        for k in sorted(set(results) if args.only else set(before) | set(results))
        if {x: v for x, v in before.get(k, {}).items() if x != "seconds"}
        != {x: v for x, v in results.get(k, {}).items() if x != "seconds"}
    ]
    for key in differ:
        print(f"DIFFERS {key}: {before.get(key)} -> {results.get(key)}")
    print(f"{len(results)} runs, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
