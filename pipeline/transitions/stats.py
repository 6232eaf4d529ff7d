"""Per-feature statistics of a store (the manifest's ``statistics``), merged chunk by chunk.

Each chunk's transitions are summarised where they are built (:func:`chunk_stats`, called by
:func:`pipeline.transitions.episodes.build_transitions`, so in a worker process or a Ray
worker), and the building process only merges the summaries in input order. The numbers are
the same as summarising each chunk as it is appended: the same batches, the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RunningStats:
    """Per-feature mean/std/min/max in float64, merged batch by batch (Chan et al.)."""

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    @staticmethod
    def of(x: np.ndarray) -> RunningStats:
        """The statistics of one batch ``x`` ((n,) or (n, d))."""
        if len(x) == 0:
            return RunningStats()
        if x.ndim == 1:
            x = x[:, None]
        lo, hi = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
        xd = x.astype(np.float64)
        mb = xd.mean(axis=0)
        np.subtract(xd, mb, out=xd)
        np.square(xd, out=xd)
        return RunningStats(len(x), mb, xd.sum(axis=0), lo, hi)

    def merge(self, b: RunningStats) -> None:
        """Take in the statistics of the batch after the ones merged so far."""
        if b.n == 0 or b.mean is None or b.m2 is None or b.lo is None or b.hi is None:
            return
        if self.mean is None or self.m2 is None or self.lo is None or self.hi is None:
            self.n, self.mean, self.m2, self.lo, self.hi = b.n, b.mean, b.m2, b.lo, b.hi
            return
        n = self.n + b.n
        delta = b.mean - self.mean
        self.mean = self.mean + delta * b.n / n
        self.m2 = self.m2 + b.m2 + delta**2 * self.n * b.n / n
        self.n = n
        self.lo = np.minimum(self.lo, b.lo)
        self.hi = np.maximum(self.hi, b.hi)

    def to_dict(self, scalar: bool = False) -> dict[str, Any]:
        if self.mean is None or self.m2 is None or self.lo is None or self.hi is None:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        std = np.sqrt(self.m2 / max(self.n, 1))

        def out(a: np.ndarray) -> Any:
            v = [float(x) for x in a]
            return v[0] if scalar else v

        return {
            "count": self.n,
            "mean": out(self.mean),
            "std": out(std),
            "min": out(self.lo),
            "max": out(self.hi),
        }


@dataclass
class ChunkStats:
    """The statistics of one chunk's transitions, feature by feature."""

    observation: RunningStats
    action: RunningStats  # continuous actions; empty for discrete ones
    reward: RunningStats
    return_to_go: RunningStats
    named: list[RunningStats] = field(default_factory=list)  # the named rewards, in order


def chunk_stats(
    observation: np.ndarray,
    action: np.ndarray,
    reward: np.ndarray,
    return_to_go: np.ndarray,
    named_reward: np.ndarray | None,
) -> ChunkStats:
    return ChunkStats(
        RunningStats.of(observation),
        RunningStats.of(action) if action.ndim == 2 else RunningStats(),
        RunningStats.of(reward),
        RunningStats.of(return_to_go),
        [] if named_reward is None else [RunningStats.of(named_reward[:, k])
                                         for k in range(named_reward.shape[1])],
    )  # fmt: skip
