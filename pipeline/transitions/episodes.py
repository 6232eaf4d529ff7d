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
    AMBIGUOUS_EPISODE_ID,
    DUPLICATE_STEP,
    END_BEFORE_LAST_STEP,
    STEP_GAP,
    UNBOOTSTRAPPABLE,
    ParsedSteps,
)
from pipeline.transitions.stats import ChunkStats, chunk_stats

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
    return_to_go: np.ndarray  # (N,) float32, includes a dropped last step's reward
    # one row per episode
    ep_id: pl.Series  # (E,) Utf8
    ep_length: np.ndarray  # (E,) int64
    ep_return: np.ndarray  # (E,) float64, every logged reward (a dropped last one too)
    ep_dropped_reward: np.ndarray  # (E,) float64, reward of the dropped last step, else 0
    ep_last_step_dropped: np.ndarray  # (E,) bool
    ep_terminated: np.ndarray  # (E,) bool
    ep_truncated: np.ndarray  # (E,) bool
    ep_file: np.ndarray  # (E,) int64, file index of the first record
    ep_line: np.ndarray  # (E,) int64, its line
    rejected: list[EpisodeRejection] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    # the spec's named rewards (fields.rewards), in its order; None when it has none
    named_reward: np.ndarray | None = None  # (N, K) float32
    ep_dropped_named: np.ndarray | None = None  # (E, K) float64, as ep_dropped_reward
    stats: ChunkStats | None = None  # the rows' statistics (None: the sink works them out)

    def __len__(self) -> int:
        return len(self.step)

    @property
    def n_episodes(self) -> int:
        return len(self.ep_length)


@dataclass(frozen=True)
class _Episodes:
    """Input rows grouped into episodes: row ``i`` of the grouped order is input row
    ``order[i]``; episode ``s`` holds grouped rows ``first[s]..last[s]``."""

    order: np.ndarray  # (n,) int64
    seg: np.ndarray  # (n,) episode of each grouped row
    first: np.ndarray  # (e,) its first grouped row
    last: np.ndarray  # (e,) its last grouped row
    is_last: np.ndarray  # (n,) bool
    key: np.ndarray  # (e,) (file << 40) + line of the episode's first record

    @property
    def n_episodes(self) -> int:
        return len(self.first)


@dataclass(frozen=True)
class _Ends:
    """How each episode ends (one value per episode)."""

    terminated: np.ndarray  # after the rules: both flags -> terminated
    truncated: np.ndarray  # ... no flag -> truncated
    both: np.ndarray  # the log set both flags
    neither: np.ndarray  # the log set no flag
    has_final: np.ndarray  # the log has a final observation
    drop_last: np.ndarray  # truncated without a final observation: last step dropped


def _group(steps: ParsedSteps, file_idx: np.ndarray, sorted_by_line: bool) -> _Episodes:
    n = len(steps)
    key = file_idx.astype(np.int64) * (1 << 40) + steps.line
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _Episodes(empty, empty, empty, empty, np.zeros(0, dtype=bool), empty)
    if sorted_by_line:  # episode_per_line: one line is one episode, rows in step order
        order = np.arange(n)
        group = key
    else:  # episodes in order of first appearance (file, line); steps in step order
        frame = pl.DataFrame({"ep": steps.episode_id, "t": steps.t, "k": key, "i": np.arange(n)})
        frame = frame.with_columns(pl.col("k").min().over("ep").alias("first"))
        order = frame.sort(["first", "t", "k"]).get_column("i").to_numpy()
        group = frame.get_column("first").to_numpy()
    g = group[order]
    new = np.ones(n, dtype=bool)
    new[1:] = g[1:] != g[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, n - 1)
    is_last = np.zeros(n, dtype=bool)
    is_last[last] = True
    ep_key = np.minimum.reduceat(key[order], first)
    return _Episodes(order, np.cumsum(new) - 1, first, last, is_last, ep_key)


