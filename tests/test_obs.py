"""The OBS maths, the statistics collector and compensation, against plain numpy."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.core.coupling import Dim
from spa.core.errors import UsageError
from spa.scoring.obs import LayerState, augmented_hessian, greedy_scores, inverse, least_squares, obs_update
from spa.scoring.statistics import (
    PRIORS,
    SMOOTH_NOISE,
    SYNTHETIC_SAMPLES,
    InputPrior,
    choose_prior,
    collect,
    load_calibration,
    synthetic_feeds,
    synthetic_sample_count,
)


def _correlated(rng, rows, channels):
    mix = rng.standard_normal((channels, channels))
    return rng.standard_normal((rows, channels)) @ mix + rng.standard_normal(channels)


def test_least_squares_is_the_regression_of_the_dense_output_on_the_kept_inputs():
    rng = np.random.default_rng(0)
    x = _correlated(rng, 2000, 6)
    w = rng.standard_normal((4, 6))
    keep = np.array([0, 2, 3, 5])
    refit = least_squares(w, x.T @ x / len(x), keep)
    expected, *_ = np.linalg.lstsq(x[:, keep], x @ w.T, rcond=None)
    assert np.allclose(refit[:, keep], expected.T, atol=1e-8)
    assert np.all(refit[:, [1, 4]] == 0)


def test_obs_removal_equals_least_squares_and_its_loss_is_the_true_error():
    rng = np.random.default_rng(1)
    x = _correlated(rng, 3000, 8)
    w = rng.standard_normal((5, 8))
    hessian = x.T @ x / len(x)
    state = LayerState(w.copy(), inverse(hessian), np.arange(8), energy=1.0)
    loss = state.remove(np.array([2, 6]))
    keep = np.array([0, 1, 3, 4, 5, 7])
    assert np.allclose(state.weights, least_squares(w, hessian, keep), atol=1e-8)
    error = x @ (w - state.weights).T
    assert loss == pytest.approx(float((error**2).sum(axis=1).mean()), rel=1e-6)
    # one more removal continues from the updated state, as if both were removed at once
    state.remove(np.array([0]))
    assert np.allclose(state.weights, least_squares(w, hessian, np.array([1, 3, 4, 5, 7])), atol=1e-8)


def test_one_shot_obs_update_is_least_squares_and_reports_its_loss():
    rng = np.random.default_rng(9)
    x = _correlated(rng, 3000, 7)
    w = rng.standard_normal((4, 7))
    hessian = x.T @ x / len(x)
    refit, loss = obs_update(w, inverse(hessian), np.array([1, 4, 5]))
    assert np.allclose(refit, least_squares(w, hessian, np.array([0, 2, 3, 6])), atol=1e-8)
    assert loss == pytest.approx(float(((x @ (w - refit).T) ** 2).sum(axis=1).mean()), rel=1e-6)


def test_bias_column_takes_the_mean_contribution():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4000, 3)) * 0.1 + np.array([5.0, 0.0, 0.0])  # channel 0: nearly constant
    w = rng.standard_normal((2, 3))
    stats_h = augmented_hessian(x.T @ x / len(x), x.mean(axis=0))
    weights = np.hstack([w, np.zeros((2, 1))])
    refit = least_squares(weights, stats_h, np.array([1, 2, 3]))
    # removing a constant channel moves W[:, 0] * 5 into the bias
    assert np.allclose(refit[:, 3], w[:, 0] * 5.0, rtol=0.05)


def test_greedy_scores_rise_along_the_removal_order_and_follow_the_data():
    rng = np.random.default_rng(3)
    channels = 12
    scale = np.linspace(0.1, 3.0, channels)  # channel k's input is k-proportionally large
    x = rng.standard_normal((4000, channels)) * scale
    w = np.ones((3, channels))
    hessian = augmented_hessian(x.T @ x / len(x), None)
    scores = greedy_scores([LayerState(w.copy(), inverse(hessian), np.arange(channels), 1.0)], channels)
    order = np.argsort(scores)
    assert list(order) == list(range(channels))  # the weakest input goes first
    assert np.all(np.diff(scores[order]) >= 0)


def test_identity_hessian_ranks_by_column_norm():
    w = np.array([[3.0, 0.1, 2.0, 1.0], [0.0, 0.2, 0.0, 1.0]])
    state = LayerState(w.copy(), np.eye(4), np.arange(4), 1.0)
    scores = greedy_scores([state], 4)
    assert list(np.argsort(scores)) == [1, 3, 2, 0]


# --- statistics and calibration files ---------------------------------------------------------


def _mlp(path=None):
    rng = np.random.default_rng(4)
    w1 = numpy_helper.from_array(rng.standard_normal((6, 16)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2")
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    if path is not None:
        onnx.save(model, path)
    return model


def test_collected_statistics_equal_numpy_on_the_activations():
    model = _mlp()
    x = np.random.default_rng(5).standard_normal((40, 6)).astype(np.float32)
    stats = collect(model, {"x": x}, [Dim("r", 1)], "calibration").of(Dim("r", 1))
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    b1 = numpy_helper.to_array(model.graph.initializer[1])
    r = np.maximum(x.astype(np.float64) @ w1 + b1, 0)
    assert stats.count == 40
    assert np.allclose(stats.mean, r.mean(axis=0), atol=1e-5)
    assert np.allclose(stats.second_moment, r.T @ r / 40, rtol=1e-4, atol=1e-5)


def test_calibration_from_npz_and_from_npy_folders(tmp_path):
    model = _mlp()
    x = np.random.default_rng(6).standard_normal((20, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, label=np.zeros(20))
    assert np.array_equal(load_calibration(tmp_path / "calib.npz", model, 8)["x"], x[:8])
    (tmp_path / "named").mkdir()
    np.save(tmp_path / "named" / "x.npy", x)
    assert np.array_equal(load_calibration(tmp_path / "named", model, 100)["x"], x)
    (tmp_path / "samples").mkdir()
    for k in range(3):  # one sample per file, for a single-input model
        np.save(tmp_path / "samples" / f"s{k}.npy", x[k])
    assert np.array_equal(load_calibration(tmp_path / "samples", model, 100)["x"], x[:3])
    np.savez(tmp_path / "wrong.npz", y=x)
    with pytest.raises(UsageError, match="no array for input"):
        load_calibration(tmp_path / "wrong.npz", model, 8)
    with pytest.raises(UsageError, match="no such file"):
        load_calibration(tmp_path / "absent.npz", model, 8)


def test_synthetic_token_ids_stay_inside_the_embedding_table():
    table = numpy_helper.from_array(np.zeros((50, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="emb")],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["b", "s", 4])],
        [table],
    )
    feeds = synthetic_feeds(helper.make_model(graph, ir_version=9), 4, seed=0)
    ids = feeds["ids"]
    assert ids.shape[0] == 4 and ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) > 10


def _image_model(batch="b"):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 32, 32])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_synthetic_samples_cover_a_wide_classifier_input_within_the_compute_budget():
    low, high = SYNTHETIC_SAMPLES
    conv_input, fc_input = Dim("conv_in", 1), Dim("fc_in", 1)
    shapes = {"conv_in": ["b", 16, 28, 28], "fc_in": ["b", 1568]}
    # a 16-channel map has 784 rows per sample: the minimum does
    assert synthetic_sample_count(_image_model(), [conv_input], shapes, 1e6) == low
    # 1,568 features, one row per sample: as many samples as the cap allows
    assert synthetic_sample_count(_image_model(), [conv_input, fc_input], shapes, 1e6) == high
    # the same model costing ResNet-50's 8.2 GFLOPs per sample stays at the minimum
    assert synthetic_sample_count(_image_model(), [fc_input], shapes, 8.2e9) == low
    # a static batch of 4 runs four samples for the graph's FLOPs
    between = synthetic_sample_count(_image_model(), [fc_input], shapes, 2e9)
    assert between == synthetic_sample_count(_image_model(4), [fc_input], shapes, 4 * 2e9) and low < between < high


def test_priors_draw_images_in_their_range_with_the_ink_they_name():
    strokes = synthetic_feeds(_image_model(), 6, seed=0, prior=InputPrior(0.0, 1.0, coverage=0.25))["x"]
    assert strokes.min() >= 0 and strokes.max() <= 1
    per_sample = strokes.reshape(6, -1)
    # three quarters of each image is the plain background; the ink rises to 1 at each peak
    assert np.allclose((per_sample == 0).mean(axis=1), 0.75, atol=0.01)
    assert np.allclose(per_sample.max(axis=1), 1.0) and np.median(per_sample[per_sample > 0]) > 0.3
    inverted = synthetic_feeds(_image_model(), 6, seed=0, prior=InputPrior(-1.0, 1.0, 0.1, ink_high=False))["x"]
    assert np.allclose((inverted.reshape(6, -1) == 1).mean(axis=1), 0.9, atol=0.01) and inverted.min() >= -1
    smooth = synthetic_feeds(_image_model(), 6, seed=0, prior=InputPrior(0.0, 255.0))["x"]
    assert smooth.min() >= 0 and smooth.max() <= 255 and abs(smooth.mean() - 127.5) < 20
    assert len({p.name for p in PRIORS}) == len(PRIORS)


def test_a_static_batch_larger_than_the_samples_is_refused_but_a_free_one_shrinks():
    feeds = {"x": np.zeros((3, 3, 32, 32), np.float32)}
    assert len(collect(_image_model(), feeds, [Dim("y", 1)], "synthetic").of(Dim("y", 1)).mean) == 3
    with pytest.raises(UsageError, match="batch size is 4"):
        collect(_image_model(4), feeds, [Dim("y", 1)], "synthetic")


def test_models_without_an_image_input_keep_smooth_noise_unprobed():
    assert choose_prior(_mlp(), [Dim("r", 1)], 8, seed=0) == (SMOOTH_NOISE, {})
    result = spa.prune(_mlp(), 0.5, "obspa", bench=False)
    assert result.report.statistics["input_prior"] == SMOOTH_NOISE.name
    assert result.report.statistics["prior_imbalance"] == {}


def test_the_chosen_prior_is_the_most_even_one_and_prunes_the_digits_cnn_better(monkeypatch):
    """On mnist_rescnn (trained on white digits on black) the probe picks ink on a black [0, 1]
    background, and obspa with compensation keeps far more test accuracy than with smooth noise."""
    root = Path(__file__).resolve().parents[1]
    model = root / "models" / "mnist_rescnn.onnx"
    test = np.load(root / "models" / "data" / "mnist_test.npz")

    def accuracy(pruned):
        from spa.core.runtime import session

        logits = session(pruned).run(None, {"input": test["input"]})[0]
        return float((logits.argmax(axis=1) == test["label"]).mean())

    chosen = spa.prune(model, 0.3, "obspa", bench=False)
    stats = chosen.report.statistics
    assert stats["input_prior"].startswith("strokes in [0,1]") and "ink 1 on 0" in stats["input_prior"]
    assert stats["prior_imbalance"][stats["input_prior"]] == min(stats["prior_imbalance"].values())
    assert stats["prior_imbalance"][stats["input_prior"]] < 0.6 * stats["prior_imbalance"][SMOOTH_NOISE.name]
    monkeypatch.setattr(spa.pipeline.scored, "choose_prior", lambda *args: (SMOOTH_NOISE, {}))
    smooth = spa.prune(model, 0.3, "obspa", bench=False)
    assert smooth.report.statistics["input_prior"] == SMOOTH_NOISE.name
    # measured 0.942 against 0.593 (dense 0.986)
    assert accuracy(chosen.model) > 0.9 > 0.75 > accuracy(smooth.model)


# --- the pipeline ---------------------------------------------------------------------------


def _output_error(path, pruned, x):
    from spa.core.runtime import session

    dense = session(onnx.load(path)).run(None, {"x": x})[0]
    out = session(pruned).run(None, {"x": x})[0]
    return float(np.mean((dense - out) ** 2) / np.mean(dense**2))


def test_compensation_brings_the_pruned_output_closer_to_the_dense_one(tmp_path):
    path = tmp_path / "mlp.onnx"
    _mlp(path)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    held_out = rng.standard_normal((256, 6)).astype(np.float32)
    errors = {}
    for compensate in (False, True):
        result = spa.prune(path, 0.5, "obs", calib=tmp_path / "calib.npz", compensate=compensate, bench=False)
        assert result.report.validation.ok
        errors[compensate] = _output_error(path, result.model, held_out)
    assert errors[True] < 0.8 * errors[False]
    assert result.report.compensation["layers"] == 1 and result.report.compensation["biases"] == 1
    assert result.report.statistics["source"] == "calibration" and result.report.statistics["samples"] == 128


def test_soft_equals_hard_with_compensation(tmp_path):
    path = tmp_path / "mlp.onnx"
    _mlp(path)
    result = spa.prune(path, 0.4, bench=False)  # obspa and compensation: the defaults
    assert result.report.options["criterion"] == "obspa" and result.report.compensation["layers"] == 1
    assert result.report.validation.soft_equal is True


def test_calibration_criteria_refuse_to_run_without_data(tmp_path):
    path = tmp_path / "mlp.onnx"
    _mlp(path)
    for name in ("obs", "activation", "fluctuation"):
        with pytest.raises(UsageError, match="--calib"):
            spa.prune(path, 0.4, name)


@pytest.mark.parametrize("criterion", ["obs", "activation", "fluctuation"])
def test_data_criteria_keep_the_channels_the_data_uses(tmp_path, criterion):
    """Channels whose input is always zero on the data must go first, whatever their weights."""
    path = tmp_path / "mlp.onnx"
    model = _mlp()
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    b1 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    dead, live = np.arange(12), np.arange(12, 16)
    w1[:, dead] *= 10.0  # big weights, so magnitude keeps them...
    b1[dead] = -1000.0  # ...but relu gives 0 on every input
    w1[:, live] *= 0.1  # small, always on, and varying with the input
    b1[live] = 1.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(b1, "b1"))
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(8).standard_normal((64, 6)).astype(np.float32))
    result = spa.prune(path, 0.5, criterion, calib=tmp_path / "calib.npz", bench=False)
    hidden = [g for g in result.report.groups if g.removed]
    assert len(hidden) == 1 and hidden[0].removed == 8
    kept_w1 = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}["w1"]
    kept = [k for k in range(16) if any(np.array_equal(kept_w1[:, j], w1[:, k]) for j in range(8))]
    assert set(live) <= set(kept)  # every live channel stayed
    l2 = spa.prune(path, 0.5, "l2", compensate=False, bench=False).model
    l2_w1 = {t.name: numpy_helper.to_array(t) for t in l2.graph.initializer}["w1"]
    assert not any(np.array_equal(l2_w1[:, j], w1[:, k]) for j in range(8) for k in live)  # magnitude errs


def test_global_obspa_gives_groups_different_ratios_and_never_empties_one():
    from pathlib import Path

    model = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx"
    result = spa.prune(
        model, 0.5, "obs", calib=model.parent / "data" / "mnist_calib.npz", global_rank=True, bench=False
    )
    pruned = [g for g in result.report.groups if g.frozen is None and g.channels > 1]
    fractions = {round(g.removed / g.channels, 2) for g in pruned}
    assert len(fractions) > 1  # relative OBS losses, compared as they are, differ per layer
    assert all(g.removed < g.channels for g in pruned)
    removed = sum(g.removed for g in pruned)
    assert abs(removed - 0.5 * sum(g.channels for g in pruned)) <= len(pruned)
