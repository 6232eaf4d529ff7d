"""Named reward columns (``fields.rewards``): the spec, the build, the store, verify, inspect.

A store whose spec declares ``rewards: {NAME: {path: FIELD}}`` holds each as the float32
column ``reward_NAME`` beside ``reward`` (and ``dropped_reward_NAME`` in the episodes), in
the arrow and the zarr layout alike; the values are held against a plain reference loop.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_specs.schema import SpecError, parse_transition_spec
from pipeline.format import MANIFEST
from pipeline.inspect import describe
from pipeline.store import TransitionStore, open_store
from pipeline.transitions.layout import TRANSITIONS_ARROW
from pipeline.verify import verify

from .conftest import (
    SPILL,
    Episode,
    Layout,
    Written,
    build_store,
    dumps,
    episode_lines,
    episode_sets,
    n_step_records,
    placements,
    quarantine_records,
    reference_transitions,
    step_fields,
    write_episodes,
    write_lines,
    write_spec,
)

# two named rewards: one at a dotted path, one at the top of the step
OVERFLOW = 12345.5  # written as 1e400 in the JSON
REWARDS = {"shaped": {"path": "aux.shaped"}, "bonus": {"path": "bonus"}}


def with_rewards(rewards: Any = REWARDS) -> dict[str, Any]:
    return {**step_fields(), "rewards": rewards}


def base_spec(**fields: Any) -> dict[str, Any]:
    return {
        "name": "s",
        "source": {"paths": ["x.jsonl"], "layout": "step_per_line", "step_key": "t"},
        "fields": {**step_fields(), **fields},
    }


# --------------------------------------------------------------------------- spec


def test_spec_reads_named_rewards_in_order_and_hashes_as_before_without_them() -> None:
    spec = parse_transition_spec(base_spec(rewards={"b": "x.b", "a": {"path": "a"}}))
    assert [(n, f.path) for n, f in spec.fields.rewards] == [("b", "x.b"), ("a", "a")]
    assert spec.to_dict()["fields"]["rewards"] == {"b": {"path": "x.b"}, "a": {"path": "a"}}
    plain = parse_transition_spec(base_spec())
    assert plain.fields.rewards == ()
    # a spec without `rewards` resolves (and hashes) exactly as it did before the key existed
    assert "rewards" not in plain.to_dict()["fields"]
    assert spec.sha256() != plain.sha256()


# fmt: off
BAD_REWARDS = [
    ("not a mapping", ["r"], ["fields.rewards", "must map a reward name to its field"]),
    ("empty", {}, ["fields.rewards", "must map a reward name"]),
    ("bad name", {"my-reward": "x"}, ["fields.rewards", "'my-reward'", "must be a word", "reward_NAME"]),
    ("digit first", {"2x": "x"}, ["fields.rewards", "'2x'", "must be a word"]),
    ("the main name", {"reward": "x"}, ["fields.rewards.reward", "main reward", "another name"]),
    ("no path", {"a": {}}, ["fields.rewards.a", "missing required key 'path'"]),
    ("unknown key", {"a": {"path": "x", "scale": 2}}, ["fields.rewards.a", "unknown key 'scale'"]),
    ("empty part", {"a": {"path": "x..y"}}, ["fields.rewards.a.path", "empty part between dots"]),
]
# fmt: on


@pytest.mark.parametrize(
    ("case", "rewards", "needles"), BAD_REWARDS, ids=[c[0] for c in BAD_REWARDS]
)
def test_bad_named_rewards_are_one_line_errors(case: str, rewards: Any, needles: list[str]) -> None:
    with pytest.raises(SpecError) as err:
        parse_transition_spec(base_spec(rewards=rewards), origin="specs/x.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("specs/x.yaml: ")
    for needle in needles:
        assert needle in msg, (needle, msg)


# --------------------------------------------------------------------------- build, reference


def shaped_of(obs: Any, rew: float) -> float:
    """The ``shaped`` value written with a step (exact in float32 for the test's values)."""
    return float(obs[0]) - rew


def add_named(step: dict[str, Any]) -> dict[str, Any]:
    return {
        **step,
        "aux": {"shaped": shaped_of(step["obs"], step["rew"])},
        "bonus": 2 * step["rew"],
    }


def write_with_named(written: Written) -> Written:
    """Every step of ``written`` given the two named rewards, files rewritten."""
    for recs in written.files.values():
        for i, rec in enumerate(recs):
            if written.layout == "step_per_line":
                recs[i] = add_named(rec)
            else:
                recs[i] = {**rec, "steps": [add_named(s) for s in rec["steps"]]}
    written.rewrite()
    return written


def assert_named_match_reference(store: TransitionStore, episodes: list[Episode]) -> None:
    """Each kept row's named rewards and each dropped last step's, against a plain loop."""
    ref = {e.episode_id: e for e in reference_transitions(episodes, store.discount).episodes}
    source = {e.episode_id: e for e in episodes}
    cols = store.reward_columns
    assert list(cols) == ["shaped", "bonus"]
    assert store.reward_column_names == {"shaped": "reward_shaped", "bonus": "reward_bonus"}
    eps = store.episodes
    for i, eid in enumerate(eps.episode_id):
        rows = slice(int(eps.start[i]), int(eps.start[i] + eps.length[i]))
        e, src = ref[eid], source[eid]
        shaped = [shaped_of(o, r) for o, r in zip(e.observation, e.reward)]
        np.testing.assert_array_equal(cols["shaped"][rows], np.asarray(shaped, np.float32))
        np.testing.assert_array_equal(cols["bonus"][rows], 2 * e.reward)
        dropped = eps.dropped_named_rewards
        want_shaped = shaped_of(src.observations[-1], src.rewards[-1]) if e.dropped_last else 0.0
        assert dropped["shaped"][i] == want_shaped
        assert dropped["bonus"][i] == (2 * src.rewards[-1] if e.dropped_last else 0.0)
    for name, col in cols.items():
        assert col.dtype == np.float32
        stats = store.manifest["statistics"]["reward_columns"][name]
        assert stats["count"] == len(store)
        assert stats["mean"] == pytest.approx(float(col.astype(np.float64).mean()), abs=1e-9)
        assert stats["max"] == float(col.max())


def write_case(
    directory: Path, episodes: list[Episode], layout: Layout, data: st.DataObject
) -> Written:
    if layout == "step_per_line":
        order, file_of = data.draw(placements(n_step_records(episodes)), label="placement")
        written = write_episodes(directory, episodes, layout, order=order, file_of=file_of)
    else:
        written = write_episodes(directory, episodes, layout)
    return write_with_named(written)


@given(
    episodes=episode_sets(max_episodes=5, max_len=6),
    layout=st.sampled_from(["step_per_line", "episode_per_line"]),
    spill=st.booleans(),
    data=st.data(),
)
@settings(max_examples=12, deadline=None)
def test_named_rewards_round_trip_arrow_and_zarr_with_one_content_hash(
    tmp_path_factory: pytest.TempPathFactory,
    episodes: list[Episode],
    layout: Layout,
    spill: bool,
    data: st.DataObject,
) -> None:
    # one kept episode at least, and one whose cut-off last step is dropped
    episodes = [
        *episodes,
        dataclasses.replace(episodes[0], episode_id="kept", end="terminated"),
        dataclasses.replace(episodes[0], episode_id="cut", end="none", final_observation=None),
    ]
    d = tmp_path_factory.mktemp("named")
    written = write_case(d / "raw", episodes, layout, data)
    sizes = SPILL if spill and layout == "step_per_line" else {}
    stores = []
    for fmt in ("arrow", "zarr"):
        spec = write_spec(
            d, [written.glob], name=fmt, layout=layout, fields=with_rewards(), fmt=fmt
        )
        stores.append(open_store(build_store(spec, d / "out", **sizes).path))  # verifies too
    arrow, zarr = stores
    for store in stores:
        assert_named_match_reference(store, episodes)
    assert arrow.content_hash == zarr.content_hash
    assert arrow.manifest["column_digests"] == zarr.manifest["column_digests"]
    np.testing.assert_array_equal(arrow.reward_columns["shaped"], zarr.reward_columns["shaped"])
    # the plain store of the same input differs only by the named columns
    plain = open_store(
        build_store(write_spec(d, [written.glob], name="plain", layout=layout), d / "out").path
    )
    digests = dict(arrow.manifest["column_digests"])
    assert {digests.pop("reward_shaped"), digests.pop("reward_bonus")}
    assert digests == plain.manifest["column_digests"]
    assert "reward_columns" not in plain.manifest and plain.reward_columns == {}


def test_arrow_layout_manifest_and_inspect(tmp_path: Path) -> None:
    lines = [add_named(r) for r in episode_lines("a", 3) + episode_lines("b", 2)]
    write_lines(tmp_path / "raw" / "steps.jsonl", lines)
    spec = write_spec(tmp_path, [tmp_path / "raw" / "*.jsonl"], fields=with_rewards())
    store = open_store(build_store(spec, tmp_path / "out").path)
    with pa.memory_map(str(store.path / TRANSITIONS_ARROW)) as f:
        schema = pa.ipc.open_stream(f).schema
    assert [(f.name, str(f.type)) for f in schema][-3:] == [
        ("return_to_go", "float"),
        ("reward_shaped", "float"),
        ("reward_bonus", "float"),
    ]
    assert store.manifest["reward_columns"] == {
        "shaped": {"column": "reward_shaped", "path": "aux.shaped"},
        "bonus": {"column": "reward_bonus", "path": "bonus"},
    }
    assert store.episode_table().column_names[-2:] == [
        "dropped_reward_shaped",
        "dropped_reward_bonus",
    ]
    text = describe(store.path)
    assert "reward_shaped" in text and "fields.rewards.bonus: bonus" in text
    np.testing.assert_array_equal(store.reward_columns["bonus"], [2.0] * 5)


# --------------------------------------------------------------------------- quarantine


@pytest.mark.parametrize(
    ("value", "reason", "detail"),
    [
        (None, "missing_field", "aux.shaped (fields.rewards.shaped): missing"),
        (float("nan"), "non_finite", "(fields.rewards.shaped)"),
        # valid JSON that overflows to inf: read by the fast path, rejected by its checks
        (OVERFLOW, "non_finite", "aux.shaped (fields.rewards.shaped): inf is not a finite"),
        ("high", "wrong_type", "aux.shaped (fields.rewards.shaped): expected a number"),
    ],
)
@pytest.mark.parametrize("layout", ["step_per_line", "episode_per_line"])
def test_a_bad_named_reward_quarantines_its_episode(
    tmp_path: Path, value: Any, reason: str, detail: str, layout: Layout
) -> None:
    bad = add_named(episode_lines("bad", 3)[1])
    if value is None:
        del bad["aux"]["shaped"]
    else:
        bad["aux"]["shaped"] = value
    good = [add_named(r) for r in episode_lines("good", 3)]
    steps = [add_named(episode_lines("bad", 3)[0]), bad, add_named(episode_lines("bad", 3)[2])]
    if layout == "step_per_line":
        records: list[Any] = [*steps, *good]
    else:
        strip = lambda s: {k: v for k, v in s.items() if k not in ("ep", "t")}  # noqa: E731
        records = [
            {"episode": "bad", "steps": [strip(s) for s in steps]},
            {"episode": "good", "steps": [strip(s) for s in good]},
        ]
    lines = [dumps(r).replace(b"12345.5", b"1e400") for r in records]
    write_lines(tmp_path / "raw" / "steps.jsonl", lines)
    spec = write_spec(
        tmp_path, [tmp_path / "raw" / "*.jsonl"], layout=layout, fields=with_rewards()
    )
    store = open_store(build_store(spec, tmp_path / "out").path)
    assert store.episodes.episode_id == ["good"]
    q = quarantine_records(store.path)
    line = 2 if layout == "step_per_line" else 1  # the bad step's record
    (bad_record,) = [r for r in q if r["line"] == line]
    assert bad_record["reason"] == reason and detail in bad_record["detail"], bad_record
    assert store.manifest["quarantine_reasons"][reason] == 1
    if layout == "step_per_line":  # the other records of the episode go with it
        assert sorted(r["reason"] for r in q if r["line"] != line) == ["episode_rejected"] * 2


# --------------------------------------------------------------------------- verify


@pytest.fixture()
def named_store(tmp_path: Path) -> Path:
    # episode a is cut off with no final observation: its last step is dropped
    lines = [add_named(r) for r in episode_lines("a", 3, term=False)]
    lines += [add_named(r) for r in episode_lines("b", 2)]
    write_lines(tmp_path / "raw" / "steps.jsonl", lines)
    spec = write_spec(tmp_path, [tmp_path / "raw" / "*.jsonl"], fields=with_rewards(), fmt="zarr")
    return build_store(spec, tmp_path / "out").path


def test_dropped_last_step_keeps_its_named_rewards(named_store: Path) -> None:
    store = open_store(named_store)
    assert store.episodes.last_step_dropped.tolist() == [True, False]
    # the dropped step is a's step 2: obs[0] = 2.0, reward 1.0
    assert store.episodes.dropped_named_rewards["shaped"].tolist() == [1.0, 0.0]
    assert store.episodes.dropped_named_rewards["bonus"].tolist() == [2.0, 0.0]
    np.testing.assert_array_equal(store.reward_columns["shaped"], [-1.0, 0.0, -1.0, 0.0])


def test_verify_finds_a_manifest_that_lies_about_the_named_columns(named_store: Path) -> None:
    m = json.loads((named_store / MANIFEST).read_text(encoding="utf-8"))
    m["reward_columns"]["bonus"]["path"] = "other"
    (named_store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    problems = verify(named_store)
    assert len(problems) == 1 and "reward_columns" in problems[0], problems


def test_verify_finds_a_changed_named_value(named_store: Path) -> None:
    import zarr

    root: Any = zarr.open_group(str(named_store / "store.zarr"), mode="r+")
    arr = root["transitions"]["reward_bonus"]
    arr[1] = np.float32(np.nan)
    problems = verify(named_store)
    assert any("column reward_bonus: content differs" in p for p in problems), problems
    assert any("named reward column (reward_NAME): non-finite" in p for p in problems), problems
    root["episodes"]["dropped_reward_shaped"][1] = 5.0
    assert any(
        "has a dropped_reward_shaped but no dropped last step" in p for p in verify(named_store)
    )
