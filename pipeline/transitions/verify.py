"""Verify a transition store: recompute the content hash and check the invariants.

Exit 0 and one ``OK`` line when the store holds what its manifest says and every episode
semantic of the format holds; otherwise one line per problem on stderr and exit 1.

Beyond the checksums, the checks are those a builder could get wrong while staying
consistent with itself: unique episode ids; an episodes table that tiles the rows in
order of the episodes' first records and agrees with them; steps 0..length-1; flags only
on last rows; ``next_observation`` equal to the next row's ``observation`` inside an
episode; ``return_to_go`` and the episode ``return`` over every logged reward (a dropped
last step's too); named reward columns (``reward_NAME``) finite and as the spec declares
them; and the manifest's counts. Rows are read ``CHECK_ROWS`` at a time, so a
store larger than memory verifies in bounded memory. A parted store's parts are checked
each on its own (digest, rows, schema, one batch), then their rows as one table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from data_specs.schema import reward_column
from pipeline.arrowio import check_format_version, data_file_problems, file_digest, read_manifest
from pipeline.format import QUARANTINE, StoreError
from pipeline.transitions.layout import FORMAT_VERSION, PARTS_KEY, TRANSITION_PARTS, part_file
from pipeline.transitions.store import TransitionStore
from pipeline.transitions.writer import (
    COPY_ROWS,
    ColumnInfo,
    arrow_string_parts,
    column_hasher,
    combine_digests,
    episodes_digest,
    transition_schema,
)

CHECK_ROWS = 1 << 20  # rows per pass of the row checks


def _ranges(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(n, start + step)


# --------------------------------------------------------------------------- digests


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
        *(ColumnInfo(c, np.dtype(np.float32), 0) for c in store.reward_column_names.values()),
    ]


def column_digests(store: TransitionStore) -> dict[str, str]:
    """The per-column digests, recomputed from the store's data, as the builder takes them."""
    out: dict[str, str] = {}
    n = len(store)
    for c in _column_infos(store):
        h = column_hasher(c)
        for start, stop in _ranges(n, COPY_ROWS):
            if c.name == "episode_id":
                lengths, blob = arrow_string_parts(store.episode_id_slice(start, stop))
                h.update(lengths)
                h.update_bytes(blob)
            else:
                h.update(np.ascontiguousarray(store.column_slice(c.name, start, stop), c.dtype))
        out[c.name] = h.hexdigest()
    return out


# --------------------------------------------------------------------------- episodes table


@dataclass(frozen=True)
class _Episodes:
    """episodes.arrow as arrays (ids and file names stay Arrow strings)."""

    ids: pa.Array
    start: np.ndarray
    length: np.ndarray
    returns: np.ndarray
    dropped_reward: np.ndarray
    last_step_dropped: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    source_file: pa.Array
    source_line: np.ndarray
    dropped_named: dict[str, np.ndarray]  # {reward_NAME: (E,)} of a dropped last step

    def __len__(self) -> int:
        return len(self.start)

    def name(self, i: int) -> str:
        return f"episode {self.ids[int(i)].as_py()!r} (episodes.arrow row {int(i)})"

    @staticmethod
    def of(store: TransitionStore) -> _Episodes:
        t = store.episode_table()

        def num(name: str, dtype: type) -> np.ndarray:
            return np.asarray(t.column(name).to_numpy(), dtype=dtype)

        return _Episodes(
            ids=t.column("episode_id").combine_chunks(),
            start=num("start", np.int64),
            length=num("length", np.int64),
            returns=num("return", np.float64),
            dropped_reward=num("dropped_reward", np.float64),
            last_step_dropped=num("last_step_dropped", bool),
            terminated=num("terminated", bool),
            truncated=num("truncated", bool),
            source_file=t.column("source_file").combine_chunks(),
            source_line=num("source_line", np.int64),
            dropped_named={
                c: num(f"dropped_{c}", np.float64) for c in store.reward_column_names.values()
            },
        )


