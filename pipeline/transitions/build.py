"""JSONL logs -> a transition store (``python -m pipeline.build SPEC`` with ``kind: transitions``).

The build streams: each input file is read in line-aligned chunks, each chunk is parsed
and checked by polars in one typed pass (see :mod:`pipeline.transitions.parse`), and transitions go
to per-column files in a staging directory next to the target. Memory holds a chunk, or
for ``step_per_line`` logs (whose episodes may be spread over files) one hash bucket of
episodes that was spilled to disk. The store appears under ``OUT/NAME`` only when it is
complete (one rename); a killed build leaves a hidden staging directory and no store.

Building again from the same inputs and spec does nothing ("up to date").
"""

from __future__ import annotations

import base64
import heapq
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa

from data_specs.schema import TransitionSpec, load_spec
from pipeline.arrowio import file_digest, write_arrow_table
from pipeline.format import FORMAT_NAME, QUARANTINE, SPEC_COPY, BuildError
from pipeline.sources import (
    Chunk,
    SourceFile,
    iter_chunks,
    prefetch,
    read_lines,
    resolve_sources,
)
from pipeline.storage import (
    BuildResult,
    build_key,
    publish,
    staged,
    up_to_date,
    versions,
    write_manifest,
)
from pipeline.transitions.episodes import Transitions, build_transitions
from pipeline.transitions.layout import (
    EPISODES_ARROW,
    FORMAT_VERSION,
    KIND,
    TRANSITIONS_ARROW,
    ZARR_GROUP,
)
from pipeline.transitions.parse import (
    EPISODE_REJECTED,
    ChunkParser,
    ParsedSteps,
    Rejected,
    get_path,
    infer_shapes,
    is_episode_id,
    parse_line,
)
from pipeline.transitions.writer import (
    ColumnSink,
    combine_digests,
    episodes_digest,
    write_arrow_transitions,
    write_zarr,
)

DUPLICATE_EPISODE = "duplicate_episode"
BUCKET_TARGET_BYTES = 96 << 20  # parsed step rows per spill bucket (memory per bucket ~3x)
IN_MEMORY_INPUT_BYTES = 256 << 20  # step_per_line inputs up to this size are not spilled
MERGE_WINDOW_ROWS = 1 << 16  # spilled runs are merged back this many rows at a time


@dataclass
class _Quarantine:
    """Rejected records: written as found (already in file/line order), plus deferred ones
    (records of rejected episodes found later) resolved by one pass over their files."""

    path: Path
    sources: list[SourceFile]
    reasons: Counter[str] = field(default_factory=Counter)
    deferred: list[tuple[int, int, str, str, str | None]] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self._fh = self.path.open("wb")

    def record(
        self,
        src: SourceFile,
        line: int,
        reason: str,
        detail: str,
        raw: bytes,
        episode_id: str | None,
    ) -> None:
        self._fh.write(_quarantine_line(src, line, reason, detail, raw, episode_id))
        self._count(src, reason)

    def _count(self, src: SourceFile, reason: str) -> None:
        self.reasons[reason] += 1
        src.quarantined += 1
        self.count += 1

    def defer(
        self, file_idx: int, line: int, reason: str, detail: str, episode_id: str | None
    ) -> None:
        self.deferred.append((file_idx, line, reason, detail, episode_id))
        self._count(self.sources[file_idx], reason)

    def finish(self, final: Path) -> None:
        self._fh.close()
        by_file: dict[int, set[int]] = {}
        for fi, ln, *_ in self.deferred:
            by_file.setdefault(fi, set()).add(ln)
        raw: dict[tuple[int, int], bytes] = {}
        for fi, lines in by_file.items():
            for ln, text in read_lines(self.sources[fi], lines).items():
                raw[(fi, ln)] = text
        deferred = sorted(self.deferred, key=lambda r: (r[0], r[1]))
        index = {s.display: s.index for s in self.sources}

        def immediate() -> Iterator[tuple[tuple[int, int], bytes]]:
            with self.path.open("rb") as f:
                for line in f:
                    rec = orjson.loads(line)
                    yield (index[rec["file"]], rec["line"]), line

        def later() -> Iterator[tuple[tuple[int, int], bytes]]:
            for fi, ln, reason, detail, ep in deferred:
                src = self.sources[fi]
                yield (
                    (fi, ln),
                    _quarantine_line(src, ln, reason, detail, raw.get((fi, ln), b""), ep),
                )

        with final.open("wb") as out:
            for _, line in heapq.merge(immediate(), later(), key=lambda x: x[0]):
                out.write(line)
        self.path.unlink()


