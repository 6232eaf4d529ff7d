"""What a segment store holds, at a glance (``python -m pipeline.inspect STORE``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import orjson

from pipeline.report import hist_lines
from pipeline.segments.store import open_segment_store


def describe(path: str | Path) -> str:
    """What a segment store holds, at a glance (``python -m pipeline.inspect STORE``)."""
    store = open_segment_store(path)
    m = store.manifest
    c = m["counts"]
    s = m["segments"]
    t = m["tokenizer"]
    ex = store.examples
    lines = [
        f"store        {path}  (segments, arrow, format_version {m['format_version']})",
        f"name         {m['name']}   content {m['content_hash'][:16]}",
        f"records      {c['records']} read = {c['records_kept']} kept + {c['records_quarantined']} quarantined",
        f"examples     {c['examples']}  ({c['answerable']} answerable, {c['impossible']} unanswerable); "
        f"splits {c['examples_per_split']}",
        f"documents    {c['documents']}  ({c['document_tokens']} tokens)",
        f"segments     {c['segments']} rows  (max_tokens {s['max_tokens']}, stride {s['stride']}, "
        f"overlap {s['overlap']}, max_question_tokens {s['max_question_tokens']}; input_ids up to {s['input_width']})",
        f"tokenizer    {t['vocab_size']} tokens, {t['source']}, sha256 {t['sha256'][:12]}; specials {t['special_tokens']}",
        f"answers      {c['answers_in_no_segment']} in no single segment, {c['answers_not_token_aligned']} not on "
        f"token boundaries, {c['answers_with_unknown_tokens']} with unknown tokens; "
        f"{c['questions_truncated']} questions truncated",
        "segments per example",
        *hist_lines(ex.n_segments.astype(np.float64)),
        "document length (tokens)",
        *hist_lines(store.documents.n_tokens.astype(np.float64)),
        "segment holding the answer (answerable examples)",
        *hist_lines(ex.answer_segment[ex.answer_segment >= 0].astype(np.float64)),
        "sources",
    ]
    for src in m["sources"]:
        lines.append(
            f"  {src['path']}  {src['records']} records, {src['records_quarantined']} quarantined, "
            f"sha256 {str(src['sha256'])[:12]}"
        )
    reasons: Counter[str] = Counter()
    example: dict[str, str] = {}
    for line in store.quarantine_lines():
        rec = orjson.loads(line)
        reasons[rec["reason"]] += 1
        example.setdefault(rec["reason"], f"{rec['file']} {rec['location']}: {rec['detail']}")
    lines.append("quarantine" + ("" if reasons else "   none"))
    for reason, n in reasons.most_common():
        lines.append(f"  {reason:<24} {n:>8}")
        lines.append(f"      e.g. {example[reason]}")
    return "\n".join(lines)
