"""Writing a transition store: a streaming column sink, then a single-batch assembly.

The build appends transitions, in final order, to one raw file per column in the
staging directory, hashing and summarising as it goes; memory holds one batch at a time.
The last step lays those columns out as the store format:

* arrow: an Arrow IPC *stream* with ONE record batch, so that every column is a single
  contiguous buffer and readers get zero-copy arrays. pyarrow's IPC writer lays it out
  from arrays over the memory-mapped column files, so the data is never held in memory;
  episode ids over 2 GiB in total make the id column ``large_string``. With
  ``store.part_rows`` the same batch is written as slices of that many rows, one stream
  file (of one batch) per part. On Ray the tasks write their own rows as parts
  (:func:`write_parts`, the same :func:`write_part`), and the sink takes their episodes
  and statistics and reads the parts back, in order, for the digests
  (:meth:`ColumnSink.append_written`, :func:`hash_parts`);
* zarr: a group with one array per column, written chunk by chunk.

The content hash is taken over the logical column bytes (format-independent), so an
arrow and a zarr store of the same input carry the same ``content_hash``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import polars as pl
import pyarrow as pa

from data_specs.schema import reward_column
from pipeline.transitions.episodes import Transitions
from pipeline.transitions.layout import TRANSITION_PARTS, part_file
from pipeline.transitions.stats import RunningStats, chunk_stats

COPY_ROWS = 1 << 16

# (name, numpy dtype, per-row width or 0 for a vector column, or "str")
SCALAR_COLUMNS = ("step", "reward", "terminated", "truncated", "return_to_go")


@dataclass
class ColumnInfo:
    name: str
    dtype: np.dtype
    width: int  # 0: one value per row; >0: fixed-size list of this width


def _str_parts(s: pl.Series) -> tuple[np.ndarray, bytes]:
    """(per-row byte lengths as int32, concatenated UTF-8 bytes) of a Utf8 series."""
    arr = s.to_arrow(compat_level=pl.CompatLevel.oldest())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    data = arr.buffers()[2]
    start, stop = int(offsets[0]), int(offsets[-1])
    blob = data.to_pybytes()[start:stop] if data is not None else b""
    return np.diff(offsets).astype(np.int32), blob


@dataclass
class ColumnSink:
    """Appends transitions to raw per-column files; keeps stats, hashes and episodes."""

    directory: Path
    obs_dim: int
    discrete: bool
    act_dim: int
    columns: list[ColumnInfo] = field(init=False)
    rows: int = 0
    episodes: list[dict[str, Any]] = field(default_factory=list)
    obs_stats: RunningStats = field(default_factory=RunningStats)
    act_stats: RunningStats = field(default_factory=RunningStats)
    reward_stats: RunningStats = field(default_factory=RunningStats)
    rtg_stats: RunningStats = field(default_factory=RunningStats)
    string_bytes: int = 0
    track: bool = True  # statistics and content digests (off for intermediate runs)
    # the spec's named rewards (fields.rewards): one float32 column reward_NAME each, after
    # the fixed columns, and one float64 column dropped_reward_NAME each in the episodes
    reward_names: tuple[str, ...] = ()
    named_stats: dict[str, RunningStats] = field(default_factory=dict)
    # parts written by the tasks themselves (append_written), in row order: (file, rows)
    parts: list[tuple[Path, int]] = field(default_factory=list)
    _appended: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.columns = sink_columns(self.obs_dim, self.discrete, self.act_dim, self.reward_names)
        self.named_stats = {name: RunningStats() for name in self.reward_names}
        self._files: dict[str, BinaryIO] = {
            c.name: (self.directory / f"{c.name}.bin").open("wb") for c in self.columns
        }
        self._files["episode_id.utf8"] = (self.directory / "episode_id.utf8").open("wb")
        self._hash = {c.name: column_hasher(c) for c in self.columns}

    def append(self, tr: Transitions, source_names: list[str]) -> None:
        if len(tr) == 0 and tr.n_episodes == 0:
            return
        if self.parts:
            raise ValueError("a sink takes rows or written parts, not both")
        self._appended = True
        values = row_values(tr, self.columns, self.reward_names)
        blob = values.pop("episode_id.utf8").tobytes()
        self.string_bytes += len(blob)
        for c in self.columns:
            arr = values[c.name]
            self._files[c.name].write(arr.reshape(-1).data.cast("B"))
            if self.track:
                self._hash[c.name].update(arr)
        self._files["episode_id.utf8"].write(blob)
        if self.track:
            self._hash["episode_id"].update_bytes(blob)
        self._take_episodes(tr, len(tr), source_names)

    def append_written(self, tr: Transitions, parts: WrittenParts, source_names: list[str]) -> None:
        """Transitions that a task wrote itself as part files (:func:`write_parts`), after
        the ones taken so far: ``tr`` holds their episodes and statistics (its rows may be
        left out), ``parts`` the files, which are read back now to feed the column digests
        (:func:`hash_parts`), so the hashing keeps pace with the tasks."""
        if self._appended:
            raise ValueError("a sink takes rows or written parts, not both")
        paths = [parts.directory / name for name in parts.files]
        if self.track:
            hash_parts(self, paths)
        self.parts += list(zip(paths, parts.rows))
        self._take_episodes(tr, sum(parts.rows), source_names)

    def _take_episodes(self, tr: Transitions, rows: int, source_names: list[str]) -> None:
        """The statistics and episodes of ``rows`` transitions, appended after the others."""
        if self.track:
            st = tr.stats  # summarised where the chunk was built (stats.chunk_stats)
            if st is None:
                st = chunk_stats(
                    tr.observation, tr.action, tr.reward, tr.return_to_go, tr.named_reward
                )
            self.obs_stats.merge(st.observation)
            if not self.discrete:
                self.act_stats.merge(st.action)
            self.reward_stats.merge(st.reward)
            self.rtg_stats.merge(st.return_to_go)
            for k, name in enumerate(self.reward_names):
                self.named_stats[name].merge(st.named[k])
        starts = self.rows + np.concatenate([[0], np.cumsum(tr.ep_length)[:-1]]).astype(np.int64)
        dropped_named = tr.ep_dropped_named
        if dropped_named is None:
            dropped_named = np.zeros((tr.n_episodes, len(self.reward_names)))
        for i, eid in enumerate(tr.ep_id.to_list()):
            self.episodes.append(
                {
                    "_key": int((int(tr.ep_file[i]) << 40) + int(tr.ep_line[i])),
                    "episode_id": eid,
                    "start": int(starts[i]),
                    "length": int(tr.ep_length[i]),
                    "return": float(tr.ep_return[i]),
                    "dropped_reward": float(tr.ep_dropped_reward[i]),
                    "last_step_dropped": bool(tr.ep_last_step_dropped[i]),
                    "terminated": bool(tr.ep_terminated[i]),
                    "truncated": bool(tr.ep_truncated[i]),
                    "source_file": source_names[int(tr.ep_file[i])],
                    "source_line": int(tr.ep_line[i]),
                    **{
                        f"dropped_{reward_column(name)}": float(dropped_named[i, k])
                        for k, name in enumerate(self.reward_names)
                    },
                }
            )
        self.rows += rows

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def column_digests(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self._hash.items()}

    def read_column(self, c: ColumnInfo, start: int, stop: int) -> np.ndarray:
        return read_column(self.directory, c, start, stop)

    def files(self) -> ColumnFiles:
        """What a merge needs of a closed sink (picklable: it crosses processes)."""
        return ColumnFiles(self.directory, self.columns, self.episodes, self.rows)

    def episodes_table(self) -> pa.Table:
        e = self.episodes
        return pa.Table.from_pydict(
            {
                "episode_id": pa.array([x["episode_id"] for x in e], pa.string()),
                "start": pa.array([x["start"] for x in e], pa.int64()),
                "length": pa.array([x["length"] for x in e], pa.int64()),
                "return": pa.array([x["return"] for x in e], pa.float64()),
                "dropped_reward": pa.array([x["dropped_reward"] for x in e], pa.float64()),
                "last_step_dropped": pa.array([x["last_step_dropped"] for x in e], pa.bool_()),
                "terminated": pa.array([x["terminated"] for x in e], pa.bool_()),
                "truncated": pa.array([x["truncated"] for x in e], pa.bool_()),
                "source_file": pa.array([x["source_file"] for x in e], pa.string()),
                "source_line": pa.array([x["source_line"] for x in e], pa.int64()),
                **{
                    key: pa.array([x[key] for x in e], pa.float64())
                    for key in (f"dropped_{reward_column(n)}" for n in self.reward_names)
                },
            }
        )


def _named(tr: Transitions, names: tuple[str, ...]) -> np.ndarray:
    """(N, K) float32: the transitions' named rewards, checked against the sink's names."""
    if not names:
        return np.zeros((len(tr), 0), dtype=np.float32)
    if tr.named_reward is None or tr.named_reward.shape != (len(tr), len(names)):
        shape = None if tr.named_reward is None else tr.named_reward.shape
        raise ValueError(f"named rewards of shape {shape}, expected {(len(tr), len(names))}")
    return tr.named_reward


def sink_columns(
    obs_dim: int, discrete: bool, act_dim: int, reward_names: tuple[str, ...] = ()
) -> list[ColumnInfo]:
    """The columns of a store, in order, as a sink writes and hashes them."""
    d, a = obs_dim, act_dim
    return [
        ColumnInfo("episode_id", np.dtype(np.int32), -1),
        ColumnInfo("step", np.dtype(np.int32), 0),
        ColumnInfo("observation", np.dtype(np.float32), d),
        ColumnInfo(
            "action",
            np.dtype(np.int64) if discrete else np.dtype(np.float32),
            0 if discrete else a,
        ),
        ColumnInfo("reward", np.dtype(np.float32), 0),
        ColumnInfo("next_observation", np.dtype(np.float32), d),
        ColumnInfo("terminated", np.dtype(np.uint8), 0),
        ColumnInfo("truncated", np.dtype(np.uint8), 0),
        ColumnInfo("return_to_go", np.dtype(np.float32), 0),
        *(ColumnInfo(reward_column(name), np.dtype(np.float32), 0) for name in reward_names),
    ]


def row_values(
    tr: Transitions, columns: list[ColumnInfo], reward_names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Each column of ``tr``'s rows as the contiguous array of its canonical dtype (what is
    written and hashed): the ids as int32 byte lengths, their UTF-8 bytes under
    ``episode_id.utf8`` (uint8)."""
    lengths, blob = _str_parts(tr.episode_id)
    values = {
        "episode_id": lengths,
        "step": tr.step,
        "observation": tr.observation,
        "action": tr.action,
        "reward": tr.reward,
        "next_observation": tr.next_observation,
        "terminated": tr.terminated.astype(np.uint8),
        "truncated": tr.truncated.astype(np.uint8),
        "return_to_go": tr.return_to_go,
    }
    named = _named(tr, reward_names)
    for k, name in enumerate(reward_names):
        values[reward_column(name)] = named[:, k]
    out = {c.name: np.ascontiguousarray(values[c.name], dtype=c.dtype) for c in columns}
    out["episode_id.utf8"] = np.frombuffer(blob, dtype=np.uint8)
    return out


