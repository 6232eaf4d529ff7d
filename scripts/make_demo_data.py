"""Generate the demo trajectory logs locally, from behaviour policies of mixed quality.

Nothing is downloaded: every episode is rolled out here, deterministically from ``--seed``.
Three datasets are written under ``--out`` (default ``data/raw``), each in a different
JSONL layout so that every reader of ``pipeline.build`` is exercised:

``cartpole/part-0.jsonl, part-1.jsonl.gz, part-2.jsonl``
    CartPole-v1, ONE STEP PER LINE, the lines of every episode shuffled across the three
    files. Line: ``{"ep", "t", "state": [4], "action": 0|1, "reward", "terminated",
    "truncated"}``; the last step's line also has ``final_obs``, the observation after it.
    Behaviour: a minority of near-expert episodes (a PD controller on the pole, epsilon
    0.05); most come from controllers with systematic errors: one balances the pole but
    drifts off the track (cart feedback of the wrong sign), one holds the pole tilted, one
    reacts only to large tilts; plus a uniformly random policy.

``pendulum/episodes.jsonl.zst``
    Pendulum-v1, ONE EPISODE PER LINE, zstandard-compressed. Line: ``{"episode",
    "policy", "steps": [{"obs": {"cos", "sin", "vel"}, "act": [a], "rew", "upright",
    "terminal", "timeout"}, ...], "last_obs": {...}}``; ``upright`` is a second, shaped
    reward, the pole's height ``cos(theta)`` of the step's observation (1 at the top, -1
    hanging), for relabelling at training time. Behaviour: a minority of near-expert episodes
    (energy-shaping swing-up plus PD balance, Gaussian action noise 0.1); most come from
    controllers with systematic errors: the wrong sign of damping at the top (it swings up
    but topples off again), a "lazy" one at 0.4x torque (too weak to hold the top); plus a
    uniformly random policy. Actions are clipped to [-2, 2].

The errors of the sub-optimal controllers do not average out, so cloning the mixture is
clearly worse than its best episodes (as in D4RL's medium-replay / medium-expert data):
an offline RL method has to pick the good actions out of the data.

``replay/replays.jsonl``
    A toy turn-based game, one replay per line, with a composite action
    (``action_type`` 0 = move, ``action_target`` 0-3; 1 = switch, target 0-5). A win gives
    +1 on the last step (``done: true``), a loss -1; some logs are cut (no ``done``).
    A few deliberately bad lines sit at fixed positions so that the quarantine has work.

The script prints, per dataset, the episodes, steps and average return of each behaviour
policy, and per gymnasium environment the reference returns used for d4rl-style
normalized scores, ``100 * (R - random) / (expert - random)``: the random policy and the
noiseless scripted expert over fixed evaluation seeds (independent of ``--seed``), and the
whole behaviour dataset. They are also written to ``OUT/reference_returns.json``.

Usage::

    python scripts/make_demo_data.py --out data/raw [--seed 0] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import orjson
import zstandard
from numpy.typing import NDArray

Obs = NDArray[np.float32]
EnvAction = int | NDArray[np.float32]
Policy = Callable[[Obs, np.random.Generator], EnvAction]

CARTPOLE_EPISODES = 200
PENDULUM_EPISODES = 100
REPLAY_EPISODES = 300
REFERENCE_EPISODES = 50  # evaluation episodes per reference policy
REFERENCE_SEED = 1_000_000  # evaluation seeds: REFERENCE_SEED + i, independent of --seed
CARTPOLE_PARTS = ("part-0.jsonl", "part-1.jsonl.gz", "part-2.jsonl")
PENDULUM_MAX_TORQUE = 2.0


# --------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One gymnasium rollout: ``observations`` has one more entry than ``actions``."""

    episode_id: str
    policy: str
    observations: list[list[float]] = field(default_factory=list)  # (T + 1, obs_dim)
    actions: list[int | list[float]] = field(default_factory=list)  # (T,) or (T, act_dim)
    rewards: list[float] = field(default_factory=list)  # (T,)
    terminated: bool = False  # the last step really ended the episode
    truncated: bool = False  # the last step hit the time limit

    @property
    def length(self) -> int:
        return len(self.actions)

    @property
    def ret(self) -> float:
        return float(sum(self.rewards))


@dataclass(frozen=True)
class Behaviour:
    """A behaviour policy and its share of a dataset's episodes."""

    name: str
    share: float
    policy: Policy


