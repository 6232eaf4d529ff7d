"""The tokenizer of a sequence store and the template that lays an episode out as tokens.

Every episode is written as text pieces, each tokenized on its own (so a span's tokens
decode to exactly that span's text) and concatenated::

    prompt_prefix  TASK  prompt_suffix                              context
    header[role]   CONTENT  tail[role]                              one turn

A policy turn's CONTENT is cut at its spans (each span a label of its own, the rest
``other``), and the start of its ``tail`` up to and including the end-of-turn token is
``other`` too: the student must learn to end its turn. The rest is context.

The *plain* template (a trained tokenizer or a ``tokenizer.json``)::

    prompt_prefix = "<|prompt|>\\n"     prompt_suffix = "<|end|>\\n"
    header[role]  = "<|ROLE|>\\n"       tail[role]    = "<|end|>\\n"

A ``pretrained`` model directory with a chat template: the same strings are read off its
template by rendering a conversation with a placeholder content (:func:`chat_template`).
The template's strings are kept in the manifest, so a store needs only its
``tokenizer.json`` to lay out new text the same way (:class:`SequenceText`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_specs.sequences import END_TOKEN, PAD_TOKEN, PLAIN_SPECIALS, PROMPT_TOKEN
from pipeline.format import BuildError

PLACEHOLDER = "\u2063PLACEHOLDER\u2063"  # a content no template alters


def role_token(role: str) -> str:
    return f"<|{role}|>"


@dataclass(frozen=True)
class Template:
    """The text around the task and around each role's turns (see the module docstring)."""

    kind: str  # "plain" or "chat"
    prompt_prefix: str
    prompt_suffix: str
    headers: dict[str, str] = field(default_factory=dict)  # role -> text before the content
    tails: dict[str, str] = field(default_factory=dict)  # role -> text after it
    end_token: str = END_TOKEN  # the end-of-turn token (trained at the end of a policy turn)
    pad_token: str = PAD_TOKEN

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "prompt_prefix": self.prompt_prefix,
            "prompt_suffix": self.prompt_suffix,
            "headers": dict(sorted(self.headers.items())),
            "tails": dict(sorted(self.tails.items())),
            "end_token": self.end_token,
            "pad_token": self.pad_token,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Template:
        return cls(
            d["kind"], d["prompt_prefix"], d["prompt_suffix"], dict(d["headers"]),
            dict(d["tails"]), d["end_token"], d["pad_token"],
        )  # fmt: skip


def plain_template(roles: Iterable[str]) -> Template:
    """The documented plain template for ``roles``."""
    roles = sorted(set(roles))
    return Template(
        "plain",
        f"{PROMPT_TOKEN}\n",
        f"{END_TOKEN}\n",
        {r: f"{role_token(r)}\n" for r in roles},
        {r: f"{END_TOKEN}\n" for r in roles},
    )