def read_column(directory: Path, c: ColumnInfo, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the raw column file of ``c`` in ``directory``."""
    width = max(c.width, 1)
    item = c.dtype.itemsize * width
    with (directory / f"{c.name}.bin").open("rb") as f:
        f.seek(start * item)
        buf = f.read((stop - start) * item)
    arr = np.frombuffer(buf, dtype=c.dtype)
    return arr.reshape(-1, width) if c.width > 0 else arr


@dataclass
class ColumnFiles:
    """The column files and episode rows of a closed :class:`ColumnSink` (a spilled run)."""

    directory: Path
    columns: list[ColumnInfo]
    episodes: list[dict[str, Any]]
    rows: int

    def read_column(self, c: ColumnInfo, start: int, stop: int) -> np.ndarray:
        return read_column(self.directory, c, start, stop)


# --------------------------------------------------------------------------- hashing


class _ColumnHash:
    """sha256 over a column's canonical bytes: little-endian values in row order; booleans
    as one byte 0/1; strings as int32 byte lengths then UTF-8 bytes (two hashers)."""

    def __init__(self, c: ColumnInfo) -> None:
        self.c = c
        self.h = hashlib.sha256(f"{c.name}|{c.dtype.str}|{c.width}".encode())
        self.h2 = hashlib.sha256() if c.width < 0 else None

    def update(self, arr: np.ndarray) -> None:
        if arr.size:
            self.h.update(np.ascontiguousarray(arr).reshape(-1).data.cast("B"))

    def update_bytes(self, b: bytes) -> None:
        assert self.h2 is not None
        self.h2.update(b)

    def hexdigest(self) -> str:
        if self.h2 is None:
            return self.h.hexdigest()
        return hashlib.sha256((self.h.hexdigest() + self.h2.hexdigest()).encode()).hexdigest()


def column_hasher(c: ColumnInfo) -> _ColumnHash:
    return _ColumnHash(c)


# Columns of episodes.arrow that say where an episode came from, not what it is: the
# content hash leaves them out, so the same data read from another file or format (a log
# moved elsewhere, a Minari dataset exported from a store) hashes the same.
PROVENANCE_COLUMNS = ("source_file", "source_line")


def episodes_digest(table: pa.Table) -> str:
    """sha256 of the episodes table's values, column by column, less its provenance."""
    h = hashlib.sha256()
    for name in table.column_names:
        if name in PROVENANCE_COLUMNS:
            continue
        col = table.column(name).to_pylist()
        h.update(name.encode() + b"=" + repr(col).encode())
    return h.hexdigest()


def combine_digests(columns: dict[str, str], episodes: str, quarantine: str) -> str:
    h = hashlib.sha256()
    for name in sorted(columns):
        h.update(f"column {name} {columns[name]}\n".encode())
    h.update(f"episodes {episodes}\nquarantine {quarantine}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- arrow

STRING_BYTES_LIMIT = 2**31 - 1  # the most bytes a `string` column holds (int32 offsets)
_WRITE_STEP = 16 << 20  # bytes written (then dropped from the column mapping) at a time


def transition_schema(
    obs_dim: int,
    discrete: bool,
    act_dim: int,
    large_ids: bool = False,
    reward_names: tuple[str, ...] = (),
) -> pa.Schema:
    """The schema of ``transitions.arrow``. ``large_ids``: the episode ids take more than
    2 GiB in total, so the column is ``large_string`` (64-bit offsets) instead of ``string``.
    ``reward_names``: the spec's named rewards, one float32 column ``reward_NAME`` each
    after ``return_to_go``."""
    act_type = pa.int64() if discrete else pa.list_(pa.float32(), act_dim)
    return pa.schema(
        [
            ("episode_id", pa.large_string() if large_ids else pa.string()),
            ("step", pa.int32()),
            ("observation", pa.list_(pa.float32(), obs_dim)),
            ("action", act_type),
            ("reward", pa.float32()),
            ("next_observation", pa.list_(pa.float32(), obs_dim)),
            ("terminated", pa.bool_()),
            ("truncated", pa.bool_()),
            ("return_to_go", pa.float32()),
            *((reward_column(name), pa.float32()) for name in reward_names),
        ]
    )


def write_arrow_transitions(sink: ColumnSink, path: Path) -> None:
    """The sink's columns as ONE record batch in the Arrow IPC stream file ``path``.

    pyarrow's IPC writer lays the batch out from arrays whose buffers are the column files
    memory-mapped (plus two small files derived here: the id offsets and the booleans
    packed to bits), so no column is read into memory: the writer copies each buffer from
    the page cache to the file, and the pages of a mapping are dropped as soon as they are
    written (:class:`_DroppingFile`). Memory stays bounded whatever the store's size."""
    with _Mappings() as maps:
        _write_batches(sink, _sink_schema(sink), maps, [(path, 0, sink.rows)])


def write_arrow_parts(sink: ColumnSink, store: Path, part_rows: int) -> list[dict[str, Any]]:
    """The sink's rows cut in parts of ``part_rows`` (the last one holds the rest), each
    ONE record batch in its own Arrow IPC stream file ``store/transitions/part-NNNNN.arrow``
    with the schema of ``transitions.arrow``, laid out as :func:`write_arrow_transitions`
    lays out the whole. Parts cut the rows by count alone: an episode may go on in the next
    part. Returns ``[{"file": store-relative path, "rows": n}]`` in row order."""
    if part_rows < 1:
        raise ValueError(f"part_rows must be >= 1, got {part_rows}")
    (store / TRANSITION_PARTS).mkdir(parents=True, exist_ok=True)
    cuts = [
        (k, a, min(a + part_rows, sink.rows)) for k, a in enumerate(range(0, sink.rows, part_rows))
    ]
    with _Mappings() as maps:
        _write_batches(
            sink, _sink_schema(sink), maps, [(store / part_file(k), a, b) for k, a, b in cuts]
        )
    return [{"file": part_file(k), "rows": b - a} for k, a, b in cuts]


def _sink_schema(sink: ColumnSink) -> pa.Schema:
    large = sink.string_bytes > STRING_BYTES_LIMIT
    return transition_schema(
        sink.obs_dim, sink.discrete, sink.act_dim, large_ids=large, reward_names=sink.reward_names
    )


def _write_batches(
    sink: ColumnSink, schema: pa.Schema, maps: _Mappings, files: list[tuple[Path, int, int]]
) -> None:
    """Rows ``[start, stop)`` of the sink's batch into each ``(path, start, stop)`` of
    ``files`` (a slice of the batch: the IPC writer writes only the slice's bytes)."""
    arrays = [_column_array(sink, c, f.type, maps) for c, f in zip(sink.columns, schema)]
    batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
    for path, start, stop in files:
        write_part(path, batch.slice(start, stop - start), maps)
    # the arrays (and so the exported mappings) are released when this frame ends


def write_part(path: Path, batch: pa.RecordBatch, maps: _Mappings | None = None) -> None:
    """``batch`` as ONE record batch in the Arrow IPC stream file ``path`` (a part, or the
    whole of ``transitions.arrow``); ``maps``: the mappings its buffers are views of, whose
    pages are dropped as they are written (:class:`_DroppingFile`)."""
    with (
        _DroppingFile(path, maps) as out,
        pa.PythonFile(out, mode="w") as f,
        pa.ipc.new_stream(f, batch.schema) as w,
    ):
        w.write_batch(batch)


@dataclass
class WrittenParts:
    """Part files a task wrote itself (:func:`write_parts`), in row order."""

    directory: Path
    files: list[str] = field(default_factory=list)  # names in ``directory``
    rows: list[int] = field(default_factory=list)  # rows of each


def transitions_batch(
    tr: Transitions, obs_dim: int, discrete: bool, act_dim: int, reward_names: tuple[str, ...]
) -> pa.RecordBatch:
    """``tr``'s rows as one record batch of the store's schema (:func:`transition_schema`,
    ids as ``string``), the values as a sink writes and hashes them (:func:`row_values`)."""
    columns = sink_columns(obs_dim, discrete, act_dim, reward_names)
    values = row_values(tr, columns, reward_names)
    blob = values.pop("episode_id.utf8")
    large = False  # every part of a store has the same schema: no part holds 2 GiB of ids
    if len(blob) > STRING_BYTES_LIMIT:
        raise ValueError(
            f"{len(tr)} rows hold {len(blob)} bytes of episode ids, more than a part's "
            "id column holds (2 GiB); lower store.part_rows"
        )
    schema = transition_schema(obs_dim, discrete, act_dim, large, reward_names)
    n = len(tr)
    arrays = []
    for c, f in zip(columns, schema):
        arr = values[c.name]
        if c.name == "episode_id":
            ends = np.cumsum(arr, dtype=np.int64)
            offsets = np.concatenate([[0], ends]).astype(np.int64 if large else np.int32)
            bufs = [None, pa.py_buffer(offsets), pa.py_buffer(blob)]
            arrays.append(pa.Array.from_buffers(f.type, n, bufs))
        elif pa.types.is_boolean(f.type):
            arrays.append(pa.array(arr.astype(bool), pa.bool_()))
        elif pa.types.is_fixed_size_list(f.type):
            flat = pa.array(arr.reshape(-1), f.type.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, f.type.list_size))
        else:
            arrays.append(pa.array(arr, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_parts(
    tr: Transitions,
    obs_dim: int,
    discrete: bool,
    act_dim: int,
    reward_names: tuple[str, ...],
    directory: Path,
    stem: str,
    part_rows: int,
) -> WrittenParts:
    """``tr``'s rows as parts of at most ``part_rows`` rows, ``directory/STEM-K.arrow``
    (K = 0, 1, ...), each ONE record batch (:func:`write_part`). Each file is written
    under a temporary name, then renamed: a file is whole or absent, and writing the same
    rows again writes the same bytes under the same names."""
    if part_rows < 1:
        raise ValueError(f"part_rows must be >= 1, got {part_rows}")
    directory.mkdir(parents=True, exist_ok=True)
    out = WrittenParts(directory)
    if len(tr) == 0:
        return out
    batch = transitions_batch(tr, obs_dim, discrete, act_dim, reward_names)
    for k, start in enumerate(range(0, len(tr), part_rows)):
        name = f"{stem}-{k:05d}.arrow"
        n = min(part_rows, len(tr) - start)
        partial = directory / f"{name}.{os.getpid()}.partial"
        write_part(partial, batch.slice(start, n))
        os.replace(partial, directory / name)
        out.files.append(name)
        out.rows.append(n)
    return out


def arrow_string_parts(arr: pa.Array) -> tuple[np.ndarray, bytes]:
    """(int32 byte length of each value, their UTF-8 bytes back to back) of a string array."""
    wide = pa.types.is_large_string(arr.type)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if wide else np.int32)
    offsets = offsets[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    blob = b"" if data is None else data.to_pybytes()[int(offsets[0]) : int(offsets[-1])]
    return np.diff(offsets).astype(np.int32), blob


def hash_parts(sink: ColumnSink, paths: list[Path]) -> None:
    """Feed the sink's column hashers the rows of the part files ``paths``, in order, read
    back memory-mapped: the bytes :meth:`ColumnSink.append` would have hashed for the same
    rows (so the column digests are the same); the ids' bytes are counted as it counts them."""
    for path in paths:
        with pa.memory_map(str(path), "r") as source:
            batch = pa.ipc.open_stream(source).read_next_batch()
            for c in sink.columns:
                arr = batch.column(c.name)
                h = sink._hash[c.name]
                if c.name == "episode_id":
                    lengths, blob = arrow_string_parts(arr)
                    h.update(lengths)
                    h.update_bytes(blob)
                    sink.string_bytes += len(blob)
                    continue
                if pa.types.is_fixed_size_list(arr.type):
                    arr = arr.flatten()  # the values of this array's rows (its offset too)
                h.update(np.ascontiguousarray(arr.to_numpy(zero_copy_only=False), c.dtype))
            del batch, arr


def _column_array(sink: ColumnSink, c: ColumnInfo, typ: pa.DataType, maps: _Mappings) -> pa.Array:
    """One column as an array over memory-mapped files (zero copy)."""
    n = sink.rows
    d = sink.directory
    if c.name == "episode_id":
        offsets = _write_offsets(sink, c, large=pa.types.is_large_string(typ))
        return pa.Array.from_buffers(
            typ, n, [None, maps.open(offsets), maps.open(d / "episode_id.utf8")]
        )
    if pa.types.is_boolean(typ):
        return pa.Array.from_buffers(typ, n, [None, maps.open(_write_bits(sink, c))])
    data = maps.open(d / f"{c.name}.bin")
    expected = n * c.dtype.itemsize * max(c.width, 1)
    if data.size != expected:
        raise ValueError(f"{d / c.name}.bin: {data.size} bytes, expected {expected}")
    if pa.types.is_fixed_size_list(typ):
        values = pa.Array.from_buffers(typ.value_type, n * typ.list_size, [None, data])
        return pa.FixedSizeListArray.from_arrays(values, typ.list_size)
    return pa.Array.from_buffers(typ, n, [None, data])


def _write_offsets(sink: ColumnSink, c: ColumnInfo, large: bool) -> Path:
    """The Arrow offsets of the id column (int32, or int64 for ``large_string``), from the
    per-row byte lengths, a block of rows at a time."""
    path = sink.directory / "episode_id.offsets"
    dtype = np.int64 if large else np.int32
    carry = 0
    with path.open("wb") as f:
        f.write(np.zeros(1, dtype).tobytes())
        for start, stop in _ranges(sink.rows, COPY_ROWS):
            ends = carry + np.cumsum(sink.read_column(c, start, stop), dtype=np.int64)
            f.write(ends.astype(dtype).tobytes())
            carry = int(ends[-1])
    return path


def _write_bits(sink: ColumnSink, c: ColumnInfo) -> Path:
    """A 0/1 byte column packed to Arrow's bitmap (least significant bit first)."""
    path = sink.directory / f"{c.name}.bits"
    with path.open("wb") as f:
        for start, stop in _ranges(sink.rows, COPY_ROWS):  # COPY_ROWS is a multiple of 8
            f.write(np.packbits(sink.read_column(c, start, stop), bitorder="little").tobytes())
    return path


class _Mappings:
    """Read-only memory maps of column files, handed to pyarrow as zero-copy buffers."""

    def __init__(self) -> None:
        self._maps: list[tuple[int, int, mmap.mmap]] = []  # (address, size, map)

    def open(self, path: Path) -> pa.Buffer:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return pa.py_buffer(b"")
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        buf = pa.py_buffer(mm)
        self._maps.append((buf.address, size, mm))
        return buf

    def drop(self, address: int, size: int) -> None:
        """Drop the pages of ``[address, address + size)`` from whichever mapping holds
        them (the data stays in the page cache and is read again if touched)."""
        for base, length, mm in self._maps:
            if base <= address < base + length:
                start = (address - base) // mmap.PAGESIZE * mmap.PAGESIZE
                stop = min(address - base + size, length)
                mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
                return

    def __enter__(self) -> _Mappings:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, _, mm in self._maps:
            mm.close()
        self._maps.clear()


class _DroppingFile:
    """The file the IPC writer writes to: buffers are written a step at a time, and the
    part of a column mapping just written is dropped from this process's memory."""

    closed = False

    def __init__(self, path: Path, maps: _Mappings | None) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._maps = maps
        self._pos = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        address = data.address if isinstance(data, pa.Buffer) else None
        for start in range(0, view.nbytes, _WRITE_STEP):
            piece = view[start : start + _WRITE_STEP]
            done = 0
            while done < len(piece):
                done += os.write(self._fd, piece[done:])
            if address is not None and self._maps is not None:
                self._maps.drop(address + start, len(piece))
        self._pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            os.fsync(self._fd)
            os.close(self._fd)
            self.closed = True

    def __enter__(self) -> _DroppingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ranges(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(n, start + step)


# --------------------------------------------------------------------------- zarr


def write_zarr(sink: ColumnSink, episodes: pa.Table, path: Path) -> None:
    import zarr

    root = zarr.open_group(str(path), mode="w")
    tg = root.create_group("transitions")
    n = sink.rows
    chunk = COPY_ROWS
    for c in sink.columns:
        if c.name == "episode_id":
            arr = tg.create_array("episode_id", shape=(n,), chunks=(chunk,), dtype=str)
            carry = 0
            with (sink.directory / "episode_id.utf8").open("rb") as f:
                for start, stop in _ranges(n, chunk):
                    lengths = sink.read_column(c, start, stop).astype(np.int64)
                    blob = f.read(int(lengths.sum()))
                    cut = np.concatenate([[0], np.cumsum(lengths)])
                    arr[start:stop] = np.array(
                        [blob[cut[i] : cut[i + 1]].decode("utf-8") for i in range(len(lengths))],
                        dtype=object,
                    )
                    carry += len(blob)
            continue
        dtype = np.dtype(bool) if c.name in ("terminated", "truncated") else c.dtype
        shape = (n, c.width) if c.width > 0 else (n,)
        chunks = (chunk, c.width) if c.width > 0 else (chunk,)
        arr = tg.create_array(c.name, shape=shape, chunks=chunks, dtype=dtype)
        for start, stop in _ranges(n, chunk):
            arr[start:stop] = sink.read_column(c, start, stop).astype(dtype)
    eg = root.create_group("episodes")
    for name in episodes.column_names:
        col = episodes.column(name)
        if pa.types.is_string(col.type):
            values: np.ndarray = np.array(col.to_pylist(), dtype=object)
            a = eg.create_array(
                name, shape=(len(values),), chunks=(max(len(values), 1),), dtype=str
            )
        else:
            values = col.to_numpy()
            a = eg.create_array(
                name, shape=values.shape, chunks=(max(len(values), 1),), dtype=values.dtype
            )
        if len(values):
            a[:] = values
