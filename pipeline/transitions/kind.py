"""The transition store kind, as :class:`pipeline.kinds.StoreKind` describes it."""

from __future__ import annotations

from pipeline.transitions.build import build, summary_lines
from pipeline.transitions.inspect import describe
from pipeline.transitions.verify import ok_line, verify

__all__ = ["build", "describe", "ok_line", "summary_lines", "verify"]
