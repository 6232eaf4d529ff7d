"""QA documents -> a segment store (``kind: segments``); the layout is in docs/FORMAT.md.

``python -m pipeline.build data_specs/qa-demo.yaml`` comes here. The build:

1. reads every record (SQuAD JSON or JSONL, :mod:`pipeline.qa_sources`), rejecting bad ones
   with a reason (bad JSON, empty context, an answer that is not at its ``answer_start``,
   a missing id or question, a duplicate id, ...);
2. trains the tokenizer on the kept corpus (distinct contexts + questions) or loads one
   (:mod:`pipeline.segments.tokenizer`);
3. encodes every distinct context and every question with ``encode_batch``, maps each
   answer's character span to a token span with one ``searchsorted`` over all documents,
   and lays out every (question, segment) row with NumPy gathers — no per-token Python;
4. writes ``documents.arrow``, ``examples.arrow``, ``segments.arrow`` (Arrow IPC streams,
   one record batch each), ``tokenizer.json``, ``quarantine.jsonl`` and ``manifest.json``
   into a staging directory that is swapped into place in one rename, as for transition
   stores (:func:`pipeline.storage.publish`). The same spec and inputs again: "up to date".

Segmentation, exactly: with ``W = segments.max_tokens`` and ``S = segments.stride`` (S <= W),
segment ``k`` of a document of ``n`` tokens holds its tokens ``[k*S, min(k*S + W, n))``, for
``k = 0 .. n_segments - 1``, ``n_segments = 1 + ceil(max(n - W, 0) / S)``. Every token is in
at least one segment; consecutive segments overlap by ``W - S`` tokens. A row's
``input_ids`` are ``[CLS] q_1 .. q_Q [SEP] d_1 .. d_L [SEP]``, with ``Q <=
segments.max_question_tokens`` (a longer question keeps its first tokens), so the segment's
first document token sits at ``context_start = Q + 2``. An answer is "in" a segment when all
of its tokens are; then ``local_start/local_end`` (inclusive) index ``input_ids``, otherwise
they are ``NO_ANSWER`` (-1), as they are in every row of an unanswerable question.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_specs.schema import SegmentSpec, load_segment_spec
from pipeline.arrowio import file_digest, write_arrow_table
from pipeline.format import FORMAT_NAME, QUARANTINE, SPEC_COPY, BuildError
from pipeline.report import quarantine_summary
from pipeline.segments.layout import (
    DATA_FILES,
    DOCUMENTS_ARROW,
    EXAMPLES_ARROW,
    FORMAT_VERSION,
    KIND,
    LAYOUT,
    NO_ANSWER,
    SEGMENTS_ARROW,
    TOKENIZER_JSON,
)
from pipeline.segments.sources import (
    ANSWER_NOT_IN_TOKENS,
    EMPTY_CONTEXT,
    Records,
    Rejected,
    read_records,
)
from pipeline.segments.tokenizer import (
    Encoded,
    Specials,
    WordSplit,
    encode,
    encode_from_words,
    load_tokenizer,
    sha256_hex,
    specials_of,
    split_words,
    tokenizer_bytes,
    train_tokenizer,
)
from pipeline.sources import SourceFile, file_sha256, resolve_sources
from pipeline.storage import (
    BuildResult,
    build_key,
    publish,
    staged,
    up_to_date,
    versions,
    write_manifest,
)

ROWS_PER_BLOCK_TOKENS = 1 << 22  # input ids assembled per NumPy block (bounds temporaries)


# --------------------------------------------------------------------------- pure transforms


def n_segments(n_tokens: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Segments per document: ``1 + ceil(max(n - window, 0) / stride)``."""
    n = np.asarray(n_tokens, dtype=np.int64)
    return 1 + (np.maximum(n - window, 0) + stride - 1) // stride


