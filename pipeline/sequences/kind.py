"""The sequence store kind, as :class:`pipeline.kinds.StoreKind` describes it."""

from __future__ import annotations

from pipeline.sequences.build import build, summary_lines
from pipeline.sequences.inspect import describe
from pipeline.sequences.verify import ok_line, verify

__all__ = ["build", "describe", "ok_line", "summary_lines", "verify"]
