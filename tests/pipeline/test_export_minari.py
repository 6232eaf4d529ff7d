"""``python -m pipeline.export STORE --to minari``: a Minari dataset that Minari's own
readers open, for each storage backend (arrow, hdf5, parquet).

The stores hold terminated, truncated and cut-off episodes (a truncated log with no final
observation, whose last step the build drops), with discrete and continuous actions; what
``minari`` reads back is held, episode by episode, against a plain loop over the rows of
the store's ``transitions.arrow``, and the cut-off episode against its input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline.format import StoreError
from pipeline.interchange.minari_export import export
from pipeline.transitions.layout import TRANSITIONS_ARROW

from .conftest import assert_one_error_line, build_store, run_cli, write_lines, write_spec

minari = pytest.importorskip("minari")

BACKENDS = ("arrow", "hdf5", "parquet")

# (id, length, end, has final observation); ids in order of first appearance in the file
EPISODES = (
    ("ep-a", 3, "terminated", True),
    ("7", 4, "truncated", True),  # an integer-looking id: Minari's ids are 0..E-1 anyway
    ("ep-cut", 5, "truncated", False),  # cut off, no final observation: last step dropped
    ("ep-d", 2, "terminated", False),  # next_observation repeats the observation
    ("ep-e", 3, "none", True),  # a log that just stops: truncated
    ("ep-f", 1, "terminated", True),
)
CUT = 2  # store order of ep-cut


def _records(obs_dim: int, act: Any, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """step_per_line records of EPISODES (values multiples of 1/8: exact in float32), and
    per episode id its input: observations, rewards, final observation."""
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    inputs: dict[str, Any] = {}
    for ep, length, end, has_final in EPISODES:
        obs = (rng.integers(-64, 64, size=(length + 1, obs_dim)) / 8).tolist()
        rew = (rng.integers(-64, 64, size=length) / 8).tolist()
        inputs[ep] = {"obs": obs[:length], "rew": rew, "final": obs[length] if has_final else None}
        for t in range(length):
            last = t == length - 1
            rec = {
                "ep": ep,
                "t": t,
                "obs": obs[t],
                "act": act(rng),
                "rew": rew[t],
                "term": last and end == "terminated",
                "trunc": last and end == "truncated",
            }
            if last and has_final:
                rec["final_obs"] = obs[length]
            records.append(rec)
    return records, inputs


def _fields(obs_dim: int, action: dict[str, Any]) -> dict[str, Any]:
    return {
        "observation": {"path": "obs", "shape": [obs_dim]},
        "action": {"path": "act", **action},
        "reward": {"path": "rew"},
        "terminated": {"path": "term"},
        "truncated": {"path": "trunc"},
        "final_observation": {"path": "final_obs"},
    }


STORES: dict[str, dict[str, Any]] = {
    "discrete": {
        "obs_dim": 4,
        "action": {"type": "discrete", "n": 2},
        "act": lambda rng: int(rng.integers(0, 2)),
        "extra": {
            "env": {"id": "CartPole-v1", "max_episode_steps": 50},
            "reference_returns": {"random": 10.0, "expert": 500.0},
        },
    },
    "continuous": {
        "obs_dim": 3,
        "action": {"type": "continuous", "shape": [1], "low": -2.0, "high": 2.0},
        "act": lambda rng: [float(rng.integers(-16, 16) / 8)],
        "extra": {"env": {"id": "Pendulum-v1", "kwargs": {"g": 9.5}}},
    },
    # the reader hides the layout: a zarr store, and an arrow store in parts of 4 rows
    # (episodes cut across parts)
    "zarr": {
        "obs_dim": 2,
        "action": {"type": "discrete", "n": 3},
        "act": lambda rng: int(rng.integers(0, 3)),
        "extra": {"fmt": "zarr"},
    },
    "parted": {
        "obs_dim": 3,
        "action": {"type": "continuous", "shape": [1], "low": -2.0, "high": 2.0},
        "act": lambda rng: [float(rng.integers(-16, 16) / 8)],
        "extra": {"env": {"id": "Pendulum-v1"}},
        "part_rows": 4,
    },
    "no-env": {
        "obs_dim": 5,
        "action": {"type": "continuous", "shape": [2], "low": [-1.0, 0.0], "high": [1.0, 3.0]},
        "act": lambda rng: [float(rng.integers(-8, 8) / 8), float(rng.integers(0, 24) / 8)],
        "extra": {},
    },
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each of STORES built: name -> (store, its inputs by episode id)."""
    out = {}
    for i, (name, s) in enumerate(STORES.items()):
        d = tmp_path_factory.mktemp(f"store-{name}")
        records, inputs = _records(s["obs_dim"], s["act"], seed=i)
        data = write_lines(d / "steps.jsonl", records)
        spec = write_spec(
            d, [data], name=name, fields=_fields(s["obs_dim"], s["action"]), **s["extra"]
        )
        if "part_rows" in s:
            y = yaml.safe_load(spec.read_text())
            y["store"]["part_rows"] = s["part_rows"]
            spec.write_text(yaml.safe_dump(y, sort_keys=False))
        path = build_store(spec, d / "stores").path
        if name == "parted":
            assert len(list((path / "transitions").glob("part-*.arrow"))) > 3
        if name == "zarr":
            assert (path / "store.zarr").is_dir() and not (path / TRANSITIONS_ARROW).exists()
        out[name] = (path, inputs)
    return out


