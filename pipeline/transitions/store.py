"""Open a built transition store and hand out its columns as contiguous arrays.

An arrow store is opened memory-mapped: ``transitions.arrow`` holds one record batch,
so every column is one contiguous buffer in the file and the NumPy views below are
zero-copy (nothing is read until a page is touched). A zarr store is read into memory.

    store = open_store("stores/pendulum-mixed")
    store.observations          # (N, obs_dim) float32, read-only view of the file
    store.actions               # (N,) int64 or (N, act_dim) float32
    store.reward_columns        # {NAME: (N,) float32}: the spec's named rewards (fields.rewards)
    store.as_tensors("cpu")     # the same, as torch tensors (no copy on CPU)

A parted arrow store (``transitions/part-NNNNN.arrow``, spec ``store.part_rows``) is the
same table: each part is memory-mapped, and a numeric column of several parts is a
:class:`~pipeline.transitions.parts.PartedColumn` of the parts' zero-copy views (indexing
gathers across parts; ``np.asarray`` concatenates). Its boolean columns are unpacked from
bits, and its ids decoded, into one array, as a single file's are; ``as_tensors`` copies
each column into one tensor (torch needs one buffer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.arrowio import check_format_version, column_to_numpy, flat, read_ipc, read_manifest
from pipeline.format import QUARANTINE, StoreError
from pipeline.transitions.layout import (
    EPISODES_ARROW,
    FORMAT_VERSION,
    KIND,
    PARTS_KEY,
    TRANSITIONS_ARROW,
    ZARR_GROUP,
)
from pipeline.transitions.parts import Column, PartedColumn

if TYPE_CHECKING:
    import torch

# episodes.arrow, in column order (see docs/FORMAT.md)
EPISODE_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("episode_id", pa.string()),
    ("start", pa.int64()),
    ("length", pa.int64()),
    ("return", pa.float64()),
    ("dropped_reward", pa.float64()),
    ("last_step_dropped", pa.bool_()),
    ("terminated", pa.bool_()),
    ("truncated", pa.bool_()),
    ("source_file", pa.string()),
    ("source_line", pa.int64()),
)


@dataclass(frozen=True)
class ActionSpace:
    type: str  # "discrete" or "continuous"
    n: int | None  # discrete: number of actions
    dim: int | None  # continuous: action dimension
    low: np.ndarray | None  # continuous: (dim,) lower bounds (may be -inf)
    high: np.ndarray | None

    @property
    def discrete(self) -> bool:
        return self.type == "discrete"


@dataclass(frozen=True)
class Episodes:
    """One row per episode, in store order; ``start``/``length`` index the transitions."""

    episode_id: list[str]
    start: np.ndarray  # (E,) int64, first transition row
    length: np.ndarray  # (E,) int64, number of transitions
    returns: np.ndarray  # (E,) float64, undiscounted sum of every logged reward
    dropped_reward: np.ndarray  # (E,) float64, reward of a dropped last step (else 0)
    last_step_dropped: np.ndarray  # (E,) bool, the unbootstrappable last step was dropped
    terminated: np.ndarray  # (E,) bool
    truncated: np.ndarray  # (E,) bool
    source_file: list[str]
    source_line: np.ndarray  # (E,) int64, 1-based line of the episode's first record
    # {NAME: (E,) float64}: each named reward of a dropped last step, as dropped_reward
    dropped_named_rewards: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.episode_id)


class TransitionStore:
    """A read-only view of a transition store (see ``layout.FORMAT_VERSION``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("kind") != KIND:
            raise StoreError(f"{self.path}: a {self.manifest.get('kind')} store, not transitions")
        check_format_version(self.path, self.manifest, FORMAT_VERSION)
        self.format: str = self.manifest["store_format"]
        self._columns: dict[str, Column] = {}
        self._episodes: dict[str, np.ndarray] = {}
        # a parted store: each part's table, in row order (None: one file, or zarr)
        self._parts: list[pa.Table] | None = None
        if self.format == "arrow" and PARTS_KEY in self.manifest:
            self._parts = self._open_parts()
            self._table = pa.Table.from_batches(
                [b for t in self._parts for b in t.to_batches()], self._parts[0].schema
            )
            self._ep_table = read_ipc(self.path / EPISODES_ARROW)
            if self._table.num_rows != self.manifest["counts"]["transitions"]:
                raise StoreError(
                    f"{self.path}: its parts hold {self._table.num_rows} rows, manifest says "
                    f"{self.manifest['counts']['transitions']}; a part is missing or replaced"
                )
        elif self.format == "arrow":
            self._table = read_ipc(self.path / TRANSITIONS_ARROW)
            self._ep_table = read_ipc(self.path / EPISODES_ARROW)
            if self._table.num_rows != self.manifest["counts"]["transitions"]:
                raise StoreError(
                    f"{self.path / TRANSITIONS_ARROW}: {self._table.num_rows} rows, manifest says "
                    f"{self.manifest['counts']['transitions']}; the file is truncated or replaced"
                )
        elif self.format == "zarr":
            self._load_zarr()
        else:
            raise StoreError(f"{self.path}: unknown store_format {self.format!r}")

    def _open_parts(self) -> list[pa.Table]:
        """Every part the manifest lists, memory-mapped; StoreError naming the first part
        that is missing, unreadable, of other rows than the manifest says, or of another
        schema than the first part's."""
        listed = self.manifest[PARTS_KEY]
        entries = listed.get("parts") if isinstance(listed, dict) else None
        if (
            not isinstance(entries, list)
            or not entries
            or not all(
                isinstance(e, dict)
                and isinstance(e.get("file"), str)
                and isinstance(e.get("rows"), int)
                for e in entries
            )
        ):
            raise StoreError(
                f"{self.path / 'manifest.json'}: {PARTS_KEY} lists no parts ({{file, rows}} "
                "each); rebuild with --force"
            )
        tables: list[pa.Table] = []
        for entry in entries:
            path = self.path / entry["file"]
            t = read_ipc(path)
            if t.num_rows != entry["rows"]:
                raise StoreError(
                    f"{path}: {t.num_rows} rows, manifest says {entry['rows']}; the part is "
                    "truncated or replaced, rebuild with --force"
                )
            if tables and not t.schema.equals(tables[0].schema):
                raise StoreError(
                    f"{path}: its schema differs from {entries[0]['file']}'s; the part was "
                    "replaced, rebuild with --force"
                )
            tables.append(t)
        return tables

    @property
    def part_starts(self) -> np.ndarray | None:
        """(P + 1,) int64: the first row of each part, then the number of rows; None for a
        store in one file (or zarr)."""
        if self._parts is None:
            return None
        return np.concatenate([[0], np.cumsum([t.num_rows for t in self._parts])]).astype(np.int64)

    def _load_zarr(self) -> None:
        import zarr

        try:
            root = zarr.open_group(str(self.path / ZARR_GROUP), mode="r")
        except Exception as e:  # zarr raises several types for a missing/broken group
            raise StoreError(f"{self.path / ZARR_GROUP}: unreadable zarr group ({e})") from None
        for group, out in (("transitions", self._columns), ("episodes", self._episodes)):
            g: Any = root[group]
            for name in g.array_keys():
                out[name] = np.asarray(g[name][...])

    # ------------------------------------------------------------------ columns
    def column(self, name: str) -> Column:
        """A column as one array; for a parted store, a numeric column of several parts
        is a :class:`PartedColumn` of zero-copy views (booleans and ids: one array)."""
        if name not in self._columns:
            if self.format != "arrow":
                raise KeyError(name)
            if self._parts is None or len(self._parts) == 1:
                self._columns[name] = column_to_numpy(self._table.column(name))
            else:
                views = [column_to_numpy(t.column(name)) for t in self._parts]
                if views[0].dtype.kind in "bO":  # unpacked / decoded anyway: one array
                    self._columns[name] = np.concatenate(views)
                else:
                    self._columns[name] = PartedColumn(views)
        return self._columns[name]

    def column_slice(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a numeric or boolean column, reading no other rows (for
        passes over a store larger than memory)."""
        if self.format == "arrow" and name not in self._columns:
            return column_to_numpy(self._table.column(name).slice(start, stop - start))
        return self.column(name)[start:stop]

    def episode_id_slice(self, start: int, stop: int) -> pa.Array:
        """Rows ``start:stop`` of ``episode_id`` as an Arrow string array (no Python strings)."""
        if self.format == "arrow":
            return flat(self._table.column("episode_id").slice(start, stop - start))
        return pa.array(self._columns["episode_id"][start:stop], pa.string())

    def episode_table(self) -> pa.Table:
        """``episodes.arrow`` as an Arrow table, columns in file order (zarr: the same)."""
        if self.format == "arrow":
            return self._ep_table
        e = self._episodes
        columns = EPISODE_COLUMNS + tuple(
            (f"dropped_{column}", pa.float64()) for column in self.reward_column_names.values()
        )
        return pa.table({name: pa.array(e[name], typ) for name, typ in columns})

    @property
    def observations(self) -> Column:
        return self.column("observation")  # (N, obs_dim) float32

    @property
    def actions(self) -> Column:
        return self.column("action")  # (N,) int64 or (N, act_dim) float32

    @property
    def rewards(self) -> Column:
        return self.column("reward")  # (N,) float32

    @property
    def reward_column_names(self) -> dict[str, str]:
        """{NAME: its column}: the spec's named rewards (``reward_NAME``), in spec order."""
        named = self.manifest.get("reward_columns", {})
        return {name: str(entry["column"]) for name, entry in named.items()}

    @property
    def reward_columns(self) -> dict[str, Column]:
        """{NAME: (N,) float32}: the named reward columns (fields.rewards); {} if none."""
        return {name: self.column(col) for name, col in self.reward_column_names.items()}

    @property
    def next_observations(self) -> Column:
        return self.column("next_observation")  # (N, obs_dim) float32

    @property
    def terminated(self) -> np.ndarray:
        return np.asarray(self.column("terminated"))  # (N,) bool (always one array)

    @property
    def truncated(self) -> np.ndarray:
        return np.asarray(self.column("truncated"))  # (N,) bool (always one array)

    @property
    def return_to_go(self) -> Column:
        return self.column("return_to_go")  # (N,) float32

    @property
    def steps(self) -> Column:
        return self.column("step")  # (N,) int32

    @property
    def episode_id(self) -> np.ndarray:
        return np.asarray(self.column("episode_id"))  # (N,) object (str) (always one array)

    def __len__(self) -> int:
        return int(self.manifest["counts"]["transitions"])

    # ------------------------------------------------------------------ metadata
    @property
    def n_transitions(self) -> int:
        return len(self)

    @property
    def n_episodes(self) -> int:
        return int(self.manifest["counts"]["episodes"])

    @property
    def obs_dim(self) -> int:
        return int(self.manifest["observation_space"]["dim"])

    @cached_property
    def action_space(self) -> ActionSpace:
        a = self.manifest["action_space"]
        if a["type"] == "discrete":
            return ActionSpace("discrete", int(a["n"]), None, None, None)
        return ActionSpace(
            "continuous",
            None,
            int(a["dim"]),
            np.asarray(a["low"], dtype=np.float32),
            np.asarray(a["high"], dtype=np.float32),
        )

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.manifest["spec"])

    @property
    def env(self) -> dict[str, Any] | None:
        return self.manifest["spec"].get("env")

    @property
    def reference_returns(self) -> dict[str, Any] | None:
        return self.manifest["spec"].get("reference_returns")

    @property
    def discount(self) -> float:
        return float(self.manifest["spec"]["store"]["discount"])

    @property
    def obs_mean(self) -> np.ndarray:
        return np.asarray(self.manifest["statistics"]["observation"]["mean"], dtype=np.float32)

    @property
    def obs_std(self) -> np.ndarray:
        return np.asarray(self.manifest["statistics"]["observation"]["std"], dtype=np.float32)

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def normalized_score(self, ret: float | np.ndarray) -> float | np.ndarray:
        """100 * (R - random) / (expert - random), from the spec's reference returns."""
        ref = self.reference_returns
        if not ref:
            raise StoreError(
                f"{self.path}: the spec has no reference_returns; add them to normalize"
            )
        return 100.0 * (ret - ref["random"]) / (ref["expert"] - ref["random"])

    @cached_property
    def episodes(self) -> Episodes:
        if self.format == "arrow":
            t = self._ep_table
            get = lambda n: column_to_numpy(t.column(n))  # noqa: E731
        else:
            get = self._episodes.__getitem__
        return Episodes(
            episode_id=[str(x) for x in get("episode_id")],
            start=get("start").astype(np.int64),
            length=get("length").astype(np.int64),
            returns=get("return").astype(np.float64),
            dropped_reward=get("dropped_reward").astype(np.float64),
            last_step_dropped=get("last_step_dropped").astype(bool),
            terminated=get("terminated").astype(bool),
            truncated=get("truncated").astype(bool),
            source_file=[str(x) for x in get("source_file")],
            source_line=get("source_line").astype(np.int64),
            dropped_named_rewards={
                name: get(f"dropped_{col}").astype(np.float64)
                for name, col in self.reward_column_names.items()
            },
        )

    def quarantine(self) -> list[dict[str, Any]]:
        p = self.path / QUARANTINE
        if not p.exists():
            return []
        with p.open("r", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    # ------------------------------------------------------------------ torch
    def as_tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every numeric column as a torch tensor on ``device`` (no copy on CPU where the
        dtype allows; booleans become float32 0/1 masks for arithmetic in losses). A
        column of several parts is concatenated first: a tensor is one buffer."""
        import torch

        def t(column: Column) -> torch.Tensor:
            a = np.asarray(column)
            if not a.flags.writeable:
                # torch warns on read-only memory; the store is never written through it.
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    x = torch.from_numpy(a)
            else:
                x = torch.from_numpy(a)
            return x.to(device) if str(device) != "cpu" else x

        out = {
            "observations": t(self.observations),
            "actions": t(self.actions),
            "rewards": t(self.rewards),
            "next_observations": t(self.next_observations),
            "terminated": t(self.terminated.astype(np.float32)),
            "truncated": t(self.truncated.astype(np.float32)),
            "return_to_go": t(self.return_to_go),
        }
        return out


def open_store(path: str | Path) -> TransitionStore:
    """Open a transition store; raises :class:`StoreError` with a clear message if it is not one."""
    return TransitionStore(path)
