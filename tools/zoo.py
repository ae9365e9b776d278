"""Build the test zoo: torchvision architectures and small nets that isolate hard patterns.

    python tools/zoo.py --out .zoo                # everything, both exporters
    python tools/zoo.py --out .zoo resnet18 unet  # a few

Models get random weights (nothing is downloaded). Each model is exported with
the legacy exporter (opset 17, dynamic batch axis) and the dynamo exporter.
Files already present are reused, so the tests build the zoo once and cache it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

EXPORTERS = ("legacy", "dynamo")
ZOO_VERSION = 2  # bump when an export changes, so cached zoos are rebuilt

# name -> input side length; torchvision builds them with weights=None
TORCHVISION = {
    "resnet18": 64,
    "resnet50": 64,
    "resnext50_32x4d": 64,
    "wide_resnet50_2": 64,
    "mobilenet_v2": 64,
    "mobilenet_v3_small": 64,
    "mobilenet_v3_large": 64,
    "efficientnet_b0": 64,
    "efficientnet_v2_s": 64,
    "mnasnet0_5": 64,
    "densenet121": 64,
    "googlenet": 64,
    "inception_v3": 96,
    "shufflenet_v2_x1_0": 64,
    "squeezenet1_1": 64,
    "regnet_x_400mf": 64,
    "regnet_y_400mf": 64,
    "convnext_tiny": 64,
    "vgg11_bn": 224,
    "alexnet": 224,
    "fcn_resnet50": 64,
    "lraspp_mobilenet_v3_large": 64,
}
SMALL = (
    "unet",
    "c2f",
    "concat_height",
    "split_consumers",
    "multi_io",
    "flatten_gemm",
    "conv1d",
    "conv3d",
    "grouped_conv",
    "pixel_shuffle",
    "bn_preserved",
    "channel_shuffle",
    "depthwise_multiplier",
    "se_layer_scale",
    "group_norm",
)
ALL = tuple(TORCHVISION) + SMALL


def import_torchvision():
    """torchvision's compiled ops do not load on the CPU wheel; the builders work without them."""
    import torch

    original = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: lambda fn: fn
    try:
        import torchvision
    finally:
        torch.library.register_fake = original
    return torchvision


