"""Reading a store back: `open_store` (zero-copy memory map), torch tensors, third-party
readers of the Arrow file, and the seed's replay format end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline.format import MANIFEST, StoreError
from pipeline.store import TransitionStore, open_store
from pipeline.transitions.layout import EPISODES_ARROW, TRANSITIONS_ARROW

from .conftest import (
    N_ACTIONS,
    OBS_DIM,
    REPO,
    Episode,
    build_store,
    write_episodes,
    write_lines,
    write_spec,
)

EPISODES = [
    Episode("a", ((0.0, 1.0, 2.0), (3.0, 4.0, 5.0), (6.0, 7.0, 8.0)), (0, 1, 2), (1.0, 0.5, -1.0), "terminated"),
    Episode("b", ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0)), (3, 0), (0.25, 0.25), "truncated", (9.0, 9.0, 9.0)),
    Episode("c", ((5.0, 5.0, 5.0), (6.0, 6.0, 6.0), (7.0, 7.0, 7.0)), (1, 1, 1), (2.0, 2.0, 2.0), "none"),
]  # fmt: skip
N_TRANSITIONS = 3 + 2 + 2  # "c" is cut off with no final observation: its last step goes


@pytest.fixture(scope="module", params=["arrow", "zarr"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> TransitionStore:
    d = tmp_path_factory.mktemp(f"reader-{request.param}")
    written = write_episodes(d / "raw", EPISODES, "step_per_line", file_of=[0, 1, 2, 0, 1, 2, 0, 1])
    spec = write_spec(d, [written.glob], fmt=request.param)
    return open_store(build_store(spec, d / "out").path)


@pytest.fixture(scope="module")
def arrow_store(tmp_path_factory: pytest.TempPathFactory) -> TransitionStore:
    d = tmp_path_factory.mktemp("reader-arrow")
    written = write_episodes(d / "raw", EPISODES, "episode_per_line")
    return open_store(
        build_store(write_spec(d, [written.glob], layout="episode_per_line"), d / "out").path
    )


def test_shapes_and_dtypes(store: TransitionStore) -> None:
    n = N_TRANSITIONS
    expected: dict[str, tuple[tuple[int, ...], Any]] = {
        "observations": ((n, OBS_DIM), np.float32),
        "actions": ((n,), np.int64),
        "rewards": ((n,), np.float32),
        "next_observations": ((n, OBS_DIM), np.float32),
        "terminated": ((n,), np.bool_),
        "truncated": ((n,), np.bool_),
        "return_to_go": ((n,), np.float32),
        "steps": ((n,), np.int32),
    }
    for name, (shape, dtype) in expected.items():
        a = getattr(store, name)
        assert a.shape == shape, name
        assert a.dtype == dtype, name
    assert len(store) == store.n_transitions == n
    assert store.n_episodes == 3
    assert store.obs_dim == OBS_DIM
    assert store.action_space.discrete and store.action_space.n == N_ACTIONS
    assert list(store.episode_id) == ["a"] * 3 + ["b"] * 2 + ["c"] * 2
    np.testing.assert_array_equal(store.steps, [0, 1, 2, 0, 1, 0, 1])
    np.testing.assert_array_equal(store.terminated, [0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(store.truncated, [0, 0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(store.next_observations[4], [9.0, 9.0, 9.0])
    np.testing.assert_array_equal(store.next_observations[6], [7.0, 7.0, 7.0])
    e = store.episodes
    assert e.episode_id == ["a", "b", "c"]
    np.testing.assert_array_equal(e.start, [0, 3, 5])
    np.testing.assert_array_equal(e.length, [3, 2, 2])
    # c's dropped last step still counts: its reward is in the return and return_to_go
    np.testing.assert_allclose(e.returns, [0.5, 0.5, 6.0])
    np.testing.assert_array_equal(e.dropped_reward, [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(e.last_step_dropped, [False, False, True])
    np.testing.assert_allclose(
        store.return_to_go[5:], [2.0 + 0.99 * (2.0 + 0.99 * 2.0), 2.0 + 0.99 * 2.0]
    )
    assert store.quarantine() == []
    assert store.obs_mean.shape == store.obs_std.shape == (OBS_DIM,)


def test_arrow_file_schema_is_the_documented_one(arrow_store: TransitionStore) -> None:
    with pa.memory_map(str(arrow_store.path / TRANSITIONS_ARROW)) as source:
        reader = pa.ipc.open_stream(source)
        schema = reader.schema
        batches = list(reader)
    assert schema.names == [
        "episode_id", "step", "observation", "action", "reward", "next_observation",
        "terminated", "truncated", "return_to_go",
    ]  # fmt: skip
    assert schema.field("episode_id").type == pa.string()
    assert schema.field("step").type == pa.int32()
    assert schema.field("observation").type == pa.list_(pa.float32(), OBS_DIM)
    assert schema.field("next_observation").type == pa.list_(pa.float32(), OBS_DIM)
    assert schema.field("action").type == pa.int64()
    assert schema.field("reward").type == pa.float32()
    assert schema.field("terminated").type == pa.bool_()
    assert schema.field("truncated").type == pa.bool_()
    assert schema.field("return_to_go").type == pa.float32()
    assert len(batches) == 1  # one batch: every column is one contiguous buffer
    with pa.memory_map(str(arrow_store.path / EPISODES_ARROW)) as source:
        episodes = pa.ipc.open_stream(source).read_all()
    assert episodes.column_names == [
        "episode_id", "start", "length", "return", "dropped_reward", "last_step_dropped",
        "terminated", "truncated", "source_file", "source_line",
    ]  # fmt: skip


def mapped_ranges(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of each address range where ``path`` is memory-mapped in
    this process."""
    target = str(path.resolve())
    out = []
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, int(parts[2], 16)))
    return out