def store_rows(store: Path) -> list[dict[str, Any]]:
    """The store's transitions as one dict per row, read from its files as they lie:
    ``transitions.arrow``, its parts in name order, or the zarr group's arrays."""
    if (store / "store.zarr").is_dir():
        import zarr

        g: Any = zarr.open_group(str(store / "store.zarr" / "transitions"), mode="r")
        columns = {name: np.asarray(g[name][...]).tolist() for name in g.array_keys()}
        return [dict(zip(columns, values)) for values in zip(*columns.values())]
    files = [store / TRANSITIONS_ARROW] if (store / TRANSITIONS_ARROW).exists() else []
    files += sorted((store / "transitions").glob("part-*.arrow"))
    rows: list[dict[str, Any]] = []
    for path in files:
        with pa.OSFile(str(path), "rb") as f:
            rows += pa.ipc.open_stream(f).read_all().to_pylist()
    return rows


def reference_episodes(store: Path) -> list[dict[str, Any]]:
    """Minari's view of a store, by a plain loop over its rows: per episode the rows'
    observations then the last row's next_observation, and the actions, rewards and
    flags of each row."""
    rows = store_rows(store)
    assert len(rows) == json.loads((store / "manifest.json").read_text())["counts"]["transitions"]
    episodes: list[dict[str, Any]] = []
    for row in rows:
        if not episodes or episodes[-1]["episode_id"] != row["episode_id"]:
            episodes.append(
                {"episode_id": row["episode_id"], "obs": [], "act": [], "rew": [], "term": [],
                 "trunc": [], "last_next": None}
            )  # fmt: skip
        e = episodes[-1]
        e["obs"].append(row["observation"])
        e["act"].append(row["action"])
        e["rew"].append(row["reward"])
        e["term"].append(row["terminated"])
        e["trunc"].append(row["truncated"])
        e["last_next"] = row["next_observation"]
    for e in episodes:
        e["obs"].append(e.pop("last_next"))
    return episodes


