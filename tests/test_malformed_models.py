"""Malformed models are refused at load with one line and exit 3, never an internal error (1)
or a validation failure (4); valid models with unusual element types load."""

import copy

import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from test_bad_input import assert_clean_failure, save

from spa.cli.commands import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def two_convs(batch=1):
    """Outputs declared without a shape, as Graph always does: that alone is no problem."""
    g = Graph()
    x = g.input("x", [batch, 3, 4, 4])
    h = g.op("Relu", [g.conv(x, 3, 4)])
    g.output(g.conv(h, 4, 2))
    return g.build()


def refused(tmp_path, model, *options, code=3, command="prune"):
    path, digest = save(model, tmp_path) if isinstance(model, onnx.ModelProto) else _save_bytes(tmp_path, model)
    result = run(command, path, *options)
    assert_clean_failure(result, code, tmp_path, path, digest)
    return result.output


def _save_bytes(folder, data: bytes):
    import hashlib

    path = folder / "m.onnx"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_an_output_without_a_shape_alone_still_loads(tmp_path):
    path, _ = save(two_convs(), tmp_path)
    result = run("prune", path, "--no-bench")
    assert result.exit_code == 0, result.output
    assert "checker ok" in result.output


def _nodes_out_of_order(model):
    model.graph.node.insert(0, model.graph.node.pop(1))


def _duplicate_initializer(model):
    model.graph.initializer.append(copy.deepcopy(model.graph.initializer[0]))


def _tensor_without_data(model):
    model.graph.initializer[0].ClearField("raw_data")


def _no_opset_import(model):
    del model.opset_import[:]


def _undefined_type(model):
    model.graph.initializer[0].data_type = TensorProto.UNDEFINED


@pytest.mark.parametrize(
    "spoil", [_nodes_out_of_order, _duplicate_initializer, _tensor_without_data, _no_opset_import, _undefined_type]
)
def test_what_the_checker_refuses_behind_a_shapeless_output_is_refused(tmp_path, spoil):
    # the checker stops at its first complaint, and outputs come first: the shapeless output must
    # not hide the rest
    model = two_convs()
    spoil(model)
    assert "not a valid ONNX model" in refused(tmp_path, model)


def test_the_checker_complaint_sees_past_shapeless_outputs():
    from spa.formats.checker import checker_complaint

    model = two_convs()
    assert checker_complaint(model, full_check=True) is None
    _duplicate_initializer(model)
    before = model.SerializeToString()
    assert "not unique" in checker_complaint(model, full_check=True)
    assert model.SerializeToString() == before  # outputs set aside are put back as they were


def test_the_full_check_still_compares_a_shapeless_outputs_type():
    from spa.formats.checker import checker_complaint

    model = two_convs()
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64  # Conv gives float
    assert checker_complaint(model, full_check=True) is not None


def _with_external_data(tmp_path, edit):
    path = tmp_path / "m.onnx"
    onnx.save(two_convs(), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    edit(model.graph.initializer[0])
    return model


def _set_entry(key, value):
    def edit(tensor):
        for entry in tensor.external_data:
            if entry.key == key:
                entry.value = value
                return
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _set_entry("offset", "abc"),
        _set_entry("length", "1e3"),
        _set_entry("offset", "-4"),
        _set_entry("length", "4.0"),
        _set_entry("location", "m\0.data"),
        _set_entry("location", "d/" * 2500),
        _set_entry("location", "x" * 300),
        lambda t: setattr(t, "data_type", TensorProto.UNDEFINED),
        lambda t: setattr(t, "data_type", TensorProto.UINT4),
    ],
    ids=[
        "offset-word",
        "length-float-text",
        "offset-negative",
        "length-decimal",
        "nul",
        "5000-chars",
        "300-char-name",
        "undefined-type",
        "wrong-type-size",
    ],
)
def test_malformed_external_data_entries_are_refused(tmp_path, edit):
    refused(tmp_path, _with_external_data(tmp_path, edit))


