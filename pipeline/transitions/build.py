"""JSONL logs -> a transition store (``python -m pipeline.build SPEC`` with ``kind: transitions``).

The build streams: each input file is read in line-aligned chunks; each chunk is parsed
and checked by polars in one typed pass (:mod:`pipeline.transitions.parse`) and its
transitions are built, by the pure per-chunk functions of
:mod:`pipeline.transitions.chunks`, in this process or in worker processes
(:mod:`pipeline.engine`; ``workers``). The results come back in input order and are
appended to per-column files in a staging directory next to the target, so the store is
the same for any number of workers. On Ray, a store of ``store.part_rows: N`` is written by
the tasks themselves, as parts (:func:`_workers_write_parts`); this process puts them in
order and hashes them. Memory holds a few chunks, or for ``step_per_line``
logs (whose episodes may be spread over files) one hash bucket of episodes spilled to
disk. The store appears under ``OUT/NAME`` only when it is complete (one rename); a killed
build leaves a hidden staging directory and no store.

Building again from the same inputs and spec does nothing ("up to date").
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from data_specs.schema import TransitionSpec, load_spec, reward_column
from pipeline.arrowio import file_digest, write_arrow_table
from pipeline.engine import Engine, LocalEngine, default_workers
from pipeline.format import FORMAT_NAME, QUARANTINE, SPEC_COPY, BuildError
from pipeline.interchange.minari_import import (
    MinariDir,
    MinariTask,
    dataset_source,
    minari_chunk,
    minari_raw,
    plan_tasks,
    resolve_datasets,
    resolve_spec,
)
from pipeline.report import quarantine_summary
from pipeline.sources import (
    Chunk,
    FileRange,
    SourceFile,
    as_chunk,
    dir_sha256,
    iter_chunks,
    iter_ranges,
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
from pipeline.transitions.chunks import (
    BUCKET,
    BucketResult,
    BucketTask,
    BuildContext,
    ChunkInfo,
    ChunkTask,
    EpisodeChunk,
    GroupTask,
    MergeTask,
    bucket_of,
    bucket_run,
    bucket_transitions,
    episode_chunk,
    group_transitions,
    load_bucket,
    merge_parts,
    merge_windows,
    step_chunk,
    step_rows,
    window_transitions,
    write_run,
)
from pipeline.transitions.episodes import Transitions
from pipeline.transitions.layout import (
    EPISODES_ARROW,
    FORMAT_VERSION,
    KIND,
    PARTS_KEY,
    TRANSITION_PARTS,
    TRANSITIONS_ARROW,
    ZARR_GROUP,
    part_file,
)
from pipeline.transitions.parse import ParsedSteps, Rejected, infer_shapes, parse_line
from pipeline.transitions.quarantine import Quarantine
from pipeline.transitions.writer import (
    ColumnFiles,
    ColumnSink,
    combine_digests,
    episodes_digest,
    write_arrow_parts,
    write_arrow_transitions,
    write_zarr,
)

if TYPE_CHECKING:
    from pipeline.ray_engine import RayEngine

DUPLICATE_EPISODE = "duplicate_episode"
ENGINES = ("local", "ray")  # where the per-chunk functions run (pipeline.engine, ray_engine)
BUCKET_TARGET_BYTES = 96 << 20  # parsed step rows per spill bucket (memory per bucket ~3x)
IN_MEMORY_INPUT_BYTES = 256 << 20  # step_per_line inputs up to this size are not spilled
MERGE_WINDOW_ROWS = 1 << 16  # spilled runs are merged back this many rows at a time
POOL_MIN_BYTES = 64 << 20  # smaller inputs build in-process unless workers are asked for
# Below this many CPUs one process already keeps them busy (polars parses on its own
# threads) and a pool only adds start-up and pickling: bench_build measured 2 workers
# slower than 1 on 2 CPUs. An explicit --workers N is honoured.
POOL_MIN_CPUS = 4


@dataclass(frozen=True)
class BuildOptions:
    """How a build runs. None of these changes the store it builds."""

    chunk_bytes: int = 16 << 20  # input read per chunk (memory ~ a few times this per worker)
    progress: bool | None = None  # a progress bar on stderr (None: when it is a terminal)
    bucket_bytes: int = BUCKET_TARGET_BYTES  # step_per_line: parsed steps per spill bucket
    in_memory_bytes: int = IN_MEMORY_INPUT_BYTES  # step_per_line: larger inputs are spilled
    merge_rows: int = MERGE_WINDOW_ROWS  # rows merged back from spilled runs at a time
    workers: int | None = None  # processes that parse chunks (None: the CPUs, at most 8,
    # for inputs of POOL_MIN_BYTES or more)
    engine: str = "local"  # "local" (this process or a pool) or "ray" (Ray Data)
    ray_address: str | None = None  # engine "ray": the cluster (None: start a local one)
    parallelism: int | None = None  # engine "ray": tasks at once (None: Ray decides)


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
    workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    parallelism: int | None = None,
) -> BuildResult:
    """Build (or find up to date) the transition store for ``spec_path`` under ``out_dir/NAME``.

    ``workers``: processes that parse and check the chunks (1: this process only; None:
    :func:`pipeline.engine.default_workers` for inputs of ``POOL_MIN_BYTES`` or more, whose
    build outlasts starting the workers, on machines of ``POOL_MIN_CPUS`` or more; else 1). The store is the same for any number.

    ``engine="ray"`` runs the same per-chunk functions on Ray Data
    (:mod:`pipeline.ray_engine`), on the cluster at ``ray_address`` (None: a local one),
    ``parallelism`` tasks at once; the store is the same as the local engine's."""
    t0 = time.perf_counter()
    if workers is not None and workers < 1:
        raise BuildError(f"--workers {workers}: give 1 or more worker processes")
    if engine not in ENGINES:
        raise BuildError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    opts = BuildOptions(
        chunk_bytes, progress, bucket_bytes, in_memory_bytes, merge_rows, workers,
        engine, ray_address, parallelism,
    )  # fmt: skip
    spec = load_spec(spec_path)
    datasets = None
    if spec.source.format == "minari":  # Minari datasets: one source per dataset directory
        datasets = resolve_datasets(spec.source.paths, origin=f"{spec_path}")
        sources = [dataset_source(i, ds) for i, ds in enumerate(datasets)]
    else:
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
    started = False
    if opts.engine == "ray":  # before anything is written: an unreachable cluster leaves nothing
        from pipeline.ray_engine import connect

        started = connect(opts.ray_address)
    try:
        with staged(out, spec.name) as staging:
            manifest = _build_into(
                spec, spec_path, sources, staging, max_bad_fraction, opts, out, datasets
            )
            publish(staging, target)
    finally:
        if started:
            from pipeline.ray_engine import import_ray

            import_ray().shutdown()
    return BuildResult(target, "built", manifest, time.perf_counter() - t0)


