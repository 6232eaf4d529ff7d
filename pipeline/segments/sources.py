"""Reading QA records (SQuAD JSON or JSONL) into columns, with every bad record rejected.

A *record* is one question. SQuAD v1.1 / v2.0 files (``.json``, or ``.json.gz`` / ``.json.zst``) are read whole
(``data[].paragraphs[].{context, qas[].{id, question, answers[{text, answer_start}],
is_impossible}}``); a file that is not JSON, or not shaped like SQuAD, counts as ONE record
and is rejected as a whole. JSONL files (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``) hold one
``{id, question, context, answers: [{text, answer_start}], is_impossible?, title?}`` per line;
blank lines are skipped. Either way every record read is kept or rejected, never lost.

A question is unanswerable when ``is_impossible`` is true, or (without the flag) when its
``answers`` list is empty; it is kept and marked.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from data_specs.schema import QASourceSpec
from pipeline.format import BuildError
from pipeline.sources import SourceFile, iter_chunks

# Quarantine reasons (docs/FORMAT.md, "Segment store").
BAD_JSON = "bad_json"
BAD_UTF8 = "bad_utf8"
NOT_SQUAD = "not_squad"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_CONTEXT = "empty_context"
ANSWER_MISMATCH = "answer_mismatch"
NO_ANSWERS = "no_answers"
IMPOSSIBLE_WITH_ANSWERS = "impossible_with_answers"
DUPLICATE_ID = "duplicate_id"
ANSWER_NOT_IN_TOKENS = "answer_not_in_tokens"


@dataclass
class Rejected:
    """One quarantined record; ``order`` sorts the quarantine in input order."""

    order: tuple[int, int]  # (file index, record position in the file)
    file: str
    line: int | None  # 1-based line (JSONL); None for SQuAD JSON
    location: str  # "line 17" or "data[2].paragraphs[0].qas[3]"
    reason: str
    detail: str
    example_id: str | None
    raw: bytes  # the line, or the record re-written as one JSONL line

    def to_json(self) -> bytes:
        rec: dict[str, Any] = {
            "file": self.file,
            "line": self.line,
            "location": self.location,
            "reason": self.reason,
            "detail": self.detail,
            "example_id": self.example_id,
        }
        try:
            rec["raw"] = self.raw.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            rec["raw"] = self.raw.decode("utf-8", errors="replace")
            rec["raw_base64"] = base64.b64encode(self.raw).decode("ascii")
        return orjson.dumps(rec) + b"\n"


@dataclass
class Records:
    """The kept records as columns, in input order (files sorted by path)."""

    example_id: list[str] = field(default_factory=list)
    title: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    question: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)
    answer_starts: list[list[int]] = field(default_factory=list)
    is_impossible: list[bool] = field(default_factory=list)
    order: list[tuple[int, int]] = field(default_factory=list)  # for the quarantine of later checks
    file: list[str] = field(default_factory=list)
    line: list[int | None] = field(default_factory=list)
    location: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.example_id)

    def raw(self, i: int) -> bytes:
        return _as_line(
            self.example_id[i],
            self.title[i],
            self.context[i],
            self.question[i],
            self.answers[i],
            self.answer_starts[i],
            self.is_impossible[i],
        )

    def take(self, keep: list[int]) -> Records:
        out = Records()
        for name in self.__dataclass_fields__:
            col = getattr(self, name)
            setattr(out, name, [col[i] for i in keep])
        return out


def _as_line(
    eid: str,
    title: str,
    context: str,
    question: str,
    answers: list[str],
    starts: list[int],
    impossible: bool,
) -> bytes:
    return orjson.dumps(
        {
            "id": eid,
            "title": title,
            "question": question,
            "context": context,
            "answers": [{"text": t, "answer_start": s} for t, s in zip(answers, starts)],
            "is_impossible": impossible,
        }
    )


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def split_of(src: SourceFile, splits: tuple[tuple[str, str], ...], origin: str) -> str:
    """The split a file's examples belong to (``source.splits``; default ``train``)."""
    if not splits:
        return "train"
    name = src.path.name
    for split, pattern in splits:
        if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(src.display, pattern):
            return split
    pats = ", ".join(f"{s}: {p!r}" for s, p in splits)
    raise BuildError(
        f"{origin}: source.splits: file {src.display} matches none of {pats}; "
        "add a pattern for it or narrow source.paths"
    )


def _example_id(value: Any) -> str:
    if value is None:
        raise _Invalid(MISSING_FIELD, "`id` is missing")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Invalid(WRONG_TYPE, f"`id` must be a string or an integer, got {value!r}")
    s = str(value)
    if not s:
        raise _Invalid(MISSING_FIELD, "`id` is empty")
    return s


