"""tools/onnx_torch.py, the torch evaluator behind ``ocr_data_free.py inversion``: it must compute
what onnxruntime computes, or the inversion optimises a different model."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
import onnx_torch  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"


def _onnxruntime(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("name", ["mnist_cnn", "mnist_rescnn", "mnist_dwse", "digits_mlp", "mini_resnet"])
def test_shipped_models_match_onnxruntime(name):
    model = onnx.load(MODELS / f"{name}.onnx")
    info = model.graph.input[0]
    shape = [d.dim_value if d.dim_value > 0 else 3 for d in info.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = _onnxruntime(model, {info.name: x})
    with torch.no_grad():
        outputs, _ = onnx_torch.run(model, {info.name: torch.from_numpy(x)})
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def _batchnorm_model(mean: np.ndarray, variance: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    tensors = [weight] + [
        numpy_helper.from_array(v.astype(np.float32), n)
        for n, v in (
            ("scale", rng.uniform(0.5, 2, 4)),
            ("bias", rng.standard_normal(4)),
            ("mean", mean),
            ("variance", variance),
        )
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "variance"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 1, 1])],
        tensors,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_batchnorm_inputs_and_gradients_reach_the_input():
    mean, variance = np.array([0.5, -1.0, 2.0, 0.0]), np.array([1.0, 4.0, 0.25, 9.0])
    model = _batchnorm_model(mean, variance)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    images = torch.from_numpy(x).requires_grad_(True)
    outputs, batchnorm_inputs = onnx_torch.run(model, {"x": images})
    np.testing.assert_allclose(outputs[0].detach().numpy(), _onnxruntime(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    value, running_mean, running_variance = batchnorm_inputs["bn"]
    assert tuple(value.shape) == (2, 4, 8, 8)
    np.testing.assert_allclose(running_mean.numpy(), mean)
    np.testing.assert_allclose(running_variance.numpy(), variance)
    outputs[0].sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_an_operator_without_a_rule_is_named():
    node = helper.make_node("Erf", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "erf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(NotImplementedError, match="Erf"):
        onnx_torch.run(model, {"x": torch.zeros(2)})
