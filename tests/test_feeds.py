"""Feeds the model accepts: a sample rate that selects a branch, a recurrent state, a chunk length
the graph's Pad and Reshape constrain. Hand-built graphs with the patterns of streaming audio
models (silero-vad); the real ones run from a cached wheel where one is present."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builder import Graph
from click.testing import CliRunner
from onnx import TensorProto, helper

import spa
from spa.cli.commands import main
from spa.core import feeds, probe
from spa.core.errors import UsageError
from spa.core.runtime import batches, sample_inputs

HIDDEN = 8


def _branch(name: str, nodes, output: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])


def streaming(rates=(16000,), chunk: int = 64, state_batch: str = "batch") -> onnx.ModelProto:
    """``input [batch, samples]``, ``state [2, batch, 8]``, ``sr`` (int64 scalar). Only
    ``sr == rates[0]`` takes the branch that runs (the other gathers out of range); the chunk is
    reflect-padded by 16 and reshaped into frames of ``chunk`` samples, then two convolutions
    (the prunable group) and the state's first layer make the output; ``stateN`` follows."""
    g = Graph(opset=18)
    x = g.input("input", ["batch", "samples"])
    state = g.input("state", [2, state_batch, HIDDEN])
    sr = g.input("sr", [], TensorProto.INT64)
    condition = g.op("Equal", [sr, g.const(np.int64(rates[0]))])
    for rate in rates[1:]:  # another rate compared after the first: the first one wins
        condition = g.op("Or", [condition, g.op("Equal", [sr, g.const(np.int64(rate))])])
    then = _branch("then", [helper.make_node("Identity", [x], ["chosen"])], "chosen")
    broken = g.const(np.int64([1 << 20]))
    otherwise = _branch("else", [helper.make_node("Gather", [x, broken], ["refused"], axis=1)], "refused")
    chosen = g.op("If", [condition], then_branch=then, else_branch=otherwise)
    padded = g.op("Pad", [chosen, g.const(np.int64([0, 16, 0, 16]))], mode="reflect")
    trimmed = g.op("Slice", [padded, g.const(np.int64([16])), g.const(np.int64([-16])), g.const(np.int64([1]))])
    frames = g.op("Reshape", [trimmed, g.const(np.int64([0, 1, -1, chunk]))])  # [batch, 1, frames, chunk]
    hidden = g.op("Relu", [g.op("Conv", [frames, g.weight(HIDDEN, 1, 1, chunk), g.weight(HIDDEN)])])
    features = g.op("Conv", [hidden, g.weight(HIDDEN, HIDDEN, 1, 1), g.weight(HIDDEN)])
    pooled = g.op("ReduceMean", [features, g.const(np.int64([2, 3]))], keepdims=0)  # [batch, 8]
    first = g.op("Gather", [state, g.const(np.int64(0))], axis=0)  # [batch, 8]
    g.nodes.append(helper.make_node("Add", [pooled, first], ["output"]))
    g.output("output")
    g.nodes.append(helper.make_node("Mul", [state, g.const(np.float32(0.5))], ["stateN"]))
    g.outputs.append(helper.make_tensor_value_info("stateN", TensorProto.FLOAT, None))
    return g.build()


def test_the_graph_tells_the_rate_the_state_axis_and_a_length():
    model = streaming()
    assert feeds.batch_axes(model) == {"input": 0, "state": 1, "sr": None}
    assert {name: int(value) for name, (value, _) in feeds.graph_controls(model).items()} == {"sr": 16000}
    spec = probe.derive(model, model, {})
    assert spec.length == 64  # the first the Reshape into frames of 64 and the reflect pad of 16 take
    feed = _under(spec, lambda: sample_inputs(model, batch=3))
    assert feed["sr"].shape == () and int(feed["sr"]) == 16000
    assert feed["input"].shape == (3, 64) and feed["state"].shape == (2, 3, HIDDEN)


def test_the_first_rate_compared_wins():
    model = streaming(rates=(8000, 16000))
    assert int(feeds.graph_controls(model)["sr"][0]) == 8000


def test_a_streaming_model_prunes_valid_and_soft_equals_hard():
    result = spa.prune(streaming(), 0.5)
    report = result.report
    assert report.groups_pruned == 1 and report.params_after < report.params_before
    assert report.validation.ok and report.validation.soft_equal is True
    assert report.statistics is not None and report.statistics["source"] == "synthetic"


def test_a_state_with_an_unnamed_batch_axis_stacks_samples_there():
    model = streaming(state_batch=None)
    assert feeds.batch_axes(model)["state"] == 1
    assert spa.prune(model, 0.5).report.validation.soft_equal is True


