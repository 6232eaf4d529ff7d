"""Verify a sequence store: file digests, the content hash, and every rule of the layout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.arrowio import data_file_problems, file_digest, read_manifest
from pipeline.format import QUARANTINE
from pipeline.segments.build import table_digests
from pipeline.segments.verify import digest_problems
from pipeline.sequences.build import content_hash
from pipeline.sequences.layout import CONTEXT, PROMPT_TURN, TOKENIZER_JSON
from pipeline.sequences.store import SequenceStore, open_sequence_store, store_tables

MAX_LISTED = 5  # problems listed per rule before "... and N more"


def verify(path: str | Path) -> list[str]:
    """Problems found in a sequence store (empty: it verifies)."""
    p = Path(path)
    manifest = read_manifest(p)
    problems = data_file_problems(p, manifest)
    if problems:
        return problems
    store = open_sequence_store(p)
    digests = {name: table_digests(t) for name, t in store_tables(store).items()}
    content = content_hash(digests, file_digest(p / TOKENIZER_JSON), file_digest(p / QUARANTINE))
    problems += digest_problems(p, manifest, digests, content)
    problems += [f"{p}: {msg}" for msg in check_invariants(store)]
    return problems


def ok_line(path: str | Path, manifest: dict[str, Any]) -> str:
    """What ``python -m pipeline.verify`` prints for a sequence store that verifies."""
    c = manifest["counts"]
    return (
        f"OK {path}: {c['episodes']} episodes, {c['turns']} turns, {c['tokens']} tokens, "
        f"content {manifest['content_hash'][:16]} (manifest.json verified)"
    )


def _listed(rule: str, bad: list[str]) -> list[str]:
    if not bad:
        return []
    more = f" ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return [f"{rule}: {'; '.join(bad[:MAX_LISTED])}{more}"]


def check_invariants(store: SequenceStore) -> list[str]:
    """The layout's rules, one group at a time (see docs/FORMAT.md, "Sequence store")."""
    problems = _check_offsets(store)
    if problems:
        return problems
    problems += _check_turns(store)
    if problems:
        return problems
    return _check_labels(store) + _check_spans(store)


def _check_offsets(store: SequenceStore) -> list[str]:
    o = store.offsets
    bad = []
    if o[0] != 0 or np.any(np.diff(o) <= 0):
        bad.append("offsets must start at 0 and grow (no empty episode)")
    if o[-1] != len(store.input_ids) or len(store.labels) != len(store.input_ids):
        bad.append(
            f"{len(store.input_ids)} ids, {len(store.labels)} labels, offsets end at {o[-1]}"
        )
    if len(store.turn_index) != len(store.input_ids):
        bad.append("turn_index has not one entry per token")
    if not np.array_equal(np.diff(o), store.lengths):
        bad.append("length differs from the offsets")
    if store.manifest["counts"]["tokens"] != len(store.input_ids):
        bad.append("counts.tokens differs from the tokens stored")
    return _listed("episodes", bad)


def _check_turns(store: SequenceStore) -> list[str]:
    """Turns tile each episode after its prompt, in order, and turn_index says so."""
    t = store.turns
    to = store.turn_offsets
    bad = []
    if to[-1] != len(t):
        return [f"turns: n_turns sums to {to[-1]}, turns.arrow has {len(t)} rows"]
    for i in range(store.n_episodes):
        a, b = int(store.offsets[i]), int(store.offsets[i + 1])
        ti = store.turn_index[a:b]
        rows = range(int(to[i]), int(to[i + 1]))
        starts = t.token_start[rows.start : rows.stop]
        ends = t.token_end[rows.start : rows.stop]
        if len(starts) == 0:
            bad.append(f"episode {i} has no turn")
            continue
        prompt = int(starts[0])
        ok = (
            prompt > 0
            and np.all(ti[:prompt] == PROMPT_TURN)
            and np.array_equal(starts[1:], ends[:-1])
            and ends[-1] == b - a
            and np.all(t.episode[rows.start : rows.stop] == i)
        )
        if ok:
            expect = np.repeat(np.arange(len(starts)), ends - starts)
            ok = np.array_equal(ti[prompt:], expect)
        if not ok:
            bad.append(f"episode {i} ({store.episode_ids[i]}): turns do not tile the tokens")
    return _listed("turns", bad)


def _check_labels(store: SequenceStore) -> list[str]:
    """Labels in range; context on the prompt, on other roles' turns and on each header;
    every policy turn trains at least one span token."""
    n_labels = len(store.label_names)
    bad = []
    lab = store.labels
    if lab.min(initial=0) < 0 or lab.max(initial=0) >= n_labels:
        bad.append(f"label codes outside 0..{n_labels - 1}")
    t = store.turns
    for r in range(len(t)):
        e = int(t.episode[r])
        a = int(store.offsets[e])
        seg = lab[a + int(t.token_start[r]) : a + int(t.token_end[r])]
        if not t.policy[r] and np.any(seg != CONTEXT):
            bad.append(f"turn {r} ({t.role[r]}) is not a policy turn but has trained tokens")
        elif t.policy[r] and (seg[0] != CONTEXT or not np.any((seg > 0) & (seg < n_labels - 1))):
            bad.append(f"policy turn {r}: no span token, or a trained header")
    for e in range(store.n_episodes):
        a = int(store.offsets[e])
        if lab[a] != CONTEXT:
            bad.append(f"episode {e}: its prompt is trained")
    return _listed("labels", bad)


def _check_spans(store: SequenceStore) -> list[str]:
    """Decoding the tokens of each span gives back the span's text (regex spans, with a
    lossless tokenizer)."""
    if store.manifest["counts"].get("pieces_not_lossless", 0):
        return []
    patterns = store.span_patterns
    names = store.label_names
    text = store.text()
    compiled = {names.index(n): re.compile(p, re.DOTALL) for n, p in patterns.items()}
    t = store.turns
    bad = []
    for r in np.flatnonzero(t.policy):
        e = int(t.episode[r])
        a = int(store.offsets[e])
        ids = store.input_ids[a + int(t.token_start[r]) : a + int(t.token_end[r])]
        lab = store.labels[a + int(t.token_start[r]) : a + int(t.token_end[r])]
        for code, rx in compiled.items():
            want = [m.group(1) for m in rx.finditer(t.content[r]) if m.group(1)]
            got = [text.decode(ids[s:f].tolist()) for s, f in runs(lab, code)]
            if got != want:
                bad.append(f"turn {r}: {names[code]} decodes to {got!r}, the source has {want!r}")
    return _listed("spans", bad)


def runs(labels: np.ndarray, code: int) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of ``code`` in ``labels``."""
    on = np.concatenate([[False], labels == code, [False]])
    d = np.flatnonzero(on[1:] != on[:-1])
    return list(zip(d[::2].tolist(), d[1::2].tolist()))
