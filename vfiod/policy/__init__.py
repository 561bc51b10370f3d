"""Admin policy: who may have which device, and how.

Pure data (model), a TOML loader with file:line errors (load), and the
decision with its trace (decide). See policy/README.md for the file format.
"""

from __future__ import annotations

from vfiod.policy.decide import decide, format_decision
from vfiod.policy.load import LoadResult, PolicyError, PolicyHolder, Problem, load_policy
from vfiod.policy.model import (
    Caller,
    Decision,
    Effect,
    Grants,
    Policy,
    Refusal,
    Request,
    Rule,
    Settings,
    TraceEntry,
)

__all__ = [
    "Caller",
    "Decision",
    "Effect",
    "Grants",
    "LoadResult",
    "Policy",
    "PolicyError",
    "PolicyHolder",
    "Problem",
    "Refusal",
    "Request",
    "Rule",
    "Settings",
    "TraceEntry",
    "decide",
    "format_decision",
    "load_policy",
]
