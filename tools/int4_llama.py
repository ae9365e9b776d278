"""A tiny random-weight Llama, exported without a cache and quantized to 4 bits, pruned by spa.

    python tools/int4_llama.py --ratio 0.3 [--out DIR]

Builds transformers' LlamaForCausalLM (hidden 256, 4 layers, 8 query / 2 KV heads, random
weights: no download), exports it with ``torch.onnx.export(dynamo=True)``, quantizes its MatMuls
with onnxruntime's MatMulNBitsQuantizer (4-bit, blocks of 32) as MatMulNBits and as QDQ
(DequantizeLinear with block_size), and prunes the float model and both quantized ones at the same
ratio. Prints params before and after, the groups pruned and whether each pruned model validated.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _without_torchvision() -> None:
    # a torchvision built for another torch breaks transformers' import; the model needs none of it
    find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a, **k: (  # type: ignore[assignment]
        None if name.split(".")[0] == "torchvision" else find_spec(name, *a, **k)
    )


def export(folder: Path) -> Path:
    _without_torchvision()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    path = folder / "llama.onnx"
    ids = torch.randint(0, config.vocab_size, (1, 16))
    torch.onnx.export(
        Logits(model),
        (ids,),
        str(path),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamo=True,
        dynamic_shapes={"input_ids": {1: "sequence"}},
    )
    return path


def quantize(path: Path, qdq: bool) -> Path:
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    form = QuantFormat.QDQ if qdq else QuantFormat.QOperator
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, bits=4, quant_format=form)
    logging.disable(logging.WARNING)  # the quantizer logs every node
    quantizer = MatMulNBitsQuantizer(copy.deepcopy(onnx.load(str(path))), algo_config=config)
    quantizer.process()
    logging.disable(logging.NOTSET)
    out = path.with_name(f"llama-int4-{'qdq' if qdq else 'nbits'}.onnx")
    onnx.save(quantizer.model.model, str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--out", type=Path, help="keep the models here (default: a temporary folder)")
    args = parser.parse_args()
    import spa

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        dense = export(folder)
        for path in (dense, quantize(dense, qdq=False), quantize(dense, qdq=True)):
            report = spa.prune(str(path), ratio=args.ratio, check=False).report
            print(
                f"{path.name:24} params {report.params_before:,} -> {report.params_after:,}; "
                f"groups pruned {report.groups_pruned}; valid {report.validation.ok}"
            )


if __name__ == "__main__":
    main()
