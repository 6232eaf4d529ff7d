"""From JSONL chunks to validated step rows.

Two paths that must agree (a test holds them against each other):

* the fast path parses a whole chunk with polars against a schema derived from the spec
  (typed, multi-threaded, no Python per record) and checks it with vectorised expressions;
* the slow path parses one line at a time with orjson and checks it with
  :func:`validate_record`, which also writes the reason a record is rejected.

A chunk goes through the fast path; if polars rejects it (bad JSON, a wrong type) the
lines are sorted into good and bad by the slow path and the good ones go through the fast
path again. Rows the vectorised checks reject get their reason from the slow path too, so
every quarantined record carries one precise, human-readable reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import polars as pl

from data_specs.schema import ObservationSpec, TransitionSpec

_MISSING = object()

# Reason codes (the `reason` field of quarantine.jsonl). Each record also has `detail`.
BAD_JSON = "bad_json"
BAD_UTF8 = "bad_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
WRONG_LENGTH = "wrong_length"
NON_FINITE = "non_finite"
ACTION_OUT_OF_RANGE = "action_out_of_range"
EMPTY_EPISODE = "empty_episode"
UNKNOWN_END_REASON = "unknown_end_reason"
DUPLICATE_STEP = "duplicate_step"
STEP_GAP = "step_gap"
END_BEFORE_LAST_STEP = "end_before_last_step"
EPISODE_REJECTED = "episode_rejected"
AMBIGUOUS_EPISODE_ID = "ambiguous_episode_id"
UNBOOTSTRAPPABLE = "unbootstrappable"
FAST_CHECK = "rejected"

# Internal column names of parsed step rows.
EP, T, LINE, ID_INT = "_ep", "_t", "_line", "_id_int"


class RecordError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- schema


def _nest(leaves: dict[str, pl.DataType]) -> dict[str, Any]:
    """{'a.b': Float64, 'c': Int64} -> {'a': {'b': Float64}, 'c': Int64} (dicts = structs)."""
    root: dict[str, Any] = {}
    for path, dtype in leaves.items():
        parts = path.split(".")
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"field path {path!r} goes through a non-object field")
        if parts[-1] in node and node[parts[-1]] != dtype:
            raise ValueError(f"field path {path!r} is used with two different types")
        node[parts[-1]] = dtype
    return root


def _to_dtype(tree: dict[str, Any] | pl.DataType) -> pl.DataType:
    if isinstance(tree, dict):
        return pl.Struct({k: _to_dtype(v) for k, v in tree.items()})
    return tree


def _schema(tree: dict[str, Any]) -> dict[str, pl.DataType]:
    return {k: _to_dtype(v) for k, v in tree.items()}


def _obs_leaves(o: ObservationSpec, prefix: str) -> dict[str, pl.DataType]:
    if o.keys is not None:
        return {
            f"{prefix}.{k.path}": (pl.Float64() if k.size is None else pl.List(pl.Float64()))
            for k in o.keys
        }
    return {prefix: pl.Float64() if o.scalar else pl.List(pl.Float64())}


def _field(path: str) -> pl.Expr:
    parts = path.split(".")
    e = pl.col(parts[0])
    for p in parts[1:]:
        e = e.struct.field(p)
    return e


def _obs_parts(o: ObservationSpec, prefix: str) -> list[tuple[pl.Expr, int | None]]:
    """(expression, list length or None for a scalar) for each observation piece, in order."""
    if o.keys is not None:
        return [(_field(f"{prefix}.{k.path}"), k.size) for k in o.keys]
    return [(_field(prefix), None if o.scalar else o.size)]


@dataclass(frozen=True)
class Layout:
    """What the parser needs from a spec, with paths resolved for its layout."""

    spec: TransitionSpec
    obs_dim: int
    act_dim: int | None  # continuous actions

    @property
    def per_line(self) -> bool:
        return self.spec.source.layout == "episode_per_line"


def make_layout(spec: TransitionSpec) -> Layout:
    dim = spec.fields.observation.dim
    if dim is None:
        raise ValueError("observation size unresolved; call infer_shapes first")
    act = spec.fields.action
    return Layout(spec, dim, act.size if act.type == "continuous" else None)


def step_leaves(spec: TransitionSpec) -> dict[str, pl.DataType]:
    f = spec.fields
    leaves: dict[str, pl.DataType] = {}
    leaves.update(_obs_leaves(f.observation, f.observation.path))
    a = f.action
    if a.composite is not None:
        leaves[a.composite.select] = pl.Int64()
        leaves[a.composite.value] = pl.Int64()
    elif a.type == "discrete":
        assert a.path is not None
        leaves[a.path] = pl.Int64()
    else:
        assert a.path is not None
        leaves[a.path] = pl.List(pl.Float64())
    leaves[f.reward.path] = pl.Float64()
    for _, fp in f.rewards:
        leaves[fp.path] = pl.Float64()
    if f.terminated:
        leaves[f.terminated.path] = pl.Boolean()
    if f.truncated:
        leaves[f.truncated.path] = pl.Boolean()
    return leaves


def episode_leaves(spec: TransitionSpec) -> dict[str, pl.DataType]:
    """Fields that are episode-level in episode_per_line, per line in step_per_line."""
    f = spec.fields
    leaves: dict[str, pl.DataType] = {}
    if f.end:
        leaves[f.end.path] = pl.Utf8()
    if f.final_observation:
        leaves.update(_obs_leaves(f.observation, f.final_observation.path))
    return leaves


def polars_schema(spec: TransitionSpec) -> dict[str, pl.DataType]:
    src = spec.source
    if src.layout == "step_per_line":
        assert src.step_key is not None
        leaves = {src.episode_key: pl.Utf8(), src.step_key: pl.Int64()}
        leaves.update(step_leaves(spec))
        leaves.update(episode_leaves(spec))
        return _schema(_nest(leaves))
    assert src.steps_key is not None
    step_tree = _nest(step_leaves(spec))
    leaves = {src.episode_key: pl.Utf8()}
    leaves.update(episode_leaves(spec))
    tree = _nest(leaves)
    # the steps list sits at steps_key (possibly dotted)
    parts = src.steps_key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = pl.List(_to_dtype(step_tree))
    return _schema(tree)


# --------------------------------------------------------------------------- slow path


def get_path(obj: Any, path: str) -> Any:
    for p in path.split("."):
        if not isinstance(obj, dict) or p not in obj:
            return _MISSING
        obj = obj[p]
    return obj


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _number(x: Any, where: str) -> float:
    if x is _MISSING or x is None:
        raise RecordError(MISSING_FIELD, f"{where}: missing")
    if not _is_num(x):
        raise RecordError(WRONG_TYPE, f"{where}: expected a number, got {_short(x)}")
    v = float(x) if not isinstance(x, int) or abs(x) < 2**63 else math.inf
    if not math.isfinite(v):
        raise RecordError(NON_FINITE, f"{where}: {x} is not a finite number")
    return v


def _numbers(x: Any, size: int | None, where: str) -> list[float]:
    if x is _MISSING or x is None:
        raise RecordError(MISSING_FIELD, f"{where}: missing")
    if not isinstance(x, list):
        raise RecordError(WRONG_TYPE, f"{where}: expected a list of numbers, got {_short(x)}")
    if size is not None and len(x) != size:
        raise RecordError(WRONG_LENGTH, f"{where}: has {len(x)} values, the spec says {size}")
    return [_number(v, f"{where}[{i}]") for i, v in enumerate(x)]


def _short(x: Any) -> str:
    s = json.dumps(x, default=str) if not isinstance(x, float) else repr(x)
    return s if len(s) <= 40 else s[:37] + "..."


def _check_obs(o: ObservationSpec, value: Any, where: str, dim: int) -> None:
    if o.keys is not None:
        if value is _MISSING or value is None:
            raise RecordError(MISSING_FIELD, f"{where}: missing")
        if not isinstance(value, dict):
            raise RecordError(
                WRONG_TYPE,
                f"{where}: expected an object with keys {[k.path for k in o.keys]}, got {_short(value)}",
            )
        for k in o.keys:
            v = get_path(value, k.path)
            if k.size is None:
                _number(v, f"{where}.{k.path}")
            else:
                _numbers(v, k.size, f"{where}.{k.path}")
        return
    if o.scalar:
        _number(value, where)
    else:
        _numbers(value, dim, where)


class Validator:
    """The reference check of one record (a step line, or an episode line)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.spec = layout.spec
        f = self.spec.fields
        self._end_ok = set(f.end.terminated + f.end.truncated) if f.end else set()

    def check_step(self, s: Any, where: str) -> None:
        f = self.spec.fields
        lay = self.layout
        if not isinstance(s, dict):
            raise RecordError(NOT_AN_OBJECT, f"{where}: expected a JSON object, got {_short(s)}")
        _check_obs(
            f.observation,
            get_path(s, f.observation.path),
            f"{where}{f.observation.path} (fields.observation)",
            lay.obs_dim,
        )
        a = f.action
        if a.composite is not None:
            c = a.composite
            sel = get_path(s, c.select)
            val = get_path(s, c.value)
            for name, v in ((c.select, sel), (c.value, val)):
                if v is _MISSING or v is None:
                    raise RecordError(
                        MISSING_FIELD, f"{where}{name} (fields.action.composite): missing"
                    )
                if not isinstance(v, int) or isinstance(v, bool):
                    raise RecordError(
                        WRONG_TYPE,
                        f"{where}{name} (fields.action.composite): expected an integer, got {_short(v)}",
                    )
            cases = dict(c.cases)
            if sel not in cases:
                raise RecordError(
                    ACTION_OUT_OF_RANGE,
                    f"{where}{c.select}={sel} is not one of the declared cases {sorted(cases)} (fields.action.composite.cases)",
                )
            case = cases[sel]
            if not 0 <= val < case.n:
                raise RecordError(
                    ACTION_OUT_OF_RANGE,
                    f"{where}{c.value}={val} out of range 0..{case.n - 1} for {c.select}={sel} (fields.action.composite.cases)",
                )
        elif a.type == "discrete":
            assert a.path is not None and a.n is not None
            v = get_path(s, a.path)
            if v is _MISSING or v is None:
                raise RecordError(MISSING_FIELD, f"{where}{a.path} (fields.action): missing")
            if not isinstance(v, int) or isinstance(v, bool):
                raise RecordError(
                    WRONG_TYPE,
                    f"{where}{a.path} (fields.action): expected an integer action, got {_short(v)}",
                )
            if not 0 <= v < a.n:
                raise RecordError(
                    ACTION_OUT_OF_RANGE,
                    f"{where}{a.path}={v} out of range 0..{a.n - 1} (fields.action.n)",
                )
        else:
            assert a.path is not None and a.low is not None and a.high is not None
            vals = _numbers(get_path(s, a.path), a.size, f"{where}{a.path} (fields.action)")
            for i, (v, lo, hi) in enumerate(zip(vals, a.low, a.high)):
                if not lo <= v <= hi:
                    raise RecordError(
                        ACTION_OUT_OF_RANGE,
                        f"{where}{a.path}[{i}]={v} outside [{lo}, {hi}] (fields.action.low/high)",
                    )
        _number(get_path(s, f.reward.path), f"{where}{f.reward.path} (fields.reward)")
        for name, named in f.rewards:
            _number(get_path(s, named.path), f"{where}{named.path} (fields.rewards.{name})")
        for name, fp in (("terminated", f.terminated), ("truncated", f.truncated)):
            if fp is None:
                continue
            v = get_path(s, fp.path)
            if v is _MISSING or v is None:
                raise RecordError(MISSING_FIELD, f"{where}{fp.path} (fields.{name}): missing")
            if not isinstance(v, bool):
                raise RecordError(
                    WRONG_TYPE,
                    f"{where}{fp.path} (fields.{name}): expected true/false, got {_short(v)}",
                )

    def check_episode_fields(self, obj: dict[str, Any], where: str) -> None:
        f = self.spec.fields
        if f.end is not None:
            v = get_path(obj, f.end.path)
            if v is not _MISSING and v is not None:
                if not isinstance(v, str):
                    raise RecordError(
                        WRONG_TYPE,
                        f"{where}{f.end.path} (fields.end): expected a string, got {_short(v)}",
                    )
                if v not in self._end_ok:
                    raise RecordError(
                        UNKNOWN_END_REASON,
                        f"{where}{f.end.path}={v!r} is neither terminated {list(f.end.terminated)} nor truncated {list(f.end.truncated)} (fields.end)",
                    )
        if f.final_observation is not None:
            v = get_path(obj, f.final_observation.path)
            if v is not _MISSING and v is not None:
                _check_obs(
                    f.observation,
                    v,
                    f"{where}{f.final_observation.path} (fields.final_observation)",
                    self.layout.obs_dim,
                )

    def check(self, obj: Any) -> None:
        src = self.spec.source
        if not isinstance(obj, dict):
            raise RecordError(NOT_AN_OBJECT, f"expected a JSON object, got {_short(obj)}")
        ep = get_path(obj, src.episode_key)
        if ep is _MISSING or ep is None:
            raise RecordError(MISSING_FIELD, f"{src.episode_key} (source.episode_key): missing")
        if not is_episode_id(ep):
            raise RecordError(
                WRONG_TYPE,
                f"{src.episode_key} (source.episode_key): expected a string or an integer "
                f"id (-2**63..2**63-1), got {_short(ep)}",
            )
        if src.layout == "step_per_line":
            assert src.step_key is not None
            t = get_path(obj, src.step_key)
            if t is _MISSING or t is None:
                raise RecordError(MISSING_FIELD, f"{src.step_key} (source.step_key): missing")
            if not isinstance(t, int) or isinstance(t, bool) or not -(2**63) <= t < 2**63:
                raise RecordError(
                    WRONG_TYPE,
                    f"{src.step_key} (source.step_key): expected an integer step index, got {_short(t)}",
                )
            self.check_step(obj, "")
            self.check_episode_fields(obj, "")
            return
        assert src.steps_key is not None
        steps = get_path(obj, src.steps_key)
        if steps is _MISSING or steps is None:
            raise RecordError(MISSING_FIELD, f"{src.steps_key} (source.steps_key): missing")
        if not isinstance(steps, list):
            raise RecordError(
                WRONG_TYPE,
                f"{src.steps_key} (source.steps_key): expected a list of steps, got {_short(steps)}",
            )
        if not steps:
            raise RecordError(
                EMPTY_EPISODE, f"{src.steps_key} (source.steps_key): the episode has no steps"
            )
        for i, s in enumerate(steps):
            self.check_step(s, f"step {i}: ")
        self.check_episode_fields(obj, "")


