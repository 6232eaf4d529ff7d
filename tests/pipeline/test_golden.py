"""A tiny fixed input whose store is pinned: a change to the layout or the semantics of
the store shows up here and must come with a FORMAT_VERSION bump (docs/FORMAT.md).

To change the format on purpose: bump ``FORMAT_VERSION`` in pipeline/transitions/layout.py,
describe the change in docs/FORMAT.md (its title names the version) and CHANGELOG.md, then
add the new version's golden hash to ``GOLDEN_HASHES`` (the test prints it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.build import build
from pipeline.format import MANIFEST, StoreError
from pipeline.store import open_store
from pipeline.transitions.layout import FORMAT_VERSION
from pipeline.verify import verify

ROOT = Path(__file__).resolve().parents[2]
# content hash of the golden store, per format version (older ones stay, as a record)
GOLDEN_HASHES = {
    1: "4a0fa3390e41df726e8cfe0a8181744ec6f9f4144925e30a0aa2789c2d7f0483",
    # the dropped last reward counts in return_to_go and return; episodes.arrow says so
    2: "17eb566634d6a0726b80dc5b3de97549bffa9045a0d94c3a55a1253ddcde86dc",
    # the episodes table enters the hash without its provenance (source_file, source_line)
    3: "ec149850a31f74990e1a57d2df60e3189c5f6361da70bbe7235e8b339f7e68be",
}


@pytest.fixture()
def golden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)  # source paths in the quarantine are relative to the cwd
    return build("tests/data/golden/golden.yaml", tmp_path).path


def test_each_format_version_has_its_own_golden_hash_and_documentation() -> None:
    # a bump without a new golden hash, or a hash reused across versions, fails here
    assert max(GOLDEN_HASHES) == FORMAT_VERSION
    assert len(set(GOLDEN_HASHES.values())) == len(GOLDEN_HASHES)
    title = (ROOT / "docs" / "FORMAT.md").read_text(encoding="utf-8").splitlines()[0]
    assert f"format_version {FORMAT_VERSION}" in title, title


def test_a_store_of_an_older_format_version_is_rebuilt_not_up_to_date(
    golden: Path, tmp_path: Path
) -> None:
    m = json.loads((golden / MANIFEST).read_text(encoding="utf-8"))
    assert m["format_version"] == FORMAT_VERSION
    m["format_version"] = FORMAT_VERSION - 1
    (golden / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    with pytest.raises(StoreError, match="rebuild"):
        open_store(golden)
    again = build("tests/data/golden/golden.yaml", tmp_path)
    assert again.status == "built"
    assert again.manifest["format_version"] == FORMAT_VERSION
    assert verify(again.path) == []


def test_golden_store_content(golden: Path) -> None:
    s = open_store(golden)
    # episodes in order of first appearance: b (steps-a.jsonl:1), then a (steps-a.jsonl:2)
    assert s.episodes.episode_id == ["b", "a"]
    assert s.episode_id.tolist() == ["b", "b", "a", "a", "a"]
    np.testing.assert_array_equal(s.steps, [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(s.actions, [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(s.rewards, [0.5, 0.5, 1.0, 1.0, 1.0])
    # b just stops with no final observation: its last transition is dropped, row 1 truncated
    np.testing.assert_array_equal(s.truncated, [False, True, False, False, False])
    np.testing.assert_array_equal(s.terminated, [False, False, False, False, True])
    # b's dropped last step (reward 0.5) still counts: 0.5 + 0.5 * (0.5 + 0.5 * 0.5)
    np.testing.assert_allclose(s.return_to_go, [0.875, 0.75, 1.75, 1.5, 1.0])
    np.testing.assert_allclose(s.episodes.returns, [1.5, 3.0])
    np.testing.assert_array_equal(s.episodes.dropped_reward, [0.5, 0.0])
    np.testing.assert_array_equal(s.episodes.last_step_dropped, [True, False])
    np.testing.assert_allclose(
        s.next_observations,
        np.array([[0.5, -1.0], [0.6, -1.0], [0.1, 0.1], [0.2, 0.2], [0.3, 0.3]], np.float32),
    )
    c = s.manifest["counts"]
    assert (c["records"], c["records_kept"], c["records_quarantined"]) == (9, 6, 3)
    assert c["truncated_last_steps_dropped"] == 1
    assert s.manifest["quarantine_reasons"] == {
        "bad_json": 1,
        "non_finite": 1,
        "unbootstrappable": 1,
    }
    assert [q["line"] for q in s.quarantine()] == [5, 4, 5]
    assert verify(golden) == []


def test_golden_store_layout_and_hash(golden: Path) -> None:
    with pa.memory_map(str(golden / "transitions.arrow")) as f:
        reader = pa.ipc.open_stream(f)
        batches = list(reader)
        schema = reader.schema
    assert len(batches) == 1, "transitions.arrow must hold one record batch (zero-copy columns)"
    assert [(f.name, str(f.type)) for f in schema] == [
        ("episode_id", "string"),
        ("step", "int32"),
        ("observation", "fixed_size_list<item: float>[2]"),
        ("action", "int64"),
        ("reward", "float"),
        ("next_observation", "fixed_size_list<item: float>[2]"),
        ("terminated", "bool"),
        ("truncated", "bool"),
        ("return_to_go", "float"),
    ]
    with pa.memory_map(str(golden / "episodes.arrow")) as f:
        episodes_schema = pa.ipc.open_stream(f).schema
    assert [(f.name, str(f.type)) for f in episodes_schema] == [
        ("episode_id", "string"),
        ("start", "int64"),
        ("length", "int64"),
        ("return", "double"),
        ("dropped_reward", "double"),
        ("last_step_dropped", "bool"),
        ("terminated", "bool"),
        ("truncated", "bool"),
        ("source_file", "string"),
        ("source_line", "int64"),
    ]
    got = open_store(golden).content_hash
    assert got == GOLDEN_HASHES[FORMAT_VERSION], f"golden hash of this build: {got}"
