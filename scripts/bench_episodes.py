"""The synthetic logs several benchmarks build stores from: D4RL-like episodes of 17-float
observations and 6-float continuous actions, one episode per JSONL line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

OBS, ACT = 17, 6

# A transitions spec for write_episodes' lines (format it with name, path and store_extra).
SPEC = """
name: {name}
source: {{paths: ["{path}"], layout: episode_per_line, episode_key: episode, steps_key: steps}}
fields:
  observation: {{path: obs, shape: [17]}}
  action: {{path: act, type: continuous, shape: [6], low: -1.0, high: 1.0}}
  reward: {{path: rew}}
  terminated: {{path: terminal}}
  truncated: {{path: timeout}}
  final_observation: {{path: last_obs}}
store: {{format: arrow, discount: 0.99{store_extra}}}
"""


def write_episodes(
    path: Path, n_steps: int, ep_len: int, seed: int = 0, *, cut_off_every: int | None = None
) -> None:
    """Episodes of ``ep_len`` steps (``n_steps // ep_len`` of them), one per line: every
    third terminated, the others truncated with a final observation; with
    ``cut_off_every`` K, truncated episode ``e`` with ``e % K == 1`` has none (the build
    drops its last step)."""
    rng = np.random.default_rng(seed)
    with path.open("wb") as f:
        for e in range(max(1, n_steps // ep_len)):
            obs = np.round(rng.normal(size=(ep_len + 1, OBS)), 4).tolist()
            act = np.round(np.clip(rng.normal(size=(ep_len, ACT)), -1, 1), 4).tolist()
            rew = np.round(rng.normal(size=ep_len), 4).tolist()
            term = e % 3 == 0
            steps = [
                {"obs": obs[t], "act": act[t], "rew": rew[t], "terminal": term and t == ep_len - 1,
                 "timeout": not term and t == ep_len - 1}
                for t in range(ep_len)
            ]  # fmt: skip
            line: dict[str, Any] = {"episode": f"ep-{e:06d}", "steps": steps}
            if term or cut_off_every is None or e % cut_off_every != 1:
                line["last_obs"] = obs[-1]
            f.write(orjson.dumps(line))
            f.write(b"\n")