def _check(qa: dict[str, Any], context: Any) -> tuple[str, str, list[str], list[int], bool]:
    """(question, context, answer texts, answer starts, is_impossible) or raise _Invalid."""
    question = qa.get("question")
    if question is None:
        raise _Invalid(MISSING_FIELD, "`question` is missing")
    if not isinstance(question, str):
        raise _Invalid(WRONG_TYPE, f"`question` must be a string, got {type(question).__name__}")
    if not question.strip():
        raise _Invalid(MISSING_FIELD, "`question` is empty")
    if context is None:
        raise _Invalid(MISSING_FIELD, "`context` is missing")
    if not isinstance(context, str):
        raise _Invalid(WRONG_TYPE, f"`context` must be a string, got {type(context).__name__}")
    if not context.strip():
        raise _Invalid(EMPTY_CONTEXT, "the context is empty (or only whitespace)")
    answers = qa.get("answers", [])
    if answers is None:
        answers = []
    if not isinstance(answers, list):
        raise _Invalid(WRONG_TYPE, f"`answers` must be a list, got {type(answers).__name__}")
    texts: list[str] = []
    starts: list[int] = []
    for k, a in enumerate(answers):
        if not isinstance(a, dict):
            raise _Invalid(WRONG_TYPE, f"answers[{k}] must be an object {{text, answer_start}}")
        text, start = a.get("text"), a.get("answer_start")
        if text is None or start is None:
            raise _Invalid(MISSING_FIELD, f"answers[{k}] needs both `text` and `answer_start`")
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
            raise _Invalid(
                WRONG_TYPE, f"answers[{k}]: `text` must be a string and `answer_start` an integer"
            )
        if not text.strip():
            raise _Invalid(ANSWER_MISMATCH, f"answers[{k}]: the answer text is empty")
        if start < 0 or start + len(text) > len(context):
            raise _Invalid(
                ANSWER_MISMATCH,
                f"answers[{k}]: answer_start {start} + {len(text)} characters is outside the "
                f"context ({len(context)} characters)",
            )
        found = context[start : start + len(text)]
        if found != text:
            raise _Invalid(
                ANSWER_MISMATCH,
                f"answers[{k}]: the context at answer_start {start} reads {found[:60]!r}, "
                f"not {text[:60]!r}",
            )
        texts.append(text)
        starts.append(start)
    flag = qa.get("is_impossible")
    if flag is not None and not isinstance(flag, bool):
        raise _Invalid(WRONG_TYPE, f"`is_impossible` must be true or false, got {flag!r}")
    if flag is True and texts:
        raise _Invalid(
            IMPOSSIBLE_WITH_ANSWERS,
            f"is_impossible is true but {len(texts)} answer(s) are given; drop one or the other",
        )
    if flag is False and not texts:
        raise _Invalid(NO_ANSWERS, "is_impossible is false but `answers` is empty")
    return question, context, texts, starts, not texts


