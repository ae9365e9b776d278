"""Models from exporters other than torch's: tf2onnx (Keras) and paddle2onnx (PP-OCR).

TensorFlow is not a test dependency: the two Keras files in tests/data are committed, written by
``python tools/keras_zoo.py --test-data`` (tf2onnx 1.16.1, opset 17, random seeded weights, in
its own venv). ``keras_patterns`` has one block of each kind the Keras applications use
(MobileNetV2's inverted residual, ResNet's bottleneck with a projection shortcut,
EfficientNet's MBConv with squeeze-excite, a Dense head after Flatten); ``_nhwc`` is the same
model converted with tf2onnx's optimisers off, so it stays NHWC: a Transpose pair around every
Conv, ReduceMean over axes 1 and 2, Reshape to [N, 1, 1, C] for the excitation.

The PP-OCR detector and direction classifier come from the rapidocr-onnxruntime 1.4.4 wheel,
fetched once with ``pip download`` by tools/prune_wheels.py (skipped when it cannot be).
"""

import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builder import Graph, prune_exact
from onnx import TensorProto, helper

from spa.core.runtime import IMAGE_SIDE, input_shapes

DATA = Path(__file__).resolve().parent / "data"


def run(model, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Outputs of ``model`` (a proto or a path), any tensor of it by name."""
    model = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    declared = {o.name for o in model.graph.output}
    for name in outputs or []:
        if name not in declared:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def conv_widths(model: onnx.ModelProto) -> list[int]:
    """Output channels of every Conv, from shape inference (tf2onnx's raw graphs compute the
    depthwise kernels with a Transpose and a Reshape, so not every weight is an initializer)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: v.type.tensor_type.shape for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return [shapes[n.output[0]].dim[1].dim_value for n in model.graph.node if n.op_type == "Conv"]


# ------------------------------------------------------------------------------ tf2onnx (Keras)


@pytest.mark.parametrize("name", ["keras_patterns", "keras_patterns_nhwc"])
def test_keras_blocks_through_tf2onnx_prune_every_group(name):
    path = DATA / f"{name}.onnx"
    dense = onnx.load(str(path))
    assert all(conv_widths(dense))
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)}
    # BatchNorm statistics were set from a batch at conversion: the output depends on the input,
    # so the soft == hard check below compares something
    assert run(dense, feeds)[0].std(axis=0).max() > 1e-3
    transposes = sum(n.op_type == "Transpose" for n in dense.graph.node)
    # optimised: one Transpose at the input and one back to NHWC before Flatten; raw: around every op
    assert transposes == (2 if name == "keras_patterns" else 54)

    result = prune_exact(path, 0.3)
    report = result.report
    # frozen: the input's 3 colours and the 10 classes under Softmax; everything else goes
    assert (report.groups_found, report.groups_prunable, report.groups_pruned) == (11, 9, 9)
    assert report.validation.soft_equal is True
    assert all(after < before for before, after in zip(conv_widths(dense), conv_widths(result.model)))
    assert sum(n.op_type == "Transpose" for n in result.model.graph.node) == transposes
    assert report.params_after < 0.6 * report.params_before


def test_channel_last_batchnorm_add_and_spatial_mean_follow_the_transpose():
    # the NHWC patterns of tf2onnx's graphs without its optimisers, isolated: Conv between two
    # Transposes, a channel-last per-channel scale and bias (Mul, Add on the last axis), and
    # squeeze-excite as a ReduceMean over axes 1 and 2 and a Reshape to [N, 1, 1, C]
    g = Graph()
    x = g.input("x", [1, 8, 8, 3])
    h = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    h = g.op("Transpose", [g.conv(h, 3, 6)], perm=[0, 2, 3, 1])
    h = g.op("Relu", [g.op("Add", [g.op("Mul", [h, g.weight(6)]), g.weight(6)])])
    squeeze = g.op("ReduceMean", [h], axes=[1, 2], keepdims=0)
    excite = g.op("Reshape", [squeeze, g.const(np.array([-1, 1, 1, 6], dtype=np.int64))])
    h = g.op("Mul", [h, g.op("Sigmoid", [excite])])
    h = g.op("Transpose", [h], perm=[0, 3, 1, 2])
    g.output(g.conv(h, 6, 4))
    model = g.build()

    result = prune_exact(model, 0.5)
    assert result.report.groups_pruned == 1 and result.report.validation.soft_equal is True
    assert conv_widths(result.model) == [3, 4]
    assert any(n.op_type == "Reshape" for n in result.model.graph.node)


# ------------------------------------------------------------------------------ validation inputs


