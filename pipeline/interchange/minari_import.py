"""Minari datasets -> a transition store (``source: {format: minari, paths: [DIR or id]}``).

A Minari dataset directory holds ``data/metadata.json`` (the spaces, serialised by
``minari.serialization``; the environment spec; reference scores) and its episodes in one
of Minari's three storage backends:

- ``arrow``: ``data/<id>/part-0.arrow`` (Arrow IPC files) and ``data/<id>/metadata.json``;
- ``parquet``: the same with ``part-0.parquet``;
- ``hdf5``: ``data/main_data.hdf5``, one group ``episode_<id>`` per episode (its attributes
  are the episode's metadata).

Every backend keeps ``N + 1`` observations for an episode of ``N`` steps (the arrow and
parquet backends pad actions, rewards and flags with one row). The build turns episode
``id`` into rows whose observation is ``obs[t]``; the final observation ``obs[N]`` becomes
the last row's ``next_observation``, whether the episode terminated or was truncated, and
``terminations`` and ``truncations`` stay apart. The steps go through the same episode
rules as a log's (:func:`pipeline.transitions.episodes.build_transitions`).

The files are read here with pyarrow (arrow, parquet) and h5py (hdf5), not through
``minari``: an import needs the ``minari`` extra only for the hdf5 backend. What is checked,
episode by episode (a bad episode is quarantined with its reason; the others build):

- ``missing_episode``: the dataset's ``total_episodes`` lists an id with no data;
- ``unreadable_episode``: its file cannot be read (corrupt, truncated, a column missing);
- ``wrong_length``: not ``N + 1`` observations for ``N`` actions, rewards and flags (or not the
  ``total_steps`` its metadata gives);
- ``non_finite``, ``action_out_of_range``, ``empty_episode``, ``end_before_last_step``: as for
  logs.

Spaces: observations Box (flattened, as float32) or a Dict of Box flattened in the order of
``source.observation_keys`` (default: the dataset's); actions Discrete (from 0) or Box. Any
other space (Text, Tuple, Graph, MultiDiscrete, images, ...) is refused, the space named.

Each dataset is one source of the manifest: its directory, hashed over every file under
``data/`` (path and bytes), so a changed episode makes a new store. An episode's
``source_line`` is its Minari episode id. Episodes keep their Minari id as ``episode_id``
(prefixed with the dataset's name when several datasets are imported together), unless the
episode's metadata holds an ``episode_id``: a dataset that ``python -m pipeline.export --to
minari`` wrote gets the store's own ids back, and an episode whose unbootstrappable last step
the store had dropped (``dropped_last_step``, ``dropped_reward``) is dropped again, so
store -> Minari -> store gives the same store.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from data_specs.schema import (
    ActionSpec,
    EnvSpec,
    FieldPath,
    FieldsSpec,
    ObservationSpec,
    ObsKey,
    ReferenceReturns,
    TransitionSpec,
    reward_column,
)
from pipeline.format import BuildError
from pipeline.sources import SourceFile, _display
from pipeline.transitions.chunks import BuildContext, EpisodeChunk
from pipeline.transitions.parse import (
    ACTION_OUT_OF_RANGE,
    EMPTY_EPISODE,
    NON_FINITE,
    WRONG_LENGTH,
    ParsedSteps,
    Rejected,
)

METADATA = "metadata.json"
HDF5_FILE = "main_data.hdf5"
BACKENDS = ("arrow", "hdf5", "parquet")
DATASETS_PATH_VARIABLE = "MINARI_DATASETS_PATH"
DEFAULT_DATASETS_PATH = "~/.minari/datasets"
INSTALL_HINT = 'pip install -e ".[minari]" (make setup installs it)'

MISSING_EPISODE = "missing_episode"
UNREADABLE_EPISODE = "unreadable_episode"

# what the exporter writes in an episode's metadata (pipeline.interchange.minari_export)
META_EPISODE_ID = "episode_id"
META_LAST_STEP_DROPPED = "dropped_last_step"
META_DROPPED_REWARD = "dropped_reward"  # and dropped_reward_NAME for a named reward
META_STORE = "offrl_store"  # the dataset's metadata: the store it was exported from
INFOS = "infos"  # where named rewards travel, one value per step after the reset's


# --------------------------------------------------------------------------- spaces


@dataclass(frozen=True)
class Box:
    shape: tuple[int, ...]
    dtype: str
    low: tuple[float, ...]  # flattened
    high: tuple[float, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Discrete:
    n: int
    start: int = 0


@dataclass(frozen=True)
class DictSpace:
    items: tuple[tuple[str, Box], ...]  # in the dataset's order


Space = Box | Discrete | DictSpace


def _load_json(text: Any, where: str) -> dict[str, Any]:
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except ValueError as e:
            raise BuildError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(text, dict) or "type" not in text:
        raise BuildError(f"{where}: not a serialised space (no `type`)")
    return text


def _box(d: dict[str, Any], where: str) -> Box:
    shape = tuple(int(x) for x in d.get("shape", ()))
    dtype = str(d.get("dtype", "float32"))
    if dtype == "uint8" and len(shape) == 3:
        raise BuildError(
            f"{where}: an image space (Box uint8 {list(shape)}) is not supported; "
            "transition stores hold flat float vectors"
        )
    if np.dtype(dtype).kind not in "fiu":
        raise BuildError(f"{where}: a Box of {dtype} is not supported (numbers only)")
    size = int(np.prod(shape, dtype=np.int64))
    low = np.broadcast_to(np.asarray(d.get("low", -np.inf), dtype=np.float64), shape).ravel()
    high = np.broadcast_to(np.asarray(d.get("high", np.inf), dtype=np.float64), shape).ravel()
    assert low.size == size
    return Box(shape, dtype, tuple(float(x) for x in low), tuple(float(x) for x in high))


def parse_space(raw: Any, where: str, *, allow_dict: bool) -> Space:
    """A Minari-serialised space; BuildError naming any space a store cannot hold."""
    d = _load_json(raw, where)
    kind = d["type"]
    if kind == "Box":
        return _box(d, where)
    if kind == "Discrete":
        return Discrete(int(d["n"]), int(d.get("start", 0)))
    if kind == "Dict" and allow_dict:
        items = []
        for name, sub in (d.get("subspaces") or {}).items():
            s = _load_json(sub, f"{where}.{name}")
            if s["type"] != "Box":
                raise BuildError(
                    f"{where}: key {name!r} is a {s['type']} space; a Dict observation is "
                    "imported when every key is a Box"
                )
            items.append((str(name), _box(s, f"{where}.{name}")))
        if not items:
            raise BuildError(f"{where}: an empty Dict space")
        return DictSpace(tuple(items))
    supported = "Box or Dict of Box" if allow_dict else "Discrete or Box"
    raise BuildError(f"{where}: {kind} spaces are not supported; a store imports {supported}")


# --------------------------------------------------------------------------- datasets


@dataclass
class MinariDir:
    """One Minari dataset: where it is and what its metadata says."""

    root: Path  # the dataset directory (holds data/)
    data: Path  # root/data
    metadata: dict[str, Any]
    backend: str
    observation_space: Space
    action_space: Space
    name: str  # its dataset_id, or its directory's name

    _listing: list[tuple[str, int, int]] | None = None

    @property
    def listing(self) -> list[tuple[str, int, int]]:
        """(path relative to data/, size, mtime_ns) of every file under data/, sorted by
        path (listed once, by os.scandir: a dataset may hold a file per episode)."""
        if self._listing is None:
            out: list[tuple[str, int, int]] = []
            stack = [("", str(self.data))]
            while stack:
                rel, path = stack.pop()
                with os.scandir(path) as entries:
                    for e in entries:
                        name = f"{rel}{e.name}"
                        if e.is_dir(follow_symlinks=False):
                            stack.append((f"{name}/", e.path))
                        elif e.is_file():
                            st = e.stat()
                            out.append((name, st.st_size, st.st_mtime_ns))
            self._listing = sorted(out)
        return self._listing

    @property
    def files(self) -> list[Path]:
        """Every file under data/, sorted by relative path."""
        return [self.data / rel for rel, _, _ in self.listing]


def datasets_path() -> Path:
    return Path(os.path.expanduser(os.environ.get(DATASETS_PATH_VARIABLE, DEFAULT_DATASETS_PATH)))


def find_dataset(text: str, origin: str = "spec") -> Path:
    """The data/ directory of a dataset named by a path (the dataset or its data/) or by a
    dataset id under MINARI_DATASETS_PATH."""
    p = Path(os.path.expanduser(text))
    for cand in (p / "data", p):
        if (cand / METADATA).is_file() and cand.name == "data":
            return cand
    if not p.is_absolute():
        cand = datasets_path() / text / "data"
        if (cand / METADATA).is_file():
            return cand
    raise BuildError(
        f"{origin}: source.paths: {text!r} is not a Minari dataset (no data/{METADATA} there) "
        f"nor a dataset id under {DATASETS_PATH_VARIABLE} ({datasets_path()})"
    )


def open_dataset(data: Path) -> MinariDir:
    where = str(data / METADATA)
    try:
        meta = json.loads((data / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuildError(f"{where}: cannot read the dataset's metadata ({e})") from None
    backend = meta.get("data_format", "hdf5")
    if backend not in BACKENDS:
        raise BuildError(f"{where}: data_format {backend!r}; Minari's backends are {BACKENDS}")
    for key in ("observation_space", "action_space"):
        if key not in meta:
            raise BuildError(f"{where}: no {key}")
    obs = parse_space(meta["observation_space"], f"{where}: observation_space", allow_dict=True)
    act = parse_space(meta["action_space"], f"{where}: action_space", allow_dict=False)
    if isinstance(act, Box) and len(act.shape) != 1:
        raise BuildError(
            f"{where}: action_space: a Box of shape {list(act.shape)}; continuous actions are "
            "vectors (one dimension)"
        )
    name = str(meta.get("dataset_id") or data.parent.name)
    return MinariDir(data.parent, data, meta, backend, obs, act, name)


def resolve_datasets(patterns: tuple[str, ...], origin: str = "spec") -> list[MinariDir]:
    """The datasets of ``source.paths`` (globs of directories, or dataset ids), in order."""
    seen: dict[Path, None] = {}
    for pat in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pat))) if glob.has_magic(pat) else [pat]
        if not matches:
            raise BuildError(f"{origin}: source.paths: {pat!r} matches nothing")
        for m in matches:
            seen.setdefault(find_dataset(m, origin).resolve(), None)
    return [open_dataset(d) for d in seen]


def dataset_source(index: int, ds: MinariDir) -> SourceFile:
    """The manifest's source entry of a dataset: its directory, every file under data/
    counted in its size and mtime (hashed by :func:`pipeline.sources.dir_sha256`)."""
    size = sum(n for _, n, _ in ds.listing)
    mtime = max((t for _, _, t in ds.listing), default=0)
    return SourceFile(index, ds.root, _display(ds.root), size, mtime)


# --------------------------------------------------------------------------- the spec


def _obs_order(ds: MinariDir, keys: tuple[str, ...] | None, where: str) -> tuple[str, ...]:
    space = ds.observation_space
    if not isinstance(space, DictSpace):
        if keys is not None:
            raise BuildError(
                f"{where}: source.observation_keys is for Dict observations; {ds.name}'s "
                "observation space is a Box"
            )
        return ()
    names = tuple(n for n, _ in space.items)
    if keys is None:
        return names
    if sorted(keys) != sorted(names) or len(set(keys)) != len(keys):
        raise BuildError(
            f"{where}: source.observation_keys {list(keys)} must list each key of "
            f"{ds.name}'s Dict observation once: {list(names)}"
        )
    return keys


def _env(meta: dict[str, Any]) -> EnvSpec | None:
    raw = meta.get("env_spec")
    if not raw:
        return None
    try:
        d = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except ValueError:
        return None
    if not isinstance(d, dict) or not d.get("id"):
        return None
    kwargs = d.get("kwargs") or {}
    mes = d.get("max_episode_steps")
    return EnvSpec(
        id=str(d["id"]),
        kwargs=tuple(sorted(kwargs.items())) if isinstance(kwargs, dict) else (),
        max_episode_steps=int(mes) if isinstance(mes, int) and mes > 0 else None,
    )


def _reward_names(datasets: list[MinariDir], where: str) -> tuple[str, ...]:
    """The named reward columns a dataset written by ``pipeline.export --to minari`` carries
    in its step infos (``offrl_store.reward_columns``); every dataset must carry the same."""
    found = []
    for ds in datasets:
        store = ds.metadata.get(META_STORE)
        names = store.get("reward_columns") if isinstance(store, dict) else None
        found.append(tuple(str(n) for n in names) if isinstance(names, list) else ())
    if len(set(found)) > 1:
        raise BuildError(
            f"{where}: the datasets carry different named reward columns "
            f"({', '.join(f'{ds.name}: {list(n)}' for ds, n in zip(datasets, found))}); "
            "import them into separate stores"
        )
    return found[0]


def resolve_spec(spec: TransitionSpec, datasets: list[MinariDir]) -> TransitionSpec:
    """The spec with the fields the datasets' spaces give (every dataset must agree), its
    env from ``env_spec`` and its reference returns from the reference scores, unless the
    spec gives them."""
    where = spec.origin
    first = datasets[0]
    for ds in datasets[1:]:
        if (ds.observation_space, ds.action_space) != (first.observation_space, first.action_space):
            raise BuildError(
                f"{where}: {ds.name} and {first.name} have different observation or action "
                "spaces; import them into separate stores"
            )
    keys = _obs_order(first, spec.source.observation_keys, where)
    space = first.observation_space
    if isinstance(space, DictSpace):
        boxes = dict(space.items)
        obs = ObservationSpec(
            path="observations", keys=tuple(ObsKey(k, boxes[k].size) for k in keys)
        )
    else:
        assert isinstance(space, Box)
        obs = ObservationSpec(path="observations", size=space.size)
    act_space = first.action_space
    if isinstance(act_space, Discrete):
        if act_space.start != 0:
            raise BuildError(
                f"{where}: {first.name}'s action space is Discrete({act_space.n}, "
                f"start={act_space.start}); discrete actions are imported from 0"
            )
        action = ActionSpec(type="discrete", path="actions", n=act_space.n)
    else:
        assert isinstance(act_space, Box)
        action = ActionSpec(
            type="continuous",
            path="actions",
            size=act_space.size,
            low=act_space.low,
            high=act_space.high,
        )
    names = _reward_names(datasets, where)
    fields = FieldsSpec(
        observation=obs,
        action=action,
        reward=FieldPath("rewards"),
        terminated=FieldPath("terminations"),
        truncated=FieldPath("truncations"),
        rewards=tuple((n, FieldPath(f"{INFOS}.{reward_column(n)}")) for n in names),
    )
    env = spec.env or _env(first.metadata)
    refs = spec.reference_returns
    lo, hi = first.metadata.get("ref_min_score"), first.metadata.get("ref_max_score")
    if refs is None and isinstance(lo, int | float) and isinstance(hi, int | float) and lo != hi:
        refs = ReferenceReturns(random=float(lo), expert=float(hi))
    return replace(spec, fields=fields, env=env, reference_returns=refs)


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Layout:
    """How a worker turns a dataset's arrays into step rows."""

    obs_keys: tuple[str, ...]  # Dict observations: flattened in this order; () for a Box
    obs_dim: int
    discrete: bool
    act_dim: int
    n_actions: int
    low: tuple[float, ...]
    high: tuple[float, ...]
    reward_names: tuple[str, ...] = ()  # named rewards, read from the step infos


