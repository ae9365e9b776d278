"""A small Llama-style language model trained on English text found offline on this machine.

    python tools/train_lm.py [--minutes 28] [--steps 5000] [--force]
    python tools/train_lm.py --export-only

Perplexity only means something on a model that has learnt a language, so this trains one:
a Llama decoder (GQA with 8 query and 2 key/value heads, RoPE, RMSNorm, SwiGLU; hidden 256,
4 layers, FFN 768, 5.11M parameters) on Python's documentation topics (``pydoc_data.topics``) and
standard-library docstrings, Debian's English manual pages (``/usr/share/man/man*``, roff stripped
to text) and text under ``/usr/share/doc`` (README*, *.txt, changelogs, copyright files). A
byte-level BPE tokenizer (4096 tokens, ``<s>``/``</s>``) is trained on the same text first.

Documents are split by a hash of their name: 5% are held out and never trained on. Everything is
cached in ``~/.cache/spa/lm`` (``SPA_LM_DIR``): ``hf/`` (the transformers folder and tokenizer),
``train.npy`` and ``heldout.npy`` (token ids, documents separated by ``</s>``), ``log.json`` and
the exports ``genai-fp32/``, ``genai-int4/`` (onnxruntime-genai's builder) and ``optimum/``
(Optimum ``text-generation-with-past``, run in its own venv as tools/llm_zoo.py does).

Training is seeded and stops at ``--minutes`` of wall time or ``--steps`` steps, whichever comes
first. The learning rate follows a cosine to whichever of the two comes first, so a run stopped
by the clock on a slow machine still ends annealed. The schedule then depends on the machine's
speed, so the same seed gives the same weights only where the same number of steps fits. It
prints the training and held-out loss as it goes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import llm_zoo  # noqa: E402

SEED = 0
LENGTH = 128  # training and evaluation window, in tokens
VOCAB = 4096
SIZES = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
)
SPECIALS = ["<s>", "</s>", "<pad>"]
HELDOUT_PERCENT = 5
MAX_DOC_CHARS = 40_000  # one long changelog should not outweigh a thousand manual pages
MAX_CORPUS_CHARS = 40_000_000
# modules whose import opens a browser, prints, starts a GUI or a test run
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "test"}


def lm_dir() -> Path:
    return Path(os.environ.get("SPA_LM_DIR", Path.home() / ".cache" / "spa" / "lm"))


# ---------------------------------------------------------------- the corpus


def _pydoc_topics():
    from pydoc_data.topics import topics

    for name, text in sorted(topics.items()):
        yield f"pydoc:{name}", text


def _docstrings():
    import contextlib
    import importlib
    import inspect
    import io
    import warnings

    for name in sorted(sys.stdlib_module_names):
        if name in SKIP_MODULES or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform modules that do not import here are skipped
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                parts.append(f"{attr}\n{inspect.getdoc(value) or ''}")
        text = "\n\n".join(p for p in parts if p.strip())
        if text:
            yield f"docstring:{name}", text


_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string registers
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^%:/,~ 0]"), " "),
    (re.compile(r"\\s[-+]?\d"), ""),
    (re.compile(r"\\[nw]\S+"), ""),
    (re.compile(r'\\".*'), ""),
]
_TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "IP", "TP", "TH", "Nm", "Nd"}


def roff_to_text(roff: str) -> str:
    """Plain text of a manual page: macro lines keep their words, escapes go."""
    lines = []
    for line in roff.splitlines():
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro not in _TEXT_MACROS or not rest:
                continue
            line = rest.replace('"', "")
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        line = line.replace("\\", "")
        lines.append(line.strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _man_pages():
    for path in sorted(Path("/usr/share/man").glob("man*/*")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        text = raw.decode("utf-8", "replace")
        if text.startswith(".so "):  # a link to another page
            continue
        yield f"man:{path.name}", roff_to_text(text)


def _doc_files():
    root = Path("/usr/share/doc")
    for path in sorted(root.rglob("*")):
        name = path.name.lower()
        wanted = name.startswith("readme") or name.endswith(".txt") or name == "copyright"
        wanted = wanted or (name.startswith("changelog") and name.endswith(".gz"))
        if not wanted or not path.is_file() or path.is_symlink():
            continue
        try:
            raw = path.read_bytes()
            if name.endswith(".gz"):
                raw = gzip.decompress(raw)
        except OSError:
            continue
        if b"\0" in raw[:4096]:
            continue
        yield f"doc:{path.relative_to(root)}", raw.decode("utf-8", "replace")


def corpus() -> list[tuple[str, str]]:
    """(name, text) of every document, deduplicated, in a fixed order."""
    seen, docs, total = set(), [], 0
    for source in (_pydoc_topics, _docstrings, _man_pages, _doc_files):
        for name, text in source():
            text = text[:MAX_DOC_CHARS].strip()
            digest = hashlib.sha256(text.encode()).digest()
            if len(text) < 200 or digest in seen:
                continue
            seen.add(digest)
            docs.append((name, text))
            total += len(text)
            if total > MAX_CORPUS_CHARS:
                return docs
    return docs


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


# ---------------------------------------------------------------- tokenizer and token files


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tokenize(tokenizer, texts: list[str]):
    import numpy as np

    eos = tokenizer.convert_tokens_to_ids("</s>")
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for row in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def prepare_data(folder: Path):
    """The tokenizer and the train / held-out token files, built once."""
    import numpy as np

    hf = folder / "hf"
    if (folder / "heldout.npy").exists() and (hf / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        return (
            PreTrainedTokenizerFast.from_pretrained(hf),
            np.load(folder / "train.npy"),
            np.load(folder / "heldout.npy"),
        )
    start = time.perf_counter()
    docs = corpus()
    train = [text for name, text in docs if not held_out(name)]
    test = [text for name, text in docs if held_out(name)]
    print(
        f"corpus: {len(docs)} documents, {sum(len(t) for _, t in docs) / 1e6:.1f}M characters, "
        f"{len(test)} held out ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    tokenizer = train_tokenizer(train)
    hf.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(hf)
    train_ids, test_ids = tokenize(tokenizer, train), tokenize(tokenizer, test)
    np.save(folder / "train.npy", train_ids)
    np.save(folder / "heldout.npy", test_ids)
    (folder / "documents.json").write_text(json.dumps({"train": len(train), "heldout": len(test)}))
    print(f"tokens: {len(train_ids) / 1e6:.2f}M train, {len(test_ids) / 1e6:.2f}M held out", flush=True)
    return tokenizer, train_ids, test_ids


# ---------------------------------------------------------------- training


def build_model():
    import transformers

    config = transformers.LlamaConfig(**SIZES)
    return transformers.LlamaForCausalLM(config)


def windows(ids, count: int, generator):
    import torch

    starts = torch.randint(0, len(ids) - LENGTH - 1, (count,), generator=generator)
    return torch.stack([torch.from_numpy(ids[s : s + LENGTH].astype("int64")) for s in starts.tolist()])


def heldout_loss(model, batches) -> float:
    import torch

    with torch.no_grad():
        return sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)


def train(folder: Path, minutes: float, steps: int, batch: int, lr: float) -> None:
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    tokenizer, train_ids, test_ids = prepare_data(folder)
    model = build_model()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    generator = torch.Generator().manual_seed(SEED)
    held = [windows(test_ids, 16, torch.Generator().manual_seed(SEED + i)) for i in range(4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup, deadline, start = min(100, steps // 10), time.monotonic() + minutes * 60, time.monotonic()
    log, step, recent = [], 0, []
    while step < steps and time.monotonic() < deadline:
        # the cosine runs to whichever cap comes first, so a wall-time stop still ends annealed
        progress = max(step / steps, (time.monotonic() - start) / (minutes * 60))
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        model.train()
        batch_ids = windows(train_ids, batch, generator)
        loss = model(input_ids=batch_ids, labels=batch_ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(loss.item())
        step += 1
        if step % 50 == 0 or step == steps:
            model.eval()
            test = heldout_loss(model, held)
            entry = dict(
                step=step, train=sum(recent) / len(recent), heldout=test, seconds=round(time.monotonic() - start)
            )
            log.append(entry)
            recent = []
            print(
                f"step {step}: train {entry['train']:.3f}  held-out {test:.3f} (ppl {math.exp(test):.1f})  "
                f"{entry['seconds']} s",
                flush=True,
            )
    model.eval()
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    (folder / "log.json").write_text(json.dumps({"steps": step, "batch": batch, "lr": lr, "log": log}, indent=1))
    print(f"saved {folder / 'hf'} after {step} steps", flush=True)


# ---------------------------------------------------------------- exports


def export_genai(folder: Path, precision: str) -> Path:
    def export(out: Path) -> None:
        llm_zoo.genai_export_folder(folder / "hf", precision, out)

    return llm_zoo.built(folder / f"genai-{precision}", "model.onnx", export)


def export_optimum(folder: Path) -> Path:
    def export(out: Path) -> None:
        command = [str(llm_zoo.venv_python()), __file__, "--optimum-export", str(folder / "hf"), str(out)]
        subprocess.run(command, check=True)

    return llm_zoo.built(folder / "optimum", "model.onnx", export)


def _optimum_export(hf: str, out: str) -> None:
    """Inside the Optimum venv: rebuild the model with that transformers from our sizes, load the
    trained weights, and export (a config saved by a newer transformers need not load in an older)."""
    sys.modules["diffusers"] = None  # type: ignore[assignment]
    from optimum.exporters.onnx import main_export
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    model = build_model()
    model.load_state_dict(load_file(str(Path(hf) / "model.safetensors")), strict=False)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        PreTrainedTokenizerFast.from_pretrained(hf).save_pretrained(scratch)
        main_export(scratch, output=out, task="text-generation-with-past", no_post_process=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=28.0, help="wall-time cap of the training (default 28)")
    parser.add_argument("--steps", type=int, default=5000, help="step cap of the training (default 5000)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--force", action="store_true", help="train again even if a model is cached")
    parser.add_argument("--export-only", action="store_true", help="only export the cached model")
    parser.add_argument("--no-optimum", action="store_true", help="skip the Optimum export")
    parser.add_argument("--optimum-export", nargs=2, metavar=("HF", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    llm_zoo._load_torchvision()  # before anything imports transformers
    if args.optimum_export:
        _optimum_export(*args.optimum_export)
        return
    folder = lm_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if not args.export_only and (args.force or not (folder / "hf" / "model.safetensors").exists()):
        train(folder, args.minutes, args.steps, args.batch, args.lr)
        for stale in ("genai-fp32", "genai-int4", "optimum"):
            shutil.rmtree(folder / stale, ignore_errors=True)
    for precision in ("fp32", "int4"):
        print("exported", export_genai(folder, precision), flush=True)
    if not args.no_optimum:
        print("exported", export_optimum(folder), flush=True)


if __name__ == "__main__":
    main()