def address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def column_offsets(path: Path) -> dict[str, int]:
    """Where each numeric column's values start in an Arrow IPC file, found by reading
    the file into memory (no map) and locating the buffers in it."""
    data = pa.py_buffer(path.read_bytes())
    table = pa.ipc.open_stream(data).read_all()
    out = {}
    for name in table.column_names:
        arr = table.column(name).chunk(0)
        if pa.types.is_fixed_size_list(arr.type):
            arr = arr.values
        if pa.types.is_string(arr.type) or pa.types.is_boolean(arr.type):
            continue
        out[name] = arr.buffers()[1].address - data.address + arr.offset * arr.type.bit_width // 8
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_arrow_columns_are_zero_copy_views_of_the_mapped_file(
    arrow_store: TransitionStore,
) -> None:
    path = arrow_store.path / TRANSITIONS_ARROW
    ranges = mapped_ranges(path)
    assert ranges, "transitions.arrow is not memory-mapped"
    offsets = column_offsets(path)
    for name, column in (
        ("observations", "observation"),
        ("next_observations", "next_observation"),
        ("actions", "action"),
        ("rewards", "reward"),
        ("return_to_go", "return_to_go"),
        ("steps", "step"),
    ):
        a = getattr(arrow_store, name)
        assert not a.flags.writeable, name
        assert a.flags.c_contiguous, name
        lo = address(a)
        where = [(s, off) for s, e, off in ranges if s <= lo and lo + a.nbytes <= e]
        assert where, f"{name} is not in the mapped file: a copy"
        # ... and it is that column's buffer, wherever the file holds it
        start, map_offset = where[0]
        assert map_offset + lo - start == offsets[column], name


def test_as_tensors(store: TransitionStore) -> None:
    import torch

    t = store.as_tensors()
    assert set(t) == {
        "observations", "actions", "rewards", "next_observations", "terminated", "truncated",
        "return_to_go",
    }  # fmt: skip
    assert t["observations"].dtype == torch.float32
    assert t["observations"].shape == (N_TRANSITIONS, OBS_DIM)
    assert t["actions"].dtype == torch.int64
    assert t["terminated"].dtype == torch.float32
    np.testing.assert_array_equal(t["observations"].numpy(), store.observations)
    np.testing.assert_array_equal(t["next_observations"].numpy(), store.next_observations)
    np.testing.assert_array_equal(t["actions"].numpy(), store.actions)
    np.testing.assert_array_equal(t["terminated"].numpy(), store.terminated.astype(np.float32))
    np.testing.assert_array_equal(t["truncated"].numpy(), store.truncated.astype(np.float32))
    if store.format == "arrow":  # on CPU the tensors share the mapped memory
        assert t["observations"].data_ptr() == address(store.observations)
        assert t["rewards"].data_ptr() == address(store.rewards)


