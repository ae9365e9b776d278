"""The residual blocks ``spa analyze`` lists: removable ones with their scores, the others with the reason."""

from __future__ import annotations

from pathlib import Path

from spa.core.runlimit import RunTimeout
from spa.formats.model import load
from spa.pipeline.depth import removable_blocks


def listed_blocks(path: Path, block_score: str, seed: int) -> list[dict]:
    model = load(path)
    try:
        return removable_blocks(model, block_score, None, 0, seed)
    except RunTimeout:
        raise
    except Exception:  # a model onnxruntime cannot run is still listed, unscored
        return [{**block, "score": None} for block in removable_blocks(model, "random", None, 0, seed)]


def blocks_text(blocks: list[dict]) -> str:
    removable = [b for b in blocks if b["removable"]]
    lines = [f"residual blocks: {len(blocks)} found, {len(removable)} removable (--remove-blocks)"]
    for block in blocks:
        score = f"score {block['score']:.4f}" if block["score"] is not None else "not scored"
        state = score if block["removable"] else f"not removable: {block['reason']}"
        lines.append(f"  {block['index']:>3}  {block['kind']:<17}  {block['name']}  {state}")
    return "\n".join(lines)