def test_batches_cut_states_along_their_batch_axis_and_add_fixed_values():
    model = streaming()
    data = {"input": np.zeros((10, 64), np.float32), "state": np.zeros((2, 10, HIDDEN), np.float32)}
    cut = list(batches(model, data, batch=4))
    assert [b["input"].shape[0] for b in cut] == [4, 4, 2]
    assert [b["state"].shape for b in cut] == [(2, 4, HIDDEN), (2, 4, HIDDEN), (2, 2, HIDDEN)]
    assert all(int(b["sr"]) == 16000 for b in cut)


def test_an_explicit_input_replaces_the_graph_value():
    model = streaming(rates=(8000, 16000))
    result = spa.prune(model, 0.5, inputs={"sr": 16000})
    assert result.report.validation.soft_equal is True


def test_a_rate_the_model_refuses_is_a_usage_error_naming_the_feed():
    with pytest.raises(UsageError) as caught:
        spa.prune(streaming(), 0.5, inputs={"sr": 44100})
    message = str(caught.value)
    assert "sr=44100" in message and "--input-shape input=" in message and "Gather" in message


def test_input_values_are_checked_before_any_work():
    with pytest.raises(UsageError, match="not an input of the model"):
        spa.prune(streaming(), 0.5, inputs={"rate": 16000})
    with pytest.raises(UsageError, match="2 values given"):
        spa.prune(streaming(), 0.5, inputs={"sr": [1, 2]})


def test_cli_input_option(tmp_path):
    path = tmp_path / "vad.onnx"
    onnx.save(streaming(rates=(8000, 16000)), str(path))
    runner = CliRunner()
    ok = runner.invoke(main, ["prune", str(path), "--ratio", "0.5", "--input", "sr=16000", "--no-bench"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "vad.pruned.onnx").exists()
    refused = runner.invoke(main, ["prune", str(path), "-o", str(tmp_path / "x.onnx"), "--input", "sr=44100"])
    assert refused.exit_code == 2 and refused.output.startswith("spa: error:"), refused.output
    assert refused.output.count("\n") == 1 and "sr=44100" in refused.output
    assert not (tmp_path / "x.onnx").exists()
    malformed = runner.invoke(main, ["prune", str(path), "--input", "sr"])
    assert malformed.exit_code == 2 and "NAME=VALUE" in malformed.output


def test_no_probe_run_where_nothing_is_made_up():
    # an image model with a free batch: the sample feed is as before, and never run to check it
    g = Graph()
    x = g.input("x", ["n", 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 4)]), 4, 2))
    model = g.build()
    assert probe.free_lengths(model) == [] and feeds.graph_controls(model) == {}
    assert probe.derive("not a model: a probe would fail to open it", model, {}) == feeds.FeedSpec()


def _under(spec, function):
    import contextvars

    def run():
        feeds.use(spec)
        return function()

    return contextvars.copy_context().run(run)


# ------------------------------------------------------------------------------ silero-vad wheel

SILERO = [
    "silero_vad",
    "silero_vad_16k_op15",
    "silero_vad_16k_sequence",
    "silero_vad_half",
    "silero_vad_op18_ifless",
    "silero_vad_openvino_16k",
]


@pytest.mark.parametrize("name", SILERO)
def test_every_silero_model_runs_and_prunes_valid(name):
    import prune_wheels

    path = prune_wheels.cached_model(name)  # never downloads
    if path is None:
        pytest.skip("wheel not cached; `python tools/prune_wheels.py` fetches it")
    report = spa.prune(path, 0.3).report
    assert report.validation.ok, report.validation.problems
    if report.groups_pruned:
        assert report.validation.soft_equal is True and report.params_after < report.params_before


def test_calibration_data_need_not_hold_the_rate_or_the_state(tmp_path):
    # sr comes from the graph, the state starts at zero, as a stream does
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(0).standard_normal((40, 128)).astype(np.float32))
    result = spa.prune(streaming(), 0.5, calib=calib, calib_samples=24)
    report = result.report
    assert report.statistics["source"] == "calibration" and report.validation.soft_equal is True
    assert report.validation.fidelity is not None


def test_given_sizes_replace_the_made_up_feed_in_validation():
    """A model that runs only at the lengths the user gives is no validation failure: the sizes
    replace the feed spa would have made up (length 1 here, which the Reshape refuses)."""
    g = Graph()
    x = g.input("x", [1, "n"])
    rows = g.op("Reshape", [x, g.const(np.array([-1, 7], np.int64))])
    hidden = g.op("Relu", [g.op("MatMul", [rows, g.weight(7, 16)])])
    g.output(g.op("MatMul", [hidden, g.weight(16, 3)]))
    result = spa.prune(g.build(), ratio=0.5, input_shapes={"x": [1, 14]})
    assert result.report.validation.ok, result.report.validation.problems
    assert result.report.validation.sizes[0] == {"x": [1, 14]}