def _episode_table_problems(store: TransitionStore, e: _Episodes) -> list[str]:
    """The episodes table on its own: unique ids, tiling, order, dropped steps."""
    problems: list[str] = []
    dup = pl.Series("id", e.ids).is_duplicated().to_numpy()
    if dup.any():
        first = int(np.flatnonzero(dup)[0])
        problems.append(
            f"episodes: {int(dup.sum())} episodes share an id with another one, first "
            f"{e.name(first)}; episode ids must be unique"
        )
    if (e.length < 1).any():
        first = int(np.flatnonzero(e.length < 1)[0])
        problems.append(f"episodes: {e.name(first)} has length {e.length[first]} (< 1)")
    expect = np.cumsum(e.length) - e.length
    if not np.array_equal(e.start, expect) or int(e.length.sum()) != len(store):
        off = np.flatnonzero(e.start != expect)
        at = f": first at {e.name(off[0])}" if len(off) else ""
        problems.append(
            f"episodes: start/length do not tile the {len(store)} transitions in order{at}"
        )
    problems += _order_problems(store, e)
    odd = e.last_step_dropped & ~e.truncated
    if odd.any():
        problems.append(
            f"episodes: {e.name(np.flatnonzero(odd)[0])} dropped its last step but is not "
            "truncated (only a cut-off episode drops an unbootstrappable last step)"
        )
    dropped = {"dropped_reward": e.dropped_reward}
    dropped.update({f"dropped_{c}": a for c, a in e.dropped_named.items()})
    for name, arr in dropped.items():
        stray = (arr != 0) & ~e.last_step_dropped
        if stray.any():
            problems.append(
                f"episodes: {e.name(np.flatnonzero(stray)[0])} has a {name} but no "
                "dropped last step"
            )
    for name, arr in (("return", e.returns), *dropped.items()):
        if not np.isfinite(arr).all():
            problems.append(f"episodes: {name}: non-finite values")
    return problems


def _order_problems(store: TransitionStore, e: _Episodes) -> list[str]:
    """Episodes come in order of their first record (file in manifest order, line)."""
    names = pa.array([s["path"] for s in store.manifest["sources"]], pa.string())
    found = pc.index_in(e.source_file, value_set=names)
    unknown = found.is_null().to_numpy(zero_copy_only=False)
    file_idx = found.fill_null(-1).to_numpy(zero_copy_only=False)
    if unknown.any():
        return [
            f"episodes: {e.name(np.flatnonzero(unknown)[0])} names a source_file that is "
            "not among the manifest's sources"
        ]
    key = file_idx.astype(np.int64) * (1 << 40) + e.source_line
    # a log's lines count from 1; a Minari dataset's episodes are its ids, from 0
    first = 0 if store.manifest["spec"]["source"].get("format") == "minari" else 1
    if (e.source_line < first).any():
        bad = np.flatnonzero(e.source_line < first)[0]
        return [f"episodes: {e.name(bad)}: source_line < {first}"]
    back = np.flatnonzero(np.diff(key) <= 0)
    if len(back):
        return [
            f"episodes: {e.name(back[0] + 1)} comes after {e.name(back[0])} but its first "
            "record does not (episodes must be in order of their first record, file then line)"
        ]
    return []


# --------------------------------------------------------------------------- rows


ROW_RULES = {
    "step": "step: not 0..length-1 within the episode",
    "episode_id": "episode_id: the rows do not match the episodes table",
    "flag_inner": "terminated/truncated set on a row that is not the last of its episode",
    "flag_both": "a row is both terminated and truncated",
    "flag_none": "an episode's last row carries neither terminated nor truncated",
    "flag_table": "episodes table terminated/truncated disagree with the episode's last row",
    "next_observation": "next_observation differs from the next row's observation inside an episode",
    "return_to_go": "return_to_go: inconsistent with rewards (and a dropped last reward)",
    "observation_finite": "observation: non-finite values",
    "next_observation_finite": "next_observation: non-finite values",
    "reward_finite": "reward: non-finite values",
    "return_to_go_finite": "return_to_go: non-finite values",
    "reward_columns_finite": "a named reward column (reward_NAME): non-finite values",
    "action": "action: values outside the action space",
}


@dataclass
class _RowFindings:
    """Rows that break each rule: how many, and the first one."""

    count: Counter[str] = field(default_factory=Counter)
    first: dict[str, int] = field(default_factory=dict)

    def add(self, rule: str, bad: np.ndarray, row0: int) -> None:
        hits = np.flatnonzero(bad)
        if len(hits):
            self.count[rule] += len(hits)
            self.first.setdefault(rule, row0 + int(hits[0]))

    def messages(self, e: _Episodes) -> list[str]:
        out = []
        for rule, text in ROW_RULES.items():
            if self.count[rule]:
                row = self.first[rule]
                ep = int(np.searchsorted(e.start, row, side="right") - 1)
                out.append(f"{text}: {self.count[rule]} row(s), first row {row} in {e.name(ep)}")
        return out


