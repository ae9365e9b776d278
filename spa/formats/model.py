"""The model boundary: a model as spa works on it, with the codec of the format it came in.

spa analyses, cuts and refits one form of every model: canonical, shape-annotated, with the
quantized ops of the QOperator format (QLinearConv, MatMulInteger...) written as their QDQ
float form. A ``Model`` carries that form and the codec that turns it back into the format it
came in; ``Model.as_input_format`` is the only place the codec encodes, so every model spa runs, saves
or hands back is in the input's own format without any caller having to remember it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import onnx

from spa.core.graph import ModelGraph
from spa.core.runlimit import set_stage
from spa.core.tensors import is_lazy
from spa.formats.canonicalize import canonicalize
from spa.formats.load import load_model
from spa.formats.packed_qkv import split_packed_qkv
from spa.formats.qoperator import Expansion, expand
from spa.formats.shapes import check_sizes, infer_shapes

# progress(stage, done, total): called when a stage starts (0 of total) and as it advances
Progress = Callable[[str, int, int], None]

# the formats ``Model.encoded`` writes: the input's own ("auto"), or spa's working QDQ form
FORMATS = ("auto", "qdq")


@dataclass(frozen=True)
class Model:
    """A model in spa's working form (``proto``), and how to write it in the format it came in."""

    name: str
    proto: onnx.ModelProto  # canonical, shape-annotated, quantized ops in their QDQ float form
    opset: int
    path: Path | None = None  # the file it came from, if any
    # what decoding rewrote (QOperator ops expanded to QDQ): encoding fuses them back
    codec: Expansion = field(default_factory=Expansion, repr=False)
    # the model as given, where ``proto`` is its decoded form: its input format, with nothing to encode
    source: onnx.ModelProto | None = field(default=None, repr=False)

    @classmethod
    def load(cls, model_or_path: str | os.PathLike | onnx.ModelProto, progress: Progress | None = None) -> Model:
        """Read a file (or take a ModelProto), canonicalize it, decode its format and infer shapes;
        raises ``ModelLoadError`` for anything unreadable or unsupported."""
        if isinstance(model_or_path, onnx.ModelProto):
            name, proto, path = model_or_path.graph.name or "<model>", model_or_path, None
        else:
            name, path = str(model_or_path), Path(model_or_path)
            say(progress, "load")
            proto = load_model(model_or_path)
        proto = split_packed_qkv(canonicalize(proto))
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
        source, codec = None, Expansion()
        if not is_lazy(proto):
            expanded, codec = expand(proto, opset)
            if codec:
                source, proto = proto, expanded
        proto = infer_shapes(proto)
        check_sizes(proto)
        return cls(name, proto, opset, path, codec, source)

    @cached_property
    def graph(self) -> ModelGraph:
        return ModelGraph(self.proto)

    @property
    def model(self) -> onnx.ModelProto:
        """The working form (``proto``), under the name the pipeline's state used to give it."""
        return self.proto

    @property
    def lazy(self) -> bool:
        """Its weights stay in files on disk (a large model): it is never run or copied in memory."""
        return is_lazy(self.proto)

    @property
    def op_types(self) -> dict[str, str]:
        """Node name -> the op type it has in the format the model came in, where that differs."""
        return self.codec.op_types

    @cached_property
    def as_input_format(self) -> onnx.ModelProto:
        """This model in the format the input came in: the one place the codec encodes."""
        return self.source if self.source is not None else self.codec.fuse(self.proto)

    def encoded(self, format: str = "auto") -> onnx.ModelProto:
        """``"auto"``: in the input's own format (a QOperator model stays QOperator); ``"qdq"``: in
        spa's working form, quantized ops as QuantizeLinear/DequantizeLinear around float ops."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got '{format}'")
        return self.as_input_format if format == "auto" else self.proto

    def derived(self, proto: onnx.ModelProto) -> Model:
        """A model made from this one (refitted or cut), in the same working form and format."""
        return replace(self, proto=proto, source=None)


def load(model_or_path: Model | str | os.PathLike | onnx.ModelProto, progress: Progress | None = None) -> Model:
    """``spa.load``: a model file (or ModelProto) read and checked, ready for ``spa.analyze``."""
    if isinstance(model_or_path, Model):
        return model_or_path
    return Model.load(model_or_path, progress)


def say(progress: Progress | None, stage: str, done: int = 0, total: int = 1) -> None:
    """Tell the user which stage runs (when asked) and the run limit what a timed-out run was doing.

    A stage announced without steps of its own (``total`` 1, nothing done) counts its runs of the
    model instead, as ``done`` of an unknown ``total`` (0): statistics batch by batch, latency run
    by run."""
    ticker = None
    if progress is not None and done == 0 and total == 1:
        runs = iter(range(1, 1 << 62))
        ticker = lambda: progress(stage, next(runs), 0)  # noqa: E731
    set_stage(stage, ticker)
    if progress is not None:
        progress(stage, done, total)
