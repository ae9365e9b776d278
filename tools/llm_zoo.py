"""Tiny decoder LLMs exported as people deploy them, pruned by spa.

    python tools/llm_zoo.py [--ratio 0.3] [--write DIR] [exports...]
    python tools/llm_zoo.py --list

Llama, Qwen2, Mistral, Gemma and Phi3 are built by transformers from a config alone (random
weights, seeded: nothing is downloaded) at toy sizes: hidden 256, 4 layers, 8 query and 2 key/value
heads, a vocabulary of 512. Each is exported

- by onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder``), fp32 and
  int4: a folder with ``model.onnx``, its external data, ``genai_config.json`` and the tokenizer;
- by Optimum (``text-generation-with-past``): ``model.onnx`` with ``past_key_values.N.key/value``
  inputs and ``present.N.key/value`` outputs, and ``config.json``.

Optimum pins an older transformers than spa's tests use, so it lives in its own virtual
environment, ``~/.cache/spa/optimumvenv`` (``SPA_OPTIMUM_VENV`` puts it elsewhere), created on
first use with ``--system-site-packages`` (torch and onnx are spa's own) and
``optimum-onnx==0.1.0 transformers==4.57.1``. This script runs itself in that environment
(``--optimum-export``) for the export only; the model is built there from the same config and seed.
Exports are cached in ``~/.cache/spa/llm`` (``SPA_LLM_DIR``).

An export is named ``<arch>-<exporter>``: ``llama-genai-fp32``, ``qwen2-genai-int4``,
``phi3-optimum``. For every export it prints the exit code of ``spa prune``, groups, params and
attention heads before and after, and whether the pruned model validated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = 1  # bump when a build or export changes, so cached folders are rebuilt
SEED = 0
OPTIMUM_REQUIREMENTS = ("optimum-onnx==0.1.0", "transformers==4.57.1")
ARCHS = ("llama", "qwen2", "mistral", "gemma", "phi3")
# the genai builder refuses this Phi3 config (KeyError 'multi_cache': it expects Phi3's long-rope scaling)
GENAI = tuple(f"{arch}-genai-{precision}" for arch in ARCHS if arch != "phi3" for precision in ("fp32", "int4"))
OPTIMUM = tuple(f"{arch}-optimum" for arch in ARCHS)
EXPORTS = (*GENAI, *OPTIMUM)
SIZES = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
)
VOCAB_WORDS = 509  # with <unk>, <s>, </s>: the model's vocabulary


def cache_dir() -> Path:
    return Path(os.environ.get("SPA_LLM_DIR", Path.home() / ".cache" / "spa" / "llm"))


def venv_dir() -> Path:
    return Path(os.environ.get("SPA_OPTIMUM_VENV", Path.home() / ".cache" / "spa" / "optimumvenv"))


def genai_available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def optimum_ready() -> bool:
    """Whether the Optimum venv exists already (making it takes minutes and the package mirror)."""
    return (venv_dir() / "spa-installed").exists()


def venv_python() -> Path:
    """The Optimum venv's interpreter, creating the venv when it is missing."""
    python, ready = venv_dir() / "bin" / "python", venv_dir() / "spa-installed"
    if ready.exists():
        return python
    print(f"creating {venv_dir()} with {' '.join(OPTIMUM_REQUIREMENTS)} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv_dir())], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *OPTIMUM_REQUIREMENTS], check=True)
    ready.touch()  # an interrupted install is redone, not taken for a working one
    return python


# transformers imports torchvision whenever it is installed; a torchvision built for another torch
# (a CUDA wheel beside a CPU torch) fails to load, and with it every model class
_HIDE_BROKEN_TORCHVISION = """
import sys
try:
    import torchvision
except Exception:
    for _name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[_name]
    sys.modules["torchvision"] = None
"""


def _hide_broken_torchvision() -> None:
    exec(_HIDE_BROKEN_TORCHVISION, {})


# ---------------------------------------------------------------- the Hugging Face models


def hf_config(arch: str):
    """The transformers config of ``arch`` at toy sizes (whichever transformers runs this)."""
    _hide_broken_torchvision()
    import transformers

    classes = {
        "llama": "LlamaConfig",
        "qwen2": "Qwen2Config",
        "mistral": "MistralConfig",
        "gemma": "GemmaConfig",
        "phi3": "Phi3Config",
    }
    extra = {"head_dim": 32} if arch == "gemma" else {}
    if arch == "phi3":
        extra = {"pad_token_id": 0}  # Phi3's default pad id lies past a 512-token vocabulary
    config = getattr(transformers, classes[arch])(**SIZES, bos_token_id=1, eos_token_id=2, **extra)
    config.tie_word_embeddings = arch == "gemma"
    return config


def _tokenizer():
    """A word-level tokenizer over made-up words: the exporters copy a tokenizer beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB_WORDS)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_hf(arch: str, folder: Path) -> None:
    """``arch`` with seeded random weights, saved as a Hugging Face folder."""
    _hide_broken_torchvision()
    import torch
    import transformers

    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch)).eval()
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)


def hf_folder(arch: str) -> Path:
    folder = cache_dir() / f"hf-{arch}-v{VERSION}"
    if not (folder / "config.json").exists():
        partial = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{arch}-"))
        save_hf(arch, partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.replace(folder)
    return folder


# ---------------------------------------------------------------- exports


def export_dir(name: str) -> Path:
    return cache_dir() / f"{name}-v{VERSION}"


def exported(name: str) -> Path:
    """The cached folder of export ``name`` (its ``model.onnx`` inside), exporting it first if needed."""
    folder = export_dir(name)
    if (folder / "model.onnx").exists():
        return folder
    cache_dir().mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{name}-"))
    arch, exporter, *precision = name.split("-")
    try:
        if exporter == "genai":
            _genai_export(arch, precision[0], partial)
        else:
            subprocess.run([str(venv_python()), __file__, "--optimum-export", arch, str(partial)], check=True)
        shutil.rmtree(folder, ignore_errors=True)
        partial.replace(folder)  # an export cut short leaves nothing that looks cached
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _genai_export(arch: str, precision: str, out: Path) -> None:
    genai_export_folder(hf_folder(arch), precision, out)


def genai_export_folder(hf: Path, precision: str, out: Path) -> None:
    """onnxruntime-genai's builder on the Hugging Face folder ``hf``, for the CPU, into ``out``."""
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=".genai-cache-"))
    builder = "import runpy; runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')"
    command = [sys.executable, "-c", _HIDE_BROKEN_TORCHVISION + builder, "-i", str(hf)]
    command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(scratch)]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            done.check_returncode()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _optimum_export(arch: str, out: str) -> None:
    """Inside the Optimum venv: build ``arch`` with this transformers, export it with past."""
    _hide_broken_torchvision()
    # the venv sees spa's site packages (torch, onnx); a diffusers there is built for a newer
    # huggingface_hub than Optimum's, and Optimum imports it whenever it is found
    sys.modules["diffusers"] = None  # type: ignore[assignment]
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as hf:
        save_hf(arch, Path(hf))
        main_export(hf, output=out, task="text-generation-with-past", no_post_process=False)


