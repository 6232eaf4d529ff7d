"""The arrow layout of ``transitions.arrow``: one record batch laid out by pyarrow's IPC
writer from the memory-mapped column files, ``string`` ids or ``large_string`` past 2 GiB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import pipeline.transitions.writer as writer
from pipeline.store import open_store
from tests.pipeline.conftest import build_store, write_lines, write_spec

# ids of every byte length the offsets must get right: empty, ASCII, multi-byte UTF-8
IDS = ["", "a", "épisode-ü", "円周率", "x" * 300, "b"]


def _write_log(tmp_path: Path) -> Path:
    lines = []
    for e, eid in enumerate(IDS):
        n = 1 + e % 3
        for t in range(n):
            rec = {"ep": eid, "t": t, "obs": [e, t, 0.5], "act": t % 4, "rew": float(e)}
            rec.update(term=t == n - 1, trunc=False)
            lines.append(rec)
    write_lines(tmp_path / "raw" / "steps.jsonl", lines)
    return write_spec(tmp_path, [tmp_path / "raw" / "steps.jsonl"])


def _expected_ids() -> list[str]:
    return [eid for e, eid in enumerate(IDS) for _ in range(1 + e % 3)]


def _id_type(store: Path) -> pa.DataType:
    with pa.memory_map(str(store / "transitions.arrow")) as f:
        reader = pa.ipc.open_stream(f)
        assert len(list(reader)) == 1, "one record batch"
        return reader.schema.field("episode_id").type


def test_ids_of_any_length_round_trip(tmp_path: Path) -> None:
    store = build_store(_write_log(tmp_path), tmp_path / "out").path
    assert _id_type(store) == pa.string()
    s = open_store(store)
    assert s.episode_id.tolist() == _expected_ids()
    assert s.episodes.episode_id == IDS


def test_ids_over_the_string_limit_are_large_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past STRING_BYTES_LIMIT bytes of ids the column is large_string (64-bit offsets);
    every reader reads it the same, and the content hash (logical bytes) does not change."""
    spec = _write_log(tmp_path)
    small = build_store(spec, tmp_path / "small").path
    monkeypatch.setattr(writer, "STRING_BYTES_LIMIT", 10)  # the ids take 318 bytes
    large = build_store(spec, tmp_path / "large").path  # build_store also runs verify
    assert _id_type(large) == pa.large_string()
    a, b = open_store(small), open_store(large)
    assert b.content_hash == a.content_hash
    assert b.episode_id.tolist() == _expected_ids()
    np.testing.assert_array_equal(b.observations, a.observations)
    np.testing.assert_array_equal(b.terminated, a.terminated)
    frame = pl.read_ipc_stream(large / "transitions.arrow")
    assert frame.get_column("episode_id").to_list() == _expected_ids()


def test_the_batch_holds_the_column_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every column of the file equals the raw column file it was laid out from (the id
    offsets and packed booleans are derived a block of rows at a time: small blocks here)."""
    monkeypatch.setattr(writer, "COPY_ROWS", 16)
    sink = writer.ColumnSink(tmp_path / "cols", obs_dim=2, discrete=False, act_dim=3)
    sink.close()
    n = 77  # not a multiple of 8: the packed booleans end in a partial byte
    rng = np.random.default_rng(0)
    raw: dict[str, np.ndarray] = {}
    for c in sink.columns:
        if c.name == "episode_id":
            continue
        shape = (n, c.width) if c.width > 0 else (n,)
        if c.dtype == np.uint8:
            raw[c.name] = rng.integers(0, 2, size=shape).astype(np.uint8)
        else:
            raw[c.name] = rng.normal(size=shape).astype(c.dtype)
        raw[c.name].tofile(tmp_path / "cols" / f"{c.name}.bin")
    ids = [f"e{i % 5}" * (i % 3) for i in range(n)]
    encoded = [x.encode() for x in ids]
    np.array([len(b) for b in encoded], np.int32).tofile(tmp_path / "cols" / "episode_id.bin")
    (tmp_path / "cols" / "episode_id.utf8").write_bytes(b"".join(encoded))
    sink.rows, sink.string_bytes = n, sum(map(len, encoded))
    writer.write_arrow_transitions(sink, tmp_path / "t.arrow")
    with pa.memory_map(str(tmp_path / "t.arrow")) as f:
        table = pa.ipc.open_stream(f).read_all()
    assert table.column("episode_id").to_pylist() == ids
    for name, values in raw.items():
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            got = col.values.to_numpy().reshape(n, -1)
        else:
            got = col.to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(got, values.astype(got.dtype), err_msg=name)
