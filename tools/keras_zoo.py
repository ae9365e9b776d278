"""Keras applications converted by tf2onnx, pruned by spa: what the TensorFlow path looks like.

    python tools/keras_zoo.py [--ratio 0.3] [--side 128] [--write DIR] [models...]
    python tools/keras_zoo.py --test-data      # regenerate tests/data/keras_patterns*.onnx

MobileNetV2, ResNet50 and EfficientNetB0 are built by ``keras.applications`` with
``weights=None`` (random, seeded: nothing is downloaded) on an NHWC input of ``--side`` pixels
(default 128: every layer and weight is the one of the 224 model, only the feature maps are
smaller, so spa's statistics and validation run faster), and converted with tf2onnx at opset 17.
``keras_patterns`` is a small functional model with one block of each (inverted residual with
ReLU6, bottleneck with a projection shortcut, MBConv with squeeze-excite and swish, a Dense head
after Flatten), small enough to be committed as a test file.

TensorFlow and tf2onnx pin an older protobuf and onnx than spa uses, so they live in their own
virtual environment, ``~/.cache/spa/tfvenv`` (``SPA_TF_VENV`` puts it elsewhere), created on first
use with ``tensorflow-cpu==2.15.1 tf2onnx==1.16.1 onnx==1.16.2 numpy<2`` (tf2onnx 1.16 supports
TF <= 2.15, the last Keras 2). This script runs itself in that environment (``--convert``) for the
conversion only; spa never imports TensorFlow. Converted models are cached in
``~/.cache/spa/keras`` (``SPA_KERAS_DIR``).

For every model it prints groups found, prunable and pruned, params and FLOPs before and after,
validation and time, then the same figures as one markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
OPSET = 17
VERSION = 2  # bump when a conversion changes, so cached files are rebuilt
SEED = 0
REQUIREMENTS = ("tensorflow-cpu==2.15.1", "tf2onnx==1.16.1", "onnx==1.16.2", "numpy<2")
APPLICATIONS = {"mobilenet_v2": "MobileNetV2", "resnet50": "ResNet50", "efficientnet_b0": "EfficientNetB0"}
# "_nhwc": tf2onnx's graph optimisers off, so the graph stays NHWC as TensorFlow computes it: a
# Transpose pair around every Conv, BatchNorm not folded, ReduceMean over axes 1 and 2
MODELS = (*APPLICATIONS, "keras_patterns", *(f"{name}_nhwc" for name in (*APPLICATIONS, "keras_patterns")))
PATTERNS_SIDE = 32


def venv_dir() -> Path:
    return Path(os.environ.get("SPA_TF_VENV", Path.home() / ".cache" / "spa" / "tfvenv"))


def cache_dir() -> Path:
    return Path(os.environ.get("SPA_KERAS_DIR", Path.home() / ".cache" / "spa" / "keras"))


def venv_python() -> Path:
    """The venv's interpreter, creating the venv (a few minutes, ~1 GB) when it is missing."""
    python, ready = venv_dir() / "bin" / "python", venv_dir() / "spa-installed"
    if ready.exists():
        return python
    print(
        f"creating {venv_dir()} with {' '.join(REQUIREMENTS)} (once; TensorFlow is kept out of "
        "spa's own environment because tf2onnx pins an older protobuf)",
        file=sys.stderr,
    )
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir())], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
    ready.touch()  # an interrupted install is redone, not taken for a working one
    return python


DEFAULT_SIDE = 128


def cached_path(name: str, side: int = DEFAULT_SIDE) -> Path:
    """Where the converted ``name`` at ``side`` pixels is cached (it may not be there yet)."""
    if name.startswith("keras_patterns"):
        side = PATTERNS_SIDE
    return cache_dir() / f"{name}_{side}_opset{OPSET}_v{VERSION}.onnx"


def converted(name: str, side: int = DEFAULT_SIDE) -> Path:
    """The cached ONNX file of ``name`` at ``side`` pixels, converting it first if needed."""
    path = cached_path(name, side)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        partial = path.with_suffix(".partial")
        subprocess.run([str(venv_python()), __file__, "--convert", name, str(side), str(partial)], check=True, env=env)
        partial.replace(path)  # a conversion cut short leaves nothing that looks cached
    return path


# ---------------------------------------------------------------- inside the TensorFlow venv


