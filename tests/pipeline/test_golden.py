"""A tiny fixed input whose store is pinned: a change to the layout or the semantics of
the store shows up here and must come with a FORMAT_VERSION bump (docs/FORMAT.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.build import build
from pipeline.store import open_store
from pipeline.transitions.layout import FORMAT_VERSION
from pipeline.verify import verify

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_HASH = "4a0fa3390e41df726e8cfe0a8181744ec6f9f4144925e30a0aa2789c2d7f0483"


@pytest.fixture()
def golden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)  # source paths in the quarantine are relative to the cwd
    return build("tests/data/golden/golden.yaml", tmp_path).path


def test_format_version_is_pinned() -> None:
    assert FORMAT_VERSION == 1


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
    np.testing.assert_allclose(s.return_to_go, [0.75, 0.5, 1.75, 1.5, 1.0])
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
    assert open_store(golden).content_hash == GOLDEN_HASH
