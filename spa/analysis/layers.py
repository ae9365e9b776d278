"""Linear layers seen from their input channels: what OBS, Wanda-style scores and
compensation work on.

A layer here is an op computing ``y = W x + b`` over one channel axis of its activation input,
with W (and b) initializers that belong to it alone; each operator says which of its nodes are
one (``Operator.linear``): Conv with group 1, Gemm, MatMul by a 2-D weight or its Transpose
(optionally followed by an Add of a bias), and their dynamically quantized forms.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from spa.core.coupling import Dim
from spa.core.graph import ModelGraph
from spa.ops.linear_view import LinearLayer
from spa.ops.registry import DEFAULT, Registry

__all__ = ["LayerIndex", "LinearLayer", "linear_layers"]


def linear_layers(graph: ModelGraph, registry: Registry = DEFAULT) -> list[LinearLayer]:
    layers = []
    for node in graph.nodes:
        operator = registry.of(node)
        layer = operator.linear(graph, node) if operator is not None else None
        if layer is not None:
            layers.append(layer)
    return layers


class LayerIndex:
    """The linear layers of an analysed model, by the weight dimension groups slice."""

    def __init__(self, graph: ModelGraph, reached: dict[Dim, np.ndarray], registry: Registry = DEFAULT):
        self.layers = [
            layer
            for layer in linear_layers(graph, registry)
            if layer.weight_dim in reached
            and layer.activation in reached
            and len(layer.column_labels(reached)) == len(reached[layer.activation])
        ]

    @cached_property
    def by_weight_dim(self) -> dict[Dim, LinearLayer]:
        return {layer.weight_dim: layer for layer in self.layers}

    def of_group(self, dims) -> list[LinearLayer]:
        return [self.by_weight_dim[d] for d in dims if d in self.by_weight_dim]
