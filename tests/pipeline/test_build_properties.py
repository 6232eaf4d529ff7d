"""Properties of `pipeline.build` over generated episodes, held against a reference loop.

Every example writes real JSONL (step-per-line lines shuffled over a plain, a .gz and a
.zst file, or one episode per line), builds a store, reads it back with `open_store` and
compares it with :func:`conftest.reference_transitions`, then runs `pipeline.verify`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.build import build
from pipeline.format import BuildError
from pipeline.store import TransitionStore, open_store
from pipeline.transitions.layout import TRANSITIONS_ARROW
from pipeline.verify import verify

from .conftest import (
    SPILL,
    Episode,
    Layout,
    Reference,
    Written,
    build_store,
    dumps,
    episode_sets,
    n_step_records,
    placements,
    quarantine_records,
    reference_transitions,
    write_episodes,
    write_spec,
)

GAMMAS = (0.0, 0.5, 0.99, 1.0)
layouts = st.sampled_from(["step_per_line", "episode_per_line"])


def write_case(
    directory: Path, episodes: list[Episode], layout: Layout, data: st.DataObject
) -> Written:
    if layout == "step_per_line":
        order, file_of = data.draw(placements(n_step_records(episodes)), label="placement")
        return write_episodes(directory, episodes, layout, order=order, file_of=file_of)
    return write_episodes(directory, episodes, layout)


def assert_matches_reference(
    store: TransitionStore, ref: Reference, written: Written, gamma: float
) -> None:
    m = store.manifest
    eps = store.episodes
    n = len(store)
    # counts
    assert n == ref.n_transitions == m["counts"]["transitions"]
    assert len(eps) == len(ref.episodes) == m["counts"]["episodes"]
    assert m["counts"]["truncated_last_steps_dropped"] == sum(e.dropped_last for e in ref.episodes)
    # episodes in order of first appearance (file, line), tiling the rows
    first = written.first_appearance()
    expected_order = sorted((e.episode_id for e in ref.episodes), key=lambda i: first[i])
    assert eps.episode_id == expected_order
    np.testing.assert_array_equal(eps.start, np.concatenate([[0], np.cumsum(eps.length)[:-1]]))
    assert int(eps.length.sum()) == n
    by_id = {e.episode_id: e for e in ref.episodes}
    for i, eid in enumerate(eps.episode_id):
        e = by_id[eid]
        rows = slice(int(eps.start[i]), int(eps.start[i] + eps.length[i]))
        k = len(e.action)
        assert eps.length[i] == k
        assert list(store.episode_id[rows]) == [eid] * k
        np.testing.assert_array_equal(store.steps[rows], np.arange(k, dtype=np.int32))
        np.testing.assert_array_equal(store.observations[rows], e.observation)
        np.testing.assert_array_equal(store.actions[rows], e.action)
        np.testing.assert_array_equal(store.rewards[rows], e.reward)
        np.testing.assert_array_equal(store.next_observations[rows], e.next_observation)
        term, trunc = store.terminated[rows], store.truncated[rows]
        assert not term[:-1].any() and not trunc[:-1].any()
        assert (bool(term[-1]), bool(trunc[-1])) == (e.terminated, e.truncated)
        assert bool(term[-1]) != bool(trunc[-1])  # exactly one of them on the last row
        assert (bool(eps.terminated[i]), bool(eps.truncated[i])) == (e.terminated, e.truncated)
        # every logged reward counts: a dropped last step's reward is in the return
        assert eps.returns[i] == pytest.approx(e.episode_return)
        assert bool(eps.last_step_dropped[i]) == e.dropped_last
        assert eps.dropped_reward[i] == e.dropped_reward
        np.testing.assert_allclose(
            store.return_to_go[rows], e.return_to_go, rtol=1e-6, atol=1e-5 * (1 + k)
        )
        assert (Path(eps.source_file[i]).name, int(eps.source_line[i])) == first[eid]
    # next_observation never crosses an episode: inside episodes it is the next row's obs
    last = eps.start + eps.length - 1
    inner = np.setdiff1d(np.arange(n - 1), last)
    np.testing.assert_array_equal(store.next_observations[inner], store.observations[inner + 1])
    assert store.discount == gamma


def assert_quarantine_matches(store: TransitionStore, ref: Reference, written: Written) -> None:
    m = store.manifest
    records = quarantine_records(store.path)
    expected = {
        (name, line) for eid in ref.unbootstrappable for name, line in written.lines_of(eid)
    }
    assert {(Path(r["file"]).name, r["line"]) for r in records} == expected
    assert {r["reason"] for r in records} <= {"unbootstrappable"}
    assert {r["episode_id"] for r in records} == set(ref.unbootstrappable)
    for r in records:  # the raw text of each record, read back from plain, .gz or .zst
        name = Path(r["file"]).name
        assert r["raw"] == dumps(written.files[name][r["line"] - 1]).decode("utf-8")
    c = m["counts"]
    assert c["records"] == written.n_records == c["records_kept"] + c["records_quarantined"]
    assert c["records_quarantined"] == len(expected)
    per_file = {Path(s["path"]).name: s for s in m["sources"]}
    for name, recs in written.files.items():
        assert per_file[name]["records"] == len(recs)


@given(
    episodes=episode_sets(),
    layout=layouts,
    gamma=st.sampled_from(GAMMAS),
    small_chunks=st.booleans(),
    data=st.data(),
)
@settings(max_examples=30, deadline=None)
def test_store_matches_reference_loop(
    tmp_path_factory: pytest.TempPathFactory,
    episodes: list[Episode],
    layout: Layout,
    gamma: float,
    small_chunks: bool,
    data: st.DataObject,
) -> None:
    d = tmp_path_factory.mktemp("case")
    written = write_case(d / "raw", episodes, layout, data)
    spec = write_spec(d, [written.glob], layout=layout, discount=gamma)
    ref = reference_transitions(episodes, gamma)
    # tiny chunks and spill buckets exercise chunk boundaries and the bucket merge
    sizes: dict[str, Any] = SPILL if small_chunks else {}
    if ref.n_transitions == 0:
        with pytest.raises(BuildError, match="no transition could be built"):
            build(spec, d / "out", progress=False, **sizes)
        assert not (d / "out" / "store").exists()
        return
    result = build_store(spec, d / "out", **sizes)
    store = open_store(result.path)
    assert_matches_reference(store, ref, written, gamma)
    assert_quarantine_matches(store, ref, written)


@st.composite
def spill_options(draw: st.DrawFn) -> dict[str, Any]:
    """Build options that spill step_per_line steps to disk in several buckets and merge
    them back a window of a few rows at a time."""
    return {
        "chunk_bytes": draw(st.sampled_from([97, 300, 4096, 1 << 20])),
        "bucket_bytes": draw(st.integers(8, 512)),
        "in_memory_bytes": 0,
        "merge_rows": draw(st.integers(1, 16)),
    }


@given(
    episodes=episode_sets(max_episodes=10, max_len=6),
    gamma=st.sampled_from(GAMMAS),
    options=spill_options(),
    data=st.data(),
)
@settings(max_examples=25, deadline=None)
def test_spilled_builds_match_reference_loop(
    tmp_path_factory: pytest.TempPathFactory,
    episodes: list[Episode],
    gamma: float,
    options: dict[str, Any],
    data: st.DataObject,
) -> None:
    # one kept episode at least, so that there is a store to compare
    episodes = [*episodes, dataclasses.replace(episodes[0], episode_id="kept", end="terminated")]
    d = tmp_path_factory.mktemp("spill")
    written = write_case(d / "raw", episodes, "step_per_line", data)
    spec = write_spec(d, [written.glob], discount=gamma)
    result = build_store(spec, d / "out", progress=False, **options)
    store = open_store(result.path)
    ref = reference_transitions(episodes, gamma)
    assert_matches_reference(store, ref, written, gamma)
    assert_quarantine_matches(store, ref, written)


@given(episodes=episode_sets(max_episodes=4), layout=layouts, data=st.data())
@settings(max_examples=10, deadline=None)
def test_arrow_and_zarr_stores_hold_identical_arrays(
    tmp_path_factory: pytest.TempPathFactory,
    episodes: list[Episode],
    layout: Layout,
    data: st.DataObject,
) -> None:
    # one kept episode at least: a terminated one
    episodes = [*episodes, dataclasses.replace(episodes[0], episode_id="kept", end="terminated")]
    d = tmp_path_factory.mktemp("formats")
    written = write_case(d / "raw", episodes, layout, data)
    arrow = open_store(
        build_store(write_spec(d, [written.glob], name="a", layout=layout), d / "out").path
    )
    zarr = open_store(
        build_store(
            write_spec(d, [written.glob], name="z", layout=layout, fmt="zarr"), d / "out"
        ).path
    )
    assert (arrow.format, zarr.format) == ("arrow", "zarr")
    for column in (
        "episode_id",
        "step",
        "observation",
        "action",
        "reward",
        "next_observation",
        "terminated",
        "truncated",
        "return_to_go",
    ):
        a, z = arrow.column(column), zarr.column(column)
        assert a.dtype == z.dtype or column == "episode_id", column
        np.testing.assert_array_equal(a, z, err_msg=column)
    for f in dataclasses.fields(arrow.episodes):
        np.testing.assert_array_equal(
            getattr(arrow.episodes, f.name), getattr(zarr.episodes, f.name), err_msg=f.name
        )
    assert arrow.content_hash == zarr.content_hash
    assert arrow.manifest["counts"] == zarr.manifest["counts"]


@given(
    episodes=episode_sets(max_episodes=4),
    layout=layouts,
    which=st.integers(0, 10**6),
    data=st.data(),
)
@settings(max_examples=15, deadline=None)
def test_content_hash_is_stable_and_changes_with_one_value(
    tmp_path_factory: pytest.TempPathFactory,
    episodes: list[Episode],
    layout: Layout,
    which: int,
    data: st.DataObject,
) -> None:
    episodes = [*episodes, dataclasses.replace(episodes[0], episode_id="kept", end="terminated")]
    d = tmp_path_factory.mktemp("hash")
    written = write_case(d / "raw", episodes, layout, data)
    spec = write_spec(d, [written.glob], layout=layout)
    first = build_store(spec, d / "out")
    arrow_bytes = (first.path / TRANSITIONS_ARROW).read_bytes()
    again = build_store(spec, d / "out", force=True)
    assert again.status == "built"
    assert again.manifest["content_hash"] == first.manifest["content_hash"]
    assert (again.path / TRANSITIONS_ARROW).read_bytes() == arrow_bytes
    # change ONE number of the input: the first observation value of one episode
    key = "ep" if layout == "step_per_line" else "episode"
    target = episodes[which % len(episodes)]
    changed_values = 0
    for recs in written.files.values():
        for rec in recs:
            if rec[key] != target.episode_id:
                continue
            if layout == "episode_per_line":
                rec["steps"][0]["obs"][0] += 0.25
                changed_values += 1
            elif rec["t"] == target.first_step:
                rec["obs"][0] += 0.25
                changed_values += 1
    assert changed_values == 1
    written.rewrite()
    changed = build_store(spec, d / "out", force=True)
    assert changed.manifest["content_hash"] != first.manifest["content_hash"]
    assert verify(changed.path) == []
