"""A transition store as a Minari dataset: ``python -m pipeline.export STORE --to minari --out DIR``.

``DIR`` becomes a Minari dataset directory whose dataset id is ``DIR``'s name, which must
read ``NAME-vN`` (Minari's rule: a name of letters, digits, ``-`` and ``_``, then a
version)::

    DIR/data/metadata.json        the dataset's metadata (below)
    DIR/data/0/part-0.arrow       --format arrow (the default): one directory per episode,
    DIR/data/0/metadata.json      its data (an Arrow IPC file) and its metadata
    DIR/data/0/part-0.parquet     --format parquet: the same, in Parquet
    DIR/data/main_data.hdf5       --format hdf5: one group ``episode_I`` per episode

``minari.MinariDataset("DIR/data")`` opens it, and so does ``minari.load_dataset(NAME-vN)``
with ``MINARI_DATASETS_PATH`` set to ``DIR``'s parent. The files are written here, an
episode at a time with whole-array NumPy / pyarrow operations, exactly as Minari's own
storages lay them out (``minari/dataset/_storages``): the observations of an episode of
``N`` steps are ``N + 1`` rows (``obs_0 .. obs_N``), and in the Arrow and Parquet files the
actions, rewards, terminations and truncations are padded with one zero row to ``N + 1``
(Minari's reader drops it). Rewards are float64, as Minari's collector writes them.

What maps to what:

* episodes: Minari's ids are ``0 .. E-1`` in store order; each episode's metadata keeps
  the store's ``episode_id`` (a string), beside Minari's ``id``, ``total_steps`` and the
  ``rewards_sum/mean/std/max/min`` its collector writes;
* observations: the rows' ``observation``, then the last row's ``next_observation`` (the
  final observation: the store never takes it from another episode);
* ``terminations`` / ``truncations``: the store's ``terminated`` / ``truncated``, as they
  are (never merged: only an episode's last step carries one, and exactly one);
* spaces: what the store holds, float32 observations ``Box(-inf, inf, (obs_dim,))`` and
  the manifest's action space (``Discrete(n)``, or ``Box(low, high, (dim,), float32)``),
  even where the environment declares another dtype (MuJoCo's float64);
* ``env_spec``: the spec's ``env`` (id, kwargs, max_episode_steps) over gymnasium's
  registration of that id, as gymnasium's ``EnvSpec`` JSON, so that
  ``dataset.recover_environment()`` makes the store's environment (an id
  ``module:Name-vN`` imports its module first); a store without ``env`` gets none;
* ``ref_min_score`` / ``ref_max_score``: the spec's ``reference_returns`` (random,
  expert), for ``minari.get_normalized_score``; ``description`` and ``offrl_store`` say
  which store (name, content hash) the dataset comes from;
* named reward columns (``reward_NAME``, a spec's ``fields.rewards``): Minari has one reward
  per step, so each goes in the step ``infos`` as ``reward_NAME`` (``N + 1`` values, as
  Minari keeps infos: the first, for the reset, is 0), listed in ``offrl_store.reward_columns``,
  and a dropped last step's in the episode metadata (``dropped_reward_NAME``); an import
  gives them back as the store's columns.

An episode cut off with no final observation lost its last step in the store: that step's
transition cannot be formed (there is no observation after it), so the build dropped it
and the new last row is ``truncated`` (docs/FORMAT.md, "Episode semantics"). The export
writes the transitions the store holds: that episode's Minari steps end with the
truncated step before the dropped one, and its last observation is the dropped step's
observation (the store's ``next_observation``). Its metadata says so:
``dropped_last_step: true`` and ``dropped_reward``, the reward of the dropped step (which
the store's episode ``return`` counts and ``rewards_sum`` does not). Every episode's
metadata carries both keys (``false`` / ``0.0`` where nothing was dropped).

The store is verified first (``pipeline.verify``); one that does not verify is refused.
``--force`` replaces an existing ``DIR`` only if it is a Minari dataset; the new one is
written beside it and moved into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.format import StoreError
from pipeline.interchange.common import open_verified_transitions
from pipeline.store import TransitionStore

# Minari's storage backends (minari.dataset._storages): --format values
BACKENDS = ("arrow", "hdf5", "parquet")
METADATA = "metadata.json"
HDF5_FILE = "main_data.hdf5"
# minari.dataset.minari_dataset.DATASET_ID_RE without a namespace (a directory name has no
# "/"), and with the version required (parse_dataset_id needs one)
DATASET_ID = re.compile(r"^(?P<name>[-_\w]+?)-v(?P<version>\d+)$")
INSTALL = 'pip install -e ".[minari]"'


def export(
    store: Path, out: Path, *, force: bool = False, file_format: str = "arrow", **options: Any
) -> list[str]:
    """Write ``store`` as the Minari dataset ``out`` (see the module docstring); the lines
    to print. StoreError with one line for any user error."""
    if options:
        raise StoreError(f"--to minari takes no option {', '.join(sorted(options))}")
    if file_format not in BACKENDS:
        raise StoreError(
            f"--format {file_format}: a Minari storage backend is one of {', '.join(BACKENDS)}"
        )
    out = Path(out)
    dataset_id = out.name
    if not DATASET_ID.match(dataset_id):
        raise StoreError(
            f"--out {out}: the directory's name is the Minari dataset id, which must read "
            f"NAME-vN (letters, digits, - and _, then a version), e.g. {_suggest_id(dataset_id)}"
        )
    _check_out(out, force)
    minari = _import_minari(file_format)

    t0 = time.perf_counter()
    data = _open_verified(Path(store))
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        metadata = write_dataset(data, staging / "data", dataset_id, file_format)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - t0

    ep = data.episodes
    dropped = int(ep.last_step_dropped.sum())
    lines = [
        f"exported {metadata['total_episodes']:,} episodes, {metadata['total_steps']:,} steps "
        f"of {store} to {out} (Minari {minari.__version__}, dataset {dataset_id}, "
        f"{file_format} backend) in {seconds:.1f}s",
    ]
    if "env_spec" not in metadata:
        lines.append("the store names no env: the dataset has its spaces but no env_spec")
    if dropped:
        lines.append(
            f"{dropped:,} episodes end one step early: the store dropped their "
            "unbootstrappable last step (dropped_last_step and dropped_reward in their metadata)"
        )
    lines.append(f'open it: minari.MinariDataset("{out / "data"}")')
    lines.append(
        f'   or: MINARI_DATASETS_PATH={parent} python -c "import minari; '
        f"print(minari.load_dataset('{dataset_id}'))\""
    )
    return lines


# --------------------------------------------------------------------------- checks


def _suggest_id(name: str) -> str:
    stem = re.sub(r"[^-_\w]+", "-", name).strip("-_") or "dataset"
    return f"{stem}-v0"


def _check_out(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise StoreError(f"--out {out} exists; pass --force to replace it")
    if not (out.is_dir() and (out / "data" / METADATA).is_file()):
        raise StoreError(
            f"--out {out} exists and is not a Minari dataset (no data/{METADATA}); "
            "--force replaces only a Minari dataset: remove it or choose another --out"
        )


def _import_minari(file_format: str) -> Any:
    try:
        import minari

        if file_format == "hdf5":
            import h5py  # noqa: F401  (minari[hdf5])
    except ImportError as e:
        raise StoreError(f"--to minari needs minari ({e.name} is missing): {INSTALL}") from None
    return minari


def _open_verified(path: Path) -> TransitionStore:
    return open_verified_transitions(path, "minari")


def _publish(staging: Path, out: Path) -> None:
    """Move the complete dataset into place, replacing an old one (already checked to be
    a Minari dataset) only once the new one is whole."""
    if out.exists() or out.is_symlink():
        old = staging.with_name(staging.name + ".old")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


# --------------------------------------------------------------------------- metadata


def spaces(store: TransitionStore) -> tuple[Any, Any]:
    """(observation_space, action_space) of the data as stored (gymnasium spaces)."""
    import gymnasium as gym

    obs = gym.spaces.Box(-np.inf, np.inf, (store.obs_dim,), np.float32)
    a = store.action_space
    if a.discrete:
        assert a.n is not None
        return obs, gym.spaces.Discrete(a.n)
    assert a.low is not None and a.high is not None and a.dim is not None
    low = np.broadcast_to(np.asarray(a.low, np.float32), (a.dim,))
    high = np.broadcast_to(np.asarray(a.high, np.float32), (a.dim,))
    return obs, gym.spaces.Box(low, high, (a.dim,), np.float32)


def env_spec_json(env: dict[str, Any], where: str) -> str:
    """gymnasium's EnvSpec JSON for a spec's ``env`` section: the id's registration, with
    the spec's kwargs over the registered ones and its max_episode_steps if set (what
    ``gymnasium.make(id, **kwargs, max_episode_steps=...)`` puts in ``env.spec``)."""
    import dataclasses
    import importlib

    import gymnasium as gym

    env_id = str(env["id"])
    name = env_id
    if ":" in env_id:  # gymnasium's "module:Name-vN": the module registers the id
        module, name = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise StoreError(
                f"{where}: env {env_id!r}: cannot import {module!r} ({e}); install it to export"
            ) from None
    try:
        spec = gym.spec(name)
    except gym.error.Error as e:
        raise StoreError(
            f"{where}: env {env_id!r} is not a registered gymnasium id ({e}); install the "
            "package that registers it, or name it as module:Name-vN in the spec's env.id"
        ) from None
    kwargs = env.get("kwargs") or {}
    if isinstance(kwargs, list | tuple):  # the resolved spec keeps kwargs as pairs
        kwargs = {str(k): v for k, v in kwargs}
    steps = env.get("max_episode_steps")
    spec = dataclasses.replace(
        spec,
        kwargs={**spec.kwargs, **kwargs},
        max_episode_steps=int(steps) if steps else spec.max_episode_steps,
    )
    try:
        return str(spec.to_json())
    except (TypeError, ValueError) as e:
        raise StoreError(f"{where}: env {env_id!r}: its spec is not JSON ({e})") from None


def dataset_metadata(
    store: TransitionStore, dataset_id: str, file_format: str, *, env_spec: str | None
) -> dict[str, Any]:
    """The dataset's ``metadata.json`` (the keys MinariStorage.new and
    minari.utils._generate_dataset_metadata write), less ``dataset_size``."""
    import minari
    from minari.serialization import serialize_space

    obs_space, act_space = spaces(store)
    ep = store.episodes
    m = store.manifest
    md: dict[str, Any] = {
        "total_episodes": len(ep),
        "total_steps": int(ep.length.sum()),
        "data_format": file_format,
        "jpeg_encoding": False,  # no image space: every array is written as it is
        "observation_space": serialize_space(obs_space),
        "action_space": serialize_space(act_space),
    }
    if env_spec is not None:
        md["env_spec"] = env_spec
    md["dataset_id"] = dataset_id
    md["algorithm_name"] = "offline data (offrl-store)"
    md["description"] = (
        f"Exported from the offrl-store transition store {m.get('name')!r} "
        f"(content {store.content_hash[:16]}); episode metadata keeps its episode_id."
    )
    md["minari_version"] = minari.__version__
    refs = store.reference_returns
    if refs:
        md["ref_min_score"] = float(refs["random"])
        md["ref_max_score"] = float(refs["expert"])
    md["offrl_store"] = {
        "name": m.get("name"),
        "content_hash": store.content_hash,
        "format_version": m.get("format_version"),
        "truncated_last_steps_dropped": int(ep.last_step_dropped.sum()),
        "reward_columns": list(store.reward_column_names),
    }
    return md


def episode_metadata(store: TransitionStore, i: int, rewards: np.ndarray) -> dict[str, Any]:
    """Episode ``i``'s metadata: Minari's keys (those its collector writes) and ours."""
    ep = store.episodes
    return {
        "id": i,
        "total_steps": int(ep.length[i]),
        "rewards_sum": float(rewards.sum()),
        "rewards_mean": float(rewards.mean()),
        "rewards_std": float(rewards.std()),
        "rewards_max": float(rewards.max()),
        "rewards_min": float(rewards.min()),
        "episode_id": ep.episode_id[i],
        "dropped_last_step": bool(ep.last_step_dropped[i]),
        "dropped_reward": float(ep.dropped_reward[i]),
        **{
            f"dropped_{column}": float(ep.dropped_named_rewards[name][i])
            for name, column in store.reward_column_names.items()
        },
    }


# --------------------------------------------------------------------------- data


def episode_arrays(
    store: TransitionStore, start: int, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One episode in Minari's shapes: observations (N + 1, obs_dim) float32, actions
    (N,) or (N, act_dim), rewards (N,) float64, terminations and truncations (N,) bool."""
    stop = start + length
    obs = np.concatenate([store.observations[start:stop], store.next_observations[stop - 1 : stop]])
    return (
        obs,
        np.asarray(store.actions[start:stop]),
        np.asarray(store.rewards[start:stop], dtype=np.float64),
        store.terminated[start:stop],
        store.truncated[start:stop],
    )


