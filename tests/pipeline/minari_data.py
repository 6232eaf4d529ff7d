"""Small Minari datasets recorded by Minari's own ``DataCollector`` from gymnasium envs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np


class DictObservation(gym.ObservationWrapper):  # type: ignore[type-arg]
    """CartPole seen as a Dict: ``pole`` (angle, angular velocity), ``cart`` (position,
    velocity): the dataset's key order (sorted) is not the order of the values."""

    def __init__(self, env: gym.Env) -> None:  # type: ignore[type-arg]
        super().__init__(env)
        box = env.observation_space
        assert isinstance(box, gym.spaces.Box)
        self.observation_space = gym.spaces.Dict(
            {
                "pole": gym.spaces.Box(box.low[2:], box.high[2:], dtype=np.float32),
                "cart": gym.spaces.Box(box.low[:2], box.high[:2], dtype=np.float32),
            }
        )

    def observation(self, observation: Any) -> dict[str, np.ndarray]:
        return {"pole": observation[2:], "cart": observation[:2]}


def record(
    root: Path,
    dataset_id: str,
    env_id: str,
    *,
    backend: str = "arrow",
    episodes: int = 4,
    max_episode_steps: int = 40,
    seed: int = 0,
    dict_obs: bool = False,
    ref_scores: tuple[float, float] | None = None,
) -> Path:
    """Record ``episodes`` random-policy episodes of ``env_id`` with ``minari.DataCollector``
    into ``root`` (as MINARI_DATASETS_PATH); the dataset's directory."""
    import minari

    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        env: gym.Env = gym.make(env_id, max_episode_steps=max_episode_steps)  # type: ignore[type-arg]
        if dict_obs:
            env = DictObservation(env)
        env.action_space.seed(seed)
        collector = minari.DataCollector(env, data_format=backend)
        for ep in range(episodes):
            collector.reset(seed=seed + ep)
            while True:
                _, _, term, trunc, _ = collector.step(collector.action_space.sample())
                if term or trunc:
                    break
        extra: dict[str, Any] = {}
        if ref_scores is not None:
            extra = {"ref_min_score": ref_scores[0], "ref_max_score": ref_scores[1]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            collector.create_dataset(dataset_id=dataset_id, algorithm_name="random", **extra)
        collector.close()
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
    return root / dataset_id
