"""Loading: external data, weights in Constant nodes, Identity-routed and deduplicated weights."""

import numpy as np
import onnx
import pytest
from builder import Graph, analysis_of, group_at, prune_exact
from click.testing import CliRunner
from onnx import helper, numpy_helper

import spa
from spa.cli.commands import main
from spa.formats.canonicalize import canonicalize
from spa.formats.load import load_model


def _two_conv_model():
    g = Graph()
    x = g.input("x", ["batch", 3, 6, 6])
    h = g.op("Relu", [g.conv(x, 3, 8)])
    g.output(g.conv(h, 8, 2))
    return g.build(), h


def test_external_data_is_loaded_and_pruned(tmp_path):
    model, _ = _two_conv_model()
    path = tmp_path / "ext.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext.onnx.data").exists()
    result = spa.prune(path, ratio=0.5)
    assert result.report.validation.ok and result.report.params_after < result.report.params_before


def test_missing_external_data_is_a_load_error(tmp_path):
    model, _ = _two_conv_model()
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="w.data", size_threshold=0)
    (tmp_path / "w.data").unlink()
    with pytest.raises(spa.ModelLoadError, match="not found"):
        load_model(path)


def test_weights_in_constant_nodes_are_handled_like_initializers():
    """paddle2onnx and tf2onnx keep weights in Constant nodes."""
    model, hidden = _two_conv_model()
    graph = model.graph
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    del graph.initializer[:]
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    group = group_at(analysis_of(model), hidden)
    assert group.prunable and group.size == 8
    prune_exact(model, 0.5)


def test_identity_routed_weights_are_unwrapped():
    model, hidden = _two_conv_model()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    model.graph.node.insert(0, helper.make_node("Identity", [conv.input[1]], ["w_alias"]))
    conv.input[1] = "w_alias"
    canonical = canonicalize(model)
    assert not any(n.op_type == "Identity" for n in canonical.graph.node)
    prune_exact(model, 0.5)


def test_folded_constants_leave_no_dead_initializers_behind():
    """onnxruntime's quantize_dynamic adds each Conv bias through Reshape(bias, [1, C, 1, 1]);
    folding it made a new initializer, and the original and its shape stayed in the pruned model,
    unread (onnxruntime warns about each)."""
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    bias = g.op("Reshape", [g.weight(8), g.const(np.array([1, 8, 1, 1], np.int64), "bias_shape")])
    h = g.op("Relu", [g.op("Add", [g.op("Conv", [x, g.weight(8, 3, 3, 3)], pads=[1, 1, 1, 1]), bias])])
    g.output(g.conv(h, 8, 2))
    model = g.build()
    canonical = canonicalize(model)
    read = {name for node in canonical.graph.node for name in node.input}
    assert "bias_shape" not in {t.name for t in canonical.graph.initializer}
    assert {t.name for t in canonical.graph.initializer} <= read
    pruned = prune_exact(model, 0.5).model
    assert {t.name for t in pruned.graph.initializer} <= {name for node in pruned.graph.node for name in node.input}


def test_an_initializer_that_is_also_an_input_is_not_folded():
    """Such an initializer is a default the caller may override (onnxruntime treats it so):
    folding ops that read it would freeze its default into the model."""
    g = Graph()
    x = g.input("x", [4])
    g.output(
        g.op("Add", [x, g.op("Mul", [g.const(np.full(4, 2.0, np.float32), "d"), g.const(np.full(4, 3.0, np.float32))])])
    )
    model = g.build()
    model.graph.input.append(helper.make_tensor_value_info("d", onnx.TensorProto.FLOAT, [4]))
    canonical = canonicalize(model)
    assert [n.op_type for n in canonical.graph.node] == ["Mul", "Add"]
    assert "d" in {t.name for t in canonical.graph.initializer}


def test_shared_all_zero_bias_does_not_couple_unrelated_convs():
    """Exporters deduplicate equal tensors: one zero bias can feed every conv of a network."""
    g = Graph()
    x = g.input("x", [1, 3, 6, 6])
    zero = g.const(np.zeros(8, dtype=np.float32), "shared_zero")
    a = g.op("Relu", [g.op("Conv", [x, g.weight(8, 3, 3, 3), zero], pads=[1, 1, 1, 1])])
    b = g.op("Relu", [g.op("Conv", [a, g.weight(8, 8, 3, 3), zero], pads=[1, 1, 1, 1])])
    g.output(g.conv(b, 8, 2))
    analysis = analysis_of(g.build())
    assert group_at(analysis, a) is not group_at(analysis, b)
    assert group_at(analysis, a).prunable and group_at(analysis, b).prunable