def _row_problems(store: TransitionStore, e: _Episodes) -> tuple[list[str], np.ndarray]:
    """Every row against its episode, ``CHECK_ROWS`` rows at a time; also each episode's
    sum of rewards (float64) and of their magnitudes, for the return check."""
    n = len(store)
    found = _RowFindings()
    sums = np.zeros((2, len(e)))
    last = e.start + e.length - 1
    for a, b in _ranges(n, CHECK_ROWS):
        rows = np.arange(a, b)
        seg = np.searchsorted(e.start, rows, side="right") - 1
        is_last = rows == last[seg]
        _check_rows(store, e, found, a, b, seg, is_last)
        r = store.column_slice("reward", a, b).astype(np.float64)
        s0 = int(seg[0])
        sums[:, s0 : int(seg[-1]) + 1] += [
            np.bincount(seg - s0, weights=r),
            np.bincount(seg - s0, weights=np.abs(r)),
        ]
    return found.messages(e), sums


def _check_rows(
    store: TransitionStore,
    e: _Episodes,
    found: _RowFindings,
    a: int,
    b: int,
    seg: np.ndarray,
    is_last: np.ndarray,
) -> None:
    n = len(store)
    b1 = min(b + 1, n)  # one row more: the next row of the chunk's last one
    step = store.column_slice("step", a, b).astype(np.int64)
    found.add("step", step != np.arange(a, b) - e.start[seg], a)
    same = pc.equal(store.episode_id_slice(a, b), e.ids.take(pa.array(seg)))
    found.add("episode_id", ~same.fill_null(False).to_numpy(zero_copy_only=False), a)
    term = store.column_slice("terminated", a, b).astype(bool)
    trunc = store.column_slice("truncated", a, b).astype(bool)
    found.add("flag_inner", (term | trunc) & ~is_last, a)
    found.add("flag_both", term & trunc, a)
    found.add("flag_none", is_last & ~term & ~trunc, a)
    table = (term != e.terminated[seg]) | (trunc != e.truncated[seg])
    found.add("flag_table", is_last & table, a)
    obs, following = _with_next(store.column_slice("observation", a, b1), b - a)
    nxt = store.column_slice("next_observation", a, b)
    found.add("next_observation", ~is_last & (nxt != following).any(axis=1), a)
    r = store.column_slice("reward", a, b).astype(np.float64)
    rtg, rtg_next = _with_next(store.column_slice("return_to_go", a, b1).astype(np.float64), b - a)
    after = np.where(is_last, e.dropped_reward[seg], rtg_next)
    gamma = store.discount
    tol = 1e-5 * (np.abs(r) + gamma * np.abs(after) + np.abs(rtg)) + 1e-6
    found.add("return_to_go", ~(np.abs(rtg - (r + gamma * after)) <= tol), a)
    for name, arr in (
        ("observation_finite", obs),
        ("next_observation_finite", nxt),
        ("reward_finite", r),
        ("return_to_go_finite", rtg),
    ):
        finite = np.asarray(np.isfinite(arr).reshape(len(arr), -1).all(axis=1))
        found.add(name, ~finite, a)
    found.add("action", _actions_outside(store, store.column_slice("action", a, b)), a)
    for column in store.reward_column_names.values():
        found.add("reward_columns_finite", ~np.isfinite(store.column_slice(column, a, b)), a)


def _with_next(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows 0..k-1, rows 1..k) of ``values``, which holds k + 1 rows, or k at the store's
    end (its last row is the last of an episode: the row after it is never looked at)."""
    following = values[1:]
    if len(following) < k:
        following = np.concatenate([following, values[-1:]])
    return values[:k], following


def _actions_outside(store: TransitionStore, act: np.ndarray) -> np.ndarray:
    sp = store.action_space
    if sp.discrete:
        return np.asarray((act < 0) | (act >= (sp.n or 0)))
    if sp.low is None or sp.high is None:
        return np.zeros(len(act), dtype=bool)
    return np.asarray(~((act >= sp.low) & (act <= sp.high)).all(axis=1))


def _return_problems(e: _Episodes, sums: np.ndarray) -> list[str]:
    """The episode return is the sum of the rewards plus a dropped last step's reward."""
    total, magnitude = sums
    want = total + e.dropped_reward
    tol = 1e-5 * (magnitude + np.abs(e.dropped_reward)) + 1e-6
    bad = ~(np.abs(e.returns - want) <= tol)
    if not bad.any():
        return []
    i = int(np.flatnonzero(bad)[0])
    return [
        f"episodes: return differs from the sum of the episode's rewards plus its "
        f"dropped_reward in {int(bad.sum())} episode(s), first {e.name(i)}: "
        f"{e.returns[i]!r} != {want[i]!r}"
    ]