def fpn_model(batch) -> onnx.ModelProto:
    """Input [batch, 3, H, W] with H and W free: five stride-2 Convs, a 32x Resize back up and a
    Concat with the full-resolution features, as PP-OCR det's feature pyramid does."""
    g = Graph()
    x = g.input("x", [batch, 3, "h", "w"])
    full = g.conv(x, 3, 4)
    low = full
    for _ in range(5):
        low = g.op("Conv", [low, g.weight(4, 4, 3, 3)], pads=[1, 1, 1, 1], strides=[2, 2])
    up = g.op("Resize", [low, "", g.const(np.float32([1, 1, 32, 32]))], mode="nearest")
    g.output(g.conv(g.op("Concat", [full, up], axis=1), 8, 2))
    return g.build()


@pytest.mark.parametrize("batch", ["n", -1])  # paddle2onnx declares a free batch as -1
def test_free_image_sides_are_validated_at_a_size_a_feature_pyramid_accepts(batch):
    model = fpn_model(batch)
    assert input_shapes(model)["x"][2:] == [IMAGE_SIDE, IMAGE_SIDE]
    result = prune_exact(model, 0.5)  # at 1x1 the dense model cannot run, and validation failed
    assert result.report.groups_pruned == 6  # the full-resolution Conv, five downsampling ones
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value >= 0


# ------------------------------------------------------------------------------ paddle2onnx (PP-OCR)


def test_a_batch_declared_as_minus_one_becomes_a_free_axis():
    from spa.formats.canonicalize import canonicalize

    model = canonicalize(fpn_model(-1))
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch.HasField("dim_value") and not batch.HasField("dim_param")


def test_paddle_flatten_with_a_negative_concat_axis_keeps_the_classifier_channels():
    # paddle2onnx's flatten: Reshape(x, Concat(axis=-1)[Cast(Slice(Cast(Shape(x)))), [C]]); with free
    # image sides at opset 11 only onnxruntime's symbolic inference resolves it, and only with axis 0
    g = Graph(opset=11)
    x = g.input("x", [-1, 3, "h", "w"])
    pooled = g.op("GlobalAveragePool", [g.op("Relu", [g.conv(x, 3, 8)])])
    sizes = g.op("Cast", [g.op("Shape", [pooled])], to=TensorProto.INT32)
    batch = g.op("Slice", [sizes, *(g.const(np.int64([k])) for k in (0, 1, 0, 1))])
    target = g.op("Concat", [g.op("Cast", [batch], to=TensorProto.INT64), g.const(np.int64([8]))], axis=-1)
    flat = g.op("Reshape", [pooled, target])
    g.output(g.op("MatMul", [flat, g.weight(8, 2)]))
    result = prune_exact(g.build(), 0.5)
    assert result.report.groups_pruned == 1 and conv_widths(result.model) == [4]
    assert result.report.validation.soft_equal is True


def wheel_model(name: str) -> Path:
    import prune_wheels

    try:
        path = prune_wheels.cached_model(name, fetch=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot fetch rapidocr-onnxruntime: {exc}")
    if path is None:
        pytest.skip("rapidocr-onnxruntime wheel not available")
    return path


def test_ppocr_direction_classifier_prunes():
    path = wheel_model("ppocr_cls")
    result = prune_exact(path, 0.3)
    report = result.report
    # frozen: the 3 colours and the 2 directions under Softmax; the 200 channels before the
    # flatten prune too (see the negative Concat axis above)
    assert (report.groups_found, report.groups_prunable, report.groups_pruned) == (28, 26, 26)
    assert report.validation.soft_equal is True
    assert report.params_after < 0.7 * report.params_before


def test_ppocr_detector_prunes_and_soft_equals_hard_before_the_sigmoid():
    import prune_wheels

    dense = prune_wheels.with_logits(onnx.load(str(wheel_model("ppocr_det"))))
    image = np.random.default_rng(1).standard_normal((1, 3, 96, 64)).astype(np.float32)
    probabilities, logits = run(dense, {"x": image}, [o.name for o in dense.graph.output])
    # on noise a trained detector finds no text: its probabilities are ~0 dense, soft and hard
    # alike, so validation compares the logits too, which it sees as a second output
    assert probabilities.max() < 1e-3 and logits.std() > 0.1
    result = prune_exact(dense, 0.3)
    report = result.report
    assert report.groups_prunable >= 30 and report.groups_pruned == report.groups_prunable
    assert report.params_after < 0.7 * report.params_before
    assert report.validation.soft_equal is True and 0 < report.validation.soft_max_rel_error < 1e-4
