"""onnx's checker, minus two complaints that are harmless: an output declared without a shape, and
an op onnxruntime registers in the ONNX domain that onnx itself does not know.

The checker stops at its first complaint, and it looks at the graph's outputs before the nodes
and tensors. Treating "output has no shape" as a pass therefore used to wave through whatever
came after it (nodes out of order, duplicate initializers, tensors without data). Here such
outputs are set aside into ``value_info`` (where a missing shape is legal and types are still
compared with inference) and everything else is checked.

onnxruntime registers some of its own ops in the ONNX domain (SimplifiedLayerNormalization, which
the onnxruntime-genai model builder writes there); the checker refuses any ONNX-domain op it has
no schema for. Such nodes are moved, for the check only, to a domain the checker does not judge,
so the rest of the model is still checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import onnx
from onnx.external_data_helper import uses_external_data

from spa.formats.walk import all_tensors

_PROTOBUF_LIMIT = 2**31 - 2**20
_SMALL = 1 << 20  # bytes: smaller tensors are shown to the checker as they are
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_ONNX_DOMAINS = ("", "ai.onnx")
_SET_ASIDE_DOMAIN = "spa.onnxruntime-in-onnx-domain"  # a domain the checker has no schemas for


def checker_complaint(model: onnx.ModelProto, full_check: bool = False) -> str | None:
    """The checker's complaint about ``model`` in one line, or None when it has none.

    A model whose weights stay on disk, or too large to serialise, is checked as a copy without
    its bulky data (the checker would look for the files from the current directory); shape
    inference reads constants, so such models get the structural check only.
    """
    bulky = (
        any(uses_external_data(t) for t in all_tensors(model.graph, sparse=False))
        or model.ByteSize() >= _PROTOBUF_LIMIT
    )
    target = _light_copy(model) if bulky else model
    with _shapeless_outputs_aside(target), _runtime_ops_aside(target):
        try:
            onnx.checker.check_model(target, full_check=full_check and not bulky)
        except Exception as exc:  # the checker raises several unrelated types
            return _one_line(exc)
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # node errors span lines ("...input 'x' of node: name: ...")
    return (text or type(exc).__name__)[:300]


@contextmanager
def _shapeless_outputs_aside(model: onnx.ModelProto):
    graph = model.graph
    kept = list(graph.output)
    aside = [o for o in kept if _tensor_without_shape(o)]
    if not aside:
        yield
        return
    del graph.output[:]
    graph.output.extend(o for o in kept if not _tensor_without_shape(o))
    graph.value_info.extend(aside)
    try:
        yield
    finally:
        del graph.value_info[len(graph.value_info) - len(aside) :]
        del graph.output[:]
        graph.output.extend(kept)


@cache
def runtime_onnx_domain_ops() -> frozenset[str]:
    """Op types onnxruntime registers in the ONNX domain that onnx itself has no schema for."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as runtime

        schemas = runtime.get_all_operator_schema()
    except (ImportError, AttributeError):  # a build without its schema list
        return frozenset({"SimplifiedLayerNormalization"})
    return frozenset(s.name for s in schemas if s.domain in _ONNX_DOMAINS and not onnx.defs.has(s.name, s.domain))


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


@contextmanager
def _runtime_ops_aside(model: onnx.ModelProto):
    known = runtime_onnx_domain_ops()
    moved = [(n, n.domain) for n in _all_nodes(model.graph) if n.domain in _ONNX_DOMAINS and n.op_type in known]
    if not moved:
        yield
        return
    for node, _ in moved:
        node.domain = _SET_ASIDE_DOMAIN
    model.opset_import.add(domain=_SET_ASIDE_DOMAIN, version=1)
    try:
        yield
    finally:
        del model.opset_import[len(model.opset_import) - 1]
        for node, domain in moved:
            node.domain = domain


def _tensor_without_shape(info: onnx.ValueInfoProto) -> bool:
    # a missing name or element type stays the checker's business
    return (
        bool(info.name)
        and info.type.HasField("tensor_type")
        and info.type.tensor_type.HasField("elem_type")
        and not info.type.tensor_type.HasField("shape")
    )


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # a lazily loaded model's protobuf holds references, not weights
    for tensor in all_tensors(copy.graph, sparse=False):  # sparse ones are checked by value, left whole
        _lighten(tensor)
    return copy


def _lighten(tensor: onnx.TensorProto) -> None:
    """Make a bulky tensor an empty one of the same name and type.

    The checker compares the data's size with the shape, so cutting the data down would be a
    complaint of its own; spa checks the sizes itself (spa.formats.load, spa.formats.shapes). A
    tensor whose data sits in more than one place is left whole for the checker to name.
    """
    places = sum(1 for f in _VALUE_FIELDS if len(getattr(tensor, f))) + tensor.HasField("raw_data")
    external = uses_external_data(tensor)
    if places + external != 1 or (not external and tensor.ByteSize() < _SMALL):
        return
    name, data_type = tensor.name, tensor.data_type
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.append(0)
