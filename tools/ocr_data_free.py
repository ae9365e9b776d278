"""Why data-free pruning fails on the PP-OCRv4 recogniser: which use of the statistics breaks.

    python tools/ocr_data_free.py [swap] [blend] [priors] [damping] [chars] [inversion] [--ratios 0.2 0.3 0.5]
                                  [--mix 0,4] [--reading 0.1] [--steps 150]

``obspa`` uses synthetic statistics twice: to rank channels and to refit the kept weights. Each
experiment prunes the recogniser with ``obspa`` and measures exact match on the rendered lines of
``tools/accuracy_suites.py`` (the calibration lines are the "real" statistics):

- swap: rank with one source of statistics and refit with the other (layer-wise, and sequential
  for synthetic ranking with a real refit);
- blend: the synthetic refit, each layer's weights blended between no refit and the full refit,
  the blend (0, 1/4, ..., 1) chosen per layer by the output error on the real lines' second
  moment: an oracle no data-free method has, to see whether a better-judged refit would do;
- priors: each of spa's input priors forced in turn (``--mix 0,13`` draws equal shares from
  several instead);
- damping: the refit's synthetic Hessian damped by 0.1, 1 and 10 times its mean diagonal
  instead of spa's 0.01 (the ranking keeps 0.01);
- inversion: model inversion (DeepInversion-style): spa's synthetic lines at the rendered lines'
  geometry (48 x 320), then optimised by Adam so that every BatchNormalization's input matches
  its running mean and variance, with a total-variation prior; ``obspa`` then takes them as its
  synthetic statistics, layer-wise and sequential refit. ``--reading W`` adds DeepInversion's
  class term: a CTC loss (weight W) pushing each line to read a random string over the model's
  own charset. Needs torch (``tools/onnx_torch.py``);
- chars: character accuracy (1 - edit distance / characters) of random, l1 and obspa, with and
  without compensation: what exact match cannot tell apart once every line has an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy_suites  # noqa: E402

import spa  # noqa: E402
import spa.pipeline.pruned as cutting  # noqa: E402
import spa.pipeline.scored as scoring  # noqa: E402
import spa.scoring.obs as obs  # noqa: E402
import spa.scoring.statistics as statistics  # noqa: E402
from spa.pipeline.options import RunOptions, ScoreOptions  # noqa: E402
from spa.scoring.obs import augmented_hessian, inverse, obs_update  # noqa: E402
from spa.transforms.compensate import Compensation, replace_initializers  # noqa: E402

CALIB_SAMPLES = 128
BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)


class Bench:
    def __init__(self, out: Path):
        suite = accuracy_suites.ppocr_rec_suite()
        self.model, self.calib, self.score, self.out = suite.model, suite.calib_file, suite.evaluate, out

    def run(self, ratio: float, criterion: str = "obspa", **options) -> onnx.ModelProto:
        return spa.prune(self.model, ratio, criterion, check=False, **options).model

    def evaluate(self, model: onnx.ModelProto, score=None) -> float:
        onnx.save(model, self.out)
        return (score or self.score)(self.out)


def _both_statistics(store: dict):
    """The statistics stage returning the real or the synthetic statistics as ``store['refit']``
    says, and scoring with ``store['rank']``: prune is called with --calib so both can be collected."""
    collect = scoring._statistics
    score = scoring.score_groups

    def statistics_of(analyzed, calib, *rest):
        store["synthetic"] = collect(analyzed, None, *rest)
        store["real"] = collect(analyzed, calib, *rest)
        return store[store["refit"]]

    def scores(analyzed, criterion, context, progress=None):
        context.statistics = store[store["rank"]]
        return score(analyzed, criterion, context, progress)

    scoring._statistics, scoring.score_groups = statistics_of, scores


def swap(bench: Bench, ratios: list[float]) -> None:
    store: dict = {}
    _both_statistics(store)
    for rank, refit, how in (
        ("synthetic", "real", "layerwise"),
        ("synthetic", "real", "sequential"),
        ("real", "synthetic", "layerwise"),
    ):
        store["rank"], store["refit"] = rank, refit
        figures = [
            bench.evaluate(bench.run(r, calib=bench.calib, calib_samples=CALIB_SAMPLES, refit=how)) for r in ratios
        ]
        print(f"rank {rank}, refit {refit} ({how}): " + " / ".join(f"{f:.3f}" for f in figures), flush=True)


def blend(bench: Bench, ratios: list[float]) -> None:
    real_feeds = {}

    def refit_blended(plan):
        analyzed, synthetic, units = plan.scored.analyzed, plan.scored.statistics, plan.units
        analysis, layers = analyzed.analysis, analyzed.layers
        real = scoring._statistics(analyzed, real_feeds, ScoreOptions(), RunOptions(), None)
        graph, values, chosen = analysis.graph, {}, []
        for layer in layers.layers:
            gone = np.isin(analysis.labels[layer.weight_dim], units.removed_units)
            s, r = synthetic.of(layer.activation), real.of(layer.activation)
            if not gone.any() or s is None or s.gram is None or r is None:
                continue
            weights = layer.augmented_rows(graph.const)
            has_bias = layer.bias is not None
            q = np.flatnonzero(gone)
            full, _ = obs_update(weights, inverse(augmented_hessian(s.second_moment, s.mean if has_bias else None)), q)
            none = weights.copy()
            none[:, q] = 0
            judge = augmented_hessian(r.second_moment, r.mean if has_bias else None)
            share = min(BLENDS, key=lambda a: _output_error(weights, none + a * (full - none), judge))
            chosen.append(share)
            values.update(layer.tensors(none + share * (full - none), graph.const))
        model = onnx.ModelProto()
        model.CopyFrom(analyzed.model.proto)
        replace_initializers(model, values)
        print(f"  blends chosen: {chosen}", flush=True)
        return analyzed.model.derived(model), Compensation(layers=len(values))

    calibration = np.load(bench.calib)
    real_feeds.update({k: calibration[k][:CALIB_SAMPLES] for k in calibration.files})
    cutting._compensate = refit_blended
    figures = [bench.evaluate(bench.run(r, refit="layerwise")) for r in ratios]
    print(
        "synthetic refit, blend per layer judged on the real lines: " + " / ".join(f"{f:.3f}" for f in figures),
        flush=True,
    )


def _output_error(weights: np.ndarray, candidate: np.ndarray, judge: np.ndarray) -> float:
    """E||(W - W') x||^2 under the second moment ``judge`` of the real inputs."""
    delta = weights - candidate
    return float(np.einsum("ij,jk,ik->", delta, judge, delta))


def priors(bench: Bench, ratios: list[float], mix: list[int] | None) -> None:
    def forced(indices):
        def feeds(model, samples, seed, prior=statistics.SMOOTH_NOISE):
            fields = statistics._noise_fields(model, samples, seed)
            parts = np.array_split(np.arange(samples), len(indices))
            drawn = [
                statistics._drawn(model, {k: v[part] for k, v in fields.items()}, statistics.PRIORS[i])
                for part, i in zip(parts, indices)
            ]
            return {k: np.concatenate([d[k] for d in drawn]) for k in drawn[0]}

        return feeds

    runs = [mix] if mix else [[i] for i in range(len(statistics.PRIORS))]
    for indices in runs:
        scoring.synthetic_feeds = forced(indices)
        scoring.choose_prior = lambda *a, **k: (statistics.SMOOTH_NOISE, {})
        figures = [bench.evaluate(bench.run(r)) for r in ratios]
        names = " + ".join(statistics.PRIORS[i].name for i in indices)
        print(f"{indices} {names}: " + " / ".join(f"{f:.3f}" for f in figures), flush=True)


def damping(bench: Bench, ratios: list[float]) -> None:
    refit = cutting._compensate
    level = {}

    def damped(plan):
        analysis = plan.scored.analyzed.analysis
        # the layer systems the ranking built (and cached) used the default damping
        for key in [k for k in analysis.cache if isinstance(k, tuple) and k[0] == "obs-layer"]:
            del analysis.cache[key]
        default, obs.DAMPING = obs.DAMPING, level["damping"]
        try:
            return refit(plan)
        finally:
            obs.DAMPING = default

    cutting._compensate = damped
    for value in (0.1, 1.0, 10.0):
        level["damping"] = value
        figures = [bench.evaluate(bench.run(r)) for r in ratios]
        print(f"refit damping {value:g}: " + " / ".join(f"{f:.3f}" for f in figures), flush=True)


def _batchnorm_mismatch(batchnorm_inputs):
    """Mean over BatchNormalizations of the squared mean error in running standard deviations plus
    the squared log ratio of variances: 0 when a batch reproduces the training statistics."""
    import torch

    total = 0
    for value, mean, variance in batchnorm_inputs.values():
        axes = [0] + list(range(2, value.dim()))
        total = total + ((value.mean(axes) - mean) ** 2 / (variance + 1e-5)).mean()
        total = total + ((torch.log(value.var(axes) + 1e-5) - torch.log(variance + 1e-5)) ** 2).mean()
    return total / len(batchnorm_inputs)


def _total_variation(images):
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (
        images[..., :, 1:] - images[..., :, :-1]
    ).abs().mean()


def _ctc_targets(model_path: Path, samples: int, generator: np.random.Generator):
    """Random strings over the model's own charset (blank excluded): the text each inverted line is
    pushed to read. Lengths 4-20 fit the 40 output steps with room for CTC's repeats."""
    classes = len(accuracy_suites._rec_keys(model_path))
    lengths = generator.integers(4, 21, samples)
    return generator.integers(1, classes, int(lengths.sum())), lengths


def inversion(
    bench: Bench,
    ratios: list[float],
    samples: int = 32,
    steps: int = 150,
    smoothness: float = 1.0,
    rate: float = 0.05,
    reading: float = 0.0,
) -> None:
    import onnx_torch
    import torch

    torch.manual_seed(0)
    model = onnx.load(bench.model)
    input_shape = statistics._input_shape

    def line_shaped(info, count):
        shape = input_shape(info, count)
        return shape[:2] + [accuracy_suites.OCR_HEIGHT, accuracy_suites.OCR_WIDTH]

    statistics._input_shape = line_shaped
    try:
        start = statistics.synthetic_feeds(model, samples, 0, statistics.InputPrior(-1.0, 1.0))["x"]
    finally:
        statistics._input_shape = input_shape
    real = np.load(bench.calib)["x"][:samples]
    # images kept in [-1, 1] (the lines' range) through tanh
    logits = torch.atanh(torch.from_numpy(start).clamp(-0.999, 0.999)).requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=rate)
    if reading:
        flat, lengths = _ctc_targets(Path(bench.model), samples, np.random.default_rng(0))
        targets, target_lengths = torch.from_numpy(flat), torch.from_numpy(lengths)
    with torch.no_grad():
        for name, images in (("real lines", real), ("start", start)):
            _, batchnorm_inputs = onnx_torch.run(model, {"x": torch.from_numpy(images)})
            print(f"  batchnorm mismatch, {name}: {_batchnorm_mismatch(batchnorm_inputs).item():.3f}", flush=True)
    for _ in range(steps):
        images = torch.tanh(logits)
        outputs, batchnorm_inputs = onnx_torch.run(model, {"x": images})
        loss = _batchnorm_mismatch(batchnorm_inputs) + smoothness * _total_variation(images)
        if reading:
            steps_out = torch.full((samples,), outputs[0].shape[1], dtype=torch.long)
            loss = loss + reading * torch.nn.functional.ctc_loss(
                torch.log(outputs[0].clamp_min(1e-12)).transpose(0, 1), targets, steps_out, target_lengths
            )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    inverted = torch.tanh(logits).detach().numpy()
    with torch.no_grad():
        outputs, batchnorm_inputs = onnx_torch.run(model, {"x": torch.from_numpy(inverted)})
    if reading:
        confident = outputs[0].max(-1).values.mean().item()
        print(f"  mean top probability per output step: {confident:.3f}", flush=True)
    print(
        f"  batchnorm mismatch, inverted after {steps} steps: {_batchnorm_mismatch(batchnorm_inputs).item():.3f}",
        flush=True,
    )
    scoring.synthetic_feeds = lambda *args, **kwargs: {"x": inverted}
    for how in ("layerwise", "sequential"):
        figures = [bench.evaluate(bench.run(r, refit=how)) for r in ratios]
        print(f"obspa on {samples} inverted lines ({how}): " + " / ".join(f"{f:.3f}" for f in figures), flush=True)


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def chars(bench: Bench, ratios: list[float]) -> None:
    keys = accuracy_suites._rec_keys(bench.model)
    words = accuracy_suites._words(accuracy_suites.lee_sentences(accuracy_suites.accuracy_dir()), set(keys[1:]))
    texts, images = accuracy_suites._text_lines(words, accuracy_suites.OCR_EVAL, seed=0)

    def accuracy(path: Path) -> float:
        read = accuracy_suites.read_lines(accuracy_suites._session(path), images, keys)
        wrong = sum(_edit_distance(r.strip(), t) for r, t in zip(read, texts))
        return max(0.0, 1 - wrong / sum(len(t) for t in texts))

    print(f"dense: {accuracy(bench.model):.3f}")
    for ratio in ratios:
        row = [
            f"{c} {'on' if comp else 'off'} {bench.evaluate(bench.run(ratio, c, compensate=comp), accuracy):.3f}"
            for c in ("random", "l1", "obspa")
            for comp in (False, True)
        ]
        print(f"ratio {ratio}: " + ", ".join(row), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "experiments",
        nargs="*",
        default=["swap", "blend", "priors", "damping", "chars"],
        choices=["swap", "blend", "priors", "damping", "chars", "inversion"],
    )
    parser.add_argument("--ratios", nargs="*", type=float, default=None)
    parser.add_argument(
        "--mix",
        type=lambda text: [int(i) for i in text.split(",")],
        default=None,
        help="priors: draw equal shares from these PRIORS indices instead of one at a time",
    )
    parser.add_argument(
        "--reading",
        type=float,
        default=0.0,
        help="inversion: weight of a CTC loss pushing each line to read a random string",
    )
    parser.add_argument("--steps", type=int, default=150, help="inversion: Adam steps")
    parser.add_argument("--out", type=Path, default=Path("ocr_data_free.onnx"), help="scratch model file")
    args = parser.parse_args(argv)
    bench = Bench(args.out)
    defaults = {
        "swap": [0.2, 0.3, 0.5],
        "blend": [0.1, 0.2, 0.3],
        "priors": [0.1, 0.2],
        "damping": [0.1, 0.2, 0.3],
        "chars": [0.2, 0.3, 0.5],
        "inversion": [0.1, 0.2, 0.3, 0.5],
    }
    saved = (
        scoring._statistics,
        scoring.score_groups,
        cutting._compensate,
        scoring.synthetic_feeds,
        scoring.choose_prior,
    )
    for name in args.experiments:
        print(f"## {name}", flush=True)
        ratios = args.ratios or defaults[name]
        if name == "priors":
            priors(bench, ratios, args.mix)
        elif name == "inversion":
            inversion(bench, ratios, steps=args.steps, reading=args.reading)
        else:
            {"swap": swap, "blend": blend, "damping": damping, "chars": chars}[name](bench, ratios)
        scoring._statistics, scoring.score_groups, cutting._compensate = saved[:3]
        scoring.synthetic_feeds, scoring.choose_prior = saved[3:]
    args.out.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