# --------------------------------------------------------------------------- counts


def _quarantine_counts(path: Path) -> tuple[Counter[str], Counter[str]]:
    """Records in quarantine.jsonl per source file and per reason."""
    if path.stat().st_size == 0:
        return Counter(), Counter()
    q = pl.read_ndjson(path, schema={"file": pl.Utf8, "reason": pl.Utf8})
    files = Counter(dict(q.get_column("file").value_counts().iter_rows()))
    reasons = Counter(dict(q.get_column("reason").value_counts().iter_rows()))
    return files, reasons


def _reward_column_problems(store: TransitionStore) -> list[str]:
    """The manifest's named reward columns are the spec's ``fields.rewards``, as columns."""
    m = store.manifest
    declared = m["spec"]["fields"].get("rewards", {})
    listed = m.get("reward_columns", {})
    want = {
        name: {"column": reward_column(name), "path": f["path"]} for name, f in declared.items()
    }
    if listed != want:
        return [
            f"manifest: reward_columns {listed} do not match the spec's fields.rewards "
            f"(expected {want})"
        ]
    return []


def _count_problems(store: TransitionStore, e: _Episodes) -> list[str]:
    """The manifest's counts against what the data hold."""
    m = store.manifest
    c = m["counts"]
    sources = m["sources"]
    dropped = int(e.last_step_dropped.sum())
    per_line = m["spec"]["source"]["layout"] == "episode_per_line"
    files, reasons = _quarantine_counts(store.path / QUARANTINE)
    held: dict[str, Any] = {
        "episodes": len(e),
        "transitions": len(store),
        "episodes_terminated": int(e.terminated.sum()),
        "episodes_truncated": int(e.truncated.sum()),
        "truncated_last_steps_dropped": dropped,
        # a kept record is a kept episode line, or a step that is a transition or dropped
        "records_kept": len(e) if per_line else len(store) + dropped,
        "records_quarantined": sum(reasons.values()),
        "records": c.get("records_kept", 0) + c.get("records_quarantined", 0),
    }
    problems = [
        f"manifest: counts.{key} = {c.get(key)} but the data hold {value}"
        for key, value in held.items()
        if c.get(key) != value
    ]
    for key in ("records", "records_kept", "records_quarantined"):
        total = sum(s.get(key, 0) for s in sources)
        if total != c.get(key):
            problems.append(f"manifest: sources add up to {total} {key}, counts say {c.get(key)}")
    for s in sources:
        if files.get(s["path"], 0) != s.get("records_quarantined"):
            problems.append(
                f"manifest: source {s['path']}: records_quarantined = "
                f"{s.get('records_quarantined')} but {QUARANTINE} holds {files.get(s['path'], 0)}"
            )
    if dict(reasons) != m.get("quarantine_reasons"):
        problems.append(
            f"manifest: quarantine_reasons {m.get('quarantine_reasons')} but {QUARANTINE} "
            f"holds {dict(sorted(reasons.items()))}"
        )
    return problems


# --------------------------------------------------------------------------- parts


def part_problems(store: Path, manifest: dict[str, Any]) -> list[str]:
    """A parted store's parts, each on its own (their bytes are checked as data files):
    listed in order with their digests, each of 1 to ``part_rows`` rows (the manifest's
    rows of each part, which add up to the store's, say where the parts cut; the local
    engine cuts every ``part_rows``, a Ray build where its tasks end), each ONE record
    batch of the rows and the schema the manifest says, and no other part file beside
    them. The rows across parts are then checked as one table, episodes that go on in
    the next part included."""
    entry = manifest[PARTS_KEY]
    part_rows = entry.get("part_rows") if isinstance(entry, dict) else None
    parts = entry.get("parts") if isinstance(entry, dict) else None
    if (
        not isinstance(part_rows, int)
        or part_rows < 1
        or not isinstance(parts, list)
        or not parts
        or not all(isinstance(part, dict) for part in parts)
    ):
        return [
            f"{store}: manifest: {PARTS_KEY} needs part_rows >= 1 and a list of parts "
            "({file, rows} each); rebuild with --force"
        ]
    problems: list[str] = []
    data_files = manifest.get("data_files", {})
    for k, part in enumerate(parts):
        name = part.get("file")
        if name != part_file(k):
            problems.append(f"{store}: manifest: part {k} is {name!r}, expected {part_file(k)!r}")
        elif name not in data_files:
            problems.append(f"{store / name}: not among the manifest's data_files (no digest)")
        rows = part.get("rows")
        if not isinstance(rows, int) or not 1 <= rows <= part_rows:
            problems.append(
                f"{store / str(name)}: manifest says {rows} rows; a part holds 1 to "
                f"part_rows ({part_rows}) rows"
            )
    total = sum(part["rows"] for part in parts if isinstance(part.get("rows"), int))
    if total != manifest["counts"]["transitions"]:
        problems.append(
            f"{store}: manifest: the parts add up to {total} rows, counts.transitions is "
            f"{manifest['counts']['transitions']}"
        )
    listed = {part.get("file") for part in parts}
    for extra in sorted((store / TRANSITION_PARTS).glob("*")):
        if f"{TRANSITION_PARTS}/{extra.name}" not in listed:
            problems.append(f"{extra}: a file among the parts that the manifest does not list")
    if problems:
        return problems
    return [msg for part in parts for msg in _one_part_problems(store, manifest, part)]


