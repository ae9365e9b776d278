"""The residual blocks ``spa analyze`` lists: removable ones with their scores, the others with the reason."""

from __future__ import annotations

from pathlib import Path

from spa.core.runlimit import RunTimeout
from spa.formats.model import load
from spa.pipeline.depth import removable_blocks


def listed_blocks(path: Path, block_score: str, seed: int, unit: str = "layer") -> list[dict]:
    model = load(path)
    if not model.lazy:  # weights too large to hold are not run: their blocks are listed unscored
        try:
            return removable_blocks(model, block_score, None, 0, seed, unit)
        except RunTimeout:
            raise
        except Exception:  # a model onnxruntime cannot run is still listed, unscored
            pass
    return [{**block, "score": None} for block in removable_blocks(model, "random", None, 0, seed, unit)]


def blocks_text(blocks: list[dict]) -> str:
    removable = [b for b in blocks if b["removable"]]
    lines = [f"residual blocks: {len(blocks)} found, {len(removable)} removable (--remove-blocks)"]
    for block in blocks:
        score = f"score {block['score']:.4f}" if block["score"] is not None else "not scored"
        state = score if block["removable"] else f"not removable: {block['reason']}"
        lines.append(f"  {block['index']:>3}  {block['kind']:<17}  {block['name']}  {state}")
    return "\n".join(lines)


def depth_lines(depth: dict | None) -> list[str]:
    """What ``spa prune`` prints of the blocks it removed."""
    if not depth:
        return []
    removable = sum(b["removable"] for b in depth["blocks"])
    scored = "random" if depth["score"] == "random" else f"{depth['score']} on {depth['source']} inputs"
    names = ", ".join(
        f"{b['name']} ({b['score']:.3f})" if depth["score"] != "random" else b["name"] for b in depth["removed"]
    )
    lines = [f"blocks: {len(depth['removed'])} of {removable} removable removed ({scored}): {names}"]
    checks = depth.get("checks") or {}
    if checks.get("soft_max_rel_error") is not None:
        lines.append(
            f"        removal == zeroing the blocks (rel. err {checks['soft_max_rel_error']:.1e})"
            + (", prefill and decode step from its own cache" if checks.get("decode_checked") else "")
        )
    errors = depth.get("shift_errors")
    if errors:
        shifted, removed = depth.get("shifted", 0), len(depth["removed"])
        kept = f"{shifted} of {removed} removed blocks add back their mean output" if shifted else "no mean added back"
        lines.append(
            f"        {kept}: output error on {errors['source']} {errors['shifted']:.3f} with the means, "
            f"{errors['plain']:.3f} without"
        )
    timed = depth.get("end_to_end_latency")
    if timed:
        where = timed["provider"].replace("ExecutionProvider", "")
        lines.append(
            f"        the written model vs the model as given: latency ({where}, median) {timed['given_ms']:.2f} ms"
            f" -> {timed['pruned_ms']:.2f} ms ({timed['speedup']:.2f}x)"
        )
    if depth.get("latency_fraction") is not None:
        lines.append(f"        the blocks left {depth['latency_fraction']:.2f}x the latency of the model as given")
    if depth.get("width_target") is not None:
        lines.append(f"        the width cut was asked for {depth['width_target']:.3f} of what the blocks left")
    for key, what in (("fidelity", "blocks removed"), ("end_to_end", "blocks and channels removed")):
        measured = depth.get(key) or {}
        for name, figures in (measured.get("outputs") or {}).items():
            lines.append(
                f"        {what}: {name} vs the model as given on {measured['source']}: "
                f"rel. err {figures['relative_error']:.3f}, cosine {figures['cosine']:.3f}"
            )
    return lines
