"""`pipeline.verify`: a store that holds what its manifest says passes; a corrupted,
truncated or tampered one fails with a message that names the problem."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.arrowio import file_digest, write_arrow_table
from pipeline.format import MANIFEST, QUARANTINE, StoreError
from pipeline.store import TransitionStore, open_store
from pipeline.transitions.layout import (
    EPISODES_ARROW,
    FORMAT_VERSION,
    TRANSITIONS_ARROW,
    ZARR_GROUP,
)
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
    # cut off with no final observation: its last step (reward 2.0) is dropped
    Episode("c", ((5.0, 5.0, 5.0), (6.0, 6.0, 6.0), (7.0, 7.0, 7.0)), (1, 1, 1), (1.0, 1.0, 2.0), "truncated"),
]  # fmt: skip
# rows: a = 0, 1, 2 (terminated); b = 3, 4 (truncated); c = 5, 6 (truncated, dropped 2.0)


@pytest.fixture(autouse=True)
def small_check_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows checked 3 at a time (the stores here have 7): every check runs across the
    boundaries of its passes, where an episode and its next row are split."""
    import pipeline.transitions.verify as transitions_verify

    monkeypatch.setattr(transitions_verify, "CHECK_ROWS", 3)


def make_store(d: Path, fmt: str = "arrow") -> Path:
    """Three episodes and one quarantined line."""
    raw = write_lines(d / "raw" / "a.jsonl", [*(e.episode_record() for e in EPISODES), b"not json"])
    spec = write_spec(d, [raw], layout="episode_per_line", fmt=fmt)
    return build_store(spec, d / "out").path


def read_table(store: Path, name: str = TRANSITIONS_ARROW) -> pa.Table:
    """A data file, in memory (not a map of the file, which the tests overwrite)."""
    return pa.ipc.open_stream((store / name).read_bytes()).read_all()


def rewrite_consistently(
    store: Path, table: pa.Table | None = None, episodes: pa.Table | None = None
) -> None:
    """Replace transitions.arrow and/or episodes.arrow and update every checksum in the
    manifest to match, so that only the semantic checks can tell."""
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    for name, new in ((TRANSITIONS_ARROW, table), (EPISODES_ARROW, episodes)):
        if new is not None:
            write_arrow_table(new.combine_chunks(), store / name)
        path = store / name
        m["data_files"][name] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    reopened = TransitionStore(store)
    digests = column_digests(reopened)
    m["column_digests"] = digests
    episodes_hash = episodes_digest(read_table(store, EPISODES_ARROW))
    m["content_hash"] = combine_digests(digests, episodes_hash, file_digest(store / QUARANTINE))
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")