def _step_problems(steps: ParsedSteps, ep: _Episodes) -> dict[int, tuple[str, str]]:
    """step_per_line: what makes an episode's records not one episode (first one wins)."""
    reasons: dict[int, tuple[str, str]] = {}
    if len(steps) == 0:
        return reasons
    id_int = steps.id_int[ep.order]
    mixed = np.logical_or.reduceat(id_int, ep.first) & ~np.logical_and.reduceat(id_int, ep.first)
    for s in np.flatnonzero(mixed):
        text = steps.episode_id[int(ep.order[ep.first[s]])]
        reasons[int(s)] = (
            AMBIGUOUS_EPISODE_ID,
            f"the id {text!r} is written both as a string and as an integer: "
            "their records cannot be told apart (write every id one way)",
        )
    t = steps.t[ep.order]
    same = np.zeros(len(t), dtype=bool)
    same[1:] = ep.seg[1:] == ep.seg[:-1]
    dt = np.zeros(len(t), dtype=np.int64)
    dt[1:] = t[1:] - t[:-1]
    for i in np.flatnonzero(same & (dt == 0)):
        reasons.setdefault(int(ep.seg[i]), (DUPLICATE_STEP, f"step {t[i]} appears more than once"))
    for i in np.flatnonzero(same & (dt != 0) & (dt != 1)):
        reasons.setdefault(
            int(ep.seg[i]), (STEP_GAP, f"steps jump from {t[i - 1]} to {t[i]}: records are missing")
        )
    return reasons


def _early_end_problems(
    steps: ParsedSteps, ep: _Episodes, sorted_by_line: bool, reasons: dict[int, tuple[str, str]]
) -> None:
    """An end flag, end reason or final observation on a step that is not the last."""
    t = steps.t[ep.order]
    marks = [((steps.term | steps.trunc)[ep.order], "is marked terminated/truncated")]
    if not sorted_by_line:  # episode_per_line holds these once per episode, not per step
        if steps.fobs_present is not None:
            marks.append((steps.fobs_present[ep.order], "has a final observation"))
        if steps.end is not None:
            has_end = np.fromiter((x is not None for x in steps.end), dtype=bool, count=len(steps))
            marks.append((has_end[ep.order], "has an end reason"))
    for mark, what in marks:
        for i in np.flatnonzero(mark & ~ep.is_last):
            reasons.setdefault(
                int(ep.seg[i]),
                (END_BEFORE_LAST_STEP, f"step {t[i]} {what} but the episode goes on"),
            )


def _ends(
    steps: ParsedSteps,
    ep: _Episodes,
    terminated_reasons: tuple[str, ...],
    truncated_reasons: tuple[str, ...],
) -> _Ends:
    last_rows = ep.order[ep.last]
    e = ep.n_episodes
    if steps.end is not None:
        last_end = steps.end[last_rows]
        term = np.fromiter((x in terminated_reasons for x in last_end), dtype=bool, count=e)
        trunc = np.fromiter((x in truncated_reasons for x in last_end), dtype=bool, count=e)
    else:
        term = steps.term[last_rows].copy()
        trunc = steps.trunc[last_rows].copy()
    both = term & trunc
    neither = ~term & ~trunc
    trunc = (trunc & ~term) | neither
    fp = steps.fobs_present
    has_final = fp[last_rows] if fp is not None else np.zeros(e, dtype=bool)
    return _Ends(term, trunc, both, neither, has_final, trunc & ~has_final)


def _next_observations(steps: ParsedSteps, ep: _Episodes, keep: np.ndarray) -> np.ndarray:
    """s_{t+1} of each kept grouped row: the next row of its episode, the final observation
    on a last row that has one, or the row's own observation (a terminal without one)."""
    nxt_src = np.empty(len(steps), dtype=np.int64)
    nxt_src[:-1] = ep.order[1:]
    nxt_src[ep.last] = ep.order[ep.last]
    out = steps.obs[nxt_src[keep]]
    if steps.fobs is not None and steps.fobs_present is not None:
        frow = np.cumsum(steps.fobs_present) - 1  # input row -> its row in steps.fobs
        idx = ep.order[keep]
        m = (ep.is_last & steps.fobs_present[ep.order])[keep]
        out[m] = steps.fobs[frow[idx[m]]]
    return out