def _one_part_problems(store: Path, manifest: dict[str, Any], part: dict[str, Any]) -> list[str]:
    """One part file: one record batch, of the manifest's rows and schema."""
    path = store / part["file"]
    try:
        with pa.memory_map(str(path), "r") as source:
            reader = pa.ipc.open_stream(source)
            schema = reader.schema
            rows = [b.num_rows for b in reader]
    except (pa.ArrowInvalid, OSError) as e:
        return [f"{path}: unreadable Arrow IPC stream ({e})"]
    problems = []
    ids = schema.field("episode_id").type if "episode_id" in schema.names else None
    want = _schema_of(manifest, ids is not None and pa.types.is_large_string(ids))
    if not schema.equals(want):
        have = dict(zip(schema.names, schema.types))
        wrong = [
            f"{f.name}: {have[f.name]}, expected {f.type}" if f.name in have else f"no {f.name}"
            for f in want
            if have.get(f.name) != f.type
        ]
        if schema.names != want.names:
            wrong.append(f"columns {schema.names}, expected {want.names}")
        problems.append(f"{path}: schema is not the store's: {'; '.join(wrong)}")
    if len(rows) != 1:
        problems.append(f"{path}: {len(rows)} record batches; a part holds exactly one")
    if sum(rows) != part["rows"]:
        problems.append(f"{path}: {sum(rows)} rows, manifest says {part['rows']}")
    return problems


def _schema_of(manifest: dict[str, Any], large_ids: bool) -> pa.Schema:
    """The transitions schema the manifest's spaces and reward columns call for."""
    a = manifest["action_space"]
    return transition_schema(
        int(manifest["observation_space"]["dim"]),
        a["type"] == "discrete",
        int(a.get("dim") or 0),
        large_ids=large_ids,
        reward_names=tuple(manifest.get("reward_columns", {})),
    )


# --------------------------------------------------------------------------- verify


def check_invariants(store: TransitionStore) -> list[str]:
    """Every semantic rule of the format; returns one message per broken rule."""
    e = _Episodes.of(store)
    if len(store) == 0 or len(e) == 0:
        return ["the store holds no transitions"]
    problems = _episode_table_problems(store, e)
    tiled = np.array_equal(e.start, np.cumsum(e.length) - e.length)
    if tiled and int(e.length.sum()) == len(store) and (e.length >= 1).all():
        rows, sums = _row_problems(store, e)
        problems += rows + _return_problems(e, sums)
    return problems + _reward_column_problems(store) + _count_problems(store, e)


def verify(path: str | Path) -> list[str]:
    """Problems found in the store (empty: it verifies). Raises StoreError if unreadable,
    or written in another format version (with how to rebuild it)."""
    p = Path(path)
    manifest = read_manifest(p)
    check_format_version(p, manifest, FORMAT_VERSION)
    problems = data_file_problems(p, manifest)
    if not problems and PARTS_KEY in manifest:
        problems = part_problems(p, manifest)
    if problems:
        return problems
    store = TransitionStore(p)
    try:
        digests = column_digests(store)
        episodes = episodes_digest(store.episode_table())
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


def ok_line(path: str | Path, manifest: dict[str, Any]) -> str:
    """What ``python -m pipeline.verify`` prints for a transition store that verifies."""
    c = manifest["counts"]
    return (
        f"OK {path}: {c['transitions']} transitions, {c['episodes']} episodes, "
        f"content {manifest['content_hash'][:16]} (manifest.json verified)"
    )