def rollout(env: gym.Env[Any, Any], policy: Policy, rng: np.random.Generator, seed: int) -> Episode:
    """Run one episode; gymnasium's terminated / truncated flags are kept as they are."""
    ep = Episode(episode_id="", policy="")
    obs, _ = env.reset(seed=seed)
    ep.observations.append(np.asarray(obs, dtype=np.float32).tolist())
    while True:
        action = policy(obs, rng)
        obs, reward, terminated, truncated, _ = env.step(action)
        ep.actions.append(action if isinstance(action, int) else action.tolist())
        ep.rewards.append(float(reward))
        ep.observations.append(np.asarray(obs, dtype=np.float32).tolist())
        if terminated or truncated:
            # Both at once (the pole falls on the time limit's step) is a real end.
            ep.terminated, ep.truncated = bool(terminated), bool(truncated and not terminated)
            return ep


def collect(
    env_id: str,
    behaviours: Sequence[Behaviour],
    n_episodes: int,
    prefix: str,
    width: int,
    rng: np.random.Generator,
    **env_kwargs: Any,
) -> list[Episode]:
    """Roll out ``n_episodes`` split between ``behaviours`` by share, ids in rollout order;
    ``env_kwargs`` go to ``gym.make`` (e.g. ``max_episode_steps``)."""
    env = gym.make(env_id, **env_kwargs)
    counts = split_counts(n_episodes, [b.share for b in behaviours])
    episodes: list[Episode] = []
    for behaviour, count in zip(behaviours, counts):
        for _ in range(count):
            ep = rollout(env, behaviour.policy, rng, seed=int(rng.integers(2**31)))
            ep.episode_id = f"{prefix}-{len(episodes):0{width}d}"
            ep.policy = behaviour.name
            episodes.append(ep)
    env.close()
    return episodes


def split_counts(total: int, shares: Sequence[float]) -> list[int]:
    """Episodes per policy: at least one each, summing to ``max(total, len(shares))``."""
    total = max(total, len(shares))
    weights = np.asarray(shares, dtype=np.float64) / sum(shares)
    counts = [max(1, int(round(w * total))) for w in weights]
    counts[-1] = max(1, total - sum(counts[:-1]))
    return counts


def mean_return(env_id: str, policy: Policy, n_episodes: int = REFERENCE_EPISODES) -> float:
    """Average return over fixed evaluation seeds (the same for every ``--seed``)."""
    env = gym.make(env_id)
    rng = np.random.default_rng(REFERENCE_SEED)
    returns = [rollout(env, policy, rng, seed=REFERENCE_SEED + i).ret for i in range(n_episodes)]
    env.close()
    return float(np.mean(returns))


# --------------------------------------------------------------------------- policies


def cartpole_pd(
    k_theta: float = 10.0,
    k_omega: float = 2.0,
    k_x: float = 0.1,
    k_v: float = 0.5,
    bias: float = 0.0,
    deadband: float = 0.0,
) -> Policy:
    """Push right when ``k_theta theta + k_omega theta' + k_x x + k_v x' + bias > 0``.

    Inside ``|k_theta theta + k_omega theta'| < deadband`` (a late reaction) it pushes right
    whatever the cart does.
    """

    def act(obs: Obs, rng: np.random.Generator) -> int:
        x, x_dot, theta, theta_dot = (float(v) for v in obs)
        pole = k_theta * theta + k_omega * theta_dot
        if abs(pole) < deadband:
            return 1
        return int(pole + k_x * x + k_v * x_dot + bias > 0.0)

    return act


# PD on pole angle and angular velocity, with a little cart-position feedback (~500).
cartpole_expert = cartpole_pd()


def cartpole_random(obs: Obs, rng: np.random.Generator) -> int:
    return int(rng.integers(2))


def epsilon_greedy(policy: Policy, random_policy: Policy, epsilon: float) -> Policy:
    """With probability ``epsilon`` act at random, else follow ``policy``."""

    def act(obs: Obs, rng: np.random.Generator) -> EnvAction:
        return random_policy(obs, rng) if rng.random() < epsilon else policy(obs, rng)

    return act


def sticky_right(policy: Policy, p: float) -> Policy:
    """With probability ``p`` push right whatever the state, else follow ``policy``."""

    def act(obs: Obs, rng: np.random.Generator) -> EnvAction:
        return 1 if rng.random() < p else policy(obs, rng)

    return act


