"""Tiny mixture-of-experts decoders exported as people deploy them, with experts removed by spa.

    python tools/moe_zoo.py [--remove-experts 1] [--ratio 0.3] [exports...]

Built by transformers from a config alone (random weights, seeded: nothing is downloaded), cached
in ``~/.cache/spa/llm`` beside ``tools/llm_zoo.py``'s dense zoo (``SPA_LLM_DIR``):

- ``gptoss-genai-fp32``: GPT-OSS (hidden 128, 2 layers, 4 experts, top 2) through
  onnxruntime-genai's builder on the CPU: onnxruntime's fused ``MoE`` op (SwiGLU with interleaved
  gate and up rows, stacked expert weights, a router MatMul and bias). Its layers are all full
  attention and its local-window cache is off (``windowed_kv_cache=false``): a windowed layer's
  cache must hold the whole window before the first token, which a prompt-sized feed does not.
  The builder's other MoE architectures need CUDA (PhiMoE), an MXFP4 checkpoint (GPT-OSS int4),
  or linear-attention and convolution layers spa does not prune around (Qwen3.5-MoE, LFM2-MoE,
  Granite-MoE-hybrid).
- ``mixtral-dynamo``: Mixtral (hidden 64, 2 layers, 4 experts, top 2) through
  ``torch.onnx.export(dynamo=True)``, its experts run by transformers' ``batched_mm``: the
  decomposed routing (Softmax, TopK, the top-k indices gathering the stacked expert weights).
  transformers' default ``grouped_mm`` experts have no ONNX translation.

For every export it prints the exit code of ``spa prune``, params and experts before and after,
and whether the pruned model validated (and, for the genai export, whether it generates).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import llm_zoo

VERSION = 1  # bump when a build or export changes, so cached folders are rebuilt
EXPORTS = ("gptoss-genai-fp32", "mixtral-dynamo")
VOCAB = 512


def _config(arch: str):
    llm_zoo._load_torchvision()
    import transformers

    common = dict(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gptoss":
        return transformers.GptOssConfig(
            hidden_size=128,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=256,
            layer_types=["full_attention", "full_attention"],
            **common,
        )
    return transformers.MixtralConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        **common,
    )


def _model(arch: str, experts: str | None = None):
    """``arch`` with seeded random weights, the zero-initialised ones (GPT-OSS's expert biases and
    router) drawn too, so that every expert differs."""
    llm_zoo._load_torchvision()
    import torch
    import transformers

    torch.manual_seed(llm_zoo.SEED)
    extra = {"experts_implementation": experts} if experts else {}
    model = transformers.AutoModelForCausalLM.from_config(_config(arch), **extra).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name and not parameter.abs().sum():
                parameter.normal_(0, 0.02)
    return model


def folder(name: str) -> Path:
    return llm_zoo.cache_dir() / f"{name}-v{VERSION}"


def exported(name: str) -> Path:
    """The cached folder of export ``name`` (its ``model.onnx`` inside), exporting it first if needed."""
    return llm_zoo.built(folder(name), "model.onnx", _genai if name == "gptoss-genai-fp32" else _dynamo)


def _genai(out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=llm_zoo.cache_dir()) as scratch:
        hf = Path(scratch) / "hf"
        _model("gptoss").save_pretrained(hf)
        llm_zoo._tokenizer().save_pretrained(hf)
        # a windowed GroupQueryAttention refuses the prompt-sized caches spa feeds it (capacity below the window)
        llm_zoo.genai_export_folder(hf, "fp32", out, ("windowed_kv_cache=false",))


def _dynamo(out: Path) -> None:
    import torch

    model = _model("mixtral", experts="batched_mm")

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(llm_zoo.SEED))
    torch.onnx.export(Logits(model), (ids,), str(out / "model.onnx"), dynamo=True, input_names=["input_ids"])
    (out / "config.json").write_text(model.config.to_json_string())


def generates(folder: Path) -> bool:
    """Whether onnxruntime-genai generates from the folder's model and config."""
    return len(llm_zoo.generate(folder, length=16)) == 12  # after the 4-token prompt


def prune(name: str, remove: float, ratio: float, write: Path) -> dict:
    """``spa prune`` on the export, its report's figures."""
    source = exported(name) / "model.onnx"
    out, report = write / name / "model.onnx", write / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "spa", "prune", str(source), "-o", str(out), "--json", str(report), "--force"]
    command += ["--ratio", str(ratio), "--remove-experts", str(remove), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=llm_zoo.ROOT)
    row = {"export": name, "exit": done.returncode}
    if not report.exists():
        return {**row, "error": done.stderr.strip()[-300:]}
    data = json.loads(report.read_text())
    experts, validation = data.get("experts") or {}, data["validation"]
    row.update(
        params=f"{data['params_before']} -> {data['params_after']}",
        experts=f"{experts.get('experts_before')} -> {experts.get('experts_after')}",
        valid=not validation["problems"],
        decode=validation.get("decode_checked"),
    )
    if name.startswith("gptoss") and done.returncode == 0:
        row["generates"] = generates(out.parent)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="*", help=f"of {', '.join(EXPORTS)} [all]")
    parser.add_argument("--remove-experts", type=float, default=1)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--write", type=Path, help="where the pruned models go [a temporary folder]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        write = args.write or Path(scratch)
        for name in args.exports or EXPORTS:
            if name not in EXPORTS:
                parser.error(f"unknown export '{name}' (choose from {', '.join(EXPORTS)})")
            print(json.dumps(prune(name, args.remove_experts, args.ratio, write)), flush=True)


if __name__ == "__main__":
    main()
