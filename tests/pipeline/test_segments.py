"""Segment stores (``kind: segments``): spec, transforms, quarantine, build, verify, CLI.

Layers: Hypothesis properties of the pure transforms (windows, character -> token spans)
against plain-loop references; whole builds of generated JSONL checked row by row against
:func:`pipeline.segments.segment_example_reference`; one test per quarantine reason; the
store's contract (up to date, deterministic, SQuAD == JSONL); and the real CLI once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_specs.schema import SpecError, parse_segment_spec
from pipeline.build import build
from pipeline.format import BuildError
from pipeline.segments.build import (
    assemble_rows,
    char_spans_to_tokens,
    n_segments,
    segment_example_reference,
)
from pipeline.segments.layout import DOCUMENTS_ARROW, EXAMPLES_ARROW, NO_ANSWER, SEGMENTS_ARROW
from pipeline.segments.store import open_segment_store
from pipeline.segments.tokenizer import (
    Specials,
    decode_span,
    encode,
    encode_from_words,
    normalize_for_compare,
    split_words,
    tokenizer_bytes,
    train_tokenizer,
)
from pipeline.segments.verify import check_invariants
from pipeline.verify import verify

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "make_qa_demo_data.py"
SPECIALS = Specials(pad=0, cls=2, sep=3, unk=1)
WORDS = (
    "the", "code", "of", "a", "Falcon", "is", "zephyr", "Ünïcode", "naïve", "U.S.", "1970s",
    "don't", "x=1;", "(see", "below)", "lives", "in", "Marrowby", "—", "über", "e-mail", "42",
)  # fmt: skip

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A small tokenizer trained on text with accents, punctuation, digits and case."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)[:12]] + [" ".join(WORDS)] * 3
    return train_tokenizer(texts, vocab_size=600, min_frequency=2)


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any] | bytes | str]) -> Path:
    lines = []
    for r in records:
        if isinstance(r, Mapping):
            lines.append(orjson.dumps(r))
        elif isinstance(r, str):
            lines.append(r.encode("utf-8"))
        else:
            lines.append(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def write_spec(
    directory: Path,
    paths: list[str | Path],
    *,
    fmt: str = "jsonl",
    name: str = "qa",
    tokenizer: Mapping[str, Any] | None = None,
    segments: Mapping[str, Any] | None = None,
    splits: Mapping[str, str] | None = None,
    file_name: str | None = None,
) -> Path:
    source: dict[str, Any] = {"paths": [str(p) for p in paths], "format": fmt}
    if splits:
        source["splits"] = dict(splits)
    spec = {
        "name": name,
        "kind": "segments",
        "source": source,
        "tokenizer": dict(tokenizer or {"train": {"vocab_size": 500, "min_frequency": 1}}),
        "segments": dict(segments or {"max_tokens": 8, "stride": 6, "max_question_tokens": 5}),
        "store": {"format": "arrow"},
    }
    p = directory / (file_name or f"{name}.yaml")
    p.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return p


def rec(eid: str, context: str, question: str, answer: str | None, **extra: Any) -> dict[str, Any]:
    """A JSONL record whose answer is the first occurrence of ``answer`` in ``context``."""
    answers = [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}]
    return {"id": eid, "question": question, "context": context, "answers": answers, **extra}


def build_ok(spec: Path, out: Path, **kwargs: Any) -> Any:
    result = build(spec, out, progress=False, **kwargs)
    assert verify(result.path) == [], verify(result.path)
    return result


def quarantine(store: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (store / "quarantine.jsonl").read_text().splitlines()]


def run_cli(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip


def make_demo(out: Path, docs: int = 10, seed: int = 0) -> None:
    proc = run_cli(DEMO, "--out", out, "--docs", str(docs), "--seed", str(seed))
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qa_raw")
    make_demo(out, docs=10)
    return out


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory, demo_raw: Path) -> Path:
    tmp = tmp_path_factory.mktemp("qa_store")
    spec = write_spec(
        tmp, [demo_raw / "*.json"], fmt="squad", name="demo",
        tokenizer={"train": {"vocab_size": 2000, "min_frequency": 2}},
        segments={"max_tokens": 64, "stride": 48, "max_question_tokens": 16},
        splits={"train": "train*", "dev": "dev*"},
    )  # fmt: skip
    return build_ok(spec, tmp / "stores").path


# --------------------------------------------------------------------------- spec


def test_spec_defaults_and_errors_name_key_and_fix() -> None:
    ok = parse_segment_spec(
        {"name": "q", "kind": "segments", "source": {"paths": ["x/*.json"]}}, "s.yaml"
    )
    assert ok.source.format == "squad" and ok.tokenizer.train is not None
    assert (ok.segments.max_tokens, ok.segments.stride, ok.segments.max_question_tokens) == (
        128, 128, 32,
    )  # fmt: skip
    assert ok.segments.input_width == 163
    base: dict[str, Any] = {"name": "q", "kind": "segments", "source": {"paths": ["x"]}}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"segments": {"max_tokens": 64, "stride": 65}}, "segments.stride", "stride <= max_tokens"),
        ({"tokenizer": {"train": {}, "path": "t.json"}}, "tokenizer", "exactly one"),
        ({"tokenizer": {"train": {"vocab_size": 3}}}, "tokenizer.train.vocab_size", ">= 16"),
        ({"source": {"paths": ["x"], "format": "csv"}}, "source.format", "`squad`"),
        ({"source": {"paths": ["x"], "splits": ["a"]}}, "source.splits", "file-name pattern"),
        ({"segments": {"max_tokens": 0}}, "segments.max_tokens", ">= 1"),
        ({"store": {"format": "zarr"}}, "store.format", "arrow"),
        ({"segment": {}}, "unknown key 'segment'", "allowed keys"),
        ({"tokenizer": {"train": {}, "cls_token": "<s>"}}, "tokenizer", "loaded tokenizer"),
    ]
    for extra, key, fix in cases:
        with pytest.raises(SpecError) as e:
            parse_segment_spec({**base, **extra}, "s.yaml")
        assert str(e.value).startswith("s.yaml: ") and key in str(e.value), str(e.value)
        assert fix in str(e.value), str(e.value)


def test_shipped_qa_demo_spec_parses() -> None:
    from data_specs.schema import load_segment_spec

    spec = load_segment_spec(REPO / "data_specs" / "qa-demo.yaml")
    assert spec.name == "qa-demo" and spec.source.format == "squad"
    assert spec.segments.max_tokens == 128 and spec.segments.stride == 128
    assert spec.tokenizer.train is not None and spec.tokenizer.train.vocab_size == 8000


# --------------------------------------------------------------------------- transforms


def _reference_rows(
    n_doc: list[int], questions: list[int], answers: list[tuple[int, int]], w: int, s: int
) -> list[dict[str, Any]]:
    """Plain loops: the rows assemble_rows must make (doc tokens are 1000*d + i)."""
    rows = []
    for e, (d_len, q_len, (gs, ge)) in enumerate(zip(n_doc, questions, answers)):
        doc = [1000 * e + i for i in range(d_len)]
        q = [-(100 * e + j) for j in range(q_len)]
        k = 0
        while True:
            seg = doc[k * s : k * s + w]
            cs = q_len + 2
            inside = gs >= 0 and gs >= k * s and ge < k * s + len(seg)
            rows.append(
                {"example": e, "k": k, "ids": [SPECIALS.cls, *q, SPECIALS.sep, *seg, SPECIALS.sep],
                 "offset": k * s, "len": len(seg),
                 "local": (gs - k * s + cs, ge - k * s + cs) if inside else (NO_ANSWER, NO_ANSWER)}
            )  # fmt: skip
            if k * s + w >= d_len:
                break
            k += 1
    return rows


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[int], list[int], list[tuple[int, int]], int, int]:
    w = draw(st.integers(1, 12))
    s = draw(st.integers(1, w))
    n = draw(st.integers(1, 6))
    n_doc = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    qs = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    answers = []
    for d in n_doc:
        if draw(st.booleans()):
            a = draw(st.integers(0, d - 1))
            answers.append((a, draw(st.integers(a, min(d - 1, a + 4)))))
        else:
            answers.append((NO_ANSWER, NO_ANSWER))
    return n_doc, qs, answers, w, s


@_SETTINGS
@given(layouts())
def test_rows_cover_every_token_and_match_the_plain_loop(
    case: tuple[list[int], list[int], list[tuple[int, int]], int, int],
) -> None:
    n_doc, qs, answers, w, s = case
    doc_ids = np.concatenate([1000 * e + np.arange(d) for e, d in enumerate(n_doc)]).astype(
        np.int32
    )
    doc_off = np.concatenate([[0], np.cumsum(n_doc)]).astype(np.int64)
    q_ids = np.concatenate(
        [-(100 * e + np.arange(q)) for e, q in enumerate(qs)] + [np.zeros(0)]
    ).astype(np.int32)
    q_off = np.concatenate([[0], np.cumsum(qs)]).astype(np.int64)
    gs = np.array([a for a, _ in answers], dtype=np.int64)
    ge = np.array([b for _, b in answers], dtype=np.int64)
    rows = assemble_rows(
        np.arange(len(n_doc)), q_ids, q_off[:-1], np.array(qs), doc_ids, doc_off, gs, ge, w, s,
        SPECIALS,
    )  # fmt: skip
    ref = _reference_rows(n_doc, qs, answers, w, s)
    assert len(rows) == len(ref) == int(n_segments(np.array(n_doc), w, s).sum())
    for r, want in enumerate(ref):
        ids = rows.input_values[rows.input_offsets[r] : rows.input_offsets[r + 1]].tolist()
        assert ids == want["ids"]
        assert (rows.example_index[r], rows.segment_index[r]) == (want["example"], want["k"])
        assert (rows.token_offset[r], rows.n_segment_tokens[r]) == (want["offset"], want["len"])
        assert (rows.local_start[r], rows.local_end[r]) == want["local"]
    # coverage: per example, offsets start at 0, increase, leave no gap, end at the last token
    for e, d in enumerate(n_doc):
        m = rows.example_index == e
        off, ln = rows.token_offset[m], rows.n_segment_tokens[m]
        assert off[0] == 0 and (np.diff(off) > 0).all()
        assert (off[1:] <= off[:-1] + ln[:-1]).all()
        covered = np.zeros(d, dtype=bool)
        for o, n in zip(off, ln):
            covered[o : o + n] = True
        assert covered.all() and off[-1] + ln[-1] == d


text_words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=40)


@_SETTINGS
@given(st.lists(text_words, min_size=1, max_size=4), st.data())
def test_answer_tokens_decode_to_the_answer(
    tokenizer: Any, docs: list[list[str]], data: Any
) -> None:
    contexts = [" ".join(words) for words in docs]
    enc = encode(tokenizer, contexts)
    doc, c0, c1, spans = [], [], [], []
    for d, words in enumerate(docs):
        i = data.draw(st.integers(0, len(words) - 1))
        j = data.draw(st.integers(i, min(len(words) - 1, i + 3)))
        start = len(" ".join(words[:i])) + (1 if i else 0)
        end = len(" ".join(words[: j + 1]))
        if data.draw(st.booleans()):  # a span that cuts into words
            start = data.draw(st.integers(start, end - 1))
            end = data.draw(st.integers(start + 1, end))
        doc.append(d)
        c0.append(start)
        c1.append(end)
        spans.append(contexts[d][start:end])
    gs, ge, aligned = char_spans_to_tokens(
        np.array(doc), np.array(c0), np.array(c1), enc.starts, enc.ends, enc.offsets
    )
    for k, d in enumerate(doc):
        answer = spans[k]
        if not answer.strip():
            continue
        assert gs[k] >= 0, answer
        base = enc.offsets[d]
        st_, en = enc.starts[base : enc.offsets[d + 1]], enc.ends[base : enc.offsets[d + 1]]
        # minimal: the tokens just outside do not overlap the characters
        assert en[gs[k]] > c0[k] and st_[ge[k]] < c1[k]
        assert gs[k] == 0 or en[gs[k] - 1] <= c0[k]
        assert ge[k] == len(st_) - 1 or st_[ge[k] + 1] >= c1[k]
        ids = enc.ids[base + gs[k] : base + ge[k] + 1].tolist()
        decoded = "".join(decode_span(tokenizer, ids).split())
        norm = normalize_for_compare(tokenizer, answer)
        if aligned[k]:
            assert decoded == norm, (answer, decoded)
        else:
            assert norm in decoded, (answer, decoded)


NASTY = st.sampled_from(
    ["a", "B", "é", "e\u0301", "İ", "ß", "中", "😀", "\x01", "\u200b", "\x00", "-", ".", "'",
     " ", "  ", "\t", "\n", "[CLS]", "[SEP]", "[cls]", "Ünï", "x" * 120, "ﬁ", "\u00a0", "Ⅻ"]
)  # fmt: skip


@_SETTINGS
@given(st.lists(st.lists(NASTY, min_size=0, max_size=30).map("".join), min_size=1, max_size=6))
def test_encoding_from_split_words_equals_encoding_each_text(texts: list[str]) -> None:
    """The trained path's shortcut (each distinct word encoded once, laid out with NumPy)
    gives exactly the ids and character spans of ``encode_batch`` on every whole text."""
    split = split_words(texts)
    tok = train_tokenizer(texts, vocab_size=60, min_frequency=1, split=split)
    fast = encode_from_words(tok, texts[1:], split, np.arange(1, len(texts)))
    slow = encode(tok, texts[1:])
    for name in ("ids", "starts", "ends", "offsets"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)


@st.composite
def qa_records(draw: st.DrawFn) -> list[dict[str, Any]]:
    n_docs = draw(st.integers(1, 3))
    out = []
    for d in range(n_docs):
        words = draw(text_words)
        context = " ".join(words)
        for q in range(draw(st.integers(1, 3))):
            question = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=9)))
            eid = f"d{d}-q{q}"
            if draw(st.booleans()):
                i = draw(st.integers(0, len(words) - 1))
                j = draw(st.integers(i, min(len(words) - 1, i + 2)))
                start = len(" ".join(words[:i])) + (1 if i else 0)
                text = " ".join(words[i : j + 1])
                out.append({"id": eid, "question": question, "context": context,
                            "answers": [{"text": text, "answer_start": start}]})  # fmt: skip
            else:
                out.append({"id": eid, "question": question, "context": context, "answers": []})
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    qa_records(),
    st.integers(2, 12).flatmap(lambda w: st.tuples(st.just(w), st.integers(1, w))),
    st.integers(1, 6),
)
def test_built_store_matches_the_one_document_at_a_time_loop(
    records: list[dict[str, Any]], ws: tuple[int, int], max_q: int
) -> None:
    w, s = ws
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        write_jsonl(t / "in.jsonl", records)
        spec = write_spec(
            t,
            [t / "in.jsonl"],
            segments={"max_tokens": w, "stride": s, "max_question_tokens": max_q},
        )
        store = open_segment_store(build_ok(spec, t / "out").path)  # verify() ran: all rules hold
        ex, sg = store.examples, store.segments
        assert ex.example_id == [r["id"] for r in records]
        for e, r in enumerate(records):
            a = r["answers"][0] if r["answers"] else None
            ref = segment_example_reference(
                store.tokenizer, r["context"], r["question"], a and a["text"],
                a and a["answer_start"], w, s, max_q, SPECIALS,
            )  # fmt: skip
            rows = range(*store.rows_of(e).indices(len(sg)))
            assert len(rows) == len(ref) == ex.n_segments[e]
            assert bool(ex.is_impossible[e]) == (a is None)
            for row, want in zip(rows, ref):
                got = sg.input_values[sg.input_offsets[row] : sg.input_offsets[row + 1]]
                assert got.tolist() == want["input_ids"]
                for key in ("token_offset", "local_start", "local_end", "global_start"):
                    assert getattr(sg, key)[row] == want[key], key
                if want["local_start"] >= 0:  # the marked tokens decode to the answer
                    ids = got[want["local_start"] : want["local_end"] + 1].tolist()
                    assert "".join(
                        decode_span(store.tokenizer, ids).split()
                    ) == normalize_for_compare(store.tokenizer, a["text"] if a else "")


def test_segment_count_formula() -> None:
    np.testing.assert_array_equal(
        n_segments(np.array([1, 8, 9, 14, 15, 100]), 8, 6), [1, 1, 2, 2, 3, 17]
    )
    np.testing.assert_array_equal(
        n_segments(np.array([128, 129, 256, 257]), 128, 128), [1, 2, 2, 3]
    )


# --------------------------------------------------------------------------- store contract


def test_unanswerable_questions_are_kept_and_marked(tmp_path: Path) -> None:
    ctx = "The secret code of the amber falcon is zephyr. " * 6
    recs = [
        rec("a", ctx, "What is the code of the falcon?", "zephyr"),
        rec("b", ctx, "What is the code of the otter?", None),  # empty answers, no flag
        {**rec("c", ctx, "Where does the otter live?", None), "is_impossible": True},
        {**rec("d", ctx, "Which otter?", None), "answers": None},
    ]
    write_jsonl(tmp_path / "in.jsonl", recs)
    store = open_segment_store(
        build_ok(write_spec(tmp_path, [tmp_path / "in.jsonl"]), tmp_path).path
    )
    ex, sg = store.examples, store.segments
    assert ex.example_id == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(ex.is_impossible, [False, True, True, True])
    assert store.manifest["counts"]["impossible"] == 3
    for e in (1, 2, 3):
        rows = store.rows_of(e)
        assert ex.n_segments[e] > 1 and ex.answers[e] == []
        assert (ex.global_start[e], ex.global_end[e], ex.answer_segment[e]) == (-1, -1, -1)
        assert (sg.local_start[rows] == NO_ANSWER).all() and (sg.local_end[rows] == NO_ANSWER).all()
        assert (sg.global_start[rows] == NO_ANSWER).all()
    assert ex.answer_segment[0] == 1 and (sg.local_start[store.rows_of(0)] >= 0).sum() >= 1


def test_each_quarantine_reason_jsonl(tmp_path: Path) -> None:
    ctx = "The amber falcon lives in Marrowby. Nothing else is known."
    good = rec("ok", ctx, "Where does the falcon live?", "Marrowby")
    lines: list[Any] = [
        good,                                                         # 1 kept
        b'{"id": "x", "question": ',                                  # 2 bad_json
        b'{"id": "y", "question": "\xff\xfe"}',                       # 3 bad_utf8
        b"[1, 2]",                                                    # 4 not_an_object
        {**good, "id": "no-q", "question": None},                     # 5 missing_field
        {k: v for k, v in good.items() if k != "id"},                 # 6 missing_field (id)
        {**good, "id": "ctx", "context": "   "},                      # 7 empty_context
        {**good, "id": "off", "answers": [{"text": "Marrowby", "answer_start": 3}]},  # 8 mismatch
        {**good, "id": "far", "answers": [{"text": "Marrowby", "answer_start": 999}]},  # 9 mismatch
        {**good, "id": "type", "answers": "Marrowby"},                # 10 wrong_type
        good,                                                         # 11 duplicate_id
        {**good, "id": "imp", "is_impossible": True},                 # 12 impossible_with_answers
        {**good, "id": "none", "answers": [], "is_impossible": False},  # 13 no_answers
        {**good, "id": "zw", "context": "abc \u200b def",
         "answers": [{"text": "\u200b", "answer_start": 4}]},        # 14 answer_not_in_tokens
        {"id": "blank", "question": "q?", "context": "\u200b\u200b", "answers": []},  # 15 empty after normalising
        "",                                                           # 16 blank: skipped
        rec("ok2", ctx, "Who lives in Marrowby?", "amber falcon"),    # 17 kept
    ]  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", lines)
    res = build_ok(write_spec(tmp_path, [tmp_path / "in.jsonl"]), tmp_path / "out")
    q = quarantine(res.path)
    got = [(r["line"], r["reason"]) for r in q]
    assert got == [
        (2, "bad_json"), (3, "bad_utf8"), (4, "not_an_object"), (5, "missing_field"),
        (6, "missing_field"), (7, "empty_context"), (8, "answer_mismatch"),
        (9, "answer_mismatch"), (10, "wrong_type"), (11, "duplicate_id"),
        (12, "impossible_with_answers"), (13, "no_answers"), (14, "answer_not_in_tokens"),
        (15, "empty_context"),
    ]  # fmt: skip
    by_line = {r["line"]: r for r in q}
    assert "already used at" in by_line[11]["detail"] and by_line[11]["example_id"] == "ok"
    assert "reads" in by_line[8]["detail"] and "raw_base64" in by_line[3]
    assert json.loads(by_line[14]["raw"])["id"] == "zw"
    c = res.manifest["counts"]
    assert (c["records"], c["records_kept"], c["records_quarantined"]) == (16, 2, 14)
    src = res.manifest["sources"][0]
    assert (
        src["records"] == src["records_kept"] + src["records_quarantined"]
        and src["blank_lines"] == 1
    )
    store = open_segment_store(res.path)
    assert store.examples.example_id == ["ok", "ok2"]
    assert len(store.documents) == 1  # the dropped records' documents are not kept


def test_each_quarantine_reason_squad(tmp_path: Path) -> None:
    ctx = "The amber falcon lives in Marrowby."
    qa = {"id": "q1", "question": "Where?", "answers": [{"text": "Marrowby", "answer_start": 26}]}
    squad = {"data": [
        {"title": "t", "paragraphs": [
            {"context": ctx, "qas": [qa, {**qa, "id": "q1"}, "oops", {**qa, "id": "q2", "question": ""}]},
            {"context": "", "qas": [{**qa, "id": "q3"}]},
            {"qas": [{**qa, "id": "q4"}]},
            {"context": ctx},
        ]},
        "not an article",
    ]}  # fmt: skip
    (tmp_path / "a.json").write_bytes(orjson.dumps(squad))
    (tmp_path / "b.json").write_bytes(b'{"data": [')  # broken: one record
    (tmp_path / "c.json").write_bytes(b'{"version": "v2.0"}')  # not SQuAD: one record
    res = build_ok(write_spec(tmp_path, [tmp_path / "*.json"], fmt="squad"), tmp_path / "out")
    q = quarantine(res.path)
    assert [(Path(r["file"]).name, r["location"], r["reason"]) for r in q] == [
        ("a.json", "data[0].paragraphs[0].qas[1]", "duplicate_id"),
        ("a.json", "data[0].paragraphs[0].qas[2]", "not_an_object"),
        ("a.json", "data[0].paragraphs[0].qas[3]", "missing_field"),
        ("a.json", "data[0].paragraphs[1].qas[0]", "empty_context"),
        ("a.json", "data[0].paragraphs[2].qas[0]", "missing_field"),
        ("a.json", "data[0].paragraphs[3]", "not_squad"),
        ("a.json", "data[1]", "not_squad"),
        ("b.json", "file", "bad_json"),
        ("c.json", "file", "not_squad"),
    ]
    assert all(r["line"] is None for r in q)
    c = res.manifest["counts"]
    assert (c["records"], c["records_kept"], c["records_quarantined"]) == (10, 1, 9)
    assert [s["records"] for s in res.manifest["sources"]] == [8, 1, 1]


def test_nothing_kept_and_max_bad_fraction_are_clear_errors(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "bad.jsonl", [b"{", b"{"])
    with pytest.raises(BuildError, match="no example could be kept from 2 records"):
        build(write_spec(tmp_path, [tmp_path / "bad.jsonl"]), tmp_path / "out")
    ctx = "a b c d e f"
    write_jsonl(tmp_path / "half.jsonl", [rec("a", ctx, "q?", "c"), b"{"])
    spec = write_spec(tmp_path, [tmp_path / "half.jsonl"], name="half")
    with pytest.raises(BuildError, match=r"1 of 2 records quarantined .* > --max-bad-fraction 0.1"):
        build(spec, tmp_path / "out", max_bad_fraction=0.1)
    assert not (tmp_path / "out" / "half").exists()
    assert (tmp_path / "out" / "half.rejected-quarantine.jsonl").exists()
    assert build(spec, tmp_path / "out", max_bad_fraction=0.5).status == "built"


def test_squad_and_jsonl_build_identical_examples(tmp_path: Path, demo_raw: Path) -> None:
    kw: dict[str, Any] = {
        "tokenizer": {"train": {"vocab_size": 2000, "min_frequency": 2}},
        "segments": {"max_tokens": 64, "stride": 48, "max_question_tokens": 16},
        "splits": {"train": "train*", "dev": "dev*"},
    }
    a = build_ok(
        write_spec(tmp_path, [demo_raw / "*.json"], fmt="squad", name="sq", **kw), tmp_path
    )
    b = build_ok(
        write_spec(tmp_path, [demo_raw / "jsonl" / "*.jsonl"], fmt="jsonl", name="jl", **kw),
        tmp_path,
    )
    assert a.manifest["table_digests"] == b.manifest["table_digests"]
    assert a.manifest["tokenizer"]["sha256"] == b.manifest["tokenizer"]["sha256"]
    for name in (EXAMPLES_ARROW, SEGMENTS_ARROW, DOCUMENTS_ARROW):
        ta = open_segment_store(a.path).table(name)
        tb = open_segment_store(b.path).table(name)
        assert ta.equals(tb), name
    qa_, qb = quarantine(a.path), quarantine(b.path)
    assert [r["reason"] for r in qa_] == [r["reason"] for r in qb]
    assert [r["example_id"] for r in qa_] == [r["example_id"] for r in qb]
    assert a.manifest["counts"] == b.manifest["counts"]


def test_rebuild_is_up_to_date_until_an_input_changes(tmp_path: Path) -> None:
    ctx = "The amber falcon lives in Marrowby. " * 5
    data = write_jsonl(tmp_path / "in.jsonl", [rec("a", ctx, "Where?", "Marrowby")])
    spec = write_spec(tmp_path, [data])
    first = build_ok(spec, tmp_path / "out")
    assert first.status == "built"
    again = build(spec, tmp_path / "out")
    assert again.status == "up to date" and again.manifest == first.manifest
    os.utime(data, ns=(1, 1))  # touched, same bytes: hashed again, still up to date
    assert build(spec, tmp_path / "out").status == "up to date"
    assert build(spec, tmp_path / "out", force=True).status == "built"
    write_jsonl(data, [rec("a", ctx, "Where does it live?", "Marrowby")])
    changed = build(spec, tmp_path / "out")
    assert (
        changed.status == "built"
        and changed.manifest["content_hash"] != first.manifest["content_hash"]
    )
    spec2 = write_spec(
        tmp_path, [data], segments={"max_tokens": 9, "stride": 9, "max_question_tokens": 5}
    )
    assert build(spec2, tmp_path / "out").status == "built"
    assert not [
        p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")
    ]  # no staging left


def test_content_hash_is_deterministic_across_processes(tmp_path: Path, demo_raw: Path) -> None:
    """Same inputs, same spec -> same tokenizer bytes and content hash, in-process (where
    HF's own trainers give a different vocabulary on each run) and in a fresh process."""
    spec = write_spec(
        tmp_path, [demo_raw / "*.json"], fmt="squad", name="det",
        tokenizer={"train": {"vocab_size": 3000, "min_frequency": 2}},
    )  # fmt: skip
    a = build_ok(spec, tmp_path / "a")
    b = build(spec, tmp_path / "b", force=True)
    proc = run_cli("-m", "pipeline.build", spec, "--out", tmp_path / "c", "--quiet")
    assert proc.returncode == 0, proc.stderr
    c = json.loads((tmp_path / "c" / "det" / "manifest.json").read_text())
    assert a.manifest["content_hash"] == b.manifest["content_hash"] == c["content_hash"]
    tok = [(p / "det" / "tokenizer.json").read_bytes() for p in (tmp_path / "a", tmp_path / "c")]
    assert tok[0] == tok[1]


def test_tokenizer_training_is_deterministic_in_process() -> None:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)[:20]]
    one = tokenizer_bytes(train_tokenizer(texts, 1500, 2))
    two = tokenizer_bytes(train_tokenizer(list(reversed(texts)), 1500, 2))
    assert one == two  # order of the corpus does not matter either
    vocab = json.loads(one)["model"]["vocab"]
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert len(vocab) == 1500 and any(t.startswith("##") for t in vocab)


