"""Reading agent episodes (one JSON object per line) with every bad one rejected.

An episode is kept or rejected whole, with a reason (docs/FORMAT.md, "Sequence store"):
``bad_json``, ``bad_utf8``, ``not_an_object``, ``missing_field``, ``wrong_type``,
``duplicate_id``, ``empty_episode`` (no turn, or no policy turn), ``no_span`` (a policy
turn in which no span was found), ``missing_span`` (a ``required`` span absent),
``overlapping_spans``, ``teacher_mismatch``; the builder adds ``too_long``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from data_specs.sequences import SequenceSpec
from pipeline.segments.sources import Rejected
from pipeline.sources import SourceFile, iter_chunks

BAD_JSON = "bad_json"
BAD_UTF8 = "bad_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
DUPLICATE_ID = "duplicate_id"
EMPTY_EPISODE = "empty_episode"
NO_SPAN = "no_span"
MISSING_SPAN = "missing_span"
OVERLAPPING_SPANS = "overlapping_spans"
TEACHER_MISMATCH = "teacher_mismatch"
TOO_LONG = "too_long"

_MISSING = object()


@dataclass
class Turn:
    role: str
    content: str
    policy: bool
    reward: float  # NaN when the spec has no reward field
    spans: list[tuple[int, int, int]]  # (first char, end char, label code), sorted, disjoint
    teacher: list[list[tuple[int, float]]] | None = None  # per trained token: top-k (id, lp)


@dataclass
class Episode:
    episode_id: str
    task: str
    turns: list[Turn]
    outcome: float  # NaN when absent
    order: tuple[int, int]  # (file index, line)
    file: str
    line: int
    raw: bytes


@dataclass
class Read:
    episodes: list[Episode] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def get_path(obj: Any, path: str) -> Any:
    """``obj[a][b]`` for ``path == "a.b"``; ``_MISSING`` where a key is absent."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def _text(obj: Any, path: str, where: str) -> str:
    v = get_path(obj, path)
    if v is _MISSING or v is None:
        raise _Invalid(MISSING_FIELD, f"{where} has no `{path}`")
    if not isinstance(v, str):
        raise _Invalid(WRONG_TYPE, f"{where}: `{path}` must be a string, got {type(v).__name__}")
    return v


