"""Benchmark ``pipeline.build`` against the parse floor and a plain Python loop, in one run.

    python scripts/bench_build.py [--steps 1000000] [--big-steps 4000000] [--quick]

Generates JSONL of episodes with 17-float observations and 6-float actions in both
layouts (one episode per line, one step per line), then times, on the same files:

* the raw floor: read the bytes; the parse floor: ``orjson.loads`` of every line;
* the style this replaces: ``json.loads`` per line and a Python loop building one dict
  per transition (timed on a prefix of the file and reported as steps/s);
* ``pipeline.build`` in a fresh subprocess (wall time and its peak RSS).

Peak RSS is measured again at ``--big-steps`` to show it does not grow with the input.
Ratios are what to read (the machine is noisy); targets: build >= 5x the json.loads
loop, <= 2x the orjson parse floor, peak RSS at 4M <= 1.5x that at 1M and < 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

OBS, ACT, EP_LEN = 17, 6, 1000


def _episodes(
    n_steps: int, seed: int = 0
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, bool]]:
    rng = np.random.default_rng(seed)
    n_eps = max(1, n_steps // EP_LEN)
    for e in range(n_eps):
        obs = rng.normal(size=(EP_LEN + 1, OBS))
        act = np.clip(rng.normal(size=(EP_LEN, ACT)), -1, 1)
        rew = rng.normal(size=EP_LEN)
        yield f"ep-{e:06d}", obs, act, rew, bool(e % 3 == 0)


def write_episode_per_line(path: Path, n_steps: int) -> None:
    with path.open("wb") as f:
        for eid, obs, act, rew, term in _episodes(n_steps):
            steps = [
                {"obs": obs[t].tolist(), "act": act[t].tolist(), "rew": float(rew[t]),
                 "terminal": bool(term and t == EP_LEN - 1), "timeout": bool(not term and t == EP_LEN - 1)}
                for t in range(EP_LEN)
            ]  # fmt: skip
            f.write(
                orjson.dumps({"episode": eid, "steps": steps, "last_obs": obs[EP_LEN].tolist()})
                + b"\n"
            )


def write_step_per_line(path: Path, n_steps: int) -> None:
    with path.open("wb") as f:
        for eid, obs, act, rew, term in _episodes(n_steps):
            lines = []
            for t in range(EP_LEN):
                rec = {"ep": eid, "t": t, "obs": obs[t].tolist(), "act": act[t].tolist(), "rew": float(rew[t]),
                       "terminal": bool(term and t == EP_LEN - 1), "timeout": bool(not term and t == EP_LEN - 1)}  # fmt: skip
                if t == EP_LEN - 1:
                    rec["last_obs"] = obs[EP_LEN].tolist()
                lines.append(orjson.dumps(rec))
            f.write(b"\n".join(lines) + b"\n")


SPEC = """
name: {name}
source: {{paths: ["{path}"], layout: {layout}, episode_key: {ek}, {sk}}}
fields:
  observation: {{path: obs, shape: [17]}}
  action: {{path: act, type: continuous, shape: [6], low: -1.0, high: 1.0}}
  reward: {{path: rew}}
  terminated: {{path: terminal}}
  truncated: {{path: timeout}}
  final_observation: {{path: last_obs}}
