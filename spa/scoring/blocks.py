"""Scores of residual blocks: the lowest goes first.

- ``influence``: Block Influence (ShortGPT), 1 - the mean over positions of cos(block input,
  block output), each position's vector along the channel axis (the last axis of a
  transformer's [batch, tokens, hidden], axis 1 of an image's [N, C, H, W]). A block whose output
  is nearly its input changes little when it goes.
- ``l2``: the size of the block's residual contribution, ||y - x|| / ||x|| over all positions.
- ``random``: uniform, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    assert feeds is not None
    return measure_blocks(model, blocks, feeds, custom_ops).scores(score)


def block_shifts(
    model: onnx.ModelProto,
    blocks: list[Block],
    feeds: dict[str, np.ndarray],
    custom_ops: tuple[str, ...] = (),
) -> dict[int, np.ndarray]:
    """Block index -> the mean over positions of what the block adds to the stream (``BlockStatistics.shifts``)."""
    return measure_blocks(model, blocks, feeds, custom_ops).shifts


@dataclass
class BlockStatistics:
    """What one pass over the samples measures of each block: its scores, and for a transformer
    block the mean of what it adds to the stream (``y - x``) along the hidden axis, the constant
    that best stands in for it once it is gone."""

    cosines: dict[int, list[np.ndarray]]
    moved: dict[int, float]  # sum of ||y - x||^2
    size: dict[int, float]  # sum of ||x||^2
    shifts: dict[int, np.ndarray]

    def scores(self, score: str) -> dict[int, float]:
        if score not in BLOCK_SCORES or score == "random":
            raise ValueError(f"unknown measured block score {score}")
        if score == "l2":
            return {i: float(np.sqrt(self.moved[i] / self.size[i])) if self.size[i] else 0.0 for i in self.moved}
        return {i: float(1.0 - np.mean(np.concatenate(c))) if c else 0.0 for i, c in self.cosines.items()}


def measure_blocks(
    model: onnx.ModelProto,
    blocks: list[Block],
    feeds: dict[str, np.ndarray],
    custom_ops: tuple[str, ...] = (),
) -> BlockStatistics:
    """``blocks`` measured on ``feeds`` in one pass of the model."""
    tensors = list(dict.fromkeys(t for b in blocks for t in (b.input, b.exit.skip, b.exit.branch)))
    run = session(exposing(model, tensors), custom_ops=custom_ops)
    indices = [b.index for b in blocks]
    stats = BlockStatistics({i: [] for i in indices}, dict.fromkeys(indices, 0.0), dict.fromkeys(indices, 0.0), {})
    # a transformer's stream is [batch, tokens, hidden]; a 1-D conv net's [N, C, T] is not channels-last,
    # and a block ending in a Relu would not pass a shifted input through unchanged
    shiftable = {b.index for b in blocks if b.post is None and b.kind in TRANSFORMER_KINDS}
    sums: dict[int, np.ndarray] = {}
    counts = dict.fromkeys(shiftable, 0)
    types: dict[int, np.dtype] = {}
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
            stats.cosines[block.index].append(_cosine(x, y, axis).reshape(-1))
            stats.moved[block.index] += float(np.sum((y - x) ** 2))
            stats.size[block.index] += float(np.sum(x**2))
            if block.index in shiftable and x.ndim == 3:
                flat = (y - x).reshape(-1, x.shape[-1])
                sums[block.index] = sums.get(block.index, 0) + flat.sum(axis=0)
                counts[block.index] += len(flat)
                types[block.index] = values[block.input].dtype
        del values
    stats.shifts = {i: (total / counts[i]).astype(types[i]) for i, total in sums.items() if counts[i]}
    return stats


def _cosine(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    dot = np.sum(x * y, axis=axis)
    norms = np.linalg.norm(x, axis=axis) * np.linalg.norm(y, axis=axis)
    # a position where either vector is zero: nothing points anywhere, count it as unmoved
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
