"""Block Influence against random block removal: how far the outputs move, on held-out samples.

    python tools/depth_fidelity.py MODEL.onnx [--blocks 1 2] [--seeds 5] [--calib FILE.npz] [--test FILE.npz]

Without --calib, token-id prompts are drawn over the vocabulary (seeded) and saved to a scratch
.npz: the first half feed the scores, the second half measure. Prints, per number of blocks
removed, the relative error and mean cosine of each non-cache output (logits) for Block
Influence, l2, and the mean and worst of ``--seeds`` random removals. ``--test`` (an .npz of
the model's input and ``label``) adds the top-1 accuracy of each pruned model on it;
``--heldout`` (a flat stream of token ids, .npy) adds the perplexity of each pruned decoder on
``--windows`` windows of ``--length`` tokens, each fed as a prompt.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

import spa
from spa.core import decoder
from spa.core.runtime import batches, outputs_of, run, session


def _prompts(model: Path, samples: int, tokens: int, folder: Path) -> Path:
    proto = onnx.load(str(model), load_external_data=False)
    cache = decoder.layout(proto)
    vocab = (cache.vocab if cache else None) or 32
    ids = np.random.default_rng(0).integers(0, vocab, (samples, tokens)).astype(np.int64)
    path = folder / "prompts.npz"
    np.savez(path, input_ids=ids)
    return path


def _figures(model: Path, calib: Path, used: int, blocks: int, score: str, seed: int, test) -> tuple:
    result = spa.prune(model, remove_blocks=blocks, block_score=score, seed=seed, calib=calib, calib_samples=used)
    depth = result.report.depth
    outputs = depth["fidelity"]["outputs"]
    name = "logits" if "logits" in outputs else next(iter(outputs))
    removed = [b["layer"] if b["layer"] is not None else b["name"] for b in depth["removed"]]
    return outputs[name]["relative_error"], outputs[name]["cosine"], removed, _accuracy(result.model, test)


def _perplexity(model: onnx.ModelProto, windows: np.ndarray) -> float:
    sess = session(model)
    losses = []
    for feed in batches(model, {"input_ids": windows}, batch=4):
        logits = outputs_of(sess, feed)["logits"].astype(np.float64)
        ids = feed["input_ids"]
        shifted = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        losses.append(-np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0])
    return float(np.exp(np.mean(np.concatenate(losses))))


def _accuracy(model: onnx.ModelProto, test) -> float | None:
    if test is None:
        return None
    if isinstance(test, np.ndarray):  # held-out token windows: perplexity
        return _perplexity(model, test)
    data = dict(np.load(test))
    labels = data.pop("label")
    scores = run(model, data)
    return float(np.mean(next(iter(scores.values())).argmax(-1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--test", type=Path, help="an .npz of the model's input and 'label': top-1 accuracy")
    parser.add_argument("--heldout", type=Path, help="a flat stream of token ids (.npy): perplexity")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument(
        "--samples", type=int, default=64, help="prompts made up without --calib (half score, half measure)"
    )
    args = parser.parse_args()
    if args.heldout:
        stream = np.load(args.heldout).astype(np.int64)
        count = min(args.windows, len(stream) // args.length)
        args.test = stream[: count * args.length].reshape(count, args.length)
    with tempfile.TemporaryDirectory() as scratch:
        calib = args.calib or _prompts(args.model, args.samples, 16, Path(scratch))
        used = args.samples // 2
        print(f"{args.model}: relative error / mean cosine of the logits on held-out samples")
        if args.test is not None:
            measure = "perplexity" if args.heldout else "accuracy"
            print(f"  dense {measure} {_accuracy(onnx.load(str(args.model)), args.test):.4f}")
        for blocks in args.blocks:
            for score in ("influence", "l2"):
                error, cosine, removed, accuracy = _figures(args.model, calib, used, blocks, score, 0, args.test)
                print(
                    f"  {blocks} block(s)  {score:<9}  {error:.4f} / {cosine:.4f}{_shown(accuracy)}  removed {removed}"
                )
            randoms = [
                _figures(args.model, calib, used, blocks, "random", seed, args.test) for seed in range(args.seeds)
            ]
            errors = [r[0] for r in randoms]
            accuracies = [r[3] for r in randoms if r[3] is not None]
            print(
                f"  {blocks} block(s)  random     mean {np.mean(errors):.4f} / {np.mean([r[1] for r in randoms]):.4f}"
                f"{_shown(float(np.mean(accuracies)) if accuracies else None)}, worst {max(errors):.4f}, "
                f"removed {[r[2] for r in randoms]}"
            )


def _shown(accuracy: float | None) -> str:
    return f", accuracy or perplexity {accuracy:.4f}" if accuracy is not None else ""


if __name__ == "__main__":
    main()