store: {{format: arrow, discount: 0.99}}
"""


def write_spec(d: Path, name: str, data: Path, layout: str) -> Path:
    if layout == "episode_per_line":
        text = SPEC.format(name=name, path=data, layout=layout, ek="episode", sk="steps_key: steps")
    else:
        text = SPEC.format(name=name, path=data, layout=layout, ek="ep", sk="step_key: t")
    p = d / f"{name}.yaml"
    p.write_text(text)
    return p


def time_read(path: Path) -> float:
    t0 = time.perf_counter()
    with path.open("rb") as f:
        while f.read(16 << 20):
            pass
    return time.perf_counter() - t0


def time_orjson(path: Path) -> float:
    t0 = time.perf_counter()
    with path.open("rb") as f:
        for line in f:
            orjson.loads(line)
    return time.perf_counter() - t0


def python_loop(path: Path, layout: str, max_steps: int) -> tuple[float, int]:
    """The hand-written loader style: json.loads and one dict per transition."""
    t0 = time.perf_counter()
    out: list[dict[str, Any]] = []
    n = 0
    with path.open("r") as f:
        if layout == "episode_per_line":
            for line in f:
                ep = json.loads(line)
                steps = ep["steps"]
                for t, s in enumerate(steps):
                    nxt = steps[t + 1]["obs"] if t + 1 < len(steps) else ep["last_obs"]
                    out.append({"episode": ep["episode"], "obs": list(map(float, s["obs"])), "action": list(map(float, s["act"])),
                                "reward": float(s["rew"]), "next_obs": list(map(float, nxt)),
                                "terminal": s["terminal"], "timeout": s["timeout"]})  # fmt: skip
                n += len(steps)
                if n >= max_steps:
                    break
        else:
            by_ep: dict[str, list[dict[str, Any]]] = {}
            for line in f:
                s = json.loads(line)
                by_ep.setdefault(s["ep"], []).append(s)
                n += 1
                if n >= max_steps:
                    break
            for steps in by_ep.values():
                steps.sort(key=lambda s: s["t"])
                for t, s in enumerate(steps):
                    nxt = steps[t + 1]["obs"] if t + 1 < len(steps) else s.get("last_obs", s["obs"])
                    out.append({"episode": s["ep"], "obs": list(map(float, s["obs"])), "action": list(map(float, s["act"])),
                                "reward": float(s["rew"]), "next_obs": list(map(float, nxt)),
                                "terminal": s["terminal"], "timeout": s["timeout"]})  # fmt: skip
    return time.perf_counter() - t0, n


def run_build(spec: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a fresh `python -m pipeline.build` process."""
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.build", str(spec), "--out", str(out), "--quiet"],
        cwd=Path(__file__).resolve().parent.parent,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build of {spec} failed")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--big-steps", type=int, default=4_000_000)
    ap.add_argument(
        "--loop-steps", type=int, default=200_000, help="prefix timed for the json.loads loop"
    )
    ap.add_argument("--quick", action="store_true", help="100k / 300k steps, for a smoke run")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.big_steps, args.loop_steps = 100_000, 300_000, 50_000
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[Any, ...]] = []
    try:
        for layout in ("episode_per_line", "step_per_line"):
            data = work / f"{layout}-{args.steps}.jsonl"
            if not data.exists():
                (write_episode_per_line if layout == "episode_per_line" else write_step_per_line)(
                    data, args.steps
                )
            steps = (args.steps // EP_LEN) * EP_LEN
            size = data.stat().st_size
            t_read = time_read(data)
            t_orjson = time_orjson(data)
            t_loop, loop_n = python_loop(data, layout, args.loop_steps)
            loop_rate = loop_n / t_loop
            spec = write_spec(work, f"bench-{layout}", data, layout)
            t_build, rss = run_build(spec, work / "stores")
            rows.append((layout, steps, size, t_read, t_orjson, loop_rate, t_build, rss))
            data_big = work / f"{layout}-{args.big_steps}.jsonl"
            if not data_big.exists():
                (write_episode_per_line if layout == "episode_per_line" else write_step_per_line)(
                    data_big, args.big_steps
                )
            spec_big = write_spec(work, f"bench-big-{layout}", data_big, layout)
            t_big, rss_big = run_build(spec_big, work / "stores")
            rows[-1] = rows[-1] + (t_big, rss_big, (args.big_steps // EP_LEN) * EP_LEN)
            data_big.unlink()
            shutil.rmtree(work / "stores", ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(
        f"pipeline.build benchmark ({os.cpu_count()} cores; obs {OBS}, action {ACT}, episodes of {EP_LEN})"
    )
    hdr = f"{'layout':<18}{'what':<34}{'steps/s':>12}{'vs build':>10}"
    print(hdr)
    print("-" * len(hdr))
    verdicts = []
    for (
        layout,
        steps,
        size,
        t_read,
        t_orjson,
        loop_rate,
        t_build,
        rss,
        t_big,
        rss_big,
        big_steps,
    ) in rows:
        build_rate = steps / t_build
        print(
            f"{layout:<18}{f'read bytes ({size / 2**20:.0f} MiB)':<34}{steps / t_read:>12,.0f}{t_build / t_read:>9.2f}x"
        )
        print(
            f"{'':<18}{'orjson.loads every line':<34}{steps / t_orjson:>12,.0f}{t_build / t_orjson:>9.2f}x"
        )
        print(
            f"{'':<18}{'json.loads + per-step dict loop':<34}{loop_rate:>12,.0f}{loop_rate / build_rate:>9.2f}x"
        )
        print(f"{'':<18}{f'pipeline.build ({steps:,} steps)':<34}{build_rate:>12,.0f}{1.0:>9.2f}x")
        print(f"{'':<18}{f'pipeline.build ({big_steps:,} steps)':<34}{big_steps / t_big:>12,.0f}")
        print(
            f"{'':<18}peak RSS: {rss:,.0f} MiB at {steps:,} steps, {rss_big:,.0f} MiB at {big_steps:,} ({rss_big / rss:.2f}x)"
        )
        verdicts += [
            (
                f"{layout}: build / json.loads loop >= 5x",
                build_rate / loop_rate,
                5.0,
                build_rate / loop_rate >= 5.0,
            ),
            (
                f"{layout}: build time / orjson parse <= 2x",
                t_build / t_orjson,
                2.0,
                t_build / t_orjson <= 2.0,
            ),
            (f"{layout}: peak RSS big / small <= 1.5x", rss_big / rss, 1.5, rss_big / rss <= 1.5),
            (f"{layout}: peak RSS big < 1024 MiB", rss_big, 1024, rss_big < 1024),
        ]
    print()
    print(f"{'target':<46}{'measured':>10}{'target':>10}  verdict")
    for name, value, target, ok in verdicts:
        print(f"{name:<46}{value:>10.2f}{target:>10.1f}  {'PASS' if ok else 'MISS'}")
    print(f"(benchmark process peak RSS {self_rss:,.0f} MiB)")


if __name__ == "__main__":
    main()
