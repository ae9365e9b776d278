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

``--onnxsim`` also runs onnxsim 0.8.1's ``apply_attention_head_pruning``, then
``apply_structured_pruning_matmul_nbits`` and ``apply_structured_pruning``, each with its ratio
argument (``sparsity``) at ``--ratio``, on the same export, and checks both outputs the same way
(``check_decoder``): onnxruntime runs a prefill and a decode step fed the model's own cache, with
finite logits, and a genai folder generates with onnxruntime_genai (onnxsim writes no config: its
folder gets the input's, as it is). ``--table FILE`` stores both as rows of the model table
(``tools/results/model_table.json``; ``python tools/render_results.py`` renders them).
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VERSION = 2  # bump when a build or export changes, so cached folders are rebuilt
SEED = 0
OPTIMUM_REQUIREMENTS = ("optimum-onnx==0.1.0", "transformers==4.57.1")
ARCHS = ("llama", "qwen2", "mistral", "gemma", "phi3")
# the genai builder refuses this Phi3 config (KeyError 'multi_cache': it expects Phi3's long-rope scaling)
GENAI = tuple(f"{arch}-genai-{precision}" for arch in ARCHS if arch != "phi3" for precision in ("fp32", "int4"))
OPTIMUM = tuple(f"{arch}-optimum" for arch in ARCHS)
EXPORTS = (*GENAI, *OPTIMUM)
SIZES = dict(
    hidden_size=256,
    # not the vocabulary's 512: the genai builder takes any (vocab, hidden) projection for the LM head,
    # and with equal sizes its logits read layer 0's MLP input, so layers 1-3 never reach them
    intermediate_size=640,
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
# (a CUDA wheel beside a CPU torch) fails to register its compiled ops' fake kernels, and with it
# every model class that reads torchvision.transforms (Qwen2, GPT-OSS). Its Python side works:
# load it with that registration skipped (as tools/zoo.py does for the CNN zoo), so transformers
# finds a usable torchvision whenever it asks, in this process or in a builder it starts.
_LOAD_TORCHVISION = """
import sys
try:
    import torchvision
except Exception:
    for _name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[_name]
    import torch
    _register = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: lambda fn: fn
    try:
        import torchvision
    finally:
        torch.library.register_fake = _register
"""


def _load_torchvision() -> None:
    exec(_LOAD_TORCHVISION, {})


# ---------------------------------------------------------------- the Hugging Face models


def hf_config(arch: str):
    """The transformers config of ``arch`` at toy sizes (whichever transformers runs this)."""
    _load_torchvision()
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
    _load_torchvision()
    import torch
    import transformers

    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch)).eval()
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)