def _quarantine_line(
    src: SourceFile, line: int, reason: str, detail: str, raw: bytes, episode_id: str | None
) -> bytes:
    rec: dict[str, Any] = {
        "file": src.display,
        "line": line,
        "reason": reason,
        "detail": detail,
        "episode_id": episode_id,
    }
    try:
        rec["raw"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        rec["raw"] = raw.decode("utf-8", errors="replace")
        rec["raw_base64"] = base64.b64encode(raw).decode("ascii")
    return orjson.dumps(rec) + b"\n"


def _episode_id_of(raw: bytes, key: str) -> str | None:
    try:
        obj = parse_line(raw)
    except Exception:  # noqa: BLE001 - unreadable: no episode to name
        return None
    v = get_path(obj, key)
    # only string and integer ids name an episode (the reference check rejects others)
    return str(v) if is_episode_id(v) else None


# --------------------------------------------------------------------------- spill


class _Buckets:
    """step_per_line: hold parsed steps grouped by a hash of the episode id, so that each
    bucket holds whole episodes. Small inputs stay in memory; larger ones are spilled to
    Arrow files on disk, one per bucket, so memory holds one bucket at a time."""

    def __init__(self, directory: Path, n: int, in_memory: bool) -> None:
        self.directory = directory
        self.n = n
        self.in_memory = in_memory
        self._mem: dict[int, list[tuple[ParsedSteps, np.ndarray]]] = {}
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self._files: dict[int, Any] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, steps: ParsedSteps, file_idx: int) -> None:
        if len(steps) == 0:
            return
        if self.n > 1:
            bucket = (steps.episode_id.hash(seed=0) % self.n).to_numpy()
            parts = [(int(b), bucket == b) for b in np.unique(bucket)]
        else:
            parts = [(0, np.ones(len(steps), dtype=bool))]
        for b, m in parts:
            sub = steps if len(parts) == 1 else steps.subset(m)
            if self.in_memory:
                self._mem.setdefault(b, []).append(
                    (sub, np.full(len(sub), file_idx, dtype=np.int64))
                )
                continue
            batch = _steps_to_batch(sub, file_idx)
            if b not in self._writers:
                f = pa.OSFile(str(self.directory / f"bucket-{b}.arrow"), "wb")
                self._files[b] = f
                self._writers[b] = pa.ipc.new_stream(f, batch.schema)
            self._writers[b].write_batch(batch)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        for f in self._files.values():
            f.close()

    def read(self) -> Iterator[tuple[ParsedSteps, np.ndarray]]:
        if self.in_memory:
            for b in sorted(self._mem):
                parts = self._mem.pop(b)
                yield (
                    ParsedSteps.concat([p for p, _ in parts]),
                    np.concatenate([f for _, f in parts]),
                )
            return
        for b in sorted(self._writers):
            path = self.directory / f"bucket-{b}.arrow"
            with pa.OSFile(str(path), "rb") as f:
                table = pa.ipc.open_stream(f).read_all()
            path.unlink()
            yield _batch_to_steps(table)


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
        return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    return arr.to_numpy(zero_copy_only=False)


def _batch_to_steps(t: pa.Table) -> tuple[ParsedSteps, np.ndarray]:
    names = set(t.column_names)
    obs = _to_np(t.column("obs")).astype(np.float32, copy=False)
    fobs = fobs_present = None
    if "fobs" in names:
        arr = t.column("fobs").combine_chunks()
        fobs_present = np.diff(arr.offsets.to_numpy()) > 0
        fobs = arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
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
    )
    return steps, _to_np(t.column("file")).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- merge


