"""Text pieces that ``python -m pipeline.inspect`` prints for every store kind."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.format import QUARANTINE


def hist_lines(values: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
    """A text histogram of ``values``, one line per bin."""
    if len(values) == 0:
        return ["  (none)"]
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return [f"  {lo:>12.4g} | {'#' * width} {len(values)}"]
    counts, edges = np.histogram(values, bins=bins)
    top = max(int(counts.max()), 1)
    return [
        f"  {edges[i]:>12.4g} .. {edges[i + 1]:<12.4g} | {'#' * max(int(round(width * c / top)), 1 if c else 0):<{width}} {c}"
        for i, c in enumerate(counts)
    ]


def quarantine_summary(manifest: dict[str, Any], store: Path) -> list[str]:
    """The build command's line on what was quarantined, and where (none: nothing was)."""
    if not manifest["quarantine_reasons"]:
        return []
    reasons = ", ".join(f"{k}: {v}" for k, v in manifest["quarantine_reasons"].items())
    return [f"  quarantine  {reasons}  -> {store / QUARANTINE}"]


def quarantine_lines(store: Path, examples: int = 1) -> list[str]:
    """Quarantine reasons, most common first, each with ``examples`` examples."""
    q = store / QUARANTINE
    if not q.exists():
        return []
    reasons: Counter[str] = Counter()
    seen: dict[str, list[str]] = {}
    with q.open("r", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            reasons[rec["reason"]] += 1
            where = f" {rec['location']}" if "location" in rec else f":{rec['line']}"
            if len(seen.setdefault(rec["reason"], [])) < examples:
                seen[rec["reason"]].append(f"{rec['file']}{where}: {rec['detail']}")
    out = []
    for reason, n in reasons.most_common():
        out.append(f"  {reason:<24} {n:>8}")
        out += [f"      e.g. {ex}" for ex in seen[reason]]
    return out
