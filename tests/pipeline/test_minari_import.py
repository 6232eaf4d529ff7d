"""Minari datasets in: ``source: {format: minari, paths: [...]}``, against Minari's own
reader (``minari.MinariDataset.iterate_episodes``) on datasets its ``DataCollector``
recorded, in each of its three storage backends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline.format import BuildError
from pipeline.store import open_store
from tests.pipeline.conftest import (
    assert_one_error_line,
    build_store,
    quarantine_records,
    run_cli,
)

minari = pytest.importorskip("minari", reason="the minari extra (make setup installs it)")
from tests.pipeline.minari_data import record  # noqa: E402

BACKENDS = ("arrow", "hdf5", "parquet")


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MINARI_DATASETS_PATH of the datasets below (recorded once per session)."""
    root = tmp_path_factory.mktemp("minari")
    for backend in BACKENDS:
        record(root, f"test/cartpole-{backend}-v0", "CartPole-v1", backend=backend,
               episodes=6, max_episode_steps=16, ref_scores=(9.0, 500.0))  # fmt: skip
        record(root, f"test/pendulum-{backend}-v0", "Pendulum-v1", backend=backend,
               episodes=4, max_episode_steps=25, seed=5)  # fmt: skip
        record(root, f"test/dict-{backend}-v0", "CartPole-v1", backend=backend, dict_obs=True,
               episodes=3, seed=11)  # fmt: skip
    return root


def spec(tmp_path: Path, *paths: str | Path, name: str = "imported", **source: Any) -> Path:
    p = tmp_path / f"{name}.yaml"
    doc = {"name": name, "source": {"format": "minari", "paths": [str(x) for x in paths], **source}}
    p.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return p


def minari_episodes(dataset_dir: Path) -> list[Any]:
    return list(minari.MinariDataset(dataset_dir / "data").iterate_episodes())


def flat_obs(obs: Any, keys: list[str] | None) -> np.ndarray:
    if keys is None:
        return np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
    return np.concatenate([np.asarray(obs[k], dtype=np.float32) for k in keys], axis=1)