def char_spans_to_tokens(
    doc: np.ndarray,
    char_start: np.ndarray,
    char_end: np.ndarray,
    tok_starts: np.ndarray,
    tok_ends: np.ndarray,
    doc_offsets: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map character spans to inclusive token spans, all at once.

    ``doc[i]`` is the document of span ``i`` (``[char_start, char_end)``, end exclusive);
    documents' tokens are ``tok_starts/tok_ends[doc_offsets[d]:doc_offsets[d + 1]]``
    (character spans, end exclusive, non-decreasing within a document). The token span is
    every token that overlaps the characters: the first token ending after ``char_start``
    to the last starting before ``char_end``. Returns document-local ``(start, end,
    aligned)``; ``start = end = -1`` where no token overlaps the span, and ``aligned`` says
    the span's first and last characters are a token's first and last.
    """
    doc = np.asarray(doc, dtype=np.int64)
    n_docs = len(doc_offsets) - 1
    counts = np.diff(doc_offsets)
    big = int(max(int(tok_ends.max(initial=0)), int(np.max(char_end, initial=0)))) + 1
    tok_doc = np.repeat(np.arange(n_docs, dtype=np.int64), counts)
    key_end = tok_doc * big + tok_ends
    key_start = tok_doc * big + tok_starts
    base = doc_offsets[:-1][doc]
    stop = doc_offsets[1:][doc]
    gs = np.searchsorted(key_end, doc * big + char_start, side="right")
    ge = np.searchsorted(key_start, doc * big + char_end, side="left") - 1
    ok = (gs >= base) & (gs < stop) & (ge >= base) & (ge < stop) & (gs <= ge)
    gs_c = np.where(ok, gs, 0)
    ge_c = np.where(ok, ge, 0)
    aligned = ok & (tok_starts[gs_c] == char_start) & (tok_ends[ge_c] == char_end)
    start = np.where(ok, gs - base, NO_ANSWER)
    end = np.where(ok, ge - base, NO_ANSWER)
    return start.astype(np.int64), end.astype(np.int64), aligned


@dataclass(frozen=True)
class SegmentRows:
    """One row per (question, segment), examples in order, segments in order.

    Row ``r``'s ``input_ids`` are ``input_values[input_offsets[r]:input_offsets[r + 1]]``.
    """

    example_index: np.ndarray  # (R,) int64 row of examples.arrow
    segment_index: np.ndarray  # (R,) int32 0-based within the example
    input_values: np.ndarray  # (T,) int32 all input ids, row after row
    input_offsets: np.ndarray  # (R + 1,) int64
    n_question_tokens: np.ndarray  # (R,) int32 Q
    context_start: (
        np.ndarray
    )  # (R,) int32 position in input_ids of the first document token (Q + 2)
    n_segment_tokens: np.ndarray  # (R,) int32 document tokens in this segment
    token_offset: np.ndarray  # (R,) int32 document position of the segment's first token
    local_start: np.ndarray  # (R,) int32 answer start in input_ids, or -1
    local_end: np.ndarray  # (R,) int32 answer end (inclusive) in input_ids, or -1
    global_start: np.ndarray  # (R,) int32 answer start in the document's tokens, or -1
    global_end: np.ndarray  # (R,) int32 answer end (inclusive), or -1

    def __len__(self) -> int:
        return len(self.example_index)

    @staticmethod
    def concat(parts: list[SegmentRows]) -> SegmentRows:
        offsets = [np.zeros(1, np.int64)]
        carry = 0
        for p in parts:
            offsets.append(p.input_offsets[1:] + carry)
            carry += int(p.input_offsets[-1])
        fields: dict[str, np.ndarray] = {}
        for name in SegmentRows.__dataclass_fields__:
            if name != "input_offsets":
                fields[name] = np.concatenate([getattr(p, name) for p in parts])
        return SegmentRows(input_offsets=np.concatenate(offsets), **fields)


def token_pool(doc_ids: np.ndarray, q_ids: np.ndarray, specials: Specials) -> np.ndarray:
    """Every id a row can hold, in one array: document tokens, question tokens, [CLS], [SEP]."""
    return np.concatenate(
        [doc_ids, q_ids, np.array([specials.cls, specials.sep], dtype=np.int32)]
    ).astype(np.int32, copy=False)


def assemble_rows(
    ex_doc: np.ndarray,
    q_ids: np.ndarray,
    q_offsets: np.ndarray,
    q_len: np.ndarray,
    doc_ids: np.ndarray,
    doc_offsets: np.ndarray,
    answer_start: np.ndarray,
    answer_end: np.ndarray,
    window: int,
    stride: int,
    specials: Specials,
    example_base: int = 0,
    pool: np.ndarray | None = None,
) -> SegmentRows:
    """Lay out every (question, segment) row of the given examples with array operations.

    ``ex_doc[e]``: document of example ``e``; its question tokens are
    ``q_ids[q_offsets[e]:q_offsets[e] + q_len[e]]`` (already truncated); documents' tokens
    are ``doc_ids[doc_offsets[d]:doc_offsets[d + 1]]``; ``answer_start/end[e]``: the answer's
    document-local token span (inclusive) or -1. ``example_base`` is added to the examples'
    row numbers; ``pool`` is :func:`token_pool` of ``doc_ids, q_ids`` if the caller has it.

    Each row is five runs of consecutive ``pool`` entries ([CLS], question, [SEP], segment,
    [SEP]), so the index into ``pool`` of every output position is the running sum of a
    vector of ones with a jump at the start of each run: one cumsum and one gather, with no
    temporary per output position beyond that index.
    """
    if pool is None:
        pool = token_pool(doc_ids, q_ids, specials)
    n_docs_tokens, n_q_tokens = len(doc_ids), len(q_ids)
    cls_at, sep_at = n_docs_tokens + n_q_tokens, n_docs_tokens + n_q_tokens + 1
    ex_doc = np.asarray(ex_doc, dtype=np.int64)
    n_ex = len(ex_doc)
    n_doc = (doc_offsets[1:] - doc_offsets[:-1])[ex_doc]  # (E,)
    nseg = n_segments(n_doc, window, stride)  # (E,)
    n_rows = int(nseg.sum())
    row_ex = np.repeat(np.arange(n_ex, dtype=np.int64), nseg)  # (R,)
    first_row = np.cumsum(nseg) - nseg
    k = np.arange(n_rows, dtype=np.int64) - first_row[row_ex]
    off = k * stride
    seg_len = np.minimum(window, n_doc[row_ex] - off)
    q = np.asarray(q_len, dtype=np.int64)[row_ex]
    cs = q + 2
    total = cs + seg_len + 1
    out_off = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(total, out=out_off[1:])
    n_out = int(out_off[-1])
    # runs: (R, 5) lengths, first pool index, first output position
    ones = np.ones(n_rows, dtype=np.int64)
    run_len = np.stack([ones, q, ones, seg_len, ones], axis=1)
    run_src = np.stack(
        [
            np.full(n_rows, cls_at, dtype=np.int64),
            n_docs_tokens + np.asarray(q_offsets, dtype=np.int64)[row_ex],
            np.full(n_rows, sep_at, dtype=np.int64),
            doc_offsets[:-1][ex_doc[row_ex]] + off,
            np.full(n_rows, sep_at, dtype=np.int64),
        ],
        axis=1,
    )
    run_pos = out_off[:-1, None] + np.cumsum(run_len, axis=1) - run_len
    keep = run_len.reshape(-1) > 0
    r_src, r_len, r_pos = (a.reshape(-1)[keep] for a in (run_src, run_len, run_pos))
    jump = r_src.copy()
    jump[1:] -= r_src[:-1] + r_len[:-1] - 1  # from the previous run's last index
    index = np.ones(n_out, dtype=np.int64)
    index[r_pos] = jump
    np.cumsum(index, out=index)
    values = pool[index]
    del index
    g_s = np.asarray(answer_start, dtype=np.int64)[row_ex]
    g_e = np.asarray(answer_end, dtype=np.int64)[row_ex]
    inside = (g_s >= 0) & (g_s >= off) & (g_e < off + seg_len)
    i32 = np.int32
    return SegmentRows(
        example_index=row_ex + example_base,
        segment_index=k.astype(i32),
        input_values=values,
        input_offsets=out_off,
        n_question_tokens=q.astype(i32),
        context_start=cs.astype(i32),
        n_segment_tokens=seg_len.astype(i32),
        token_offset=off.astype(i32),
        local_start=np.where(inside, g_s - off + cs, NO_ANSWER).astype(i32),
        local_end=np.where(inside, g_e - off + cs, NO_ANSWER).astype(i32),
        global_start=g_s.astype(i32),
        global_end=g_e.astype(i32),
    )


def segment_example_reference(
    tokenizer: Any,
    context: str,
    question: str,
    answer_text: str | None,
    answer_start: int | None,
    window: int,
    stride: int,
    max_question_tokens: int,
    specials: Specials,
) -> list[dict[str, Any]]:
    """The rows of ONE example, by plain Python loops: the reference for the fast path
    (tests) and the baseline of ``scripts/bench_segments.py``."""
    doc = tokenizer.encode(context, add_special_tokens=False)
    q = tokenizer.encode(question, add_special_tokens=False).ids[:max_question_tokens]
    gs = ge = NO_ANSWER
    if answer_text is not None and answer_start is not None:
        lead = len(answer_text) - len(answer_text.lstrip())
        c0 = answer_start + lead
        c1 = answer_start + len(answer_text.rstrip())
        for t, (s, e) in enumerate(doc.offsets):
            if e > c0 and gs == NO_ANSWER:
                gs = t
            if s < c1:
                ge = t
        if gs == NO_ANSWER or ge < gs:
            gs = ge = NO_ANSWER
    rows = []
    n = len(doc.ids)
    k = 0
    while True:
        off = k * stride
        seg = doc.ids[off : off + window]
        cs = len(q) + 2
        inside = gs != NO_ANSWER and gs >= off and ge < off + len(seg)
        rows.append(
            {
                "segment_index": k,
                "input_ids": [specials.cls, *q, specials.sep, *seg, specials.sep],
                "n_question_tokens": len(q),
                "context_start": cs,
                "n_segment_tokens": len(seg),
                "token_offset": off,
                "local_start": gs - off + cs if inside else NO_ANSWER,
                "local_end": ge - off + cs if inside else NO_ANSWER,
                "global_start": gs,
                "global_end": ge,
            }
        )
        if off + window >= n:
            return rows
        k += 1


def _answer_char_spans(records: Records) -> tuple[np.ndarray, np.ndarray]:
    """The first answer's character span with surrounding whitespace trimmed (-1: none)."""
    n = len(records)
    c0 = np.full(n, NO_ANSWER, dtype=np.int64)
    c1 = np.full(n, NO_ANSWER, dtype=np.int64)
    for i, (texts, starts) in enumerate(zip(records.answers, records.answer_starts)):
        if texts:
            t, s = texts[0], starts[0]
            c0[i] = s + len(t) - len(t.lstrip())
            c1[i] = s + len(t.rstrip())
    return c0, c1


# --------------------------------------------------------------------------- digests


def _array_digest(h: Any, arr: pa.Array) -> None:
    """Feed an array's logical values (not its buffers' layout) into ``h``."""
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        h.update(np.diff(offsets).astype("<i8").tobytes())
        _array_digest(h, arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])))
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        items = [s.encode("utf-8") for s in arr.to_pylist()]
        h.update(np.array([len(b) for b in items], dtype="<i8").tobytes())
        h.update(b"".join(items))
    elif pa.types.is_boolean(t):
        h.update(np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.uint8).tobytes())
    else:
        a = arr.to_numpy(zero_copy_only=False)
        h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def table_digests(table: pa.Table) -> dict[str, str]:
    """sha256 per column over its type and logical values, row order."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        h = hashlib.sha256(f"{name}|{col.type}".encode())
        for chunk in col.chunks:
            _array_digest(h, chunk)
        out[name] = h.hexdigest()
    return out


def content_hash(
    digests: dict[str, dict[str, str]], tokenizer_sha: str, quarantine_sha: str
) -> str:
    """One hash over every table's column digests, the tokenizer and the quarantine."""
    return tables_content_hash("segments", FORMAT_VERSION, digests, tokenizer_sha, quarantine_sha)


