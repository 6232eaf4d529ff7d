"""From the steps of complete episodes to transitions: the semantics of the store.

Everything here is vectorised over all the episodes of a batch (no Python loop per step):

* the last step is never dropped when it can be kept: ``next_observation`` of the last
  step is the episode's final observation when the log has one; a terminated episode
  without one keeps its last step (``next_observation`` repeats ``observation``, and is
  never bootstrapped from because ``terminated`` is true);
* a cut-off (truncated) episode with no final observation loses only its last,
  unbootstrappable transition; the new last row is ``truncated`` and the loss is counted;
* ``terminated`` and ``truncated`` are never merged and sit only on the last row; a log
  that just stops counts as truncated; both flags at once count as terminated;
* ``next_observation`` never comes from another episode.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from pipeline.transitions.parse import (
    DUPLICATE_STEP,
    END_BEFORE_LAST_STEP,
    STEP_GAP,
    UNBOOTSTRAPPABLE,
    ParsedSteps,
)

_BLOCK = 32


def discounted_returns(rewards: np.ndarray, starts: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted sum of rewards from each row to the end of its segment.

    ``starts[i]`` is true where a new segment (episode) begins. Vectorised as a blocked
    scan: a suffix sum inside blocks of 32 rows, then the same problem one level up on
    the block sums with discount ``gamma**32`` — O(n) work, O(32 log n) NumPy calls.
    """
    r = np.asarray(rewards, dtype=np.float64)
    n = len(r)
    if n == 0:
        return r.copy()
    starts = np.asarray(starts, dtype=bool).copy()
    starts[0] = True
    seg = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    pos = np.arange(n) - first[seg]
    col = pos % _BLOCK
    bstart = starts | (col == 0)
    bid = np.cumsum(bstart) - 1
    nb = int(bid[-1]) + 1
    m = np.zeros((nb, _BLOCK))
    m[bid, col] = r
    for j in range(_BLOCK - 2, -1, -1):
        m[:, j] += gamma * m[:, j + 1]
    if nb == 1:
        return m[bid, col]
    bfirst = np.flatnonzero(bstart)
    blen = np.diff(np.append(bfirst, n))
    # a block continues into the next one when the next one does not start a segment
    cont = np.zeros(nb, dtype=bool)
    cont[:-1] = ~starts[bfirst[1:]]
    if not cont.any():
        return m[bid, col]
    # G_b = value of block b's first row; recurrence G_b = m[b,0] + gamma^B G_{b+1} (cont)
    g_first = discounted_returns(m[:, 0], starts[bfirst], gamma**_BLOCK)
    nxt = np.zeros(nb)
    nxt[:-1] = np.where(cont[:-1], g_first[1:], 0.0)
    exponent = (blen[bid] - col).astype(np.float64)
    return m[bid, col] + np.power(gamma, exponent) * nxt[bid]


def discounted_returns_reference(
    rewards: np.ndarray, starts: np.ndarray, gamma: float
) -> np.ndarray:
    """The plain loop, for tests."""
    out = np.zeros(len(rewards))
    acc = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        nxt_start = i + 1 >= len(rewards) or bool(starts[i + 1])
        acc = float(rewards[i]) + (0.0 if nxt_start else gamma * acc)
        out[i] = acc
    return out


@dataclass
class EpisodeRejection:
    rows: np.ndarray  # indices into the input rows
    reason: str
    detail: str
    episode_id: str


@dataclass
class Transitions:
    """Transitions of complete episodes, rows in episode then step order."""

    episode_id: pl.Series  # (N,) Utf8
    step: np.ndarray  # (N,) int32
    observation: np.ndarray  # (N, d) float32
    action: np.ndarray  # (N,) int64 or (N, a) float32
    reward: np.ndarray  # (N,) float32
    next_observation: np.ndarray  # (N, d) float32
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    return_to_go: np.ndarray  # (N,) float32
    # one row per episode
    ep_id: pl.Series  # (E,) Utf8
    ep_length: np.ndarray  # (E,) int64
    ep_return: np.ndarray  # (E,) float64
    ep_terminated: np.ndarray  # (E,) bool
    ep_truncated: np.ndarray  # (E,) bool
    ep_file: np.ndarray  # (E,) int64, file index of the first record
    ep_line: np.ndarray  # (E,) int64, its line
    rejected: list[EpisodeRejection] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.step)

    @property
    def n_episodes(self) -> int:
        return len(self.ep_length)


