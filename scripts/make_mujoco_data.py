"""Generate D4RL-style Hopper-v5 logs locally, from behaviour policies of mixed quality.

Needs MuJoCo: ``pip install -e ".[mujoco]"`` (``make setup`` installs it). Nothing is
downloaded: every episode is rolled out here, deterministically from ``--seed``.

``OUT/hopper/episodes.jsonl.gz``
    Hopper-v5, ONE EPISODE PER LINE, gzip-compressed. Line: ``{"episode", "policy",
    "steps": [{"observation": [11], "action": [3], "reward", "terminal", "timeout"}, ...],
    "final_observation": [11]}``. gymnasium's flags are kept apart as D4RL's ``terminals``
    and ``timeouts`` should have been: ``terminal`` is true on the last step of an episode
    in which the hopper fell (unhealthy), ``timeout`` on the last step of one cut by the time
    limit (``--max-episode-steps``, 1000 by default as in D4RL).

Behaviour (the hopper's joints are held by a PD controller; none of them hops):

- ``stand-sigma0.1``: PD on the three joints with Gaussian action noise 0.1; it stands
  until the time limit (about 1 per step, the healthy reward);
- ``weak``: a soft, under-damped PD that sways and falls after several hundred steps;
- ``wrong-torso``: the torso's pitch fed back to the hip with the wrong sign: it falls
  within a few hundred steps;
- ``random``: uniform actions; it falls within a few dozen steps.

The script prints the episodes, steps and average return of each behaviour policy, and the
reference returns used for d4rl-style normalized scores, ``100 * (R - random) / (expert -
random)``: the random policy and the noiseless standing controller over fixed evaluation
seeds (independent of ``--seed``), and the whole behaviour dataset. They are also written to
``OUT/hopper/reference_returns.json``, keyed by env id.

Usage::

    python scripts/make_mujoco_data.py --out data/raw [--seed 0] [--episodes 40]
        [--max-episode-steps 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import orjson

# scripts/ is on sys.path when this file runs as a script
from make_demo_data import Behaviour, Episode, References, rollout, split_counts, write_bytes
from make_demo_data import collect as demo_collect
from numpy.typing import NDArray

ENV_ID = "Hopper-v5"
EPISODES = 40
MAX_EPISODE_STEPS = 1000  # Hopper-v5's own time limit, as in D4RL
REFERENCE_EPISODES = 10  # evaluation episodes per reference policy
REFERENCE_SEED = 1_000_000  # evaluation seeds: REFERENCE_SEED + i, independent of --seed
OUT_NAME = "hopper"
INSTALL_HINT = 'pip install -e ".[mujoco]" (or run `make setup`)'

Obs = NDArray[np.float32]
Action = NDArray[np.float32]


# --------------------------------------------------------------------------- policies


def hopper_pd(
    kp: float = 2.0, kd: float = 0.3, k_torso: float = 0.0, sigma: float = 0.0
) -> Callable[[Obs, np.random.Generator], Action]:
    """Torques ``-kp q - kd q'`` on (thigh, leg, foot), plus ``k_torso * pitch`` at the hip.

    Hopper-v5's observation is ``[z, pitch, q_thigh, q_leg, q_foot, v_x, v_z, pitch',
    q'_thigh, q'_leg, q'_foot]``; the action is the three joint torques in [-1, 1]. A
    positive ``k_torso`` pushes the torso further the way it leans (the wrong sign).
    ``sigma`` adds N(0, sigma^2) to each torque before the clip (what gets logged).
    """

    def act(obs: Obs, rng: np.random.Generator) -> Action:
        q, dq = obs[2:5], obs[8:11]
        u = -kp * q - kd * dq
        u[0] += k_torso * obs[1]
        if sigma:
            u = u + sigma * rng.normal(size=3)
        return np.clip(u, -1.0, 1.0).astype(np.float32)

    return act


def hopper_random(obs: Obs, rng: np.random.Generator) -> Action:
    return rng.uniform(-1.0, 1.0, size=3).astype(np.float32)


hopper_expert = hopper_pd()  # stands still: the healthy reward at every step

HOPPER_BEHAVIOURS = (
    Behaviour("stand-sigma0.1", 0.25, hopper_pd(sigma=0.1)),
    Behaviour("weak", 0.20, hopper_pd(kp=0.5, kd=0.05)),  # sways, then falls
    Behaviour("wrong-torso", 0.35, hopper_pd(k_torso=2.0)),  # tips itself over
    Behaviour("random", 0.20, hopper_random),
)


# --------------------------------------------------------------------------- rollouts


def make_env(max_episode_steps: int) -> gym.Env[Any, Any]:
    return gym.make(ENV_ID, max_episode_steps=max_episode_steps)


def collect(n_episodes: int, max_episode_steps: int, rng: np.random.Generator) -> list[Episode]:
    """Roll out ``n_episodes`` split between the behaviours by share, ids in rollout order."""
    counts = split_counts(n_episodes, [b.share for b in HOPPER_BEHAVIOURS])
    width = max(3, len(str(sum(counts) - 1)))
    return demo_collect(
        ENV_ID, HOPPER_BEHAVIOURS, n_episodes, OUT_NAME, width, rng,
        max_episode_steps=max_episode_steps,
    )  # fmt: skip


def mean_return(policy: Any, max_episode_steps: int, n_episodes: int) -> float:
    """Average return over fixed evaluation seeds (the same for every ``--seed``)."""
    env = make_env(max_episode_steps)
    rng = np.random.default_rng(REFERENCE_SEED)
    returns = [rollout(env, policy, rng, seed=REFERENCE_SEED + i).ret for i in range(n_episodes)]
    env.close()
    return float(np.mean(returns))


def episode_line(ep: Episode) -> bytes:
    last = ep.length - 1
    steps = [
        {
            "observation": ep.observations[t],
            "action": ep.actions[t],
            "reward": ep.rewards[t],
            "terminal": t == last and ep.terminated,
            "timeout": t == last and ep.truncated,
        }
        for t in range(ep.length)
    ]
    row = {
        "episode": ep.episode_id,
        "policy": ep.policy,
        "steps": steps,
        "final_observation": ep.observations[-1],
    }
    return orjson.dumps(row)


# --------------------------------------------------------------------------- main


def report(episodes: Sequence[Episode], path: Path, refs: References, n_refs: int) -> None:
    steps = sum(ep.length for ep in episodes)
    print(f"{OUT_NAME}: {len(episodes)} episodes, {steps} steps -> {path}")
    for policy in dict.fromkeys(ep.policy for ep in episodes):
        mine = [ep for ep in episodes if ep.policy == policy]
        ret = float(np.mean([ep.ret for ep in mine]))
        ends = sum(ep.terminated for ep in mine), sum(ep.truncated for ep in mine)
        print(
            f"  {policy:<18} {len(mine):>4} episodes {sum(ep.length for ep in mine):>7} steps"
            f"  mean return {ret:9.2f}  (normalized {refs.normalized(ret):6.1f})"
            f"  {ends[0]} fell, {ends[1]} timed out"
        )
    print(
        f"  reference returns: random {refs.random:.2f}, expert {refs.expert:.2f}, "
        f"behaviour {refs.behaviour:.2f}  (over {n_refs} evaluation episodes)"
    )


def generate(
    out: Path, seed: int, n_episodes: int, max_episode_steps: int, n_refs: int
) -> References:
    """Write ``OUT/hopper/episodes.jsonl.gz`` and its reference returns; returns them."""
    episodes = collect(n_episodes, max_episode_steps, np.random.default_rng(seed))
    path = out / OUT_NAME / "episodes.jsonl.gz"
    write_bytes(path, [episode_line(ep) for ep in episodes])
    refs = References(
        random=mean_return(hopper_random, max_episode_steps, n_refs),
        expert=mean_return(hopper_expert, max_episode_steps, n_refs),
        behaviour=float(np.mean([ep.ret for ep in episodes])),
    )
    report(episodes, path, refs, n_refs)
    summary = {ENV_ID: {**vars(refs), "max_episode_steps": max_episode_steps}}
    (out / OUT_NAME / "reference_returns.json").write_text(json.dumps(summary, indent=2) + "\n")
    return refs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("data/raw"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for every rollout")
    parser.add_argument("--episodes", type=int, default=EPISODES, help="episodes to roll out")
    parser.add_argument(
        "--max-episode-steps",
        type=int,
        default=MAX_EPISODE_STEPS,
        help="the time limit: an episode still standing then ends with timeout=true",
    )
    parser.add_argument(
        "--reference-episodes",
        type=int,
        default=REFERENCE_EPISODES,
        help="evaluation episodes per reference policy (random, expert)",
    )
    args = parser.parse_args(argv)
    for name in ("episodes", "max_episode_steps", "reference_episodes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import mujoco  # noqa: F401  (Hopper-v5 needs it; fail here with the fix, not mid-run)
    except ImportError:
        print(
            f"error: {ENV_ID} needs MuJoCo, which is not installed: {INSTALL_HINT}", file=sys.stderr
        )
        return 2
    try:
        (args.out / OUT_NAME).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create output directory {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    generate(args.out, args.seed, args.episodes, args.max_episode_steps, args.reference_episodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