def _merge_runs(
    runs: list[ColumnSink], sink: ColumnSink, names: list[str], window_rows: int
) -> None:
    """Merge per-bucket runs (each in first-appearance order) into ``sink`` in global
    first-appearance order, a window of about ``window_rows`` rows at a time (bounded memory)."""
    eps: list[tuple[int, int, int, int]] = []  # (key, run, start, length)
    ep_rows: list[dict[str, Any]] = []
    for r, run in enumerate(runs):
        for e in run.episodes:
            eps.append((e["_key"], r, e["start"], e["length"]))
            ep_rows.append(e)
    order = sorted(range(len(eps)), key=lambda i: eps[i][0])
    cols = {c.name: c for c in runs[0].columns} if runs else {}
    window: list[int] = []
    rows = 0

    def flush() -> None:
        nonlocal window, rows
        if not window:
            return
        per_run: dict[int, list[int]] = {}
        for i in window:
            per_run.setdefault(eps[i][1], []).append(i)
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
        gather = np.concatenate(
            [np.arange(eps[i][2], eps[i][2] + eps[i][3]) + base[eps[i][1]] for i in window]
        )
        data = {name: np.concatenate(b)[gather] for name, b in blocks.items() if b}
        lengths = np.array([eps[i][3] for i in window], dtype=np.int64)
        ids = pl.Series([ep_rows[i]["episode_id"] for i in window], dtype=pl.Utf8)
        tr = Transitions(
            episode_id=ids.gather(np.repeat(np.arange(len(window)), lengths)),
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
            ep_return=np.array([ep_rows[i]["return"] for i in window]),
            ep_dropped_reward=np.array([ep_rows[i]["dropped_reward"] for i in window]),
            ep_last_step_dropped=np.array(
                [ep_rows[i]["last_step_dropped"] for i in window], dtype=bool
            ),
            ep_terminated=np.array([ep_rows[i]["terminated"] for i in window], dtype=bool),
            ep_truncated=np.array([ep_rows[i]["truncated"] for i in window], dtype=bool),
            ep_file=np.array([ep_rows[i]["_key"] >> 40 for i in window], dtype=np.int64),
            ep_line=np.array(
                [ep_rows[i]["_key"] & ((1 << 40) - 1) for i in window], dtype=np.int64
            ),
        )
        sink.append(tr, names)
        window, rows = [], 0

    for i in order:
        window.append(i)
        rows += eps[i][3]
        if rows >= window_rows:
            flush()
    flush()


# --------------------------------------------------------------------------- build


def _nonblank(chunk: Chunk) -> np.ndarray:
    """Indices of the chunk's lines that hold something besides whitespace."""
    buf = np.frombuffer(chunk.data, dtype=np.uint8)
    starts, ends = chunk.starts, chunk.ends
    first = buf[np.minimum(starts, len(buf) - 1)] if len(buf) else np.zeros(0, np.uint8)
    ws_first = (ends == starts) | (first == 32) | (first == 9) | (first == 13)
    keep = ~ws_first
    for i in np.flatnonzero(ws_first):  # rare: lines that start with whitespace
        keep[i] = bool(chunk.data[starts[i] : ends[i]].strip())
    return np.flatnonzero(keep)


def _parsed(
    parser: ChunkParser, src: SourceFile, chunk_bytes: int
) -> Iterator[tuple[Chunk, np.ndarray, ParsedSteps, list[Rejected]]]:
    """Parse the chunks of one file (run one chunk ahead of the consumer, in a thread)."""
    key = parser.spec.source.episode_key
    for chunk in prefetch(iter_chunks(src, chunk_bytes)):
        nb = _nonblank(chunk)
        steps, rejected = parser.parse(
            chunk.data, chunk.first_line + nb, _line_getter(chunk, nb), chunk.first_line
        )
        for r in rejected:
            r.episode_id = _episode_id_of(r.raw, key)
        yield chunk, nb, steps, rejected


def _line_getter(chunk: Chunk, nb: np.ndarray) -> Callable[[int], bytes]:
    """The raw bytes of the i-th non-blank line of the chunk."""

    def get(i: int) -> bytes:
        return chunk.line(int(nb[i]))

    return get