def test_loaded_tokenizer_gives_the_same_store(
    tmp_path: Path, demo_store: Path, demo_raw: Path
) -> None:
    spec = write_spec(
        tmp_path, [demo_raw / "*.json"], fmt="squad", name="loaded",
        tokenizer={"path": str(demo_store / "tokenizer.json")},
        segments={"max_tokens": 64, "stride": 48, "max_question_tokens": 16},
        splits={"train": "train*", "dev": "dev*"},
    )  # fmt: skip
    res = build_ok(spec, tmp_path / "out")
    ref = json.loads((demo_store / "manifest.json").read_text())
    assert res.manifest["table_digests"] == ref["table_digests"]
    assert res.manifest["tokenizer"]["source"] == "file"
    # the tokenizer file is an input: changing it rebuilds
    tok = tmp_path / "tok.json"
    tok.write_bytes((demo_store / "tokenizer.json").read_bytes())
    spec = write_spec(
        tmp_path, [demo_raw / "*.json"], fmt="squad", name="loaded", tokenizer={"path": str(tok)}
    )
    assert build(spec, tmp_path / "out").status == "built"
    assert build(spec, tmp_path / "out").status == "up to date"
    data = json.loads(tok.read_text())
    data["normalizer"]["lowercase"] = False
    tok.write_text(json.dumps(data))
    assert build(spec, tmp_path / "out").status == "built"
    bad = write_spec(
        tmp_path, [demo_raw / "*.json"], fmt="squad", name="bad",
        tokenizer={"path": str(tok), "cls_token": "<s>"},
    )  # fmt: skip
    with pytest.raises(BuildError, match=r"tokenizer.cls_token: '<s>' is not in the tokenizer"):
        build(bad, tmp_path / "out")
    missing = write_spec(
        tmp_path, [demo_raw / "*.json"], fmt="squad", name="m", tokenizer={"path": "nope.json"}
    )
    with pytest.raises(BuildError, match="tokenizer.path: 'nope.json' is not a file"):
        build(missing, tmp_path / "out")


