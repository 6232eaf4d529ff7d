"""Open a built segment store and hand out its tables as contiguous NumPy arrays.

    store = open_segment_store("stores/qa-demo")
    store.examples.n_segments         # (E,) int32, one entry per question
    store.segments.input_ids          # (R, input_width) int32, padded with the [PAD] id
    store.segments.lengths            # (R,) int32, real length of each row
    store.segments.input_values       # (T,) int32 the same ids, flat ...
    store.segments.input_offsets      # (R + 1,) int64 ... row r = values[offsets[r]:offsets[r+1]]
    store.segments.local_start        # (R,) int32 answer start in input_ids, or -1
    rows = store.rows_of(e)           # the segments of example e: a slice of segments
    store.answer_text(e, s, t)        # the context's text under document tokens s..t
    store.tokenizer                   # tokenizers.Tokenizer (the store's tokenizer.json)

The Arrow files are memory-mapped; each holds one record batch, so the flat NumPy arrays
above are zero-copy views of the file. ``input_ids`` (padded) is made on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.arrowio import check_format_version, column_to_numpy, read_ipc, read_manifest
from pipeline.format import QUARANTINE, StoreError
from pipeline.segments.layout import (
    DOCUMENTS_ARROW,
    EXAMPLES_ARROW,
    FORMAT_VERSION,
    KIND,
    SEGMENTS_ARROW,
    TOKENIZER_JSON,
)


def _list_parts(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets starting at 0) of a list column, zero-copy where possible."""
    arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]


@dataclass(frozen=True)
class Examples:
    """One row per question (examples.arrow), in store order."""

    example_id: list[str]
    doc_id: list[str]
    split: np.ndarray  # (E,) object (str)
    question: list[str]
    answers: list[list[str]]  # every given answer text (the first one is the span's)
    answer_starts: list[list[int]]  # their character starts in the context
    doc_index: np.ndarray  # (E,) int32 row of documents.arrow
    is_impossible: np.ndarray  # (E,) bool
    n_segments: np.ndarray  # (E,) int32
    n_doc_tokens: np.ndarray  # (E,) int32
    n_question_tokens: np.ndarray  # (E,) int32 after truncation
    global_start: np.ndarray  # (E,) int32 answer's first document token, or -1
    global_end: np.ndarray  # (E,) int32 answer's last document token (inclusive), or -1
    answer_segment: np.ndarray  # (E,) int32 first segment holding the whole answer, or -1
    segment_row: np.ndarray  # (E,) int64 first row of the example in segments.arrow

    def __len__(self) -> int:
        return len(self.example_id)


@dataclass(frozen=True)
class Segments:
    """One row per (question, segment) (segments.arrow): examples in order, then segments."""

    example_index: np.ndarray  # (R,) int32 row of examples
    segment_index: np.ndarray  # (R,) int32 0-based within the example
    input_values: np.ndarray  # (T,) int32 every row's input ids, flat
    input_offsets: np.ndarray  # (R + 1,) int64
    n_question_tokens: np.ndarray  # (R,) int32 Q
    context_start: np.ndarray  # (R,) int32 = Q + 2: input position of the first document token
    n_segment_tokens: np.ndarray  # (R,) int32
    token_offset: np.ndarray  # (R,) int32 document position of the segment's first token
    local_start: np.ndarray  # (R,) int32 answer start in input_ids, or -1
    local_end: np.ndarray  # (R,) int32 answer end (inclusive) in input_ids, or -1
    global_start: np.ndarray  # (R,) int32
    global_end: np.ndarray  # (R,) int32
    pad_id: int

    def __len__(self) -> int:
        return len(self.example_index)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.input_offsets).astype(np.int32)  # (R,)

    @cached_property
    def input_ids(self) -> np.ndarray:
        """(R, width) int32, each row padded with ``pad_id`` to the longest row."""
        n = len(self)
        width = int(self.lengths.max(initial=0))
        out = np.full((n, width), self.pad_id, dtype=np.int32)
        lengths = self.lengths.astype(np.int64)
        rows = np.repeat(np.arange(n), lengths)
        cols = np.arange(len(self.input_values)) - np.repeat(self.input_offsets[:-1], lengths)
        out[rows, cols] = self.input_values
        return out

    @cached_property
    def attention_mask(self) -> np.ndarray:
        """(R, width) bool, true on real tokens."""
        return np.arange(self.input_ids.shape[1])[None, :] < self.lengths[:, None]


@dataclass(frozen=True)
class Documents:
    """One row per distinct context (documents.arrow), with its tokens and their spans."""

    doc_id: list[str]
    context: list[str]
    n_tokens: np.ndarray  # (D,) int32
    token_values: np.ndarray  # (N,) int32 every document's token ids, flat
    token_offsets: np.ndarray  # (D + 1,) int64
    token_start: np.ndarray  # (N,) int32 character start of each token in its context
    token_end: np.ndarray  # (N,) int32 character end (exclusive)

    def __len__(self) -> int:
        return len(self.doc_id)