def tables_content_hash(
    kind: str,
    format_version: int,
    digests: dict[str, dict[str, str]],
    tokenizer_sha: str,
    quarantine_sha: str,
) -> str:
    """The content hash of a store kind made of tables and a tokenizer (segments,
    sequences): its format, every table's column digests, the tokenizer, the quarantine."""
    h = hashlib.sha256(f"{FORMAT_NAME}/{format_version}/{kind}\n".encode())
    for table in sorted(digests):
        for col in sorted(digests[table]):
            h.update(f"{table}.{col} {digests[table][col]}\n".encode())
    h.update(f"tokenizer {tokenizer_sha}\nquarantine {quarantine_sha}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- tables


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _documents_table(doc_ids: list[str], contexts: list[str], enc: Encoded) -> pa.Table:
    return pa.table(
        {
            "doc_id": pa.array(doc_ids, pa.string()),
            "context": pa.array(contexts, pa.string()),
            "n_tokens": pa.array(enc.lengths.astype(np.int32)),
            "token_ids": _list_array(enc.ids, enc.offsets),
            "token_start": _list_array(enc.starts, enc.offsets),
            "token_end": _list_array(enc.ends, enc.offsets),
        }
    )


def _examples_table(
    r: Records,
    doc_ids: list[str],
    ex_doc: np.ndarray,
    n_doc_tokens: np.ndarray,
    q_len: np.ndarray,
    gs: np.ndarray,
    ge: np.ndarray,
    nseg: np.ndarray,
    answer_segment: np.ndarray,
) -> pa.Table:
    first_row = np.cumsum(nseg) - nseg
    return pa.table(
        {
            "example_id": pa.array(r.example_id, pa.string()),
            "doc_id": pa.array([doc_ids[d] for d in ex_doc.tolist()], pa.string()),
            "doc_index": pa.array(ex_doc.astype(np.int32)),
            "split": pa.array(r.split, pa.string()),
            "title": pa.array(r.title, pa.string()),
            "question": pa.array(r.question, pa.string()),
            "answers": pa.array(r.answers, pa.list_(pa.string())),
            "answer_starts": pa.array(r.answer_starts, pa.list_(pa.int32())),
            "is_impossible": pa.array(r.is_impossible, pa.bool_()),
            "n_segments": pa.array(nseg.astype(np.int32)),
            "n_doc_tokens": pa.array(n_doc_tokens.astype(np.int32)),
            "n_question_tokens": pa.array(q_len.astype(np.int32)),
            "global_start": pa.array(gs.astype(np.int32)),
            "global_end": pa.array(ge.astype(np.int32)),
            "answer_segment": pa.array(answer_segment.astype(np.int32)),
            "segment_row": pa.array(first_row.astype(np.int64)),
        }
    )


def _segments_table(rows: SegmentRows, example_ids: list[str]) -> pa.Table:
    ex = rows.example_index
    ids = pa.array(example_ids, pa.string()).take(pa.array(ex))
    return pa.table(
        {
            "example_id": ids,
            "example_index": pa.array(ex.astype(np.int32)),
            "segment_index": pa.array(rows.segment_index),
            "input_ids": _list_array(rows.input_values, rows.input_offsets),
            "n_question_tokens": pa.array(rows.n_question_tokens),
            "context_start": pa.array(rows.context_start),
            "n_segment_tokens": pa.array(rows.n_segment_tokens),
            "token_offset": pa.array(rows.token_offset),
            "local_start": pa.array(rows.local_start),
            "local_end": pa.array(rows.local_end),
            "global_start": pa.array(rows.global_start),
            "global_end": pa.array(rows.global_end),
        }
    )


def distribution(x: np.ndarray) -> dict[str, Any]:
    """count, mean, std and quantiles of ``x`` (empty dict for no values)."""
    if len(x) == 0:
        return {"count": 0}
    x = np.asarray(x, dtype=np.float64)
    q = np.percentile(x, [0, 10, 25, 50, 75, 90, 100])
    return {
        "count": len(x), "mean": round(float(x.mean()), 4), "std": round(float(x.std()), 4),
        "min": float(q[0]), "p10": float(q[1]), "p25": float(q[2]), "median": float(q[3]),
        "p75": float(q[4]), "p90": float(q[5]), "max": float(q[6]),
    }  # fmt: skip


# --------------------------------------------------------------------------- build


@dataclass
class _Timer:
    t: float
    stages: dict[str, float]

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = round(now - self.t, 4)
        self.t = now


def build(
    spec_path: str | Path,
    out_dir: str | Path = "stores",
    *,
    force: bool = False,
    max_bad_fraction: float | None = None,
    chunk_bytes: int | None = None,
    progress: bool | None = None,
    workers: int | None = None,
) -> BuildResult:
    """Build (or find up to date) the segment store for ``spec_path`` under ``out_dir/NAME``.

    ``chunk_bytes``, ``progress`` and ``workers`` are accepted for the common ``build``
    signature; a segment build reads whole files in this process and shows no bar.
    """
    t0 = time.perf_counter()
    spec = load_segment_spec(spec_path)
    spec_sha = spec.sha256()
    sources = resolve_sources(spec.source.paths, origin=f"{spec_path}")
    tok_file: Path | None = None
    tok_sha: str | None = None
    if spec.tokenizer.path is not None:
        tok_file = Path(spec.tokenizer.path)
        if not tok_file.is_file():
            raise BuildError(
                f"{spec_path}: tokenizer.path: {spec.tokenizer.path!r} is not a file (paths are "
                f"relative to the working directory {Path.cwd()}); give a HF tokenizer.json "
                "or use `train:`"
            )
        tok_sha = file_sha256(tok_file)
    out = Path(out_dir)
    target = out / spec.name
    if not force:
        manifest = up_to_date(
            target,
            build_key_parts(spec_sha, tok_sha),
            sources,
            kind=KIND,
            format_version=FORMAT_VERSION,
            spec_sha=spec_sha,
        )
        if manifest is not None:
            return BuildResult(target, "up to date", manifest, time.perf_counter() - t0)
    with staged(out, spec.name) as staging:
        manifest = _build_into(spec, spec_path, sources, tok_file, staging, out, max_bad_fraction)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        write_manifest(staging, manifest)
        publish(staging, target)
    return BuildResult(target, "built", manifest, time.perf_counter() - t0)


def build_key_parts(spec_sha: str, tokenizer_sha: str | None) -> list[str]:
    """What besides the inputs decides a segment store: its layout, the spec, the tokenizer."""
    return [f"{KIND}/{FORMAT_VERSION}/{LAYOUT}", spec_sha, str(tokenizer_sha)]


@dataclass
class _Tokenized:
    """The tokenizer a build uses and the corpus encoded with it."""

    tok: Any
    specials: Specials
    tok_bytes: bytes
    origin: dict[str, Any]  # how the tokenizer was made, for the manifest
    docs: Encoded
    questions: Encoded


@dataclass
class _Answers:
    """Per example: its document, its character span and its global token span."""

    ex_doc: np.ndarray  # (E,) document index
    c0: np.ndarray  # (E,) answer's first character, NO_ANSWER if none
    gs: np.ndarray  # (E,) answer's first token in the document, NO_ANSWER if none
    ge: np.ndarray  # (E,) answer's last token (inclusive)
    aligned: np.ndarray  # (E,) bool: the span starts and ends on token boundaries


def _build_into(
    spec: SegmentSpec,
    spec_path: str | Path,
    sources: list[SourceFile],
    tok_file: Path | None,
    staging: Path,
    out: Path,
    max_bad_fraction: float | None,
) -> dict[str, Any]:
    timer = _Timer(time.perf_counter(), {})
    records, rejected = read_records(sources, spec.source, str(spec_path))
    timer.lap("read")
    doc_of: dict[str, int] = {}  # distinct contexts, in first-appearance order
    for c in records.context:
        doc_of.setdefault(c, len(doc_of))
    contexts = list(doc_of)
    if tok_file is None and not records.question:
        raise BuildError(_nothing_kept(spec_path, sources, rejected))
    enc = _tokenize(spec, spec_path, tok_file, contexts, records.question, timer)
    ex_doc = np.fromiter((doc_of[c] for c in records.context), dtype=np.int64, count=len(records))
    ans = _map_answers(records, ex_doc, enc.docs)
    records, contexts, ans = _drop_untokenizable(records, contexts, ans, enc, rejected, sources)
    _write_quarantine(spec, staging, out, sources, rejected, max_bad_fraction)
    if len(records) == 0:
        raise BuildError(_nothing_kept(spec_path, sources, rejected))
    rows, answer_segment = _segment_rows(spec, ans, enc)
    timer.lap("segment")
    doc_ids = [hashlib.sha256(c.encode("utf-8")).hexdigest()[:16] for c in contexts]
    q_len = np.minimum(enc.questions.lengths, spec.segments.max_question_tokens)
    n_doc = enc.docs.lengths[ans.ex_doc]
    nseg = n_segments(n_doc, spec.segments.max_tokens, spec.segments.stride)
    tables = {
        DOCUMENTS_ARROW: _documents_table(doc_ids, contexts, enc.docs),
        EXAMPLES_ARROW: _examples_table(
            records, doc_ids, ans.ex_doc, n_doc, q_len, ans.gs, ans.ge, nseg, answer_segment
        ),
        SEGMENTS_ARROW: _segments_table(rows, records.example_id),
    }
    for name, table in tables.items():
        write_arrow_table(table, staging / name)
    (staging / TOKENIZER_JSON).write_bytes(enc.tok_bytes)
    shutil.copyfile(spec_path, staging / SPEC_COPY)
    digests = {name.removesuffix(".arrow"): table_digests(t) for name, t in tables.items()}
    timer.lap("write")
    tok_sha = sha256_hex(enc.tok_bytes)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "name": spec.name,
        "store_format": "arrow",
        "spec": spec.to_dict(),
        "spec_sha256": spec.sha256(),
        "spec_file": str(spec_path),
        "build_key": build_key(
            build_key_parts(spec.sha256(), tok_sha if tok_file else None), sources
        ),
        "sources": [s.manifest_entry(format=spec.source.format) for s in sources],
        "segments": {
            "max_tokens": spec.segments.max_tokens,
            "stride": spec.segments.stride,
            "overlap": spec.segments.max_tokens - spec.segments.stride,
            "max_question_tokens": spec.segments.max_question_tokens,
            "input_width": int(np.diff(rows.input_offsets).max(initial=0)),
            "max_input_width": spec.segments.input_width,
            "layout": "[CLS] question [SEP] segment [SEP]",
            "no_answer": NO_ANSWER,
        },
        "tokenizer": {
            "file": TOKENIZER_JSON,
            "sha256": tok_sha,
            "vocab_size": enc.tok.get_vocab_size(),
            "special_tokens": enc.specials.to_dict(),
            **enc.origin,
        },
        **_counts_and_statistics(spec, records, rejected, sources, enc, ans, rows, answer_segment),
        "content_hash": content_hash(digests, tok_sha, file_digest(staging / QUARANTINE)),
        "table_digests": digests,
        "data_files": {
            f: {"sha256": file_digest(staging / f), "bytes": (staging / f).stat().st_size}
            for f in DATA_FILES
        },
        "timings": timer.stages,
        "versions": versions("numpy", "pyarrow", "polars", "orjson", "zarr", "tokenizers"),
    }
    return manifest