def open_both(out: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The dataset as ``MinariDataset(DIR/data)`` and as ``load_dataset(DIR.name)``."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out.parent))
    return [minari.MinariDataset(out / "data"), minari.load_dataset(out.name)]


@pytest.mark.parametrize("kind", list(STORES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_minari_reads_the_store_episode_by_episode(
    stores: dict[str, tuple[Path, dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    kind: str,
) -> None:
    store, inputs = stores[kind]
    out = tmp_path / f"{kind}-v0"
    lines = export(store, out, file_format=backend)
    assert any("minari.MinariDataset" in line for line in lines), lines
    ref = reference_episodes(store)
    assert [e["episode_id"] for e in ref] == [e[0] for e in EPISODES]
    for dataset in open_both(out, monkeypatch):
        assert dataset.id == out.name
        assert dataset.total_episodes == len(ref) == len(dataset)
        assert dataset.total_steps == sum(len(e["rew"]) for e in ref)
        got = list(dataset.iterate_episodes())
        assert len(got) == len(ref)
        for i, (g, r) in enumerate(zip(got, ref)):
            n = len(r["rew"])
            assert g.id == i
            assert len(g) == n
            assert g.observations.shape == (n + 1, STORES[kind]["obs_dim"])
            assert g.observations.dtype == np.float32
            np.testing.assert_array_equal(g.observations, np.asarray(r["obs"], np.float32))
            np.testing.assert_array_equal(g.actions, np.asarray(r["act"]))
            np.testing.assert_array_equal(g.rewards, np.asarray(r["rew"], np.float64))
            assert g.terminations.dtype == np.bool_ and g.truncations.dtype == np.bool_
            assert g.terminations.tolist() == r["term"]
            assert g.truncations.tolist() == r["trunc"]
        meta = list(dataset.storage.get_episode_metadata(range(len(ref))))
        assert [m["episode_id"] for m in meta] == [e["episode_id"] for e in ref]
        assert [int(m["id"]) for m in meta] == list(range(len(ref)))
        assert [int(m["total_steps"]) for m in meta] == [len(e["rew"]) for e in ref]
        assert [bool(m["dropped_last_step"]) for m in meta] == [i == CUT for i in range(len(ref))]
        # the cut-off episode: the transitions the store holds, ending truncated one step
        # early; its last observation is the dropped step's; its metadata keeps that reward
        cut = got[CUT]
        source = inputs["ep-cut"]
        assert len(cut) == len(source["rew"]) - 1
        assert cut.truncations[-1] and not cut.terminations.any()
        np.testing.assert_array_equal(cut.observations, np.asarray(source["obs"], np.float32))
        np.testing.assert_array_equal(cut.rewards, np.asarray(source["rew"][:-1]))
        assert float(meta[CUT]["dropped_reward"]) == source["rew"][-1]
        assert all(float(m["dropped_reward"]) == 0.0 for j, m in enumerate(meta) if j != CUT)
        # an episode with a final observation ends on it
        np.testing.assert_array_equal(got[0].observations[-1], inputs["ep-a"]["final"])


def test_the_files_are_minaris_layout(
    stores: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    """Arrow: one IPC file per episode, padded to N + 1 rows; metadata.json per episode;
    the dataset metadata with the keys Minari writes."""
    store, _ = stores["continuous"]
    out = tmp_path / "layout-v3"
    export(store, out)
    md = json.loads((out / "data" / "metadata.json").read_text())
    for key in ("total_episodes", "total_steps", "data_format", "observation_space",
                "action_space", "env_spec", "dataset_id", "minari_version"):  # fmt: skip
        assert key in md, key
    assert md["data_format"] == "arrow" and md["dataset_id"] == "layout-v3"
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(
        ["metadata.json", *map(str, range(len(EPISODES)))]
    )
    with pa.memory_map(str(out / "data" / "0" / "part-0.arrow")) as f:
        table = pa.ipc.open_file(f).read_all()
    assert table.num_rows == EPISODES[0][1] + 1  # N + 1: actions, rewards, flags padded
    assert table.column("rewards").type == pa.float64()
    assert table.column("rewards").to_pylist()[-1] == 0.0
    assert not table.column("terminations").to_pylist()[-1]
    assert list((out.parent).iterdir()) == [out]  # no staging directory left behind


def test_recover_environment_and_reference_scores(
    stores: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    export(stores["discrete"][0], tmp_path / "cp-v0")
    discrete = minari.MinariDataset(tmp_path / "cp-v0" / "data")
    env = discrete.recover_environment()
    assert env.spec is not None and env.spec.id == "CartPole-v1"
    assert env.spec.max_episode_steps == 50  # the spec's, not the registered 500
    assert env.action_space == gym.spaces.Discrete(2)
    assert discrete.action_space == gym.spaces.Discrete(2)
    assert discrete.observation_space == gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    assert discrete.storage.metadata["ref_min_score"] == 10.0
    assert discrete.storage.metadata["ref_max_score"] == 500.0
    np.testing.assert_allclose(
        minari.get_normalized_score(discrete, np.array([10.0, 500.0])), [0, 1]
    )

    export(stores["continuous"][0], tmp_path / "pend-v1", file_format="hdf5")
    pend = minari.MinariDataset(tmp_path / "pend-v1" / "data")
    env = pend.recover_environment()
    assert env.spec is not None and env.spec.id == "Pendulum-v1"
    assert env.unwrapped.g == 9.5  # the spec's kwargs
    assert env.spec.max_episode_steps == 200  # the registered one: the spec sets none
    assert pend.action_space == gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    assert "ref_min_score" not in pend.storage.metadata

    export(stores["no-env"][0], tmp_path / "plain-v0", file_format="parquet")
    plain = minari.MinariDataset(tmp_path / "plain-v0" / "data")
    assert plain.env_spec is None
    assert plain.observation_space == gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
    assert plain.action_space == gym.spaces.Box(
        np.array([-1.0, 0.0], np.float32), np.array([1.0, 3.0], np.float32), (2,), np.float32
    )


def test_force_replaces_a_dataset(
    stores: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    out = tmp_path / "again-v0"
    export(stores["discrete"][0], out, file_format="hdf5")
    with pytest.raises(StoreError, match="exists; pass --force"):
        export(stores["continuous"][0], out)
    export(stores["continuous"][0], out, force=True)
    assert minari.MinariDataset(out / "data").action_space == gym.spaces.Box(-2, 2, (1,))
    assert not (out / "data" / "main_data.hdf5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again-v0"]


# --------------------------------------------------------------------------- the CLI


def test_cli_exports_and_says_how_to_open(
    stores: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    out = tmp_path / "cli-v2"
    proc = run_cli(
        "pipeline.export", stores["discrete"][0], "--to", "minari", "--out", out,
        "--format", "parquet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"exported {len(EPISODES)} episodes" in proc.stdout
    assert "1 episodes end one step early" in proc.stdout
    assert f"MINARI_DATASETS_PATH={tmp_path}" in proc.stdout
    assert "load_dataset('cli-v2')" in proc.stdout
    assert (out / "data" / "0" / "part-0.parquet").is_file()


def _export_cli(store: Path, out: Path, *args: str) -> Any:
    return run_cli("pipeline.export", store, "--to", "minari", "--out", out, *args)


def test_cli_errors_are_one_line(
    stores: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    store = stores["discrete"][0]
    not_a_store = tmp_path / "empty"
    not_a_store.mkdir()
    assert_one_error_line(_export_cli(not_a_store, tmp_path / "a-v0"), "not a store")
    assert_one_error_line(_export_cli(store, tmp_path / "no_version"), "NAME-vN", "no_version-v0")
    assert_one_error_line(_export_cli(store, tmp_path / "b-v0", "--format", "csv"), "--format csv")

    exists = tmp_path / "there-v0"
    exists.mkdir()
    (exists / "keep.txt").write_text("mine")
    assert_one_error_line(_export_cli(store, exists), "exists; pass --force")
    assert_one_error_line(_export_cli(store, exists, "--force"), "not a Minari dataset")
    assert (exists / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "a-v0").exists() and not (tmp_path / "b-v0").exists()


def test_cli_refuses_a_store_that_does_not_verify(
    stores: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(stores["discrete"][0], broken)
    data = bytearray((broken / TRANSITIONS_ARROW).read_bytes())
    data[-100] ^= 0xFF
    (broken / TRANSITIONS_ARROW).write_bytes(bytes(data))
    out = tmp_path / "broken-v0"
    assert_one_error_line(_export_cli(broken, out), "does not verify", "pipeline.verify")
    assert not out.exists()


def test_cli_without_minari_says_how_to_install(
    stores: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in ``minari`` package that fails to import, ahead of the installed one."""
    fake = tmp_path / "site" / "minari"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'minari'\", name='minari')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    proc = _export_cli(stores["discrete"][0], tmp_path / "x-v0")
    assert_one_error_line(proc, "needs minari", 'pip install -e ".[minari]"')