def built(folder: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``folder``, built first by ``build`` where it holds no ``marker`` file: into a scratch folder
    beside it, moved into place whole, so a build cut short leaves nothing that looks cached."""
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        build(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.replace(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def hf_folder(arch: str) -> Path:
    return built(cache_dir() / f"hf-{arch}-v{VERSION}", "config.json", lambda out: save_hf(arch, out))


# ---------------------------------------------------------------- exports


def export_dir(name: str) -> Path:
    return cache_dir() / f"{name}-v{VERSION}"


def exported(name: str) -> Path:
    """The cached folder of export ``name`` (its ``model.onnx`` inside), exporting it first if needed."""
    arch, exporter, *precision = name.split("-")

    def export(out: Path) -> None:
        if exporter == "genai":
            _genai_export(arch, precision[0], out)
            _check_lm_head(out / "model.onnx")
        else:
            subprocess.run([str(venv_python()), __file__, "--optimum-export", arch, str(out)], check=True)

    return built(export_dir(name), "model.onnx", export)


def _genai_export(arch: str, precision: str, out: Path) -> None:
    genai_export_folder(hf_folder(arch), precision, out)


def genai_export_folder(hf: Path, precision: str, out: Path, extra_options: tuple[str, ...] = ()) -> None:
    """onnxruntime-genai's builder on the Hugging Face folder ``hf``, for the CPU, into ``out``
    (``extra_options``: the builder's ``key=value`` options)."""
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=".genai-cache-"))
    builder = "import runpy; runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')"
    command = [sys.executable, "-c", _LOAD_TORCHVISION + builder, "-i", str(hf)]
    command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(scratch)]
    if extra_options:
        command += ["--extra_options", *extra_options]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            done.check_returncode()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_lm_head(model_path: Path) -> None:
    """Refuse an export whose logits do not read the final norm: layers after the one they read
    would prune without changing the logits, and no validation could see a wrong cut there."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    heads = [node for node in model.graph.node if node.name.startswith("/lm_head/")]
    reads = {name for node in heads for name in node.input}
    if heads and not any("final_norm" in name for name in reads):
        raise RuntimeError(f"{model_path}: the LM head reads {sorted(reads)}, not the final norm")


def _optimum_export(arch: str, out: str) -> None:
    """Inside the Optimum venv: build ``arch`` with this transformers, export it with past."""
    _load_torchvision()
    # the venv sees spa's site packages (torch, onnx); a diffusers there is built for a newer
    # huggingface_hub than Optimum's, and Optimum imports it whenever it is found
    sys.modules["diffusers"] = None  # type: ignore[assignment]
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as hf:
        save_hf(arch, Path(hf))
        main_export(hf, output=out, task="text-generation-with-past", no_post_process=False)


# ---------------------------------------------------------------- pruning, in spa's environment


def prune(name: str, ratio: float, write: Path | None) -> tuple[dict, dict]:
    """``spa prune`` on export ``name`` as a user runs it: its exit code and the figures it reports,
    the check of the folder it wrote (``check_decoder``), and its JSON report."""
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
    written = json.loads(report.read_text()) if report.exists() else {}
    if written:
        row.update(_figures(written))
    if not done.returncode:
        row["check"] = check_decoder(out, "-genai-" in name)
    if write is None:
        shutil.rmtree(out, ignore_errors=True)
    return row, written


# ---------------------------------------------------------------- checks, alike for spa and onnxsim


def _line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]


def generate(folder: Path, length: int = 12) -> list[int]:
    """Greedy tokens onnxruntime_genai generates from the folder after a 4-token prompt."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([[1, 5, 9, 12]])
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def check_decoder(folder: Path, genai: bool) -> str:
    """ "valid" when onnxruntime runs the folder's model on a prefill and on a decode step fed its
    own cache, with finite logits, and (genai) onnxruntime_genai generates from the folder; else why not."""
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from spa.core import decoder

    path = folder / "model.onnx"
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        model = onnx.load(str(path), load_external_data=False)
        steps = decoder.rollout(model, lambda feed: dict(zip(names, session.run(None, feed))))
    except Exception as exc:
        return f"prefill/decode: {_line(exc)}"
    if not all(np.isfinite(step["logits"]).all() for step in steps):
        return "logits not finite"
    if genai:
        try:
            if len(generate(folder)) != 8:
                return "genai: stopped early"
        except Exception as exc:
            return f"genai: {_line(exc)}"
    return "valid"


def counted_params(path: Path) -> int | None:
    """Parameters as spa counts them (int4 values, not bytes), for any model."""
    sys.path.insert(0, str(ROOT))
    from spa.formats.model import Model
    from spa.reporting.metrics import count

    try:
        return count(Model.load(path).graph).params
    except Exception:
        return None


def heads_per_layer(path: Path) -> int | None:
    """Query heads of each attention layer where the layers agree (the graph's own figures)."""
    import onnx

    sys.path.insert(0, str(ROOT))
    from spa.formats.runtime_config import graph_sizes

    return graph_sizes(onnx.load(str(path), load_external_data=False))[0].get("num_attention_heads")


ONNXSIM_STEPS = ("apply_attention_head_pruning", "apply_structured_pruning_matmul_nbits", "apply_structured_pruning")


def onnxsim_prune(name: str, ratio: float, out: Path) -> dict:
    """onnxsim's three structured passes on export ``name``, each at ``sparsity=ratio``, written to ``out``
    with the input folder's side files (configs, tokenizer) as they are."""
    import onnx
    from onnxsim import pruning as sim

    folder = exported(name)
    model = onnx.load(str(folder / "model.onnx"))
    start, failed = time.perf_counter(), {}
    for step in ONNXSIM_STEPS:
        try:
            model = getattr(sim, step)(model, sparsity=ratio)
        except Exception as exc:
            failed[step] = _line(exc)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    for side in folder.iterdir():
        if side.is_file() and not side.name.startswith("model.onnx"):
            shutil.copyfile(side, out / side.name)
    verdict = check_decoder(out, "-genai-" in name)
    row = {"verdict": verdict, "params_after": counted_params(out / "model.onnx"), "seconds": seconds}
    row["heads"] = heads_per_layer(out / "model.onnx")
    return {**row, "failed": failed} if failed else row


