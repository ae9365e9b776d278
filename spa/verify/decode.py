"""Validation of a decoder that carries its key/value cache: a prefill, then a decode step.

One feed with a made-up past proves the graph runs, not that generation does: a decode step reads
the cache the model itself wrote, whose head count and head size pruning may have changed. Each
model runs a prefill and then one decode step fed its own ``present`` outputs
(``spa.core.decoder.rollout``); the pruned model must run both, output finite logits where the
input model does, in the same shapes; soft and hard-pruned logits must agree on both steps.
"""

from __future__ import annotations

import numpy as np

from spa.core import decoder, runlimit
from spa.core.runtime import Source, one_line, outputs_of, proto_of, session
from spa.verify.compare import newly_nonfinite, relative_error

Steps = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def steps(model: Source, seed: int, custom_ops: tuple[str, ...]) -> Steps:
    """The model's outputs on a prefill and on the decode step after it (cache outputs left out)."""
    proto = proto_of(model)
    sess = session(model, custom_ops=custom_ops)
    first, second = decoder.rollout(proto, lambda feed: outputs_of(sess, feed), seed)
    cache = decoder.layout(proto)
    presents = set(cache.past.values()) if cache else set()
    return tuple({k: v for k, v in out.items() if k not in presents} for out in (first, second))  # type: ignore[return-value]


def check(result, dense: Source, pruned: Source, seed: int, custom_ops: tuple[str, ...]) -> Steps | None:
    """Run both models through a prefill and a decode step; problems go to ``result`` (a
    ``Validation``). Returns the pruned model's steps, or None where there is nothing to check."""
    if decoder.layout(proto_of(dense)) is None:
        return None
    try:
        dense_steps = steps(dense, seed, custom_ops)
    except runlimit.RunTimeout:
        raise
    except Exception:  # an input model that does not decode this way: the one-feed checks stand
        return None
    try:
        pruned_steps = steps(pruned, seed, custom_ops)
    except runlimit.RunTimeout:
        raise
    except Exception as exc:
        result.problems.append(f"the pruned model cannot run a decode step from its own cache: {one_line(exc)}")
        return None
    result.decode_checked = True
    for step, d, p in zip(("prefill", "decode step"), dense_steps, pruned_steps):
        broken = newly_nonfinite(d, p)
        if broken:
            result.problems.append(f"the pruned model outputs NaN or inf on the {step} ({', '.join(broken)})")
        if any(d[name].shape != p[name].shape for name in d if name in p):
            result.problems.append(f"the pruned model's outputs change shape on the {step}")
    return pruned_steps


def soft_hard_error(soft: Source, hard_steps: Steps, seed: int, custom_ops: tuple[str, ...]) -> float:
    """The worst relative error between soft and hard-pruned outputs over prefill and decode step."""
    soft_steps = steps(soft, seed, custom_ops)
    return max(relative_error(s, h) for s, h in zip(soft_steps, hard_steps))