def _tokenize(
    spec: SegmentSpec,
    spec_path: str | Path,
    tok_file: Path | None,
    contexts: list[str],
    questions: list[str],
    timer: _Timer,
) -> _Tokenized:
    """Load the spec's tokenizer or train one on the kept corpus, then encode the corpus."""
    origin = str(spec_path)
    split: WordSplit | None = None
    if tok_file is not None:
        tok = load_tokenizer(tok_file, origin)
        t = spec.tokenizer
        specials = specials_of(tok, t.cls_token, t.sep_token, t.pad_token, origin)
        tok_bytes = tok_file.read_bytes()
        tok_origin: dict[str, Any] = {"source": "file", "path": str(tok_file)}
    else:
        train = spec.tokenizer.train
        assert train is not None
        corpus = contexts + questions
        split = split_words(corpus, train.lowercase)
        tok = train_tokenizer(
            corpus, train.vocab_size, train.min_frequency, train.lowercase, split=split
        )
        specials = specials_of(tok, "[CLS]", "[SEP]", "[PAD]", origin)
        tok_bytes = tokenizer_bytes(tok)
        tok_origin = {"source": "trained", "model": "WordPiece", **vars(train)}
    timer.lap("tokenizer")
    if split is not None:  # the words training met: no second pass over the corpus
        n_ctx = len(contexts)
        docs = encode_from_words(tok, contexts, split, np.arange(n_ctx))
        qs = encode_from_words(tok, questions, split, np.arange(n_ctx, n_ctx + len(questions)))
    else:
        docs = encode(tok, contexts)
        qs = encode(tok, questions, with_offsets=False)
    timer.lap("encode")
    return _Tokenized(tok, specials, tok_bytes, tok_origin, docs, qs)