def test_truly_tied_weights_stay_coupled():
    g = Graph()
    x = g.input("x", [1, 8, 6, 6])
    shared = g.weight(8, 8, 1, 1)
    a = g.op("Relu", [g.op("Conv", [x, shared])])
    b = g.op("Conv", [a, shared])
    g.output(g.conv(g.op("Relu", [b]), 8, 2))
    analysis = analysis_of(g.build())
    # the weight's in axis is the graph input's channel axis, so the tie freezes a and b too
    assert group_at(analysis, a) is group_at(analysis, b)
    assert not group_at(analysis, a).prunable


def test_symbolic_batch_survives_pruning():
    model, _ = _two_conv_model()
    result = prune_exact(model, 0.5)
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    from spa.core.runtime import run, sample_inputs

    for batch in (1, 3):
        feeds = sample_inputs(result.model, batch=batch)
        assert next(iter(run(result.model, feeds).values())).shape[0] == batch


def test_ratio_zero_reproduces_the_dense_model_exactly():
    model, _ = _two_conv_model()
    result = spa.prune(model, ratio=0.0)
    assert result.report.validation.dense_equal is True
    dense = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for tensor in result.model.graph.initializer:
        assert np.array_equal(numpy_helper.to_array(tensor), dense[tensor.name])


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    model, _ = _two_conv_model()
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save(
        model, str(tmp_path / "outside.onnx"), save_as_external_data=True, location="secret.data", size_threshold=0
    )
    for location in ("../secret.data", str(tmp_path / "secret.data")):
        victim = onnx.load(str(tmp_path / "outside.onnx"), load_external_data=False)
        for tensor in victim.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(victim, str(inner / "victim.onnx"))
        with pytest.raises(spa.ModelLoadError, match="outside the model's folder"):
            load_model(inner / "victim.onnx")
    (inner / "link.data").symlink_to(tmp_path / "secret.data")
    victim = onnx.load(str(tmp_path / "outside.onnx"), load_external_data=False)
    for tensor in victim.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "link.data"
    onnx.save(victim, str(inner / "victim.onnx"))
    with pytest.raises(spa.ModelLoadError, match="outside the model's folder"):
        load_model(inner / "victim.onnx")


def test_external_data_shorter_than_declared_is_refused(tmp_path):
    model, _ = _two_conv_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    tensor = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    for entry in tensor.external_data:
        if entry.key == "length":
            entry.value = str(int(entry.value) - 4)
    onnx.save(proto, str(path))
    with pytest.raises(spa.ModelLoadError):
        load_model(path)


