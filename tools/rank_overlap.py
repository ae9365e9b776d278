"""Why the channel rankings land close once each is followed by the same least-squares refit.

    python tools/rank_overlap.py [--ratio 0.3] [--criteria obs,fluctuation,activation,l1]

On the trained language model (tools/train_lm.py, genai fp32 export) and the 128 real
calibration windows tools/eval_lm.py uses, for each FFN group (the channels between a layer's
gate/up projections and its down projection) this prints:

- which channels each criterion removes at ``--ratio``, and their overlap with ``obs``'s
  (Jaccard: shared / either);
- the error of the down projection's output after the removed channels go and the kept columns
  are refitted by least squares on the same data, relative to its output: the quantity ``obs``
  minimises greedily, so it should be the lowest;
- how far the down projection's input Hessian X^T X is from diagonal (the off-diagonal share of
  its correlation matrix's squared entries). Were it diagonal, the error after the refit would
  be the sum of ``||W[c]||^2 * E[x_c^2]`` over the removed channels, nearly the score FLAP and
  Wanda-sp rank by, and every ranking would pick the same channels; the further from diagonal,
  the more room OBS's greedy, correlation-aware choice has.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import eval_lm  # noqa: E402
import train_lm  # noqa: E402

import spa  # noqa: E402
from spa.core.runtime import batches, session  # noqa: E402
from spa.scoring.statistics import exposing, load_calibration  # noqa: E402


def down_projections(model: onnx.ModelProto) -> dict[str, tuple[str, np.ndarray]]:
    """Each FFN's down projection MatMul: node name -> (its input tensor, its weight [in, out])."""
    weights = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and "down_proj" in node.name and node.input[1] in weights:
            found[node.name] = (node.input[0], onnx.numpy_helper.to_array(weights[node.input[1]]))
    return found


def removed_channels(
    dense: onnx.ModelProto, pruned: onnx.ModelProto, downs: dict[str, tuple[str, np.ndarray]]
) -> dict[str, set[int]]:
    """The FFN channels ``pruned`` lost, per down projection: the up projection's columns it no
    longer has (up projections lose output columns only, so the kept ones are exact copies)."""
    weights = {t.name: t for t in pruned.graph.initializer}
    nodes = {n.name: n for n in dense.graph.node}
    dense_weights = {t.name: t for t in dense.graph.initializer}
    found = {}
    for name in downs:
        up = nodes[name.replace("down_proj", "up_proj")].input[1]
        before = onnx.numpy_helper.to_array(dense_weights[up])
        after = onnx.numpy_helper.to_array(weights[up])
        index = {column.tobytes(): k for k, column in enumerate(before.T)}
        found[name] = set(range(before.shape[1])) - {index[column.tobytes()] for column in after.T}
    return found


def activations(model: onnx.ModelProto, tensors: list[str], feeds: dict) -> dict[str, np.ndarray]:
    run = session(exposing(model, tensors))
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for feed in batches(model, feeds):
        for name, value in zip(tensors, run.run(tensors, feed)):
            parts[name].append(value.reshape(-1, value.shape[-1]).astype(np.float64))
    return {t: np.concatenate(v) for t, v in parts.items()}


def refit_error(x: np.ndarray, weight: np.ndarray, kept: np.ndarray) -> float:
    """||X W - X_K W'|| / ||X W|| with W' the least-squares refit of the kept rows."""
    target = x @ weight
    refit, *_ = np.linalg.lstsq(x[:, kept], target, rcond=None)
    return float(np.linalg.norm(target - x[:, kept] @ refit) / np.linalg.norm(target))


def off_diagonal_share(x: np.ndarray) -> float:
    hessian = x.T @ x
    scale = np.sqrt(np.diag(hessian))
    correlation = hessian / np.outer(scale, scale)
    squared = correlation**2
    return float((squared.sum() - np.trace(squared)) / squared.sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--criteria", default="obs,fluctuation,activation,l1")
    args = parser.parse_args()
    path = train_lm.lm_dir() / "genai-fp32" / "model.onnx"
    criteria = args.criteria.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        calib = eval_lm.calibration_folder(Path(scratch))
        analysis = spa.analyze(spa.load(path))
        model = onnx.load(path)
        downs = down_projections(model)
        removed: dict[str, dict[str, set[int]]] = {name: {} for name in downs}
        for criterion in criteria:
            plan = analysis.score(criterion, data=calib).plan(ratio=args.ratio, round_to=1)
            # no refit: the kept channels are copies
            plan.apply(compensate=False).save(Path(scratch) / f"{criterion}.onnx")
            pruned = onnx.load(Path(scratch) / f"{criterion}.onnx")
            for name, gone in removed_channels(model, pruned, downs).items():
                removed[name][criterion] = gone
        feeds = load_calibration(calib, model, eval_lm.CALIB)
        xs = activations(model, [tensor for tensor, _ in downs.values()], feeds)
    print(f"ratio {args.ratio}, {len(next(iter(xs.values())))} calibration tokens")
    for name, (tensor, weight) in downs.items():
        chosen = removed[name]
        x, width = xs[tensor], weight.shape[0]
        print(f"{name}: {width} channels, Hessian off-diagonal share {off_diagonal_share(x):.3f}")
        for criterion, gone in chosen.items():
            kept = np.array(sorted(set(range(width)) - gone))
            overlap = len(gone & chosen[criteria[0]]) / max(len(gone | chosen[criteria[0]]), 1)
            print(
                f"  {criterion:<12} removes {len(gone)}: overlap with {criteria[0]} {overlap:.2f}, "
                f"error after refit {refit_error(x, weight, kept):.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