def _small_models():
    import torch
    from torch import nn

    def block(cin, cout, k=3):
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc1, self.enc2 = block(3, 16), block(16, 32)
            self.pool = nn.MaxPool2d(2)
            self.mid = block(32, 64)
            self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
            self.dec2 = block(64, 32)
            self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
            self.dec1 = block(32, 16)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            e1 = self.enc1(x)
            e2 = self.enc2(self.pool(e1))
            m = self.mid(self.pool(e2))
            d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
            d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
            return self.head(d1)

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1, self.cv2 = block(c, c), block(c, c)

        def forward(self, x):
            return x + self.cv2(self.cv1(x))

    class C2f(nn.Module):
        """YOLOv8's C2f: chunk in two, grow a list of bottleneck outputs, concat all."""

        def __init__(self, c1=16, c2=32, n=2):
            super().__init__()
            self.stem = block(3, c1)
            self.c = c2 // 2
            self.cv1 = block(c1, 2 * self.c, 1)
            self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
            self.cv2 = block((2 + n) * self.c, c2, 1)
            self.head = nn.Conv2d(c2, 4, 1)

        def forward(self, x):
            y = list(self.cv1(self.stem(x)).chunk(2, 1))
            y.extend(m(y[-1]) for m in self.m)
            return self.head(self.cv2(torch.cat(y, 1)))

    class ConcatHeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = block(3, 16), block(3, 16), block(16, 24)
            self.head = nn.Conv2d(24, 3, 1)

        def forward(self, x):
            return self.head(self.c(torch.cat([self.a(x), self.b(x)], 2)))

    class SplitConsumers(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = block(3, 32)
            self.left, self.right = block(12, 16), block(20, 16)
            self.head = nn.Conv2d(16, 5, 1)

        def forward(self, x):
            a, b = torch.split(self.stem(x), [12, 20], 1)
            return self.head(self.left(a) * torch.sigmoid(self.right(b)))

    class MultiIO(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = block(3, 24), block(1, 24)
            self.trunk = block(24, 32)
            self.cls = nn.Linear(32, 7)
            self.seg = nn.Conv2d(32, 2, 1)

        def forward(self, rgb, depth):
            t = self.trunk(self.a(rgb) + self.b(depth))
            return self.cls(t.mean((2, 3))), self.seg(t)

    class FlattenGemm(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(block(3, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2))
            self.fc1, self.fc2 = nn.Linear(32 * 8 * 8, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(torch.flatten(self.features(x), 1))))

    class Conv1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv1d(2, 16, 5, padding=2),
                nn.BatchNorm1d(16),
                nn.ReLU(),
                nn.Conv1d(16, 32, 3, padding=1, groups=2),
                nn.ReLU(),
                nn.Conv1d(32, 32, 3, padding=1, groups=32),
                nn.ReLU(),
            )
            self.fc = nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(self.net(x).mean(-1))

    class Conv3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv3d(1, 8, 3, padding=1),
                nn.BatchNorm3d(8),
                nn.ReLU(),
                nn.Conv3d(8, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool3d(2),
                nn.Conv3d(16, 16, 1),
                nn.ReLU(),
            )
            self.head = nn.Conv3d(16, 3, 1)

        def forward(self, x):
            return self.head(self.net(x))

    class GroupedConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = block(3, 32)
            self.grouped = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, groups=4), nn.BatchNorm2d(64), nn.ReLU())
            self.grouped2 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=8), nn.ReLU())
            self.head = nn.Conv2d(64, 3, 1)

        def forward(self, x):
            return self.head(self.grouped2(self.grouped(self.stem(x))))

    class PixelShuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = block(3, 32)
            self.expand = nn.Conv2d(32, 16 * 4, 3, padding=1)
            self.shuffle = nn.PixelShuffle(2)
            self.b = block(16, 16)
            self.unshuffle = nn.PixelUnshuffle(2)
            self.head = nn.Conv2d(64, 3, 1)

        def forward(self, x):
            return self.head(self.unshuffle(self.b(self.shuffle(self.expand(self.a(x))))))

    class ChannelShuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = block(3, 16), block(3, 16)
            self.after = block(32, 24)
            self.head = nn.Conv2d(24, 3, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.head(self.after(y))

    class DepthwiseMultiplier(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = block(3, 16)
            self.dw = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=16), nn.BatchNorm2d(32), nn.ReLU6())
            self.head = nn.Conv2d(32, 3, 1)

        def forward(self, x):
            return self.head(self.dw(self.a(x)))

    class SELayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = block(3, 32)
            self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
            self.scale = nn.Parameter(torch.rand(32, 1, 1) + 0.5)
            self.b = nn.Conv2d(32, 32, 3, padding=1)
            self.head = nn.Conv2d(32, 3, 1)

        def forward(self, x):
            y = self.a(x)
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            y = y + self.scale * self.b(y * s)
            return self.head(nn.functional.hardswish(y))

    image = (1, 3, 32, 32)
    return {
        "unet": (UNet, [image]),
        "c2f": (C2f, [image]),
        "concat_height": (ConcatHeight, [image]),
        "split_consumers": (SplitConsumers, [image]),
        "multi_io": (MultiIO, [image, (1, 1, 32, 32)]),
        "flatten_gemm": (FlattenGemm, [image]),
        "conv1d": (Conv1d, [(1, 2, 64)]),
        "conv3d": (Conv3d, [(1, 1, 8, 16, 16)]),
        "grouped_conv": (GroupedConv, [image]),
        "pixel_shuffle": (PixelShuffle, [image]),
        "bn_preserved": (FlattenGemm, [image]),
        "channel_shuffle": (ChannelShuffle, [image]),
        "depthwise_multiplier": (DepthwiseMultiplier, [image]),
        "se_layer_scale": (SELayerScale, [image]),
        "group_norm": (_group_norm_cnn, [image]),
    }


