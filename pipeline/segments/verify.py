"""Verify a segment store: file digests, the content hash, and every rule of the layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.arrowio import data_file_problems, file_digest, read_manifest
from pipeline.format import QUARANTINE
from pipeline.segments.build import content_hash, n_segments, table_digests
from pipeline.segments.layout import (
    DOCUMENTS_ARROW,
    EXAMPLES_ARROW,
    NO_ANSWER,
    SEGMENTS_ARROW,
    TOKENIZER_JSON,
)
from pipeline.segments.store import SegmentStore, open_segment_store
from pipeline.segments.tokenizer import decode_span, normalize_for_compare


def verify(path: str | Path) -> list[str]:
    """Problems found in a segment store (empty: it verifies)."""
    p = Path(path)
    manifest = read_manifest(p)
    problems = data_file_problems(p, manifest)
    if problems:
        return problems
    store = open_segment_store(p)
    digests = {
        name.removesuffix(".arrow"): table_digests(store.table(name))
        for name in (DOCUMENTS_ARROW, EXAMPLES_ARROW, SEGMENTS_ARROW)
    }
    content = content_hash(digests, file_digest(p / TOKENIZER_JSON), file_digest(p / QUARANTINE))
    problems += digest_problems(p, manifest, digests, content)
    problems += [f"{p}: {msg}" for msg in check_invariants(store)]
    return problems


def digest_problems(
    p: Path, manifest: dict[str, Any], digests: dict[str, dict[str, str]], content: str
) -> list[str]:
    """Each table column whose digest, and the content hash if it, differs from the
    manifest's (the store kinds made of tables: segments, sequences)."""
    problems = []
    for table, cols in digests.items():
        for col, d in cols.items():
            if manifest.get("table_digests", {}).get(table, {}).get(col) != d:
                problems.append(f"{p}: {table}.{col}: content differs from the manifest's digest")
    if content != manifest.get("content_hash"):
        problems.append(
            f"{p}: content hash {content[:12]} != manifest {str(manifest.get('content_hash'))[:12]}"
        )
    return problems


def ok_line(path: str | Path, manifest: dict[str, Any]) -> str:
    """What ``python -m pipeline.verify`` prints for a segment store that verifies."""
    c = manifest["counts"]
    return (
        f"OK {path}: {c['examples']} examples, {c['segments']} segments, "
        f"content {manifest['content_hash'][:16]} (manifest.json verified)"
    )


@dataclass(frozen=True)
class _RowIndex:
    """Per segments row: its example and its index within it; per example: rows and sizes."""

    row_ex: np.ndarray  # (R,) example of each row
    k: np.ndarray  # (R,) segment index of each row within its example
    off: np.ndarray  # (R,) int64 token_offset
    ln: np.ndarray  # (R,) int64 n_segment_tokens
    nd: np.ndarray  # (E,) tokens of each example's document
    first: np.ndarray  # (E,) first row of each example
    last: np.ndarray  # (E,) last row of each example


def check_invariants(store: SegmentStore) -> list[str]:
    """Every rule of the segment layout; one message per broken rule. A broken rule that
    later rules rely on (row counts, the tiling, the input framing) ends the check."""
    out = _check_counts(store)
    if out or len(store.examples) == 0:
        return out or ["the store holds no example"]
    out += _check_records(store)
    problems, idx = _check_tiling(store)
    if idx is None:
        return out + problems
    out += _check_coverage(store, idx)
    problems, framed = _check_framing(store, idx)
    out += problems
    if not framed:
        return out
    out += _check_tokens(store, idx)
    hit, problems = _check_answers(store, idx)
    out += problems
    out += _decode_check(store, hit, idx.row_ex)
    return out


def _check_counts(store: SegmentStore) -> list[str]:
    """The tables hold as many rows as the manifest says."""
    ex, sg, docs = store.examples, store.segments, store.documents
    c = store.manifest["counts"]
    if (len(ex), len(sg), len(docs)) != (c["examples"], c["segments"], c["documents"]):
        return [
            f"rows: {len(ex)} examples, {len(sg)} segments, {len(docs)} documents; manifest "
            f"says {c['examples']}, {c['segments']}, {c['documents']}"
        ]
    return []


def _check_records(store: SegmentStore) -> list[str]:
    """Records read = kept + quarantined, and the quarantine holds the quarantined ones."""
    out = []
    c = store.manifest["counts"]
    if c["records"] != c["records_kept"] + c["records_quarantined"]:
        out.append("counts: records != records_kept + records_quarantined")
    n_q = sum(1 for _ in store.quarantine_lines())
    if n_q != c["records_quarantined"]:
        out.append(f"quarantine.jsonl: {n_q} records, manifest says {c['records_quarantined']}")
    return out


