"""Generate the agent demo data: episodes of the textgrid-v0 text environment, played by its
scripted teachers (trainer.envs), one episode per JSONL line.

Nothing is downloaded. Two teachers play (see :mod:`trainer.envs.textgrid`):

``planner``
    The planner rule (towards the goal, vertical before horizontal, a fixed fallback when
    both are blocked), which every map is drawn to let succeed: success rate 1.
``noisy``
    The same reasoning, but on about a third of its turns a wrong move (sometimes into a
    wall) and a conclusion to match: it fails clearly more often, which leaves a later RL
    stage something to improve.

Written under ``--out`` (default ``data/raw``), deterministically from ``--seed`` (a rerun
gives the same bytes), ``--per-file`` episodes a file::

    agent/planner-000.jsonl, agent/planner-001.jsonl, ...
    agent/noisy-000.jsonl, ...

One line per episode::

    {"id": "planner-000017", "teacher": "planner", "seed": 1000017, "task": PROMPT,
     "turns": [{"role": "assistant", "content": "<think>...</think>\\n<action>down</action>",
                "reward": -0.05},
               {"role": "env", "content": OBSERVATION, "reward": 0.0}, ...],
     "success": true, "return": 0.75}

Turns alternate ``assistant`` (with the step's reward) and ``env`` (the observation after
it). Episode seeds are ``(2 * seed + 1) * 1e6 + i`` for the planner and ``(2 * seed + 2) * 1e6
+ i`` for the noisy teacher: distinct between teachers and files, and never below 1e6,
where the trainer's online evaluation draws its seeds. Earlier ``planner-*.jsonl`` and
``noisy-*.jsonl`` files in ``agent/`` are removed first. The environment's settings are
its defaults, those ``data_specs/agent-*.yaml`` name under ``env.kwargs``.

Usage::

    python scripts/make_agent_data.py --out data/raw [--planner 4000] [--noisy 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trainer.envs import make_teacher, make_text_env, run_episode

ENV_ID = "textgrid-v0"
TEACHERS = ("planner", "noisy")
SEED_BLOCK = 1_000_000


def episode_seed(teacher: str, index: int, seed: int) -> int:
    """The environment seed of episode ``index`` of ``teacher`` (see the module docstring)."""
    return (2 * seed + 1 + TEACHERS.index(teacher)) * SEED_BLOCK + index


def record(teacher: str, index: int, seed: int) -> dict[str, Any]:
    """One episode of ``teacher`` as a JSONL record."""
    env_seed = episode_seed(teacher, index, seed)
    ep = run_episode(make_text_env(ENV_ID), make_teacher(ENV_ID, teacher, env_seed).act, env_seed)
    return {
        "id": f"{teacher}-{index:06d}",
        "teacher": teacher,
        "seed": env_seed,
        "task": ep["prompt"],
        "turns": ep["turns"],
        "success": ep["success"],
        "return": ep["return"],
    }


def write(out: Path, teacher: str, records: list[dict[str, Any]], per_file: int) -> list[Path]:
    """``records`` into ``out/agent/TEACHER-NNN.jsonl``, ``per_file`` a file."""
    paths = []
    for k, start in enumerate(range(0, len(records), per_file)):
        path = out / "agent" / f"{teacher}-{k:03d}.jsonl"
        lines = (
            json.dumps(r, separators=(",", ":")) + "\n" for r in records[start : start + per_file]
        )
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", default="data/raw", help="output directory (default data/raw)")
    ap.add_argument("--planner", type=int, default=4000, help="planner episodes (default 4000)")
    ap.add_argument("--noisy", type=int, default=2000, help="noisy episodes (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-file", type=int, default=1000, help="episodes a file (default 1000)")
    args = ap.parse_args(argv)
    counts = {"planner": args.planner, "noisy": args.noisy}
    for name, n in counts.items():
        if not 0 <= n < SEED_BLOCK:
            print(f"error: --{name} must be in 0..{SEED_BLOCK - 1}, got {n}", file=sys.stderr)
            return 2
    if args.per_file < 1:
        print(f"error: --per-file must be at least 1, got {args.per_file}", file=sys.stderr)
        return 2
    if args.seed < 0:
        print(f"error: --seed must be >= 0, got {args.seed}", file=sys.stderr)
        return 2
    out = Path(args.out)
    agent = out / "agent"
    agent.mkdir(parents=True, exist_ok=True)
    for teacher in TEACHERS:
        for old in sorted(agent.glob(f"{teacher}-*.jsonl")):
            old.unlink()
    parts, chars = [], []
    for teacher in TEACHERS:
        records = [record(teacher, i, args.seed) for i in range(counts[teacher])]
        files = write(out, teacher, records, args.per_file)
        chars += [len(r["task"]) + sum(len(t["content"]) for t in r["turns"]) for r in records]
        if records:
            wins = sum(r["success"] for r in records) / len(records)
            ret = sum(r["return"] for r in records) / len(records)
            parts.append(
                f"{teacher} {len(records)} episodes in {len(files)} files, success "
                f"{100 * wins:.1f}%, return mean {ret:.3f}"
            )
    mean = sum(chars) / len(chars) if chars else 0.0
    print(
        f"{agent}: {'; '.join(parts) or 'no episodes'}; characters per episode mean "
        f"{mean:.0f}, max {max(chars, default=0)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
