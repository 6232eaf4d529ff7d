"""The per-chunk work of a transition build, as pure functions of ``(context, task)``.

These functions are the same whether :class:`pipeline.engine.LocalEngine` runs them in
the building process or in a worker process (and the same a distributed engine would
run): each reads only its arguments and the files they name, returns compact NumPy /
Arrow results, and writes only the files its task names, whole or not at all, so that a
task run twice writes the same bytes.

* :func:`episode_chunk` (episode_per_line): parse and check a chunk of lines and build
  the transitions of its episodes;
* :func:`step_chunk` (step_per_line): parse and check a chunk; its steps are returned, or
  spilled to one Arrow file per chunk holding one record batch per hash bucket of
  episode ids, so that a bucket holds whole episodes;
* :func:`bucket_transitions` and :func:`bucket_run` (step_per_line): the transitions of
  the episodes of one bucket, once every chunk has been read;
* :func:`step_rows` and :func:`group_transitions` (step_per_line, for an engine that
  groups rows by key itself, Ray Data's groupby): a chunk's checked steps as Arrow rows
  with their bucket, and the transitions of one bucket's rows (:func:`bucket_transitions`);
* :func:`merge_windows`, :func:`window_transitions` and :func:`merge_parts`
  (step_per_line, several buckets): the buckets' runs merged in first-appearance order,
  a window of episodes at a time.

With ``BuildContext.parts_dir`` set (Ray, ``store.part_rows: N``), the functions that
build transitions write them as the store's parts themselves
(:meth:`BuildContext.write_parts`) and return them less their rows.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from data_specs.schema import TransitionSpec, reward_column
from pipeline.sources import Chunk, FileRange, as_chunk
from pipeline.transitions.episodes import Transitions, build_transitions
from pipeline.transitions.parse import (
    EPISODE_REJECTED,
    ChunkParser,
    ParsedSteps,
    Rejected,
    get_path,
    is_episode_id,
    parse_line,
)
from pipeline.transitions.stats import chunk_stats
from pipeline.transitions.writer import ColumnFiles, ColumnSink, WrittenParts, write_parts

# A record quarantined once its episode is known: (file index, line, reason, detail, id).
Deferred = tuple[int, int, str, str, str | None]


@dataclass
class BuildContext:
    """What every task of one build shares; sent once to each worker process."""

    spec: TransitionSpec  # observation shape resolved (parse.infer_shapes)
    source_names: list[str]  # display name of each input file, by file index
    n_buckets: int = 1  # step_per_line: hash buckets of episode ids
    spill_dir: Path | None = None  # step_per_line: where step_chunk spills (None: in memory)
    # tasks that write their transitions as parts themselves (Ray, store.part_rows N):
    # where they write them (None: the transitions are returned), at most part_rows each
    parts_dir: Path | None = None
    part_rows: int = 0
    # tasks summarise their transitions' statistics (Transitions.stats) where they run: on
    # worker processes and Ray workers; in a build of one process the building thread does
    # it while it waits for the next chunk (the same numbers either way)
    summarise: bool = True
    _parser: ChunkParser | None = field(default=None, repr=False, compare=False)

    @property
    def parser(self) -> ChunkParser:
        if self._parser is None:  # built once per process
            self._parser = ChunkParser(self.spec)
        return self._parser

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_parser": None}

    def write_parts(self, tr: Transitions, stem: str) -> tuple[Transitions, WrittenParts]:
        """``tr``'s rows written as parts ``parts_dir/STEM-K.arrow`` (:func:`write_parts`),
        and ``tr`` less its rows (its episodes, statistics, counts: what the build takes)."""
        assert self.parts_dir is not None
        lay = self.parser.layout
        parts = write_parts(
            tr,
            lay.obs_dim,
            self.spec.fields.action.type == "discrete",
            lay.act_dim or 0,
            tuple(name for name, _ in self.spec.fields.rewards),
            self.parts_dir,
            stem,
            self.part_rows,
        )
        return without_rows(tr), parts

    def build(self, steps: ParsedSteps, file_idx: np.ndarray, sorted_by_line: bool) -> Transitions:
        """:func:`build_transitions` with the spec's end reasons and discount."""
        end = self.spec.fields.end
        return build_transitions(
            steps,
            file_idx,
            sorted_by_line=sorted_by_line,
            terminated_reasons=end.terminated if end else (),
            truncated_reasons=end.truncated if end else (),
            gamma=self.spec.store.discount,
            summarise=self.summarise,
        )


