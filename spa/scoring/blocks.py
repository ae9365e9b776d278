"""Scores of residual blocks: the lowest goes first.

- ``influence``: Block Influence (ShortGPT), 1 - the mean over positions of cos(block input,
  block output), each position's vector along the channel axis (the last axis of a
  transformer's [batch, tokens, hidden], axis 1 of an image's [N, C, H, W]). A block whose output
  is nearly its input changes little when it goes.
- ``l2``: the size of the block's residual contribution, ||y - x|| / ||x|| over all positions.
- ``random``: uniform, seeded.
"""

from __future__ import annotations

import numpy as np
import onnx

from spa.analysis.blocks import TRANSFORMER_KINDS, Block
from spa.core import runlimit
from spa.core.runtime import batches, session
from spa.scoring.statistics import exposing

BLOCK_SCORES = ("influence", "l2", "random")


def score_blocks(
    model: onnx.ModelProto,
    blocks: list[Block],
    score: str,
    feeds: dict[str, np.ndarray] | None,
    seed: int = 0,
    custom_ops: tuple[str, ...] = (),
) -> dict[int, float]:
    """Block index -> score, for each of ``blocks``; ``feeds`` are named sample arrays (unused by ``random``)."""
    if score == "random":
        draws = np.random.default_rng([seed, 29]).random(len(blocks))
        return {b.index: float(d) for b, d in zip(blocks, draws)}
    if score not in BLOCK_SCORES:
        raise ValueError(f"unknown block score {score}")
    assert feeds is not None
    tensors = list(dict.fromkeys(t for b in blocks for t in (b.input, b.exit.skip, b.exit.branch)))
    run = session(exposing(model, tensors), custom_ops=custom_ops)
    cosines: dict[int, list[np.ndarray]] = {b.index: [] for b in blocks}
    moved = {b.index: 0.0 for b in blocks}
    size = {b.index: 0.0 for b in blocks}
    for feed in batches(model, feeds):
        values = dict(zip(tensors, runlimit.run(run, tensors, feed)))
        for block in blocks:
            x = values[block.input].astype(np.float64)
            y = values[block.exit.skip].astype(np.float64) + values[block.exit.branch]
            if block.post is not None:
                y = np.maximum(y, 0.0)
            if x.shape != y.shape or x.size == 0:
                continue
            axis = 1 if x.ndim == 4 else -1
            cosines[block.index].append(_cosine(x, y, axis).reshape(-1))
            moved[block.index] += float(np.sum((y - x) ** 2))
            size[block.index] += float(np.sum(x**2))
        del values
    if score == "l2":
        return {i: float(np.sqrt(moved[i] / size[i])) if size[i] else 0.0 for i in moved}
    return {i: float(1.0 - np.mean(np.concatenate(c))) if c else 0.0 for i, c in cosines.items()}


def block_shifts(
    model: onnx.ModelProto,
    blocks: list[Block],
    feeds: dict[str, np.ndarray],
    custom_ops: tuple[str, ...] = (),
) -> dict[int, np.ndarray]:
    """Block index -> the mean over positions of what the block adds to the stream (``y - x``),
    along the channel axis: the constant that best stands in for it once it is gone. Only for
    blocks whose stream is channels-last ([batch, tokens, hidden]) and ends in no Relu."""
    # a transformer's stream is [batch, tokens, hidden]; a 1-D conv net's [N, C, T] is not channels-last
    wanted = [b for b in blocks if b.post is None and b.kind in TRANSFORMER_KINDS]
    tensors = list(dict.fromkeys(t for b in wanted for t in (b.input, b.exit.skip, b.exit.branch)))
    if not wanted:
        return {}
    run = session(exposing(model, tensors), custom_ops=custom_ops)
    sums: dict[int, np.ndarray] = {}
    counts = dict.fromkeys((b.index for b in wanted), 0)
    types: dict[int, np.dtype] = {}
    for feed in batches(model, feeds):
        values = dict(zip(tensors, runlimit.run(run, tensors, feed)))
        for block in wanted:
            x = values[block.input]
            moved = values[block.exit.skip].astype(np.float64) + values[block.exit.branch] - x
            if x.ndim != 3 or moved.shape != x.shape:
                continue
            flat = moved.reshape(-1, moved.shape[-1])
            sums[block.index] = sums.get(block.index, 0) + flat.sum(axis=0)
            counts[block.index] += len(flat)
            types[block.index] = x.dtype
        del values
    return {i: (total / counts[i]).astype(types[i]) for i, total in sums.items() if counts[i]}


def _cosine(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    dot = np.sum(x * y, axis=axis)
    norms = np.linalg.norm(x, axis=axis) * np.linalg.norm(y, axis=axis)
    # a position where either vector is zero: nothing points anywhere, count it as unmoved
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