def _quantized_conv(data_type, values):
    """A Conv whose weight is dequantized from ``data_type``, and a float Conv after it."""
    g = Graph(opset=21)
    x = g.input("x", [1, 3, 4, 4])
    g.inits += [
        helper.make_tensor("wq", data_type, values.shape, values.ravel().tolist()),
        numpy_helper.from_array(np.float32(0.1), "ws"),
    ]
    w = g.op("DequantizeLinear", ["wq", "ws"])
    h = g.op("Relu", [g.op("Conv", [x, w], pads=[1] * 4)])
    h = g.op("Relu", [g.conv(h, values.shape[0], 6)])
    g.output(g.conv(h, 6, 2))
    return g.build()


def _as_raw(model):
    """The weight's values in raw_data, packed as onnx packs them."""
    tensor = model.graph.initializer[0]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    assert tensor.HasField("raw_data")
    return model


FOUR_BIT = [TensorProto.UINT4, TensorProto.INT4]
SHORT_CASES = [(dt, raw) for dt in FOUR_BIT + [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2] for raw in (0, 1)]


def _weight_values(data_type):
    rng = np.random.default_rng(0)
    if data_type in FOUR_BIT:
        return rng.integers(0, 8, (8, 3, 3, 3))
    return rng.uniform(-1, 1, (8, 3, 3, 3)).astype(np.float32)


@pytest.mark.parametrize("data_type", FOUR_BIT)
@pytest.mark.parametrize("raw", [False, True])
def test_valid_4bit_weights_load_and_prune(tmp_path, data_type, raw):
    # 216 values packed two to a byte hold 108 bytes (or 108 int32_data entries)
    model = _quantized_conv(data_type, _weight_values(data_type))
    model = _as_raw(model) if raw else model
    path, _ = save(model, tmp_path)
    result = run("prune", path, "--no-bench", "--ratio", "0.5")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.pruned.onnx").exists()


@pytest.mark.parametrize("data_type,raw", SHORT_CASES)
def test_4bit_and_float8_tensors_with_short_data_are_refused(tmp_path, data_type, raw):
    model = _quantized_conv(data_type, _weight_values(data_type))
    model = _as_raw(model) if raw else model
    tensor = model.graph.initializer[0]
    if raw:
        tensor.raw_data = tensor.raw_data[:-3]
    else:
        del tensor.int32_data[-3:]
    refused(tmp_path, model)


def test_every_element_type_has_its_stored_size():
    from spa.core.tensors import data_bytes

    # onnx's own packing is the reference: 4-bit two to a byte, 2-bit four, 6-bit four in three
    skipped = {TensorProto.UNDEFINED, TensorProto.STRING}
    for data_type in TensorProto.DataType.values():
        if data_type in skipped:
            assert data_bytes(data_type, 7) is None
            continue
        for count in (1, 7, 216):
            values = numpy_helper.to_array(helper.make_tensor("t", data_type, [count], [0] * count))
            stored = numpy_helper.from_array(values, "t")
            assert data_bytes(data_type, count) == len(stored.raw_data), (data_type, count)


def test_names_that_are_not_utf8_are_refused(tmp_path):
    data = two_convs().SerializeToString()
    assert b"relu" in data
    assert "UTF-8" in refused(tmp_path, data.replace(b"relu", b"r\xffl\xfe"))


def _reshape_to(target):
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    h = g.op("Relu", [g.conv(x, 3, 4)])
    r = g.op("Reshape", [h, g.const(np.array(target, np.int64))])
    g.output(g.op("Relu", [r]))
    return g.build()


@pytest.mark.parametrize("command,options", [("prune", ["--no-validate"]), ("analyze", [])])
def test_a_reshape_to_2_62_is_refused(tmp_path, command, options):
    # a channel axis of 2^62 would have the rules allocate an index per channel
    assert "no model that runs" in refused(tmp_path, _reshape_to([1, 2**62, 1, 1]), *options, command=command)


def test_a_depthwise_conv_whose_outputs_do_not_divide_into_groups_is_refused(tmp_path):
    g = Graph()
    x = g.input("x", [1, 4, 4, 4])
    h = g.op("Relu", [g.conv(x, 4, 4)])
    d = g.op("Conv", [h, g.weight(6, 1, 3, 3)], pads=[1] * 4, group=4)
    g.output(g.conv(d, 6, 2))
    assert "not a multiple of group 4" in refused(tmp_path, g.build(), "--no-validate")


