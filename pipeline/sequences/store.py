"""Open a built sequence store and hand out its columns as flat NumPy arrays.

    store = open_sequence_store("stores/agent-demo")
    store.input_ids          # (T,) int32, every episode's tokens one after the other
    store.labels             # (T,) int8: 0 context, 1..K spans (store.label_names), K+1 other
    store.offsets            # (N + 1,) int64: episode i is [offsets[i], offsets[i + 1])
    store.turn_index         # (T,) int16 turn of each token, -1 on the prompt
    store.turns              # one row per turn: episode, role, policy, token_start/end, ...
    store.text()             # SequenceText: encode / decode / the ids of a prompt or a turn

An arrow store is memory-mapped: the arrays above are zero-copy views of
``sequences.arrow`` (nothing is read until a page is touched), so opening a store costs
nothing and a trainer's memory is bounded by its batches. A zarr store is read into memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.arrowio import check_format_version, column_to_numpy, read_ipc, read_manifest
from pipeline.format import StoreError
from pipeline.segments.store import _list_parts
from pipeline.sequences.layout import (
    FORMAT_VERSION,
    KIND,
    SEQUENCES_ARROW,
    TOKENIZER_DIR,
    TOKENIZER_JSON,
    TURNS_ARROW,
    ZARR_GROUP,
)


@dataclass(frozen=True)
class Turns:
    """One row per kept turn (turns.arrow), episodes in store order."""

    episode: np.ndarray  # (M,) int32 row of the episode
    turn: np.ndarray  # (M,) int32 position within the episode
    role: list[str]
    policy: np.ndarray  # (M,) bool: a turn the model learns to write
    token_start: np.ndarray  # (M,) int64 first token of the turn, within its episode
    token_end: np.ndarray  # (M,) int64 one past its last token
    reward: np.ndarray  # (M,) float32, NaN when the spec has no reward field
    content: list[str]  # the turn's text as in the source

    def __len__(self) -> int:
        return len(self.role)


class SequenceStore:
    """A read-only view of a sequence store (see ``layout.FORMAT_VERSION``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("kind") != KIND:
            raise StoreError(f"{self.path}: a {self.manifest.get('kind')} store, not sequences")
        check_format_version(self.path, self.manifest, FORMAT_VERSION)
        self.format = str(self.manifest.get("store_format", "arrow"))
        self._cols: dict[str, np.ndarray] = {}
        self._strings: dict[str, list[str]] = {}
        if self.format == "arrow":
            self._load_arrow()
        elif self.format == "zarr":
            self._load_zarr()
        else:
            raise StoreError(f"{self.path}: unknown store_format {self.format!r}")
        n = self.manifest["counts"]["episodes"]
        if len(self.offsets) != n + 1:
            raise StoreError(
                f"{self.path}: {len(self.offsets) - 1} episodes, manifest says {n}; the store "
                "is truncated or replaced, rebuild with --force"
            )

    # ------------------------------------------------------------------ loading
    def _load_arrow(self) -> None:
        seq = read_ipc(self.path / SEQUENCES_ARROW)
        turns = read_ipc(self.path / TURNS_ARROW)
        for name in seq.column_names:
            col = seq.column(name)
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                values, offsets = _list_parts(col)
                self._cols[name] = values
                self._cols[f"{name}.offsets"] = offsets
            elif pa.types.is_string(col.type):
                self._strings[name] = col.to_pylist()
            else:
                self._cols[name] = column_to_numpy(col)
        for name in turns.column_names:
            col = turns.column(name)
            if pa.types.is_string(col.type):
                self._strings[f"turns.{name}"] = col.to_pylist()
            else:
                self._cols[f"turns.{name}"] = column_to_numpy(col)

    def _load_zarr(self) -> None:
        import zarr

        try:
            root: Any = zarr.open_group(str(self.path / ZARR_GROUP), mode="r")
        except Exception as e:  # noqa: BLE001 - zarr raises several types for a broken group
            raise StoreError(f"{self.path / ZARR_GROUP}: unreadable zarr group ({e})") from None
        for group, prefix in (("sequences", ""), ("turns", "turns.")):
            g = root[group]
            for name in g.array_keys():
                a = np.asarray(g[name][...])
                if a.dtype.kind in "OUT":
                    self._strings[prefix + name] = [str(x) for x in a.tolist()]
                else:
                    self._cols[prefix + name] = a

    # ------------------------------------------------------------------ episodes
    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    @property
    def n_episodes(self) -> int:
        return len(self.offsets) - 1

    @property
    def episode_ids(self) -> list[str]:
        return self._strings["episode_id"]

    @property
    def offsets(self) -> np.ndarray:
        """(N + 1,) int64 token offsets of the episodes."""
        return self._cols["input_ids.offsets"]

    @property
    def input_ids(self) -> np.ndarray:
        return self._cols["input_ids"]

    @property
    def labels(self) -> np.ndarray:
        return self._cols["labels"]

    @property
    def turn_index(self) -> np.ndarray:
        return self._cols["turn_index"]

    @property
    def lengths(self) -> np.ndarray:
        return self._cols["length"]

    @property
    def outcome(self) -> np.ndarray:
        return self._cols["outcome"]

    @property
    def n_turns(self) -> np.ndarray:
        return self._cols["n_turns"]

    @property
    def truncated(self) -> np.ndarray:
        return self._cols["truncated"]

    def rewards(self, episode: int) -> np.ndarray:
        """The per-turn rewards of one episode."""
        o = self._cols["rewards.offsets"]
        return self._cols["rewards"][o[episode] : o[episode + 1]]

    def episode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of episode ``i``."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.labels[a:b]

    @cached_property
    def turns(self) -> Turns:
        c, s = self._cols, self._strings
        return Turns(
            episode=c["turns.episode"], turn=c["turns.turn"], role=s["turns.role"],
            policy=c["turns.policy"].astype(bool), token_start=c["turns.token_start"],
            token_end=c["turns.token_end"], reward=c["turns.reward"], content=s["turns.content"],
        )  # fmt: skip

    @cached_property
    def turn_offsets(self) -> np.ndarray:
        """(N + 1,) int64: the turns of episode i are rows [o[i], o[i + 1]) of ``turns``."""
        return np.concatenate([[0], np.cumsum(self.n_turns)]).astype(np.int64)

    @property
    def teacher_topk(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(T, k) teacher token ids (-1: none) and their log-probabilities, if stored."""
        if "teacher_ids" not in self._cols:
            return None
        k = int(self.manifest["sequences"]["teacher_topk"])
        return (
            self._cols["teacher_ids"].reshape(-1, k),
            self._cols["teacher_logprobs"].reshape(-1, k),
        )

    # ------------------------------------------------------------------ labels, text
    @property
    def label_names(self) -> list[str]:
        """Label code -> name: ``context``, the spans in spec order, ``other``."""
        return list(self.manifest["labels"])

    @property
    def span_patterns(self) -> dict[str, str]:
        """Span name -> its regex (spans declared by a field have none)."""
        return dict(self.manifest.get("span_patterns", {}))

    @property
    def env(self) -> dict[str, Any] | None:
        """``{id, kwargs}`` of the text environment the spec names, or None."""
        env = self.manifest.get("env")
        return dict(env) if env else None

    @property
    def tokenizer_dir(self) -> Path:
        """``STORE/tokenizer``: tokenizer.json and a tokenizer_config.json for AutoTokenizer."""
        return self.path / TOKENIZER_DIR

    @cached_property
    def tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.path / TOKENIZER_JSON))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise StoreError(
                f"{self.path / TOKENIZER_JSON}: unreadable ({e}); rebuild with --force"
            ) from None

    def text(self) -> Any:
        """A :class:`pipeline.sequences.text.SequenceText` for this store's layout."""
        from pipeline.sequences.text import SequenceText, Template

        return SequenceText(
            self.tokenizer, Template.from_dict(self.manifest["tokenizer"]["template"])
        )


def open_sequence_store(path: str | Path) -> SequenceStore:
    """Open a sequence store; raises :class:`StoreError` with a clear message if it is not one."""
    return SequenceStore(path)


def store_tables(store: SequenceStore) -> dict[str, pa.Table]:
    """The store's two tables as the builder made them (an arrow store's are read back; a
    zarr store's are rebuilt from its arrays with the same types), for digests."""
    if store.format == "arrow":
        return {
            SEQUENCES_ARROW.removesuffix(".arrow"): read_ipc(store.path / SEQUENCES_ARROW),
            TURNS_ARROW.removesuffix(".arrow"): read_ipc(store.path / TURNS_ARROW),
        }
    seq: dict[str, Any] = {}
    turns: dict[str, Any] = {}
    for name, values in store._cols.items():
        if name.endswith(".offsets"):
            continue
        target, key = (turns, name[6:]) if name.startswith("turns.") else (seq, name)
        off = store._cols.get(f"{name}.offsets")
        if off is not None:
            if off[-1] < 2**31 - 1:
                target[key] = pa.ListArray.from_arrays(
                    pa.array(off.astype(np.int32)), pa.array(values)
                )
            else:
                target[key] = pa.LargeListArray.from_arrays(pa.array(off), pa.array(values))
        else:
            target[key] = pa.array(values)
    for name, strings in store._strings.items():
        target, key = (turns, name[6:]) if name.startswith("turns.") else (seq, name)
        target[key] = pa.array(strings, pa.string())
    return {"sequences": pa.table(seq), "turns": pa.table(turns)}
