"""Verify a transition store: recompute the content hash and check the invariants.

Exit 0 and one ``OK`` line when the store holds what its manifest says and every episode
semantic of the format holds; otherwise one line per problem on stderr and exit 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.arrowio import data_file_problems, file_digest, read_manifest
from pipeline.format import QUARANTINE, StoreError
from pipeline.transitions.store import TransitionStore
from pipeline.transitions.writer import (
    COPY_ROWS,
    ColumnInfo,
    column_hasher,
    combine_digests,
    episodes_digest,
)


def _column_infos(store: TransitionStore) -> list[ColumnInfo]:
    d = store.obs_dim
    disc = store.action_space.discrete
    a = store.action_space.dim or 0
    return [
        ColumnInfo("episode_id", np.dtype(np.int32), -1),
        ColumnInfo("step", np.dtype(np.int32), 0),
        ColumnInfo("observation", np.dtype(np.float32), d),
        ColumnInfo(
            "action", np.dtype(np.int64) if disc else np.dtype(np.float32), 0 if disc else a
        ),
        ColumnInfo("reward", np.dtype(np.float32), 0),
        ColumnInfo("next_observation", np.dtype(np.float32), d),
        ColumnInfo("terminated", np.dtype(np.uint8), 0),
        ColumnInfo("truncated", np.dtype(np.uint8), 0),
        ColumnInfo("return_to_go", np.dtype(np.float32), 0),
    ]


def column_digests(store: TransitionStore) -> dict[str, str]:
    """The per-column digests, recomputed from the store's data, as the builder takes them."""
    out: dict[str, str] = {}
    n = len(store)
    for c in _column_infos(store):
        h = column_hasher(c)
        if c.name == "episode_id":
            ids = store.episode_id
            for start in range(0, n, COPY_ROWS):
                enc = [str(x).encode("utf-8") for x in ids[start : start + COPY_ROWS]]
                h.update(np.fromiter((len(b) for b in enc), dtype=np.int32, count=len(enc)))
                h.update_bytes(b"".join(enc))
        else:
            col = store.column(c.name)
            for start in range(0, n, COPY_ROWS):
                h.update(np.ascontiguousarray(col[start : start + COPY_ROWS], dtype=c.dtype))
        out[c.name] = h.hexdigest()
    return out


def _episodes_table(store: TransitionStore) -> pa.Table:
    e = store.episodes
    return pa.table(
        {
            "episode_id": pa.array(e.episode_id, pa.string()),
            "start": pa.array(e.start, pa.int64()),
            "length": pa.array(e.length, pa.int64()),
            "return": pa.array(e.returns, pa.float64()),
            "dropped_reward": pa.array(e.dropped_reward, pa.float64()),
            "last_step_dropped": pa.array(e.last_step_dropped, pa.bool_()),
            "terminated": pa.array(e.terminated, pa.bool_()),
            "truncated": pa.array(e.truncated, pa.bool_()),
            "source_file": pa.array(e.source_file, pa.string()),
            "source_line": pa.array(e.source_line, pa.int64()),
        }
    )