def test_large_model_path_keeps_weights_on_disk(tmp_path, monkeypatch):
    """Above spa.core.tensors.LAZY_BYTES, weights are memory-mapped and written back tensor by tensor."""
    import spa.formats.files
    import spa.formats.load
    from spa.core.runtime import run, sample_inputs
    from spa.core.tensors import is_lazy

    g = Graph()
    x = g.input("x", ["batch", 3, 6, 6])
    h = g.op("Relu", [g.conv(x, 3, 32)])
    g.output(g.conv(h, 32, 2))
    g.output(g.conv(x, 3, 2, k=7))  # input and output both frozen: this weight is never cut
    path = tmp_path / "big.onnx"
    onnx.save(g.build(), str(path), save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    monkeypatch.setattr(spa.formats.load, "LAZY_BYTES", 1)
    loaded = load_model(path)
    assert is_lazy(loaded) and not any(t.raw_data for t in loaded.graph.initializer if t.external_data)
    result = spa.prune(path, ratio=0.5)  # validation runs through files in a temporary folder
    assert result.report.validation.ok and result.report.validation.soft_equal
    out = tmp_path / "out.onnx"
    spa.formats.files.save_model(result.model, out)
    assert (tmp_path / "out.onnx.data").exists()
    onnx.checker.check_model(str(out), full_check=True)
    saved = onnx.load(str(out))
    feeds = sample_inputs(saved, batch=2)
    outputs = run(saved, feeds)
    assert [v.shape for v in outputs.values()] == [(2, 2, 6, 6), (2, 2, 6, 6)]


def test_a_model_proto_still_reading_its_weights_from_files_is_validated(tmp_path, monkeypatch):
    """A ModelProto loaded without its external data (run from its folder) is pruned from the
    files; validation then needs the input model as a file onnxruntime can open, which such a
    proto does not have."""
    g = Graph()
    x = g.input("x", ["batch", 3, 6, 6])
    h = g.op("Relu", [g.conv(x, 3, 32)])
    g.output(g.conv(h, 32, 2))
    onnx.save(
        g.build(), str(tmp_path / "big.onnx"), save_as_external_data=True, location="big.onnx.data", size_threshold=0
    )
    monkeypatch.chdir(tmp_path)
    proto = onnx.load("big.onnx", load_external_data=False)
    result = spa.prune(proto, ratio=0.5)
    assert result.report.validation.ok and result.report.validation.soft_equal
    assert result.report.validation.dense_runs


def test_a_split_to_minus_one_with_sizes_read_from_another_input_is_settled(monkeypatch):
    """torch's dynamo export: [batch, seq, 16] -> [batch, seq, -1, 4], batch and seq read from the
    mask's Shape. The symbols cancel and the unknown axis is 4, so the heads can be paired.
    onnxruntime's symbolic inference would settle this small graph itself, but it gives up on the
    opset-23 graphs where it occurs (RotaryEmbedding, Attention): here it is left out."""
    from onnx import TensorProto

    import spa.formats.shapes

    monkeypatch.setattr(spa.formats.shapes, "_symbolic_shapes", lambda model: None)

    from spa.formats.model import Model

    g = Graph(opset=17)
    x = g.input("x", ["batch", "seq", 8])
    mask = g.input("mask", ["batch", "seq"], TensorProto.INT64)
    shape = g.op("Shape", [mask])
    target = g.op(
        "Concat",
        [g.op("Slice", [shape, g.const(np.array([0])), g.const(np.array([2]))]), g.const(np.array([-1, 4]))],
        axis=0,
    )
    split = g.op("Reshape", [g.op("MatMul", [x, g.weight(8, 16)]), target])
    g.output(g.op("ReduceSum", [split, g.const(np.array([3]))], keepdims=0))
    prepared = Model.load(g.build())
    assert prepared.graph.shape(split) == ("batch", "seq", 4, 4)


def _with_rms_norm(domain: str, op_type: str = "SimplifiedLayerNormalization") -> onnx.ModelProto:
    g = Graph(opset=22)
    x = g.input("x", [1, 4, 6])
    h = g.op("MatMul", [x, g.weight(6, 8)])
    n = g.op(op_type, [h, g.weight(8, low=0.5)], axis=-1, epsilon=1e-5, domain=domain)
    g.output(g.op("MatMul", [n, g.weight(8, 3)]))
    return g.build()


def test_an_op_onnxruntime_registers_in_the_onnx_domain_loads(tmp_path):
    # onnxruntime-genai's builder writes SimplifiedLayerNormalization in the ONNX domain, where
    # onnxruntime registers it and onnx's checker knows no schema for it
    path = tmp_path / "m.onnx"
    onnx.save(_with_rms_norm(""), str(path))
    result = CliRunner().invoke(main, ["prune", str(path), "--ratio", "0.5", "--approximate"])
    assert result.exit_code == 0, result.output
    pruned = onnx.load(str(tmp_path / "m.pruned.onnx"))
    assert any(n.op_type == "SimplifiedLayerNormalization" and n.domain == "" for n in pruned.graph.node)


def test_the_checker_still_judges_a_model_with_an_onnxruntime_op_in_the_onnx_domain(tmp_path):
    model = _with_rms_norm("")
    model.graph.node[0].input[0] = "nowhere"  # read before anything writes it
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result = CliRunner().invoke(main, ["prune", str(path), "--ratio", "0.5"])
    assert result.exit_code == 3 and "not a valid ONNX model" in result.output and "nowhere" in result.output


def test_an_onnx_domain_op_onnxruntime_does_not_register_there_is_still_a_load_error(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_with_rms_norm("", op_type="RmsNormButMisspelled"), str(path))
    result = CliRunner().invoke(main, ["prune", str(path), "--ratio", "0.5"])
    assert result.exit_code == 3 and "No Op registered for RmsNormButMisspelled" in result.output