def _first_records(sources: list[SourceFile], limit: int = 200) -> list[Any]:
    """Up to ``limit`` parseable records from the start of the inputs (to infer shapes)."""
    out: list[Any] = []
    for src in sources:
        for chunk in iter_chunks(src, 1 << 20):
            for i in _nonblank(chunk):
                try:
                    out.append(parse_line(chunk.line(int(i))))
                except Exception:  # noqa: BLE001 - a bad line: keep looking
                    continue
                if len(out) >= limit:
                    return out
            break
        src.sha256 = None  # iter_chunks was stopped early: the file is hashed in the build
    return out


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, desc="build", disable=not enabled, leave=False
    )


def build(
    spec_path: str | Path,
    out_dir: str | Path = "stores",
    *,
    force: bool = False,
    max_bad_fraction: float | None = None,
    chunk_bytes: int = 16 << 20,
    progress: bool | None = None,
    bucket_bytes: int = BUCKET_TARGET_BYTES,
    in_memory_bytes: int = IN_MEMORY_INPUT_BYTES,
    merge_rows: int = MERGE_WINDOW_ROWS,
) -> BuildResult:
    """Build (or find up to date) the transition store for ``spec_path`` under ``out_dir/NAME``."""
    t0 = time.perf_counter()
    spec = load_spec(spec_path)
    sources = resolve_sources(spec.source.paths, origin=f"{spec_path}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: exists and is not a directory; give a directory for stores")
    target = out / spec.name
    if not force:
        manifest = up_to_date(
            target,
            build_key_parts(spec.sha256()),
            sources,
            kind=KIND,
            format_version=FORMAT_VERSION,
            spec_sha=spec.sha256(),
        )
        if manifest is not None:
            return BuildResult(target, "up to date", manifest, time.perf_counter() - t0)
    with staged(out, spec.name) as staging:
        manifest = _build_into(
            spec,
            spec_path,
            sources,
            staging,
            max_bad_fraction,
            chunk_bytes,
            progress,
            bucket_bytes,
            in_memory_bytes,
            merge_rows,
            out,
        )
        publish(staging, target)
    return BuildResult(target, "built", manifest, time.perf_counter() - t0)


def build_key_parts(spec_sha: str) -> list[str]:
    """What besides the inputs decides a transition store: its format and the spec as written."""
    return [f"{KIND}/{FORMAT_VERSION}", spec_sha]