def pendulum_swingup(
    k_theta: float = 10.0,
    k_omega: float = 2.0,
    gain: float = 1.0,
    bias: float = 0.0,
    balance: bool = True,
) -> Callable[[Obs, np.random.Generator], NDArray[np.float32]]:
    """Energy-shaping swing-up far from the top, PD balance near it; torque ``gain u + bias``.

    With ``theta = 0`` upright the dynamics are ``theta'' = 15 sin(theta) + 3 u``, so
    ``E = theta'^2 / 2 + 15 (cos(theta) - 1)`` is 0 at the top and ``dE/dt = 3 u theta'``:
    pushing along the velocity while ``E < 0`` pumps energy in. Without ``balance`` it keeps
    pushing along the velocity everywhere, so the pendulum spins over the top and never stops.
    """

    def act(obs: Obs, rng: np.random.Generator) -> NDArray[np.float32]:
        cos, sin, vel = (float(v) for v in obs)
        if not balance:
            u = math.copysign(PENDULUM_MAX_TORQUE, vel) if vel != 0.0 else PENDULUM_MAX_TORQUE
        elif cos > 0.85:
            u = -(k_theta * math.atan2(sin, cos) + k_omega * vel)
        else:
            energy = 0.5 * vel * vel + 15.0 * (cos - 1.0)
            u = (
                math.copysign(PENDULUM_MAX_TORQUE, -energy * vel)
                if vel != 0.0
                else PENDULUM_MAX_TORQUE
            )
        return pendulum_action(gain * u + bias)

    return act


pendulum_expert = pendulum_swingup()


def pendulum_random(obs: Obs, rng: np.random.Generator) -> NDArray[np.float32]:
    return pendulum_action(rng.uniform(-PENDULUM_MAX_TORQUE, PENDULUM_MAX_TORQUE))


def gaussian_noise(
    policy: Callable[[Obs, np.random.Generator], NDArray[np.float32]], sigma: float
) -> Policy:
    """Add N(0, sigma^2) to the action, then clip it to the bounds (what gets logged)."""

    def act(obs: Obs, rng: np.random.Generator) -> EnvAction:
        return pendulum_action(float(policy(obs, rng)[0]) + sigma * float(rng.normal()))

    return act


def pendulum_action(u: float) -> NDArray[np.float32]:
    return np.array([np.clip(u, -PENDULUM_MAX_TORQUE, PENDULUM_MAX_TORQUE)], dtype=np.float32)


# Mixed quality in the way of D4RL's medium-replay / medium-expert data: most episodes come
# from sub-optimal controllers whose errors are SYSTEMATIC (a bias, a late reaction, the
# wrong sign of a gain), so they do not average out when the data is cloned; a minority of
# episodes is near-expert. Cloning the mixture is clearly worse than its best episodes.
CARTPOLE_BEHAVIOURS = (
    Behaviour("expert-eps0.05", 0.05, epsilon_greedy(cartpole_expert, cartpole_random, 0.05)),
    # balances the pole, but its cart feedback has the wrong sign: it drifts off the track
    Behaviour("drift", 0.35, cartpole_pd(k_x=-2.0, k_v=0.0)),
    Behaviour("lean-right", 0.25, cartpole_pd(bias=1.0)),  # holds the pole tilted, drifts off
    Behaviour("late-right", 0.20, cartpole_pd(deadband=1.0)),  # reacts only to large tilts
    Behaviour("random", 0.15, cartpole_random),
)
PENDULUM_BEHAVIOURS = (
    Behaviour("expert-sigma0.1", 0.20, gaussian_noise(pendulum_expert, 0.1)),
    Behaviour("wrong-damping", 0.30, pendulum_swingup(k_omega=-2.0)),  # topples off the top
    Behaviour("lazy0.4", 0.30, pendulum_swingup(gain=0.4)),  # too weak to hold the top
    Behaviour("random", 0.20, pendulum_random),
)


# --------------------------------------------------------------------------- writers


def write_bytes(path: Path, lines: Sequence[bytes]) -> None:
    """Write JSONL, compressed by suffix; gzip without a timestamp so output is reproducible."""
    blob = b"".join(line + b"\n" for line in lines)
    if path.suffix == ".gz":
        blob = gzip.compress(blob, mtime=0)
    elif path.suffix == ".zst":
        blob = zstandard.ZstdCompressor(level=10).compress(blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)