def _seg_reduce_any(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    if len(x) == 0:
        return np.zeros(0, dtype=bool)
    return np.logical_or.reduceat(x, first) if len(first) else np.zeros(0, dtype=bool)


def build_transitions(
    steps: ParsedSteps,
    file_idx: np.ndarray,
    *,
    sorted_by_line: bool,
    terminated_reasons: tuple[str, ...] = (),
    truncated_reasons: tuple[str, ...] = (),
    gamma: float = 0.99,
) -> Transitions:
    """Turn the steps of complete episodes into transitions.

    ``sorted_by_line``: episode_per_line input (each line one episode, rows in step order);
    otherwise step_per_line rows in any order, grouped by episode id and ordered by step.
    """
    n = len(steps)
    counts: Counter[str] = Counter()
    key = file_idx.astype(np.int64) * (1 << 40) + steps.line
    if sorted_by_line:
        order = np.arange(n)
        group = steps.line.astype(np.int64) + file_idx.astype(np.int64) * (1 << 40)
    else:
        # episodes in order of first appearance (file, line); steps in step order
        frame = pl.DataFrame({"ep": steps.episode_id, "t": steps.t, "k": key, "i": np.arange(n)})
        frame = frame.with_columns(pl.col("k").min().over("ep").alias("first"))
        order = frame.sort(["first", "t", "k"]).get_column("i").to_numpy()
        group = frame.get_column("first").to_numpy()
    ep_ids = steps.episode_id.gather(order) if n else steps.episode_id
    t = steps.t[order]
    if n:
        g = group[order]
        new = np.ones(n, dtype=bool)
        new[1:] = g[1:] != g[:-1]
    else:
        new = np.zeros(0, dtype=bool)
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, n - 1) if n else first
    length = last - first + 1
    e = len(first)
    seg = np.cumsum(new) - 1
    is_last = np.zeros(n, dtype=bool)
    is_last[last] = True

    # ---- episode-level checks
    reasons: dict[int, tuple[str, str]] = {}
    term = steps.term[order]
    trunc = steps.trunc[order]
    if not sorted_by_line and n:
        same = ~new
        dt = np.zeros(n, dtype=np.int64)
        dt[1:] = t[1:] - t[:-1]
        for i in np.flatnonzero(same & (dt == 0)):
            reasons.setdefault(int(seg[i]), (DUPLICATE_STEP, f"step {t[i]} appears more than once"))
        for i in np.flatnonzero(same & (dt != 0) & (dt != 1)):
            reasons.setdefault(
                int(seg[i]),
                (STEP_GAP, f"steps jump from {t[i - 1]} to {t[i]}: records are missing"),
            )
    early = (term | trunc) & ~is_last
    for i in np.flatnonzero(early):
        reasons.setdefault(
            int(seg[i]),
            (
                END_BEFORE_LAST_STEP,
                f"step {t[i]} is marked terminated/truncated but the episode goes on",
            ),
        )
    fobs_present = steps.fobs_present[order] if steps.fobs_present is not None else None
    end = steps.end[order] if steps.end is not None else None
    if not sorted_by_line:
        if fobs_present is not None:
            for i in np.flatnonzero(fobs_present & ~is_last):
                reasons.setdefault(
                    int(seg[i]),
                    (
                        END_BEFORE_LAST_STEP,
                        f"step {t[i]} has a final observation but the episode goes on",
                    ),
                )
        if end is not None:
            has_end = np.fromiter((x is not None for x in end), dtype=bool, count=n)
            for i in np.flatnonzero(has_end & ~is_last):
                reasons.setdefault(
                    int(seg[i]),
                    (
                        END_BEFORE_LAST_STEP,
                        f"step {t[i]} has an end reason but the episode goes on",
                    ),
                )

    # ---- how each episode ended
    if end is not None:
        last_end = end[last]
        ep_term = np.fromiter((x in terminated_reasons for x in last_end), dtype=bool, count=e)
        ep_trunc = np.fromiter((x in truncated_reasons for x in last_end), dtype=bool, count=e)
    else:
        ep_term = term[last].copy()
        ep_trunc = trunc[last].copy()
    both = ep_term & ep_trunc
    neither = ~ep_term & ~ep_trunc
    ep_trunc = (ep_trunc & ~ep_term) | neither
    has_final = fobs_present[last] if fobs_present is not None else np.zeros(e, dtype=bool)
    drop_last = ep_trunc & ~has_final
    for s in np.flatnonzero(drop_last & (length == 1)):
        reasons.setdefault(
            int(s),
            (
                UNBOOTSTRAPPABLE,
                "a one-step episode cut off with no final observation: no transition can be built",
            ),
        )

    ok_ep = np.ones(e, dtype=bool)
    rejected: list[EpisodeRejection] = []
    if reasons:
        ok_ep[list(reasons)] = False
        for si, (reason, detail) in sorted(reasons.items()):
            rows = order[first[si] : last[si] + 1]
            rejected.append(EpisodeRejection(rows, reason, detail, str(ep_ids[int(first[si])])))
    counts["episodes_both_flags_as_terminated"] += int((both & ok_ep).sum())
    counts["episodes_without_end_flag_as_truncated"] += int((neither & ok_ep).sum())
    counts["truncated_last_steps_dropped"] += int((drop_last & ok_ep).sum())
    counts["terminal_next_observation_repeated"] += int((ep_term & ~has_final & ok_ep).sum())

    # ---- rows to keep: good episodes, minus unbootstrappable last steps
    keep = ok_ep[seg] if n else np.zeros(0, dtype=bool)
    keep &= ~(is_last & drop_last[seg]) if n else keep
    # next_observation by index: the next row of the episode, the row itself at a
    # terminal without final observation, or the final observation (patched below)
    nxt_src = np.empty(n, dtype=np.int64)
    if n:
        nxt_src[:-1] = order[1:]
        nxt_src[last] = order[last]
    idx = order[keep]
    observation = steps.obs[idx]
    next_observation = steps.obs[nxt_src[keep]]
    if n and steps.fobs is not None and steps.fobs_present is not None and fobs_present is not None:
        frow = np.cumsum(steps.fobs_present) - 1  # input row -> its row in steps.fobs
        m = (is_last & fobs_present)[keep]
        next_observation[m] = steps.fobs[frow[idx[m]]]
    kseg = seg[keep]
    # new last rows of kept episodes
    klen = np.bincount(kseg, minlength=e) if n else np.zeros(e, dtype=np.int64)
    kept_eps = np.flatnonzero(ok_ep & (klen > 0))
    kfirst = np.zeros(e, dtype=np.int64)
    kfirst[1:] = np.cumsum(klen)[:-1]
    kn = int(keep.sum())
    step_out = (np.arange(kn) - kfirst[kseg]).astype(np.int32)
    klast = kfirst[kept_eps] + klen[kept_eps] - 1
    term_out = np.zeros(kn, dtype=bool)
    trunc_out = np.zeros(kn, dtype=bool)
    term_out[klast] = ep_term[kept_eps]
    trunc_out[klast] = ep_trunc[kept_eps]
    rew64 = steps.rew[idx]
    kstarts = np.zeros(kn, dtype=bool)
    kstarts[kfirst[kept_eps]] = True
    rtg = discounted_returns(rew64, kstarts, gamma)
    ep_return = np.add.reduceat(rew64, kfirst[kept_eps]) if kn else np.zeros(0)
    ep_key = np.minimum.reduceat(key[order], first) if n else np.zeros(0, dtype=np.int64)
    ep_key = ep_key[kept_eps]
    counts["transitions"] += kn
    return Transitions(
        episode_id=ep_ids.filter(pl.Series(keep)) if n else ep_ids,
        step=step_out,
        observation=observation,
        action=steps.act[idx],
        reward=rew64.astype(np.float32),
        next_observation=next_observation,
        terminated=term_out,
        truncated=trunc_out,
        return_to_go=rtg.astype(np.float32),
        ep_id=ep_ids.gather(first[kept_eps]) if n else ep_ids,
        ep_length=klen[kept_eps].astype(np.int64),
        ep_return=ep_return,
        ep_terminated=ep_term[kept_eps],
        ep_truncated=ep_trunc[kept_eps],
        ep_file=ep_key >> 40,
        ep_line=ep_key & ((1 << 40) - 1),
        rejected=rejected,
        counts=counts,
    )
