"""``python -m pipeline.export STORE --to d3rlpy --out FILE.h5``: a transition store as the
HDF5 file that ``d3rlpy.dataset.ReplayBuffer.load(FILE, d3rlpy.dataset.InfiniteBuffer())``
opens.

The layout is the one d3rlpy's own ``ReplayBuffer.dump`` writes (``d3rlpy.dataset.io``,
dataset version ``2.1``), written directly with h5py, one contiguous array per episode
and column, no per-step loop:

    columns            string (4,)  ["observations", "actions", "rewards", "terminated"]
    num_episodes       int64 ()     E
    version            string ()    "2.1"
    observations_{i}   float32 (T_i, obs_dim)
    actions_{i}        int64 (T_i, 1) (discrete) or float32 (T_i, act_dim) (continuous)
    rewards_{i}        float32 (T_i, 1)
    terminated_{i}     bool ()      the store's ``terminated`` of episode i

Episode semantics. A d3rlpy episode holds T observations and no next observations: its
transition ``k`` takes ``observations[k + 1]`` as next observation, and its last row is a
transition only when the episode terminated (then the next observation is zeros and
``terminal = 1``). So, as in the training adapter (``trainer.d3rlpy_adapter.mdp_arrays``):

* a terminated episode of L store rows is L rows; its L transitions are the store's, and
  ``terminal = 1`` on the last one. The store's ``next_observation`` of that last row (the
  final observation, or the observation repeated when the log had none) is NOT written:
  d3rlpy's format has no place for it, and it is never bootstrapped from;
* a truncated episode (a time limit, a log that just stops, or one cut off before a
  missing final observation) of L store rows is L + 1 rows: the extra row's observation
  is the last row's ``next_observation`` (the final observation, or the observation of
  the step the store dropped as unbootstrappable), with a zero reward and the last action
  repeated. d3rlpy makes L transitions of it, the last one ``terminal = 0`` with that
  final observation as its next observation: nothing of a transition is lost, and the
  timeout stays apart from the terminals (``terminated_i`` is false).

Every transition of the store is thus one transition of the file, in store order, with
the same observation, action, reward, next observation (a terminal one aside) and
terminal flag. What the file does not carry: the store's ``return_to_go`` (d3rlpy sums
the episode's rewards itself, the extra row's zero included), the reward of a last step
the store dropped (``episodes.dropped_reward``), named reward columns and episode ids
(the root attributes ``offrl_*`` name the store's content hash and action space). The
last transition of a truncated episode has the repeated action as d3rlpy's
``next_action``, as in the adapter.

The action space is carried by dtype (int64 indices, float32 vectors); d3rlpy infers the
space from the first episode's actions and a discrete size from the largest index, so
the export prints a note with the explicit ``action_space`` / ``action_size`` to pass when
that inference would be wrong (continuous actions that are all whole numbers; a discrete
space whose last actions never occur).

The store is verified first and refused unless it is a transition store that verifies.
Writing needs h5py only (the ``d3rlpy`` extra installs it); d3rlpy itself is not imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.format import StoreError
from pipeline.interchange.common import open_verified_transitions
from pipeline.store import TransitionStore

# d3rlpy.dataset.io.DATASET_VERSION of the layout written here (checked by the tests)
DATASET_VERSION = "2.1"
# the keys of d3rlpy's Episode.serialize(), in its order
COLUMNS = ("observations", "actions", "rewards", "terminated")
INSTALL_HINT = 'pip install -e ".[d3rlpy]"'


@dataclass(frozen=True)
class D3rlpyEpisode:
    """One episode as d3rlpy's ``Episode`` holds it."""

    observations: np.ndarray  # (T, obs_dim) float32; T = L + 1 when not terminated
    actions: np.ndarray  # (T, 1) int64 or (T, act_dim) float32
    rewards: np.ndarray  # (T, 1) float32
    terminated: bool


def d3rlpy_episodes(store: TransitionStore) -> Iterator[D3rlpyEpisode]:
    """The store's episodes, in order, as d3rlpy episodes (module doc): one slice of each
    column per episode, plus the final observation of a truncated one."""
    ep = store.episodes
    discrete = store.action_space.discrete
    obs, act, rew, nxt = (
        store.observations,
        store.actions,
        store.rewards,
        store.next_observations,
    )
    for start, length, terminated in zip(
        ep.start.tolist(), ep.length.tolist(), ep.terminated.tolist()
    ):
        stop = start + length
        o = np.asarray(obs[start:stop], dtype=np.float32)  # (L, obs_dim)
        a = np.asarray(act[start:stop])  # (L,) int64 or (L, act_dim) float32
        r = np.asarray(rew[start:stop], dtype=np.float32)  # (L,)
        if not terminated:
            o = np.concatenate([o, np.asarray(nxt[stop - 1 : stop], dtype=np.float32)])
            a = np.concatenate([a, a[-1:]])
            r = np.concatenate([r, np.zeros(1, dtype=np.float32)])
        yield D3rlpyEpisode(
            observations=o,
            actions=a.astype(np.int64).reshape(-1, 1) if discrete else a.astype(np.float32),
            rewards=r.reshape(-1, 1),
            terminated=bool(terminated),
        )


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise StoreError(f"--to d3rlpy needs h5py: {INSTALL_HINT}") from None
    return h5py


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise StoreError(f"--out {out}: a directory; --to d3rlpy writes one file, e.g. {out}.h5")
    if out.exists() and not force:
        raise StoreError(f"--out {out}: exists; pass --force to replace it")


