"""``python -m pipeline.inspect STORE``: what a store holds, at a glance.

Counts, spaces, per-feature statistics, the return and episode-length distributions,
where the data came from, and why records were quarantined (with one example each).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.format import QUARANTINE, StoreError
from pipeline.store import read_manifest


def _hist(values: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
    if len(values) == 0:
        return ["  (none)"]
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return [f"  {lo:>12.4g} | {'#' * width} {len(values)}"]
    counts, edges = np.histogram(values, bins=bins)
    top = max(int(counts.max()), 1)
    return [
        f"  {edges[i]:>12.4g} .. {edges[i + 1]:<12.4g} | {'#' * max(int(round(width * c / top)), 1 if c else 0):<{width}} {c}"
        for i, c in enumerate(counts)
    ]


def _quarantine_summary(path: Path, examples: int = 1) -> list[str]:
    q = path / QUARANTINE
    if not q.exists():
        return []
    reasons: Counter[str] = Counter()
    seen: dict[str, list[str]] = {}
    with q.open("r", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            reasons[rec["reason"]] += 1
            if len(seen.setdefault(rec["reason"], [])) < examples:
                seen[rec["reason"]].append(f"{rec['file']}:{rec['line']}: {rec['detail']}")
    out = []
    for reason, n in reasons.most_common():
        out.append(f"  {reason:<24} {n:>8}")
        out += [f"      e.g. {ex}" for ex in seen[reason]]
    return out


def describe(path: str | Path) -> str:
    p = Path(path)
    m = read_manifest(p)
    if m.get("kind") == "segments":
        from pipeline import segments

        return segments.describe(p)
    if m.get("kind") != "transitions":
        return json.dumps({k: m[k] for k in ("name", "kind", "counts") if k in m}, indent=2)
    from pipeline.store import TransitionStore

    store = TransitionStore(p)
    c = m["counts"]
    lines: list[str] = [
        f"store        {p}  ({m['store_format']}, format_version {m['format_version']})",
        f"name         {m['name']}   content {m['content_hash'][:16]}",
        f"records      {c['records']} read = {c['records_kept']} kept + {c['records_quarantined']} quarantined",
        f"episodes     {c['episodes']}  ({c['episodes_terminated']} terminated, {c['episodes_truncated']} truncated)",
        f"transitions  {c['transitions']}",
    ]
    for key in (
        "truncated_last_steps_dropped",
        "episodes_without_end_flag_as_truncated",
        "episodes_both_flags_as_terminated",
        "terminal_next_observation_repeated",
    ):
        if c.get(key):
            lines.append(f"  {key.replace('_', ' ')}: {c[key]}")
    o = m["observation_space"]
    lines.append(f"observation  float32[{o['dim']}]")
    st = m["statistics"]["observation"]
    for i, label in enumerate(o["labels"]):
        lines.append(
            f"  {label:<20} mean {st['mean'][i]:>10.4g}  std {st['std'][i]:>10.4g}  min {st['min'][i]:>10.4g}  max {st['max'][i]:>10.4g}"
        )
    a = m["action_space"]
    if a["type"] == "discrete":
        counts = np.bincount(store.actions, minlength=a["n"])
        lines.append(f"action       discrete, n={a['n']}; counts {counts.tolist()}")
    else:
        lines.append(f"action       continuous[{a['dim']}], low {a['low']}, high {a['high']}")
    r = m["statistics"]["reward"]
    lines.append(
        f"reward       mean {r['mean']:.4g}  std {r['std']:.4g}  min {r['min']:.4g}  max {r['max']:.4g}"
    )
    refs: dict[str, Any] | None = m["spec"].get("reference_returns")
    e = store.episodes
    lines.append(
        "episode return"
        + (f"  (reference: random {refs['random']}, expert {refs['expert']})" if refs else "")
    )
    lines += _hist(e.returns)
    lines.append("episode length")
    lines += _hist(e.length.astype(np.float64))
    lines.append("sources")
    for s in m["sources"]:
        lines.append(
            f"  {s['path']}  {s['records']} records, {s['records_quarantined']} quarantined, sha256 {str(s['sha256'])[:12]}"
        )
    q = _quarantine_summary(p)
    lines.append("quarantine" + ("" if q else "   none"))
    lines += q
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.inspect", description="Describe a store.")
    ap.add_argument("store")
    args = ap.parse_args(argv)
    try:
        print(describe(args.store))
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
