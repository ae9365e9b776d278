"""The operator registry: one small rule per operator family.

Importing this module registers every rule. To support a new operator, add a
``Rule`` subclass decorated with ``@register`` in the module of its family,
and a unit test with a hand-built graph in ``tests/test_rules.py``.
"""

from spa.ops import (  # noqa: F401  (registration)
    contrib,
    conv,
    elementwise,
    integer,
    layout,
    linear,
    norm,
    onnx_attention,
    quantize,
    recurrent,
    reshape,
    rotary,
    spatial,
)
from spa.ops.base import RULES, Dim, Freeze, Link, Pending, Rule, RuleContext, Sink, register, rule_for

__all__ = ["RULES", "Dim", "Freeze", "Link", "Pending", "Rule", "RuleContext", "Sink", "register", "rule_for"]
