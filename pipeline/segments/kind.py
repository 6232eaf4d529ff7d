"""The segment store kind, as :class:`pipeline.kinds.StoreKind` describes it."""

from __future__ import annotations

from pipeline.segments.build import build, summary_lines
from pipeline.segments.inspect import describe
from pipeline.segments.verify import ok_line, verify

__all__ = ["build", "describe", "ok_line", "summary_lines", "verify"]