# ---------------------------------------------------------------- pruning, in spa's environment


def prune(name: str, ratio: float, write: Path | None) -> dict:
    """``spa prune`` on export ``name`` as a user runs it; its exit code and the figures it reports."""
    folder = exported(name)
    out = Path(tempfile.mkdtemp()) if write is None else write / name
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.json"
    command = [sys.executable, "-m", "spa", "prune", str(folder / "model.onnx"), "--ratio", str(ratio)]
    command += ["-o", str(out / "model.onnx"), "--json", str(report)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    row = {"export": name, "exit": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if done.returncode:
        row["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if report.exists():
        row.update(_figures(json.loads(report.read_text())))
    if write is None:
        shutil.rmtree(out, ignore_errors=True)
    return row


def _figures(report: dict) -> dict:
    heads = [g for g in report.get("groups", []) if g.get("kind") == "heads"]
    after = sum(g["heads"] - g.get("removed", 0) * g["heads"] // g["channels"] for g in heads)
    return {
        "groups": f"{report['groups_found']}/{report['groups_prunable']}/{report['groups_pruned']}",
        "params": f"{report['params_before']} -> {report['params_after']}",
        "heads": f"{sum(g['heads'] for g in heads)} -> {after}",
        "frozen_heads": sum(1 for g in heads if g.get("frozen")),
        "valid": (report.get("validation") or {}).get("ok"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="*", help=f"default: all ({', '.join(EXPORTS)})")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--write", type=Path, help="keep the pruned folders here")
    parser.add_argument("--list", action="store_true", help="name the exports and where they are cached")
    parser.add_argument("--optimum-export", nargs=2, metavar=("ARCH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.optimum_export:
        _optimum_export(*args.optimum_export)
        return
    if args.list:
        for name in EXPORTS:
            print(name, export_dir(name))
        return
    rows = [prune(name, args.ratio, args.write) for name in args.exports or EXPORTS]
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
