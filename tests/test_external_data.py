"""Models whose weights live in external data take the same pipeline as inline ones: statistics,
compensation (layer-wise and sequential), calibration data, latency, targets, float16 and ORT
export; the same model saved either way gives the same pruned weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spa
from spa.core.tensors import is_lazy, to_array
from spa.formats.export import export, to_fp16
from spa.formats.load import load_model
from tests.builder import Graph

MODELS = Path(__file__).resolve().parents[1] / "models"


def _external(model: onnx.ModelProto, folder: Path, name: str = "ext.onnx") -> Path:
    path = folder / name
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the weights of what it is given to the file
    onnx.save(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{name}.data",
        size_threshold=0,
    )
    assert any(f.name != name for f in folder.iterdir()), "the weights went to a data file"
    return path


def _inline(model: onnx.ModelProto, folder: Path, name: str = "inline.onnx") -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: np.array(to_array(t)) for t in model.graph.initializer}


def assert_same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and wa[name].shape == wb[name].shape, name
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def _conv_net() -> onnx.ModelProto:
    g = Graph()
    x = g.input("x", ["batch", 3, 12, 12])
    h = g.op("Relu", [g.conv(x, 3, 16)])
    h = g.op("Relu", [g.conv(h, 16, 16)])
    g.output(g.conv(h, 16, 4))
    return g.build()


def _mlp() -> onnx.ModelProto:
    g = Graph()
    x = g.input("x", ["batch", 24])
    h = g.op("Relu", [g.op("Add", [g.op("MatMul", [x, g.weight(24, 32)]), g.weight(32)])])
    g.output(g.op("Add", [g.op("MatMul", [h, g.weight(32, 8)]), g.weight(8)]))
    return g.build()


BUILT = {"conv_net": _conv_net, "mlp": _mlp}


def _both(model: onnx.ModelProto, folder: Path) -> tuple[Path, Path]:
    (folder / "ext").mkdir()
    (folder / "inline").mkdir()
    return _external(model, folder / "ext"), _inline(model, folder / "inline")


@pytest.mark.parametrize("name", [*BUILT, "mnist_cnn.onnx", "mini_resnet.onnx", "digits_mlp.onnx"])
def test_external_and_inline_give_the_same_pruned_weights(tmp_path, name):
    model = BUILT[name]() if name in BUILT else onnx.load(str(MODELS / name))
    external, inline = _both(model, tmp_path)
    lazy, eager = spa.prune(external, ratio=0.3, bench=True), spa.prune(inline, ratio=0.3, bench=True)
    assert is_lazy(load_model(external))
    report = lazy.report
    assert report.statistics is not None and report.statistics["source"] == "synthetic"
    assert report.compensation["layers"] > 0 and not report.compensation["skipped"]
    assert report.validation.ok and report.validation.latency, "latency is timed"
    assert report.statistics == {**eager.report.statistics, "seconds": report.statistics["seconds"]}
    # figures computed from the statistics: equal to the bit only if the statistics are
    assert report.compensation == eager.report.compensation
    assert_same_weights(lazy.model, eager.model)


def test_calibration_and_the_sequential_refit_on_external_data(tmp_path):
    external, inline = _both(onnx.load(str(MODELS / "mnist_cnn.onnx")), tmp_path)
    calib = MODELS / "data" / "mnist_calib.npz"
    options = {"ratio": 0.4, "calib": calib, "calib_samples": 64, "refit": "sequential"}
    lazy, eager = spa.prune(external, **options), spa.prune(inline, **options)
    report = lazy.report
    assert report.statistics["source"] == "calibration"
    assert report.compensation["refit"] == "sequential" and report.compensation["sequential"]["layers"] > 0
    assert report.validation.fidelity is not None, "held-out samples measured the pruned model"
    lazy_outputs, eager_outputs = report.validation.fidelity.outputs, eager.report.validation.fidelity.outputs
    # sessions over files skip onnxruntime's weight prepacking: the same sums, in another order
    assert [o.relative_error for o in lazy_outputs] == pytest.approx([o.relative_error for o in eager_outputs], 1e-5)
    assert_same_weights(lazy.model, eager.model)


def test_refit_auto_chooses_alike_on_external_data(tmp_path):
    external, inline = _both(onnx.load(str(MODELS / "mnist_cnn.onnx")), tmp_path)
    options = {"ratio": 0.4, "calib": MODELS / "data" / "mnist_calib.npz", "calib_samples": 64}
    lazy, eager = spa.prune(external, **options), spa.prune(inline, **options)
    lazy_errors, eager_errors = lazy.report.compensation["held_out_error"], eager.report.compensation["held_out_error"]
    assert lazy_errors == pytest.approx(eager_errors, 1e-5)
    assert lazy.report.compensation["refit"] == eager.report.compensation["refit"]
    assert_same_weights(lazy.model, eager.model)


def test_refits_of_external_data_are_written_to_files_not_held(tmp_path):
    external, _ = _both(_conv_net(), tmp_path)
    pruned = spa.analyze(spa.load(external)).score().plan(0.5).apply()
    refitted = {t.name: t for t in pruned.weights.proto.graph.initializer}
    changed = [
        name for name, t in refitted.items() if t.external_data and "refit" in dict(_entries(t)).get("location", "")
    ]
    assert changed, "the refitted weights sit in the scratch data file"
    assert all(t.external_data for t in refitted.values() if np.prod(t.dims) * 4 >= 1024)


def _entries(tensor: onnx.TensorProto):
    return [(e.key, e.value) for e in tensor.external_data]


def test_round_to_auto_and_a_latency_target_run_on_external_data(tmp_path):
    external, _ = _both(onnx.load(str(MODELS / "mini_resnet.onnx")), tmp_path)
    rounded = spa.prune(external, ratio=0.3, round_to="auto")
    assert rounded.report.widths is not None and rounded.report.validation.ok
    targeted = spa.prune(external, target_latency=0.9)
    assert targeted.report.target is not None and targeted.report.validation.ok


def test_flops_target_gives_the_same_weights_with_external_data(tmp_path):
    external, inline = _both(onnx.load(str(MODELS / "mini_resnet.onnx")), tmp_path)
    lazy, eager = spa.prune(external, target_flops=0.6), spa.prune(inline, target_flops=0.6)
    assert_same_weights(lazy.model, eager.model)


def test_fp16_and_ort_exports_of_external_data_match_inline(tmp_path):
    external, inline = _both(onnx.load(str(MODELS / "mnist_cnn.onnx")), tmp_path)
    lazy, eager = load_model(external), load_model(inline)
    assert is_lazy(lazy)
    assert_same_weights(to_fp16(lazy), to_fp16(eager))
    pruned = spa.prune(external, ratio=0.3)
    export(pruned.model, tmp_path / "fp16.onnx", fp16=True)
    export(pruned.model, tmp_path / "pruned.ort", ort_format=True)
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)}
    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    from_ort = ort.InferenceSession(str(tmp_path / "pruned.ort"), options).run(None, feeds)[0]
    inline_pruned = spa.prune(inline, ratio=0.3).model
    expected = ort.InferenceSession(inline_pruned.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(from_ort, expected, rtol=1e-4, atol=1e-5)
    assert ort.InferenceSession(str(tmp_path / "fp16.onnx")).run(None, feeds)[0].shape == expected.shape


def test_a_default_torch_export_prunes_like_its_inline_copy(tmp_path):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
            self.head = torch.nn.Linear(16, 5)

        def forward(self, x):
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 16, 16),), str(path))
    if not (tmp_path / "net.onnx.data").exists():
        pytest.skip("this torch writes the weights inline")
    inline = _inline(onnx.load(str(path)), tmp_path, "inline.onnx")
    lazy, eager = spa.prune(path, ratio=0.3, bench=True), spa.prune(inline, ratio=0.3, bench=True)
    report = lazy.report
    assert report.statistics is not None and report.compensation["layers"] > 0 and report.validation.latency
    assert_same_weights(lazy.model, eager.model)


def test_sessions_leave_the_model_folder_as_it_was(tmp_path):
    external, _ = _both(_conv_net(), tmp_path)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in external.parent.iterdir()}
    spa.prune(external, ratio=0.3, bench=True)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in external.parent.iterdir()} == before


def test_the_model_loads_with_onnx_after_spa_ran_on_it(tmp_path):
    # onnx.load refuses a data file with a second hard link: spa's must not outlive its sessions
    external, _ = _both(_conv_net(), tmp_path)
    spa.prune(external, ratio=0.3, bench=True)
    data = next(p for p in external.parent.iterdir() if p != external)
    assert data.stat().st_nlink == 1
    onnx.load(str(external))