def _open_verified(path: Path) -> TransitionStore:
    """The store at ``path``, refused unless it is a transition store that verifies."""
    store = open_verified_transitions(path, "d3rlpy")
    if store.n_episodes == 0:
        raise StoreError(f"{path}: holds no episode; d3rlpy cannot load an empty dataset")
    return store


def _action_notes(store: TransitionStore, first_actions: np.ndarray) -> list[str]:
    """Where d3rlpy's inference of the action space from the file would be wrong."""
    space = store.action_space
    how = "d3rlpy.dataset.ReplayBuffer(d3rlpy.dataset.InfiniteBuffer(), episodes=d3rlpy.dataset.load(d3rlpy.dataset.Episode, FILE)"
    if not space.discrete:
        if np.array_equal(first_actions.astype(np.int32), first_actions):
            return [
                "note: the first episode's actions are all whole numbers, which "
                "ReplayBuffer.load takes for a discrete space; load with "
                f"{how}, action_space=d3rlpy.ActionSpace.CONTINUOUS, action_size={space.dim})"
            ]
        return []
    seen = int(np.max(np.asarray(store.actions))) + 1
    if seen != space.n:
        return [
            f"note: the largest action in the store is {seen - 1}, so ReplayBuffer.load infers "
            f"action_size={seen} where the store declares {space.n}; load with "
            f"{how}, action_space=d3rlpy.ActionSpace.DISCRETE, action_size={space.n})"
        ]
    return []


def write_file(h5py: Any, store: TransitionStore, path: Path) -> dict[str, int]:
    """Write the d3rlpy layout (module doc) of ``store`` to ``path``; counts written."""
    space = store.action_space
    counts = {"episodes": 0, "rows": 0, "terminated": 0, "truncated": 0}
    with h5py.File(path, "w") as h5:
        h5.create_dataset("columns", data=np.array(COLUMNS, dtype=h5py.string_dtype()))
        h5.create_dataset("num_episodes", data=np.int64(store.n_episodes))
        for i, episode in enumerate(d3rlpy_episodes(store)):
            h5.create_dataset(f"observations_{i}", data=episode.observations)
            h5.create_dataset(f"actions_{i}", data=episode.actions)
            h5.create_dataset(f"rewards_{i}", data=episode.rewards)
            h5.create_dataset(f"terminated_{i}", data=np.bool_(episode.terminated))
            counts["episodes"] += 1
            counts["rows"] += len(episode.actions)
            counts["terminated" if episode.terminated else "truncated"] += 1
        h5.create_dataset("version", data=DATASET_VERSION, dtype=h5py.string_dtype())
        # read by nobody in d3rlpy: where the file came from and how its rows were made
        h5.attrs["offrl_store_content_hash"] = store.content_hash
        h5.attrs["offrl_action_space"] = space.type
        h5.attrs["offrl_action_size"] = int((space.n if space.discrete else space.dim) or 0)
        h5.attrs["offrl_truncated_episodes"] = (
            "one extra last row: the final next_observation, reward 0, the last action repeated"
        )
    return counts


def export(store: Path, out: Path, *, force: bool = False, **options: Any) -> list[str]:
    """Write transition store ``store`` as a d3rlpy HDF5 file at ``out``; the lines to print.

    The file appears whole or not at all (written beside ``out``, then renamed)."""
    if options.get("file_format") is not None:
        raise StoreError("--format: --to d3rlpy writes one HDF5 file and takes no --format")
    unknown = sorted(set(options) - {"file_format"})
    if unknown:
        raise StoreError(f"--to d3rlpy: unknown option {unknown[0]!r}")
    h5py = _import_h5py()
    out = Path(out)
    _check_out(out, force)
    ts = _open_verified(Path(store))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        counts = write_file(h5py, ts, tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise StoreError(f"--out {out}: cannot write it ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    start, length = int(ts.episodes.start[0]), int(ts.episodes.length[0])
    first_actions = np.asarray(ts.actions[start : start + length])
    lines = [
        f"wrote {out}: {counts['episodes']} episodes ({counts['terminated']} terminated, "
        f"{counts['truncated']} truncated), {ts.n_transitions} transitions in "
        f"{counts['rows']} rows (d3rlpy dataset version {DATASET_VERSION})",
        "each truncated episode ends with one extra row holding its final observation "
        "(reward 0, last action repeated); terminated episodes keep no final observation",
        f"load: d3rlpy.dataset.ReplayBuffer.load({str(out)!r}, d3rlpy.dataset.InfiniteBuffer())",
    ]
    return lines + _action_notes(ts, first_actions)
