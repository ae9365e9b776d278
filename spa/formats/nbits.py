"""Weights stored block-quantized to a few bits, as onnxruntime's MatMulNBits reads them.

``MatMulNBits(A, B, scales, zero_points, g_idx, bias)`` multiplies A [..., K] by a [K, N] weight
kept as N rows of K // block_size blocks: B is uint8 [N, blocks, block_size * bits / 8], several
values to a byte with the low bits first; scales are [N, blocks]; zero points, when given, are
[N, blocks] in the scales' type or uint8 packed like B ([N, ceil(blocks * bits / 8)]), and
2^(bits - 1) when absent. The weight is ``(q - zero_point) * scale``, one scale and zero point per
block of one output channel. Criteria read it dequantized, as [N, blocks, block_size], so that
its first two axes are the packed tensor's and a block's values are summed as one channel's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from spa.core.graph import ModelGraph, Node

OP_TYPE = "MatMulNBits"
DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class BlockLayout:
    """The sizes a MatMulNBits node declares, checked against its tensors."""

    k: int
    n: int
    bits: int
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def per_byte(self) -> int:
        return 8 // self.bits


def layout(graph: ModelGraph, node: Node) -> BlockLayout | str:
    """The node's layout, or why its tensors do not have the shapes its attributes say."""
    try:
        k, n = int(node.attr("K")), int(node.attr("N"))
        bits, block_size = int(node.attr("bits", 4)), int(node.attr("block_size"))
    except (TypeError, ValueError):
        return "K, N or block_size missing"
    if bits not in (2, 4, 8) or block_size < 16 or block_size & (block_size - 1) or min(k, n) < 1:
        return f"bits {bits} with block_size {block_size}"
    found = BlockLayout(k, n, bits, block_size)
    b_shape, scale_shape = graph.shape(node.inputs[1]), graph.shape(node.input(2))
    if b_shape != (n, found.blocks, block_size * bits // 8):
        return f"packed weight of shape {b_shape}, not [N, blocks, bytes per block]"
    if scale_shape != (n, found.blocks):
        return f"scales of shape {scale_shape}, not [N, blocks] (flattened scales are not cut)"
    return found


def packed_weight(graph: ModelGraph, tensor: str) -> tuple[Node, BlockLayout] | None:
    """The MatMulNBits node that alone reads ``tensor`` as its packed weight, and its layout."""
    readers = graph.consumers.get(tensor, [])
    if len(readers) != 1 or readers[0].op_type != OP_TYPE or readers[0].domain != DOMAIN:
        return None
    node = readers[0]
    if node.inputs[1] != tensor or not graph.is_initializer(tensor) or not graph.is_initializer(node.input(2)):
        return None
    found = layout(graph, node)
    return (node, found) if isinstance(found, BlockLayout) else None


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Values packed ``8 // bits`` to a byte, low bits first, along the last axis."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * len(shifts))


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of ``unpack``, the last axis padded with zeros to a whole byte."""
    per_byte = 8 // bits
    pad = -values.shape[-1] % per_byte
    padded = np.concatenate([values, np.zeros((*values.shape[:-1], pad), values.dtype)], axis=-1)
    grouped = padded.reshape(*values.shape[:-1], -1, per_byte).astype(np.uint8)
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def zero_points(graph: ModelGraph, node: Node, shape: BlockLayout) -> np.ndarray:
    """The zero point of every block, [N, blocks], whatever way it is stored."""
    name = node.input(3)
    value = graph.const(name) if name else None
    if value is None:
        return np.full((shape.n, shape.blocks), 1 << (shape.bits - 1), dtype=np.float32)
    rows = np.asarray(value).reshape(shape.n, -1)
    if rows.dtype == np.uint8:
        return unpack(rows, shape.bits)[:, : shape.blocks].astype(np.float32)
    return rows[:, : shape.blocks].astype(np.float32)


def dequantized_blocks(graph: ModelGraph, tensor: str) -> np.ndarray | None:
    """The float weight a packed MatMulNBits weight holds, as [N, blocks, block_size]."""
    found = packed_weight(graph, tensor)
    if found is None:
        return None
    node, shape = found
    packed, scales = graph.const(tensor), graph.const(node.input(2))
    assert packed is not None and scales is not None  # packed_weight checked both are initializers
    values = unpack(np.asarray(packed, dtype=np.uint8), shape.bits).astype(np.float32)
    centred = values - zero_points(graph, node, shape)[..., None]
    return centred * np.asarray(scales, dtype=np.float32)[..., None]


def cut_zero_points(value: np.ndarray, shape: BlockLayout, rows: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Zero points of the kept output channels and blocks, stored the way ``value`` is."""
    grid = np.asarray(value).reshape(shape.n, -1)
    if grid.dtype == np.uint8:
        kept = unpack(grid, shape.bits)[:, : shape.blocks][np.ix_(rows, blocks)]
        cut = pack(kept, shape.bits)
    else:
        cut = grid[:, : shape.blocks][np.ix_(rows, blocks)]
    return cut if np.ndim(value) == 2 else cut.reshape(-1)
