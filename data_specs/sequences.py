"""The ``kind: sequences`` spec: language-agent episodes -> a sequence store.

An episode is a task prompt and then turns; a policy turn's text is cut into labelled
spans (``fields.spans``), by a regex with one capture group or by a field of the turn
that holds the span's text. See ``docs/FORMAT.md`` ("Sequence store") for what the
builder makes of it, and :mod:`data_specs.schema` for the helpers and the other kinds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_specs.schema import (
    EnvSpec,
    _bool,
    _Ctx,
    _drop_absent_license,
    _int,
    _jsonable,
    _mapping,
    _parse_env,
    _path,
    _str,
    _str_list,
    parse_license,
    read_yaml,
    spec_hash,
)

# The plain template's special tokens (a trained tokenizer has them as ids 0..2, then one
# ``<|ROLE|>`` per role seen in the data); see docs/FORMAT.md.
PAD_TOKEN = "<|pad|>"
END_TOKEN = "<|end|>"
PROMPT_TOKEN = "<|prompt|>"
PLAIN_SPECIALS = (PAD_TOKEN, END_TOKEN, PROMPT_TOKEN)
RESERVED_LABELS = ("context", "other")  # label 0 and the last label; not span names


@dataclass(frozen=True)
class SpanSpec:
    """One labelled part of a policy turn: a regex over the turn's text (its one capture
    group is the span) or a field of the turn holding the span's text."""

    name: str
    pattern: str | None = None  # a regex with exactly one capture group
    path: str | None = None  # a dotted field of the turn; its text must occur in the content
    required: bool = False  # a policy turn without this span is quarantined (missing_span)


@dataclass(frozen=True)
class SequenceSourceSpec:
    """Where the episodes are: one JSON object per line, the turns a list inside it."""

    paths: tuple[str, ...]  # globs, relative to the working directory
    episode_key: str = "id"  # the episode's id
    turns_key: str = "turns"  # the list of turns
    layout: Literal["episode_per_line"] = "episode_per_line"


@dataclass(frozen=True)
class SequenceFieldsSpec:
    """Where each piece of an episode is in a record (dotted paths)."""

    prompt: str  # episode-level task text: context
    role: str  # per turn: who speaks
    policy_roles: tuple[str, ...]  # the roles whose turns the model learns to write
    content: str  # per turn text; a policy turn's spans are found in it
    spans: tuple[SpanSpec, ...]  # in label order: codes 1..K; ``other`` is K + 1
    reward: str | None = None  # optional per-turn number
    outcome: str | None = None  # optional per-episode success flag (bool or number)
    teacher: str | None = None  # optional per policy turn: top-k [[id, logprob], ...] per
    # trained token of the turn (needs the teacher's tokenizer: `tokenizer.path`/`pretrained`)


@dataclass(frozen=True)
class SequenceTrainSpec:
    """A byte-level BPE tokenizer trained on the kept episodes' text (lossless)."""

    vocab_size: int = 8000  # target size, the special tokens and 256 bytes included
    min_frequency: int = 2  # a merge must be seen at least this often


@dataclass(frozen=True)
class SequenceTokenizerSpec:
    """Exactly one of ``train``, ``path`` (a tokenizer.json) or ``pretrained`` (a local
    Hugging Face model directory, read with ``AutoTokenizer``; its chat template is used
    when it has one)."""

    train: SequenceTrainSpec | None = None
    path: str | None = None
    pretrained: str | None = None
    prompt_role: str = "user"  # the chat template's role for the task prompt
    chat_roles: tuple[tuple[str, str], ...] = ()  # data role -> chat template role


@dataclass(frozen=True)
class SequencesSpec:
    max_tokens: int = 1024  # longest episode kept, in tokens
    truncate: Literal["none", "turn"] = "none"  # none: quarantine longer; turn: cut at a turn


@dataclass(frozen=True)
class SequenceStoreSpec:
    format: Literal["arrow", "zarr"] = "arrow"