def _map_answers(records: Records, ex_doc: np.ndarray, docs: Encoded) -> _Answers:
    """Every answer's character span -> its token span, all examples at once."""
    c0, c1 = _answer_char_spans(records)
    has = c0 >= 0
    gs = np.full(len(records), NO_ANSWER, dtype=np.int64)
    ge = gs.copy()
    aligned = np.zeros(len(records), dtype=bool)
    if has.any():
        span = char_spans_to_tokens(
            ex_doc[has], c0[has], c1[has], docs.starts, docs.ends, docs.offsets
        )
        gs[has], ge[has], aligned[has] = span
    return _Answers(ex_doc, c0, gs, ge, aligned)


def _drop_untokenizable(
    records: Records,
    contexts: list[str],
    ans: _Answers,
    enc: _Tokenized,
    rejected: list[Rejected],
    sources: list[SourceFile],
) -> tuple[Records, list[str], _Answers]:
    """Quarantine examples that cannot be kept once tokenized (an empty document, an answer
    no token covers); documents no kept example reads go too, the rest keep their order."""
    empty_doc = enc.docs.lengths[ans.ex_doc] == 0
    unmapped = (ans.c0 >= 0) & (ans.gs < 0) & ~empty_doc
    drop = np.flatnonzero(empty_doc | unmapped)
    for i in drop.tolist():
        reason = EMPTY_CONTEXT if empty_doc[i] else ANSWER_NOT_IN_TOKENS
        detail = (
            "the context has no token once normalised (only control or ignored characters)"
            if empty_doc[i]
            else f"no token of the context covers the answer {records.answers[i][0][:60]!r}"
        )
        fi, _ = records.order[i]
        rejected.append(
            Rejected(
                records.order[i], records.file[i], records.line[i], records.location[i],
                reason, detail, records.example_id[i], records.raw(i),
            )
        )  # fmt: skip
        sources[fi].quarantined += 1
    if not len(drop):
        return records, contexts, ans
    keep = np.setdiff1d(np.arange(len(records)), drop)
    records = records.take(keep.tolist())
    enc.questions = enc.questions.take(keep)
    used, ex_doc = np.unique(ans.ex_doc[keep], return_inverse=True)
    order = np.argsort(np.unique(ex_doc, return_index=True)[1], kind="stable")
    remap = np.empty(len(used), dtype=np.int64)  # keep documents in first-appearance order
    remap[order] = np.arange(len(used))
    used = used[order]
    enc.docs = enc.docs.take(used)
    ans = _Answers(
        remap[ex_doc].astype(np.int64), ans.c0[keep], ans.gs[keep], ans.ge[keep], ans.aligned[keep]
    )
    return records, [contexts[i] for i in used.tolist()], ans