class _Reader:
    def __init__(self, origin: str, splits: tuple[tuple[str, str], ...]) -> None:
        self.origin = origin
        self.splits = splits
        self.records = Records()
        self.rejected: list[Rejected] = []
        self.seen: dict[str, str] = {}  # example id -> where it was first kept

    def reject(
        self,
        src: SourceFile,
        pos: int,
        line: int | None,
        location: str,
        reason: str,
        detail: str,
        eid: str | None,
        raw: bytes,
    ) -> None:
        self.rejected.append(
            Rejected((src.index, pos), src.display, line, location, reason, detail, eid, raw)
        )
        src.quarantined += 1

    def keep(
        self,
        src: SourceFile,
        pos: int,
        line: int | None,
        location: str,
        split: str,
        eid: str,
        title: str,
        checked: tuple[str, str, list[str], list[int], bool],
    ) -> None:
        question, context, texts, starts, impossible = checked
        first = self.seen.get(eid)
        if first is not None:
            raw = _as_line(eid, title, context, question, texts, starts, impossible)
            self.reject(
                src, pos, line, location, DUPLICATE_ID,
                f"example id {eid!r} was already used at {first}", eid, raw,
            )  # fmt: skip
            return
        self.seen[eid] = f"{src.display} {location}"
        r = self.records
        r.example_id.append(eid)
        r.title.append(title)
        r.split.append(split)
        r.question.append(question)
        r.context.append(context)
        r.answers.append(texts)
        r.answer_starts.append(starts)
        r.is_impossible.append(impossible)
        r.order.append((src.index, pos))
        r.file.append(src.display)
        r.line.append(line)
        r.location.append(location)

    # ------------------------------------------------------------------ SQuAD
    def squad(self, src: SourceFile) -> None:
        split = split_of(src, self.splits, self.origin)
        data = src.path.read_bytes()
        src.sha256 = hashlib.sha256(data).hexdigest()
        data = _decompress(src, data)
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            src.records += 1
            reason = BAD_UTF8 if "utf-8" in str(e).lower() else BAD_JSON
            pos = getattr(e, "pos", 0) or 0
            excerpt = data[max(0, pos - 100) : pos + 100]
            self.reject(
                src, 0, None, "file", reason,
                f"the file is not valid JSON ({e}); fix or remove it", None, excerpt,
            )  # fmt: skip
            return
        articles = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(articles, list):
            src.records += 1
            self.reject(
                src, 0, None, "file", NOT_SQUAD,
                "not a SQuAD file: expected {\"data\": [{\"paragraphs\": [...]}]}; "
                "for one record per line use source.format: jsonl",
                None, data[:200],
            )  # fmt: skip
            return
        pos = 0
        for ai, art in enumerate(articles):
            if not isinstance(art, dict) or not isinstance(art.get("paragraphs"), list):
                src.records += 1
                pos += 1
                self.reject(
                    src, pos, None, f"data[{ai}]", NOT_SQUAD,
                    "an article must be an object with a `paragraphs` list", None,
                    orjson.dumps(art)[:2000],
                )  # fmt: skip
                continue
            title = art.get("title")
            title = title if isinstance(title, str) else ""
            for pi, par in enumerate(art["paragraphs"]):
                where = f"data[{ai}].paragraphs[{pi}]"
                qas = par.get("qas") if isinstance(par, dict) else None
                if not isinstance(qas, list):
                    src.records += 1
                    pos += 1
                    self.reject(
                        src, pos, None, where, NOT_SQUAD,
                        "a paragraph must be an object with `context` and a `qas` list", None,
                        orjson.dumps(par)[:2000],
                    )  # fmt: skip
                    continue
                context = par.get("context")
                for qi, qa in enumerate(qas):
                    src.records += 1
                    pos += 1
                    loc = f"{where}.qas[{qi}]"
                    if not isinstance(qa, dict):
                        self.reject(
                            src, pos, None, loc, NOT_AN_OBJECT,
                            f"a question must be an object, got {type(qa).__name__}", None,
                            orjson.dumps(qa),
                        )  # fmt: skip
                        continue
                    rec = {"context": context, "title": title, **qa}
                    eid: str | None = None
                    try:
                        eid = _example_id(qa.get("id"))
                        checked = _check(qa, context)
                    except _Invalid as e:
                        self.reject(src, pos, None, loc, e.reason, e.detail, eid, _dump(rec))
                        continue
                    self.keep(src, pos, None, loc, split, eid, title, checked)

    # ------------------------------------------------------------------ JSONL
    def jsonl(self, src: SourceFile) -> None:
        split = split_of(src, self.splits, self.origin)
        for chunk in iter_chunks(src, 8 << 20):
            for i in range(chunk.n_lines):
                raw = chunk.line(i)
                line = chunk.first_line + i
                if not raw.strip():
                    src.blank_lines += 1
                    continue
                src.records += 1
                loc = f"line {line}"
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError as e:
                    reason = BAD_UTF8 if "utf-8" in str(e).lower() else BAD_JSON
                    self.reject(src, line, line, loc, reason, f"not JSON: {e}", None, raw)
                    continue
                if not isinstance(obj, dict):
                    self.reject(
                        src, line, line, loc, NOT_AN_OBJECT,
                        f"a record must be a JSON object, got {type(obj).__name__}", None, raw,
                    )  # fmt: skip
                    continue
                eid = None
                try:
                    eid = _example_id(obj.get("id"))
                    checked = _check(obj, obj.get("context"))
                    title = obj.get("title", "")
                    if not isinstance(title, str):
                        raise _Invalid(WRONG_TYPE, "`title` must be a string")
                except _Invalid as e:
                    self.reject(src, line, line, loc, e.reason, e.detail, eid, raw)
                    continue
                self.keep(src, line, line, loc, split, eid, title, checked)


def _decompress(src: SourceFile, data: bytes) -> bytes:
    """The bytes of a ``.gz`` / ``.zst`` file decoded (others as they are)."""
    name = src.path.name.lower()
    try:
        if name.endswith(".gz"):
            return gzip.decompress(data)
        if name.endswith((".zst", ".zstd")):
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as r:
                return bytes(r.read())
    except Exception as e:  # noqa: BLE001 - gzip and zstandard raise several types
        raise BuildError(
            f"{src.display}: cannot decompress ({e}); the file is corrupt or truncated"
        ) from None
    return data


def _dump(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:
        return repr(obj).encode("utf-8")


def read_records(
    sources: list[SourceFile], spec: QASourceSpec, origin: str
) -> tuple[Records, list[Rejected]]:
    """Read every source (sets each file's sha256, records and quarantined counts)."""
    reader = _Reader(origin, spec.splits)
    for src in sources:
        if spec.format == "squad":
            reader.squad(src)
        else:
            reader.jsonl(src)
    return reader.records, reader.rejected


def iter_squad_records(obj: Any) -> Iterator[dict[str, Any]]:
    """The questions of a parsed SQuAD file as flat JSONL-shaped dicts (for tools and tests)."""
    for art in obj.get("data", []):
        for par in art.get("paragraphs", []):
            for qa in par.get("qas", []):
                yield {"title": art.get("title", ""), "context": par.get("context"), **qa}