@dataclass(frozen=True)
class SequenceSpec:
    """A ``kind: sequences`` spec."""

    name: str
    source: SequenceSourceSpec
    fields: SequenceFieldsSpec
    tokenizer: SequenceTokenizerSpec
    sequences: SequencesSpec = field(default_factory=SequencesSpec)
    store: SequenceStoreSpec = field(default_factory=SequenceStoreSpec)
    env: EnvSpec | None = None  # a text environment (trainer.envs) the student can play
    description: str = ""
    license: str | None = None  # the data's license, for exports
    kind: Literal["sequences"] = "sequences"
    origin: str = field(default="<spec>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("origin")
        _drop_absent_license(d)
        return _jsonable(d)

    def sha256(self) -> str:
        return spec_hash(self.to_dict())

    @property
    def label_names(self) -> list[str]:
        """Label code -> name: ``context``, the spans in order, ``other``."""
        return ["context", *(s.name for s in self.fields.spans), "other"]


def _parse_span(name: str, value: Any, ctx: _Ctx) -> SpanSpec:
    d = _mapping(value, ctx, {"pattern", "path", "required"})
    if ("pattern" in d) == ("path" in d):
        raise ctx.fail(
            'give exactly one of `pattern: "<tag>(.*?)</tag>"` (a regex with one capture '
            "group) or `path: FIELD` (a field of the turn with the span's text)"
        )
    required = _bool(d.get("required", False), ctx.child("required"), "quarantine turns without it")
    if "path" in d:
        return SpanSpec(name, path=_path(d["path"], ctx.child("path")), required=required)
    pattern = _str(d["pattern"], ctx.child("pattern"), "a regular expression")
    try:
        groups = re.compile(pattern, re.DOTALL).groups
    except re.error as e:
        raise ctx.child("pattern").fail(f"not a valid regular expression ({e})") from None
    if groups != 1:
        raise ctx.child("pattern").fail(
            f"{pattern!r} has {groups} capture groups; it needs exactly one, around the span's "
            'text, e.g. "<action>(.*?)</action>" (use (?:...) for other groups)'
        )
    return SpanSpec(name, pattern=pattern, required=required)


def _opt_path(d: dict[str, Any], key: str, ctx: _Ctx) -> str | None:
    if key not in d or d[key] is None:
        return None
    sub = _mapping(d[key], ctx.child(key), {"path"}, {"path"})
    return _path(sub["path"], ctx.child(key).child("path"))


def _parse_fields(value: Any, ctx: _Ctx) -> SequenceFieldsSpec:
    allowed = {"prompt", "role", "policy_roles", "content", "spans", "reward", "outcome", "teacher"}
    d = _mapping(value, ctx, allowed, {"prompt", "role", "policy_roles", "content", "spans"})
    sctx = ctx.child("spans")
    raw_spans = d["spans"]
    if not isinstance(raw_spans, Mapping) or not raw_spans:
        raise sctx.fail(
            'must map span names to {pattern: REGEX} or {path: FIELD}, e.g. {action: {pattern: "'
            '<action>(.*?)</action>"}}'
        )
    spans = []
    for k, v in raw_spans.items():
        name = _str(k, sctx, "a span name")
        if name in RESERVED_LABELS:
            raise sctx.child(name).fail(f"{name!r} is a reserved label name; rename the span")
        spans.append(_parse_span(name, v, sctx.child(name)))
    return SequenceFieldsSpec(
        prompt=_opt_path(d, "prompt", ctx) or "",
        role=_opt_path(d, "role", ctx) or "",
        policy_roles=_str_list(d["policy_roles"], ctx.child("policy_roles"), "role names"),
        content=_opt_path(d, "content", ctx) or "",
        spans=tuple(spans),
        reward=_opt_path(d, "reward", ctx),
        outcome=_opt_path(d, "outcome", ctx),
        teacher=_opt_path(d, "teacher", ctx),
    )


def _parse_tokenizer(value: Any, ctx: _Ctx) -> SequenceTokenizerSpec:
    d = _mapping(value, ctx, {"train", "path", "pretrained", "prompt_role", "chat_roles"})
    given = [k for k in ("train", "path", "pretrained") if k in d]
    if len(given) != 1:
        raise ctx.fail(
            "give exactly one of `train: {vocab_size: 8000}` (learn a byte-level BPE), "
            "`path: tokenizer.json` or `pretrained: DIR` (a local Hugging Face model directory)"
        )
    prompt_role = _str(d.get("prompt_role", "user"), ctx.child("prompt_role"), "a chat role")
    roles: list[tuple[str, str]] = []
    if d.get("chat_roles") is not None:
        rctx = ctx.child("chat_roles")
        if not isinstance(d["chat_roles"], Mapping):
            raise rctx.fail("must map a data role to a chat template role, e.g. {env: user}")
        roles = [
            (_str(k, rctx, "a role"), _str(v, rctx.child(str(k)), "a chat role"))
            for k, v in d["chat_roles"].items()
        ]
    if "pretrained" not in d and ("chat_roles" in d or "prompt_role" in d):
        raise ctx.fail(
            "prompt_role and chat_roles are for `pretrained:` tokenizers' chat templates"
        )
    if "path" in d:
        return SequenceTokenizerSpec(path=_str(d["path"], ctx.child("path"), "a tokenizer.json"))
    if "pretrained" in d:
        return SequenceTokenizerSpec(
            pretrained=_str(d["pretrained"], ctx.child("pretrained"), "a model directory"),
            prompt_role=prompt_role,
            chat_roles=tuple(roles),
        )
    tctx = ctx.child("train")
    t = _mapping(d["train"] or {}, tctx, {"vocab_size", "min_frequency"})
    return SequenceTokenizerSpec(
        train=SequenceTrainSpec(
            vocab_size=_int(t.get("vocab_size", 8000), tctx.child("vocab_size"), 300, "tokens"),
            min_frequency=_int(
                t.get("min_frequency", 2), tctx.child("min_frequency"), 1, "merge count"
            ),
        )
    )


def parse_sequence_spec(raw: Any, origin: str = "<spec>") -> SequenceSpec:
    """Check a ``kind: sequences`` spec; errors name the key and the fix."""
    ctx = _Ctx(origin)
    allowed = {
        "name", "kind", "source", "fields", "tokenizer", "sequences", "store", "env",
        "description", "license",
    }  # fmt: skip
    d = _mapping(raw, ctx, allowed, {"name", "kind", "source", "fields"})
    name = _str(d["name"], ctx.child("name"), "a store name")
    if "/" in name or name.startswith("."):
        raise ctx.child("name").fail(f"{name!r} is used as a directory name: no '/' or leading '.'")
    if d["kind"] != "sequences":
        raise ctx.child("kind").fail("must be `sequences` here")
    sctx = ctx.child("source")
    s = _mapping(d["source"], sctx, {"paths", "layout", "episode_key", "turns_key"}, {"paths"})
    if s.get("layout", "episode_per_line") != "episode_per_line":
        raise sctx.child("layout").fail(
            f"sequence stores read `episode_per_line` (one episode with its turns per line), "
            f"got {s['layout']!r}"
        )
    source = SequenceSourceSpec(
        paths=_str_list(s["paths"], sctx.child("paths"), "file globs"),
        episode_key=_path(s.get("episode_key", "id"), sctx.child("episode_key")),
        turns_key=_path(s.get("turns_key", "turns"), sctx.child("turns_key")),
    )
    qctx = ctx.child("sequences")
    q = _mapping(d.get("sequences") or {}, qctx, {"max_tokens", "truncate"})
    truncate = q.get("truncate", "none")
    if truncate not in ("none", "turn"):
        raise qctx.child("truncate").fail(
            f"must be `none` (quarantine longer episodes) or `turn` (cut them at the last turn "
            f"boundary that fits), got {truncate!r}"
        )
    stctx = ctx.child("store")
    st = _mapping(d.get("store") or {}, stctx, {"format"})
    fmt = st.get("format", "arrow")
    if fmt not in ("arrow", "zarr"):
        raise stctx.child("format").fail(f"must be `arrow` or `zarr`, got {fmt!r}")
    fields_ = _parse_fields(d["fields"], ctx.child("fields"))
    tokenizer = _parse_tokenizer(d.get("tokenizer") or {"train": {}}, ctx.child("tokenizer"))
    if fields_.teacher is not None and tokenizer.train is not None:
        raise (
            ctx.child("fields")
            .child("teacher")
            .fail(
                "teacher token ids need the teacher's tokenizer; give `tokenizer.path` or "
                "`tokenizer.pretrained` instead of `train`"
            )
        )
    return SequenceSpec(
        name=name,
        source=source,
        fields=fields_,
        tokenizer=tokenizer,
        sequences=SequencesSpec(
            max_tokens=_int(q.get("max_tokens", 1024), qctx.child("max_tokens"), 8, "tokens"),
            truncate=truncate,
        ),
        store=SequenceStoreSpec(format=fmt),
        env=_parse_env(d["env"], ctx.child("env")) if d.get("env") is not None else None,
        description=str(d.get("description", "")),
        license=parse_license(d, ctx),
        origin=origin,
    )


def load_sequence_spec(path: str | Path) -> SequenceSpec:
    """Load and check a sequence spec (``kind: sequences``)."""
    return parse_sequence_spec(read_yaml(path), origin=str(path))