def test_a_split_with_a_negative_size_is_refused(tmp_path):
    g = Graph()
    x = g.input("x", [1, 4, 4, 4])
    h = g.op("Relu", [g.conv(x, 4, 6)])
    a, b = g.op("Split", [h, g.const(np.array([8, -2], np.int64))], n_out=2, axis=1)
    g.output(g.conv(a, 8, 2))
    g.output(b)
    assert "size -2" in refused(tmp_path, g.build(), "--no-validate")


def test_an_output_name_too_long_for_the_filesystem_is_an_output_error(tmp_path):
    # the model is fine; the name spa derives for the output (NAME.pruned.onnx) is not: exit 5,
    # which -o fixes, not 3, which would blame the model
    path, digest = save(two_convs(), tmp_path, name="a" * 250 + ".onnx")
    result = run("prune", path, "--no-bench")
    assert_clean_failure(result, 5, tmp_path, path, digest)
    assert "too long" in result.output


@pytest.mark.parametrize("batch", ["1000000000", str(2**62)])
def test_a_huge_bench_batch_is_a_usage_error(tmp_path, batch):
    path, digest = save(two_convs(batch="n"), tmp_path)
    result = run("bench", path, "--batch", batch, "--runs", "1", "--warmup", "0")
    assert_clean_failure(result, 2, tmp_path, path, digest)


def test_a_bench_batch_that_is_not_a_whole_number_is_a_usage_error(tmp_path):
    path, _ = save(two_convs(), tmp_path)
    result = run("bench", path, "--batch", "1e9")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_a_negative_seed_is_a_usage_error(tmp_path):
    path, digest = save(two_convs(), tmp_path)
    assert_clean_failure(run("prune", path, "--seed", "-1"), 2, tmp_path, path, digest)


def _if_with_external_weight(tmp_path, location):
    g = Graph()
    x = g.input("x", [1, 3, 4, 4])
    h = g.op("Relu", [g.conv(x, 3, 4)])
    weight = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w_inner")
    (tmp_path / "inner.bin").write_bytes(numpy_helper.to_array(weight).tobytes())
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    branch = helper.make_graph(
        [helper.make_node("Conv", [h, "w_inner"], ["y_in"])],
        "branch",
        [],
        [helper.make_tensor_value_info("y_in", TensorProto.FLOAT, None)],
        [weight],
    )
    y = g.op("If", [g.const(np.array(True))], then_branch=branch, else_branch=branch)
    g.output(y)
    return g.build()


@pytest.mark.parametrize("location", ["/etc/hostname", "../inner.bin", "missing.bin"])
def test_subgraph_external_data_outside_the_folder_or_missing_is_refused(tmp_path, location):
    # the checker used to look for these files; it is now shown a copy without external data
    folder = tmp_path / "model"
    folder.mkdir()
    refused(folder, _if_with_external_weight(folder, location), command="analyze")


def test_subgraph_external_data_inside_the_folder_loads(tmp_path):
    path, _ = save(_if_with_external_weight(tmp_path, "inner.bin"), tmp_path)
    result = run("analyze", path)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("data_type", FOUR_BIT)
def test_4bit_weights_kept_on_disk_are_read_and_written_packed(tmp_path, data_type):
    # models with external data load lazily: a 4-bit weight read one value a byte, or written so,
    # comes out as other numbers that still pass the checker
    values = np.random.default_rng(1).integers(0, 8, (64, 3, 3, 3))
    model = _as_raw(_quantized_conv(data_type, values))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    result = run("prune", path, "--no-bench", "--ratio", "0.5")
    assert result.exit_code == 0, result.output
    stored = onnx.load(str(tmp_path / "m.pruned.onnx"), load_external_data=False)
    # the path under test: streamed to the data file
    assert next(t for t in stored.graph.initializer if t.name == "wq").data_location == TensorProto.EXTERNAL
    written = onnx.load(str(tmp_path / "m.pruned.onnx"))
    weight = next(t for t in written.graph.initializer if t.name == "wq")
    np.testing.assert_array_equal(numpy_helper.to_array(weight).astype(np.int64), values)