def check_invariants(store: TransitionStore) -> list[str]:
    """Every semantic rule of the format; returns one message per broken rule."""
    problems: list[str] = []
    m = store.manifest
    n = len(store)
    e = store.episodes
    if len(e) != m["counts"]["episodes"]:
        problems.append(f"episodes: {len(e)} rows, manifest says {m['counts']['episodes']}")
    if n == 0 or len(e) == 0:
        return problems + ["the store holds no transitions"]
    start, length = e.start, e.length
    if (length < 1).any():
        problems.append(f"episodes: {int((length < 1).sum())} episode(s) with no transition")
    expect = np.concatenate([[0], np.cumsum(length)[:-1]])
    if not np.array_equal(start, expect) or int(length.sum()) != n:
        problems.append("episodes: start/length do not tile the transitions in order")
        return problems
    seg = np.repeat(np.arange(len(e)), length)
    last = start + length - 1
    is_last = np.zeros(n, dtype=bool)
    is_last[last] = True
    steps = store.steps
    if not np.array_equal(steps, np.arange(n) - start[seg]):
        problems.append("step: not 0..L-1 within every episode")
    ids = store.episode_id
    if not all(ids[s] == eid and ids[t] == eid for s, t, eid in zip(start, last, e.episode_id)):
        problems.append("episode_id: rows do not match the episodes table")
    term, trunc = store.terminated, store.truncated
    if (term & ~is_last).any() or (trunc & ~is_last).any():
        problems.append("terminated/truncated set on a row that is not the last of its episode")
    if (term & trunc).any():
        problems.append("a row is both terminated and truncated")
    if not (term[last] ^ trunc[last]).all():
        problems.append("an episode's last row carries neither terminated nor truncated")
    if not np.array_equal(term[last], e.terminated) or not np.array_equal(trunc[last], e.truncated):
        problems.append("episodes table terminated/truncated disagree with the rows")
    obs, nxt = store.observations, store.next_observations
    inner = ~is_last[:-1]
    if not np.array_equal(nxt[:-1][inner], obs[1:][inner]):
        problems.append(
            "next_observation differs from the next row's observation inside an episode"
        )
    r = store.rewards.astype(np.float64)
    for name, arr in (
        ("observation", obs),
        ("next_observation", nxt),
        ("reward", r),
        ("return_to_go", store.return_to_go),
    ):
        if not np.isfinite(arr).all():
            problems.append(f"{name}: non-finite values")
    a = store.actions
    sp = store.action_space
    if sp.discrete:
        if (a < 0).any() or (a >= (sp.n or 0)).any():
            problems.append(f"action: values outside 0..{sp.n}-1")
    elif sp.low is not None and sp.high is not None and ((a < sp.low).any() or (a > sp.high).any()):
        problems.append("action: values outside the action bounds")
    rtg = store.return_to_go.astype(np.float64)
    gamma = store.discount
    nxt_rtg = np.where(is_last, 0.0, np.append(rtg[1:], 0.0))
    nxt_rtg[last] = e.dropped_reward
    scale = max(1.0, float(np.abs(rtg).max()))
    bad = np.abs(rtg - (r + gamma * nxt_rtg)) > 1e-4 * scale + 1e-5 * np.abs(rtg)
    if bad.any():
        problems.append(f"return_to_go: inconsistent with rewards at {int(bad.sum())} row(s)")
    sums = np.add.reduceat(r, start) + e.dropped_reward
    if not np.allclose(
        sums, e.returns, rtol=1e-5, atol=1e-4 * max(1.0, float(np.abs(e.returns).max()))
    ):
        problems.append("episodes: return differs from the sum of the episode's rewards")
    return problems


def verify(path: str | Path) -> list[str]:
    """Problems found in the store (empty: it verifies). Raises StoreError if unreadable."""
    p = Path(path)
    manifest = read_manifest(p)
    problems = data_file_problems(p, manifest)
    if problems:
        return problems
    store = TransitionStore(p)
    try:
        digests = column_digests(store)
        episodes = episodes_digest(_episodes_table(store))
    except Exception as e:  # noqa: BLE001 - a corrupt chunk surfaces as many error types
        raise StoreError(f"{p}: cannot read the data back ({type(e).__name__}: {e})") from None
    for name, d in digests.items():
        if manifest.get("column_digests", {}).get(name) != d:
            problems.append(f"{p}: column {name}: content differs from the manifest's digest")
    content = combine_digests(digests, episodes, file_digest(p / QUARANTINE))
    if content != manifest["content_hash"]:
        problems.append(
            f"{p}: content hash {content[:12]} != manifest {manifest['content_hash'][:12]}"
        )
    problems += [f"{p}: {msg}" for msg in check_invariants(store)]
    return problems


def ok_line(path: str | Path, manifest: dict) -> str:
    """What ``python -m pipeline.verify`` prints for a transition store that verifies."""
    c = manifest["counts"]
    return (
        f"OK {path}: {c['transitions']} transitions, {c['episodes']} episodes, "
        f"content {manifest['content_hash'][:16]} (manifest.json verified)"
    )