def _write_quarantine(
    spec: SegmentSpec,
    staging: Path,
    out: Path,
    sources: list[SourceFile],
    rejected: list[Rejected],
    max_bad_fraction: float | None,
) -> None:
    """``quarantine.jsonl`` in input order; BuildError past ``--max-bad-fraction``."""
    write_quarantine(spec.name, staging, out, sources, rejected, max_bad_fraction, "records")


def write_quarantine(
    name: str,
    staging: Path,
    out: Path,
    sources: list[SourceFile],
    rejected: list[Rejected],
    max_bad_fraction: float | None,
    unit: str,
) -> None:
    """``quarantine.jsonl`` of a store named ``name`` in input order (``rejected`` sorted
    in place); BuildError when more than ``max_bad_fraction`` of the ``unit`` read were
    rejected (the quarantine is then kept beside the store for a look)."""
    rejected.sort(key=lambda r: r.order)
    with (staging / QUARANTINE).open("wb") as f:
        for r in rejected:
            f.write(r.to_json())
    n_records = sum(s.records for s in sources)
    if max_bad_fraction is not None and n_records and len(rejected) / n_records > max_bad_fraction:
        keep_path = out / f"{name}.rejected-quarantine.jsonl"
        shutil.copyfile(staging / QUARANTINE, keep_path)
        top = ", ".join(f"{k} {v}" for k, v in Counter(r.reason for r in rejected).most_common(3))
        raise BuildError(
            f"{len(rejected)} of {n_records} {unit} quarantined ({len(rejected) / n_records:.1%}) > "
            f"--max-bad-fraction {max_bad_fraction}: {top}; see {keep_path}"
        )