def _number(obj: Any, path: str | None, where: str) -> float:
    if path is None:
        return math.nan
    v = get_path(obj, path)
    if v is _MISSING or v is None:
        raise _Invalid(MISSING_FIELD, f"{where} has no `{path}`")
    if not isinstance(v, int | float):
        raise _Invalid(WRONG_TYPE, f"{where}: `{path}` must be a number or a boolean, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise _Invalid(WRONG_TYPE, f"{where}: `{path}` is {v!r}; it must be finite")
    return f


class SpanFinder:
    """The spans of a policy turn, by the spec's regexes or fields, in label codes 1..K."""

    def __init__(self, spec: SequenceSpec) -> None:
        self.spans = spec.fields.spans
        self.compiled = [
            re.compile(s.pattern, re.DOTALL) if s.pattern is not None else None for s in self.spans
        ]

    def find(self, turn: dict[str, Any], content: str, where: str) -> list[tuple[int, int, int]]:
        found: list[tuple[int, int, int]] = []
        for code, (s, rx) in enumerate(zip(self.spans, self.compiled), start=1):
            hits: list[tuple[int, int, int]] = []
            if rx is not None:
                hits = [(m.start(1), m.end(1), code) for m in rx.finditer(content)]
            else:
                assert s.path is not None
                v = get_path(turn, s.path)
                if isinstance(v, str) and v:
                    at = content.find(v)
                    if at < 0:
                        raise _Invalid(
                            MISSING_SPAN,
                            f"{where}: span {s.name!r} (`{s.path}`) is not in the text",
                        )
                    hits = [(at, at + len(v), code)]
                elif v is not _MISSING and v is not None and not isinstance(v, str):
                    raise _Invalid(WRONG_TYPE, f"{where}: `{s.path}` must be a string")
            hits = [h for h in hits if h[1] > h[0]]
            if s.required and not hits:
                raise _Invalid(MISSING_SPAN, f"{where}: no {s.name!r} span")
            found += hits
        found.sort()
        for a, b in zip(found, found[1:]):
            if b[0] < a[1]:
                names = [self.spans[a[2] - 1].name, self.spans[b[2] - 1].name]
                raise _Invalid(
                    OVERLAPPING_SPANS,
                    f"{where}: spans {names[0]!r} and {names[1]!r} overlap at characters "
                    f"{b[0]}..{min(a[1], b[1])}",
                )
        if not found:
            raise _Invalid(
                NO_SPAN, f"{where}: no span ({', '.join(s.name for s in self.spans)}) found"
            )
        return found


def _teacher(value: Any, where: str) -> list[list[tuple[int, float]]]:
    if not isinstance(value, list):
        raise _Invalid(TEACHER_MISMATCH, f"{where}: teacher must be a list of top-k lists")
    out = []
    for tok in value:
        if not isinstance(tok, list) or not tok:
            raise _Invalid(TEACHER_MISMATCH, f"{where}: each teacher entry is [[id, logprob], ...]")
        row = []
        for pair in tok:
            ok = isinstance(pair, list) and len(pair) == 2
            if not ok or not isinstance(pair[0], int) or not isinstance(pair[1], int | float):
                raise _Invalid(TEACHER_MISMATCH, f"{where}: teacher pairs are [id, logprob]")
            row.append((int(pair[0]), float(pair[1])))
        out.append(row)
    return out


def parse_episode(
    obj: Any, spec: SequenceSpec, finder: SpanFinder
) -> tuple[str, str, list[Turn], float]:
    """(id, task, turns, outcome) of one record; _Invalid with a reason if it is bad."""
    f = spec.fields
    if not isinstance(obj, dict):
        raise _Invalid(NOT_AN_OBJECT, f"an episode must be a JSON object, got {type(obj).__name__}")
    eid = get_path(obj, spec.source.episode_key)
    if eid is _MISSING or eid is None:
        raise _Invalid(MISSING_FIELD, f"the episode has no `{spec.source.episode_key}`")
    if not isinstance(eid, str | int) or isinstance(eid, bool):
        raise _Invalid(WRONG_TYPE, f"`{spec.source.episode_key}` must be a string or an integer")
    task = _text(obj, f.prompt, "the episode")
    raw_turns = get_path(obj, spec.source.turns_key)
    if raw_turns is _MISSING or raw_turns is None:
        raise _Invalid(MISSING_FIELD, f"the episode has no `{spec.source.turns_key}`")
    if not isinstance(raw_turns, list):
        raise _Invalid(WRONG_TYPE, f"`{spec.source.turns_key}` must be a list of turns")
    if not raw_turns:
        raise _Invalid(EMPTY_EPISODE, "the episode has no turns")
    turns: list[Turn] = []
    for i, t in enumerate(raw_turns):
        where = f"turn {i}"
        if not isinstance(t, dict):
            raise _Invalid(NOT_AN_OBJECT, f"{where} must be a JSON object")
        role = _text(t, f.role, where)
        policy = role in f.policy_roles
        content = _text(t, f.content, where)
        spans = finder.find(t, content, where) if policy else []
        teacher = None
        if policy and f.teacher is not None:
            v = get_path(t, f.teacher)
            if v is not _MISSING and v is not None:
                teacher = _teacher(v, where)
        turns.append(Turn(role, content, policy, _number(t, f.reward, where), spans, teacher))
    if not any(t.policy for t in turns):
        raise _Invalid(
            EMPTY_EPISODE,
            f"no turn of a policy role ({', '.join(f.policy_roles)}): nothing to learn",
        )
    return str(eid), task, turns, _number(obj, f.outcome, "the episode")


def read_episodes(sources: list[SourceFile], spec: SequenceSpec) -> Read:
    """Every line of every source kept or rejected (sets each file's counts and sha256)."""
    out = Read()
    finder = SpanFinder(spec)
    seen: dict[str, str] = {}
    for src in sources:
        for chunk in iter_chunks(src, 8 << 20):
            for i in range(chunk.n_lines):
                raw = chunk.line(i)
                line = chunk.first_line + i
                if not raw.strip():
                    src.blank_lines += 1
                    continue
                src.records += 1
                eid: str | None = None
                try:
                    try:
                        obj = orjson.loads(raw)
                    except orjson.JSONDecodeError as e:
                        reason = BAD_UTF8 if "utf-8" in str(e).lower() else BAD_JSON
                        raise _Invalid(reason, f"not JSON: {e}") from None
                    if isinstance(obj, dict):
                        v = get_path(obj, spec.source.episode_key)
                        eid = str(v) if isinstance(v, str | int) else None
                    eid, task, turns, outcome = parse_episode(obj, spec, finder)
                    if eid in seen:
                        raise _Invalid(
                            DUPLICATE_ID, f"episode id {eid!r} was already used at {seen[eid]}"
                        )
                except _Invalid as e:
                    out.rejected.append(
                        Rejected(
                            (src.index, line),
                            src.display,
                            line,
                            f"line {line}",
                            e.reason,
                            e.detail,
                            eid,
                            raw,
                        )
                    )
                    src.quarantined += 1
                    continue
                seen[eid] = f"{src.display} line {line}"
                out.episodes.append(
                    Episode(eid, task, turns, outcome, (src.index, line), src.display, line, raw)
                )
    return out


def reject(ep: Episode, reason: str, detail: str) -> Rejected:
    """A kept episode turned away by a later check (e.g. too long)."""
    return Rejected(
        ep.order, ep.file, ep.line, f"line {ep.line}", reason, detail, ep.episode_id, ep.raw
    )
