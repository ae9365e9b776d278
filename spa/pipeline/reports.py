"""What the stages report: the groups found, the analysis and the pruning, as users read them."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import onnx

from spa.analysis.groups import Analysis, Group
from spa.core.graph import ModelGraph
from spa.core.runtime import complete_sizes
from spa.core.signals import ScratchDirectory
from spa.formats.model import Model
from spa.formats.shapes import with_input_sizes
from spa.ops.registry import DEFAULT, Registry
from spa.pipeline.summary import Summary
from spa.planning.search import TargetOutcome
from spa.reporting.group_layers import LayerRole, group_layer_roles
from spa.reporting.metrics import ModelStats, count
from spa.verify.validate import Validation


@dataclass
class GroupReport:
    id: int
    channels: int  # units: the smallest sets of indices that can go together
    removed: int
    exact: bool
    frozen: str | None
    layers: list[str]  # weighted ops whose weights this group slices, with the side
    dims: list[str]
    kind: str | None = None  # "heads", "head_dim" or "query_heads": the units of an attention layer, as measured
    heads: int | None = None  # on the graph; heads counts query heads
    head_dim: int | None = None
    kv_heads: int | None = None  # grouped-query attention: K/V heads, each shared by heads / kv_heads query heads
    approximate: str | None = None  # why removal is not equal to zeroing (the norms over these channels)
    layer_roles: list[LayerRole] = field(default_factory=list)  # ``layers`` as records: op, node, side, kind

    @classmethod
    def of(cls, analysis: Analysis, group: Group, removed: int, op_types: dict[str, str]) -> GroupReport:
        head = group.attention
        roles = group_layer_roles(analysis, group, op_types)
        return cls(
            group.id,
            group.size,
            removed,
            group.exact,
            group.frozen,
            list(dict.fromkeys(str(role) for role in roles)),
            [str(d) for d in group.dims],
            head.kind if head else None,
            head.heads if head else None,
            head.head_dim if head else None,
            head.kv_heads if head else None,
            group.inexact_reason,
            roles,
        )


@dataclass
class AnalysisReport:
    model: str
    groups: list[GroupReport]
    params: int
    flops: int
    analysis: Analysis = field(repr=False, compare=False)
    stats: ModelStats | None = field(default=None, repr=False, compare=False)
    flops_at: dict[str, list[int]] = field(default_factory=dict)  # input sizes the FLOPs are counted at
    unsized_axes: list[str] = field(default_factory=list)  # free axes past the batch FLOPs count as 1
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # the sizes the caller gave
    unruled_weights: dict[str, int] = field(default_factory=dict)  # op type -> nodes holding weights no rule reads

    @property
    def prunable(self) -> list[GroupReport]:
        return [g for g in self.groups if g.frozen is None and g.channels > 1]

    def as_dict(self) -> dict:
        costs = self.stats or ModelStats(self.params, self.flops)
        return {
            "model": self.model,
            "params": self.params,
            "flops": self.flops,
            "flops_at": self.flops_at,
            "unsized_axes": self.unsized_axes,
            "input_shapes": self.input_shapes,
            "flops_uncounted": costs.uncounted(),
            "flops_by_op_type": costs.per_op_type(),
            "nodes": [asdict(n) for n in costs.nodes],
            "groups_found": len(self.groups),
            "groups_prunable": len(self.prunable),
            "unruled_weights": self.unruled_weights,
            "groups": [asdict(g) for g in self.groups],
        }


@dataclass
class PruneReport:
    model: str
    options: dict
    groups_found: int
    groups_prunable: int
    groups_pruned: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    validation: Validation
    seconds: dict[str, float]
    groups: list[GroupReport]
    target: TargetOutcome | None = None  # how the ratio was searched, when a target was given
    # what the width cost model measured (layers, points timed and cached, seconds): round_to="auto"
    widths: dict | None = None
    statistics: dict | None = None  # where layer-input statistics came from (Statistics.summary)
    compensation: dict | None = None  # what the weight refit did (Compensation.as_dict)
    fallback_groups: int = 0  # groups a data-aware criterion scored by l2: no linear layer reads them
    flops_at: dict[str, list[int]] = field(default_factory=dict)  # input sizes the FLOPs are counted at
    unsized_axes: list[str] = field(default_factory=list)  # free axes past the batch FLOPs count as 1
    flops_uncounted: dict[str, int] = field(default_factory=dict)  # op type -> nodes of unknown shape (dense)
    # what happened to accuracy and speed, and the input sizes each figure was taken at
    summary: Summary | None = None
    # the experts removed from mixture-of-experts layers before the cut (``ExpertRemoval.as_dict``)
    experts: dict | None = None
    # depth pruning: the blocks found with their scores, those removed, their checks and fidelity
    # (``params_before`` and ``flops_before`` are then the model's before the blocks went)
    depth: dict | None = None

    def as_dict(self) -> dict:
        data = asdict(self)
        data["validation"] = self.validation.as_dict()
        return data


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: PruneReport
    # for models with external data, the cut tensors live in this folder (removed with the result)
    workdir: ScratchDirectory | None = field(default=None, repr=False, compare=False)


class Timer:
    """Seconds per stage, in the order the stages ran."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds: dict[str, float] = dict(seconds or {})
        self._last = time.perf_counter()

    def lap(self, stage: str) -> dict[str, float]:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 4)
        self._last = now
        return dict(self.seconds)


def count_model(
    model: Model, proto: onnx.ModelProto, sizes: dict[str, list[int]] | None, registry: Registry = DEFAULT
) -> ModelStats:
    """Params and FLOPs of ``proto`` (``model`` or a cut of it), the FLOPs with the inputs at
    ``sizes`` (free axes at 1 where none is given); each op under the type it has in the model as given."""
    if sizes:
        stats = count(ModelGraph(with_input_sizes(proto, complete_sizes(proto, sizes))), registry)
    else:
        stats = count(model.graph if proto is model.proto else ModelGraph(proto), registry)
    op_types = model.op_types
    stats.nodes = [replace(node, op_type=op_types.get(node.name, node.op_type)) for node in stats.nodes]
    return stats