def build_key_parts(spec_sha: str) -> list[str]:
    """What besides the inputs decides a transition store: its format and the spec as written."""
    return [f"{KIND}/{FORMAT_VERSION}", spec_sha]


@dataclass
class _Tally:
    """What the reading of the inputs found, besides the transitions themselves."""

    counts: Counter[str] = field(default_factory=Counter)
    steps_read: int = 0

    def add(self, src: SourceFile, info: ChunkInfo) -> None:
        src.records += info.records
        src.blank_lines += info.blank_lines
        self.steps_read += info.steps_read


def _build_into(
    spec: TransitionSpec,
    spec_path: str | Path,
    sources: list[SourceFile],
    staging: Path,
    max_bad_fraction: float | None,
    opts: BuildOptions,
    out: Path,
    datasets: list[MinariDir] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    raw_spec_sha = spec.sha256()
    minari_tasks: list[MinariTask] = []
    hashes: dict[int, Future[str]] = {}
    if datasets is not None:
        spec = resolve_spec(spec, datasets)
        # the datasets are hashed on a thread while their episodes are read (hashlib lets
        # go of the GIL): the manifest needs the hashes only once the store is written
        hashing = ThreadPoolExecutor(1, thread_name_prefix="hash-datasets")
        hashes = {
            s.index: hashing.submit(dir_sha256, s.path, datasets[s.index].files)
            for s in sources
            if s.sha256 is None
        }
        hashing.shutdown(wait=False)
        minari_tasks = plan_tasks(datasets, spec, opts.chunk_bytes)
    else:
        try:
            spec = infer_shapes(spec, _first_records(sources))
        except ValueError as e:
            raise BuildError(str(e)) from None
    work = (staging / "_work").resolve()  # absolute: a Ray worker runs elsewhere
    ctx, workers = _plan(spec, sources, work, opts, minari=datasets is not None)
    lay = ctx.parser.layout
    discrete = spec.fields.action.type == "discrete"
    sink = ColumnSink(
        work / "final",
        lay.obs_dim,
        discrete,
        lay.act_dim or 0,
        reward_names=tuple(name for name, _ in spec.fields.rewards),
    )
    quarantine = Quarantine(staging / "quarantine.partial.jsonl", sources)
    tally = _Tally()
    show = sys.stderr.isatty() if opts.progress is None else opts.progress
    with _engine(ctx, workers, opts) as engine, _Progress(sources, show) as bar:
        workers = engine.workers
        try:
            by_range = opts.engine == "ray"
            if datasets is not None:
                episodes = _minari_progress(minari_tasks, sources, bar)
                _read_episodes(engine, episodes, sources, sink, quarantine, tally, minari_chunk)
            elif lay.per_line:
                tasks = _chunk_tasks(sources, opts.chunk_bytes, bar, by_range=by_range)
                _read_episodes(engine, tasks, sources, sink, quarantine, tally)
            else:
                tasks = _chunk_tasks(sources, opts.chunk_bytes, bar, by_range=by_range)
                _read_steps(engine, tasks, sources, sink, quarantine, tally, opts.merge_rows)
        finally:
            sink.close()
    for i, fut in hashes.items():
        sources[i].sha256 = fut.result()
    quarantine.finish(staging / QUARANTINE)
    _check_outcome(spec, spec_path, sources, sink, quarantine, max_bad_fraction, staging, out)
    manifest = _write_store(
        spec, raw_spec_sha, spec_path, sources, sink, quarantine, tally, staging
    )
    shutil.rmtree(work, ignore_errors=True)
    manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
    manifest["build_workers"] = workers
    manifest["build_engine"] = opts.engine
    write_manifest(staging, manifest)
    return manifest


def _plan(
    spec: TransitionSpec,
    sources: list[SourceFile],
    work: Path,
    opts: BuildOptions,
    minari: bool = False,
) -> tuple[BuildContext, int]:
    """The context every task shares, and how many worker processes to use.

    step_per_line inputs over ``in_memory_bytes`` are spilled to hash buckets of about
    ``bucket_bytes`` of parsed steps (on Ray, the buckets are the groups of its shuffle:
    nothing is spilled here). A pool is started only for inputs of several chunks
    (and by default only for inputs of ``POOL_MIN_BYTES`` or more).

    On Ray, a store of ``store.part_rows: N`` (JSONL inputs) has its transitions written as
    parts by the tasks that build them (:func:`_workers_write_parts`)."""
    est = sum(s.size * (5 if s.path.suffix in (".gz", ".zst") else 1) for s in sources)
    n_buckets, spill_dir = 1, None
    if spec.source.layout == "step_per_line" and est > opts.in_memory_bytes:
        n_buckets = max(1, min(256, math.ceil(est * 0.35 / opts.bucket_bytes)))
        if opts.engine != "ray":
            spill_dir = work / "spill"
            spill_dir.mkdir(parents=True)
    workers = opts.workers
    if workers is None:
        cpus = default_workers()
        workers = cpus if est >= POOL_MIN_BYTES and cpus >= POOL_MIN_CPUS else 1
    workers = max(1, min(workers, math.ceil(est / opts.chunk_bytes)))
    # statistics are summarised where chunks are built when that is another process; in a
    # build of one process the building thread has time for them while the next is read
    summarise = opts.engine == "ray" or workers > 1
    ctx = BuildContext(
        spec, [s.display for s in sources], n_buckets, spill_dir, summarise=summarise
    )
    if _workers_write_parts(spec, opts, minari):
        assert isinstance(spec.store.part_rows, int)
        ctx.parts_dir, ctx.part_rows = work / "parts", spec.store.part_rows
    return ctx, workers


def _workers_write_parts(spec: TransitionSpec, opts: BuildOptions, minari: bool) -> bool:
    """Whether the tasks write the store's transitions themselves, as parts: on Ray, for a
    store of ``store.part_rows: N`` built from JSONL. Everything else (one file, ``auto``,
    whose choice needs the total rows, zarr, Minari datasets, the local engine) is written
    here from the column sink."""
    return (
        opts.engine == "ray"
        and not minari
        and spec.store.format == "arrow"
        and isinstance(spec.store.part_rows, int)
        and not isinstance(spec.store.part_rows, bool)
    )


def _engine(ctx: BuildContext, workers: int, opts: BuildOptions) -> Engine:
    """Where the per-chunk functions run."""
    if opts.engine == "ray":
        from pipeline.ray_engine import RayEngine

        return RayEngine(ctx, opts.ray_address, opts.parallelism)
    return LocalEngine(ctx, workers)


def _chunk_tasks(
    sources: list[SourceFile], chunk_bytes: int, bar: _Progress, by_range: bool = False
) -> Iterator[ChunkTask]:
    """Every line-aligned chunk of the inputs, in order (reading hashes each file);
    ``by_range``: named by byte range, for a worker to read (:func:`iter_ranges`)."""
    index = 0
    for src in sources:
        for chunk in (iter_ranges if by_range else iter_chunks)(src, chunk_bytes):
            yield ChunkTask(index, src.index, chunk)
            index += 1
            bar.read(src, chunk)
        bar.read_all(src)


def _minari_progress(
    tasks: list[MinariTask], sources: list[SourceFile], bar: _Progress
) -> Iterator[MinariTask]:
    """The tasks, the bar moving by each dataset as its last task is handed out."""
    for i, task in enumerate(tasks):
        yield task
        if i + 1 == len(tasks) or tasks[i + 1].file_index != task.file_index:
            bar.read_all(sources[task.file_index])


# --------------------------------------------------------------------------- episode_per_line


def _read_episodes(
    engine: Engine[BuildContext],
    tasks: Iterator[Any],
    sources: list[SourceFile],
    sink: ColumnSink,
    quarantine: Quarantine,
    tally: _Tally,
    fn: Callable[[BuildContext, Any], EpisodeChunk] = episode_chunk,
) -> None:
    """episode_per_line (and Minari datasets, ``fn``): every task's episodes, appended in
    input order.

    An id is used once its episode is KEPT (``kept_at``: id -> where): a later episode that
    would be kept but whose id is used is quarantined as ``duplicate_episode``; a copy
    rejected for another reason keeps that reason and uses up nothing."""
    names = engine.context.source_names
    kept_at: dict[str, tuple[str, int]] = {}
    for task, res in engine.map(fn, tasks):
        src = sources[task.file_index]
        duplicates = _use_ids(res.transitions, kept_at, src.display)
        if duplicates:  # rare: build the task again, less the duplicates
            again = dataclasses.replace(task, exclude=tuple(duplicates))
            if engine.context.parts_dir is None:  # here
                res = engine.run(fn, again)
            else:  # by a worker, which writes its parts again
                ((_, res),) = engine.map(fn, [again])
            res.rejected += [_duplicate(task, ln, *d) for ln, d in duplicates.items()]
            res.rejected.sort(key=lambda r: r.line)
        tally.add(src, res)
        quarantine.record_all(src, res.rejected)
        if res.transitions is not None:
            tally.counts.update(res.transitions.counts)
            if res.parts is not None:
                sink.append_written(res.transitions, res.parts, names)
            else:
                sink.append(res.transitions, names)


def _use_ids(
    tr: Transitions | None, kept_at: dict[str, tuple[str, int]], display: str
) -> dict[int, tuple[str, str, int]]:
    """Mark the ids of the episodes ``tr`` keeps as used; {line: (id, file, line kept)} of
    those whose id an earlier kept episode already used."""
    duplicates: dict[int, tuple[str, str, int]] = {}
    if tr is None:
        return duplicates
    for eid, ln in zip(tr.ep_id.to_list(), tr.ep_line.tolist()):
        if eid in kept_at:
            duplicates[ln] = (eid, *kept_at[eid])
        else:
            kept_at[eid] = (display, ln)
    return duplicates


def _duplicate(task: Any, ln: int, eid: str, file: str, line: int) -> Rejected:
    detail = f"episode id {eid!r} was already used by the episode kept at {file}:{line}"
    if isinstance(task, ChunkTask):
        chunk = as_chunk(task.chunk)
        raw = chunk.line(ln - chunk.first_line)
    else:  # a Minari episode: where it is
        raw = minari_raw(task, ln)
    return Rejected(ln, DUPLICATE_EPISODE, detail, raw, eid)


# --------------------------------------------------------------------------- step_per_line


@dataclass
class _Steps:
    """step_per_line: where the checked steps of every chunk went."""

    in_memory: list[tuple[ParsedSteps, np.ndarray]] = field(default_factory=list)
    spilled: dict[int, list[tuple[Path, int]]] = field(default_factory=dict)  # bucket -> parts
    rejected: dict[str, str] = field(default_factory=dict)  # id -> the record that rejected it


def _read_steps(
    engine: Engine[BuildContext],
    tasks: Iterator[ChunkTask],
    sources: list[SourceFile],
    sink: ColumnSink,
    quarantine: Quarantine,
    tally: _Tally,
    merge_rows: int,
) -> None:
    """step_per_line: read every chunk's steps (an episode's steps may be anywhere in the
    inputs), then build whole episodes, one hash bucket of ids at a time (on Ray: the
    buckets are grouped by Ray Data, :func:`_group_on_ray`)."""
    from pipeline.ray_engine import RayEngine

    if isinstance(engine, RayEngine):
        _group_on_ray(engine, tasks, sources, sink, quarantine, tally, merge_rows)
        return
    steps = _Steps()
    for task, res in engine.map(step_chunk, tasks):
        src = sources[task.file_index]
        _take_chunk(src, res, quarantine, tally, steps.rejected)
        if res.steps is not None and len(res.steps):
            file_idx = np.full(len(res.steps), task.file_index, dtype=np.int64)
            steps.in_memory.append((res.steps, file_idx))
        for i, b in enumerate(res.buckets):
            assert res.spill is not None
            steps.spilled.setdefault(b, []).append((res.spill, i))
    ctx = engine.context
    if ctx.spill_dir is None or ctx.n_buckets == 1:  # one bucket: in global order already
        _append_bucket(engine, steps, sink, quarantine, tally)
    else:
        runs = _bucket_runs(engine, steps, sink.directory.parent, quarantine, tally)
        _merge_runs(runs, sink, ctx.source_names, merge_rows)
        for run in runs:
            shutil.rmtree(run.directory, ignore_errors=True)


def _append_bucket(
    engine: Engine[BuildContext],
    steps: _Steps,
    sink: ColumnSink,
    quarantine: Quarantine,
    tally: _Tally,
) -> None:
    """All the steps as one bucket, built here and appended to the store's columns."""
    if steps.in_memory:
        rows = ParsedSteps.concat([s for s, _ in steps.in_memory])
        file_idx = np.concatenate([f for _, f in steps.in_memory])
        steps.in_memory.clear()
    elif steps.spilled:
        rows, file_idx = load_bucket(steps.spilled[0])
    else:
        return
    res = bucket_transitions(engine.context, rows, file_idx, steps.rejected)
    _take_bucket(res, quarantine, tally)
    assert res.transitions is not None
    sink.append(res.transitions, engine.context.source_names)


def _bucket_runs(
    engine: Engine[BuildContext],
    steps: _Steps,
    work: Path,
    quarantine: Quarantine,
    tally: _Tally,
) -> list[ColumnFiles]:
    """Each spilled bucket built (by the engine) into a run of column files."""
    ctx = engine.context
    rejected = _rejected_by_bucket(steps.rejected, ctx.n_buckets)
    tasks = [
        BucketTask(b, parts, rejected[b], work / f"run-{b}")
        for b, parts in sorted(steps.spilled.items())
    ]
    runs: list[ColumnFiles] = []
    for _, res in engine.map(bucket_run, tasks):
        _take_bucket(res, quarantine, tally)
        assert res.run is not None
        runs.append(res.run)
    return runs


def _take_chunk(
    src: SourceFile,
    info: ChunkInfo,
    quarantine: Quarantine,
    tally: _Tally,
    rejected: dict[str, str],
) -> None:
    """A chunk's counts and rejected lines (chunks come in input order); ``rejected``: the
    ids those lines name, each with the first line that rejected it."""
    tally.add(src, info)
    quarantine.record_all(src, info.rejected)
    for r in info.rejected:
        if r.episode_id is not None:
            why = f"{src.display}:{r.line}: {r.reason}: {r.detail}"
            rejected.setdefault(r.episode_id, why)


def _rejected_by_bucket(rejected: dict[str, str], n_buckets: int) -> list[dict[str, str]]:
    """The rejected ids (id -> why) of each bucket."""
    out: list[dict[str, str]] = [{} for _ in range(n_buckets)]
    ids = list(rejected)
    for i, b in zip(ids, bucket_of(pl.Series(ids, dtype=pl.Utf8), n_buckets).tolist()):
        out[b][i] = rejected[i]
    return out


def _take_bucket(res: BucketResult, quarantine: Quarantine, tally: _Tally) -> None:
    tally.counts.update(res.counts)
    for d in res.deferred:
        quarantine.defer(*d)


def _group_on_ray(
    engine: RayEngine[BuildContext],
    tasks: Iterator[ChunkTask],
    sources: list[SourceFile],
    sink: ColumnSink,
    quarantine: Quarantine,
    tally: _Tally,
    merge_rows: int,
) -> None:
    """step_per_line on Ray: the chunks' step rows stay in the object store, keyed by
    bucket, while their infos come back here in input order (as :func:`_read_steps`
    takes them); then Ray Data groups the rows by bucket and each bucket's episodes are
    built on a worker by :func:`group_transitions` (:func:`bucket_transitions`, as the
    local engine's buckets). The results are taken in bucket order, and the buckets'
    transitions are appended or merged exactly as the local engine does, so the store is
    the same: one bucket is appended whole; several are written here as runs and merged
    in first-appearance order (:func:`_merge_runs`)."""
    from pipeline.ray_engine import KeyedRows

    ctx = engine.context
    rows = KeyedRows(BUCKET)
    rejected: dict[str, str] = {}
    for task, info in engine.map_rows(step_rows, tasks, rows):
        _take_chunk(sources[task.file_index], info, quarantine, tally, rejected)
    by_bucket = {
        b: GroupTask(b, ids) for b, ids in enumerate(_rejected_by_bucket(rejected, ctx.n_buckets))
    }
    work = sink.directory.parent
    results: dict[int, BucketResult] = {}
    runs: dict[int, ColumnFiles] = {}
    try:
        groups = engine.map_groups(rows, group_transitions, by_bucket, ctx.n_buckets)
        for b, res in groups:
            if res.run is not None:  # written by the worker (ctx.parts_dir)
                runs[b] = res.run
            elif ctx.n_buckets > 1:  # written as it comes: one bucket in memory at a time
                assert res.transitions is not None
                runs[b] = write_run(ctx, res.transitions, work / f"run-{b}")
                res.transitions = None
            results[b] = res
        for b in sorted(results):
            _take_bucket(results[b], quarantine, tally)
        if ctx.n_buckets == 1:
            for res in results.values():
                assert res.transitions is not None
                if res.parts is not None:
                    sink.append_written(res.transitions, res.parts, ctx.source_names)
                else:
                    sink.append(res.transitions, ctx.source_names)
        elif ctx.parts_dir is not None:
            _merge_on_workers(engine, [runs[b] for b in sorted(runs)], sink, merge_rows)
        else:
            _merge_runs([runs[b] for b in sorted(runs)], sink, ctx.source_names, merge_rows)
    finally:
        for run in runs.values():
            shutil.rmtree(run.directory, ignore_errors=True)


def _merge_on_workers(
    engine: Engine[BuildContext], runs: list[ColumnFiles], sink: ColumnSink, window_rows: int
) -> None:
    """:func:`_merge_runs` with each window's transitions written as parts by a worker
    (:func:`merge_parts`): the windows, and so the statistics, are the local engine's."""
    bare = [dataclasses.replace(run, episodes=[]) for run in runs]  # the windows carry theirs
    windows = merge_windows(runs, window_rows)
    tasks = (MergeTask(window, bare) for window in windows)
    for _, res in engine.map(merge_parts, tasks):
        sink.append_written(res.transitions, res.parts, engine.context.source_names)


# --------------------------------------------------------------------------- merge


def _merge_runs(
    runs: list[ColumnFiles], sink: ColumnSink, names: list[str], window_rows: int
) -> None:
    """Merge per-bucket runs (each in first-appearance order) into ``sink`` in global
    first-appearance order, a window of about ``window_rows`` rows at a time (bounded
    memory; :func:`merge_windows`, :func:`window_transitions`)."""
    for window in merge_windows(runs, window_rows):
        sink.append(window_transitions(runs, window, sink.reward_names), names)


# --------------------------------------------------------------------------- finish


def _check_outcome(
    spec: TransitionSpec,
    spec_path: str | Path,
    sources: list[SourceFile],
    sink: ColumnSink,
    quarantine: Quarantine,
    max_bad_fraction: float | None,
    staging: Path,
    out: Path,
) -> None:
    """BuildError when too much was quarantined, or nothing could be built."""
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


def _write_store(
    spec: TransitionSpec,
    raw_spec_sha: str,
    spec_path: str | Path,
    sources: list[SourceFile],
    sink: ColumnSink,
    quarantine: Quarantine,
    tally: _Tally,
    staging: Path,
) -> dict[str, Any]:
    """The data files in the store format, the spec copy, and the manifest (returned)."""
    episodes = sink.episodes_table()
    for ep_row in sink.episodes:
        ep_row.pop("_key", None)
    parted: dict[str, Any] = {}  # only in a parted store's manifest
    if spec.store.format == "arrow":
        part_rows = spec.store.rows_per_part(sink.rows)
        if sink.parts:  # written by the tasks (and hashed as they came): put in place
            assert part_rows is not None
            parts = _publish_parts(sink, staging)
            parted[PARTS_KEY] = {"part_rows": part_rows, "parts": parts}
            data_files = [part["file"] for part in parts]
        elif part_rows is None:
            write_arrow_transitions(sink, staging / TRANSITIONS_ARROW)
            data_files = [TRANSITIONS_ARROW]
        else:
            parts = write_arrow_parts(sink, staging, part_rows)
            parted[PARTS_KEY] = {"part_rows": part_rows, "parts": parts}
            data_files = [part["file"] for part in parts]
        write_arrow_table(episodes, staging / EPISODES_ARROW)
        data_files += [EPISODES_ARROW, QUARANTINE]
    else:
        write_zarr(sink, episodes, staging / ZARR_GROUP)
        data_files = [QUARANTINE]
    content = combine_digests(
        sink.column_digests(), episodes_digest(episodes), file_digest(staging / QUARANTINE)
    )
    shutil.copyfile(spec_path, staging / SPEC_COPY)
    return _manifest(
        spec,
        raw_spec_sha,
        spec_path,
        sources,
        sink,
        episodes,
        quarantine,
        tally.counts,
        content,
        data_files,
        staging,
        tally.steps_read,
        parted,
    )


def _publish_parts(sink: ColumnSink, staging: Path) -> list[dict[str, Any]]:
    """The parts the tasks wrote (already read back and hashed, in row order, as they
    were taken: :meth:`ColumnSink.append_written`), renamed in that order to
    ``transitions/part-NNNNN.arrow``. Returns the manifest's list of parts."""
    (staging / TRANSITION_PARTS).mkdir(parents=True, exist_ok=True)
    listed: list[dict[str, Any]] = []
    for k, (path, rows) in enumerate(sink.parts):
        name = part_file(k)
        path.rename(staging / name)
        listed.append({"file": name, "rows": rows})
    return listed


# --------------------------------------------------------------------------- helpers


def _first_records(sources: list[SourceFile], limit: int = 200) -> list[Any]:
    """Up to ``limit`` parseable records from the start of the inputs (to infer shapes)."""
    out: list[Any] = []
    for src in sources:
        for chunk in iter_chunks(src, 1 << 20):
            for i in chunk.nonblank():
                try:
                    out.append(parse_line(chunk.line(int(i))))
                except Exception:  # noqa: BLE001 - a bad line: keep looking
                    continue
                if len(out) >= limit:
                    return out
            break
        src.sha256 = None  # iter_chunks was stopped early: the file is hashed in the build
    return out


class _Progress:
    """A bar of input bytes read (a compressed file counts when it is read to its end)."""

    def __init__(self, sources: list[SourceFile], enabled: bool) -> None:
        from tqdm import tqdm

        total = sum(s.size for s in sources)
        self._bar = tqdm(
            total=total, unit="B", unit_scale=True, desc="build", disable=not enabled, leave=False
        )
        self._read: dict[int, int] = {}

    def read(self, src: SourceFile, chunk: Chunk | FileRange) -> None:
        if src.path.suffix not in (".gz", ".zst"):
            n = chunk.length if isinstance(chunk, FileRange) else len(chunk.data)
            self._bar.update(n)
            self._read[src.index] = self._read.get(src.index, 0) + n

    def read_all(self, src: SourceFile) -> None:
        self._bar.update(max(0, src.size - self._read.get(src.index, 0)))

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


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
    if sink.reward_names:
        out["reward_columns"] = {
            name: sink.named_stats[name].to_dict(scalar=True) for name in sink.reward_names
        }
    return out


def _manifest(
    spec: TransitionSpec,
    raw_spec_sha: str,
    spec_path: str | Path,
    sources: list[SourceFile],
    sink: ColumnSink,
    episodes: pa.Table,
    q: Quarantine,
    counts: Counter[str],
    content: str,
    data_files: list[str],
    staging: Path,
    steps_read: int,
    parted: dict[str, Any],
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
    named: dict[str, Any] = {}
    if spec.fields.rewards:  # only in stores with named rewards: others keep their manifest
        named["reward_columns"] = {
            name: {"column": reward_column(name), "path": fp.path}
            for name, fp in spec.fields.rewards
        }
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
        "sources": [s.manifest_entry() for s in sources],
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
        **named,
        "statistics": _stats_dict(sink, episodes),
        "content_hash": content,
        "column_digests": sink.column_digests(),
        "data_files": {
            f: {"sha256": file_digest(staging / f), "bytes": (staging / f).stat().st_size}
            for f in data_files
        },
        **parted,
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
    return lines + quarantine_summary(m, result.path)