def _group_norm_cnn():
    from zoo_diffusion import group_norm_cnn

    return group_norm_cnn()


def _build(name: str):
    if name in TORCHVISION:
        tv = import_torchvision()
        builder = getattr(tv.models.segmentation if name.startswith(("fcn", "lraspp")) else tv.models, name)
        kwargs = {"weights": None}
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=True)
        if name.startswith("fcn"):
            kwargs.update(weights_backbone=None, aux_loss=False)
        if name.startswith("lraspp"):
            kwargs.update(weights_backbone=None)
        model = builder(**kwargs)
        if name.startswith(("fcn", "lraspp")):
            model = _OutTensor(model)
        side = TORCHVISION[name]
        return model, [(1, 3, side, side)]
    factory, shapes = _small_models()[name]
    return factory(), shapes


def _OutTensor(inner):
    """Segmentation models return a dict; export its 'out' tensor."""
    import torch

    class OutTensor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    return OutTensor()


def export(name: str, exporter: str, out_dir: Path) -> Path:
    """Export one model (cached: an existing file is returned as is)."""
    import torch

    path = Path(out_dir) / exporter / f"{name}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, shapes = _build(name)
    model.eval()
    _randomise_norms(model)
    args = tuple(torch.randn(*s) for s in shapes)
    input_names = [f"input{i}" for i in range(len(args))]
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            kwargs = {}
            if name == "bn_preserved":
                kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
            outputs = model(*args)
            n_out = len(outputs) if isinstance(outputs, tuple) else 1
            output_names = [f"output{i}" for i in range(n_out)]
            axes = {n: {0: "batch"} for n in input_names + output_names}
            torch.onnx.export(
                model,
                args,
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                **kwargs,
            )
        else:
            torch.onnx.export(model, args, str(tmp), dynamo=True, input_names=input_names, verbose=False)
    _finish(tmp, path)
    return path