def _assemble(
    steps: ParsedSteps, ep: _Episodes, ends: _Ends, ok_ep: np.ndarray, gamma: float
) -> Transitions:
    """The kept episodes' rows (less dropped last steps) and their episode table."""
    n = len(steps)
    kept_eps = np.flatnonzero(ok_ep)
    in_kept = ok_ep[ep.seg] if n else np.zeros(0, dtype=bool)  # grouped rows of kept episodes
    dropped = ep.is_last & ends.drop_last[ep.seg] if n else in_kept
    keep = in_kept & ~dropped
    idx = ep.order[keep]
    # The rewards as the store holds them (float32): returns, returns-to-go and a dropped
    # step's reward are sums of exactly these, so the store's rows reproduce them (an export
    # and its re-import give the same store).
    rew = steps.rew.astype(np.float32).astype(np.float64)
    # every logged reward counts: returns run over the dropped last steps too
    rew_all = rew[ep.order[in_kept]]
    starts_all = np.zeros(n, dtype=bool)
    starts_all[ep.first] = True
    rtg_all = discounted_returns(rew_all, starts_all[in_kept], gamma)
    row_kept = keep[in_kept]
    length = np.bincount(ep.seg[keep], minlength=ep.n_episodes)[kept_eps].astype(np.int64)
    first_all = np.flatnonzero(starts_all[in_kept])
    ep_return = np.add.reduceat(rew_all, first_all) if len(rew_all) else np.zeros(0)
    drop = ends.drop_last[kept_eps]
    dropped_reward = np.where(drop, rew[ep.order[ep.last[kept_eps]]], 0.0)
    kn = int(keep.sum())
    kfirst = np.cumsum(length) - length
    klast = kfirst + length - 1
    term_out = np.zeros(kn, dtype=bool)
    trunc_out = np.zeros(kn, dtype=bool)
    term_out[klast] = ends.terminated[kept_eps]
    trunc_out[klast] = ends.truncated[kept_eps]
    ep_ids = steps.episode_id.gather(ep.order) if n else steps.episode_id
    ep_key = ep.key[kept_eps]
    named = steps.named_rew
    named_dropped = None
    if named is not None:
        last_named = named[ep.order[ep.last[kept_eps]]]
        named_dropped = np.where(drop[:, None], last_named, 0.0).astype(np.float64)
    return Transitions(
        episode_id=ep_ids.filter(pl.Series(keep)) if n else ep_ids,
        step=(np.arange(kn) - np.repeat(kfirst, length)).astype(np.int32),
        observation=steps.obs[idx],
        action=steps.act[idx],
        reward=rew[idx].astype(np.float32),
        next_observation=_next_observations(steps, ep, keep) if n else steps.obs[idx],
        terminated=term_out,
        truncated=trunc_out,
        return_to_go=rtg_all[row_kept].astype(np.float32),
        ep_id=ep_ids.gather(ep.first[kept_eps]) if n else ep_ids,
        ep_length=length,
        ep_return=ep_return,
        ep_dropped_reward=dropped_reward.astype(np.float64),
        ep_last_step_dropped=drop,
        ep_terminated=ends.terminated[kept_eps],
        ep_truncated=ends.truncated[kept_eps],
        ep_file=ep_key >> 40,
        ep_line=ep_key & ((1 << 40) - 1),
        named_reward=None if named is None else named[idx].astype(np.float32),
        ep_dropped_named=named_dropped,
    )


def build_transitions(
    steps: ParsedSteps,
    file_idx: np.ndarray,
    *,
    sorted_by_line: bool,
    terminated_reasons: tuple[str, ...] = (),
    truncated_reasons: tuple[str, ...] = (),
    gamma: float = 0.99,
    summarise: bool = True,
) -> Transitions:
    """Turn the steps of complete episodes into transitions.

    ``sorted_by_line``: episode_per_line input (each line one episode, rows in step order);
    otherwise step_per_line rows in any order, grouped by episode id and ordered by step.
    """
    ep = _group(steps, file_idx, sorted_by_line)
    reasons = {} if sorted_by_line else _step_problems(steps, ep)
    _early_end_problems(steps, ep, sorted_by_line, reasons)
    ends = _ends(steps, ep, terminated_reasons, truncated_reasons)
    length = ep.last - ep.first + 1
    for one_step in np.flatnonzero(ends.drop_last & (length == 1)):
        reasons.setdefault(
            int(one_step),
            (
                UNBOOTSTRAPPABLE,
                "a one-step episode cut off with no final observation: no transition can be built",
            ),
        )
    ok_ep = np.ones(ep.n_episodes, dtype=bool)
    ok_ep[list(reasons)] = False
    tr = _assemble(steps, ep, ends, ok_ep, gamma)
    for e, (reason, detail) in sorted(reasons.items()):
        rows = ep.order[ep.first[e] : ep.last[e] + 1]
        tr.rejected.append(
            EpisodeRejection(rows, reason, detail, str(steps.episode_id[int(rows[0])]))
        )
    c = tr.counts
    c["episodes_both_flags_as_terminated"] += int((ends.both & ok_ep).sum())
    c["episodes_without_end_flag_as_truncated"] += int((ends.neither & ok_ep).sum())
    c["truncated_last_steps_dropped"] += int((ends.drop_last & ok_ep).sum())
    c["terminal_next_observation_repeated"] += int(
        (ends.terminated & ~ends.has_final & ok_ep).sum()
    )
    c["transitions"] += len(tr)
    if summarise:  # here, where the chunk was built: the building process only merges them
        tr.stats = chunk_stats(
            tr.observation, tr.action, tr.reward, tr.return_to_go, tr.named_reward
        )
    return tr
