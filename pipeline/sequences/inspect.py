"""What a sequence store holds, at a glance (``python -m pipeline.inspect STORE``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.report import hist_lines, quarantine_lines
from pipeline.sequences.store import open_sequence_store


def describe(path: str | Path) -> str:
    """Counts, tokens per span kind, turns per episode, the length histogram, sources and
    the quarantine of a sequence store."""
    store = open_sequence_store(path)
    m = store.manifest
    c = m["counts"]
    t = m["tokenizer"]
    names = store.label_names
    per_label = np.bincount(store.labels.astype(np.int64), minlength=len(names))
    total = max(int(per_label.sum()), 1)
    n_ep = max(store.n_episodes, 1)
    lines = [
        f"store        {path}  (sequences, {store.format}, format_version {m['format_version']})",
        f"name         {m['name']}   content {m['content_hash'][:16]}",
        f"records      {c['records']} read = {c['records_kept']} kept + {c['records_quarantined']} quarantined",
        f"episodes     {c['episodes']}  ({c['turns']} turns, {c['policy_turns']} of the policy "
        f"{m['policy_roles']}; {c['episodes_truncated']} cut at a turn)",
        f"tokens       {c['tokens']}  (longest {m['sequences']['longest']}, max_tokens "
        f"{m['sequences']['max_tokens']}, truncate {m['sequences']['truncate']})",
        f"tokenizer    {t['vocab_size']} tokens, {t['source']}, {t['template']['kind']} template, "
        f"sha256 {t['sha256'][:12]}; pad {t['pad_id']}, end {t['end_id']}",
        f"environment  {m['env']['id'] if m.get('env') else 'none'}",
        "tokens per label (code name: tokens, share, per episode)",
    ]
    for code, (name, n) in enumerate(zip(names, per_label)):
        lines.append(f"  {code:>2} {name:<12} {int(n):>10}  {n / total:6.1%}  {n / n_ep:8.1f}")
    lines += [
        "turns per episode",
        *hist_lines(store.n_turns.astype(np.float64)),
        "episode length (tokens)",
        *hist_lines(store.lengths.astype(np.float64)),
        "sources",
    ]
    for src in m["sources"]:
        lines.append(
            f"  {src['path']}  {src['records']} records, {src['records_quarantined']} quarantined, "
            f"sha256 {str(src['sha256'])[:12]}"
        )
    q = quarantine_lines(store.path)
    lines.append("quarantine" + ("" if q else "   none"))
    return "\n".join(lines + q)