def named_reward_infos(store: TransitionStore, start: int, length: int) -> dict[str, np.ndarray]:
    """The episode's named rewards as Minari step infos: {reward_NAME: (N + 1,) float64},
    the first value (the reset's info) 0, then the reward of each step."""
    return {
        column: np.concatenate([[0.0], np.asarray(store.column(column)[start : start + length],
                                                  dtype=np.float64)])
        for column in store.reward_column_names.values()
    }  # fmt: skip


def write_dataset(
    store: TransitionStore, data: Path, dataset_id: str, file_format: str
) -> dict[str, Any]:
    """Write Minari's ``data`` directory for ``store``; its metadata."""
    env = store.env
    env_spec = env_spec_json(env, f"{store.path} (spec env)") if env else None
    metadata = dataset_metadata(store, dataset_id, file_format, env_spec=env_spec)
    data.mkdir(parents=True, exist_ok=True)
    if file_format == "hdf5":
        _write_hdf5(store, data)
    else:
        _write_arrow(store, data, file_format)
    metadata["dataset_size"] = _size_mb(data)
    (data / METADATA).write_text(json.dumps(metadata), encoding="utf-8")
    return metadata


def _fixed_list(values: np.ndarray) -> pa.Array:
    """(n, d) -> fixed_size_list<dtype>[d], as Minari encodes a Box (no copy)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), values.shape[1])


def _write_arrow(store: TransitionStore, data: Path, file_format: str) -> None:
    """One directory per episode: ``part-0.arrow`` (an Arrow IPC file of one record batch)
    or ``part-0.parquet``, as ``pyarrow.dataset.write_dataset`` partitioned by
    ``episode_id`` writes them for Minari, and ``metadata.json``."""
    import pyarrow.parquet as pq

    ep = store.episodes
    discrete = store.action_space.discrete
    for i, (start, length) in enumerate(zip(ep.start.tolist(), ep.length.tolist())):
        obs, act, rew, term, trunc = episode_arrays(store, start, length)
        act = np.concatenate([act, np.zeros((1, *act.shape[1:]), act.dtype)])
        columns = [
            _fixed_list(obs),
            pa.array(act) if discrete else _fixed_list(act),
            pa.array(np.append(rew, 0.0)),
            pa.array(np.append(term, False)),
            pa.array(np.append(trunc, False)),
        ]
        names = ["observations", "actions", "rewards", "terminations", "truncations"]
        infos = named_reward_infos(store, start, length)
        if infos:  # as minari's arrow storage encodes infos: a struct, N + 1 rows
            columns.append(
                pa.StructArray.from_arrays([pa.array(v) for v in infos.values()], list(infos))
            )
            names.append("infos")
        batch = pa.RecordBatch.from_arrays(columns, names=names)
        directory = data / str(i)
        directory.mkdir()
        if file_format == "parquet":
            pq.write_table(pa.Table.from_batches([batch]), directory / "part-0.parquet")
        else:
            with (
                pa.OSFile(str(directory / "part-0.arrow"), "wb") as sink,
                pa.ipc.new_file(sink, batch.schema) as writer,
            ):
                writer.write_batch(batch)
        (directory / METADATA).write_text(
            json.dumps(episode_metadata(store, i, rew)), encoding="utf-8"
        )


def _write_hdf5(store: TransitionStore, data: Path) -> None:
    """``main_data.hdf5``: a group ``episode_I`` per episode with the datasets and
    attributes that Minari's HDF5 storage writes (an empty ``infos`` group included)."""
    import h5py

    ep = store.episodes
    with h5py.File(data / HDF5_FILE, "w", track_order=True) as f:
        for i, (start, length) in enumerate(zip(ep.start.tolist(), ep.length.tolist())):
            arrays = episode_arrays(store, start, length)
            group = f.create_group(f"episode_{i}")
            group.attrs.update(episode_metadata(store, i, arrays[2]))
            names = ("observations", "actions", "rewards", "terminations", "truncations")
            for name, values in zip(names, arrays):
                group.create_dataset(
                    name, data=values, chunks=True, maxshape=(None, *values.shape[1:])
                )
            infos = group.create_group("infos")
            for name, values in named_reward_infos(store, start, length).items():
                infos.create_dataset(name, data=values, chunks=True, maxshape=(None,))


def _size_mb(path: Path) -> float:
    """The dataset's size in MB, as Minari's ``get_size`` counts it."""
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return float(np.round(total / 1_000_000, 1))