def train_bpe(
    texts: Iterable[str], roles: Iterable[str], vocab_size: int, min_frequency: int
) -> Tokenizer:
    """A byte-level BPE trained on ``texts``: lossless (every string round-trips), with the
    plain template's special tokens first (``<|pad|>`` 0, ``<|end|>`` 1, ``<|prompt|>`` 2,
    then ``<|ROLE|>`` per role, sorted). The same texts give the same tokenizer."""
    specials = [*PLAIN_SPECIALS, *(role_token(r) for r in sorted(set(roles)))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer_json(path: str | Path, origin: str) -> Tokenizer:
    """A ``tokenizer.json`` (the segment store's loader: errors name the key and the fix)."""
    from pipeline.segments.tokenizer import load_tokenizer

    return load_tokenizer(path, origin)


def load_pretrained(directory: str | Path, origin: str) -> Any:
    """``AutoTokenizer.from_pretrained(directory)`` from local files only, fast tokenizers only."""
    p = Path(directory)
    if not p.is_dir():
        raise BuildError(
            f"{origin}: tokenizer.pretrained: {str(p)!r} is not a directory; give a local "
            "Hugging Face model directory (nothing is downloaded)"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BuildError(
            f"{origin}: tokenizer.pretrained needs transformers: pip install -e '.[agent]'"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise BuildError(
            f"{origin}: tokenizer.pretrained: {p} has no tokenizer AutoTokenizer can load "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise BuildError(
            f"{origin}: tokenizer.pretrained: {p} has only a slow tokenizer; save a fast one "
            "(tokenizer.json) beside it"
        )
    return tok


def chat_template(
    tok: Any, roles: Sequence[str], prompt_role: str, chat_roles: dict[str, str], origin: str
) -> Template:
    """The template's strings read off a chat template by rendering conversations whose
    contents are a placeholder; the template must render every turn the same way wherever
    it stands (ChatML, Llama 3 and most others do)."""

    def render(messages: list[dict[str, str]]) -> str:
        out = tok.apply_chat_template(messages, tokenize=False)
        return str(out)

    eos = tok.eos_token
    if eos is None:
        raise BuildError(f"{origin}: tokenizer.pretrained: the tokenizer has no eos_token")
    pad = tok.pad_token or eos
    try:
        first = render([{"role": prompt_role, "content": PLACEHOLDER}])
        prefix, _, suffix = first.partition(PLACEHOLDER)
        headers: dict[str, str] = {}
        tails: dict[str, str] = {}
        for r in sorted(set(roles)):
            chat_role = chat_roles.get(r, r)
            both = render(
                [
                    {"role": prompt_role, "content": PLACEHOLDER},
                    {"role": chat_role, "content": PLACEHOLDER},
                ]
            )
            if not both.startswith(first):
                raise BuildError(
                    f"{origin}: tokenizer.pretrained: the chat template renders the prompt "
                    f"differently when a {chat_role!r} turn follows; use a plain tokenizer.json"
                )
            head, _, tail = both[len(first) :].partition(PLACEHOLDER)
            headers[r], tails[r] = head, tail
    except BuildError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja errors for unknown roles, ...
        raise BuildError(
            f"{origin}: tokenizer.pretrained: the chat template cannot render these roles "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); map them with "
            "tokenizer.chat_roles, e.g. {env: user}"
        ) from None
    return Template("chat", prefix, suffix, headers, tails, end_token=eos, pad_token=pad)


class SequenceText:
    """Tokens of a store's layout: encode, decode, and the ids of a prompt or a turn."""

    def __init__(self, tokenizer: Tokenizer, template: Template) -> None:
        self.tokenizer = tokenizer
        self.template = template
        end = tokenizer.token_to_id(template.end_token)
        pad = tokenizer.token_to_id(template.pad_token)
        if end is None or pad is None:
            missing = template.end_token if end is None else template.pad_token
            raise BuildError(
                f"the tokenizer has no token {missing!r}; a tokenizer.json for a sequence "
                f"store needs {END_TOKEN!r} and {PAD_TOKEN!r} (or use `pretrained:`)"
            )
        self.end_id = int(end)
        self.pad_id = int(pad)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._fixed: dict[str, list[int]] = {}  # template strings, encoded once

    def _ids(self, s: str) -> list[int]:
        if s not in self._fixed:
            self._fixed[s] = self.encode(s)
        return list(self._fixed[s])

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, in one call into the tokenizer."""
        if not texts:
            return []
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [list(e.ids) if t else [] for e, t in zip(encs, texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def prompt_ids(self, task: str) -> list[int]:
        t = self.template
        return self._ids(t.prompt_prefix) + self.encode(task) + self._ids(t.prompt_suffix)

    def header_ids(self, role: str) -> list[int]:
        return self._ids(self._header(role))

    def tail_ids(self, role: str, policy: bool) -> tuple[list[int], list[int]]:
        """A turn's tail split into (written by the policy, context): the policy writes up
        to and including the end-of-turn token."""
        ids = self._ids(self._tail(role))
        if not policy or self.end_id not in ids:
            return [], ids
        cut = ids.index(self.end_id) + 1
        return ids[:cut], ids[cut:]

    def turn_ids(self, role: str, content: str, policy: bool) -> list[int]:
        """A whole turn's ids (the content tokenized as one piece)."""
        written, rest = self.tail_ids(role, policy)
        return self.header_ids(role) + self.encode(content) + written + rest

    def _header(self, role: str) -> str:
        t = self.template
        if role in t.headers:
            return t.headers[role]
        if t.kind == "plain":
            return f"{role_token(role)}\n"
        raise KeyError(f"role {role!r} is not in this store's template ({sorted(t.headers)})")

    def _tail(self, role: str) -> str:
        t = self.template
        if role in t.tails:
            return t.tails[role]
        if t.kind == "plain":
            return f"{END_TOKEN}\n"
        raise KeyError(f"role {role!r} is not in this store's template ({sorted(t.tails)})")