@dataclass(frozen=True)
class ChunkTask:
    index: int  # position of the chunk in the build (names its spill file)
    file_index: int
    chunk: Chunk | FileRange  # the lines, or (Ray engine) where to read them
    exclude: tuple[int, ...] = ()  # episode_per_line: lines left out (duplicate ids)


@dataclass
class ChunkInfo:
    """What a chunk tells the build besides its steps."""

    records: int  # non-blank lines
    blank_lines: int
    steps_read: int  # step rows that passed the checks
    rejected: list[Rejected]  # in line order, each with its episode id where it has one


def parse_chunk(ctx: BuildContext, chunk: Chunk) -> tuple[ParsedSteps, ChunkInfo]:
    """The checked step rows of a chunk, and its rejected lines."""
    nb = chunk.nonblank()
    steps, rejected = ctx.parser.parse(
        chunk.data, chunk.first_line + nb, lambda i: chunk.line(int(nb[i])), chunk.first_line
    )
    key = ctx.spec.source.episode_key
    for r in rejected:
        r.episode_id = episode_id_of(r.raw, key)
    return steps, ChunkInfo(len(nb), chunk.n_lines - len(nb), len(steps), rejected)


def episode_id_of(raw: bytes, key: str) -> str | None:
    """The episode id of a raw record, if it can be read and is a string or an integer."""
    try:
        obj = parse_line(raw)
    except Exception:  # noqa: BLE001 - unreadable: no episode to name
        return None
    v = get_path(obj, key)
    return str(v) if is_episode_id(v) else None


# --------------------------------------------------------------------------- episode_per_line


@dataclass
class EpisodeChunk(ChunkInfo):
    transitions: Transitions | None = None  # None: no line of the chunk had a valid step
    parts: WrittenParts | None = None  # the rows, written as parts (ctx.parts_dir)


def episode_chunk(ctx: BuildContext, task: ChunkTask) -> EpisodeChunk:
    """episode_per_line: the chunk's lines are whole episodes; build them (except the lines
    in ``task.exclude``). Episodes rejected by the build join ``rejected``, in line order."""
    chunk = as_chunk(task.chunk)
    steps, info = parse_chunk(ctx, chunk)
    if task.exclude:
        steps = steps.subset(~np.isin(steps.line, np.asarray(task.exclude, dtype=np.int64)))
    out = EpisodeChunk(**info.__dict__)
    if len(steps) == 0:
        return out
    tr = ctx.build(steps, np.full(len(steps), task.file_index, dtype=np.int64), True)
    for rej in tr.rejected:
        ln = int(steps.line[rej.rows[0]])
        raw = chunk.line(ln - chunk.first_line)
        out.rejected.append(Rejected(ln, rej.reason, rej.detail, raw, rej.episode_id))
    out.rejected.sort(key=lambda r: r.line)
    out.transitions = tr
    if ctx.parts_dir is not None:  # a task run again (a retry, or less duplicates) rewrites them
        out.transitions, out.parts = ctx.write_parts(tr, f"c{task.index:06d}")
    return out


# --------------------------------------------------------------------------- step_per_line


@dataclass
class StepChunk(ChunkInfo):
    steps: ParsedSteps | None = None  # not spilled: the chunk's steps
    spill: Path | None = None  # spilled: the chunk's file, one record batch per bucket
    buckets: list[int] = field(default_factory=list)  # the bucket of each batch, in order