def cartpole_lines(ep: Episode) -> list[bytes]:
    lines = []
    for t in range(ep.length):
        last = t == ep.length - 1
        row: dict[str, Any] = {
            "ep": ep.episode_id,
            "t": t,
            "state": ep.observations[t],
            "action": ep.actions[t],
            "reward": ep.rewards[t],
            "terminated": last and ep.terminated,
            "truncated": last and ep.truncated,
        }
        if last:
            row["final_obs"] = ep.observations[t + 1]
        lines.append(orjson.dumps(row))
    return lines


def write_cartpole(out: Path, episodes: Sequence[Episode], rng: np.random.Generator) -> list[Path]:
    """Every step line goes to a random part, and each part's lines are shuffled."""
    parts: list[list[bytes]] = [[] for _ in CARTPOLE_PARTS]
    for ep in episodes:
        for line in cartpole_lines(ep):
            parts[int(rng.integers(len(parts)))].append(line)
    paths = []
    for name, lines in zip(CARTPOLE_PARTS, parts):
        order = rng.permutation(len(lines))
        paths.append(out / "cartpole" / name)
        write_bytes(paths[-1], [lines[i] for i in order])
    return paths


def pendulum_obs(values: Sequence[float]) -> dict[str, float]:
    return dict(zip(("cos", "sin", "vel"), values))


def pendulum_line(ep: Episode) -> bytes:
    steps = [
        {
            "obs": pendulum_obs(ep.observations[t]),
            "act": ep.actions[t],
            "rew": ep.rewards[t],
            "upright": float(ep.observations[t][0]),  # cos(theta): a shaped second reward
            "terminal": t == ep.length - 1 and ep.terminated,
            "timeout": t == ep.length - 1 and ep.truncated,
        }
        for t in range(ep.length)
    ]
    row = {
        "episode": ep.episode_id,
        "policy": ep.policy,
        "steps": steps,
        "last_obs": pendulum_obs(ep.observations[-1]),
    }
    return orjson.dumps(row)


def write_pendulum(out: Path, episodes: Sequence[Episode]) -> list[Path]:
    path = out / "pendulum" / "episodes.jsonl.zst"
    write_bytes(path, [pendulum_line(ep) for ep in episodes])
    return [path]


# --------------------------------------------------------------------------- replay game

MOVE_POWER = (0.30, 0.22, 0.45, 0.12)  # damage to the opponent's active member
MOVE_ACCURACY = (0.95, 1.0, 0.65, 1.0)
N_WEATHER = 5  # weather w in 1..4 boosts move w - 1 by half
N_TEAM = 6
REPLAY_MAX_TURNS = 150  # a game still running then is logged as cut
REPLAY_CUT_RATE = 0.12  # share of logs cut short at a random turn (no done=true)


@dataclass
class Game:
    """The toy game from the logging player's side; the opponent is a fixed bot."""

    team_id: int
    weather: int = 0
    turn: int = 0
    active: int = 0
    opp_active: int = 0
    hp: list[float] = field(default_factory=lambda: [1.0] * N_TEAM)
    opp_hp: list[float] = field(default_factory=lambda: [1.0] * N_TEAM)

    def observation(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "team_id": self.team_id,
            "weather_id": self.weather,
            "team_hp": [round(h, 3) for h in self.hp],
        }

    def legal(self) -> list[tuple[int, int]]:
        """(action_type, action_target) pairs: moves need a standing active member."""
        switches = [(1, i) for i in range(N_TEAM) if self.hp[i] > 0 and i != self.active]
        moves = [(0, m) for m in range(len(MOVE_POWER))] if self.hp[self.active] > 0 else []
        return moves + switches

    def expected_damage(self, move: int) -> float:
        boost = 1.5 if self.weather == move + 1 else 1.0
        return MOVE_POWER[move] * MOVE_ACCURACY[move] * boost * (0.9 + 0.025 * self.team_id)

    def step(self, action_type: int, target: int, rng: np.random.Generator) -> tuple[float, bool]:
        """Apply the player's action, then the bot's attack; returns (reward, done)."""
        if action_type == 1:
            self.active = target
        elif rng.random() < MOVE_ACCURACY[target]:
            damage = self.expected_damage(target) / MOVE_ACCURACY[target]
            self.opp_hp[self.opp_active] = max(0.0, self.opp_hp[self.opp_active] - damage)
        if self.opp_hp[self.opp_active] == 0.0:
            standing = [i for i in range(N_TEAM) if self.opp_hp[i] > 0]
            if not standing:
                return 1.0, True
            self.opp_active = standing[0]
        if self.hp[self.active] > 0:
            self.hp[self.active] = max(0.0, self.hp[self.active] - rng.uniform(0.08, 0.32))
        if all(h == 0.0 for h in self.hp):
            return -1.0, True
        if rng.random() < 0.1:
            self.weather = int(rng.integers(N_WEATHER))
        self.turn += 1
        return 0.0, False