def test_datasets_and_polars_read_the_arrow_file(arrow_store: TransitionStore) -> None:
    import datasets
    import polars as pl

    path = arrow_store.path / TRANSITIONS_ARROW
    ds = datasets.Dataset.from_file(str(path))
    assert ds.num_rows == N_TRANSITIONS
    assert ds.column_names[:3] == ["episode_id", "step", "observation"]
    assert ds["episode_id"][:] == list(arrow_store.episode_id)
    np.testing.assert_array_equal(
        np.asarray(ds["observation"][:], dtype=np.float32), arrow_store.observations
    )
    np.testing.assert_array_equal(
        np.asarray(ds["reward"][:], dtype=np.float32), arrow_store.rewards
    )

    df = pl.read_ipc_stream(path)
    assert df.height == N_TRANSITIONS
    np.testing.assert_array_equal(df["action"].to_numpy(), arrow_store.actions)
    np.testing.assert_array_equal(df["terminated"].to_numpy(), arrow_store.terminated)
    np.testing.assert_array_equal(
        np.stack(df["next_observation"].to_list()).astype(np.float32), arrow_store.next_observations
    )
    episodes = pl.read_ipc_stream(arrow_store.path / EPISODES_ARROW)
    assert episodes["episode_id"].to_list() == ["a", "b", "c"]