# --------------------------------------------------------------------------- the store


def test_store_layout_and_reader(demo_store: Path) -> None:
    store = open_segment_store(demo_store)
    m = store.manifest
    assert (m["format"], m["kind"], m["store_format"]) == ("offrl-store", "segments", "arrow")
    assert set(m["data_files"]) == {
        "documents.arrow", "examples.arrow", "segments.arrow", "tokenizer.json", "quarantine.jsonl",
    }  # fmt: skip
    seg_schema = store.table(SEGMENTS_ARROW).schema
    assert seg_schema.field("input_ids").type == pa.list_(pa.int32())
    assert seg_schema.names == [
        "example_id", "example_index", "segment_index", "input_ids", "n_question_tokens",
        "context_start", "n_segment_tokens", "token_offset", "local_start", "local_end",
        "global_start", "global_end",
    ]  # fmt: skip
    assert store.table(EXAMPLES_ARROW).schema.names == [
        "example_id", "doc_id", "doc_index", "split", "title", "question", "answers",
        "answer_starts", "is_impossible", "n_segments", "n_doc_tokens", "n_question_tokens",
        "global_start", "global_end", "answer_segment", "segment_row",
    ]  # fmt: skip
    # one record batch per file: the flat arrays are views of the memory-mapped file
    assert store.table(SEGMENTS_ARROW).column("input_ids").num_chunks == 1
    sg, ex = store.segments, store.examples
    assert sg.input_values.dtype == np.int32 and not sg.input_values.flags.writeable
    ids = sg.input_ids
    assert ids.shape == (len(sg), store.input_width) and ids.dtype == np.int32
    for r in (0, len(sg) // 2, len(sg) - 1):
        n = sg.lengths[r]
        assert (
            ids[r, :n].tolist()
            == sg.input_values[sg.input_offsets[r] : sg.input_offsets[r + 1]].tolist()
        )
        assert (ids[r, n:] == store.pad_id).all() and sg.attention_mask[r].sum() == n
    # answers: the document text under the global span is the answer, exactly
    answerable = np.flatnonzero(~ex.is_impossible)
    assert len(answerable) > 10 and ex.is_impossible.sum() > 0
    for e in answerable.tolist():
        got = store.answer_text(e, int(ex.global_start[e]), int(ex.global_end[e]))
        assert got == ex.answers[e][0]
    assert set(ex.split) == {"train", "dev"} and len(store.split_indices("dev")) > 0
    assert m["counts"]["records_quarantined"] == 4
    assert m["quarantine_reasons"] == {
        "answer_mismatch": 1, "duplicate_id": 1, "empty_context": 1, "missing_field": 1,
    }  # fmt: skip
    # the table is readable as-is by polars and by datasets
    import polars as pl

    assert pl.read_ipc_stream(demo_store / EXAMPLES_ARROW).height == len(ex)


def test_verify_catches_broken_rules(demo_store: Path, tmp_path: Path) -> None:
    store = open_segment_store(demo_store)
    assert check_invariants(store) == []
    sg = store.segments
    hit = int(np.flatnonzero(sg.local_start >= 0)[0])

    def broken(**changes: Any) -> list[str]:
        s = open_segment_store(demo_store)
        s.__dict__["segments"] = dataclasses.replace(sg, **changes)
        return check_invariants(s)

    ls = sg.local_start.copy()
    ls[hit] += 1
    assert any("local_start/end inconsistent" in p for p in broken(local_start=ls))
    off = sg.token_offset.copy()
    off[1] += 1
    assert broken(token_offset=off)
    vals = sg.input_values.copy()
    vals[sg.input_offsets[hit] + sg.local_start[hit]] = 7
    assert any("differ from its document's tokens" in p for p in broken(input_values=vals))
    # a question token changed in an example's second segment only
    ex = store.examples
    two = int(np.flatnonzero(ex.n_segments >= 2)[0])
    row = int(ex.segment_row[two]) + 1
    vals = sg.input_values.copy()
    vals[sg.input_offsets[row] + 1] += 1
    assert any("question tokens differ" in p for p in broken(input_values=vals))
    # answer_segment pointing past the first segment that holds the answer
    s = open_segment_store(demo_store)
    a_seg = ex.answer_segment.copy()
    a_seg[int(np.flatnonzero(a_seg >= 0)[0])] += 1
    s.__dict__["examples"] = dataclasses.replace(ex, answer_segment=a_seg)
    assert any("answer_segment is not the first" in p for p in check_invariants(s))
    # a flipped byte in a data file: named, with the fix implied
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_store, copy)
    data = bytearray((copy / SEGMENTS_ARROW).read_bytes())
    data[-100] ^= 0xFF
    (copy / SEGMENTS_ARROW).write_bytes(bytes(data))
    assert any("sha256 differs" in p for p in verify(copy))


