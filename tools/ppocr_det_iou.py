"""Does the input prior serve a model trained on natural images? PP-OCRv4 det, text-map IoU.

    python tools/ppocr_det_iou.py [--ratios 0.05 0.1 0.2] [--pages 16]

The detector (from the rapidocr-onnxruntime 1.4.4 wheel) reads ImageNet-normalised photos and
scans, not digits, so it checks that ``statistics.choose_prior`` does not pick a prior that
misleads obspa on such a model. Metric: the intersection over union of the text maps
(probability > 0.3) of the pruned and the dense model on pages of DejaVu text rendered here,
320x320, dark ink on light paper. Rows: obspa with the prior the probe chose, obspa with smooth
noise forced, obspa with dark ink on light paper forced, and l1 (no compensation, as spa runs it).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import accuracy_suites  # noqa: E402

import spa  # noqa: E402
import spa.api  # noqa: E402
from spa.core.runtime import session  # noqa: E402
from spa.scoring import statistics  # noqa: E402

DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
SIDE = 320
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
LETTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def _page(seed: int, words: list[str], fonts: list[Path]) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    image = Image.new("RGB", (SIDE, SIDE), tuple(rng.randint(180, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    top = 8
    while top < SIDE - 30:
        font = ImageFont.truetype(str(rng.choice(fonts)), rng.choice((16, 20, 24)))
        line = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        draw.text((rng.randint(4, 40), top), line, font=font, fill=tuple(rng.randint(0, 80) for _ in range(3)))
        top += rng.randint(24, 40)
    bgr = np.asarray(image, np.float32)[:, :, ::-1] / 255.0  # rapidocr feeds BGR
    return ((bgr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def text_maps(model, pages: np.ndarray) -> np.ndarray:
    run = session(model)
    name = run.get_inputs()[0].name
    return np.concatenate([run.run(None, {name: pages[k : k + 4]})[0] for k in range(0, len(pages), 4)]) > 0.3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--pages", type=int, default=16)
    args = parser.parse_args(argv)
    cache = accuracy_suites.accuracy_dir()
    model = accuracy_suites._extract(
        accuracy_suites._wheel(cache, accuracy_suites.RAPIDOCR_WHEEL), DET_MEMBER, cache / "ch_PP-OCRv4_det_infer.onnx"
    )
    words = accuracy_suites._words(accuracy_suites.lee_sentences(cache), LETTERS)
    pages = np.stack([_page(seed, words, accuracy_suites._fonts()) for seed in range(args.pages)])
    dense = text_maps(onnx.load(str(model)), pages)
    print(f"dense: {dense.mean():.1%} of pixels are text")
    forced = {
        "smooth noise forced": statistics.SMOOTH_NOISE,
        "dark ink on light forced": statistics.InputPrior(-2.0, 2.0, 0.1, ink_high=False),
    }
    print("| ratio | obspa, prior chosen | " + " | ".join(f"obspa, {k}" for k in forced) + " | l1 |")
    print("|---|---|" + "---|" * len(forced) + "---|")
    for ratio in args.ratios:

        def iou(result) -> float:
            pruned = text_maps(result.model, pages)
            return float((pruned & dense).sum() / max((pruned | dense).sum(), 1))

        chosen = spa.prune(model, ratio, "obspa", bench=False)
        cells = [f"{iou(chosen):.3f} ({chosen.report.statistics['input_prior']})"]
        for prior in forced.values():
            with mock.patch.object(spa.api, "choose_prior", lambda *a, p=prior, **k: (p, {})):
                cells.append(f"{iou(spa.prune(model, ratio, 'obspa', bench=False)):.3f}")
        cells.append(f"{iou(spa.prune(model, ratio, 'l1', bench=False)):.3f}")
        print(f"| {ratio:g} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