def _segment_rows(
    spec: SegmentSpec, ans: _Answers, enc: _Tokenized
) -> tuple[SegmentRows, np.ndarray]:
    """Every (question, segment) row, a block of examples at a time, and per example the
    first segment that holds its answer (NO_ANSWER if none)."""
    seg = spec.segments
    questions, docs = enc.questions, enc.docs
    n = len(ans.ex_doc)
    q_len = np.minimum(questions.lengths, seg.max_question_tokens)
    n_doc = docs.lengths[ans.ex_doc]
    nseg = n_segments(n_doc, seg.max_tokens, seg.stride)
    cost = np.cumsum(nseg * (q_len + 3) + n_doc + nseg * max(0, seg.max_tokens - seg.stride))
    cuts = np.searchsorted(
        cost, np.arange(1, int(cost[-1] // ROWS_PER_BLOCK_TOKENS) + 1) * ROWS_PER_BLOCK_TOKENS
    )
    bounds = [0, *sorted(set(int(c) for c in cuts if 0 < c < n)), n]
    pool = token_pool(docs.ids, questions.ids, enc.specials)
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        parts.append(
            assemble_rows(
                ans.ex_doc[a:b], questions.ids, questions.offsets[a:b], q_len[a:b], docs.ids,
                docs.offsets, ans.gs[a:b], ans.ge[a:b], seg.max_tokens, seg.stride,
                enc.specials, a, pool,
            )
        )  # fmt: skip
    rows = SegmentRows.concat(parts)
    hit = np.flatnonzero(rows.local_start >= 0)
    answer_segment = np.full(n, NO_ANSWER, dtype=np.int64)
    hit_ex, first = np.unique(rows.example_index[hit], return_index=True)
    answer_segment[hit_ex] = rows.segment_index[hit[first]]
    return rows, answer_segment


def _counts_and_statistics(
    spec: SegmentSpec,
    records: Records,
    rejected: list[Rejected],
    sources: list[SourceFile],
    enc: _Tokenized,
    ans: _Answers,
    rows: SegmentRows,
    answer_segment: np.ndarray,
) -> dict[str, Any]:
    """The manifest's ``counts``, ``quarantine_reasons`` and ``statistics``."""
    seg = spec.segments
    docs, questions = enc.docs, enc.questions
    n_doc = docs.lengths[ans.ex_doc]
    impossible = np.asarray(records.is_impossible, dtype=bool)
    answerable = ~impossible
    n_kept = len(records)
    counts = {
        "records": sum(s.records for s in sources),
        "records_kept": n_kept,
        "records_quarantined": len(rejected),
        "examples": n_kept,
        "answerable": int(answerable.sum()),
        "impossible": int(impossible.sum()),
        "documents": len(docs.lengths),
        "segments": len(rows),
        "document_tokens": int(docs.lengths.sum()),
        "input_ids": int(rows.input_offsets[-1]),
        "questions_truncated": int((questions.lengths > seg.max_question_tokens).sum()),
        "answers_in_no_segment": int((answerable & (answer_segment < 0)).sum()),
        "answers_not_token_aligned": int((answerable & ~ans.aligned).sum()),
        "answers_with_unknown_tokens": _answers_with_unk(
            docs, ans.gs, ans.ge, ans.ex_doc, enc.specials
        ),
        "examples_per_split": dict(sorted(Counter(records.split).items())),
    }
    a = answerable
    ans_rel = (ans.gs[a] + ans.ge[a]) / 2 / np.maximum(n_doc[a], 1)
    return {
        "counts": counts,
        "quarantine_reasons": dict(sorted(Counter(r.reason for r in rejected).items())),
        "statistics": {
            "segments_per_example": distribution(n_segments(n_doc, seg.max_tokens, seg.stride)),
            "segments_per_document": distribution(
                n_segments(docs.lengths, seg.max_tokens, seg.stride)
            ),
            "document_tokens": distribution(docs.lengths),
            "question_tokens": distribution(questions.lengths),
            "answer_segment": distribution(answer_segment[answer_segment >= 0]),
            "answer_relative_position": distribution(ans_rel),
        },
    }


def _answers_with_unk(
    docs: Encoded, gs: np.ndarray, ge: np.ndarray, ex_doc: np.ndarray, specials: Specials
) -> int:
    """Answers with an unknown token among their tokens (their text cannot be decoded)."""
    if specials.unk is None:
        return 0
    has = np.flatnonzero(gs >= 0)
    if len(has) == 0:
        return 0
    is_unk = np.concatenate([[0], np.cumsum(docs.ids == specials.unk)])
    base = docs.offsets[:-1][ex_doc[has]]
    n = is_unk[base + ge[has] + 1] - is_unk[base + gs[has]]
    return int((n > 0).sum())


def _nothing_kept(
    spec_path: str | Path, sources: list[SourceFile], rejected: list[Rejected]
) -> str:
    n = sum(s.records for s in sources)
    reasons = dict(Counter(r.reason for r in rejected))
    return (
        f"{spec_path}: no example could be kept from {n} records ({len(rejected)} quarantined: "
        f"{reasons}); nothing to store"
    )


# --------------------------------------------------------------------------- CLI summary


def summary_lines(result: Any) -> list[str]:
    """What ``python -m pipeline.build`` prints for a segment store."""
    m = result.manifest
    c = m["counts"]
    if result.status == "up to date":
        return [
            f"{result.path}: up to date ({c['examples']} examples, {c['segments']} segments); --force rebuilds"
        ]
    lines = [
        f"{result.path}: built in {result.seconds:.2f}s",
        f"  records    {c['records']:>8}  = kept {c['records_kept']} + quarantined {c['records_quarantined']}",
        f"  examples   {c['examples']:>8}  ({c['answerable']} answerable, {c['impossible']} unanswerable)",
        f"  documents  {c['documents']:>8}  ({c['document_tokens']} tokens)",
        f"  segments   {c['segments']:>8}  (max_tokens {m['segments']['max_tokens']}, stride {m['segments']['stride']}; "
        f"{c['answers_in_no_segment']} answers in no single segment)",
        f"  tokenizer  {m['tokenizer']['vocab_size']:>8}  tokens ({m['tokenizer']['source']})",
    ]
    return lines + quarantine_summary(m, result.path)
