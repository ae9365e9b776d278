"""Prune models that are already quantized (int8 weights per channel) and measure them.

Each trained model of ``models/`` is quantized with onnxruntime's quantizers: ``qdq``, the static
quantizer's QDQ format on the model's own calibration split (int8 weights and uint8 activations
behind QuantizeLinear/DequantizeLinear), and ``dynamic``, ``quantize_dynamic`` (int8 weights read
by ConvInteger/MatMulInteger, activations quantized at run time by DynamicQuantizeLinear). Then spa
prunes it at ratios 0.2 / 0.3 / 0.5 with ``l1``, ``obspa`` (no data) and ``obs`` (the calibration
split), each with and without compensation; ``qoperator``, the static quantizer's operator format
(QLinearConv, QGemm, QLinearAdd... with their scales as inputs), which spa prunes in its QDQ form
and writes back as it came; the table gives test accuracy against the float and
the int8 dense models, and how the refits were written back. ``--latency MODEL.onnx`` also
quantizes a float model (QDQ: with random calibration inputs) and times it dense and pruned
(``spa bench``'s alternating runs, 1 thread).

``--minilm`` adds all-MiniLM-L6-v2 with its real weights, quantized dynamically (metric: mean cosine
of sentence embeddings to the float model's, as in ``eval_accuracy.py``).

    python tools/quantized_models.py [--models mnist_cnn mnist_rescnn mnist_dwse] [--formats qdq dynamic qoperator]
                                     [--minilm] [--latency resnet50.onnx ...] [--latency-format qdq dynamic qoperator]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

import spa
from spa.verify.bench import bench

MODELS = Path(__file__).resolve().parent.parent / "models"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # accuracy_suites, beside this file
FORMATS = ("qdq", "dynamic", "qoperator")
RUNS = (
    ("l1", False, False),
    ("obspa", False, False),
    ("obspa", True, False),
    ("obs", False, True),
    ("obs", True, True),
)


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, samples: np.ndarray):
        self._feeds = iter([{name: samples[i : i + 1]} for i in range(len(samples))])

    def get_next(self):
        return next(self._feeds, None)


def quantize(source: Path, target: Path, samples: np.ndarray, kind: str = "qdq") -> Path:
    if kind == "dynamic":
        quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8)
        return target
    name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    layout = QuantFormat.QOperator if kind == "qoperator" else QuantFormat.QDQ
    quantize_static(
        str(source),
        str(target),
        _Batches(name, samples),
        quant_format=layout,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    return target


@dataclass
class Case:
    """One int8 model to prune: its metric (higher is better) on any ONNX file, and the .npz that
    data-driven criteria calibrate on (disjoint from the metric's data)."""

    name: str
    kind: str
    float_model: Path
    quantized: Path
    calib: Path
    metric: Callable[[Path], float]


def mnist_cases(names: list[str], kinds: list[str], work: Path) -> Iterator[Case]:
    for name, kind in ((name, kind) for name in names for kind in kinds):
        dataset = "digits" if name.startswith("digits") else "mnist"
        with np.load(MODELS / "data" / f"{dataset}_calib.npz") as calib:
            samples = calib["input"][:128]
        with np.load(MODELS / "data" / f"{dataset}_test.npz") as test:
            images, labels = test["input"], test["label"]
        calib_path = work / f"{dataset}_calib.npz"
        np.savez(calib_path, input=samples)
        quantized = quantize(MODELS / f"{name}.onnx", work / f"{name}.{kind}.onnx", samples, kind)

        def accuracy(path: Path, images=images, labels=labels) -> float:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return float((session.run(None, {"input": images})[0].argmax(1) == labels).mean())

        yield Case(name, kind, MODELS / f"{name}.onnx", quantized, calib_path, accuracy)


def minilm_case(work: Path) -> Case:
    """all-MiniLM-L6-v2 with its real weights, quantized dynamically (the way transformers are);
    metric: mean cosine of sentence embeddings to the float model's (``accuracy_suites``)."""
    from accuracy_suites import minilm_suite

    suite = minilm_suite()
    quantized = quantize(suite.model, work / "minilm.dynamic.onnx", np.empty(0), "dynamic")
    return Case("minilm", "dynamic", suite.model, quantized, suite.calib_file, suite.evaluate)


def accuracy_rows(cases: Iterable[Case], work: Path) -> list[str]:
    header = ["model", "format", "ratio", "params kept", "float dense", "int8 dense"]
    header += [f"{c}{' + comp' if comp else ''}" for c, comp, _ in RUNS] + ["obs + comp: scales grown / saturated"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in cases:
        dense_float, dense_int8 = case.metric(case.float_model), case.metric(case.quantized)
        for ratio in (0.2, 0.3, 0.5):
            cells, tally, kept = [], "", ""
            for criterion, compensate, data in RUNS:
                start = time.perf_counter()
                result = spa.prune(
                    str(case.quantized),
                    ratio=ratio,
                    criterion=criterion,
                    compensate=compensate,
                    calib=str(case.calib) if data else None,
                )
                if not result.report.validation.ok:
                    raise SystemExit(f"{case.name} {criterion} {ratio}: {result.report.validation.problems}")
                pruned = work / f"{case.name}.{case.kind}.pruned.onnx"
                onnx.save(result.model, str(pruned))
                cells.append(f"{case.metric(pruned):.3f}")
                kept = f"{result.report.params_after / result.report.params_before:.1%}"
                comp = result.report.compensation or {}
                written = (comp.get("sequential") or {}).get("requantized") or comp.get("requantized")
                if written and criterion == "obs":
                    tally = f"{written['grown']} / {written['saturated']} of {written['values']}"
                print(
                    f"  {case.name} {case.kind} {ratio} {criterion}{'+comp' if compensate else ''}: {cells[-1]} "
                    f"({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
            rows.append(
                f"| {case.name} | {case.kind} | {ratio} | {kept} | {dense_float:.3f} | {dense_int8:.3f} | "
                + " | ".join(cells)
                + f" | {tally} |"
            )
    return rows


def latency_rows(source: Path, kind: str, work: Path) -> list[str]:
    graph_input = onnx.load(str(source), load_external_data=False).graph.input[0]
    shape = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
    samples = np.random.default_rng(0).standard_normal([4] + shape[1:]).astype(np.float32)
    quantized = quantize(source, work / f"{source.stem}.{kind}.onnx", samples, kind)
    rows = [
        "| model | format | ratio | params kept | FLOPs kept | int8 dense ms | int8 pruned ms | speedup | MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in (0.3, 0.5):
        out = work / f"{source.stem}.{kind}.{ratio}.onnx"
        result = spa.prune(str(quantized), ratio=ratio, criterion="l2", round_to=8)
        if not result.report.validation.ok:
            raise SystemExit(f"{source.stem} {ratio}: {result.report.validation.problems}")
        onnx.save(result.model, str(out))
        timing = bench([quantized, out], threads=1, runs=50).timings
        dense, pruned = timing["dense"].median_ms, timing["pruned"].median_ms
        report = result.report
        rows.append(
            f"| {source.stem} | {kind} | {ratio} | {report.params_after / report.params_before:.1%} | "
            f"{report.flops_after / report.flops_before:.1%} | {dense:.2f} | {pruned:.2f} | "
            f"{dense / pruned:.2f}x | {quantized.stat().st_size / 1e6:.1f} -> {out.stat().st_size / 1e6:.1f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mnist_cnn", "mnist_rescnn", "mnist_dwse"])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument(
        "--minilm",
        action="store_true",
        help="also all-MiniLM-L6-v2, quantized dynamically (tools/accuracy_suites.py builds it)",
    )
    parser.add_argument("--latency", type=Path, nargs="*", default=[], help="float ONNX models to quantize and time")
    parser.add_argument("--latency-format", choices=FORMATS, nargs="+", default=["qdq"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = mnist_cases(args.models, args.formats, work)
        if args.minilm:
            cases = itertools.chain(cases, (minilm_case(work) for _ in range(1)))
        rows = accuracy_rows(cases, work) if args.models or args.minilm else []
        for source in args.latency:
            for kind in args.latency_format:
                rows += [""] + latency_rows(source, kind, Path(tmp))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