def edit_manifest(store: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    edit(m)
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")


def set_value(table: pa.Table, column: str, row: int, value: object) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(column)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def take(table: pa.Table, rows: list[int]) -> pa.Table:
    return table.take(pa.array(rows))


# --------------------------------------------------------------------------- tamperings


Tamper = Callable[[pa.Table], pa.Table]
TAMPERINGS: list[tuple[str, Tamper, str]] = [
    ("flag-on-inner-row", lambda t: set_value(t, "terminated", 0, True), "not the last of its episode"),
    ("both-flags", lambda t: set_value(t, "truncated", 2, True), "both terminated and truncated"),
    ("no-flag", lambda t: set_value(t, "terminated", 2, False), "neither terminated nor truncated"),
    ("next-obs", lambda t: set_value(t, "next_observation", 0, [0.0, 0.0, 0.0]), "next_observation differs"),
    ("return-to-go", lambda t: set_value(t, "return_to_go", 0, 42.0), "return_to_go: inconsistent"),
    ("action", lambda t: set_value(t, "action", 1, 99), "action: values outside"),
    ("nan-reward", lambda t: set_value(t, "reward", 3, float("nan")), "reward: non-finite"),
    ("step", lambda t: set_value(t, "step", 1, 7), "step: not 0..length-1"),
    ("step-repeated", lambda t: set_value(t, "step", 2, 1), "step: not 0..length-1"),
    ("episode-id", lambda t: set_value(t, "episode_id", 4, "a"), "episode_id: the rows do not match"),
    # the reward of c's dropped last step left out of its last return_to_go
    ("dropped-reward-not-in-return-to-go", lambda t: set_value(t, "return_to_go", 6, 1.0), "return_to_go: inconsistent"),
]  # fmt: skip


def test_a_built_store_verifies(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert verify(store) == []
    e = open_store(store).episodes
    np.testing.assert_array_equal(e.last_step_dropped, [False, False, True])
    np.testing.assert_array_equal(e.dropped_reward, [0.0, 0.0, 2.0])
    np.testing.assert_allclose(e.returns, [0.5, 0.5, 4.0])


@pytest.mark.parametrize(("name", "tamper", "message"), TAMPERINGS, ids=[t[0] for t in TAMPERINGS])
def test_invariants_are_checked_even_when_the_checksums_match(
    tmp_path: Path, name: str, tamper: Tamper, message: str
) -> None:
    store = make_store(tmp_path)
    rewrite_consistently(store, tamper(read_table(store)))
    problems = verify(store)
    assert any(message in p for p in problems), problems


# episodes.arrow rows: a, b, c
EpisodeTamper = Callable[[pa.Table], pa.Table]
EPISODE_TAMPERINGS: list[tuple[str, EpisodeTamper, str]] = [
    ("start-gap", lambda e: set_value(e, "start", 1, 4), "do not tile"),
    ("length", lambda e: set_value(set_value(e, "length", 0, 2), "start", 1, 2), "do not tile"),
    ("terminated-disagrees", lambda e: set_value(set_value(e, "terminated", 0, False), "truncated", 0, True),
     "disagree with the episode's last row"),
    ("return", lambda e: set_value(e, "return", 0, 1.5), "return differs from the sum"),
    # v1 semantics: the dropped last reward left out of the episode return
    ("return-without-dropped-reward", lambda e: set_value(e, "return", 2, 2.0), "return differs from the sum"),
    ("dropped-reward-stray", lambda e: set_value(e, "dropped_reward", 1, 1.0), "has a dropped_reward but no"),
    ("dropped-on-terminated", lambda e: set_value(e, "last_step_dropped", 0, True), "is not truncated"),
    ("unknown-source-file", lambda e: set_value(e, "source_file", 1, "elsewhere.jsonl"), "not among the manifest"),
    ("source-line", lambda e: set_value(e, "source_line", 2, 1), "in order of their first record"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "tamper", "message"), EPISODE_TAMPERINGS, ids=[t[0] for t in EPISODE_TAMPERINGS]
)
def test_the_episodes_table_is_checked_even_when_the_checksums_match(
    tmp_path: Path, name: str, tamper: EpisodeTamper, message: str
) -> None:
    store = make_store(tmp_path)
    rewrite_consistently(store, episodes=tamper(read_table(store, EPISODES_ARROW)))
    problems = verify(store)
    assert any(message in p for p in problems), problems


def test_duplicate_episode_ids_are_found(tmp_path: Path) -> None:
    # b renamed "a" in its rows and in the table: every row agrees with its episode
    store = make_store(tmp_path)
    table = read_table(store)
    for row in (3, 4):
        table = set_value(table, "episode_id", row, "a")
    episodes = set_value(read_table(store, EPISODES_ARROW), "episode_id", 1, "a")
    rewrite_consistently(store, table, episodes)
    problems = verify(store)
    assert any("share an id" in p and "'a'" in p for p in problems), problems
    assert not any("rows do not match" in p for p in problems), problems


def test_episodes_out_of_order_are_found(tmp_path: Path) -> None:
    # a and b swapped, rows and table together (what a merge in the wrong order gives)
    store = make_store(tmp_path)
    table = take(read_table(store), [3, 4, 0, 1, 2, 5, 6])
    episodes = take(read_table(store, EPISODES_ARROW), [1, 0, 2])
    episodes = set_value(set_value(episodes, "start", 0, 0), "start", 1, 2)
    rewrite_consistently(store, table, episodes)
    problems = verify(store)
    assert any("in order of their first record" in p for p in problems), problems
    assert not any("tile" in p or "do not match" in p for p in problems), problems


def test_a_doubled_episode_is_found(tmp_path: Path) -> None:
    # b written twice, rows and table together (what a merge window flushed twice gives)
    store = make_store(tmp_path)
    table = take(read_table(store), [0, 1, 2, 3, 4, 3, 4, 5, 6])
    episodes = take(read_table(store, EPISODES_ARROW), [0, 1, 1, 2])
    episodes = set_value(set_value(episodes, "start", 2, 5), "start", 3, 7)
    edit_manifest(store, lambda m: m["counts"].update(transitions=9))  # the builder's count
    rewrite_consistently(store, table, episodes)
    problems = verify(store)
    assert any("share an id" in p for p in problems), problems
    assert any("counts.episodes = 3 but the data hold 4" in p for p in problems), problems


def set_count(key: str, delta: int) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["counts"].update({key: m["counts"][key] + delta})


def add_reason(m: dict[str, Any]) -> None:
    m["quarantine_reasons"]["bad_utf8"] = 1


def move_quarantined(m: dict[str, Any]) -> None:
    m["sources"][0]["records_quarantined"] += 1
    m["sources"][0]["records_kept"] -= 1


COUNT_TAMPERINGS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("episodes-terminated", set_count("episodes_terminated", 1), "counts.episodes_terminated"),
    ("episodes-truncated", set_count("episodes_truncated", -1), "counts.episodes_truncated"),
    ("dropped", set_count("truncated_last_steps_dropped", 1), "counts.truncated_last_steps_dropped"),
    ("records-kept", set_count("records_kept", 1), "counts.records_kept"),
    ("records-quarantined", set_count("records_quarantined", 1), "counts.records_quarantined"),
    ("records", set_count("records", 1), "counts.records"),
    ("reasons", add_reason, "quarantine_reasons"),
    ("per-source", move_quarantined, "records_quarantined = 2 but quarantine.jsonl holds 1"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "edit", "message"), COUNT_TAMPERINGS, ids=[t[0] for t in COUNT_TAMPERINGS]
)
def test_manifest_counts_are_checked_against_the_data(
    tmp_path: Path, name: str, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    store = make_store(tmp_path)
    edit_manifest(store, edit)
    problems = verify(store)
    assert any(message in p for p in problems), problems


def test_records_kept_of_a_step_per_line_store_counts_dropped_steps(tmp_path: Path) -> None:
    # 3 + 2 + 3 step lines kept: 7 transitions and c's dropped last step
    raw = write_lines(tmp_path / "raw" / "a.jsonl", [r for e in EPISODES for r in e.step_records()])
    store = build_store(write_spec(tmp_path, [raw]), tmp_path / "out").path
    assert json.loads((store / MANIFEST).read_text())["counts"]["records_kept"] == 8
    edit_manifest(store, set_count("records_kept", -1))
    edit_manifest(store, lambda m: m["sources"][0].update(records_kept=7))
    edit_manifest(store, set_count("records", -1))
    edit_manifest(store, lambda m: m["sources"][0].update(records=7))
    problems = verify(store)
    assert problems == [f"{store}: manifest: counts.records_kept = 7 but the data hold 8"]


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


def test_a_store_of_format_version_1_must_be_rebuilt(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    edit_manifest(store, lambda m: m.update(format_version=1))
    with pytest.raises(
        StoreError, match=f"format_version 1 but this reader reads {FORMAT_VERSION}"
    ):
        verify(store)
    with pytest.raises(StoreError, match="rebuild"):
        open_store(store)
    assert_one_error_line(
        run_cli("pipeline.verify", store), "format_version 1", "pipeline.build SPEC --force"
    )


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