def layout_of(spec: TransitionSpec) -> Layout:
    o, a = spec.fields.observation, spec.fields.action
    keys = tuple(k.path for k in o.keys) if o.keys is not None else ()
    return Layout(
        keys,
        int(o.dim or 0),
        a.type == "discrete",
        int(a.size or 0),
        int(a.n or 0),
        tuple(a.low or ()),
        tuple(a.high or ()),
        tuple(name for name, _ in spec.fields.rewards),
    )


@dataclass(frozen=True)
class MinariTask:
    """Some episodes of one dataset, for one worker."""

    index: int
    file_index: int
    data: str  # the dataset's data/ directory
    backend: str
    ids: tuple[int, ...]  # episodes to read, in order
    missing: tuple[int, ...]  # ids its metadata lists that have no data
    layout: Layout
    prefix: str  # prepended to Minari ids ("" for one dataset)
    exclude: tuple[int, ...] = ()  # ids left out (duplicate episode ids)


def episode_ids(ds: MinariDir) -> tuple[list[int], list[int], dict[int, int]]:
    """(ids present, ids listed but missing, bytes per present id)."""
    present: dict[int, int] = {}
    if ds.backend == "hdf5":
        h5py = import_h5py()
        path = ds.data / HDF5_FILE
        try:
            with h5py.File(path, "r") as f:
                for key in f:
                    if key.startswith("episode_") and key[8:].isdigit():
                        present[int(key[8:])] = 0
        except OSError as e:
            raise BuildError(f"{path}: cannot open the dataset's HDF5 file ({e})") from None
        per = max(1, path.stat().st_size // max(1, len(present)))
        present = {i: per for i in present}
    else:
        for rel, size, _ in ds.listing:  # data/<id>/<file>
            head, _, rest = rel.partition("/")
            if rest and head.isdigit():
                present[int(head)] = present.get(int(head), 0) + size
    listed = ds.metadata.get("total_episodes")
    expected = set(range(int(listed))) if isinstance(listed, int) else set()
    missing = sorted(expected - set(present))
    return sorted(present), missing, present


def plan_tasks(
    datasets: list[MinariDir], spec: TransitionSpec, chunk_bytes: int
) -> list[MinariTask]:
    """The datasets' episodes in tasks of about ``chunk_bytes`` of files each; a missing
    episode goes with the task of the ids around it (quarantine stays in id order)."""
    lay = layout_of(spec)
    tasks: list[MinariTask] = []
    for fi, ds in enumerate(datasets):
        prefix = f"{ds.name}/" if len(datasets) > 1 else ""
        ids, missing, sizes = episode_ids(ds)
        groups: list[list[int]] = [[]]
        size = 0
        for i in ids:
            if size >= chunk_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += sizes[i]
        lost: list[list[int]] = [[] for _ in groups]
        for m in missing:  # before the first id of the next group
            k = next((g for g in range(1, len(groups)) if m < groups[g][0]), len(groups)) - 1
            lost[k].append(m)
        for group, gone in zip(groups, lost, strict=True):
            if group or gone:
                task = MinariTask(
                    len(tasks), fi, str(ds.data), ds.backend, tuple(group), tuple(gone), lay, prefix
                )
                tasks.append(task)
    return tasks


# --------------------------------------------------------------------------- reading


def import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise BuildError(
            f"reading a Minari dataset of the hdf5 backend needs h5py: {INSTALL_HINT}"
        ) from None
    return h5py


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Episode:
    obs: np.ndarray  # (N + 1, obs_dim), in the file's dtype until checked
    act: np.ndarray  # (N,) int64 or (N, act_dim)
    rew: np.ndarray  # (N,)
    term: np.ndarray  # (N,) bool
    trunc: np.ndarray  # (N,) bool
    meta: dict[str, Any] = field(default_factory=dict)
    named: np.ndarray | None = None  # (N, K) named rewards (Layout.reward_names)


def _numbers(arr: Any, what: str) -> np.ndarray:
    """A primitive Arrow array without nulls as NumPy, viewed from its buffers (no copy;
    pyarrow's own ``to_numpy`` would import pandas)."""
    import pyarrow as pa

    t = arr.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise _Bad(UNREADABLE_EPISODE, f"{what}: values of type {t}, expected numbers")
    if arr.null_count:
        raise _Bad(UNREADABLE_EPISODE, f"{what} has {arr.null_count} missing values")
    data = arr.buffers()[1]
    if pa.types.is_boolean(t):
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return bits[arr.offset : arr.offset + len(arr)].astype(bool)
    dt = np.dtype(t.to_pandas_dtype())
    return np.frombuffer(data, dtype=dt, count=len(arr), offset=arr.offset * dt.itemsize)


def _matrix(col: Any, rows: int, width: int, what: str) -> np.ndarray:
    """(rows, width) in its own dtype: an Arrow (fixed-size) list column or a numeric one."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise _Bad(UNREADABLE_EPISODE, f"{what} has {arr.null_count} missing values")
    if pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type):
        arr = arr.flatten()
    values = _numbers(arr, what)
    if values.size != rows * width:
        raise _Bad(WRONG_LENGTH, f"{what}: {values.size} values for {rows} rows of {width}")
    return values.reshape(rows, width)


def _read_arrow(path: Path, backend: str, lay: Layout) -> _Episode:
    import pyarrow as pa

    files = sorted(f for f in path.iterdir() if f.is_file() and f.name != METADATA)
    if not files:
        raise _Bad(MISSING_EPISODE, f"{path}: the episode's directory holds no data file")
    try:
        if backend == "parquet":
            import pyarrow.parquet as pq

            tables = [pq.read_table(f) for f in files]
        else:
            tables = []
            for f in files:
                with pa.memory_map(str(f), "r") as src:
                    tables.append(pa.ipc.open_file(src).read_all())
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except (OSError, pa.ArrowException) as e:
        raise _Bad(UNREADABLE_EPISODE, f"{path}: {str(e).splitlines()[0][:200]}") from None
    need = ("observations", "actions", "rewards", "terminations", "truncations")
    absent = [c for c in need if c not in table.column_names]
    if absent:
        raise _Bad(UNREADABLE_EPISODE, f"{path}: no column {absent[0]!r}")
    rows = table.num_rows
    meta: dict[str, Any] = {}
    mp = path / METADATA
    if mp.is_file():
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
        except ValueError as e:
            raise _Bad(UNREADABLE_EPISODE, f"{mp}: {e}") from None
    n = rows - 1
    total = meta.get("total_steps")
    if isinstance(total, int) and total != n:
        raise _Bad(
            WRONG_LENGTH,
            f"{rows} observations but total_steps {total}: an episode of N steps has N + 1",
        )
    if n < 0:
        raise _Bad(WRONG_LENGTH, "no observation")
    obs_col = table.column("observations")
    if lay.obs_keys:
        import pyarrow as pa

        s = obs_col.combine_chunks() if isinstance(obs_col, pa.ChunkedArray) else obs_col
        parts = []
        for k in lay.obs_keys:
            try:
                sub = s.field(k)
            except (KeyError, pa.ArrowException):
                raise _Bad(UNREADABLE_EPISODE, f"observations have no key {k!r}") from None
            width = sub.type.list_size if pa.types.is_fixed_size_list(sub.type) else 1
            parts.append(_matrix(sub, rows, width, f"observations[{k!r}]"))
        obs = np.concatenate(parts, axis=1)
    else:
        obs = _matrix(obs_col, rows, lay.obs_dim, "observations")
    if lay.discrete:
        act = _matrix(table.column("actions"), rows, 1, "actions")[:n, 0]
    else:
        act = _matrix(table.column("actions"), rows, lay.act_dim, "actions")[:n]
    rew = _matrix(table.column("rewards"), rows, 1, "rewards")[:n, 0]
    term = _matrix(table.column("terminations"), rows, 1, "terminations")[:n, 0].astype(bool)
    trunc = _matrix(table.column("truncations"), rows, 1, "truncations")[:n, 0].astype(bool)
    named = None
    if lay.reward_names:
        if INFOS not in table.column_names:
            raise _Bad(UNREADABLE_EPISODE, f"{path}: no column {INFOS!r} (the named rewards)")
        infos = table.column(INFOS).combine_chunks()
        cols = []
        for name in lay.reward_names:
            key = reward_column(name)
            try:
                sub = infos.field(key)
            except (KeyError, pa.ArrowException):
                raise _Bad(UNREADABLE_EPISODE, f"{path}: infos have no {key!r}") from None
            cols.append(_matrix(sub, rows, 1, f"infos[{key!r}]")[1:, 0])
        named = np.stack(cols, axis=1)
    return _Episode(obs, act, rew, term, trunc, meta, named)


def _h5_obs(node: Any, lay: Layout) -> np.ndarray:
    if lay.obs_keys:
        parts = []
        for k in lay.obs_keys:
            if k not in node:
                raise _Bad(UNREADABLE_EPISODE, f"observations have no key {k!r}")
            a = np.asarray(node[k][()], dtype=np.float64)
            parts.append(a.reshape(len(a), -1))
        if len({len(p) for p in parts}) != 1:
            raise _Bad(WRONG_LENGTH, "the keys of the Dict observation differ in length")
        return np.concatenate(parts, axis=1)
    a = np.asarray(node[()], dtype=np.float64)
    return a.reshape(len(a), -1)


def _read_hdf5(file: Any, eid: int, lay: Layout) -> _Episode:
    key = f"episode_{eid}"
    try:
        g = file[key]
        need = ("observations", "actions", "rewards", "terminations", "truncations")
        absent = [c for c in need if c not in g]
        if absent:
            raise _Bad(UNREADABLE_EPISODE, f"{key}: no dataset {absent[0]!r}")
        obs = _h5_obs(g["observations"], lay)
        act_raw = np.asarray(g["actions"][()])
        rew = np.asarray(g["rewards"][()], dtype=np.float64).reshape(-1)
        term = np.asarray(g["terminations"][()]).astype(bool).reshape(-1)
        trunc = np.asarray(g["truncations"][()]).astype(bool).reshape(-1)
        meta = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in g.attrs.items()}
        named = None
        if lay.reward_names:
            info = g.get(INFOS, {})
            keys = [reward_column(n) for n in lay.reward_names]
            if any(k not in info for k in keys):
                raise _Bad(UNREADABLE_EPISODE, f"{key}: infos lack the named rewards {keys}")
            named = np.stack(
                [np.asarray(info[k][()], dtype=np.float64).reshape(-1) for k in keys], axis=1
            )
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise _Bad(UNREADABLE_EPISODE, f"{key}: {str(e).splitlines()[0][:200]}") from None
    n = len(rew)
    lengths = {"actions": len(act_raw), "terminations": len(term), "truncations": len(trunc)}
    odd = {k: v for k, v in lengths.items() if v != n}
    if odd or len(obs) != n + 1:
        raise _Bad(
            WRONG_LENGTH,
            f"{len(obs)} observations, {len(act_raw)} actions, {n} rewards, {len(term)} "
            f"terminations, {len(trunc)} truncations: an episode of N steps has N + 1 "
            "observations and N of the others",
        )
    act: np.ndarray
    if lay.discrete:
        act = act_raw.reshape(n)
    else:
        act = np.asarray(act_raw, dtype=np.float64).reshape(n, -1)
        if act.shape[1] != lay.act_dim:
            raise _Bad(
                WRONG_LENGTH, f"actions of width {act.shape[1]}, the space's is {lay.act_dim}"
            )
    if named is not None and len(named) != n + 1:
        raise _Bad(WRONG_LENGTH, f"{len(named)} infos for {n} steps: Minari keeps N + 1")
    if obs.shape[1] != lay.obs_dim:
        raise _Bad(
            WRONG_LENGTH, f"observations of width {obs.shape[1]}, the space's is {lay.obs_dim}"
        )
    return _Episode(obs, act, rew, term, trunc, meta, None if named is None else named[1:])


def _check(ep: _Episode, lay: Layout) -> None:
    """The value checks a log's steps get (reasons as in pipeline.transitions.parse)."""
    n = len(ep.rew)
    if n == 0:
        raise _Bad(EMPTY_EPISODE, "an episode of no step")
    bad = ~np.isfinite(ep.obs).all(axis=1)
    if bad.any():
        raise _Bad(NON_FINITE, f"observation {int(np.flatnonzero(bad)[0])} is not finite")
    if ep.named is not None and not np.isfinite(ep.named).all():
        raise _Bad(NON_FINITE, "a named reward (infos) is not finite")
    if not np.isfinite(ep.rew).all():
        raise _Bad(
            NON_FINITE, f"reward {int(np.flatnonzero(~np.isfinite(ep.rew))[0])} is not finite"
        )
    if lay.discrete:
        a = ep.act
        ok = np.isfinite(a) & (a == np.round(a)) & (a >= 0) & (a < lay.n_actions)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise _Bad(ACTION_OUT_OF_RANGE, f"action {i} is {a[i]}, not in 0..{lay.n_actions - 1}")
        ep.act = a.astype(np.int64)
    else:
        if not np.isfinite(ep.act).all():
            i = int(np.flatnonzero(~np.isfinite(ep.act).all(axis=1))[0])
            raise _Bad(NON_FINITE, f"action {i} is not finite")
        lo, hi = np.asarray(lay.low), np.asarray(lay.high)
        out = ~((ep.act >= lo) & (ep.act <= hi)).all(axis=1)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise _Bad(ACTION_OUT_OF_RANGE, f"action {i} is outside the action space's bounds")


def _raw(task: MinariTask, eid: int, ep: _Episode | None) -> bytes:
    """What the quarantine keeps of a rejected episode: where it is, and its lengths."""
    d: dict[str, Any] = {"dataset": task.data, "backend": task.backend, "episode": eid}
    if ep is not None:
        d |= {"observations": len(ep.obs), "steps": len(ep.rew)}
    return json.dumps(d).encode()


@dataclass
class _Read:
    """A task's episodes as step rows (the arrays ParsedSteps is made of)."""

    ids: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    obs: list[np.ndarray] = field(default_factory=list)
    act: list[np.ndarray] = field(default_factory=list)
    rew: list[np.ndarray] = field(default_factory=list)
    term: list[np.ndarray] = field(default_factory=list)
    trunc: list[np.ndarray] = field(default_factory=list)
    fobs: list[np.ndarray] = field(default_factory=list)
    has_final: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    named: list[np.ndarray] = field(default_factory=list)  # (n, K) each, K named rewards

    def add(self, task: MinariTask, eid: int, ep: _Episode, names: tuple[str, ...]) -> None:
        n = len(ep.rew)
        obs = ep.obs[:n].astype(np.float32)
        act, rew = ep.act, ep.rew
        term, trunc = ep.term.copy(), ep.trunc.copy()
        named = ep.named if ep.named is not None else np.zeros((n, len(names)))
        final = ep.obs[n].astype(np.float32)
        has_final = True
        if ep.meta.get(META_LAST_STEP_DROPPED):
            # written from a store that had dropped this episode's unbootstrappable last step:
            # give the step back (observation: the episode's last; reward: the one kept), with
            # no final observation, so the build drops it again and keeps its reward
            obs = np.concatenate([obs, final[None]])
            act = np.concatenate([act, act[-1:]])
            rew = np.append(rew, float(ep.meta.get(META_DROPPED_REWARD, 0.0)))
            term = np.append(term, False)
            trunc = np.append(np.zeros(n, dtype=bool), True)
            dropped = [float(ep.meta.get(f"dropped_{reward_column(k)}", 0.0)) for k in names]
            named = np.concatenate([named, np.asarray([dropped], dtype=np.float64)])
            has_final = False
            n += 1
        eid_text = ep.meta.get(META_EPISODE_ID)
        self.ids.append(str(eid_text) if eid_text is not None else f"{task.prefix}{eid}")
        self.lines.append(eid)
        self.obs.append(obs)
        self.act.append(act)
        self.rew.append(rew)
        self.term.append(term)
        self.trunc.append(trunc)
        self.fobs.append(final)
        self.has_final.append(has_final)
        self.lengths.append(n)
        self.named.append(named)

    def steps(self, lay: Layout) -> ParsedSteps:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        total = int(lengths.sum())
        t = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
        last = np.zeros(total, dtype=bool)
        last[starts + lengths - 1] = True
        has_final = np.asarray(self.has_final, dtype=bool)
        fobs_present = last.copy()
        fobs_present[(starts + lengths - 1)[~has_final]] = False
        empty_act = (
            np.zeros(0, np.int64) if lay.discrete else np.zeros((0, lay.act_dim), np.float32)
        )
        return ParsedSteps(
            episode_id=pl.Series(
                "episode_id", np.repeat(np.asarray(self.ids, dtype=object), lengths), pl.Utf8
            ),
            t=t,
            obs=np.concatenate(self.obs) if self.obs else np.zeros((0, lay.obs_dim), np.float32),
            act=(
                np.concatenate(self.act).astype(np.int64 if lay.discrete else np.float32)
                if self.act
                else empty_act
            ),
            rew=np.concatenate(self.rew).astype(np.float64) if self.rew else np.zeros(0),
            term=np.concatenate(self.term) if self.term else np.zeros(0, bool),
            trunc=np.concatenate(self.trunc) if self.trunc else np.zeros(0, bool),
            end=None,
            fobs=np.stack(self.fobs)[has_final]
            if self.fobs
            else np.zeros((0, lay.obs_dim), np.float32),
            fobs_present=fobs_present,
            line=np.repeat(np.asarray(self.lines, dtype=np.int64), lengths),
            id_int=np.zeros(total, dtype=bool),
            named_rew=(
                (np.concatenate(self.named) if self.named else np.zeros((0, len(lay.reward_names))))
                if lay.reward_names
                else None
            ),
        )


def read_task(task: MinariTask) -> tuple[ParsedSteps, list[Rejected], int]:
    """The task's good episodes as steps, its rejected episodes, and the episodes read."""
    lay = task.layout
    rejected = [
        Rejected(
            m,
            MISSING_EPISODE,
            f"the dataset lists episode {m} (total_episodes) but holds no data for it",
            _raw(task, m, None),
            f"{task.prefix}{m}",
        )
        for m in task.missing
    ]
    out = _Read()
    skip = set(task.exclude)
    data = Path(task.data)
    h5 = None
    try:
        if task.backend == "hdf5" and task.ids:
            h5 = import_h5py().File(data / HDF5_FILE, "r")
        for eid in task.ids:
            if eid in skip:
                continue
            ep: _Episode | None = None
            try:
                if h5 is not None:
                    ep = _read_hdf5(h5, eid, lay)
                else:
                    ep = _read_arrow(data / str(eid), task.backend, lay)
                _check(ep, lay)
            except _Bad as bad:
                rejected.append(
                    Rejected(
                        eid, bad.reason, bad.detail, _raw(task, eid, ep), f"{task.prefix}{eid}"
                    )
                )
                continue
            out.add(task, eid, ep, lay.reward_names)
    finally:
        if h5 is not None:
            h5.close()
    rejected.sort(key=lambda r: r.line)
    return out.steps(lay), rejected, len(task.ids) + len(task.missing)


def minari_raw(task: MinariTask, eid: int) -> bytes:
    """The quarantine's raw text of episode ``eid`` of ``task``'s dataset."""
    return _raw(task, eid, None)


def minari_chunk(ctx: BuildContext, task: MinariTask) -> EpisodeChunk:
    """A task's episodes, built as a chunk of episode_per_line lines is
    (:func:`pipeline.transitions.chunks.episode_chunk`); episodes the build rejects join
    ``rejected``, in episode order."""
    steps, rejected, n = read_task(task)
    out = EpisodeChunk(records=n, blank_lines=0, steps_read=len(steps), rejected=rejected)
    if len(steps) == 0:
        return out
    tr = ctx.build(steps, np.full(len(steps), task.file_index, dtype=np.int64), True)
    for rej in tr.rejected:
        eid = int(steps.line[rej.rows[0]])
        out.rejected.append(
            Rejected(eid, rej.reason, rej.detail, _raw(task, eid, None), rej.episode_id)
        )
    out.rejected.sort(key=lambda r: r.line)
    out.transitions = tr
    return out


# --------------------------------------------------------------------------- inspect


def is_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a Minari dataset directory (or its data/ directory), or the id of
    one under MINARI_DATASETS_PATH (when no such path exists)."""
    p = Path(path)
    if (p / "data" / METADATA).is_file() or (p.name == "data" and (p / METADATA).is_file()):
        return True
    return not p.exists() and (datasets_path() / str(path) / "data" / METADATA).is_file()


def _space_text(raw: Any) -> str:
    try:
        d = _load_json(raw, "")
    except BuildError:
        return "?"
    if d["type"] == "Box":
        return f"Box{tuple(d.get('shape', ()))} {d.get('dtype', '')}"
    if d["type"] == "Discrete":
        return f"Discrete({d.get('n')})"
    if d["type"] == "Dict":
        subs = ", ".join(f"{k}: {_space_text(v)}" for k, v in (d.get("subspaces") or {}).items())
        return f"Dict({subs})"
    return str(d["type"])


def _episode_lengths(ds: MinariDir, ids: list[int]) -> list[int]:
    """Steps per episode from the episodes' metadata (arrow, parquet) or arrays (hdf5)."""
    out: list[int] = []
    if ds.backend == "hdf5":
        h5py = import_h5py()
        with h5py.File(ds.data / HDF5_FILE, "r") as f:
            for i in ids:
                g = f[f"episode_{i}"]
                out.append(len(g["rewards"]) if "rewards" in g else -1)
        return out
    for i in ids:
        try:
            meta = json.loads((ds.data / str(i) / METADATA).read_text(encoding="utf-8"))
            out.append(int(meta["total_steps"]))
        except (OSError, ValueError, KeyError, TypeError):
            out.append(-1)
    return out


def describe(path: str | Path) -> str:
    """What ``python -m pipeline.inspect`` prints for a Minari dataset: what an import of it
    would read, without building."""
    data = find_dataset(str(path), "inspect")
    meta_path = data / METADATA
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuildError(f"{meta_path}: cannot read the dataset's metadata ({e})") from None
    lines = [
        f"minari dataset  {data.parent}  (dataset_id {meta.get('dataset_id')}, "
        f"minari {meta.get('minari_version', '?')})",
        f"backend         {meta.get('data_format', 'hdf5')}",
        f"observation     {_space_text(meta.get('observation_space'))}",
        f"action          {_space_text(meta.get('action_space'))}",
    ]
    try:
        ds = open_dataset(data)
    except BuildError as e:
        lines.append(f"cannot import  {e}")
        return "\n".join(lines)
    ids, missing, sizes = episode_ids(ds)
    size = sum(f.stat().st_size for f in ds.files)
    lines.append(
        f"episodes        {meta.get('total_episodes')} listed, {len(ids)} with data"
        + (
            f", {len(missing)} missing (ids {missing[:5]}{'...' if len(missing) > 5 else ''})"
            if missing
            else ""
        )
    )
    lengths = [n for n in _episode_lengths(ds, ids) if n >= 0]
    if lengths:
        q = np.percentile(lengths, [0, 50, 100])
        lines.append(
            f"steps           {sum(lengths)} (total_steps {meta.get('total_steps')}); per episode "
            f"min {q[0]:.0f}, median {q[1]:.0f}, max {q[2]:.0f}"
        )
    shown = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
    lines.append(f"size            {shown} in {len(ds.files)} files")
    space = ds.observation_space
    if isinstance(space, DictSpace):
        order = ", ".join(f"{k} ({b.size})" for k, b in space.items)
        dim = sum(b.size for _, b in space.items)
        lines.append(
            f"imports as      observation dim {dim}, the Dict flattened in the order {order} "
            "(source.observation_keys changes it)"
        )
    else:
        assert isinstance(space, Box)
        lines.append(f"imports as      observation dim {space.size} (float32)")
    act = ds.action_space
    if isinstance(act, Discrete):
        lines.append(f"                discrete actions, n {act.n}")
    else:
        assert isinstance(act, Box)
        lines.append(
            f"                continuous actions, dim {act.size}, low {list(act.low)}, high {list(act.high)}"
        )
    env = _env(meta)
    if env is not None:
        mes = f" (max_episode_steps {env.max_episode_steps})" if env.max_episode_steps else ""
        lines.append(f"env             {env.id}{mes}")
    lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
    if lo is not None and hi is not None:
        lines.append(f"reference       ref_min_score {lo} -> random, ref_max_score {hi} -> expert")
    lines += [
        "spec            name: NAME",
        f"                source: {{format: minari, paths: [{_display(data.parent)}]}}",
    ]
    return "\n".join(lines)