def test_cli_builds_the_shipped_qa_demo_spec_end_to_end(tmp_path: Path) -> None:
    """``python -m pipeline.build data_specs/qa-demo.yaml`` on a small demo, in a fresh cwd
    (the spec's paths are relative to it), then verify and inspect."""
    make_demo(tmp_path / "data" / "raw" / "qa", docs=12)
    spec = REPO / "data_specs" / "qa-demo.yaml"
    proc = run_cli("-m", "pipeline.build", spec, "--out", "stores", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "built in" in proc.stdout and "unanswerable" in proc.stdout
    assert "quarantine" in proc.stdout and "duplicate_id: 1" in proc.stdout
    proc = run_cli("-m", "pipeline.build", spec, "--out", "stores", cwd=tmp_path)
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stdout + proc.stderr
    store = tmp_path / "stores" / "qa-demo"
    proc = run_cli("-m", "pipeline.verify", store)
    assert proc.returncode == 0 and proc.stdout.startswith("OK "), proc.stderr
    proc = run_cli("-m", "pipeline.inspect", store)
    assert proc.returncode == 0, proc.stderr
    for needle in ("segments per example", "duplicate_id", "tokenizer", "unanswerable"):
        assert needle in proc.stdout, needle
    m = json.loads((store / "manifest.json").read_text())
    assert m["segments"]["max_tokens"] == 128 and m["counts"]["examples_per_split"]["dev"] > 0
    bad = write_spec(tmp_path, ["data/raw/qa/*.json"], fmt="squad", name="bad",
                     segments={"max_tokens": 8, "stride": 9})  # fmt: skip
    proc = run_cli("-m", "pipeline.build", bad, "--out", "stores", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and "segments.stride" in lines[0]
    proc = run_cli("-m", "pipeline.verify", tmp_path / "stores" / "nope")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ")


def test_demo_generator_is_deterministic_and_consistent(tmp_path: Path, demo_raw: Path) -> None:
    make_demo(tmp_path / "again", docs=10)
    for name in ("train-v2.0.json", "dev-v2.0.json", "jsonl/train.jsonl", "jsonl/dev.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (demo_raw / name).read_bytes(), name
    make_demo(tmp_path / "other", docs=10, seed=1)
    assert (tmp_path / "other" / "train-v2.0.json").read_bytes() != (
        demo_raw / "train-v2.0.json"
    ).read_bytes()
    squad = json.loads((demo_raw / "train-v2.0.json").read_text())
    qas = [(p["context"], q) for a in squad["data"] for p in a["paragraphs"] for q in p["qas"]]
    good = [(c, q) for c, q in qas if not q["id"].startswith("bad-") and c]
    for c, q in good:
        for a in q["answers"]:
            assert c[a["answer_start"] : a["answer_start"] + len(a["text"])] == a["text"]
        assert q["is_impossible"] == (not q["answers"])
    n_words = [len(c.split()) for c, _ in good]
    assert min(n_words) >= 300 and max(n_words) <= 3000 + 40


def test_compressed_squad_reads_like_plain(tmp_path: Path, demo_raw: Path) -> None:
    import gzip

    import zstandard

    plain = (demo_raw / "dev-v2.0.json").read_bytes()
    (tmp_path / "gz").mkdir()
    (tmp_path / "zst").mkdir()
    (tmp_path / "gz" / "dev.json.gz").write_bytes(gzip.compress(plain, mtime=0))
    (tmp_path / "zst" / "dev.json.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    a = build_ok(
        write_spec(tmp_path, [demo_raw / "dev-v2.0.json"], fmt="squad", name="p"), tmp_path
    )
    for kind in ("gz", "zst"):
        spec = write_spec(tmp_path, [tmp_path / kind / "*"], fmt="squad", name=kind)
        b = build_ok(spec, tmp_path)
        assert b.manifest["table_digests"] == a.manifest["table_digests"]
    (tmp_path / "gz" / "dev.json.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(BuildError, match="cannot decompress"):
        build(write_spec(tmp_path, [tmp_path / "gz" / "*"], fmt="squad", name="gz"), tmp_path)


def test_a_loaded_byte_level_tokenizer_builds_and_verifies(tmp_path: Path, demo_raw: Path) -> None:
    """A tokenizer of another family (GPT-2 style byte-level BPE, its own special tokens)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:10]], trainer)
    tok.save(str(tmp_path / "bl.json"))
    spec = write_spec(
        tmp_path, [demo_raw / "dev-v2.0.json"], fmt="squad", name="bl",
        tokenizer={"path": str(tmp_path / "bl.json"), "cls_token": "<s>", "sep_token": "</s>",
                   "pad_token": "<pad>"},
        segments={"max_tokens": 50, "stride": 30, "max_question_tokens": 12},
    )  # fmt: skip
    store = open_segment_store(build_ok(spec, tmp_path / "out").path)  # verify() == []
    assert store.special_tokens == {"pad": 0, "cls": 1, "sep": 2, "unk": None}
    ex = store.examples
    e = int(np.flatnonzero(~ex.is_impossible)[0])
    got = store.answer_text(e, int(ex.global_start[e]), int(ex.global_end[e]))
    assert ex.answers[e][0] in got  # byte-level tokens carry their leading space
