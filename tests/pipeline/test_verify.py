"""`pipeline.verify`: a store that holds what its manifest says passes; a corrupted,
truncated or tampered one fails with a message that names the problem."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.arrowio import file_digest
from pipeline.format import MANIFEST, QUARANTINE, StoreError
from pipeline.store import TransitionStore
from pipeline.transitions.layout import EPISODES_ARROW, TRANSITIONS_ARROW, ZARR_GROUP
from pipeline.transitions.verify import column_digests
from pipeline.transitions.writer import combine_digests, episodes_digest
from pipeline.verify import verify

from .conftest import (
    Episode,
    assert_one_error_line,
    build_store,
    run_cli,
    write_lines,
    write_spec,
)

EPISODES = [
    Episode("a", ((0.0, 1.0, 2.0), (3.0, 4.0, 5.0), (6.0, 7.0, 8.0)), (0, 1, 2), (1.0, 0.5, -1.0), "terminated"),
    Episode("b", ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0)), (3, 0), (0.25, 0.25), "truncated", (9.0, 9.0, 9.0)),
]  # fmt: skip


def make_store(d: Path, fmt: str = "arrow") -> Path:
    """Two episodes and one quarantined line."""
    raw = write_lines(d / "raw" / "a.jsonl", [*(e.episode_record() for e in EPISODES), b"not json"])
    spec = write_spec(d, [raw], layout="episode_per_line", fmt=fmt)
    return build_store(spec, d / "out").path


def read_table(store: Path) -> pa.Table:
    """The transitions, in memory (not a map of the file, which the tests overwrite)."""
    return pa.ipc.open_stream((store / TRANSITIONS_ARROW).read_bytes()).read_all()


def rewrite_consistently(store: Path, table: pa.Table) -> None:
    """Replace transitions.arrow and update every checksum in the manifest to match, so
    that only the semantic checks can tell."""
    path = store / TRANSITIONS_ARROW
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table.combine_chunks())
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    m["data_files"][TRANSITIONS_ARROW] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    reopened = TransitionStore(store)
    digests = column_digests(reopened)
    m["column_digests"] = digests
    episodes_table = pa.ipc.open_stream((store / EPISODES_ARROW).read_bytes()).read_all()
    episodes = episodes_digest(episodes_table)
    m["content_hash"] = combine_digests(digests, episodes, file_digest(store / QUARANTINE))
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")


def set_value(table: pa.Table, column: str, row: int, value: object) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(column)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


# rows: a = 0, 1, 2 (terminated); b = 3, 4 (truncated)
Tamper = Callable[[pa.Table], pa.Table]
TAMPERINGS: list[tuple[str, Tamper, str]] = [
    ("flag-on-inner-row", lambda t: set_value(t, "terminated", 0, True), "not the last of its episode"),
    ("both-flags", lambda t: set_value(t, "truncated", 2, True), "both terminated and truncated"),
    ("no-flag", lambda t: set_value(t, "terminated", 2, False), "neither terminated nor truncated"),
    ("next-obs", lambda t: set_value(t, "next_observation", 0, [0.0, 0.0, 0.0]), "next_observation differs"),
    ("return-to-go", lambda t: set_value(t, "return_to_go", 0, 42.0), "return_to_go: inconsistent"),
    ("action", lambda t: set_value(t, "action", 1, 99), "action: values outside"),
    ("nan-reward", lambda t: set_value(t, "reward", 3, float("nan")), "reward: non-finite"),
    ("step", lambda t: set_value(t, "step", 1, 7), "step: not 0..L-1"),
    ("episode-id", lambda t: set_value(t, "episode_id", 4, "a"), "episode_id: rows do not match"),
]  # fmt: skip


def test_a_built_store_verifies(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert verify(store) == []


@pytest.mark.parametrize(("name", "tamper", "message"), TAMPERINGS, ids=[t[0] for t in TAMPERINGS])
def test_invariants_are_checked_even_when_the_checksums_match(
    tmp_path: Path, name: str, tamper: Tamper, message: str
) -> None:
    store = make_store(tmp_path)
    rewrite_consistently(store, tamper(read_table(store)))
    problems = verify(store)
    assert any(message in p for p in problems), problems


def test_verify_cli_reports_every_broken_invariant(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    table = set_value(read_table(store), "terminated", 0, True)
    rewrite_consistently(store, set_value(table, "action", 1, 99))
    proc = run_cli("pipeline.verify", store)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines)
    assert any("not the last of its episode" in line for line in lines)
    assert any("action: values outside" in line for line in lines)


def test_rewriting_the_data_file_is_caught_by_the_content_hash(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    table = set_value(read_table(store), "reward", 0, 5.0)
    path = store / TRANSITIONS_ARROW
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    # someone "fixed" the file checksum but not the content digests
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    m["data_files"][TRANSITIONS_ARROW] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    problems = verify(store)
    assert any("column reward" in p for p in problems), problems
    assert any("content hash" in p for p in problems), problems


def test_corrupted_byte(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    path = store / TRANSITIONS_ARROW
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify(store)
    assert len(problems) == 1
    assert TRANSITIONS_ARROW in problems[0] and "sha256 differs" in problems[0]


@pytest.mark.parametrize("name", [TRANSITIONS_ARROW, "episodes.arrow", QUARANTINE])
def test_truncated_or_missing_file(tmp_path: Path, name: str) -> None:
    store = make_store(tmp_path)
    path = store / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    problems = verify(store)
    assert len(problems) == 1 and name in problems[0] and "truncated" in problems[0]
    path.unlink()
    problems = verify(store)
    assert len(problems) == 1 and name in problems[0] and "missing" in problems[0]


def test_manifest_counts_that_disagree_with_the_data(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    m["counts"]["transitions"] += 1
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(StoreError, match="truncated or replaced"):
        verify(store)
    assert_one_error_line(run_cli("pipeline.verify", store), "manifest says")


def zarr_array(store: Path, name: str) -> object:
    import zarr

    return zarr.open_group(str(store / ZARR_GROUP), mode="r+")["transitions"][name]  # type: ignore[index]


def test_zarr_store_changed_value_is_caught(tmp_path: Path) -> None:
    store = make_store(tmp_path, fmt="zarr")
    assert verify(store) == []
    arr = zarr_array(store, "reward")
    values = np.asarray(arr[...])  # type: ignore[index]
    values[0] += 1.0
    arr[...] = values  # type: ignore[index]
    problems = verify(store)
    assert any("column reward" in p for p in problems), problems
    proc = run_cli("pipeline.verify", store)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "column reward" in proc.stderr


def test_zarr_store_corrupted_chunk_fails_cleanly(tmp_path: Path) -> None:
    store = make_store(tmp_path, fmt="zarr")
    chunks = [
        p
        for p in (store / ZARR_GROUP / "transitions" / "observation").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    ]
    assert chunks
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunks[0].write_bytes(bytes(data))
    proc = run_cli("pipeline.verify", store)
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stderr
    assert "observation" in proc.stderr
