"""Find a feed the input model runs on, where spa has to make one up.

spa makes up values for inputs the user gives no data for: random samples at a length of 1 past
the batch, zeros for integer inputs. Where those may be wrong (a control value, a recurrent
state, a free length), the dense model is run once on them before any stage depends on them;
where it fails, lengths the user or the graph suggests are tried (``spa.core.feeds``), and when
none runs, the error names the inputs, the feed and the options that set it: the model is fine,
the feed is not.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx

from spa.core import feeds, runlimit
from spa.core.errors import UsageError
from spa.core.runtime import Source, graph_inputs, one_line, outputs_of, sample_inputs, session

# lengths tried past the first feed; a failing run stops at the first op that refuses its input
MAX_PROBES = 64


def derive(
    source: Source,
    model: onnx.ModelProto,
    given: Mapping[str, np.ndarray],
    sizes: Mapping[str, list[int]] | None = None,
    hints: list[int] | None = None,
    custom_ops: tuple[str, ...] = (),
) -> feeds.FeedSpec:
    """The ``FeedSpec`` every stage feeds ``model`` (``source``: in memory, or its file): the
    values ``given`` (``--input``), and where the sample feed does not run, the first length that
    does among ``hints`` (lengths in the user's sizes or calibration data) and the graph's
    candidates. Raises UsageError when none runs."""
    controls = feeds.graph_controls(model)
    why = {name: f"{value.tolist()}: {reason}" for name, (value, reason) in controls.items() if name not in given}
    why.update({name: "given" for name in given})
    spec = feeds.FeedSpec(dict(given), None, why)
    lengths = free_lengths(model, sizes)
    if not (set(controls) - set(given) or lengths or _states(model)):
        return spec  # nothing made up that the graph could refuse
    try:
        sess = session(source, custom_ops=custom_ops)
    except Exception:  # onnxruntime cannot open the model at all: validation says why (exit 3)
        return spec
    first = _failure(sess, model, spec, sizes)
    if first is None:
        return spec
    if lengths:
        tried = list(dict.fromkeys([*(hints or []), *feeds.length_candidates(model)]))[:MAX_PROBES]
        for length in tried:
            if _failure(sess, model, replace(spec, length=length), sizes) is None:
                why = {**spec.why, **{axis: f"{length}: the first length the model runs at" for axis in lengths}}
                return replace(spec, length=length, why=why)
    raise UsageError(_refusal(model, spec, sizes, lengths, first))


def free_lengths(model: onnx.ModelProto, sizes: Mapping[str, list[int]] | None = None) -> list[str]:
    """Free axes past the batch that the sample feed makes up a length for, as ``input[axis]``:
    not the batch axis, not a size the user gave, not the height and width of an image."""
    axes = feeds.batch_axes(model)
    found = []
    for info in graph_inputs(model):
        dims = list(info.type.tensor_type.shape.dim)
        image = len(dims) == 4 and dims[1].HasField("dim_value") and 0 < dims[1].dim_value <= 4
        if info.name in (sizes or {}) or image:
            continue
        found += [
            f"{info.name}[{axis}]"
            for axis, dim in enumerate(dims)
            if axis != axes.get(info.name) and axis and not (dim.HasField("dim_value") and dim.dim_value > 0)
        ]
    return found


def _states(model: onnx.ModelProto) -> list[str]:
    return [name for name, axis in feeds.batch_axes(model).items() if axis]


def _failure(sess, model: onnx.ModelProto, spec: feeds.FeedSpec, sizes) -> str | None:
    """Why onnxruntime refuses the sample feed under ``spec``, or None when it runs."""
    sample = _sample(model, spec, sizes)
    try:
        outputs_of(sess, sample)
    except runlimit.RunTimeout:
        raise
    except Exception as exc:  # onnxruntime raises several unrelated types
        return one_line(exc)
    return None


def _sample(model: onnx.ModelProto, spec: feeds.FeedSpec, sizes) -> dict[str, np.ndarray]:
    def under_spec():
        feeds.use(spec)
        return sample_inputs(model, shapes=dict(sizes or {}))

    return contextvars.copy_context().run(under_spec)


def _refusal(model: onnx.ModelProto, spec: feeds.FeedSpec, sizes, lengths: list[str], reason: str) -> str:
    """The error: the feed spa used, onnxruntime's reason, and the option for each made-up input."""
    sample = _sample(model, spec, sizes)
    controls = [name for name in feeds.control_inputs(model) if name not in spec.values]
    used = ", ".join(
        f"{name}={value.reshape(-1)[0]}"
        if name in spec.values or name in controls
        else f"{name}: {value.dtype} {'x'.join(map(str, value.shape)) or 'scalar'}"
        for name, value in sample.items()
    )
    free: dict[str, list[int]] = {}
    for axis in lengths:
        name, index = axis[:-1].split("[")
        free.setdefault(name, []).append(int(index))
    fixes = [
        f"--input-shape {name}={'x'.join('N' if a in axes else str(n) for a, n in enumerate(sample[name].shape))}"
        for name, axes in free.items()
    ]
    fixes += [f"--input {name}=VALUE" for name in controls]
    named = [*free, *controls]
    subject = f"input {', '.join(named)}" if named else "its inputs"
    return (
        f"onnxruntime cannot run the input model on the feed spa made up for {subject} ({used}): {reason}; "
        f"give values it runs on with {' or '.join(fixes) or '--input-shape NAME=AxBxC'}"
    )