def _randomise_norms(model) -> None:
    """Fresh BatchNorms are identities and ConvNeXt's layer scales start at 1e-6, which would hide
    whole branches below float32 precision; random values make soft == hard a real check."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            scale = getattr(module, "layer_scale", None)
            if isinstance(scale, torch.nn.Parameter):
                scale.uniform_(0.5, 1.5)


def _finish(tmp: Path, path: Path) -> None:
    """Rewrite into one self-contained file (the dynamo exporter writes weights beside it)."""
    import onnx

    model = onnx.load(str(tmp))
    data = tmp.with_name(tmp.name + ".data")
    if model.ByteSize() < 1_800_000_000:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    tmp.unlink()
    if data.exists():
        data.unlink()


# small random-weight transformers for attention-head tests: (model, exporter) pairs. "ort" is the
# legacy export of an eager-attention BERT passed through onnxruntime's BERT fusions (Attention,
# SkipLayerNormalization, BiasGelu). BERT has dynamic batch and sequence axes; ViT a static batch,
# as torch's multi-head attention merges batch and heads into one axis. "dynamo23" is the dynamo
# export at opset 23 of a Llama on scaled_dot_product_attention: ONNX's Attention, RotaryEmbedding
# and RMSNormalization ops instead of their decompositions.
ATTENTION = (
    ("tiny_bert", "legacy"),
    ("tiny_bert", "dynamo"),
    ("tiny_bert", "ort"),
    ("tiny_vit", "legacy"),
    ("tiny_vit", "dynamo"),
    ("tiny_llama_gqa", "legacy"),
    ("tiny_llama_gqa", "dynamo"),
    ("tiny_llama_gqa", "dynamo23"),
    ("tiny_llama_mqa", "legacy"),
    ("tiny_llama_mqa", "dynamo"),
    ("tiny_llama_mqa", "dynamo23"),
)
TINY_BERT = {
    "vocab_size": 100,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "initializer_range": 0.2,
}  # ten times BERT's: attention far from uniform, so heads matter
# a Llama decoder (RoPE, RMSNorm, SwiGLU) with grouped-query attention: 8 query heads share 2 KV heads
# (4 each) in "gqa", 1 KV head in "mqa"; repeat_kv expands K and V to every query head
TINY_LLAMA = {
    "vocab_size": 100,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "initializer_range": 0.2,
}
KV_HEADS = {"tiny_llama_gqa": 2, "tiny_llama_mqa": 1}


def export_attention(name: str, exporter: str, out_dir: Path) -> Path:
    """Export one of ``ATTENTION`` (cached: an existing file is returned as is)."""

    def build(tmp: Path) -> None:
        if name == "tiny_bert":
            _export_bert(tmp, exporter)
        elif name in KV_HEADS:
            _export_llama(tmp, exporter, KV_HEADS[name])
        else:
            _export_vit(tmp, exporter)

    return _cached_transformer(Path(out_dir) / "attention" / f"{name}-{exporter}.onnx", build)


def _cached_transformer(path: Path, build) -> Path:
    """``path`` if it exists, else ``build(tmp)`` run quietly with seed 0 and moved there."""
    import torch

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    import_torchvision()  # before transformers, which imports it with the fake-op registration that fails here
    torch.manual_seed(0)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        build(tmp)
    _finish(tmp, path)
    return path


def _export_bert(tmp: Path, exporter: str) -> None:
    import torch
    from transformers import BertConfig, BertModel

    eager = {"attn_implementation": "eager"} if exporter == "ort" else {}  # the fusions match eager attention

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(BertConfig(**TINY_BERT, **eager))

        def forward(self, input_ids, attention_mask):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state, out.pooler_output

    model = Encoder().eval()
    args = (torch.randint(0, TINY_BERT["vocab_size"], (2, 16)), torch.ones(2, 16, dtype=torch.int64))
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["last_hidden_state", "pooler_output"]}
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=64)
        torch.onnx.export(
            model,
            args,
            str(tmp),
            dynamo=True,
            verbose=False,
            **names,
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
        )
        return
    axes = {n: {0: "batch", 1: "seq"} for n in names["input_names"] + names["output_names"][:1]}
    axes[names["output_names"][1]] = {0: "batch"}
    torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=17, dynamic_axes=axes, **names)
    if exporter == "ort":
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(
            str(tmp),
            model_type="bert",
            num_heads=TINY_BERT["num_attention_heads"],
            hidden_size=TINY_BERT["hidden_size"],
            opt_level=0,
        )
        fused.save_model_to_file(str(tmp))


def _export_llama(tmp: Path, exporter: str, kv_heads: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaModel

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # dynamo23: scaled_dot_product_attention, which torch writes as ONNX Attention from opset 23
            attention = "sdpa" if exporter == "dynamo23" else "eager"
            config = LlamaConfig(**TINY_LLAMA, num_key_value_heads=kv_heads, attn_implementation=attention)
            self.llama = LlamaModel(config)

        def forward(self, input_ids, attention_mask):
            return self.llama(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    model = Decoder().eval()
    # the mask is explicit: without it the legacy exporter fails on aten::diff
    args = (torch.randint(0, TINY_LLAMA["vocab_size"], (2, 16)), torch.ones(2, 16, dtype=torch.int64))
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["last_hidden_state"]}
    if exporter in ("dynamo", "dynamo23"):
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=64)
        opset = {"opset_version": 23} if exporter == "dynamo23" else {}
        torch.onnx.export(
            model,
            args,
            str(tmp),
            dynamo=True,
            verbose=False,
            **names,
            **opset,
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
        )
        return
    axes = {n: {0: "batch", 1: "seq"} for n in names["input_names"] + names["output_names"]}
    torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=17, dynamic_axes=axes, **names)


# small random-weight transformers whose output is not the hidden state, so the hidden (embedding)
# dimension can shrink: a BERT classifier, and Llama language models with the output embedding tied to
# the input one or not. Llama's RMSNorm is written out (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul) by
# both exporters; BERT's LayerNorm is one op. Constant folding stores the lm head as its own transposed
# copy of the table, untying it, so the tied legacy export is made without folding: its lm head is
# MatMul(h, Transpose(table)) on the table the embedding Gather reads (every other linear layer reads
# its weight through a Transpose too).
HIDDEN = (
    ("bert_classifier", "legacy"),
    ("bert_classifier", "dynamo"),
    ("llama_tied", "legacy"),
    ("llama_tied", "dynamo"),
    ("llama_untied", "legacy"),
    ("llama_untied", "dynamo"),
)
TINY_LM = {
    "vocab_size": 100,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "initializer_range": 0.2,
}


def export_hidden(name: str, exporter: str, out_dir: Path) -> Path:
    """Export one of ``HIDDEN`` (cached: an existing file is returned as is)."""

    def build(tmp: Path) -> None:
        if name == "bert_classifier":
            _export_bert_classifier(tmp, exporter)
        else:
            _export_language_model(tmp, exporter, tied=name == "llama_tied")

    return _cached_transformer(Path(out_dir) / "hidden" / f"{name}-{exporter}.onnx", build)


def _export_text(model, tmp: Path, exporter: str, output: str, fold: bool = True) -> None:
    """input_ids and attention_mask [batch, seq] in, one output [batch, ...] out."""
    import torch

    vocab = model.config.vocab_size
    args = (torch.randint(0, vocab, (2, 16)), torch.ones(2, 16, dtype=torch.int64))
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": [output]}
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=64)
        torch.onnx.export(
            model,
            args,
            str(tmp),
            dynamo=True,
            verbose=False,
            **names,
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
        )
        return
    axes = {n: {0: "batch", 1: "seq"} for n in names["input_names"]}
    axes[output] = {0: "batch", 1: "seq"} if output == "logits" and model.config.model_type == "llama" else {0: "batch"}
    torch.onnx.export(
        model, args, str(tmp), dynamo=False, opset_version=17, dynamic_axes=axes, do_constant_folding=fold, **names
    )


def _export_bert_classifier(tmp: Path, exporter: str) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=3))
            self.config = self.bert.config

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    _export_text(Classifier().eval(), tmp, exporter, "logits")


def _export_language_model(tmp: Path, exporter: str, tied: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class LanguageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llama = LlamaForCausalLM(LlamaConfig(**TINY_LM, tie_word_embeddings=tied, use_cache=False))
            self.config = self.llama.config
            with torch.no_grad():  # fresh RMSNorm weights are all ones: random ones make the scores differ
                for module in self.llama.modules():
                    if type(module).__name__.endswith("RMSNorm"):
                        module.weight.uniform_(0.5, 1.5)

        def forward(self, input_ids, attention_mask):
            return self.llama(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    _export_text(LanguageModel().eval(), tmp, exporter, "logits", fold=not tied)


def _export_vit(tmp: Path, exporter: str) -> None:
    import torch

    tv = import_torchvision()
    model = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    ).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.5)  # torchvision zeroes the head: every output would be 0
    args = (torch.randn(1, 3, 32, 32),)
    names = {"input_names": ["image"], "output_names": ["logits"]}
    if exporter == "dynamo":
        torch.onnx.export(model, args, str(tmp), dynamo=True, verbose=False, **names)
    else:
        torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=17, **names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"models (default: all {len(ALL)})")
    parser.add_argument("--out", default=os.environ.get("SPA_ZOO_DIR", ".zoo"))
    parser.add_argument("--exporter", choices=EXPORTERS, action="append")
    args = parser.parse_args(argv)
    for name in args.names or ALL:
        for exporter in args.exporter or EXPORTERS:
            try:
                print(export(name, exporter, Path(args.out)))
            except Exception as exc:  # report and go on: one broken export should not stop the zoo
                print(f"FAILED {exporter}/{name}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