def is_episode_id(value: Any) -> bool:
    """An episode id is a JSON string or a JSON integer that fits in 64 bits: never a float
    (not even 3.0), a boolean, null, a list or an object."""
    if isinstance(value, str):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def parse_line(raw: bytes) -> Any:
    """orjson, falling back to the stdlib for NaN/Infinity so that the reason is precise."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as ue:
            raise RecordError(BAD_UTF8, f"not valid UTF-8 at byte {ue.start}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise RecordError(BAD_JSON, f"not valid JSON: {e}") from None


def check_line(validator: Validator, raw: bytes) -> RecordError | None:
    try:
        validator.check(parse_line(raw))
    except RecordError as e:
        return e
    return None


# --------------------------------------------------------------------------- fast path


@dataclass
class Rejected:
    """A record that failed validation."""

    line: int  # 1-based
    reason: str
    detail: str
    raw: bytes
    episode_id: str | None = None


def _newlines(data: bytes) -> np.ndarray:
    return np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)


# What follows ``"KEY":`` in a line (see :func:`key_value_kinds`).
VALUE_STRING, VALUE_INTEGER, VALUE_OTHER = 0, 1, 2
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 13, 32]] = True
_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[ord("0") : ord("9") + 1] = True
_NUMBER_GOES_ON = np.zeros(256, dtype=bool)  # after the digits: a fraction or an exponent
_NUMBER_GOES_ON[[ord("."), ord("e"), ord("E")]] = True
# bytes frequent in JSON logs, most frequent last (any other byte is rarer than these)
_JSON_COMMON = b'Esnlufrte}{][-:.,9876543210 "'
# a key with an escape in it, e.g. "\u0065p": found by what follows a backslash
_ESCAPED_KEY = re.compile(rb'\\(?:[^"\\\n]|\\.)*"[ \t\r]*:')


def _skip(buf: np.ndarray, pos: np.ndarray, table: np.ndarray, limit: int) -> np.ndarray:
    """Each position moved past the bytes ``table`` marks (at most ``limit`` of them)."""
    pos = pos.copy()
    n = len(buf)
    for _ in range(limit):
        more = pos < n
        more[more] = table[buf[pos[more]]]
        if not more.any():
            break
        pos[more] += 1
    return pos


def key_value_kinds(data: bytes, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Where ``"KEY":`` occurs in ``data`` (at any depth) and the kind of value after it:
    ``VALUE_STRING``, ``VALUE_INTEGER`` (an optional minus and 1-18 digits, no fraction or
    exponent: it fits in 64 bits) or ``VALUE_OTHER`` (anything else: a float, true, null, an
    object, a longer integer, or a match right after a backslash). Vectorised over bytes."""
    pattern = b'"' + key.encode("utf-8") + b'"'
    buf = np.frombuffer(data, dtype=np.uint8)
    n, k = len(buf), len(pattern)
    # candidates where the key's least common byte is, then the other bytes checked there
    j = min(range(k), key=lambda i: _JSON_COMMON.find(pattern[i : i + 1]))
    pos = np.flatnonzero(buf == pattern[j]) - j
    pos = pos[(pos >= 0) & (pos <= n - k)]
    for i in range(k):
        if i != j:
            pos = pos[buf[pos + i] == pattern[i]]
    colon = _skip(buf, pos + k, _WHITESPACE, 64)
    is_key = colon < n
    is_key[is_key] = buf[colon[is_key]] == ord(":")
    pos = pos[is_key]
    value = _skip(buf, colon[is_key] + 1, _WHITESPACE, 64)
    first = np.where(value < n, buf[np.minimum(value, n - 1)], 0)
    kind = np.full(len(pos), VALUE_OTHER, dtype=np.int8)
    kind[first == ord('"')] = VALUE_STRING
    digits = value + (first == ord("-"))
    numeric = (first == ord("-")) | _DIGIT[first]
    end = _skip(buf, digits, _DIGIT, 19)
    after = np.where(end < n, buf[np.minimum(end, n - 1)], 0)
    integer = numeric & (end > digits) & (end - digits <= 18) & ~_NUMBER_GOES_ON[after]
    kind[integer] = VALUE_INTEGER
    escaped = pos > 0
    escaped[escaped] = buf[pos[escaped] - 1] == ord("\\")
    kind[escaped] = VALUE_OTHER
    return pos, kind