def _check_tiling(store: SegmentStore) -> tuple[list[str], _RowIndex | None]:
    """Each example's segments: as many as its document needs, in example then segment order."""
    ex, sg, docs = store.examples, store.segments, store.documents
    seg = store.manifest["segments"]
    out = []
    nd = docs.n_tokens[ex.doc_index]
    if not np.array_equal(nd, ex.n_doc_tokens):
        out.append("examples: n_doc_tokens differs from the document's token count")
    if not np.array_equal(ex.n_segments, n_segments(nd, seg["max_tokens"], seg["stride"])):
        out.append("examples: n_segments is not 1 + ceil(max(n - max_tokens, 0) / stride)")
        return out, None
    n_rows = len(sg)
    if (
        not np.array_equal(ex.segment_row, np.cumsum(ex.n_segments) - ex.n_segments)
        or int(ex.n_segments.sum()) != n_rows
    ):
        out.append("examples: segment_row / n_segments do not tile segments.arrow in order")
        return out, None
    row_ex = np.repeat(np.arange(len(ex)), ex.n_segments)
    k = np.arange(n_rows) - ex.segment_row[row_ex]
    if not np.array_equal(sg.example_index, row_ex) or not np.array_equal(sg.segment_index, k):
        out.append("segments: example_index / segment_index are not in example then segment order")
        return out, None
    first = ex.segment_row
    idx = _RowIndex(
        row_ex,
        k,
        sg.token_offset.astype(np.int64),
        sg.n_segment_tokens.astype(np.int64),
        nd,
        first,
        first + ex.n_segments - 1,
    )
    return out, idx


def _check_coverage(store: SegmentStore, idx: _RowIndex) -> list[str]:
    """Segments start at token 0, leave no gap, go forward and end at the document's end."""
    seg = store.manifest["segments"]
    window, stride = seg["max_tokens"], seg["stride"]
    off, ln, last = idx.off, idx.ln, idx.last
    out = []
    if (off[idx.first] != 0).any():
        out.append("segments: an example's first segment does not start at token 0")
    nxt = np.ones(len(off), dtype=bool)
    nxt[last] = False
    if (off[1:][nxt[:-1]] <= off[:-1][nxt[:-1]]).any():
        out.append("segments: token_offset is not increasing within an example")
    if (off[1:][nxt[:-1]] > (off + ln)[:-1][nxt[:-1]]).any():
        out.append("segments: a gap between consecutive segments (some tokens are in no segment)")
    if not np.array_equal(off[last] + ln[last], idx.nd.astype(np.int64)):
        out.append("segments: the last segment does not end at the document's last token")
    if (ln < 1).any() or (ln > window).any():
        out.append(f"segments: n_segment_tokens outside 1..max_tokens ({window})")
    if not np.array_equal(off, idx.k * stride):
        out.append(f"segments: token_offset is not segment_index * stride ({stride})")
    return out


def _check_framing(store: SegmentStore, idx: _RowIndex) -> tuple[list[str], bool]:
    """input ids are [CLS] question [SEP] segment [SEP]; False: the rest cannot be read."""
    ex, sg = store.examples, store.segments
    m = store.manifest
    q = sg.n_question_tokens.astype(np.int64)
    cs = sg.context_start.astype(np.int64)
    sp = m["tokenizer"]["special_tokens"]
    if (
        not np.array_equal(cs, q + 2)
        or (q > m["segments"]["max_question_tokens"]).any()
        or not np.array_equal(q, ex.n_question_tokens[idx.row_ex])
    ):
        return ["segments: n_question_tokens / context_start inconsistent"], False
    if not np.array_equal(sg.lengths.astype(np.int64), cs + idx.ln + 1):
        return ["segments: len(input_ids) != context_start + n_segment_tokens + 1"], False
    v, o = sg.input_values, sg.input_offsets
    if (
        (v[o[:-1]] != sp["cls"]).any()
        or (v[o[:-1] + q + 1] != sp["sep"]).any()
        or (v[o[1:] - 1] != sp["sep"]).any()
    ):
        return ["segments: input_ids are not framed [CLS] question [SEP] segment [SEP]"], True
    return [], True


def _check_tokens(store: SegmentStore, idx: _RowIndex) -> list[str]:
    """A segment's tokens are its document's at token_offset; every segment of an example
    repeats the same question tokens."""
    ex, sg, docs = store.examples, store.segments, store.documents
    out = []
    ln, off, row_ex = idx.ln, idx.off, idx.row_ex
    q = sg.n_question_tokens.astype(np.int64)
    cs = sg.context_start.astype(np.int64)
    v, o = sg.input_values, sg.input_offsets
    rid = np.repeat(np.arange(len(sg)), ln)
    pos = np.arange(int(ln.sum())) - np.repeat(np.cumsum(ln) - ln, ln)
    got = v[o[:-1][rid] + cs[rid] + pos]
    want = docs.token_values[docs.token_offsets[:-1][ex.doc_index[row_ex]][rid] + off[rid] + pos]
    if not np.array_equal(got, want):
        out.append("segments: a segment's tokens differ from its document's tokens at token_offset")
    qpos_rid = np.repeat(np.arange(len(sg)), q)
    qpos = np.arange(int(q.sum())) - np.repeat(np.cumsum(q) - q, q)
    qv = v[o[:-1][qpos_rid] + 1 + qpos]
    first_of = idx.first[row_ex][qpos_rid]
    if not np.array_equal(qv, v[o[first_of] + 1 + qpos]):
        out.append("segments: the question tokens differ between segments of an example")
    return out


