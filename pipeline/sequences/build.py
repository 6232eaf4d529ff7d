"""Agent episodes -> a sequence store (``kind: sequences``); the layout is in docs/FORMAT.md.

``python -m pipeline.build data_specs/agent-demo.yaml`` comes here. The build:

1. reads every episode (:mod:`pipeline.sequences.sources`), rejecting bad ones with a
   reason, and finds each policy turn's spans;
2. trains a byte-level BPE on the kept text, or loads a ``tokenizer.json`` or a local
   model directory's tokenizer (and its chat template) (:mod:`pipeline.sequences.text`);
3. cuts every episode into text pieces (template strings, the task, each turn's spans and
   the text between them), tokenizes all pieces in one ``encode_batch`` and concatenates
   them, one label per token: 0 context, 1..K the spans in spec order, K+1 ``other``;
4. quarantines episodes longer than ``sequences.max_tokens`` (``too_long``) or cuts them
   after the last whole turn that fits (``truncate: turn``);
5. writes ``sequences.arrow`` and ``turns.arrow`` (or one zarr group), the tokenizer
   directory, ``quarantine.jsonl`` and ``manifest.json`` into a staging directory that is
   swapped into place in one rename (:func:`pipeline.storage.publish`). The same spec and
   inputs again: "up to date".
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_specs.sequences import SequenceSpec, load_sequence_spec
from pipeline.arrowio import file_digest, write_arrow_table
from pipeline.format import FORMAT_NAME, QUARANTINE, SPEC_COPY, BuildError
from pipeline.report import quarantine_summary
from pipeline.segments.build import (
    distribution,
    table_digests,
    tables_content_hash,
    write_quarantine,
)
from pipeline.segments.sources import Rejected
from pipeline.segments.tokenizer import sha256_hex, tokenizer_bytes
from pipeline.sequences.layout import (
    CONTEXT,
    FORMAT_VERSION,
    KIND,
    LAYOUT,
    PROMPT_TURN,
    SEQUENCES_ARROW,
    TOKENIZER_DIR,
    TOKENIZER_JSON,
    TURNS_ARROW,
    ZARR_GROUP,
)
from pipeline.sequences.sources import TEACHER_MISMATCH, TOO_LONG, Episode, read_episodes, reject
from pipeline.sequences.text import (
    SequenceText,
    chat_template,
    load_pretrained,
    load_tokenizer_json,
    plain_template,
    train_bpe,
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

PRETRAINED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
)  # fmt: skip


# --------------------------------------------------------------------------- pieces


@dataclass
class Laid:
    """One episode as tokens (before the length check)."""

    ids: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int8
    turn_index: np.ndarray  # (T,) int16, PROMPT_TURN on the prompt
    turn_bounds: np.ndarray  # (n_turns, 2) int64 token [start, end) of each turn
    teacher: list[tuple[int, list[tuple[int, float]]]]  # (token position, top-k) pairs


def episode_pieces(ep: Episode, n_spans: int) -> list[tuple[str, int, int]]:
    """(text, label, turn) pieces of an episode's variable text, in order; template strings
    are the pieces with label -1 - k (k: which template string, see :func:`lay_out`)."""
    other = n_spans + 1
    out: list[tuple[str, int, int]] = [("", -1, PROMPT_TURN), (ep.task, CONTEXT, PROMPT_TURN)]
    out.append(("", -2, PROMPT_TURN))
    for j, t in enumerate(ep.turns):
        out.append(("", -3, j))  # header
        if t.policy:
            at = 0
            for a, b, code in t.spans:
                if a > at:
                    out.append((t.content[at:a], other, j))
                out.append((t.content[a:b], code, j))
                at = b
            if at < len(t.content):
                out.append((t.content[at:], other, j))
        elif t.content:
            out.append((t.content, CONTEXT, j))
        out.append(("", -4, j))  # tail
    return out


def lay_out(
    ep: Episode, pieces: list[tuple[str, int, int]], encoded: list[list[int]], text: SequenceText,
    n_spans: int,
) -> Laid:  # fmt: skip
    """Concatenate an episode's encoded pieces with the template's ids."""
    other = n_spans + 1
    ids: list[int] = []
    labels: list[int] = []
    turns: list[int] = []
    bounds: list[list[int]] = []
    teacher: list[tuple[int, list[tuple[int, float]]]] = []
    tpl = text.template
    prefix, suffix = text._ids(tpl.prompt_prefix), text._ids(tpl.prompt_suffix)
    written_start = 0

    def add(seq: list[int], label: int, turn: int) -> None:
        ids.extend(seq)
        labels.extend([label] * len(seq))
        turns.extend([turn] * len(seq))

    for (_, label, turn), enc in zip(pieces, encoded):
        if label == -1:
            add(prefix, CONTEXT, turn)
        elif label == -2:
            add(suffix, CONTEXT, turn)
        elif label == -3:
            t = ep.turns[turn]
            bounds.append([len(ids), -1])
            add(text.header_ids(t.role), CONTEXT, turn)
            written_start = len(ids)
        elif label == -4:
            t = ep.turns[turn]
            written, rest = text.tail_ids(t.role, t.policy)
            add(written, other if t.policy else CONTEXT, turn)
            if t.teacher is not None:
                teacher += [(written_start + i, k) for i, k in enumerate(t.teacher)]
                if len(t.teacher) != len(ids) - written_start:
                    raise _TeacherMismatch(
                        f"turn {turn}: {len(t.teacher)} teacher entries for "
                        f"{len(ids) - written_start} tokens the policy writes"
                    )
            add(rest, CONTEXT, turn)
            bounds[-1][1] = len(ids)
        else:
            add(enc, label, turn)
    return Laid(
        np.asarray(ids, dtype=np.int32),
        np.asarray(labels, dtype=np.int8),
        np.asarray(turns, dtype=np.int16),
        np.asarray(bounds, dtype=np.int64).reshape(-1, 2),
        teacher,
    )


class _TeacherMismatch(Exception):
    pass


def cut_at_turn(laid: Laid, ep: Episode, max_tokens: int) -> int:
    """How many whole turns fit in ``max_tokens`` with at least one policy turn among
    them (0: none can be kept)."""
    fits = np.flatnonzero(laid.turn_bounds[:, 1] <= max_tokens)
    n = int(fits[-1]) + 1 if len(fits) else 0
    while n > 0 and not any(t.policy for t in ep.turns[:n]):
        n -= 1
    return n


# --------------------------------------------------------------------------- tables


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    if offsets[-1] < 2**31 - 1:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values))


@dataclass
class Columns:
    """The kept episodes as flat arrays (what both layouts store)."""

    episode_id: list[str]
    offsets: np.ndarray  # (N + 1,) int64
    input_ids: np.ndarray  # (T,) int32
    labels: np.ndarray  # (T,) int8
    turn_index: np.ndarray  # (T,) int16
    outcome: np.ndarray  # (N,) float32
    n_turns: np.ndarray  # (N,) int32
    truncated: np.ndarray  # (N,) bool
    turn_offsets: np.ndarray  # (N + 1,) int64 into the turn arrays
    turn_role: list[str]
    turn_policy: np.ndarray  # (M,) bool
    turn_start: np.ndarray  # (M,) int64, token positions within the episode
    turn_end: np.ndarray
    turn_reward: np.ndarray  # (M,) float32
    turn_content: list[str]
    teacher_k: int
    teacher_ids: np.ndarray | None  # (T, k) int32, -1 where none
    teacher_logprobs: np.ndarray | None  # (T, k) float32

    def sequences_table(self) -> pa.Table:
        n = len(self.episode_id)
        lengths = np.diff(self.offsets).astype(np.int32)
        cols: dict[str, Any] = {
            "episode_id": pa.array(self.episode_id, pa.string()),
            "input_ids": _list_array(self.input_ids, self.offsets),
            "labels": _list_array(self.labels, self.offsets),
            "turn_index": _list_array(self.turn_index, self.offsets),
            "rewards": _list_array(self.turn_reward, self.turn_offsets),
            "outcome": pa.array(self.outcome),
            "length": pa.array(lengths),
            "n_turns": pa.array(self.n_turns),
            "truncated": pa.array(self.truncated),
        }
        if self.teacher_ids is not None and self.teacher_logprobs is not None:
            k = self.teacher_k
            cols["teacher_ids"] = _list_array(self.teacher_ids.reshape(-1), self.offsets * k)
            cols["teacher_logprobs"] = _list_array(
                self.teacher_logprobs.reshape(-1), self.offsets * k
            )
        assert all(len(c) == n for c in cols.values())
        return pa.table(cols)

    def turns_table(self) -> pa.Table:
        episode = np.repeat(
            np.arange(len(self.episode_id), dtype=np.int32), np.diff(self.turn_offsets)
        )
        turn = np.arange(len(episode), dtype=np.int64) - self.turn_offsets[:-1][episode]
        return pa.table(
            {
                "episode": pa.array(episode),
                "turn": pa.array(turn.astype(np.int32)),
                "role": pa.array(self.turn_role, pa.string()),
                "policy": pa.array(self.turn_policy),
                "token_start": pa.array(self.turn_start),
                "token_end": pa.array(self.turn_end),
                "reward": pa.array(self.turn_reward),
                "content": pa.array(self.turn_content, pa.string()),
            }
        )


def write_zarr(tables: dict[str, pa.Table], path: Path) -> None:
    """Both tables in one zarr group: list columns as flat values plus ``NAME.offsets``."""
    import zarr

    root = zarr.open_group(str(path), mode="w")
    for tname, table in tables.items():
        g = root.create_group(tname.removesuffix(".arrow"))
        for name in table.column_names:
            arr = table.column(name).combine_chunks()
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
                _zarr_array(g, f"{name}.offsets", offsets)
                _zarr_array(g, name, arr.values.to_numpy(zero_copy_only=False))
            elif pa.types.is_string(arr.type):
                _zarr_array(g, name, np.array(arr.to_pylist(), dtype=object), text=True)
            else:
                _zarr_array(g, name, arr.to_numpy(zero_copy_only=False))


def _zarr_array(g: Any, name: str, values: np.ndarray, text: bool = False) -> None:
    chunk = (max(min(len(values), 1 << 20), 1),)
    a = g.create_array(name, shape=values.shape, chunks=chunk, dtype=str if text else values.dtype)
    if len(values):
        a[:] = values


def content_hash(
    digests: dict[str, dict[str, str]], tokenizer_sha: str, quarantine_sha: str
) -> str:
    """One hash over every table's column digests, the tokenizer and the quarantine (the
    same for an arrow and a zarr store of the same inputs)."""
    return tables_content_hash(KIND, FORMAT_VERSION, digests, tokenizer_sha, quarantine_sha)


# --------------------------------------------------------------------------- build


def _tokenizer_source_sha(spec: SequenceSpec, spec_path: str | Path) -> str | None:
    t = spec.tokenizer
    if t.path is not None:
        p = Path(t.path)
        if not p.is_file():
            load_tokenizer_json(p, str(spec_path))  # raises with the fix
        return file_sha256(p)
    if t.pretrained is not None:
        d = Path(t.pretrained)
        if not d.is_dir():
            load_pretrained(d, str(spec_path))  # raises with the fix
        h = hashlib.sha256()
        for name in PRETRAINED_FILES:
            if (d / name).is_file():
                h.update(f"{name} {file_sha256(d / name)}\n".encode())
        return h.hexdigest()
    return None


def build_key_parts(spec_sha: str, tokenizer_sha: str | None) -> list[str]:
    """What besides the inputs decides a sequence store: its layout, the spec, the tokenizer."""
    return [f"{KIND}/{FORMAT_VERSION}/{LAYOUT}", spec_sha, str(tokenizer_sha)]


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
    """Build (or find up to date) the sequence store for ``spec_path`` under ``out_dir/NAME``.

    ``chunk_bytes``, ``progress`` and ``workers`` are accepted for the common ``build``
    signature; a sequence build runs in this process (the tokenizer uses its own threads).
    """
    t0 = time.perf_counter()
    spec = load_sequence_spec(spec_path)
    spec_sha = spec.sha256()
    sources = resolve_sources(spec.source.paths, origin=f"{spec_path}")
    tok_sha = _tokenizer_source_sha(spec, spec_path)
    out = Path(out_dir)
    target = out / spec.name
    if not force:
        manifest = up_to_date(
            target, build_key_parts(spec_sha, tok_sha), sources,
            kind=KIND, format_version=FORMAT_VERSION, spec_sha=spec_sha,
        )  # fmt: skip
        if manifest is not None:
            return BuildResult(target, "up to date", manifest, time.perf_counter() - t0)
    with staged(out, spec.name) as staging:
        manifest = _build_into(spec, spec_path, sources, tok_sha, staging, out, max_bad_fraction)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        write_manifest(staging, manifest)
        publish(staging, target)
    return BuildResult(target, "built", manifest, time.perf_counter() - t0)


def _make_text(
    spec: SequenceSpec, spec_path: str | Path, episodes: list[Episode], staging: Path
) -> tuple[SequenceText, dict[str, Any]]:
    """The store's tokenizer and template; writes ``STORE/tokenizer/``."""
    roles = sorted({t.role for ep in episodes for t in ep.turns})
    t = spec.tokenizer
    tdir = staging / TOKENIZER_DIR
    tdir.mkdir()
    origin: dict[str, Any]
    if t.pretrained is not None:
        hf = load_pretrained(t.pretrained, str(spec_path))
        has_chat = bool(getattr(hf, "chat_template", None))
        template = (
            chat_template(hf, roles, t.prompt_role, dict(t.chat_roles), str(spec_path))
            if has_chat
            else plain_template(roles)
        )
        tok = hf.backend_tokenizer
        origin = {"source": "pretrained", "directory": str(t.pretrained), "chat_template": has_chat}
        chat = hf.chat_template if has_chat else None
    else:
        if t.path is not None:
            tok = load_tokenizer_json(t.path, str(spec_path))
            origin = {"source": "path", "path": str(t.path)}
        else:
            assert t.train is not None
            texts = (s for ep in episodes for s in (ep.task, *(u.content for u in ep.turns)))
            tok = train_bpe(texts, roles, t.train.vocab_size, t.train.min_frequency)
            origin = {
                "source": "trained", "model": "byte-level BPE",
                "vocab_size_asked": t.train.vocab_size, "min_frequency": t.train.min_frequency,
            }  # fmt: skip
        template = plain_template(roles)
        chat = None
    try:
        text = SequenceText(tok, template)
    except BuildError as e:
        raise BuildError(f"{spec_path}: tokenizer: {e}") from None
    (staging / TOKENIZER_JSON).write_bytes(tokenizer_bytes(tok))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": template.end_token,
        "pad_token": template.pad_token,
        "model_max_length": spec.sequences.max_tokens,
        "clean_up_tokenization_spaces": False,
    }
    if chat is not None:
        config["chat_template"] = chat
    (tdir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return text, origin


def _build_into(
    spec: SequenceSpec,
    spec_path: str | Path,
    sources: list[SourceFile],
    tok_sha: str | None,
    staging: Path,
    out: Path,
    max_bad_fraction: float | None,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    read = read_episodes(sources, spec)
    rejected = read.rejected
    timings["read"] = round(time.perf_counter() - t, 4)
    if not read.episodes:
        raise BuildError(_nothing_kept(spec_path, sources, rejected))
    t = time.perf_counter()
    text, tok_origin = _make_text(spec, spec_path, read.episodes, staging)
    timings["tokenizer"] = round(time.perf_counter() - t, 4)
    t = time.perf_counter()
    n_spans = len(spec.fields.spans)
    pieces = [episode_pieces(ep, n_spans) for ep in read.episodes]
    flat = [p[0] for ps in pieces for p in ps if p[1] >= 0]
    encoded_flat = text.encode_many(flat)
    lossless = _lossless_pieces(text, flat, encoded_flat)
    by_src = {s.display: s for s in sources}
    kept: list[tuple[Episode, Laid, int]] = []  # (episode, tokens, turns kept)
    at = 0
    max_tokens = spec.sequences.max_tokens
    for ep, ps in zip(read.episodes, pieces):
        n_var = sum(1 for p in ps if p[1] >= 0)
        enc_iter = iter(encoded_flat[at : at + n_var])
        at += n_var
        encoded = [next(enc_iter) if p[1] >= 0 else [] for p in ps]
        try:
            laid = lay_out(ep, ps, encoded, text, n_spans)
            _check_teacher_ids(laid, text.vocab_size)
        except _TeacherMismatch as e:
            rejected.append(reject(ep, TEACHER_MISMATCH, str(e)))
            by_src[ep.file].quarantined += 1
            continue
        n_turns = len(ep.turns)
        if len(laid.ids) > max_tokens:
            n_turns = cut_at_turn(laid, ep, max_tokens) if spec.sequences.truncate == "turn" else 0
            if n_turns == 0:
                how = (
                    "no whole policy turn fits"
                    if spec.sequences.truncate == "turn"
                    else "set sequences.max_tokens higher, or truncate: turn"
                )
                rejected.append(
                    reject(
                        ep,
                        TOO_LONG,
                        f"{len(laid.ids)} tokens > sequences.max_tokens {max_tokens}; {how}",
                    )
                )
                by_src[ep.file].quarantined += 1
                continue
        kept.append((ep, laid, n_turns))
    timings["tokenize"] = round(time.perf_counter() - t, 4)
    write_quarantine(spec.name, staging, out, sources, rejected, max_bad_fraction, "episodes")
    if not kept:
        raise BuildError(_nothing_kept(spec_path, sources, rejected))
    t = time.perf_counter()
    cols = _columns(kept, spec)
    tables = {SEQUENCES_ARROW: cols.sequences_table(), TURNS_ARROW: cols.turns_table()}
    if spec.store.format == "arrow":
        for name, table in tables.items():
            write_arrow_table(table, staging / name)
        data_files = [SEQUENCES_ARROW, TURNS_ARROW]
    else:
        write_zarr(tables, staging / ZARR_GROUP)
        data_files = []
    shutil.copyfile(spec_path, staging / SPEC_COPY)
    digests = {name.removesuffix(".arrow"): table_digests(tb) for name, tb in tables.items()}
    timings["write"] = round(time.perf_counter() - t, 4)
    tok_bytes = (staging / TOKENIZER_JSON).read_bytes()
    data_files += [TOKENIZER_JSON, f"{TOKENIZER_DIR}/tokenizer_config.json", QUARANTINE]
    label_names = spec.label_names
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "name": spec.name,
        "store_format": spec.store.format,
        "spec": spec.to_dict(),
        "spec_sha256": spec.sha256(),
        "spec_file": str(spec_path),
        "build_key": build_key(build_key_parts(spec.sha256(), tok_sha), sources),
        "sources": [s.manifest_entry(format="jsonl") for s in sources],
        "labels": label_names,
        "span_patterns": {s.name: s.pattern for s in spec.fields.spans if s.pattern is not None},
        "policy_roles": list(spec.fields.policy_roles),
        "sequences": {
            "max_tokens": max_tokens,
            "truncate": spec.sequences.truncate,
            "longest": int(np.diff(cols.offsets).max()),
            "teacher_topk": cols.teacher_k,
        },
        "tokenizer": {
            "directory": TOKENIZER_DIR,
            "file": TOKENIZER_JSON,
            "sha256": sha256_hex(tok_bytes),
            "vocab_size": text.vocab_size,
            "pad_id": text.pad_id,
            "end_id": text.end_id,
            "template": text.template.to_dict(),
            **tok_origin,
        },
        "env": None if spec.env is None else {"id": spec.env.id, "kwargs": dict(spec.env.kwargs)},
        **_counts_and_statistics(kept, cols, rejected, sources, label_names, lossless),
        "content_hash": content_hash(
            digests, sha256_hex(tok_bytes), file_digest(staging / QUARANTINE)
        ),
        "table_digests": digests,
        "data_files": {
            f: {"sha256": file_digest(staging / f), "bytes": (staging / f).stat().st_size}
            for f in data_files
        },
        "timings": timings,
        "versions": versions("numpy", "pyarrow", "orjson", "zarr", "tokenizers"),
    }


def _check_teacher_ids(laid: Laid, vocab: int) -> None:
    for _, topk in laid.teacher:
        for i, _lp in topk:
            if not 0 <= i < vocab:
                raise _TeacherMismatch(
                    f"teacher token id {i} is outside the vocabulary (0..{vocab - 1})"
                )


def _lossless_pieces(text: SequenceText, pieces: list[str], encoded: list[list[int]]) -> int:
    """How many pieces do NOT decode back to their text (0 for a trained tokenizer)."""
    decoded = text.tokenizer.decode_batch(encoded, skip_special_tokens=False)
    return sum(1 for a, b in zip(pieces, decoded) if a != b)


def _columns(kept: list[tuple[Episode, Laid, int]], spec: SequenceSpec) -> Columns:
    lengths, ids, labels, turn_index = [], [], [], []
    t_role: list[str] = []
    t_policy, t_start, t_end, t_reward, n_turns, t_counts = [], [], [], [], [], []
    t_content: list[str] = []
    teacher_pos: list[tuple[int, list[tuple[int, float]]]] = []
    base = 0
    for ep, laid, n in kept:
        end = int(laid.turn_bounds[n - 1, 1]) if n < len(ep.turns) else len(laid.ids)
        lengths.append(end)
        ids.append(laid.ids[:end])
        labels.append(laid.labels[:end])
        turn_index.append(laid.turn_index[:end])
        teacher_pos += [(base + p, k) for p, k in laid.teacher if p < end]
        base += end
        n_turns.append(n)
        t_counts.append(n)
        for j, turn in enumerate(ep.turns[:n]):
            t_role.append(turn.role)
            t_policy.append(turn.policy)
            t_start.append(int(laid.turn_bounds[j, 0]))
            t_end.append(int(laid.turn_bounds[j, 1]))
            t_reward.append(turn.reward)
            t_content.append(turn.content)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    k = max((len(topk) for _, topk in teacher_pos), default=0)
    t_ids = t_lp = None
    if spec.fields.teacher is not None:
        k = max(k, 1)
        t_ids = np.full((total, k), -1, dtype=np.int32)
        t_lp = np.zeros((total, k), dtype=np.float32)
        for pos, topk in teacher_pos:
            for c, (i, lp) in enumerate(topk):
                t_ids[pos, c], t_lp[pos, c] = i, lp
    return Columns(
        episode_id=[ep.episode_id for ep, _, _ in kept],
        offsets=offsets,
        input_ids=np.concatenate(ids).astype(np.int32),
        labels=np.concatenate(labels).astype(np.int8),
        turn_index=np.concatenate(turn_index).astype(np.int16),
        outcome=np.array([ep.outcome for ep, _, _ in kept], dtype=np.float32),
        n_turns=np.array(n_turns, dtype=np.int32),
        truncated=np.array([n < len(ep.turns) for ep, _, n in kept], dtype=bool),
        turn_offsets=np.concatenate([[0], np.cumsum(t_counts)]).astype(np.int64),
        turn_role=t_role,
        turn_policy=np.array(t_policy, dtype=bool),
        turn_start=np.array(t_start, dtype=np.int64),
        turn_end=np.array(t_end, dtype=np.int64),
        turn_reward=np.array(t_reward, dtype=np.float32),
        turn_content=t_content,
        teacher_k=k if spec.fields.teacher is not None else 0,
        teacher_ids=t_ids,
        teacher_logprobs=t_lp,
    )


def _counts_and_statistics(
    kept: list[tuple[Episode, Laid, int]],
    cols: Columns,
    rejected: list[Rejected],
    sources: list[SourceFile],
    label_names: list[str],
    not_lossless: int,
) -> dict[str, Any]:
    lengths = np.diff(cols.offsets)
    per_label = np.bincount(cols.labels.astype(np.int64), minlength=len(label_names))
    outcome = cols.outcome[~np.isnan(cols.outcome)]
    counts = {
        "records": sum(s.records for s in sources),
        "records_kept": len(kept),
        "records_quarantined": len(rejected),
        "episodes": len(kept),
        "episodes_truncated": int(cols.truncated.sum()),
        "turns": int(len(cols.turn_policy)),
        "policy_turns": int(cols.turn_policy.sum()),
        "tokens": int(cols.offsets[-1]),
        "tokens_per_label": {n: int(c) for n, c in zip(label_names, per_label)},
        "trained_tokens": int(per_label[1:].sum()),
        "pieces_not_lossless": not_lossless,
    }
    return {
        "counts": counts,
        "quarantine_reasons": dict(sorted(Counter(r.reason for r in rejected).items())),
        "statistics": {
            "episode_tokens": distribution(lengths),
            "turns_per_episode": distribution(cols.n_turns),
            "outcome_mean": None if len(outcome) == 0 else round(float(outcome.mean()), 4),
            "return_mean": _mean_return(cols),
        },
    }


def _mean_return(cols: Columns) -> float | None:
    r = cols.turn_reward
    if len(r) == 0 or np.isnan(r).all():
        return None
    per_ep = np.add.reduceat(np.nan_to_num(r), cols.turn_offsets[:-1]) if len(r) else r
    v = float(per_ep.mean())
    return round(v, 4) if math.isfinite(v) else None


def _nothing_kept(
    spec_path: str | Path, sources: list[SourceFile], rejected: list[Rejected]
) -> str:
    n = sum(s.records for s in sources)
    reasons = dict(Counter(r.reason for r in rejected))
    return (
        f"{spec_path}: no episode could be kept from {n} records ({len(rejected)} quarantined: "
        f"{reasons}); nothing to store"
    )


# --------------------------------------------------------------------------- CLI summary


def summary_lines(result: Any) -> list[str]:
    """What ``python -m pipeline.build`` prints for a sequence store."""
    m = result.manifest
    c = m["counts"]
    if result.status == "up to date":
        return [
            f"{result.path}: up to date ({c['episodes']} episodes, {c['tokens']} tokens); --force rebuilds"
        ]
    per = ", ".join(f"{k} {v}" for k, v in c["tokens_per_label"].items())
    lines = [
        f"{result.path}: built in {result.seconds:.2f}s",
        f"  records    {c['records']:>8}  = kept {c['records_kept']} + quarantined {c['records_quarantined']}",
        f"  episodes   {c['episodes']:>8}  ({c['turns']} turns, {c['policy_turns']} of the policy; "
        f"{c['episodes_truncated']} cut at a turn)",
        f"  tokens     {c['tokens']:>8}  ({per})",
        f"  tokenizer  {m['tokenizer']['vocab_size']:>8}  tokens ({m['tokenizer']['source']}, "
        f"{m['tokenizer']['template']['kind']} template)",
    ]
    return lines + quarantine_summary(m, result.path)
