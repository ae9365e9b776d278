"""Block Influence against random block removal: how far the outputs move, on held-out samples.

    python tools/depth_fidelity.py MODEL.onnx [--blocks 1 2] [--seeds 5] [--calib FILE.npz]

Without --calib, token-id prompts are drawn over the vocabulary (seeded) and saved to a scratch
.npz: the first half feed the scores, the second half measure. Prints, per number of blocks
removed, the relative error and mean cosine of each non-cache output (logits) for Block
Influence, l2, and the mean and worst of ``--seeds`` random removals.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

import spa
from spa.core import decoder


def _prompts(model: Path, samples: int, tokens: int, folder: Path) -> Path:
    proto = onnx.load(str(model), load_external_data=False)
    cache = decoder.layout(proto)
    vocab = (cache.vocab if cache else None) or 32
    ids = np.random.default_rng(0).integers(0, vocab, (samples, tokens)).astype(np.int64)
    path = folder / "prompts.npz"
    np.savez(path, input_ids=ids)
    return path


def _figures(model: Path, calib: Path, used: int, blocks: int, score: str, seed: int) -> tuple[float, float, list]:
    depth = spa.prune(
        model, remove_blocks=blocks, block_score=score, seed=seed, calib=calib, calib_samples=used
    ).report.depth
    outputs = depth["fidelity"]["outputs"]
    name = "logits" if "logits" in outputs else next(iter(outputs))
    return outputs[name]["relative_error"], outputs[name]["cosine"], [b["layer"] for b in depth["removed"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--calib", type=Path)
    parser.add_argument(
        "--samples", type=int, default=64, help="prompts made up without --calib (half score, half measure)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        calib = args.calib or _prompts(args.model, args.samples, 16, Path(scratch))
        used = args.samples // 2
        print(f"{args.model}: relative error / mean cosine of the logits on held-out samples")
        for blocks in args.blocks:
            for score in ("influence", "l2"):
                error, cosine, removed = _figures(args.model, calib, used, blocks, score, 0)
                print(f"  {blocks} block(s)  {score:<9}  {error:.4f} / {cosine:.4f}  layers {removed}")
            randoms = [_figures(args.model, calib, used, blocks, "random", seed) for seed in range(args.seeds)]
            errors = [r[0] for r in randoms]
            print(
                f"  {blocks} block(s)  random     mean {np.mean(errors):.4f} / {np.mean([r[1] for r in randoms]):.4f}, "
                f"worst {max(errors):.4f}, layers {[r[2] for r in randoms]}"
            )


if __name__ == "__main__":
    main()