def assert_store_holds(store: Path, episodes: list[Any], keys: list[str] | None = None) -> None:
    """Row by row, a plain loop over Minari's episodes against the store's rows."""
    s = open_store(store)
    obs = s.column("observation")
    nxt = s.column("next_observation")
    act = s.column("action")
    rew = s.column("reward")
    term = s.column("terminated")
    trunc = s.column("truncated")
    eps = s.episode_table().to_pydict()
    assert eps["episode_id"] == [str(e.id) for e in episodes]
    row = 0
    for k, ep in enumerate(episodes):
        o = flat_obs(ep.observations, keys)
        n = len(ep.rewards)
        assert o.shape[0] == n + 1
        assert eps["start"][k] == row and eps["length"][k] == n
        assert eps["source_line"][k] == ep.id
        for t in range(n):
            np.testing.assert_array_equal(obs[row], o[t])
            np.testing.assert_array_equal(nxt[row], o[t + 1])  # the final one on the last row
            np.testing.assert_array_equal(act[row], np.asarray(ep.actions[t], dtype=act.dtype))
            assert rew[row] == np.float32(ep.rewards[t])
            last = t == n - 1
            assert bool(term[row]) == (last and bool(ep.terminations[-1]))
            # a log that just stops counts as truncated
            ends = bool(ep.truncations[-1]) or not bool(ep.terminations[-1])
            assert bool(trunc[row]) == (last and ends)
            row += 1
        assert eps["return"][k] == pytest.approx(float(np.sum(ep.rewards)))
    assert row == len(s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_discrete_and_box_datasets_import_step_for_step(
    minari_root: Path, tmp_path: Path, backend: str
) -> None:
    cart = minari_root / f"test/cartpole-{backend}-v0"
    result = build_store(spec(tmp_path, cart, name="cart"), tmp_path / "stores")
    episodes = minari_episodes(cart)
    assert {bool(e.terminations[-1]) for e in episodes} == {True, False}  # both endings
    assert_store_holds(result.path, episodes)
    m = result.manifest
    assert m["action_space"] == {"type": "discrete", "n": 2}
    assert m["spec"]["env"]["id"] == "CartPole-v1"
    assert m["spec"]["env"]["max_episode_steps"] == 16
    assert m["spec"]["reference_returns"]["random"] == 9.0
    assert m["spec"]["reference_returns"]["expert"] == 500.0
    assert m["counts"]["records"] == len(episodes) and m["counts"]["records_quarantined"] == 0

    pend = minari_root / f"test/pendulum-{backend}-v0"
    result = build_store(spec(tmp_path, pend, name="pend"), tmp_path / "stores")
    assert_store_holds(result.path, minari_episodes(pend))
    space = result.manifest["action_space"]
    assert space["type"] == "continuous" and space["low"] == [-2.0] and space["high"] == [2.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dict_observation_is_flattened_in_the_declared_order(
    minari_root: Path, tmp_path: Path, backend: str
) -> None:
    ds = minari_root / f"test/dict-{backend}-v0"
    episodes = minari_episodes(ds)
    declared = build_store(
        spec(tmp_path, ds, name="declared", observation_keys=["pole", "cart"]), tmp_path / "s"
    )
    assert_store_holds(declared.path, episodes, ["pole", "cart"])
    labels = declared.manifest["observation_space"]["labels"]
    assert labels == ["pole[0]", "pole[1]", "cart[0]", "cart[1]"]
    default = build_store(spec(tmp_path, ds, name="default"), tmp_path / "s")
    assert_store_holds(default.path, episodes, ["cart", "pole"])  # the dataset's (sorted) order


def test_a_dataset_id_resolves_under_minari_datasets_path(
    minari_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_root))
    by_id = build_store(spec(tmp_path, "test/cartpole-arrow-v0", name="a"), tmp_path / "s")
    by_dir = build_store(
        spec(tmp_path, minari_root / "test/cartpole-arrow-v0", name="b"), tmp_path / "s"
    )
    assert open_store(by_id.path).content_hash == open_store(by_dir.path).content_hash


def test_the_same_data_in_any_backend_is_the_same_store(minari_root: Path, tmp_path: Path) -> None:
    hashes = {
        b: open_store(
            build_store(
                spec(tmp_path, minari_root / f"test/cartpole-{b}-v0", name=b), tmp_path
            ).path
        ).content_hash
        for b in BACKENDS
    }
    assert len(set(hashes.values())) == 1, hashes


def test_two_datasets_keep_their_episodes_apart(minari_root: Path, tmp_path: Path) -> None:
    a, b = minari_root / "test/cartpole-arrow-v0", minari_root / "test/cartpole-hdf5-v0"
    result = build_store(spec(tmp_path, a, b, name="both"), tmp_path / "s")
    ids = open_store(result.path).episode_table().column("episode_id").to_pylist()
    n = len(minari_episodes(a))
    assert ids == [f"test/cartpole-arrow-v0/{i}" for i in range(n)] + [
        f"test/cartpole-hdf5-v0/{i}" for i in range(n)
    ]
    assert [s["path"] for s in result.manifest["sources"]] == [str(a), str(b)]


def test_building_again_is_up_to_date_and_a_changed_episode_rebuilds(
    minari_root: Path, tmp_path: Path
) -> None:
    ds = tmp_path / "copy-v0"
    shutil.copytree(minari_root / "test/cartpole-arrow-v0", ds)
    sp = spec(tmp_path, ds)
    first = build_store(sp, tmp_path / "s")
    assert build_store(sp, tmp_path / "s").status == "up to date"
    (ds / "data" / "1" / "metadata.json").write_text(
        (ds / "data" / "1" / "metadata.json").read_text().replace('"seed"', '"seed" ')
    )
    again = build_store(sp, tmp_path / "s")
    assert again.status == "built"
    assert again.manifest["sources"][0]["sha256"] != first.manifest["sources"][0]["sha256"]


def _rewrite_arrow(path: Path, fn: Any) -> None:
    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_file(src).read_all()
    table = fn(table)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def test_bad_episodes_are_quarantined_and_the_others_build(
    minari_root: Path, tmp_path: Path
) -> None:
    ds = tmp_path / "bad-v0"
    shutil.copytree(minari_root / "test/cartpole-arrow-v0", ds)
    data = ds / "data"
    shutil.rmtree(data / "1")  # a missing episode
    part = data / "2" / "part-0.arrow"
    part.write_bytes(part.read_bytes()[:200])  # a corrupt file
    _rewrite_arrow(data / "3" / "part-0.arrow", lambda t: t.slice(0, t.num_rows - 1))  # N obs
    result = build_store(spec(tmp_path, ds), tmp_path / "s")
    recs = quarantine_records(result.path)
    assert [(r["line"], r["reason"]) for r in recs] == [
        (1, "missing_episode"),
        (2, "unreadable_episode"),
        (3, "wrong_length"),
    ]
    assert all(r["file"] == str(ds) for r in recs)
    good = [e for e in minari_episodes(minari_root / "test/cartpole-arrow-v0") if e.id in (0, 4, 5)]
    assert_store_holds(result.path, good)
    assert result.manifest["counts"]["records"] == 6
    assert result.manifest["counts"]["records_quarantined"] == 3


def test_bad_hdf5_episodes_are_quarantined(minari_root: Path, tmp_path: Path) -> None:
    import h5py

    ds = tmp_path / "bad-v0"
    shutil.copytree(minari_root / "test/pendulum-hdf5-v0", ds)
    with h5py.File(ds / "data" / "main_data.hdf5", "a") as f:
        del f["episode_0"]  # missing
        g = f["episode_1"]
        rew = g["rewards"][()]
        del g["rewards"]
        g["rewards"] = rew[:-1]  # N - 1 rewards for N actions
        f["episode_2"]["observations"][3, 0] = np.nan  # a non-finite observation
    result = build_store(spec(tmp_path, ds), tmp_path / "s")
    assert [(r["line"], r["reason"]) for r in quarantine_records(result.path)] == [
        (0, "missing_episode"),
        (1, "wrong_length"),
        (2, "non_finite"),
    ]
    last = [e for e in minari_episodes(minari_root / "test/pendulum-hdf5-v0") if e.id == 3]
    assert_store_holds(result.path, last)


def _with_space(minari_root: Path, tmp_path: Path, key: str, space: dict[str, Any]) -> Path:
    ds = tmp_path / "odd-v0"
    shutil.copytree(minari_root / "test/cartpole-arrow-v0", ds)
    meta_path = ds / "data" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta[key] = json.dumps(space)
    meta_path.write_text(json.dumps(meta))
    return ds


@pytest.mark.parametrize(
    ("key", "space", "named"),
    [
        ("observation_space", {"type": "Text", "max_length": 5, "min_length": 1, "charset": "ab"}, "Text"),
        ("action_space", {"type": "MultiDiscrete", "nvec": [2, 3], "dtype": "int64"}, "MultiDiscrete"),
        ("observation_space", {"type": "Box", "dtype": "uint8", "shape": [8, 8, 3], "low": 0, "high": 255}, "image"),
    ],
)  # fmt: skip
def test_an_unsupported_space_is_refused_in_one_line(
    minari_root: Path, tmp_path: Path, key: str, space: dict[str, Any], named: str
) -> None:
    ds = _with_space(minari_root, tmp_path, key, space)
    proc = run_cli("pipeline.build", spec(tmp_path, ds), "--out", tmp_path / "s")
    assert_one_error_line(proc, named, key)
    assert not (tmp_path / "s" / "imported").exists()


def test_spec_errors_name_the_key(minari_root: Path, tmp_path: Path) -> None:
    ds = minari_root / "test/dict-arrow-v0"
    proc = run_cli(
        "pipeline.build", spec(tmp_path, ds, observation_keys=["pole"]), "--out", tmp_path / "s"
    )
    assert_one_error_line(proc, "observation_keys", "cart")
    p = tmp_path / "fields.yaml"
    p.write_text(
        yaml.safe_dump(
            {"name": "x", "source": {"format": "minari", "paths": [str(ds)]}, "fields": {}}
        )
    )
    assert_one_error_line(run_cli("pipeline.build", p, "--out", tmp_path / "s"), "fields")
    proc = run_cli("pipeline.build", spec(tmp_path, tmp_path / "nothing"), "--out", tmp_path / "s")
    assert_one_error_line(proc, "not a Minari dataset")


def test_without_h5py_an_hdf5_dataset_says_how_to_install(
    minari_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(BuildError, match=r'pip install -e "\.\[minari\]"'):
        build_store(spec(tmp_path, minari_root / "test/cartpole-hdf5-v0"), tmp_path / "s")


def test_inspect_says_what_an_import_would_read_without_building(
    minari_root: Path, tmp_path: Path
) -> None:
    ds = tmp_path / "dict-v0"
    shutil.copytree(minari_root / "test/dict-arrow-v0", ds)
    shutil.rmtree(ds / "data" / "2")
    proc = run_cli("pipeline.inspect", ds)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    steps = sum(len(e.rewards) for e in minari_episodes(minari_root / "test/dict-arrow-v0"))
    kept = sum(len(e.rewards) for e in minari_episodes(minari_root / "test/dict-arrow-v0")[:2])
    assert "backend         arrow" in out
    assert "3 listed, 2 with data, 1 missing (ids [2])" in out
    assert f"steps           {kept} (total_steps {steps})" in out
    assert "observation dim 4, the Dict flattened in the order cart (2), pole (2)" in out
    assert "discrete actions, n 2" in out and "env             CartPole-v1" in out
    assert list(ds.iterdir()) == [ds / "data"]  # nothing built or written

    env = {**os.environ, "MINARI_DATASETS_PATH": str(minari_root)}  # a dataset id works too
    by_id = subprocess.run(
        [sys.executable, "-m", "pipeline.inspect", "test/dict-parquet-v0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert by_id.returncode == 0, by_id.stderr
    assert "backend         parquet" in by_id.stdout and "3 listed, 3 with data" in by_id.stdout

    odd = _with_space(minari_root, tmp_path / "x", "action_space", {"type": "Text"})
    proc = run_cli("pipeline.inspect", odd)
    assert proc.returncode == 0, proc.stderr
    assert "action          Text" in proc.stdout
    assert "cannot import" in proc.stdout and "Text spaces are not supported" in proc.stdout


def test_the_ray_engine_imports_the_same_store(minari_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the Ray engine is an extra: pip install -e '.[ray]'")
    ds = tmp_path / "bad-v0"
    shutil.copytree(minari_root / "test/pendulum-parquet-v0", ds)
    shutil.rmtree(ds / "data" / "2")  # a quarantined episode too
    sp = spec(tmp_path, ds)
    local = build_store(sp, tmp_path / "local", chunk_bytes=4000)  # several tasks
    on_ray = build_store(sp, tmp_path / "ray", chunk_bytes=4000, engine="ray")
    assert on_ray.manifest["build_engine"] == "ray"
    for key in ("content_hash", "column_digests", "counts", "statistics"):
        assert on_ray.manifest[key] == local.manifest[key], key
    assert quarantine_records(on_ray.path) == quarantine_records(local.path)
    assert [r["reason"] for r in quarantine_records(local.path)] == ["missing_episode"]
