"""Evaluation of a policy: online returns in the store's gymnasium env, offline validation metrics.

Online: ``episodes`` environments are reset with seeds ``seed, seed + 1, ...`` and stepped in
lockstep, the policy acting on the batch of live observations; the returns give
``eval/return_mean`` and ``eval/return_std`` and, through the store's reference returns,
``eval/normalized_score`` = 100 * (R - random) / (expert - random).

Offline: ``algo.evaluate`` on a fixed set of validation batches (episodes held out by the
split), averaged by batch size and reported as ``val/<metric>``.

Evaluation never touches the training RNG streams: it runs inside a fork of the python,
numpy and torch generators, so the training trajectory does not depend on when or how
often a run evaluates.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from trainer.batch import TransitionBatch


class EvalError(Exception):
    """The store's environment cannot be used for evaluation; the message says why."""


class Policy(Protocol):
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray: ...


class Evaluable(Policy, Protocol):
    def evaluate(self, batch: TransitionBatch) -> dict[str, float]: ...


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving the python, numpy or torch global generators."""
    py = random.getstate()
    npy = np.random.get_state()  # noqa: NPY002 - restored below
    with torch.random.fork_rng(
        devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    ):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)  # noqa: NPY002


def make_env(env_spec: dict[str, Any], max_episode_steps: int | None = None) -> Any:
    """``gymnasium.make`` from a store spec's ``env`` section (id, kwargs, max_episode_steps)."""
    import gymnasium

    kwargs = env_spec.get("kwargs") or {}
    if isinstance(kwargs, list | tuple):  # the resolved spec stores kwargs as pairs
        kwargs = {str(k): v for k, v in kwargs}
    steps = max_episode_steps or env_spec.get("max_episode_steps")
    if steps:
        kwargs = {**kwargs, "max_episode_steps": int(steps)}
    try:
        return gymnasium.make(env_spec["id"], **kwargs)
    except Exception as e:  # gymnasium raises its own error types for unknown ids / bad kwargs
        if isinstance(e, gymnasium.error.DependencyNotInstalled) and "mujoco" in str(e).lower():
            raise EvalError(
                f"env {env_spec.get('id')!r} needs MuJoCo, which is not installed: run "
                '`pip install -e ".[mujoco]"` (or `make setup`), or set eval.episodes=0'
            ) from None
        raise EvalError(
            f"cannot create env {env_spec.get('id')!r} ({type(e).__name__}: {e}); "
            "fix the store spec's `env` or set eval.episodes=0"
        ) from None


def _to_env_action(space: Any, action: np.ndarray) -> Any:
    import gymnasium

    if isinstance(space, gymnasium.spaces.Discrete):
        return int(np.asarray(action).reshape(-1)[0]) if np.ndim(action) else int(action)
    a = np.asarray(action, dtype=np.float32).reshape(space.shape)
    return np.clip(a, space.low, space.high)


def rollout_returns(
    act: Callable[[np.ndarray], np.ndarray],
    env_spec: dict[str, Any],
    episodes: int,
    seed: int,
    *,
    obs_dim: int | None = None,
    max_episode_steps: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``episodes`` episodes (seeds ``seed + i``) in lockstep; returns (returns, lengths).

    ``act`` maps a ``(n, obs_dim)`` float32 batch of observations to ``n`` actions.
    """
    envs = [make_env(env_spec, max_episode_steps) for _ in range(episodes)]
    try:
        shape = envs[0].observation_space.shape
        if obs_dim is not None and (shape is None or int(np.prod(shape)) != obs_dim):
            raise EvalError(
                f"env {env_spec['id']!r} observations have shape {shape}, the store's have "
                f"{obs_dim} values; the spec's observation fields must match the env"
            )
        obs = np.stack(
            [
                np.asarray(e.reset(seed=seed + i)[0], dtype=np.float32).reshape(-1)
                for i, e in enumerate(envs)
            ]
        )
        returns = np.zeros(episodes, dtype=np.float64)
        lengths = np.zeros(episodes, dtype=np.int64)
        live = np.ones(episodes, dtype=bool)
        while live.any():
            idx = np.flatnonzero(live)
            actions = np.asarray(act(obs[idx]))
            if len(actions) != len(idx):
                raise EvalError(
                    f"policy returned {len(actions)} actions for {len(idx)} observations"
                )
            for j, i in enumerate(idx):
                env = envs[i]
                o, r, terminated, truncated, _ = env.step(
                    _to_env_action(env.action_space, actions[j])
                )
                returns[i] += float(r)
                lengths[i] += 1
                obs[i] = np.asarray(o, dtype=np.float32).reshape(-1)
                if terminated or truncated:
                    live[i] = False
        return returns, lengths
    finally:
        for e in envs:
            e.close()


class Evaluator:
    """Online and offline evaluation of an algorithm, as one metrics row."""

    def __init__(
        self,
        *,
        env_spec: dict[str, Any] | None,
        episodes: int,
        seed: int,
        deterministic: bool,
        max_episode_steps: int | None,
        normalize: Callable[[float], float] | None,
        score_span: float | None,
        obs_dim: int,
        val_batches: Sequence[TransitionBatch] = (),
    ) -> None:
        self.env_spec = env_spec
        self.episodes = episodes if env_spec else 0
        self.seed = seed
        self.deterministic = deterministic
        self.max_episode_steps = max_episode_steps
        self.normalize = normalize
        self.score_span = score_span  # expert - random: scales a return std into score units
        self.obs_dim = obs_dim
        self.val_batches = list(val_batches)

    @property
    def online(self) -> bool:
        return self.episodes > 0

    def check(self) -> None:
        """Create the env once and compare its observations with the store's (fail early)."""
        if not self.online:
            return
        assert self.env_spec is not None
        env = make_env(self.env_spec, self.max_episode_steps)
        try:
            shape = env.observation_space.shape
            if shape is None or int(np.prod(shape)) != self.obs_dim:
                raise EvalError(
                    f"env {self.env_spec['id']!r} observations have shape {shape}, the store's "
                    f"have {self.obs_dim} values; the spec's observation fields must match the env"
                )
        finally:
            env.close()

    def __call__(self, algo: Evaluable) -> dict[str, float]:
        out: dict[str, float] = {}
        with isolated_rng(), torch.no_grad():
            if self.online:
                out.update(self.evaluate_online(algo))
            if self.val_batches:
                out.update(self.evaluate_offline(algo))
        return out

    def evaluate_online(self, algo: Policy) -> dict[str, float]:
        assert self.env_spec is not None
        returns, lengths = rollout_returns(
            lambda o: algo.act(o, deterministic=self.deterministic),
            self.env_spec,
            self.episodes,
            self.seed,
            obs_dim=self.obs_dim,
            max_episode_steps=self.max_episode_steps,
        )
        out = {
            "eval/return_mean": float(returns.mean()),
            "eval/return_std": float(returns.std()),
            "eval/length_mean": float(lengths.mean()),
        }
        if self.normalize is not None and self.score_span:
            out["eval/normalized_score"] = float(self.normalize(out["eval/return_mean"]))
            out["eval/normalized_score_std"] = float(
                100.0 * out["eval/return_std"] / abs(self.score_span)
            )
        return out

    def evaluate_offline(self, algo: Evaluable) -> dict[str, float]:
        sums: dict[str, float] = {}
        total = 0
        for batch in self.val_batches:
            n = int(batch.rewards.shape[0])
            for k, v in algo.evaluate(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            total += n
        return {(k if k.startswith("val/") else f"val/{k}"): s / total for k, s in sums.items()}