def _finite_rows(a: np.ndarray) -> np.ndarray:
    if a.ndim == 1:
        return np.isfinite(a)
    return np.isfinite(a).all(axis=1)


def _list_to_matrix(s: pl.Series, width: int) -> np.ndarray:
    """A List(Float64) series whose rows all have ``width`` values -> (n, width) float64."""
    flat = s.explode().to_numpy()
    return np.asarray(flat, dtype=np.float64).reshape(len(s), width)


def _obs_matrix(df: pl.DataFrame, parts: list[tuple[pl.Expr, int | None]], dim: int) -> np.ndarray:
    cols = []
    for expr, size in parts:
        s = df.select(expr.alias("x")).to_series()
        if size is None:
            cols.append(np.asarray(s.to_numpy(), dtype=np.float64).reshape(-1, 1))
        else:
            cols.append(_list_to_matrix(s, size))
    if not cols:
        return np.zeros((df.height, dim))
    return np.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]


def _obs_ok_expr(parts: list[tuple[pl.Expr, int | None]]) -> pl.Expr:
    ok = pl.lit(True)
    for expr, size in parts:
        if size is None:
            ok = ok & expr.is_not_null()
        else:
            ok = ok & expr.is_not_null() & (expr.list.len() == size)
    return ok


@dataclass
class ParsedSteps:
    """Validated step rows of a chunk (numpy, one row per step, in line order)."""

    episode_id: pl.Series  # (n,) Utf8
    t: np.ndarray  # (n,) int64: step index (step_per_line) or position in the episode
    obs: np.ndarray  # (n, obs_dim) float32
    act: np.ndarray  # (n,) int64 or (n, act_dim) float32
    rew: np.ndarray  # (n,) float64
    term: np.ndarray  # (n,) bool
    trunc: np.ndarray  # (n,) bool
    end: np.ndarray | None  # (n,) object (str or None), when the spec has `end`
    fobs: np.ndarray | None  # (p, obs_dim) float32: final observations of the p rows that have one
    fobs_present: np.ndarray | None  # (n,) bool: which rows have one (row order = fobs order)
    line: np.ndarray  # (n,) int64 1-based source line
    id_int: np.ndarray  # (n,) bool: the episode id was a JSON integer (else a string)
    # (n, K) float64: the spec's named rewards (fields.rewards), in its order; None: none
    named_rew: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.t)

    def subset(self, m: np.ndarray) -> ParsedSteps:
        """The rows where ``m`` is true."""
        fp = self.fobs_present
        return ParsedSteps(
            episode_id=self.episode_id.filter(pl.Series(m)),
            t=self.t[m],
            obs=self.obs[m],
            act=self.act[m],
            rew=self.rew[m],
            term=self.term[m],
            trunc=self.trunc[m],
            end=None if self.end is None else self.end[m],
            fobs=None if self.fobs is None or fp is None else self.fobs[m[fp]],
            fobs_present=None if fp is None else fp[m],
            line=self.line[m],
            id_int=self.id_int[m],
            named_rew=None if self.named_rew is None else self.named_rew[m],
        )

    @staticmethod
    def concat(parts: list[ParsedSteps]) -> ParsedSteps:
        p0 = parts[0]
        return ParsedSteps(
            episode_id=pl.concat([p.episode_id for p in parts]),
            t=np.concatenate([p.t for p in parts]),
            obs=np.concatenate([p.obs for p in parts]),
            act=np.concatenate([p.act for p in parts]),
            rew=np.concatenate([p.rew for p in parts]),
            term=np.concatenate([p.term for p in parts]),
            trunc=np.concatenate([p.trunc for p in parts]),
            end=None
            if p0.end is None
            else np.concatenate([p.end for p in parts if p.end is not None]),
            fobs=None
            if p0.fobs is None
            else np.concatenate([p.fobs for p in parts if p.fobs is not None]),
            fobs_present=None
            if p0.fobs_present is None
            else np.concatenate([p.fobs_present for p in parts if p.fobs_present is not None]),
            line=np.concatenate([p.line for p in parts]),
            id_int=np.concatenate([p.id_int for p in parts]),
            named_rew=None
            if p0.named_rew is None
            else np.concatenate([p.named_rew for p in parts if p.named_rew is not None]),
        )


