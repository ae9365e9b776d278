"""spa: structured pruning of ONNX graphs.

import spa
result = spa.prune("model.onnx", ratio=0.4)
onnx.save(result.model, "model.pruned.onnx")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from spa.core.errors import ModelLoadError, OutputError, SlowerError, SpaError, UsageError, ValidationError  # noqa: E402

# The public names below load on first use, so that importing one stage (``spa.core.runtime``,
# ``spa.scoring.statistics``) does not load the whole pipeline and every operator with it.
_LAZY = {
    "analyze": "spa.api",
    "prune": "spa.api",
    "load": "spa.formats.model",
    "AnalysisReport": "spa.api",
    "PruneReport": "spa.api",
    "PruneResult": "spa.api",
    "Model": "spa.formats.model",
    "build_report": "spa.reporting.report",
    "render_html": "spa.reporting.report",
    "Report": "spa.reporting.report",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spa' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "load",
    "analyze",
    "prune",
    "build_report",
    "render_html",
    "Model",
    "AnalysisReport",
    "PruneReport",
    "PruneResult",
    "Report",
    "SpaError",
    "UsageError",
    "ModelLoadError",
    "ValidationError",
    "OutputError",
    "SlowerError",
    "__version__",
]