def test_open_store_errors_say_what_to_do(tmp_path: Path, arrow_store: TransitionStore) -> None:
    with pytest.raises(StoreError, match="not a store .*pipeline.build"):
        open_store(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(tmp_path)
    manifest = json.loads((arrow_store.path / MANIFEST).read_text(encoding="utf-8"))
    manifest["format_version"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(StoreError, match="format_version 99.*--force"):
        open_store(tmp_path)


# --------------------------------------------------------------------------- replay format


def replay(rid: str, moves: list[tuple[int, int, float]], done: bool) -> dict[str, Any]:
    """A replay as in the seed's format: reward on the last step, done when the game ended."""
    steps = [
        {
            "observation": {
                "turn": i, "team_id": 3, "weather_id": i % 2,
                "team_hp": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0 - i / 8],
            },
            "action_type": typ, "action_target": target, "reward": reward,
            "done": done and i == len(moves) - 1,
        }
        for i, (typ, target, reward) in enumerate(moves)
    ]  # fmt: skip
    total = sum(r for _, _, r in moves)
    return {"replay_id": rid, "player": "p1", "total_reward": total, "steps": steps}


def test_replay_format_keeps_the_last_step_and_final_reward(tmp_path: Path) -> None:
    replays = [
        replay("r1", [(0, 2, 0.0), (1, 5, 0.0), (0, 3, 1.0)], done=True),  # a win
        replay("r2", [(1, 0, 0.0), (0, 0, -1.0)], done=True),  # a loss
        replay("r3", [(0, 1, 1.0)], done=True),  # won in one move
        replay("r4", [(0, 1, 0.0), (1, 1, 0.0), (0, 0, 0.0)], done=False),  # log cut short
    ]
    write_lines(tmp_path / "raw" / "replays.jsonl", replays)
    spec = yaml.safe_load((REPO / "data_specs" / "replay-demo.yaml").read_text(encoding="utf-8"))
    spec["source"]["paths"] = [str(tmp_path / "raw" / "replays.jsonl")]
    spec_path = tmp_path / "replay.yaml"
    spec_path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    store = open_store(build_store(spec_path, tmp_path / "out").path)

    e = store.episodes
    assert e.episode_id == ["r1", "r2", "r3", "r4"]
    np.testing.assert_array_equal(e.length, [3, 2, 1, 2])  # the cut log loses its last step only
    np.testing.assert_array_equal(e.terminated, [True, True, True, False])
    np.testing.assert_array_equal(e.truncated, [False, False, False, True])
    np.testing.assert_allclose(e.returns, [1.0, -1.0, 1.0, 0.0])
    last = e.start + e.length - 1
    np.testing.assert_array_equal(store.rewards[last[:3]], [1.0, -1.0, 1.0])
    assert store.terminated[last[:3]].all()
    # move target k -> k; switch target k -> 4 + k
    np.testing.assert_array_equal(store.actions, [2, 9, 3, 4, 0, 1, 1, 5])
    assert store.action_space.n == 10
    # observation: turn, team_id, weather_id, then the six team_hp values
    assert store.obs_dim == 9
    np.testing.assert_array_equal(store.observations[1], [1, 3, 1, 1, 1, 1, 1, 1, 0.875])
    assert store.manifest["observation_space"]["labels"][:4] == [
        "turn",
        "team_id",
        "weather_id",
        "team_hp[0]",
    ]
    # the last transition of r1: the return-to-go of its first step includes the final reward
    assert store.return_to_go[0] == pytest.approx(0.99**2)


# --------------------------------------------------------------------------- observation shapes


@pytest.mark.parametrize(
    ("observation", "expected"),
    [
        ({"path": "o", "keys": ["pos.x", "pos.y", {"vel": 2}]}, [[0, 0, 0, 0], [1, -1, 1, 2]]),
        ({"path": "o", "keys": [{"vel": 2}, "pos.y"]}, [[0, 0, 0], [1, 2, -1]]),
        ({"path": "s"}, [[0.0], [0.5]]),
        ({"path": "s", "scalar": True}, [[0.0], [0.5]]),
        ({"path": "o.vel", "shape": [2]}, [[0, 0], [1, 2]]),
    ],
    ids=["nested-dict", "dict-order", "scalar-inferred", "scalar", "dotted-list"],
)
def test_observations_are_flattened_in_the_declared_order(
    tmp_path: Path, observation: dict[str, Any], expected: list[list[float]]
) -> None:
    records = [
        {"ep": "e", "t": t, "o": {"pos": {"x": t, "y": -t}, "vel": [t, 2 * t]}, "s": t / 2,
         "act": 0, "rew": 1.0, "term": t == 1, "trunc": False}
        for t in range(2)
    ]  # fmt: skip
    write_lines(tmp_path / "raw" / "a.jsonl", records)
    fields = {
        "observation": observation,
        "action": {"path": "act", "type": "discrete", "n": 2},
        "reward": {"path": "rew"},
        "terminated": {"path": "term"},
        "truncated": {"path": "trunc"},
    }
    spec = write_spec(tmp_path, [str(tmp_path / "raw" / "*")], fields=fields)
    store = open_store(build_store(spec, tmp_path / "out").path)
    np.testing.assert_array_equal(store.observations, np.asarray(expected, dtype=np.float32))
    np.testing.assert_array_equal(store.next_observations[0], store.observations[1])
    assert store.obs_dim == len(expected[0])
    assert len(store.manifest["observation_space"]["labels"]) == store.obs_dim


def test_demo_stores_shapes(demo_stores: dict[str, Path]) -> None:
    pendulum = open_store(demo_stores["pendulum-mixed"])
    assert pendulum.actions.shape == (len(pendulum), 1)
    assert pendulum.actions.dtype == np.float32
    assert not pendulum.actions.flags.writeable
    assert pendulum.obs_dim == 3
    assert pendulum.action_space.dim == 1
    np.testing.assert_array_equal(pendulum.action_space.low, [-2.0])
    assert (np.abs(pendulum.actions) <= 2.0).all()
    assert pendulum.truncated[pendulum.episodes.start + pendulum.episodes.length - 1].all()
    cartpole = open_store(demo_stores["cartpole-mixed"])
    assert cartpole.actions.shape == (len(cartpole),) and cartpole.actions.dtype == np.int64
    assert cartpole.obs_dim == 4
    zarr = open_store(demo_stores["pendulum-mixed-zarr"])
    assert zarr.content_hash == pendulum.content_hash
    np.testing.assert_array_equal(zarr.actions, pendulum.actions)
    # the demo's named reward: the pole's height, the observation's cos(theta)
    assert list(pendulum.reward_columns) == ["upright"]
    np.testing.assert_array_equal(pendulum.reward_columns["upright"], pendulum.observations[:, 0])
    np.testing.assert_array_equal(
        zarr.reward_columns["upright"], pendulum.reward_columns["upright"]
    )