def _figures(report: dict) -> dict:
    # with query heads as the unit, the KV heads the cache keeps are groups of their own: not counted again
    heads = [
        g
        for g in report.get("groups", [])
        if g.get("kind") == "heads" or (g.get("kind") == "query_heads" and g.get("kv_heads"))
    ]
    after = sum(g["heads"] - g.get("removed", 0) * g["heads"] // g["channels"] for g in heads)
    return {
        "groups": f"{report['groups_found']}/{report['groups_prunable']}/{report['groups_pruned']}",
        "params": f"{report['params_before']} -> {report['params_after']}",
        "heads": f"{sum(g['heads'] for g in heads)} -> {after}",
        "frozen_heads": sum(1 for g in heads if g.get("frozen")),
        "unit": report["options"].get("attention"),
        "valid": (report.get("validation") or {}).get("ok"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="*", help=f"default: all ({', '.join(EXPORTS)})")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--write", type=Path, help="keep the pruned folders here")
    parser.add_argument("--list", action="store_true", help="name the exports and where they are cached")
    parser.add_argument("--onnxsim", action="store_true", help="also prune with onnxsim 0.8.1, checked alike")
    parser.add_argument(
        "--table", type=Path, help="store the rows in this model-table JSON (rows of other models kept)"
    )
    parser.add_argument("--optimum-export", nargs=2, metavar=("ARCH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.optimum_export:
        _optimum_export(*args.optimum_export)
        return
    if args.list:
        for name in EXPORTS:
            print(name, export_dir(name))
        return
    table = json.loads(args.table.read_text()) if args.table and args.table.exists() else []
    for name in args.exports or EXPORTS:
        row, report = prune(name, args.ratio, args.write)
        sim = None
        if args.onnxsim:
            with tempfile.TemporaryDirectory() as scratch:
                sim = onnxsim_prune(name, args.ratio, Path(scratch) / name)
            row["onnxsim"] = sim
        print(json.dumps(row), flush=True)
        if args.table:
            entry = table_row(name, row, report, sim)
            table = [r for r in table if (r["model"], r["exporter"]) != (entry["model"], entry["exporter"])] + [entry]
            args.table.write_text(json.dumps(table, indent=1, default=str))
    if args.table:  # the builder's refusal, kept as a row with its reason
        refused = {"model": "phi3", "exporter": "onnxruntime-genai", "not_built": PHI3_GENAI}
        table = [r for r in table if (r["model"], r["exporter"]) != ("phi3", "onnxruntime-genai")] + [refused]
        args.table.write_text(json.dumps(table, indent=1, default=str))


PHI3_GENAI = "the genai builder fails on this Phi3 config (KeyError 'multi_cache' in the builder)"


def table_row(name: str, row: dict, report: dict, sim: dict | None) -> dict:
    """The export's row of the model table (``tools/render_results.py``): spa as the CLI ran it,
    and onnxsim beside it, both judged by ``check_decoder``."""
    sys.path.insert(0, str(ROOT))
    from spa.reporting.group_layers import is_ffn

    arch, exporter, *precision = name.split("-")
    label = "onnxruntime-genai" if exporter == "genai" else "optimum"
    entry: dict = {"model": arch, "exporter": f"{label} {precision[0]}" if precision else label, "dynamic": True}
    verdict = row.get("check") or f"exit {row['exit']}: {row.get('error', '')}"[:200]
    spa_row = {"verdict": verdict, "seconds": row["seconds"]}
    if report:
        groups = report["groups"]
        heads = [
            g for g in groups if g.get("kind") == "heads" or (g.get("kind") == "query_heads" and g.get("kv_heads"))
        ]
        ffn = [g for g in groups if is_ffn(g)]
        other = [
            g for g in groups if g.get("kind") is None and g not in ffn and not g.get("frozen") and g["channels"] > 1
        ]
        validation = report["validation"]
        spa_row.update(
            params_before=report["params_before"],
            params_after=report["params_after"],
            flops_before=report["flops_before"],
            flops_after=report["flops_after"],
            soft_equal=validation.get("soft_equal"),
            soft_max_rel_error=validation.get("soft_max_rel_error"),
            heads=[
                {
                    "heads": g["heads"],
                    "head_dim": g["head_dim"],
                    "heads_after": g["heads"] - g.get("removed", 0) * g["heads"] // g["channels"],
                    "frozen": g.get("frozen"),
                }
                for g in heads
            ],
            ffn_found=len(ffn),
            ffn_pruned=sum(g.get("removed", 0) > 0 for g in ffn),
            other_prunable=len(other),
            other_pruned=sum(g.get("removed", 0) > 0 for g in other),
            unit=report["options"].get("attention"),
        )
    entry["spa"] = spa_row
    if sim is not None:
        entry["onnxsim"] = sim
    return entry


if __name__ == "__main__":
    main()