def _build_into(
    spec: TransitionSpec,
    spec_path: str | Path,
    sources: list[SourceFile],
    staging: Path,
    max_bad_fraction: float | None,
    chunk_bytes: int,
    progress: bool | None,
    bucket_bytes: int,
    in_memory_bytes: int,
    merge_rows: int,
    out: Path,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    raw_spec_sha = spec.sha256()
    try:
        spec = infer_shapes(spec, _first_records(sources))
    except ValueError as e:
        raise BuildError(str(e)) from None
    parser = ChunkParser(spec)
    lay = parser.layout
    a = spec.fields.action
    discrete = a.type == "discrete"
    work = staging / "_work"
    sink = ColumnSink(work / "final", lay.obs_dim, discrete, lay.act_dim or 0)
    quarantine = _Quarantine(staging / "quarantine.partial.jsonl", sources)
    names = [s.display for s in sources]
    per_line = lay.per_line
    counts: Counter[str] = Counter()
    end = spec.fields.end
    term_reasons = end.terminated if end else ()
    trunc_reasons = end.truncated if end else ()
    est = sum(s.size * (5 if s.path.suffix in (".gz", ".zst") else 1) for s in sources)
    n_buckets = max(1, min(256, int(np.ceil(est * 0.35 / bucket_bytes))))
    in_memory = est <= in_memory_bytes
    if in_memory:
        n_buckets = 1
    buckets = None if per_line else _Buckets(work / "buckets", n_buckets, in_memory)
    rejected_eps: dict[str, str] = {}
    kept_at: dict[str, tuple[str, int]] = {}  # episode_per_line: id -> (file, line) kept
    show = sys.stderr.isatty() if progress is None else progress
    bar = _progress(sum(s.size for s in sources), show)
    steps_read = 0
    try:
        for src in sources:
            read = 0
            for chunk, nb, steps, rejected in prefetch(_parsed(parser, src, chunk_bytes), 1):
                src.blank_lines += chunk.n_lines - len(nb)
                src.records += len(nb)
                steps_read += len(steps)
                if per_line:
                    _per_line_chunk(
                        steps,
                        rejected,
                        src,
                        chunk,
                        nb,
                        sink,
                        names,
                        kept_at,
                        spec,
                        term_reasons,
                        trunc_reasons,
                        counts,
                    )
                    for r in sorted(rejected, key=lambda r: r.line):
                        quarantine.record(src, r.line, r.reason, r.detail, r.raw, r.episode_id)
                else:
                    for r in rejected:
                        quarantine.record(src, r.line, r.reason, r.detail, r.raw, r.episode_id)
                        if r.episode_id is not None:
                            rejected_eps.setdefault(
                                r.episode_id, f"{src.display}:{r.line}: {r.reason}: {r.detail}"
                            )
                    assert buckets is not None
                    buckets.add(steps, src.index)
                if src.path.suffix not in (".gz", ".zst"):
                    bar.update(len(chunk.data))
                    read += len(chunk.data)
            bar.update(max(0, src.size - read))
        if buckets is not None:
            buckets.close()
            runs = []
            single = buckets.n == 1  # one bucket is already in global first-appearance order
            for run_no, (steps, file_idx) in enumerate(buckets.read()):
                run = (
                    sink
                    if single
                    else ColumnSink(
                        work / f"run-{run_no}", lay.obs_dim, discrete, lay.act_dim or 0, track=False
                    )
                )
                steps, file_idx = _drop_rejected(steps, file_idx, rejected_eps, quarantine)
                tr = build_transitions(
                    steps,
                    file_idx,
                    sorted_by_line=False,
                    terminated_reasons=term_reasons,
                    truncated_reasons=trunc_reasons,
                    gamma=spec.store.discount,
                )
                counts.update(tr.counts)
                for rej in tr.rejected:
                    for row in rej.rows:
                        quarantine.defer(
                            int(file_idx[row]),
                            int(steps.line[row]),
                            rej.reason,
                            f"episode {rej.episode_id}: {rej.detail}",
                            rej.episode_id,
                        )
                run.append(tr, names)
                del steps, tr
                if single:
                    continue
                run.close()
                runs.append(run)
            _merge_runs(runs, sink, names, merge_rows)
            for run in runs:
                shutil.rmtree(run.directory, ignore_errors=True)
    finally:
        bar.close()
        sink.close()
    quarantine.finish(staging / QUARANTINE)
    records = sum(s.records for s in sources)
    if max_bad_fraction is not None and records and quarantine.count / records > max_bad_fraction:
        keep = out / f"{spec.name}.rejected-quarantine.jsonl"
        shutil.copyfile(staging / QUARANTINE, keep)
        top = ", ".join(f"{k} {v}" for k, v in quarantine.reasons.most_common(3))
        raise BuildError(
            f"{quarantine.count} of {records} records quarantined ({quarantine.count / records:.1%}) > "
            f"--max-bad-fraction {max_bad_fraction}: {top}; see {keep}"
        )
    if sink.rows == 0:
        raise BuildError(
            f"{spec_path}: no transition could be built from {records} records "
            f"({quarantine.count} quarantined: {dict(quarantine.reasons)}); nothing to store"
        )
    episodes = sink.episodes_table()
    for ep_row in sink.episodes:
        ep_row.pop("_key", None)
    if spec.store.format == "arrow":
        write_arrow_transitions(sink, staging / TRANSITIONS_ARROW)
        write_arrow_table(episodes, staging / EPISODES_ARROW)
        data_files = [TRANSITIONS_ARROW, EPISODES_ARROW, QUARANTINE]
    else:
        write_zarr(sink, episodes, staging / ZARR_GROUP)
        data_files = [QUARANTINE]
    shutil.rmtree(work, ignore_errors=True)
    content = combine_digests(
        sink.column_digests(), episodes_digest(episodes), file_digest(staging / QUARANTINE)
    )
    shutil.copyfile(spec_path, staging / SPEC_COPY)
    manifest = _manifest(
        spec,
        raw_spec_sha,
        spec_path,
        sources,
        sink,
        episodes,
        quarantine,
        counts,
        content,
        data_files,
        staging,
        steps_read,
    )
    manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
    write_manifest(staging, manifest)
    return manifest


def _drop_rejected(
    steps: ParsedSteps, file_idx: np.ndarray, rejected_eps: dict[str, str], q: _Quarantine
) -> tuple[ParsedSteps, np.ndarray]:
    """step_per_line: records of episodes that another record got rejected go too."""
    if not rejected_eps or len(steps) == 0:
        return steps, file_idx
    bad = steps.episode_id.is_in(list(rejected_eps)).to_numpy()
    if not bad.any():
        return steps, file_idx
    ids = steps.episode_id.to_list()
    for i in np.flatnonzero(bad):
        ep = ids[i]
        q.defer(
            int(file_idx[i]), int(steps.line[i]), EPISODE_REJECTED,
            f"episode {ep} was rejected by another record ({rejected_eps[ep]})", ep,
        )  # fmt: skip
    return steps.subset(~bad), file_idx[~bad]


def _per_line_chunk(
    steps: ParsedSteps,
    rejected: list[Rejected],
    src: SourceFile,
    chunk: Chunk,
    nb: np.ndarray,
    sink: ColumnSink,
    names: list[str],
    kept_at: dict[str, tuple[str, int]],
    spec: TransitionSpec,
    term_reasons: tuple[str, ...],
    trunc_reasons: tuple[str, ...],
    counts: Counter[str],
) -> None:
    """episode_per_line: the chunk holds whole episodes; build them and append in order.

    An id is used once its episode is KEPT (``kept_at``: id -> where): a later episode that
    would be kept but whose id is used is quarantined as ``duplicate_episode``; a copy
    rejected for another reason keeps that reason and uses up nothing."""
    if len(steps) == 0:
        return
    line_pos = {int(chunk.first_line + i): int(i) for i in nb}
    file_idx = np.full(len(steps), src.index, dtype=np.int64)

    def transitions() -> Transitions:
        return build_transitions(
            steps,
            file_idx,
            sorted_by_line=True,
            terminated_reasons=term_reasons,
            truncated_reasons=trunc_reasons,
            gamma=spec.store.discount,
        )

    tr = transitions()
    duplicates: dict[int, tuple[str, str, int]] = {}  # line -> (id, file, line kept)
    for eid, ln in zip(tr.ep_id.to_list(), tr.ep_line.tolist()):
        if eid in kept_at:
            duplicates[ln] = (eid, *kept_at[eid])
        else:
            kept_at[eid] = (src.display, ln)
    if duplicates:  # the same episodes again, less the duplicates
        keep = ~np.isin(steps.line, np.fromiter(duplicates, dtype=np.int64))
        steps, file_idx = steps.subset(keep), file_idx[keep]
        tr = transitions()
        for ln, (eid, file, line) in sorted(duplicates.items()):
            detail = f"episode id {eid!r} was already used by the episode kept at {file}:{line}"
            raw = chunk.line(line_pos[ln])
            rejected.append(Rejected(ln, DUPLICATE_EPISODE, detail, raw, eid))
    counts.update(tr.counts)
    for rej in tr.rejected:
        ln = int(steps.line[rej.rows[0]])
        rejected.append(
            Rejected(ln, rej.reason, rej.detail, chunk.line(line_pos[ln]), rej.episode_id)
        )
    sink.append(tr, names)


def _stats_dict(sink: ColumnSink, episodes: pa.Table) -> dict[str, Any]:
    lengths = episodes.column("length").to_numpy()
    rets = episodes.column("return").to_numpy()

    def summary(x: np.ndarray) -> dict[str, Any]:
        if len(x) == 0:
            return {}
        q = np.percentile(x, [0, 25, 50, 75, 100])
        return {
            "mean": float(x.mean()), "std": float(x.std()), "min": float(q[0]), "p25": float(q[1]),
            "median": float(q[2]), "p75": float(q[3]), "max": float(q[4]),
        }  # fmt: skip

    out = {
        "observation": sink.obs_stats.to_dict(),
        "reward": sink.reward_stats.to_dict(scalar=True),
        "return_to_go": sink.rtg_stats.to_dict(scalar=True),
        "episode_return": summary(rets),
        "episode_length": summary(lengths.astype(np.float64)),
    }
    if not sink.discrete:
        out["action"] = sink.act_stats.to_dict()
    return out


def _manifest(
    spec: TransitionSpec,
    raw_spec_sha: str,
    spec_path: str | Path,
    sources: list[SourceFile],
    sink: ColumnSink,
    episodes: pa.Table,
    q: _Quarantine,
    counts: Counter[str],
    content: str,
    data_files: list[str],
    staging: Path,
    steps_read: int,
) -> dict[str, Any]:
    a = spec.fields.action
    o = spec.fields.observation
    if o.keys is not None:
        labels = []
        for k in o.keys:
            labels += [k.path] if k.size is None else [f"{k.path}[{i}]" for i in range(k.size)]
    else:
        labels = [o.path] if o.scalar else [f"{o.path}[{i}]" for i in range(o.dim or 0)]
    if a.type == "discrete":
        action_space: dict[str, Any] = {"type": "discrete", "n": a.n}
    else:
        action_space = {
            "type": "continuous",
            "dim": a.size,
            "low": list(a.low or ()),
            "high": list(a.high or ()),
        }
    ep_term = episodes.column("terminated").to_numpy(zero_copy_only=False)
    records = sum(s.records for s in sources)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "name": spec.name,
        "store_format": spec.store.format,
        "spec": spec.to_dict(),
        "spec_sha256": raw_spec_sha,
        "resolved_spec_sha256": spec.sha256(),
        "spec_file": str(spec_path),
        "build_key": build_key(build_key_parts(raw_spec_sha), sources),
        "sources": [
            {
                "path": s.display,
                "sha256": s.sha256,
                "bytes": s.size,
                "mtime_ns": s.mtime_ns,
                "records": s.records,
                "records_kept": s.records - s.quarantined,
                "records_quarantined": s.quarantined,
                "blank_lines": s.blank_lines,
            }
            for s in sources
        ],  # fmt: skip
        "counts": {
            "records": records,
            "records_kept": records - q.count,
            "records_quarantined": q.count,
            "steps_read": steps_read,
            "episodes": episodes.num_rows,
            "episodes_terminated": int(ep_term.sum()),
            "episodes_truncated": int(episodes.num_rows - ep_term.sum()),
            "transitions": sink.rows,
            **{k: int(v) for k, v in sorted(counts.items()) if k != "transitions"},
        },
        "quarantine_reasons": dict(sorted(q.reasons.items())),
        "observation_space": {"dim": sink.obs_dim, "dtype": "float32", "labels": labels},
        "action_space": action_space,
        "statistics": _stats_dict(sink, episodes),
        "content_hash": content,
        "column_digests": sink.column_digests(),
        "data_files": {
            f: {"sha256": file_digest(staging / f), "bytes": (staging / f).stat().st_size}
            for f in data_files
        },
        "versions": versions("numpy", "pyarrow", "polars", "orjson", "zarr"),
    }


# --------------------------------------------------------------------------- CLI


def summary_lines(result: BuildResult) -> list[str]:
    m = result.manifest
    c = m["counts"]
    if result.status == "up to date":
        return [
            f"{result.path}: up to date ({c['episodes']} episodes, {c['transitions']} transitions); --force rebuilds"
        ]
    lines = [
        f"{result.path}: built in {result.seconds:.2f}s",
        f"  records   {c['records']:>10}  = kept {c['records_kept']} + quarantined {c['records_quarantined']}",
        f"  episodes  {c['episodes']:>10}  ({c['episodes_terminated']} terminated, {c['episodes_truncated']} truncated)",
        f"  transitions {c['transitions']:>8}  ({c.get('truncated_last_steps_dropped', 0)} unbootstrappable last steps dropped)",
    ]
    if m["quarantine_reasons"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in m["quarantine_reasons"].items())
        lines.append(f"  quarantine  {reasons}  -> {result.path / QUARANTINE}")
    return lines