def bucket_of(ids: pl.Series, n: int) -> np.ndarray:
    """The spill bucket of each episode id (the same in every process)."""
    if n == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return (ids.hash(seed=0) % n).to_numpy().astype(np.int64)


def step_chunk(ctx: BuildContext, task: ChunkTask) -> StepChunk:
    """step_per_line: the chunk's checked steps, returned or spilled by bucket."""
    steps, info = parse_chunk(ctx, as_chunk(task.chunk))
    out = StepChunk(**info.__dict__)
    if ctx.spill_dir is None:
        out.steps = steps
        return out
    if len(steps) == 0:
        return out
    bucket = bucket_of(steps.episode_id, ctx.n_buckets)
    order = np.argsort(bucket, kind="stable")  # by bucket, then line
    bucket = bucket[order]
    cuts = np.flatnonzero(np.diff(bucket)) + 1
    batch = _steps_to_batch(steps, task.file_index).take(pa.array(order))
    path = ctx.spill_dir / f"chunk-{task.index:06d}.arrow"
    partial = path.with_suffix(".partial")
    with pa.OSFile(str(partial), "wb") as f, pa.ipc.new_file(f, batch.schema) as w:
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(bucket)]):
            w.write_batch(batch.slice(int(start), int(stop - start)))
    os.replace(partial, path)
    out.spill, out.buckets = path, bucket[np.r_[0, cuts]].tolist()
    return out


@dataclass(frozen=True)
class BucketTask:
    bucket: int
    parts: list[tuple[Path, int]]  # (spill file, batch index) of its steps, in chunk order
    rejected: dict[str, str]  # ids of this bucket that a record got rejected -> why
    run_dir: Path | None = None  # bucket_run: where the run's column files go


@dataclass
class BucketResult:
    deferred: list[Deferred]  # records quarantined now that their episodes are known
    counts: Counter[str]
    transitions: Transitions | None = None  # bucket_transitions
    run: ColumnFiles | None = None  # bucket_run: the transitions, as column files
    parts: WrittenParts | None = None  # the transitions, written as parts (ctx.parts_dir)


def load_bucket(parts: list[tuple[Path, int]]) -> tuple[ParsedSteps, np.ndarray]:
    """The spilled steps of one bucket (and the file index of each), in chunk order."""
    batches = []
    for path, i in parts:
        with pa.memory_map(str(path)) as source:
            batches.append(pa.ipc.open_file(source).get_batch(i))
    return _batch_to_steps(pa.Table.from_batches(batches))


def bucket_transitions(
    ctx: BuildContext, steps: ParsedSteps, file_idx: np.ndarray, rejected: dict[str, str]
) -> BucketResult:
    """The transitions of whole episodes (step_per_line, any row order). Records of an
    episode that a record was rejected from go too (``rejected``: id -> why)."""
    deferred: list[Deferred] = []
    if rejected and len(steps):
        bad = steps.episode_id.is_in(list(rejected)).to_numpy()
        ids = steps.episode_id.to_list()
        for i in np.flatnonzero(bad):
            ep = ids[i]
            detail = f"episode {ep} was rejected by another record ({rejected[ep]})"
            deferred.append((int(file_idx[i]), int(steps.line[i]), EPISODE_REJECTED, detail, ep))
        if bad.any():
            steps, file_idx = steps.subset(~bad), file_idx[~bad]
    tr = ctx.build(steps, file_idx, False)
    for rej in tr.rejected:
        detail = f"episode {rej.episode_id}: {rej.detail}"
        for row in rej.rows:
            line = int(steps.line[row])
            deferred.append((int(file_idx[row]), line, rej.reason, detail, rej.episode_id))
    return BucketResult(deferred, tr.counts, transitions=tr)


def bucket_run(ctx: BuildContext, task: BucketTask) -> BucketResult:
    """One spilled bucket: its transitions written as a run of column files to
    ``task.run_dir`` (merged with the other runs in first-appearance order afterwards)."""
    assert task.run_dir is not None
    steps, file_idx = load_bucket(task.parts)
    result = bucket_transitions(ctx, steps, file_idx, task.rejected)
    assert result.transitions is not None
    result.run = write_run(ctx, result.transitions, task.run_dir)
    result.transitions = None
    return result