class ChunkParser:
    """Parses a chunk into :class:`ParsedSteps` plus the records it rejected."""

    def __init__(self, spec: TransitionSpec) -> None:
        self.spec = spec
        self.layout = make_layout(spec)
        self.validator = Validator(self.layout)
        self.schema = polars_schema(spec)
        f = spec.fields
        src = spec.source
        per_line = self.layout.per_line
        sp = "_s." if per_line else ""
        self._sp = sp
        self._obs_parts = _obs_parts(f.observation, sp + f.observation.path)
        self._fobs_parts = (
            _obs_parts(f.observation, f.final_observation.path) if f.final_observation else None
        )
        a = f.action
        self._act_exprs: dict[str, pl.Expr] = {}
        if a.composite is not None:
            self._act_exprs = {
                "sel": _field(sp + a.composite.select),
                "val": _field(sp + a.composite.value),
            }
        else:
            assert a.path is not None
            self._act_exprs = {"act": _field(sp + a.path)}
        self._ep_expr = _field(src.episode_key)
        self._t_expr = _field(src.step_key) if src.step_key else None
        self._steps_expr = _field(src.steps_key) if src.steps_key else None
        # "NAME": followed by neither a string nor a short integer (NAME: the id key's last)
        name = re.escape(src.episode_key.rsplit(".", 1)[-1].encode("utf-8"))
        self._id_other = re.compile(
            rb'"' + name + rb'"[ \t\r]*:[ \t\r]*(?!"|-?[0-9]{1,18}(?![0-9.eE]))'
        )

    # ------------------------------------------------------------ polars parse
    def _read(self, data: bytes) -> pl.DataFrame:
        return pl.read_ndjson(io.BytesIO(data), schema=self.schema)

    def _explode(
        self, df: pl.DataFrame, lines: np.ndarray
    ) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
        """episode_per_line: one row per step (the step struct as column ``_s``), with the
        line and episode-level fields of its episode; also the mask of lines whose steps
        list is empty or missing. (A Series explode plus a gather: DataFrame.explode of a
        list of structs is far slower.)"""
        assert self._steps_expr is not None and self.spec.source.steps_key is not None
        n_steps = df.select(self._steps_expr.list.len().fill_null(0)).to_series().to_numpy()
        empty = n_steps == 0
        if empty.any():
            df = df.filter(pl.Series(~empty))
            lines = lines[~empty]
            n_steps = n_steps[~empty]
        exploded = df.select(self._steps_expr.alias("_s")).to_series().explode()
        rows = np.repeat(np.arange(len(lines)), n_steps)
        starts = (np.cumsum(n_steps) - n_steps).astype(np.int64)
        top = self.spec.source.steps_key.split(".")[0]
        rest = df.drop(top) if "." not in self.spec.source.steps_key else df
        out = rest.gather(rows).with_columns(
            exploded,
            pl.Series(LINE, lines[rows]),
            pl.Series(T, np.arange(len(rows), dtype=np.int64) - np.repeat(starts, n_steps)),
        )
        return out, empty, n_steps

    def parse(
        self,
        chunk_data: bytes,
        lines: np.ndarray,
        raws: Callable[[int], bytes],
        first_line: int | None = None,
    ) -> tuple[ParsedSteps, list[Rejected]]:
        """Parse the non-blank lines in ``chunk_data`` (``lines`` are their numbers).

        ``raws(i)`` returns the raw bytes of the i-th non-blank line (for reasons);
        ``first_line`` is the number of the chunk's first line (blank or not).
        """
        if first_line is None:
            first_line = int(lines[0]) if len(lines) else 1
        rejected: list[Rejected] = []
        try:
            df = self._read(chunk_data)
            if df.height != len(lines):
                raise pl.exceptions.ComputeError("row count mismatch")
            keep_idx = np.arange(len(lines))
        except Exception:  # noqa: BLE001 - polars raises several error types for bad input
            good: list[int] = []
            for i in range(len(lines)):
                err = check_line(self.validator, raws(i))
                if err is None:
                    good.append(i)
                else:
                    rejected.append(Rejected(int(lines[i]), err.reason, err.detail, raws(i)))
            keep_idx = np.asarray(good, dtype=np.int64)
            df, keep_idx, more = self._read_bisect(keep_idx, lines, raws)
            rejected.extend(more)
        df, keep_idx, more = self._episode_id_types(
            df, chunk_data, first_line, keep_idx, lines, raws
        )
        rejected.extend(more)
        steps, bad_lines = self._vector_checks(df, lines[keep_idx])
        if bad_lines:
            pos: dict[int, int] = {int(lines[i]): int(i) for i in keep_idx}
            for ln in sorted(bad_lines):
                raw = raws(pos[ln])
                err = check_line(self.validator, raw)
                if err is None:
                    err = RecordError(FAST_CHECK, bad_lines[ln])
                rejected.append(Rejected(ln, err.reason, err.detail, raw))
        rejected.sort(key=lambda r: r.line)
        return steps, rejected

    def _episode_id_types(
        self,
        df: pl.DataFrame,
        chunk_data: bytes,
        first_line: int,
        keep_idx: np.ndarray,
        lines: np.ndarray,
        raws: Callable[[int], bytes],
    ) -> tuple[pl.DataFrame, np.ndarray, list[Rejected]]:
        """The JSON type of every row's episode id, as column ``ID_INT``.

        polars reads any id as text (the string "3", the integer 3 and the float 3.0 all
        become "3"; an object its JSON), so the type comes from the chunk's bytes, looked
        at under the key's last name, the same for a nested key as for a top-level one.
        When no id reads as an integer's text and that name is followed by nothing but
        strings (one regex search), every id is a string. Otherwise one scan finds what
        follows each occurrence of the name (:func:`key_value_kinds`); a line where that
        cannot tell for sure (another kind of value under the same name, an escaped key, a
        float, ...) goes to the reference check, which rejects an id that is not a string
        or an integer, and otherwise reads the type from the parsed record."""
        if len(keep_idx) == 0:
            return df.with_columns(pl.Series(ID_INT, [], dtype=pl.Boolean)), keep_idx, []
        key = self.spec.source.episode_key
        text = df.select(self._ep_expr).to_series()
        looks_int = text.str.contains(r"^-?[0-9]+$").fill_null(False).to_numpy()
        plain = not looks_int.any() and b"\\" not in chunk_data  # no escaped key either
        if plain and self._id_other.search(chunk_data) is None:
            # no id text an integer could give, no other kind of value: all strings
            return df.with_columns(pl.lit(False).alias(ID_INT)), keep_idx, []
        pos, kind = key_value_kinds(chunk_data, key.rsplit(".", 1)[-1])
        line_starts = np.concatenate([[0], _newlines(chunk_data) + 1])
        at = np.searchsorted(line_starts, pos, side="right") - 1  # line of each match
        row_line = lines[keep_idx] - first_line  # line of each row, in the chunk
        n_str, n_int, n_other = (
            np.bincount(at[kind == k], minlength=len(line_starts))[row_line]
            for k in (VALUE_STRING, VALUE_INTEGER, VALUE_OTHER)
        )
        unsure = (n_other > 0) | np.where(looks_int, (n_str > 0) == (n_int > 0), n_str == 0)
        if b"\\" in chunk_data:
            escaped = [m.start() for m in _ESCAPED_KEY.finditer(chunk_data)]
            bad_lines = np.searchsorted(line_starts, np.asarray(escaped, np.int64), "right") - 1
            unsure |= np.isin(row_line, bad_lines)
        id_int = looks_int & (n_int > 0) & (n_str == 0)
        rejected: list[Rejected] = []
        drop = np.zeros(len(keep_idx), dtype=bool)
        for j in np.flatnonzero(unsure):
            i = int(keep_idx[j])
            try:
                obj = parse_line(raws(i))
                self.validator.check(obj)
            except RecordError as err:
                rejected.append(Rejected(int(lines[i]), err.reason, err.detail, raws(i)))
                drop[j] = True
                continue
            id_int[j] = isinstance(get_path(obj, key), int)
        df = df.with_columns(pl.Series(ID_INT, id_int))
        if drop.any():
            df = df.filter(pl.Series(~drop))
            keep_idx = keep_idx[~drop]
        return df, keep_idx, rejected

    def _read_bisect(
        self, idx: np.ndarray, lines: np.ndarray, raws: Callable[[int], bytes]
    ) -> tuple[pl.DataFrame, np.ndarray, list[Rejected]]:
        """Read the given lines with polars; isolate any line polars still rejects."""
        if len(idx) == 0:
            return self._read(b""), idx, []
        data = b"\n".join(raws(int(i)) for i in idx) + b"\n"
        try:
            df = self._read(data)
            if df.height == len(idx):
                return df, idx, []
        except Exception as e:  # noqa: BLE001
            if len(idx) == 1:
                i = int(idx[0])
                # The reference check accepted this line (e.g. a key given twice: the last
                # one counts): read its canonical re-encoding instead.
                with contextlib.suppress(Exception):
                    df = self._read(orjson.dumps(parse_line(raws(i))) + b"\n")
                    if df.height == 1:
                        return df, idx, []
                return (
                    self._read(b""),
                    idx[:0],
                    [
                        Rejected(
                            int(lines[i]),
                            FAST_CHECK,
                            f"unreadable record: {str(e).splitlines()[0][:200]}",
                            raws(i),
                        )
                    ],
                )
        if len(idx) == 1:
            i = int(idx[0])
            return (
                self._read(b""),
                idx[:0],
                [Rejected(int(lines[i]), FAST_CHECK, "unreadable record", raws(i))],
            )
        mid = len(idx) // 2
        a, ia, ra = self._read_bisect(idx[:mid], lines, raws)
        b, ib, rb = self._read_bisect(idx[mid:], lines, raws)
        return pl.concat([a, b]), np.concatenate([ia, ib]), ra + rb

    # ------------------------------------------------------------ checks
    def _vector_checks(
        self, df: pl.DataFrame, lines: np.ndarray
    ) -> tuple[ParsedSteps, dict[int, str]]:
        """Checks on typed columns; returns the steps of good lines and {line: what failed}.

        A bad step rejects its whole line (its episode, for episode_per_line)."""
        df, bad = self._step_rows(df, lines)
        present = df.select(self._present_expr().alias("ok")).to_series().to_numpy()
        present = present.astype(bool)
        for ln in df.get_column(LINE).to_numpy()[~present]:
            bad.setdefault(int(ln), "a field is missing or has the wrong length")
        safe = df.filter(pl.Series(present))  # typed columns hold junk in the other rows
        v = self._values(safe)
        safe_lines = safe.get_column(LINE).to_numpy()
        for ln in safe_lines[~v.ok]:
            bad.setdefault(int(ln), "a number is not finite or an action is out of its space")
        keep = ~np.isin(safe_lines, np.fromiter(bad, dtype=np.int64, count=len(bad)))
        return self._steps(safe.filter(pl.Series(keep)), v, keep), bad

    def _step_rows(
        self, df: pl.DataFrame, lines: np.ndarray
    ) -> tuple[pl.DataFrame, dict[int, str]]:
        """One row per step, with its line number (``LINE``) and step index (``T``)."""
        bad: dict[int, str] = {}
        if self.layout.per_line:
            df, empty, _ = self._explode(df, lines)
            for ln in lines[empty]:
                bad[int(ln)] = "empty or missing steps"
            return df, bad
        assert self._t_expr is not None
        df = df.with_columns(pl.Series(LINE, lines))
        return df.with_columns(self._t_expr.alias(T)), bad

    def _present_expr(self) -> pl.Expr:
        """True where every field is there with the right list lengths, and the end
        reason (if any) is a declared one."""
        f = self.spec.fields
        ok = _obs_ok_expr(self._obs_parts) & pl.col(T).is_not_null()
        ok = ok & self._ep_expr.is_not_null()
        for e in self._act_exprs.values():
            ok = ok & e.is_not_null()
        if f.action.type == "continuous":
            ok = ok & (self._act_exprs["act"].list.len() == f.action.size)
        ok = ok & _field(self._sp + f.reward.path).is_not_null()
        for _, named in f.rewards:
            ok = ok & _field(self._sp + named.path).is_not_null()
        for fp in (f.terminated, f.truncated):
            if fp is not None:
                ok = ok & _field(self._sp + fp.path).is_not_null()
        if self._fobs_parts is not None:
            assert f.final_observation is not None
            given = _field(f.final_observation.path).is_not_null()
            ok = ok & (~given | _obs_ok_expr(self._fobs_parts))
        if f.end is not None:
            endc = _field(f.end.path)
            ok = ok & (endc.is_null() | endc.is_in(list(f.end.terminated + f.end.truncated)))
        return ok

    def _values(self, safe: pl.DataFrame) -> _Values:
        """The numbers of rows whose fields are all present, and which rows are in range."""
        f = self.spec.fields
        obs = _obs_matrix(safe, self._obs_parts, self.layout.obs_dim)
        rew = safe.select(_field(self._sp + f.reward.path)).to_series().to_numpy()
        rew = rew.astype(np.float64)
        act, act_ok, act_finite = self._actions(safe)
        finite = _finite_rows(obs) & np.isfinite(rew) & act_finite
        named = None
        if f.rewards:  # (n, K): one column per named reward, in the spec's order
            named = np.stack(
                [
                    safe.select(_field(self._sp + fp.path)).to_series().to_numpy()
                    for _, fp in f.rewards
                ],
                axis=1,
            ).astype(np.float64)
            finite &= _finite_rows(named)
        fobs = fobs_present = None
        if self._fobs_parts is not None:
            assert f.final_observation is not None
            given = _field(f.final_observation.path).is_not_null()
            fobs_present = safe.select(given).to_series().to_numpy().astype(bool)
            fobs64 = np.zeros((0, self.layout.obs_dim))
            if fobs_present.any():
                present = safe.filter(pl.Series(fobs_present))
                fobs64 = _obs_matrix(present, self._fobs_parts, self.layout.obs_dim)
                finite[fobs_present] &= _finite_rows(fobs64)
            fobs = fobs64.astype(np.float32)
        return _Values(obs, act, rew, fobs, fobs_present, finite & act_ok, named)

    def _actions(self, safe: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(actions, in the action space, finite) per row."""
        a = self.spec.fields.action

        def column(name: str) -> np.ndarray:
            return safe.select(self._act_exprs[name]).to_series().to_numpy()

        finite = np.ones(safe.height, dtype=bool)
        if a.composite is not None:
            sel = column("sel").astype(np.int64)
            val = column("val").astype(np.int64)
            offset = np.full(len(sel), -1, dtype=np.int64)
            width = np.zeros(len(sel), dtype=np.int64)
            for k, case in a.composite.cases:
                m = sel == k
                offset[m] = case.offset
                width[m] = case.n
            ok = (offset >= 0) & (val >= 0) & (val < width)
            return np.where(ok, offset + val, 0).astype(np.int64), ok, finite
        if a.type == "discrete":
            assert a.n is not None
            act = column("act").astype(np.int64)
            return act, (act >= 0) & (act < a.n), finite
        assert a.size is not None and a.low is not None and a.high is not None
        act64 = _list_to_matrix(safe.select(self._act_exprs["act"]).to_series(), a.size)
        with np.errstate(invalid="ignore"):
            ok = np.asarray(((act64 >= np.asarray(a.low)) & (act64 <= np.asarray(a.high))).all(1))
        return act64.astype(np.float32), ok, _finite_rows(act64)

    def _steps(self, sub: pl.DataFrame, v: _Values, keep: np.ndarray) -> ParsedSteps:
        """The kept rows (``keep`` of the checked ones) as step arrays."""
        f = self.spec.fields

        def flags(fp: Any) -> np.ndarray:
            if fp is None:
                return np.zeros(sub.height, dtype=bool)
            return sub.select(_field(self._sp + fp.path)).to_series().to_numpy().astype(bool)

        end = None
        if f.end is not None:
            end = np.asarray(sub.select(_field(f.end.path)).to_series().to_list(), dtype=object)
        fp = v.fobs_present
        return ParsedSteps(
            episode_id=sub.select(self._ep_expr.alias(EP)).to_series(),
            t=sub.get_column(T).to_numpy().astype(np.int64),
            obs=v.obs[keep].astype(np.float32),
            act=v.act[keep],
            rew=v.rew[keep],
            term=flags(f.terminated),
            trunc=flags(f.truncated),
            end=end,
            fobs=None if v.fobs is None or fp is None else v.fobs[keep[fp]],
            fobs_present=None if fp is None else fp[keep],
            line=sub.get_column(LINE).to_numpy().astype(np.int64),
            id_int=sub.get_column(ID_INT).to_numpy().astype(bool),
            named_rew=None if v.named_rew is None else v.named_rew[keep],
        )


@dataclass(frozen=True)
class _Values:
    """The numbers of the checked rows of a chunk (before rejected lines are dropped)."""

    obs: np.ndarray  # (n, obs_dim) float64
    act: np.ndarray  # (n,) int64 or (n, act_dim) float32
    rew: np.ndarray  # (n,) float64
    fobs: np.ndarray | None  # (p, obs_dim) float32, the rows with a final observation
    fobs_present: np.ndarray | None  # (n,) bool
    ok: np.ndarray  # (n,) bool: finite, and the action in its space
    named_rew: np.ndarray | None = None  # (n, K) float64: the spec's named rewards


def infer_shapes(spec: TransitionSpec, first_records: list[Any]) -> TransitionSpec:
    """Fill in list lengths the spec left out (observation ``shape``) from the first good
    record, so that every later record is checked against the same length."""
    import dataclasses

    o = spec.fields.observation
    if o.keys is not None or o.scalar or o.size is not None:
        return spec
    for rec in first_records:
        step: Any = rec
        if spec.source.layout == "episode_per_line":
            assert spec.source.steps_key is not None
            steps = get_path(rec, spec.source.steps_key)
            if not isinstance(steps, list) or not steps:
                continue
            step = steps[0]
        value = get_path(step, o.path)
        if isinstance(value, list) and value and all(_is_num(v) for v in value):
            new_obs = dataclasses.replace(o, size=len(value))
            return dataclasses.replace(
                spec, fields=dataclasses.replace(spec.fields, observation=new_obs)
            )
        if _is_num(value):
            new_obs = dataclasses.replace(o, scalar=True)
            return dataclasses.replace(
                spec, fields=dataclasses.replace(spec.fields, observation=new_obs)
            )
    raise ValueError(
        f"{spec.origin}: fields.observation: cannot infer the observation length from the "
        "data (no readable record has a list of numbers there); give `shape: [N]`"
    )
