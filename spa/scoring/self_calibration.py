"""Calibration data a decoder language model writes itself (``--calib-generate N``).

Without user text, a decoder's statistics would come from random token ids, which no layer ever
sees in use. The dense model can instead write its own: N sequences sampled from its BOS token
(temperature 1, optionally top-k), through onnxruntime with the key/value cache as graph I/O,
fed back step by step as a generation loop does. The token ids are then used exactly like
``--calib`` data holding token ids: an empty cache, a mask over the ids and positions counting
from 0 are filled in for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from spa.core import decoder, runlimit
from spa.core.errors import UsageError
from spa.core.runtime import session

# sequences sampled at once: the cache of a batch grows with the length
BATCH = 16


@dataclass(frozen=True)
class Generated:
    """Token ids the model wrote, and the BOS id it started from (and where that id came from)."""

    ids: dict[str, np.ndarray]  # the model's ids input -> [sequences, length]
    bos: int
    bos_source: str

    @property
    def label(self) -> str:
        sequences, length = next(iter(self.ids.values())).shape
        return f"generated: {sequences} x {length} tokens from BOS {self.bos} ({self.bos_source})"


def bos_token(model_path: Path | None) -> tuple[int, str]:
    """The BOS id from ``genai_config.json`` or ``config.json`` beside the model; else 0."""
    if model_path is not None:
        folder = Path(model_path).parent
        for name, keys in (("genai_config.json", ("model", "bos_token_id")), ("config.json", ("bos_token_id",))):
            try:
                value = json.loads((folder / name).read_text())
                for key in keys:
                    value = value[key]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(value, list):  # some configs list several
                value = value[0] if value else None
            if isinstance(value, int) and value >= 0:
                return value, name
    return 0, "no config beside the model names one: token 0"


def generate(
    model: onnx.ModelProto,
    model_path: Path | None,
    sequences: int,
    length: int,
    seed: int,
    top_k: int | None = None,
    custom_ops: tuple[str, ...] = (),
) -> Generated:
    """``sequences`` token sequences of ``length`` sampled by the dense ``model`` from its BOS."""
    cache = decoder.layout(model)
    if cache is None or cache.ids is None:
        raise UsageError(
            "--calib-generate: the model is not a decoder with a key/value cache as graph inputs "
            "(past_key_values.N / present.N); give --calib FILE"
        )
    if sequences < 1 or length < 1:
        raise UsageError("--calib-generate needs at least 1 sequence of at least 1 token")
    bos, source = bos_token(model_path)
    if cache.vocab is not None and bos >= cache.vocab:
        raise UsageError(f"--calib-generate: the BOS id {bos} ({source}) lies past the vocabulary ({cache.vocab})")
    logits = _logits_output(model, cache)
    run = session(model, custom_ops=custom_ops)
    rng = np.random.default_rng([seed, 23])
    ids_dtype = decoder._dtype(next(i for i in model.graph.input if i.name == cache.ids))
    parts = []
    for start in range(0, sequences, BATCH):
        rows = min(BATCH, sequences - start)
        parts.append(_sample(model, cache, run, logits, rows, length, bos, rng, top_k).astype(ids_dtype))
    return Generated({cache.ids: np.concatenate(parts)}, bos, source)


def _logits_output(model: onnx.ModelProto, cache: decoder.CacheLayout) -> str:
    presents = set(cache.past.values())
    outputs = [o.name for o in model.graph.output if o.name not in presents]
    named = [name for name in outputs if "logits" in name.lower()]
    if not (named or outputs):
        raise UsageError("--calib-generate: the model has no output besides its cache")
    return (named or outputs)[0]


def _sample(model, cache, run, logits: str, rows: int, length: int, bos: int, rng, top_k: int | None) -> np.ndarray:
    """One batch of sequences: BOS, then ``length - 1`` tokens each sampled from the model's
    distribution after the tokens before it (the BOS is part of the sequence)."""
    tokens = np.full((rows, length), bos, np.int64)
    wanted = [logits, *cache.past.values()]
    caches = None
    for step in range(length - 1):
        feed = decoder.feed(model, cache, rows, step, 1, rng, caches)
        feed[cache.ids] = tokens[:, step : step + 1].astype(feed[cache.ids].dtype)
        values = dict(zip(wanted, runlimit.run(run, wanted, feed)))
        caches = {name: values[present] for name, present in cache.past.items()}
        tokens[:, step + 1] = _draw(values[logits][:, -1, :].astype(np.float64), rng, top_k)
    return tokens


def _draw(scores: np.ndarray, rng: np.random.Generator, top_k: int | None) -> np.ndarray:
    """One token per row from softmax(scores) (temperature 1), restricted to the ``top_k`` best."""
    if top_k is not None and top_k < scores.shape[1]:
        cut = np.partition(scores, -top_k, axis=1)[:, -top_k][:, None]
        scores = np.where(scores >= cut, scores, -np.inf)
    scores = scores - scores.max(axis=1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(weights, axis=1)
    draws = rng.random((scores.shape[0], 1))
    return np.minimum((cumulative < draws).sum(axis=1), scores.shape[1] - 1)
