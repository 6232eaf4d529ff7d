"""Text environments and their scripted teachers, for language agents.

``make_text_env(env_id, **kwargs)`` builds an environment (``reset(seed) -> prompt``,
``step(action) -> (observation, reward, done, info)``), ``make_teacher(env_id, name, seed)``
a scripted policy that writes ``<think>...</think>\\n<action>...</action>`` answers, and
``run_episode`` plays one episode of any policy. Known ids: ``textgrid-v0``
(:mod:`trainer.envs.textgrid`). Importing this package does not import torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Protocol

from trainer.config import ConfigError
from trainer.envs.textgrid import ENV_ID as TEXTGRID_ID
from trainer.envs.textgrid import NOISY_ERROR_RATE, GridConfig, GridTeacher, TextGridEnv

ENV_IDS = (TEXTGRID_ID,)
TEACHERS = ("planner", "noisy")

_ACTION = re.compile(r"<action>(.*?)</action>", re.DOTALL)


class TextEnv(Protocol):
    """What the trainer needs of a text environment."""

    max_turns: int

    def reset(self, seed: int) -> str: ...

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]: ...


class Teacher(Protocol):
    """A scripted policy: the next answer from the prompt and the turns so far."""

    def act(self, prompt: str, history: list[tuple[str, str]]) -> str: ...


Policy = Callable[[str, list[tuple[str, str]]], str]


def _check_id(env_id: str) -> None:
    if env_id not in ENV_IDS:
        raise ValueError(f"unknown text env {env_id!r}; known ids: {', '.join(ENV_IDS)}")


def make_text_env(env_id: str, **kwargs: Any) -> TextEnv:
    """A new environment of ``env_id``; ``kwargs`` are its settings (textgrid-v0:
    :class:`trainer.envs.textgrid.GridConfig`)."""
    _check_id(env_id)
    known = [f.name for f in fields(GridConfig)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(
            f"env.kwargs: unknown key(s) {', '.join(unknown)} for {env_id}; "
            f"known: {', '.join(known)}"
        )
    return TextGridEnv(GridConfig(**kwargs))


def make_teacher(env_id: str, name: str, seed: int) -> Teacher:
    """The scripted teacher ``name`` of ``env_id``: ``planner`` (the planner rule, which
    solves every map) or ``noisy`` (the same, with a wrong move on some turns)."""
    _check_id(env_id)
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r} for {env_id}; known: {', '.join(TEACHERS)}")
    return GridTeacher(name, seed, 0.0 if name == "planner" else NOISY_ERROR_RATE)


def parse_action(text: str) -> str | None:
    """The content of the first ``<action>...</action>`` in ``text`` (None if there is none)."""
    m = _ACTION.search(text)
    return None if m is None else m.group(1)


def run_episode(env: TextEnv, policy_fn: Policy, seed: int) -> dict[str, Any]:
    """Play one episode of ``policy_fn(prompt, history) -> answer`` in ``env``.

    Returns ``{"prompt", "turns": [{"role", "content", "reward"}, ...], "success", "return"}``;
    turns alternate ``assistant`` (the answer, with the step's reward) and ``env`` (the
    observation, reward 0.0). An answer without an action is stepped as ``""`` (penalised).
    """
    prompt = env.reset(seed)
    turns: list[dict[str, Any]] = []
    history: list[tuple[str, str]] = []
    success, total = False, 0.0
    for _ in range(env.max_turns):
        text = policy_fn(prompt, list(history))
        action = parse_action(text)
        obs, reward, done, info = env.step("" if action is None else action)
        turns.append({"role": "assistant", "content": text, "reward": float(reward)})
        turns.append({"role": "env", "content": obs, "reward": 0.0})
        history += [("assistant", text), ("env", obs)]
        total += float(reward)
        if done:
            success = bool(info.get("success", False))
            break
    return {"prompt": prompt, "turns": turns, "success": success, "return": total}