class SegmentStore:
    """A read-only view of a segment store (see ``layout.FORMAT_VERSION``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("kind") != KIND:
            raise StoreError(f"{self.path}: a {self.manifest.get('kind')} store, not segments")
        check_format_version(self.path, self.manifest, FORMAT_VERSION)
        self._tables = {
            name: read_ipc(self.path / name)
            for name in (EXAMPLES_ARROW, SEGMENTS_ARROW, DOCUMENTS_ARROW)
        }
        c = self.manifest["counts"]
        for name, key in ((EXAMPLES_ARROW, "examples"), (SEGMENTS_ARROW, "segments")):
            if self._tables[name].num_rows != c[key]:
                raise StoreError(
                    f"{self.path / name}: {self._tables[name].num_rows} rows, manifest says "
                    f"{c[key]}; the file is truncated or replaced, rebuild with --force"
                )

    def table(self, name: str) -> pa.Table:
        """``examples.arrow``, ``segments.arrow`` or ``documents.arrow`` as a pyarrow Table."""
        return self._tables[name]

    @property
    def special_tokens(self) -> dict[str, int | None]:
        return dict(self.manifest["tokenizer"]["special_tokens"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest["tokenizer"]["special_tokens"]["pad"])

    @property
    def input_width(self) -> int:
        """The longest row of ``input_ids`` in this store."""
        return int(self.manifest["segments"]["input_width"])

    @property
    def no_answer(self) -> int:
        return int(self.manifest["segments"]["no_answer"])

    @cached_property
    def examples(self) -> Examples:
        t = self._tables[EXAMPLES_ARROW]

        def num(name: str) -> np.ndarray:
            return column_to_numpy(t.column(name))

        return Examples(
            example_id=t.column("example_id").to_pylist(),
            doc_id=t.column("doc_id").to_pylist(),
            split=np.asarray(t.column("split").to_pylist(), dtype=object),
            question=t.column("question").to_pylist(),
            answers=t.column("answers").to_pylist(),
            answer_starts=t.column("answer_starts").to_pylist(),
            doc_index=num("doc_index"),
            is_impossible=num("is_impossible").astype(bool),
            n_segments=num("n_segments"),
            n_doc_tokens=num("n_doc_tokens"),
            n_question_tokens=num("n_question_tokens"),
            global_start=num("global_start"),
            global_end=num("global_end"),
            answer_segment=num("answer_segment"),
            segment_row=num("segment_row"),
        )

    @cached_property
    def segments(self) -> Segments:
        t = self._tables[SEGMENTS_ARROW]
        values, offsets = _list_parts(t.column("input_ids"))

        def num(name: str) -> np.ndarray:
            return column_to_numpy(t.column(name))

        return Segments(
            example_index=num("example_index"),
            segment_index=num("segment_index"),
            input_values=values,
            input_offsets=offsets,
            n_question_tokens=num("n_question_tokens"),
            context_start=num("context_start"),
            n_segment_tokens=num("n_segment_tokens"),
            token_offset=num("token_offset"),
            local_start=num("local_start"),
            local_end=num("local_end"),
            global_start=num("global_start"),
            global_end=num("global_end"),
            pad_id=self.pad_id,
        )

    @cached_property
    def documents(self) -> Documents:
        t = self._tables[DOCUMENTS_ARROW]
        values, offsets = _list_parts(t.column("token_ids"))
        starts, _ = _list_parts(t.column("token_start"))
        ends, _ = _list_parts(t.column("token_end"))
        return Documents(
            doc_id=t.column("doc_id").to_pylist(),
            context=t.column("context").to_pylist(),
            n_tokens=column_to_numpy(t.column("n_tokens")),
            token_values=values,
            token_offsets=offsets,
            token_start=starts,
            token_end=ends,
        )

    @cached_property
    def tokenizer(self) -> Any:
        """The store's ``tokenizers.Tokenizer``."""
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.path / TOKENIZER_JSON))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise StoreError(
                f"{self.path / TOKENIZER_JSON}: unreadable ({e}); rebuild with --force"
            ) from None

    # ------------------------------------------------------------------ helpers
    def rows_of(self, example: int) -> slice:
        """The rows of ``segments`` that belong to example ``example`` (in segment order)."""
        start = int(self.examples.segment_row[example])
        return slice(start, start + int(self.examples.n_segments[example]))

    def split_indices(self, split: str) -> np.ndarray:
        """(n,) int64 example rows of a split (``source.splits`` of the spec)."""
        return np.flatnonzero(self.examples.split == split)

    def answer_text(self, example: int, start: int, end: int) -> str:
        """The context's text under the example's document tokens ``start..end`` (inclusive):
        how a predicted global token span becomes an answer string (for F1 / exact match)."""
        if start < 0 or end < start:
            return ""
        d = int(self.examples.doc_index[example])
        docs = self.documents
        base = int(docs.token_offsets[d])
        n = int(docs.n_tokens[d])
        end = min(end, n - 1)
        return docs.context[d][
            int(docs.token_start[base + start]) : int(docs.token_end[base + end])
        ]

    def quarantine_lines(self) -> Iterator[bytes]:
        p = self.path / QUARANTINE
        if not p.exists():
            return
        with p.open("rb") as f:
            for line in f:
                if line.strip():
                    yield line

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])


def open_segment_store(path: str | Path) -> SegmentStore:
    """Open a segment store; raises :class:`StoreError` with a clear message if it is not one."""
    return SegmentStore(path)