def skilled_player(game: Game, rng: np.random.Generator) -> tuple[int, int]:
    """Switch in the healthiest member when needed, else use the best expected move."""
    bench = [i for i in range(N_TEAM) if game.hp[i] > 0 and i != game.active]
    healthiest = max(bench, key=lambda i: game.hp[i]) if bench else None
    if healthiest is not None and game.hp[game.active] == 0.0:
        return 1, healthiest
    low = game.hp[game.active] < 0.25
    if healthiest is not None and low and game.hp[healthiest] > 0.6 and rng.random() < 0.5:
        return 1, healthiest
    return 0, max(range(len(MOVE_POWER)), key=game.expected_damage)


def random_player(game: Game, rng: np.random.Generator) -> tuple[int, int]:
    legal = game.legal()
    return legal[int(rng.integers(len(legal)))]


def novice_player(game: Game, rng: np.random.Generator) -> tuple[int, int]:
    return random_player(game, rng) if rng.random() < 0.5 else skilled_player(game, rng)


ReplayPolicy = Callable[[Game, np.random.Generator], tuple[int, int]]
REPLAY_BEHAVIOURS: tuple[tuple[str, float, ReplayPolicy], ...] = (
    ("skilled", 0.4, skilled_player),
    ("novice", 0.35, novice_player),
    ("random", 0.25, random_player),
)


def play_replay(replay_id: str, policy: ReplayPolicy, rng: np.random.Generator) -> dict[str, Any]:
    """One game as a replay record; a cut log keeps done=false and total reward 0."""
    game = Game(team_id=int(rng.integers(10)))
    steps: list[dict[str, Any]] = []
    done = False
    while not done and game.turn < REPLAY_MAX_TURNS:
        observation = game.observation()
        action_type, target = policy(game, rng)
        reward, done = game.step(action_type, target, rng)
        steps.append(
            {
                "observation": observation,
                "action_type": action_type,
                "action_target": target,
                "reward": reward,
                "done": done,
            }
        )
    if len(steps) > 4 and rng.random() < REPLAY_CUT_RATE:
        steps = steps[: int(rng.integers(3, len(steps)))]
    return {
        "replay_id": replay_id,
        "player": f"p{int(rng.integers(1, 3))}",
        "total_reward": float(sum(s["reward"] for s in steps)),
        "steps": steps,
    }


# (line index in replays.jsonl, what is wrong); lines past the end of a short file go last.
BAD_REPLAY_LINES = (
    (7, "not_json"),
    (42, "target_out_of_range"),
    (99, "nan_hp"),
    (150, "empty_steps"),
    (211, "missing_reward"),
)


