"""``--calib-generate N``: a decoder writes its own calibration sequences from its BOS token, and
they are used exactly as ``--calib`` token ids would be."""

from __future__ import annotations

import hashlib
import json

import llm_exports
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from test_bad_input import assert_clean_failure, save, small_model
from test_decoder import _decoder

import spa
from spa.cli import main
from spa.core import decoder
from spa.scoring import self_calibration


def _written(model, path=None, sequences=5, length=7, seed=0, top_k=None):
    return self_calibration.generate(model, path, sequences, length, seed, top_k).ids["input_ids"]


def test_sequences_are_seeded_and_as_long_as_asked():
    model = _decoder()
    first, again, other = _written(model), _written(model), _written(model, seed=1)
    assert first.shape == (5, 7)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert (first[:, 0] == 0).all()  # no config beside the model: BOS is token 0
    assert len(np.unique(first[:, 1:])) > 3  # sampled, not one token repeated
    assert first.max() < 32


def test_top_k_one_is_the_greedy_continuation():
    model = _decoder()
    greedy = _written(model, top_k=1, sequences=2)
    assert np.array_equal(greedy[0], greedy[1])  # nothing left to chance
    assert not np.array_equal(greedy, _written(model, sequences=2))


def test_the_bos_token_comes_from_the_config_beside_the_model(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_decoder(), path)
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"bos_token_id": 3}}))
    generated = self_calibration.generate(onnx.load(path), path, 2, 4, 0)
    assert (generated.ids["input_ids"][:, 0] == 3).all()
    assert "BOS 3 (genai_config.json)" in generated.label


def test_generated_sequences_calibrate_exactly_as_the_same_ids_given_as_calib(tmp_path):
    model = _decoder()
    ids = _written(model, sequences=6, length=5, seed=4)
    np.save(tmp_path / "input_ids.npy", ids)
    given = spa.prune(model, ratio=0.5, criterion="activation", calib=tmp_path, seed=4)
    generated = spa.prune(model, ratio=0.5, criterion="activation", calib_generate=6, calib_length=5, seed=4)
    assert generated.report.validation.ok, generated.report.validation.problems
    assert generated.report.statistics["source"] == "calibration"
    digest = [hashlib.sha256(r.model.SerializeToString()).hexdigest() for r in (given, generated)]
    assert digest[0] == digest[1]
    other = spa.prune(model, ratio=0.5, criterion="activation", calib_generate=6, calib_length=5, seed=5)
    assert hashlib.sha256(other.model.SerializeToString()).hexdigest() != digest[0]


def test_activation_without_calib_prunes_from_generated_data_on_the_cli(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_decoder(), path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    args = ["prune", str(path), "--ratio", "0.5", "--criterion", "activation", "--calib-generate", "8"]
    result = CliRunner().invoke(main, [*args, "--calib-length", "6", "-o", str(out), "--json", str(report)])
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())
    assert written["options"]["calib"].startswith("generated: 8 x 6 tokens from BOS 0")
    assert written["validation"]["ok"]
    assert decoder.layout(onnx.load(out)) is not None


def test_a_model_that_is_not_a_decoder_is_refused(tmp_path):
    g, h = small_model()
    g.output(g.conv(h, 4, 2))
    path, digest = save(g.build(), tmp_path)
    result = CliRunner().invoke(main, ["prune", str(path), "--criterion", "activation", "--calib-generate", "4"])
    assert_clean_failure(result, 2, tmp_path, path, digest)
    assert "not a decoder" in result.output


def test_calib_and_calib_generate_together_are_refused(tmp_path):
    path, digest = save(_decoder(), tmp_path)
    np.save(tmp_path / "ids.npy", np.zeros((2, 3), np.int64))
    args = ["prune", str(path), "--calib", str(tmp_path / "ids.npy"), "--calib-generate", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "choose one" in result.output


@pytest.mark.parametrize("name", ["llama-optimum"])  # genai: tests/test_decoder.py
def test_token_sequences_as_calib_on_an_exported_decoder(name, tmp_path):
    """Real exports take --calib token ids as prompts (empty cache, mask and positions filled in),
    and the statistics follow the tokens given."""
    path = llm_exports.optimum(name)
    model = onnx.load(path)
    tokens = _written(model, path, sequences=4, length=12)
    assert (tokens[:, 0] == 1).all()  # the zoo's configs name BOS 1
    means = []
    for k, ids in enumerate((tokens, np.full_like(tokens, 7))):
        np.save(tmp_path / f"input_ids{k}.npy", ids)
        scored = spa.analyze(spa.load(path)).score("activation", data=tmp_path / f"input_ids{k}.npy")
        assert scored.statistics is not None and scored.statistics.source == "calibration"
        means.append(np.concatenate([s.mean for s in scored.statistics.channels.values()]))
    assert all(np.isfinite(m).all() for m in means)
    assert not np.allclose(means[0], means[1])


def test_blocks_are_ranked_on_the_generated_text_too(tmp_path):
    """Depth pruning runs before the width stages: with --calib-generate its Block Influence is
    measured on the model's own text, not on random token ids."""
    path = llm_exports.optimum("llama-optimum")
    result = spa.prune(path, remove_blocks=1, calib_generate=4, calib_length=8, criterion="l2")
    assert result.report.depth["source"].startswith("generated: 4 x 8 tokens from BOS 1")
    assert result.report.validation.ok