def write_run(ctx: BuildContext, tr: Transitions, run_dir: Path) -> ColumnFiles:
    """A bucket's transitions as a run of column files in ``run_dir`` (no statistics or
    digests: those are taken when the runs are merged into the store)."""
    lay = ctx.parser.layout
    discrete = ctx.spec.fields.action.type == "discrete"
    sink = ColumnSink(
        run_dir,
        lay.obs_dim,
        discrete,
        lay.act_dim or 0,
        track=False,
        reward_names=tuple(name for name, _ in ctx.spec.fields.rewards),
    )
    try:
        sink.append(tr, ctx.source_names)
    finally:
        sink.close()
    return sink.files()


# --------------------------------------------------------------------------- grouped by the engine

BUCKET = "bucket"  # step_rows: the column of each step's bucket (bucket_of its episode id)


def step_rows(ctx: BuildContext, task: ChunkTask) -> tuple[pa.Table, ChunkInfo]:
    """step_per_line, for an engine that groups rows by key itself: the chunk's checked
    steps as Arrow rows (:func:`_steps_to_batch`, in line order) with their ``bucket``
    column, and what else the chunk tells the build (its rejected lines, its counts)."""
    steps, info = parse_chunk(ctx, as_chunk(task.chunk))
    rows = pa.Table.from_batches([_steps_to_batch(steps, task.file_index)])
    bucket = bucket_of(steps.episode_id, ctx.n_buckets)
    return rows.append_column(BUCKET, pa.array(bucket, pa.int64())), info


@dataclass(frozen=True)
class GroupTask:
    """What :func:`group_transitions` is told about a bucket besides its rows."""

    bucket: int
    rejected: dict[str, str]  # ids of this bucket that a record got rejected -> why


def group_transitions(ctx: BuildContext, rows: pa.Table, task: GroupTask) -> BucketResult:
    """step_per_line: the transitions of the episodes whose steps are ``rows``: every
    row of one bucket, from every chunk, in any order (:func:`bucket_transitions` orders
    them by first appearance, then step). ``task.rejected``: as for :func:`bucket_transitions`.

    With ``ctx.parts_dir``, the transitions are written where the build finds them: as the
    store's parts when there is one bucket (its rows are the store's, in order), else as a
    run of column files ``run-B`` beside the parts, merged by :func:`merge_parts`."""
    steps, file_idx = _batch_to_steps(rows)
    res = bucket_transitions(ctx, steps, file_idx, task.rejected)
    if ctx.parts_dir is not None and res.transitions is not None:
        if ctx.n_buckets == 1:
            res.transitions, res.parts = ctx.write_parts(res.transitions, f"g{task.bucket:05d}")
        else:
            run_dir = ctx.parts_dir.parent / f"run-{task.bucket}"
            res.run = write_run(ctx, res.transitions, run_dir)
            res.transitions = None
    return res


# --------------------------------------------------------------------------- merge

# An episode of a run: (first-appearance key, run, first row in the run, rows)
RunEpisode = tuple[int, int, int, int]


@dataclass(frozen=True)
class MergeWindow:
    """Some episodes of several runs, in global first-appearance order (a window of
    :func:`merge_windows`): each with its row in the runs' episode tables."""

    index: int  # the window's place in the merge
    episodes: list[RunEpisode]
    rows: list[dict[str, Any]]


