"""Prune models that are already quantized (QDQ, int8 weights per channel) and measure them.

Each trained model of ``models/`` is quantized with onnxruntime's static quantizer on its own
calibration split, then pruned by spa at ratios 0.2 / 0.3 / 0.5 with ``l1``, ``obspa`` (no data) and
``obs`` (the same calibration split), each with and without compensation; the table gives test
accuracy against the float and the int8 dense models, and how the refits were written back.
``--latency MODEL.onnx`` also quantizes a float model with random calibration inputs and times it
dense and pruned (``spa bench``'s alternating runs, 1 thread).

    python tools/quantized_models.py [--models mnist_cnn mnist_rescnn mnist_dwse] [--latency resnet50.onnx]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import spa
from spa.bench import bench

MODELS = Path(__file__).resolve().parent.parent / "models"
RUNS = (("l1", False, False), ("obspa", False, False), ("obspa", True, False), ("obs", False, True), ("obs", True, True))


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, samples: np.ndarray):
        self._feeds = iter([{name: samples[i:i + 1]} for i in range(len(samples))])

    def get_next(self):
        return next(self._feeds, None)


def quantize(source: Path, target: Path, samples: np.ndarray) -> Path:
    name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    quantize_static(str(source), str(target), _Batches(name, samples), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return target


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": images})[0].argmax(1) == labels).mean())


def accuracy_rows(names: list[str], work: Path) -> list[str]:
    header = ["model", "ratio", "params kept", "float dense", "int8 dense"]
    header += [f"{c}{' + comp' if comp else ''}" for c, comp, _ in RUNS] + ["obs + comp: scales grown / saturated"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        dataset = "digits" if name.startswith("digits") else "mnist"
        with np.load(MODELS / "data" / f"{dataset}_calib.npz") as calib:
            samples = calib["input"][:128]
        with np.load(MODELS / "data" / f"{dataset}_test.npz") as test:
            images, labels = test["input"], test["label"]
        calib_path = work / f"{dataset}_calib.npz"
        np.savez(calib_path, input=samples)
        quantized = quantize(MODELS / f"{name}.onnx", work / f"{name}.int8.onnx", samples)
        dense_float, dense_int8 = accuracy(MODELS / f"{name}.onnx", images, labels), accuracy(quantized, images, labels)
        for ratio in (0.2, 0.3, 0.5):
            cells, tally, kept = [], "", ""
            for criterion, compensate, data in RUNS:
                start = time.perf_counter()
                result = spa.prune(str(quantized), ratio=ratio, criterion=criterion, compensate=compensate,
                                   calib=str(calib_path) if data else None)
                if not result.report.validation.ok:
                    raise SystemExit(f"{name} {criterion} {ratio}: {result.report.validation.problems}")
                cells.append(f"{accuracy(result.model, images, labels):.3f}")
                kept = f"{result.report.params_after / result.report.params_before:.1%}"
                comp = result.report.compensation or {}
                written = (comp.get("sequential") or {}).get("requantized") or comp.get("requantized")
                if written and criterion == "obs":
                    tally = f"{written['grown']} / {written['saturated']} of {written['values']}"
                print(f"  {name} {ratio} {criterion}{'+comp' if compensate else ''}: {cells[-1]} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
            rows.append(f"| {name} | {ratio} | {kept} | {dense_float:.3f} | {dense_int8:.3f} | "
                        + " | ".join(cells) + f" | {tally} |")
    return rows


def latency_rows(source: Path, work: Path) -> list[str]:
    graph_input = onnx.load(str(source), load_external_data=False).graph.input[0]
    shape = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
    samples = np.random.default_rng(0).standard_normal([4] + shape[1:]).astype(np.float32)
    quantized = quantize(source, work / f"{source.stem}.int8.onnx", samples)
    rows = ["| model | ratio | params kept | FLOPs kept | int8 dense ms | int8 pruned ms | speedup | MB |",
            "|---|---|---|---|---|---|---|---|"]
    for ratio in (0.3, 0.5):
        out = work / f"{source.stem}.int8.{ratio}.onnx"
        result = spa.prune(str(quantized), ratio=ratio, criterion="l2", round_to=8)
        if not result.report.validation.ok:
            raise SystemExit(f"{source.stem} {ratio}: {result.report.validation.problems}")
        onnx.save(result.model, str(out))
        timing = bench([quantized, out], threads=1, runs=50).timings
        dense, pruned = timing["dense"].median_ms, timing["pruned"].median_ms
        report = result.report
        rows.append(f"| {source.stem} int8 | {ratio} | {report.params_after / report.params_before:.1%} | "
                    f"{report.flops_after / report.flops_before:.1%} | {dense:.2f} | {pruned:.2f} | "
                    f"{dense / pruned:.2f}x | {quantized.stat().st_size / 1e6:.1f} -> {out.stat().st_size / 1e6:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mnist_cnn", "mnist_rescnn", "mnist_dwse"])
    parser.add_argument("--latency", type=Path, help="a float ONNX model to quantize and time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = accuracy_rows(args.models, Path(tmp)) if args.models else []
        if args.latency:
            rows += [""] + latency_rows(args.latency, Path(tmp))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
