"""spa: structured pruning of ONNX graphs.

import spa
result = spa.prune("model.onnx", ratio=0.4)
onnx.save(result.model, "model.pruned.onnx")
"""

__version__ = "0.1.0"

from spa.api import AnalysisReport, PruneReport, PruneResult, analyze, prune  # noqa: E402
from spa.core.errors import ModelLoadError, OutputError, SpaError, UsageError, ValidationError  # noqa: E402
from spa.reporting.report import Report, build_report, render_html  # noqa: E402

__all__ = [
    "analyze",
    "prune",
    "build_report",
    "render_html",
    "AnalysisReport",
    "PruneReport",
    "PruneResult",
    "Report",
    "SpaError",
    "UsageError",
    "ModelLoadError",
    "ValidationError",
    "OutputError",
    "__version__",
]