def merge_windows(runs: list[ColumnFiles], window_rows: int) -> list[MergeWindow]:
    """The episodes of per-bucket runs (each in first-appearance order) in global
    first-appearance order, cut in windows of about ``window_rows`` rows (whole episodes:
    a window ends once it holds ``window_rows`` or more)."""
    eps: list[RunEpisode] = []
    ep_rows: list[dict[str, Any]] = []
    for r, run in enumerate(runs):
        for e in run.episodes:
            eps.append((e["_key"], r, e["start"], e["length"]))
            ep_rows.append(e)
    order = sorted(range(len(eps)), key=lambda i: eps[i][0])
    windows: list[MergeWindow] = []
    window: list[int] = []
    rows = 0
    for i in order:
        window.append(i)
        rows += eps[i][3]
        if rows >= window_rows:
            windows.append(MergeWindow(len(windows), [eps[j] for j in window],
                                       [ep_rows[j] for j in window]))  # fmt: skip
            window, rows = [], 0
    if window:
        windows.append(MergeWindow(len(windows), [eps[j] for j in window],
                                   [ep_rows[j] for j in window]))  # fmt: skip
    return windows


def window_transitions(
    runs: list[ColumnFiles], window: MergeWindow, reward_names: tuple[str, ...]
) -> Transitions:
    """The transitions of a window's episodes, in its order, read from their runs."""
    eps, ep_rows = window.episodes, window.rows
    cols = {c.name: c for c in runs[0].columns}
    per_run: dict[int, list[int]] = {}
    for i, e in enumerate(eps):
        per_run.setdefault(e[1], []).append(i)
    blocks: dict[str, list[np.ndarray]] = {n: [] for n in cols}
    base: dict[int, int] = {}
    offset = 0
    for r, idxs in per_run.items():
        start = eps[idxs[0]][2]
        stop = eps[idxs[-1]][2] + eps[idxs[-1]][3]
        for name, c in cols.items():
            if name == "episode_id":
                continue
            blocks[name].append(runs[r].read_column(c, start, stop))
        base[r] = offset - start
        offset += stop - start
    gather = np.concatenate([np.arange(e[2], e[2] + e[3]) + base[e[1]] for e in eps])
    data = {name: np.concatenate(b)[gather] for name, b in blocks.items() if b}
    lengths = np.array([e[3] for e in eps], dtype=np.int64)
    ids = pl.Series([row["episode_id"] for row in ep_rows], dtype=pl.Utf8)
    named = [reward_column(name) for name in reward_names]
    return Transitions(
        episode_id=ids.gather(np.repeat(np.arange(len(eps)), lengths)),
        step=data["step"],
        observation=data["observation"],
        action=data["action"],
        reward=data["reward"],
        next_observation=data["next_observation"],
        terminated=data["terminated"].astype(bool),
        truncated=data["truncated"].astype(bool),
        return_to_go=data["return_to_go"],
        ep_id=ids,
        ep_length=lengths,
        ep_return=np.array([row["return"] for row in ep_rows]),
        ep_dropped_reward=np.array([row["dropped_reward"] for row in ep_rows]),
        ep_last_step_dropped=np.array([row["last_step_dropped"] for row in ep_rows], dtype=bool),
        ep_terminated=np.array([row["terminated"] for row in ep_rows], dtype=bool),
        ep_truncated=np.array([row["truncated"] for row in ep_rows], dtype=bool),
        ep_file=np.array([row["_key"] >> 40 for row in ep_rows], dtype=np.int64),
        ep_line=np.array([row["_key"] & ((1 << 40) - 1) for row in ep_rows], dtype=np.int64),
        named_reward=np.stack([data[c] for c in named], axis=1) if named else None,
        ep_dropped_named=(
            np.array([[row[f"dropped_{c}"] for c in named] for row in ep_rows]) if named else None
        ),
    )


@dataclass(frozen=True)
class MergeTask:
    """A window of the merge, for :func:`merge_parts`: the runs it reads (less their
    episode tables: the window carries its episodes' rows)."""

    window: MergeWindow
    runs: list[ColumnFiles]


@dataclass
class MergeResult:
    transitions: Transitions  # the window's episodes and statistics, less its rows
    parts: WrittenParts


