"""The policy turns of a sequence store as prompts: RL without an environment, and text
overlap on held-out turns.

A policy turn of a stored episode is a prompt: its context is every token of the episode
before the turn's text (the prompt, the earlier turns as the store holds them, and the
turn's own role header), and its target is the turn's text as in the source
(``turns.content``). :func:`collect_prompts` samples one turn of the student after each
context, laid out as :func:`trainer.agent.rollouts.collect` lays out an episode, so an RL
stage with ``rollouts: store`` trains on it with the same losses; the reward's text-overlap
leaves (``exact_match``, ``token_f1``, ``bleu``, ``rouge_l``) compare it with the target.
:func:`text_overlap` decodes greedily after held-out contexts and scores the same way:
``eval/turn_exact_match``, ``eval/turn_token_f1`` and ``eval/turn_rouge_l``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.agent.rollouts import Episode, _append_turn, generate


@dataclass(frozen=True)
class StorePrompts:
    """The policy turns of some episodes of a sequence store (``rows``: rows of
    ``store.turns``, in store order)."""

    input_ids: np.ndarray  # (T,) the store's token column
    offsets: np.ndarray  # (N + 1,) episode i is input_ids[offsets[i]:offsets[i + 1]]
    episode: np.ndarray  # (M,) turns.episode
    token_start: np.ndarray  # (M,) turns.token_start
    content: Sequence[str]  # (M,) turns.content
    header_len: int  # tokens of the policy's role header
    rows: np.ndarray  # (P,) the turns that are prompts

    @classmethod
    def from_store(
        cls, store: Any, episodes: np.ndarray, policy_role: str, header_len: int
    ) -> StorePrompts:
        """The turns of ``policy_role`` in ``episodes`` (rows of the store)."""
        turns = store.turns
        keep = np.zeros(len(store.offsets) - 1, dtype=bool)
        keep[np.asarray(episodes, dtype=np.int64)] = True
        role = np.asarray(turns.role, dtype=object) == policy_role
        rows = np.flatnonzero(turns.policy & role & keep[turns.episode])
        return cls(
            input_ids=store.input_ids,
            offsets=np.asarray(store.offsets, dtype=np.int64),
            episode=np.asarray(turns.episode, dtype=np.int64),
            token_start=np.asarray(turns.token_start, dtype=np.int64),
            content=turns.content,
            header_len=int(header_len),
            rows=rows.astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.rows)

    def context(self, row: int) -> list[int]:
        """Every token of the episode before turn ``row``'s text (its header included)."""
        start = int(self.offsets[self.episode[row]])
        stop = start + int(self.token_start[row]) + self.header_len
        return [int(t) for t in self.input_ids[start:stop]]

    def target(self, row: int) -> str:
        return str(self.content[row])

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        """``n`` turns drawn uniformly (with replacement) among the prompts."""
        return [int(r) for r in self.rows[rng.integers(0, len(self.rows), size=n)]]

    def spread(self, n: int) -> list[int]:
        """At most ``n`` turns, evenly spaced over the prompts (the same ones every call)."""
        if n >= len(self.rows):
            return [int(r) for r in self.rows]
        picks = np.linspace(0, len(self.rows) - 1, n).round().astype(np.int64)
        return [int(r) for r in self.rows[picks]]


@torch.no_grad()
def collect_prompts(
    model: Any,
    text: Any,
    prompts: StorePrompts,
    rows: Sequence[int],
    *,
    max_new_tokens: int,
    device: torch.device,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_context: int | None = None,
    autocast: Callable[[], Any] | None = None,
    batch_size: int | None = None,
) -> list[Episode]:
    """One sampled turn after the context of each of ``rows`` (``temperature == 0``:
    greedy), as one-turn :class:`Episode` s whose ``seed`` is the turn's row and whose
    ``targets`` hold the store's text of the turn. ``batch_size`` bounds one ``generate``."""
    end, pad = int(text.end_id), int(text.pad_id)
    eps = []
    for r in rows:
        ctx = prompts.context(int(r))
        if max_context is not None:  # what the model is shown, as generate() cuts it
            ctx = ctx[-(max_context - max_new_tokens) :]
        eps.append(Episode(int(r), ctx, [False] * len(ctx), targets=[prompts.target(int(r))]))
    step = batch_size or max(len(eps), 1)
    for lo in range(0, len(eps), step):
        chunk = eps[lo : lo + step]
        new = generate(
            model, [e.ids for e in chunk], end_id=end, pad_id=pad,
            max_new_tokens=max_new_tokens, device=device, temperature=temperature,
            top_k=top_k, top_p=top_p, autocast=autocast,
        )  # fmt: skip
        for e, gen in zip(chunk, new):
            _append_turn(e, gen, text, end, pad)
            e.done = True
    return eps


def text_overlap(
    model: Any,
    text: Any,
    prompts: StorePrompts,
    rows: Sequence[int],
    *,
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 32,
    max_context: int | None = None,
    autocast: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Greedy turns after held-out contexts, scored against the store's turns:
    ``eval/turn_exact_match``, ``eval/turn_token_f1``, ``eval/turn_rouge_l`` (with
    rouge-score installed) and ``eval/turns_scored``."""
    from trainer.rewards import RewardInput, build_reward

    if not rows:
        return {}
    was_training = model.training
    model.eval()
    try:
        eps = collect_prompts(
            model, text, prompts, rows, max_new_tokens=max_new_tokens, device=device,
            temperature=0.0, max_context=max_context, autocast=autocast, batch_size=batch_size,
        )  # fmt: skip
    finally:
        model.train(was_training)
    samples = [RewardInput(text=e.texts[0], target=e.targets[0]) for e in eps]
    leaves = {"turn_exact_match": "exact_match", "turn_token_f1": "token_f1"}
    if importlib.util.find_spec("rouge_score") is not None:  # an optional metric
        leaves["turn_rouge_l"] = "rouge_l"
    out = {f"eval/{k}": float(np.mean(build_reward(v)(samples))) for k, v in leaves.items()}
    out["eval/turns_scored"] = float(len(eps))
    return out