def bad_replay_line(kind: str, rng: np.random.Generator) -> str:
    """A replay made invalid in exactly one way, as the quarantine should report it."""
    replay = play_replay(f"bad-{kind}", skilled_player, rng)
    steps = replay["steps"]
    if kind == "not_json":
        text = json.dumps(replay)
        return text[: len(text) // 2]
    if kind == "target_out_of_range":
        steps[1].update(action_type=0, action_target=7)  # moves are 0-3
    elif kind == "nan_hp":
        steps[2]["observation"]["team_hp"][1] = float("nan")  # written as a bare NaN
    elif kind == "empty_steps":
        replay.update(steps=[], total_reward=0.0)
    elif kind == "missing_reward":
        del steps[2]["reward"]
    else:
        raise ValueError(f"unknown bad replay kind {kind!r}")
    return json.dumps(replay)


@dataclass(frozen=True)
class ReplayStats:
    policy: str
    episodes: int
    steps: int
    mean_return: float
    cut: int


def make_replays(out: Path, n_episodes: int, rng: np.random.Generator) -> list[ReplayStats]:
    counts = split_counts(n_episodes, [share for _, share, _ in REPLAY_BEHAVIOURS])
    lines: list[str] = []
    stats = []
    for (name, _, policy), count in zip(REPLAY_BEHAVIOURS, counts):
        replays = [play_replay(f"r{len(lines) + i + 1}", policy, rng) for i in range(count)]
        lines.extend(json.dumps(r) for r in replays)
        stats.append(
            ReplayStats(
                policy=name,
                episodes=count,
                steps=sum(len(r["steps"]) for r in replays),
                mean_return=float(np.mean([r["total_reward"] for r in replays])),
                cut=sum(not r["steps"][-1]["done"] for r in replays),
            )
        )
    order = rng.permutation(len(lines))  # mix the players' replays through the file
    lines = [lines[i] for i in order]
    for position, kind in BAD_REPLAY_LINES:
        lines.insert(min(position, len(lines)), bad_replay_line(kind, rng))
    write_bytes(out / "replay" / "replays.jsonl", [line.encode() for line in lines])
    return stats


# --------------------------------------------------------------------------- reporting


@dataclass(frozen=True)
class References:
    random: float
    expert: float
    behaviour: float

    def normalized(self, ret: float) -> float:
        return 100.0 * (ret - self.random) / (self.expert - self.random)


def references(
    env_id: str, expert: Policy, random_policy: Policy, episodes: Sequence[Episode]
) -> References:
    return References(
        random=mean_return(env_id, random_policy),
        expert=mean_return(env_id, expert),
        behaviour=float(np.mean([ep.ret for ep in episodes])),
    )


def report_episodes(
    name: str, episodes: Sequence[Episode], paths: Sequence[Path], refs: References
) -> None:
    steps = sum(ep.length for ep in episodes)
    print(f"{name}: {len(episodes)} episodes, {steps} steps -> {', '.join(map(str, paths))}")
    for policy in dict.fromkeys(ep.policy for ep in episodes):
        mine = [ep for ep in episodes if ep.policy == policy]
        ret = float(np.mean([ep.ret for ep in mine]))
        print(
            f"  {policy:<18} {len(mine):>4} episodes {sum(ep.length for ep in mine):>7} steps"
            f"  mean return {ret:9.2f}  (normalized {refs.normalized(ret):6.1f})"
        )
    print(
        f"  reference returns: random {refs.random:.2f}, expert {refs.expert:.2f}, "
        f"behaviour {refs.behaviour:.2f}  (over {REFERENCE_EPISODES} evaluation episodes)"
    )


def report_replays(path: Path, stats: Sequence[ReplayStats]) -> None:
    episodes = sum(s.episodes for s in stats)
    print(
        f"replay: {episodes} replays + {len(BAD_REPLAY_LINES)} bad lines, "
        f"{sum(s.steps for s in stats)} steps -> {path}"
    )
    for s in stats:
        print(
            f"  {s.policy:<18} {s.episodes:>4} episodes {s.steps:>7} steps"
            f"  mean return {s.mean_return:9.2f}  ({s.cut} cut logs)"
        )


# --------------------------------------------------------------------------- main


def scaled(count: int, scale: float) -> int:
    return max(1, int(round(count * scale)))


def generate(out: Path, seed: int, scale: float) -> dict[str, References]:
    """Write all three datasets under ``out``; returns the reference returns per env."""
    cartpole_rng, pendulum_rng, replay_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    cartpole = collect(
        "CartPole-v1",
        CARTPOLE_BEHAVIOURS,
        scaled(CARTPOLE_EPISODES, scale),
        "cartpole",
        6,
        cartpole_rng,
    )
    cartpole_refs = references("CartPole-v1", cartpole_expert, cartpole_random, cartpole)
    report_episodes(
        "cartpole", cartpole, write_cartpole(out, cartpole, cartpole_rng), cartpole_refs
    )

    pendulum = collect(
        "Pendulum-v1",
        PENDULUM_BEHAVIOURS,
        scaled(PENDULUM_EPISODES, scale),
        "pendulum",
        4,
        pendulum_rng,
    )
    pendulum_refs = references("Pendulum-v1", pendulum_expert, pendulum_random, pendulum)
    report_episodes("pendulum", pendulum, write_pendulum(out, pendulum), pendulum_refs)

    stats = make_replays(out, scaled(REPLAY_EPISODES, scale), replay_rng)
    report_replays(out / "replay" / "replays.jsonl", stats)

    refs = {"CartPole-v1": cartpole_refs, "Pendulum-v1": pendulum_refs}
    summary = {env_id: vars(r) for env_id, r in refs.items()}
    (out / "reference_returns.json").write_text(json.dumps(summary, indent=2) + "\n")
    return refs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("data/raw"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for every rollout and shuffle")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the episode counts")
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error(f"--scale must be > 0, got {args.scale}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create output directory {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    generate(args.out, args.seed, args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