def merge_parts(ctx: BuildContext, task: MergeTask) -> MergeResult:
    """A window of the merge (:func:`window_transitions`) written as parts
    (``ctx.parts_dir``), its statistics taken over the window as a sink takes them."""
    names = tuple(name for name, _ in ctx.spec.fields.rewards)
    tr = window_transitions(task.runs, task.window, names)
    tr.stats = chunk_stats(tr.observation, tr.action, tr.reward, tr.return_to_go, tr.named_reward)
    left, parts = ctx.write_parts(tr, f"m{task.window.index:06d}")
    return MergeResult(left, parts)


def without_rows(tr: Transitions) -> Transitions:
    """``tr`` less its rows: zero-length columns, its episodes, statistics and counts."""
    empty = {
        name: getattr(tr, name)[:0].copy()
        for name in ("step", "observation", "action", "reward", "next_observation",
                     "terminated", "truncated", "return_to_go")
    }  # fmt: skip
    named = None if tr.named_reward is None else tr.named_reward[:0].copy()
    return dataclasses.replace(tr, episode_id=tr.episode_id.head(0), named_reward=named, **empty)


# --------------------------------------------------------------------------- spill format
# (also the rows of step_rows; a group of them may come as a slice of a larger table)


def _fixed(a: np.ndarray) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(a).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, a.shape[1])


def _steps_to_batch(s: ParsedSteps, file_idx: int) -> pa.RecordBatch:
    cols: dict[str, pa.Array] = {
        "ep": s.episode_id.to_arrow(compat_level=pl.CompatLevel.oldest()),
        "ep_int": pa.array(s.id_int),
        "t": pa.array(s.t),
        "obs": _fixed(s.obs),
        "act": _fixed(s.act) if s.act.ndim == 2 else pa.array(s.act),
        "rew": pa.array(s.rew),
        "term": pa.array(s.term),
        "trunc": pa.array(s.trunc),
        "line": pa.array(s.line),
        "file": pa.array(np.full(len(s), file_idx, dtype=np.int32)),
    }
    if s.end is not None:
        cols["end"] = pa.array(list(s.end), pa.string())
    if s.named_rew is not None:
        cols["named_rew"] = _fixed(s.named_rew)
    if s.fobs is not None and s.fobs_present is not None:
        # sparse: a list per row, empty where the row has no final observation
        d = s.obs.shape[1]
        offsets = np.concatenate([[0], np.cumsum(s.fobs_present.astype(np.int32) * d)])
        cols["fobs"] = pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32)), pa.array(s.fobs.reshape(-1))
        )
    return pa.RecordBatch.from_arrays(list(cols.values()), names=list(cols))


def _to_np(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    return arr.to_numpy(zero_copy_only=False)


def _batch_to_steps(t: pa.Table) -> tuple[ParsedSteps, np.ndarray]:
    names = set(t.column_names)
    obs = _to_np(t.column("obs")).astype(np.float32, copy=False)
    fobs = fobs_present = None
    if "fobs" in names:
        arr = t.column("fobs").combine_chunks()
        fobs_present = np.diff(arr.offsets.to_numpy()) > 0
        fobs = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        fobs = fobs.reshape(-1, obs.shape[1])
    steps = ParsedSteps(
        episode_id=pl.Series("_ep", t.column("ep").combine_chunks()).cast(pl.Utf8),
        id_int=_to_np(t.column("ep_int")).astype(bool, copy=False),
        t=_to_np(t.column("t")).astype(np.int64, copy=False),
        obs=obs,
        act=_to_np(t.column("act")),
        rew=_to_np(t.column("rew")).astype(np.float64, copy=False),
        term=_to_np(t.column("term")).astype(bool, copy=False),
        trunc=_to_np(t.column("trunc")).astype(bool, copy=False),
        end=np.asarray(t.column("end").to_pylist(), dtype=object) if "end" in names else None,
        fobs=fobs,
        fobs_present=fobs_present,
        line=_to_np(t.column("line")).astype(np.int64, copy=False),
        named_rew=(
            _to_np(t.column("named_rew")).astype(np.float64, copy=False)
            if "named_rew" in names
            else None
        ),
    )
    return steps, _to_np(t.column("file")).astype(np.int64, copy=False)
