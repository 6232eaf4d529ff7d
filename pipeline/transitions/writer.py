"""Writing a transition store: a streaming column sink, then a single-batch assembly.

The build appends transitions, in final order, to one raw file per column in the
staging directory, hashing and summarising as it goes; memory holds one batch at a time.
The last step lays those columns out as the store format:

* arrow: an Arrow IPC *stream* with ONE record batch, so that every column is a single
  contiguous buffer and readers get zero-copy arrays. It is written without holding the
  data in memory: first a batch of the right shape whose buffers are untouched zero
  pages (they cost no memory), then each column's bytes are copied into its place in
  the file, found from the buffer addresses of the memory-mapped result;
* zarr: a group with one array per column, written chunk by chunk.

The content hash is taken over the logical column bytes (format-independent), so an
arrow and a zarr store of the same input carry the same ``content_hash``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.transitions.episodes import Transitions

COPY_ROWS = 1 << 16

# (name, numpy dtype, per-row width or 0 for a vector column, or "str")
SCALAR_COLUMNS = ("step", "reward", "terminated", "truncated", "return_to_go")


@dataclass
class ColumnInfo:
    name: str
    dtype: np.dtype
    width: int  # 0: one value per row; >0: fixed-size list of this width


@dataclass
class RunningStats:
    """Per-feature mean/std/min/max in float64, merged batch by batch (Chan et al.)."""

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        if x.ndim == 1:
            x = x[:, None]
        nb = len(x)
        lo, hi = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
        xd = x.astype(np.float64)
        mb = xd.mean(axis=0)
        np.subtract(xd, mb, out=xd)
        np.square(xd, out=xd)
        m2b = xd.sum(axis=0)
        if self.mean is None or self.m2 is None or self.lo is None or self.hi is None:
            self.n, self.mean, self.m2, self.lo, self.hi = nb, mb, m2b, lo, hi
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / n
        self.m2 = self.m2 + m2b + delta**2 * self.n * nb / n
        self.n = n
        self.lo = np.minimum(self.lo, lo)
        self.hi = np.maximum(self.hi, hi)

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

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        d, a = self.obs_dim, self.act_dim
        self.columns = [
            ColumnInfo("episode_id", np.dtype(np.int32), -1),
            ColumnInfo("step", np.dtype(np.int32), 0),
            ColumnInfo("observation", np.dtype(np.float32), d),
            ColumnInfo(
                "action",
                np.dtype(np.int64) if self.discrete else np.dtype(np.float32),
                0 if self.discrete else a,
            ),
            ColumnInfo("reward", np.dtype(np.float32), 0),
            ColumnInfo("next_observation", np.dtype(np.float32), d),
            ColumnInfo("terminated", np.dtype(np.uint8), 0),
            ColumnInfo("truncated", np.dtype(np.uint8), 0),
            ColumnInfo("return_to_go", np.dtype(np.float32), 0),
        ]
        self._files: dict[str, BinaryIO] = {
            c.name: (self.directory / f"{c.name}.bin").open("wb") for c in self.columns
        }
        self._files["episode_id.utf8"] = (self.directory / "episode_id.utf8").open("wb")
        self._hash = {c.name: column_hasher(c) for c in self.columns}

    def append(self, tr: Transitions, source_names: list[str]) -> None:
        if len(tr) == 0 and tr.n_episodes == 0:
            return
        lengths, blob = _str_parts(tr.episode_id)
        self.string_bytes += len(blob)
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
        for c in self.columns:
            arr = np.ascontiguousarray(values[c.name], dtype=c.dtype)
            self._files[c.name].write(arr.reshape(-1).data.cast("B"))
            if self.track:
                self._hash[c.name].update(arr)
        self._files["episode_id.utf8"].write(blob)
        if self.track:
            self._hash["episode_id"].update_bytes(blob)
            self.obs_stats.update(tr.observation)
            if not self.discrete:
                self.act_stats.update(tr.action)
            self.reward_stats.update(tr.reward)
            self.rtg_stats.update(tr.return_to_go)
        starts = self.rows + np.concatenate([[0], np.cumsum(tr.ep_length)[:-1]]).astype(np.int64)
        for i, eid in enumerate(tr.ep_id.to_list()):
            self.episodes.append(
                {
                    "_key": int((int(tr.ep_file[i]) << 40) + int(tr.ep_line[i])),
                    "episode_id": eid,
                    "start": int(starts[i]),
                    "length": int(tr.ep_length[i]),
                    "return": float(tr.ep_return[i]),
                    "terminated": bool(tr.ep_terminated[i]),
                    "truncated": bool(tr.ep_truncated[i]),
                    "source_file": source_names[int(tr.ep_file[i])],
                    "source_line": int(tr.ep_line[i]),
                }
            )
        self.rows += len(tr)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def column_digests(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self._hash.items()}

    def read_column(self, c: ColumnInfo, start: int, stop: int) -> np.ndarray:
        width = max(c.width, 1)
        item = c.dtype.itemsize * width
        with (self.directory / f"{c.name}.bin").open("rb") as f:
            f.seek(start * item)
            buf = f.read((stop - start) * item)
        arr = np.frombuffer(buf, dtype=c.dtype)
        return arr.reshape(-1, width) if c.width > 0 else arr

    def episodes_table(self) -> pa.Table:
        e = self.episodes
        return pa.Table.from_pydict(
            {
                "episode_id": pa.array([x["episode_id"] for x in e], pa.string()),
                "start": pa.array([x["start"] for x in e], pa.int64()),
                "length": pa.array([x["length"] for x in e], pa.int64()),
                "return": pa.array([x["return"] for x in e], pa.float64()),
                "terminated": pa.array([x["terminated"] for x in e], pa.bool_()),
                "truncated": pa.array([x["truncated"] for x in e], pa.bool_()),
                "source_file": pa.array([x["source_file"] for x in e], pa.string()),
                "source_line": pa.array([x["source_line"] for x in e], pa.int64()),
            }
        )


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


def episodes_digest(table: pa.Table) -> str:
    h = hashlib.sha256()
    for name in table.column_names:
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


def transition_schema(obs_dim: int, discrete: bool, act_dim: int) -> pa.Schema:
    act_type = pa.int64() if discrete else pa.list_(pa.float32(), act_dim)
    return pa.schema(
        [
            ("episode_id", pa.string()),
            ("step", pa.int32()),
            ("observation", pa.list_(pa.float32(), obs_dim)),
            ("action", act_type),
            ("reward", pa.float32()),
            ("next_observation", pa.list_(pa.float32(), obs_dim)),
            ("terminated", pa.bool_()),
            ("truncated", pa.bool_()),
            ("return_to_go", pa.float32()),
        ]
    )


def _zero_array(typ: pa.DataType, n: int, string_bytes: int = 0) -> pa.Array:
    """An array of the given shape whose buffers are fresh zero pages (no resident memory)."""
    if pa.types.is_string(typ):
        offsets = np.zeros(n + 1, dtype=np.int32)
        offsets[-1] = string_bytes  # the writer sizes the data buffer from the last offset
        return pa.StringArray.from_buffers(
            n, pa.py_buffer(offsets), pa.py_buffer(np.zeros(max(string_bytes, 1), np.uint8))
        )
    if pa.types.is_boolean(typ):
        return pa.BooleanArray.from_buffers(
            typ, n, [None, pa.py_buffer(np.zeros((n + 7) // 8 or 1, np.uint8))]
        )
    if pa.types.is_fixed_size_list(typ):
        inner = _zero_array(typ.value_type, n * typ.list_size)
        return pa.FixedSizeListArray.from_arrays(inner, typ.list_size)
    width = typ.bit_width // 8
    return pa.Array.from_buffers(
        typ, n, [None, pa.py_buffer(np.zeros(max(n * width, 1), np.uint8))]
    )


def _data_buffer(arr: pa.Array) -> pa.Buffer:
    if pa.types.is_fixed_size_list(arr.type):
        return _data_buffer(arr.values)
    return arr.buffers()[-1]


def write_arrow_transitions(sink: ColumnSink, path: Path) -> None:
    n = sink.rows
    if sink.string_bytes >= 2**31:
        raise ValueError("episode ids take over 2 GiB: not supported by a string column")
    schema = transition_schema(sink.obs_dim, sink.discrete, sink.act_dim)
    zeros = [_zero_array(f.type, n, sink.string_bytes) for f in schema]
    batch = pa.RecordBatch.from_arrays(zeros, schema=schema)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_batch(batch)
    del zeros, batch
    # Where did each buffer land in the file?
    mm = pa.memory_map(str(path), "r")
    whole = mm.read_buffer()
    table = pa.ipc.open_stream(whole).read_all()
    base = whole.address
    places: dict[str, list[tuple[int, int]]] = {}
    for name in table.column_names:
        arr = table.column(name).chunk(0)
        if name == "episode_id":
            bufs = arr.buffers()
            places[name] = [
                (bufs[1].address - base, bufs[1].size),
                (bufs[2].address - base, bufs[2].size),
            ]
        else:
            b = _data_buffer(arr)
            places[name] = [(b.address - base, b.size)]
    del table, whole
    mm.close()
    fd = os.open(str(path), os.O_WRONLY)
    try:
        for c in sink.columns:
            if c.name == "episode_id":
                _copy_strings(sink, c, fd, places[c.name])
            elif c.name in ("terminated", "truncated"):
                off, _ = places[c.name][0]
                for start, stop in _ranges(n, COPY_ROWS):  # COPY_ROWS is a multiple of 8
                    bits = np.packbits(sink.read_column(c, start, stop), bitorder="little")
                    os.pwrite(fd, bits.tobytes(), off + start // 8)
            else:
                off, _ = places[c.name][0]
                row_bytes = c.dtype.itemsize * max(c.width, 1)
                for start, stop in _ranges(n, COPY_ROWS):
                    os.pwrite(
                        fd, sink.read_column(c, start, stop).tobytes(), off + start * row_bytes
                    )
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_strings(sink: ColumnSink, c: ColumnInfo, fd: int, places: list[tuple[int, int]]) -> None:
    (off_pos, _), (data_pos, _) = places
    carry = 0
    for start, stop in _ranges(sink.rows, COPY_ROWS):
        lengths = sink.read_column(c, start, stop).astype(np.int64)
        offsets = (carry + np.cumsum(lengths)).astype(np.int32)
        if start == 0:
            os.pwrite(fd, np.zeros(1, np.int32).tobytes(), off_pos)
        os.pwrite(fd, offsets.tobytes(), off_pos + 4 * (start + 1))
        carry = int(carry + lengths.sum())
    with (sink.directory / "episode_id.utf8").open("rb") as f:
        pos = 0
        while block := f.read(16 << 20):
            os.pwrite(fd, block, data_pos + pos)
            pos += len(block)


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