def _patterns_model(keras, layers):
    """One block of each kind the applications use, at toy widths."""

    def conv_bn(x, filters, kernel=1, strides=1, activation="relu"):
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.Activation(activation)(x) if activation else x

    inputs = keras.Input((PATTERNS_SIDE, PATTERNS_SIDE, 3), name="input")
    x = conv_bn(inputs, 16, 3, strides=2, activation="relu6")
    # MobileNetV2 inverted residual: expand, depthwise, project, add
    y = conv_bn(x, 48, activation="relu6")
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU(6.0)(y)
    y = conv_bn(y, 16, activation=None)
    x = layers.Add()([x, y])
    # ResNet bottleneck with a projection shortcut
    shortcut = conv_bn(x, 32, strides=2, activation=None)
    y = conv_bn(x, 8, strides=2)
    y = conv_bn(y, 8, 3)
    y = conv_bn(y, 32, activation=None)
    x = layers.Activation("relu")(layers.Add()([shortcut, y]))
    # EfficientNet MBConv: expand, depthwise, squeeze-excite, project
    y = conv_bn(x, 64, activation="swish")
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y)
    y = layers.Activation("swish")(layers.BatchNormalization()(y))
    se = layers.GlobalAveragePooling2D()(y)
    se = layers.Reshape((1, 1, 64))(se)
    se = layers.Conv2D(8, 1, activation="swish")(se)
    se = layers.Conv2D(64, 1, activation="sigmoid")(se)
    y = layers.Multiply()([y, se])
    y = conv_bn(y, 32, activation=None)
    x = layers.Add()([x, y])
    x = conv_bn(x, 24, strides=2)
    x = layers.Flatten()(x)
    x = layers.Dense(32, activation="relu")(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="keras_patterns")


def _set_batchnorm_statistics(tf, model, side: int) -> None:
    """Moving statistics from one batch of random images, as if trained.

    Freshly built, every BatchNorm holds mean 0 and variance 1, so activations shrink block
    after block: MobileNetV2's logits come out equal to 1e-10 and its softmax is a constant,
    against which soft == hard would hold whatever the cut did. With momentum 0 and a learning
    rate of 0, one training step copies the batch statistics and leaves the weights as built.
    """
    norms = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    if not norms:
        return
    for layer in norms:
        layer.momentum = 0.0
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=0.0), loss="categorical_crossentropy")
    rng = tf.random.Generator.from_seed(SEED)
    images = rng.normal((8, side, side, 3))
    labels = tf.one_hot(rng.uniform((8,), maxval=model.output_shape[-1], dtype=tf.int32), model.output_shape[-1])
    model.train_on_batch(images, labels)


def _convert(name: str, side: int, out: str) -> None:
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(SEED)
    base = name.removesuffix("_nhwc")
    if base == "keras_patterns":
        model = _patterns_model(tf.keras, tf.keras.layers)
    else:
        model = getattr(tf.keras.applications, APPLICATIONS[base])(weights=None, input_shape=(side, side, 3))
    _set_batchnorm_statistics(tf, model, side)
    signature = [tf.TensorSpec((None, side, side, 3), tf.float32, name="input")]
    tf2onnx.convert.from_keras(
        model,
        input_signature=signature,
        opset=OPSET,
        output_path=out,
        optimizers={} if name.endswith("_nhwc") else None,
    )


# ---------------------------------------------------------------- pruning, in spa's environment


def prune(name: str, path: Path, ratio: float, write: Path | None) -> dict:
    from prune_wheels import summarise  # spa's environment only, not the TF venv

    import spa

    start = time.perf_counter()
    result = spa.prune(path, ratio=ratio, check=True)
    seconds = time.perf_counter() - start
    v = result.report.validation
    soft = "soft==hard " + ("no exact group pruned" if v.soft_equal is None else f"{v.soft_max_rel_error:.1e}")
    row = summarise(name, path, result, seconds, soft)
    if v.soft_equal is None:
        row["soft"] = "no exact group pruned"
    if write is not None:
        import onnx

        write.mkdir(parents=True, exist_ok=True)
        onnx.save(result.model, str(write / f"{path.stem}.pruned.onnx"))
    return row


def table(rows: list[dict], ratio: float, side: int) -> str:
    from prune_wheels import table_lines

    return "\n".join(
        [
            f"ratio {ratio}, input {side}x{side} NHWC (keras_patterns {PATTERNS_SIDE}x{PATTERNS_SIDE}), "
            f"tf2onnx 1.16.1 opset {OPSET}, random weights",
            "",
        ]
        + table_lines(rows)
    )


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--convert":
        _convert(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument(
        "--side", type=int, default=DEFAULT_SIDE, help=f"input height and width (default {DEFAULT_SIDE})"
    )
    parser.add_argument("--write", type=Path, help="folder to write the pruned models to")
    parser.add_argument(
        "--test-data",
        action="store_true",
        help=f"(re)write {TEST_DATA.relative_to(ROOT)}/keras_patterns{{,_nhwc}}.onnx",
    )
    parser.add_argument("models", nargs="*", choices=[[], *MODELS], help="default: all")
    args = parser.parse_args()
    if args.test_data:
        TEST_DATA.mkdir(parents=True, exist_ok=True)
        for name in ("keras_patterns", "keras_patterns_nhwc"):
            target = TEST_DATA / f"{name}.onnx"
            target.write_bytes(converted(name, PATTERNS_SIDE).read_bytes())
            print(f"wrote {target} ({target.stat().st_size / 1e3:.0f} kB)")
        return 0
    sys.path.insert(0, str(ROOT))
    rows = [prune(name, converted(name, args.side), args.ratio, args.write) for name in args.models or MODELS]
    print()
    print(table(rows, args.ratio, args.side))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
