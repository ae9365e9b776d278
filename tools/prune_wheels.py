"""Prune the real recurrent models that ship inside PyPI wheels, and say what came of it.

    python tools/prune_wheels.py [--ratio 0.3] [--offline] [--write DIR]

silero-vad 6.2.3 (``silero_vad_16k_sequence.onnx``: STFT as Conv, 4 Convs, LSTM(128), Conv
head) and ddddocr 1.6.1 (``common.onnx``: 21 Convs, bidirectional LSTM(512), Gemm over 8210
classes). Each wheel is fetched once with ``pip download --no-deps`` into
``~/.cache/spa/wheels`` (``SPA_WHEELS_DIR`` puts it elsewhere) and the model file is taken
out of it; later runs reuse both. ``--offline`` never downloads. For every model this prints
the groups found and prunable, what froze the recurrent layers' groups and why, params and
FLOPs before and after, and the validation (checker, onnxruntime, I/O, soft == hard).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (requirement, wheel file prefix, path of the model inside the wheel)
MODELS = {
    "silero_vad_16k_sequence": ("silero-vad==6.2.3", "silero_vad-6.2.3-",
                                "silero_vad/data/silero_vad_16k_sequence.onnx"),
    "ddddocr_common": ("ddddocr==1.6.1", "ddddocr-1.6.1-", "ddddocr/common.onnx"),
    "ppocr_det": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-",
                  "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr_cls": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-",
                  "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ppocr_rec": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-",
                  "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
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
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                        requirement], check=True)
        wheel = next(iter(sorted(folder.glob(f"{prefix}*.whl"))), None)
    if wheel is None:
        return None
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, folder / "x" / name)
    return target


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.2f}k"


def report(name: str, path: Path, ratio: float, write: Path | None) -> bool:
    import spa

    analysis = spa.analyze(path)
    recurrent = [g for g in analysis.groups if any(layer.startswith(("LSTM", "GRU", "RNN")) for layer in g.layers)]
    result = spa.prune(path, ratio=ratio, check=True)
    r, v = result.report, result.report.validation
    print(f"== {name} ({path})")
    print(f"groups:  {r.groups_found} found, {r.groups_prunable} prunable, {r.groups_pruned} pruned")
    for group in recurrent:
        state = "prunable" if group.frozen is None and group.channels > 1 else f"frozen: {group.frozen}"
        print(f"  group {group.id}: {group.channels} ch {'exact' if group.exact else 'approximate'}, "
              f"{', '.join(group.layers[:3])}{' ...' if len(group.layers) > 3 else ''}: {state}")
    print(f"params:  {_count(r.params_before)} -> {_count(r.params_after)} "
          f"({100 * (r.params_after / r.params_before - 1):+.1f}%)")
    print(f"FLOPs:   {_count(r.flops_before)} -> {_count(r.flops_after)} "
          f"({100 * (r.flops_after / r.flops_before - 1):+.1f}%)")
    soft = "no exact group pruned" if v.soft_equal is None else (
        f"soft==hard {'equal' if v.soft_equal else 'DIFFERENT'} (rel. err {v.soft_max_rel_error:.1e})")
    print(f"valid:   {'yes' if v.ok else 'NO'}: checker {v.checker}, onnxruntime "
          f"{'runs' if v.runs else 'fails'}, I/O {'same' if v.io_match else 'differ'}, {soft}")
    for problem in v.problems:
        print(f"  problem: {problem}")
    if write is not None:
        import onnx

        write.mkdir(parents=True, exist_ok=True)
        onnx.save(result.model, str(write / f"{name}.pruned.onnx"))
    return v.ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--offline", action="store_true", help="use cached wheels only, never download")
    parser.add_argument("--write", type=Path, help="folder to write the pruned models to")
    parser.add_argument("models", nargs="*", choices=[[], *MODELS], help="default: all")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    ok = True
    for name in args.models or MODELS:
        path = cached_model(name, fetch=not args.offline)
        if path is None:
            print(f"== {name}: wheel not cached (run without --offline to fetch it)")
            ok = False
            continue
        ok = report(name, path, args.ratio, args.write) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
