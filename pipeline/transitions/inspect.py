"""What a transition store holds, at a glance (``python -m pipeline.inspect STORE``).

Counts, spaces, per-feature statistics, the return and episode-length distributions,
where the data came from, and why records were quarantined (with one example each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.arrowio import read_manifest
from pipeline.report import hist_lines, quarantine_lines
from pipeline.transitions.layout import PARTS_KEY, TRANSITION_PARTS
from pipeline.transitions.store import TransitionStore


def describe(path: str | Path) -> str:
    """What a transition store holds, at a glance (``python -m pipeline.inspect STORE``)."""
    p = Path(path)
    m = read_manifest(p)
    store = TransitionStore(p)
    c = m["counts"]
    lines: list[str] = [
        f"store        {p}  ({m['store_format']}, format_version {m['format_version']})",
        f"name         {m['name']}   content {m['content_hash'][:16]}",
        f"records      {c['records']} read = {c['records_kept']} kept + {c['records_quarantined']} quarantined",
        f"episodes     {c['episodes']}  ({c['episodes_terminated']} terminated, {c['episodes_truncated']} truncated)",
        f"transitions  {c['transitions']}",
    ]
    parts = m.get(PARTS_KEY)
    if parts:
        lines.append(
            f"  in {len(parts['parts'])} parts of up to {parts['part_rows']} rows "
            f"({TRANSITION_PARTS}/part-NNNNN.arrow)"
        )
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
    named = m["statistics"].get("reward_columns", {})
    for name, entry in m.get("reward_columns", {}).items():
        r = named[name]
        lines.append(
            f"  {entry['column']:<20} mean {r['mean']:>10.4g}  std {r['std']:>10.4g}  "
            f"min {r['min']:>10.4g}  max {r['max']:>10.4g}  (fields.rewards.{name}: {entry['path']})"
        )
    refs: dict[str, Any] | None = m["spec"].get("reference_returns")
    e = store.episodes
    lines.append(
        "episode return"
        + (f"  (reference: random {refs['random']}, expert {refs['expert']})" if refs else "")
    )
    lines += hist_lines(e.returns)
    lines.append("episode length")
    lines += hist_lines(e.length.astype(np.float64))
    lines.append("sources")
    for s in m["sources"]:
        lines.append(
            f"  {s['path']}  {s['records']} records, {s['records_quarantined']} quarantined, sha256 {str(s['sha256'])[:12]}"
        )
    q = quarantine_lines(p)
    lines.append("quarantine" + ("" if q else "   none"))
    lines += q
    return "\n".join(lines)