def _check_answers(store: SegmentStore, idx: _RowIndex) -> tuple[np.ndarray, list[str]]:
    """Global and local answer spans agree; returns the rows that hold an answer."""
    ex, sg = store.examples, store.segments
    out = []
    off, ln, row_ex = idx.off, idx.ln, idx.row_ex
    cs = sg.context_start.astype(np.int64)
    gs, ge = ex.global_start.astype(np.int64), ex.global_end.astype(np.int64)
    imp = ex.is_impossible
    if (imp & ((gs != NO_ANSWER) | (ge != NO_ANSWER))).any():
        out.append("examples: an unanswerable question has an answer span")
    ans = ~imp
    nd = idx.nd
    if ans.any() and ((gs[ans] < 0) | (ge[ans] < gs[ans]) | (ge[ans] >= nd[ans])).any():
        out.append("examples: an answer span outside its document")
    if not np.array_equal(sg.global_start, ex.global_start[row_ex]) or not np.array_equal(
        sg.global_end, ex.global_end[row_ex]
    ):
        out.append("segments: global_start/end differ from the example's")
    g_s, g_e = gs[row_ex], ge[row_ex]
    inside = (g_s >= 0) & (g_s >= off) & (g_e < off + ln)
    ls, le = sg.local_start.astype(np.int64), sg.local_end.astype(np.int64)
    exp_s = np.where(inside, g_s - off + cs, NO_ANSWER)
    exp_e = np.where(inside, g_e - off + cs, NO_ANSWER)
    if not np.array_equal(ls, exp_s) or not np.array_equal(le, exp_e):
        out.append("segments: local_start/end inconsistent with global span and token_offset")
    a_seg = np.full(len(ex), NO_ANSWER, dtype=np.int64)
    hit = np.flatnonzero(inside)
    hx, fi = np.unique(row_ex[hit], return_index=True)
    a_seg[hx] = idx.k[hit[fi]]
    if not np.array_equal(a_seg, ex.answer_segment):
        out.append("examples: answer_segment is not the first segment holding the answer")
    return hit, out


def _decode_check(store: SegmentStore, hit: np.ndarray, row_ex: np.ndarray) -> list[str]:
    """The tokens marked as the answer decode to the answer text (normalised, without
    whitespace): the global span in the document's tokens of every answerable example,
    and the local span in ``input_ids`` of every row that holds the answer.

    Where the answer's characters start or end inside a token (counted in the manifest as
    ``answers_not_token_aligned``) the decoded tokens must contain the answer; where a
    marked token is ``[UNK]`` (``answers_with_unknown_tokens``) the text cannot be
    recovered from ids and the check is skipped."""
    tok = store.tokenizer
    ex, sg, docs = store.examples, store.segments, store.documents
    unk = store.manifest["tokenizer"]["special_tokens"].get("unk")
    v, o = sg.input_values, sg.input_offsets
    todo: list[tuple[str, int, list[int]]] = []  # (where, example, marked ids)
    for e in np.flatnonzero(~ex.is_impossible).tolist():
        base = int(docs.token_offsets[int(ex.doc_index[e])])
        ids = docs.token_values[base + int(ex.global_start[e]) : base + int(ex.global_end[e]) + 1]
        todo.append((f"example {ex.example_id[e]!r} (global span)", e, ids.tolist()))
    for r in hit.tolist():
        ids = v[o[r] + sg.local_start[r] : o[r] + sg.local_end[r] + 1]
        todo.append(
            (
                f"segments row {r} (example {ex.example_id[int(row_ex[r])]!r})",
                int(row_ex[r]),
                ids.tolist(),
            )
        )
    bad: list[str] = []
    aligned: dict[int, bool] = {}
    for where, e, span_ids in todo:
        if unk is not None and unk in span_ids:
            continue
        if e not in aligned:
            base = int(docs.token_offsets[int(ex.doc_index[e])])
            text0, start = ex.answers[e][0], ex.answer_starts[e][0]
            c0 = start + len(text0) - len(text0.lstrip())
            c1 = start + len(text0.rstrip())
            aligned[e] = (
                int(docs.token_start[base + int(ex.global_start[e])]) == c0
                and int(docs.token_end[base + int(ex.global_end[e])]) == c1
            )
        answer = normalize_for_compare(tok, ex.answers[e][0])
        text = decode_span(tok, span_ids)
        got = "".join(text.split())
        if not (got == answer if aligned[e] else answer in got):
            bad.append(
                f"{where}: the marked tokens decode to {text[:60]!r}, the answer is "
                f"{ex.answers[e][0][:60]!r}"
            )
            if len(bad) >= 5:
                break
    return bad
