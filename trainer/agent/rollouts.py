"""Sampled episodes of the student in a text environment, as token sequences to train on.

:func:`collect` plays ``len(seeds)`` episodes in lockstep (one batched ``generate`` per
turn, left-padded, as :func:`trainer.agent.evaluation.play_online` does) and keeps, per
episode, the whole token sequence laid out as the store lays out an episode (prompt, then
each turn's header, text, end token and tail), which of its tokens the policy wrote, where
each of its turns ends, and what the environment answered. :func:`to_batch` pads a list of
them into a :class:`RolloutBatch`; :func:`token_logprobs` scores a batch's tokens under a
model. An RL stage (``ppo`` / ``reinforce``) trains on these.

The policy writes a turn's generated tokens and the end-of-turn token when it generated one
(a turn cut at ``max_new_tokens`` gets the end token appended as context, not as an action).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.agent.evaluation import turn_tail


@dataclass
class Episode:
    """One sampled episode."""

    seed: int
    ids: list[int]  # every token, prompt first
    written: list[bool]  # per token: the policy generated it
    turn_ends: list[int] = field(default_factory=list)  # last written token of each turn
    texts: list[str] = field(default_factory=list)  # each policy turn's decoded text
    env_rewards: list[float] = field(default_factory=list)  # the env's reward per turn
    observations: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # the store's text of each turn (prompts)
    done: bool = False
    success: bool = False
    parse_failures: int = 0

    @property
    def n_generated(self) -> int:
        return sum(self.written)


@torch.no_grad()
def collect(
    model: Any,
    text: Any,
    make_env: Callable[[], Any],
    seeds: Sequence[int],
    *,
    policy_role: str,
    env_role: str,
    action_pattern: str,
    max_new_tokens: int,
    max_turns: int,
    device: torch.device,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_context: int | None = None,
    autocast: Callable[[], Any] | None = None,
) -> list[Episode]:
    """Play one episode per seed; ``temperature == 0`` acts greedily."""
    pattern = re.compile(action_pattern, re.DOTALL)
    end, pad = int(text.end_id), int(text.pad_id)
    header = list(text.header_ids(policy_role))
    tail = turn_tail(text, policy_role)
    envs, eps = [], []
    for s in seeds:
        env = make_env()
        prompt = text.prompt_ids(env.reset(int(s)))
        envs.append(env)
        eps.append(Episode(int(s), list(prompt), [False] * len(prompt)))
    for _ in range(max_turns):
        live = [i for i, e in enumerate(eps) if not e.done]
        if not live:
            break
        new = generate(
            model, [eps[i].ids + header for i in live], end_id=end, pad_id=pad,
            max_new_tokens=max_new_tokens, device=device, temperature=temperature,
            top_k=top_k, top_p=top_p, max_context=max_context, autocast=autocast,
        )  # fmt: skip
        for r, i in enumerate(live):
            e = eps[i]
            e.ids += header
            e.written += [False] * len(header)
            said = _append_turn(e, new[r], text, end, pad)
            m = pattern.search(said)
            if m is None:
                e.parse_failures += 1
            obs, reward, done, info = envs[i].step(m.group(1) if m else "")
            e.env_rewards.append(float(reward))
            e.observations.append(obs)
            obs_ids = list(text.turn_ids(env_role, obs, False))
            e.ids += tail + obs_ids
            e.written += [False] * (len(tail) + len(obs_ids))
            if done:
                e.done = True
                e.success = bool(info.get("success", False))
    return eps


def generate(
    model: Any,
    contexts: Sequence[list[int]],
    *,
    end_id: int,
    pad_id: int,
    max_new_tokens: int,
    device: torch.device,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_context: int | None = None,
    autocast: Callable[[], Any] | None = None,
) -> list[list[int]]:
    """One batched ``generate`` of a turn after each context (left-padded; a context longer
    than ``max_context - max_new_tokens`` keeps its end): the new tokens of each row, padding
    included. ``temperature == 0`` decodes greedily."""
    ctxs = list(contexts)
    if max_context is not None:
        ctxs = [c[-(max_context - max_new_tokens) :] for c in ctxs]
    width = max(len(c) for c in ctxs)
    ids = torch.full((len(ctxs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ctxs), width), dtype=torch.long)
    for r, c in enumerate(ctxs):
        ids[r, width - len(c) :] = torch.tensor(c)
        mask[r, width - len(c) :] = 1
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "eos_token_id": end_id, "pad_token_id": pad_id,
        "do_sample": temperature > 0,
    }  # fmt: skip
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    with autocast() if autocast is not None else contextlib.nullcontext():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    return [list(row) for row in out[:, width:].cpu().tolist()]


def _append_turn(e: Episode, gen: list[int], text: Any, end: int, pad: int) -> str:
    """Append one generated turn (``gen``: the new tokens, padding included) to ``e``: what
    the policy wrote, with the end token when it generated one (a turn cut at
    ``max_new_tokens`` gets the end token as context); returns the turn's decoded text."""
    ended = end in gen
    gen = gen[: gen.index(end)] if ended else [t for t in gen if t != pad]
    written = gen + ([end] if ended else [])
    e.ids += written
    e.written += [True] * len(written)
    if not ended:  # cut at max_new_tokens: the end token is context
        e.ids.append(end)
        e.written.append(False)
    if written:
        last = max(j for j, w in enumerate(e.written) if w)
    else:  # nothing written at all: the turn has no action to credit
        last = -1
    e.turn_ends.append(last)
    said = str(text.decode(gen))
    e.texts.append(said)
    return said


@dataclass(frozen=True)
class RolloutBatch:
    """Episodes padded on the right; every tensor is (B, L) unless said otherwise."""

    input_ids: torch.Tensor  # int64, pad after the episode
    attention_mask: torch.Tensor  # int64 1 on real tokens
    written: torch.Tensor  # bool: the policy generated the token (an action to score)
    turn_end: torch.Tensor  # bool: the last written token of each turn
    turn_rewards: torch.Tensor  # (B, K) float32, the reward of each policy turn, in order
    n_turns: torch.Tensor  # (B,) int64 turns with a written token

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(*(t.to(device) for t in (
            self.input_ids, self.attention_mask, self.written, self.turn_end,
            self.turn_rewards, self.n_turns,
        )))  # fmt: skip

    def rows(self, index: torch.Tensor) -> RolloutBatch:
        return RolloutBatch(*(t[index] for t in (
            self.input_ids, self.attention_mask, self.written, self.turn_end,
            self.turn_rewards, self.n_turns,
        )))  # fmt: skip


def to_batch(
    episodes: Sequence[Episode], turn_rewards: Sequence[Sequence[float]], pad_id: int,
    max_len: int | None = None,
) -> RolloutBatch:  # fmt: skip
    """Pad ``episodes`` into one batch; ``turn_rewards[i]`` holds episode i's reward per
    turn. An episode longer than ``max_len`` keeps its first ``max_len`` tokens, and only the
    turns that end inside them (their rewards move with them)."""
    n = len(episodes)
    lens = [len(e.ids) if max_len is None else min(len(e.ids), max_len) for e in episodes]
    width = max(lens)
    kmax = max(max((len(e.turn_ends) for e in episodes), default=1), 1)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    written = np.zeros((n, width), dtype=bool)
    ends = np.zeros((n, width), dtype=bool)
    rewards = np.zeros((n, kmax), dtype=np.float32)
    n_turns = np.zeros(n, dtype=np.int64)
    for i, (e, length) in enumerate(zip(episodes, lens)):
        ids[i, :length] = e.ids[:length]
        mask[i, :length] = 1
        written[i, :length] = e.written[:length]
        k = 0
        for pos, r in zip(e.turn_ends, turn_rewards[i]):
            if 0 <= pos < length:  # (a turn with nothing written has no token to credit)
                ends[i, pos] = True
                rewards[i, k] = r
                k += 1
        n_turns[i] = k
    written[:, 0] = False  # the first token has no context to be scored from
    return RolloutBatch(
        torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(written),
        torch.from_numpy(ends), torch.from_numpy(rewards), torch.from_numpy(n_turns),
    )  # fmt: skip


@dataclass(frozen=True)
class SharedPrefix:
    """A batch whose groups of rows share their first tokens, packed one row per group: the
    shared prefix once, then each row's remaining tokens, each attending to the prefix and
    to itself only (a (G, 1, Lp, Lp) bool mask) at the positions it has in its own row.
    ``index[b, t]`` is where token t of row b sits in the flattened packed rows."""

    input_ids: torch.Tensor  # (G, Lp) int64
    position_ids: torch.Tensor  # (G, Lp) int64
    mask: torch.Tensor  # (G, 1, Lp, Lp) bool, True: may attend
    index: torch.Tensor  # (B, L) int64 into input_ids.reshape(-1)


def shared_prefix(
    batch: RolloutBatch, group_size: int, min_saving: float = 0.3
) -> SharedPrefix | None:
    """The packed layout of ``batch`` when its rows come in ``group_size`` consecutive rows
    with a common start (a prompt sampled ``group_size`` times) and packing saves at least
    ``min_saving`` of the tokens; else None. The common start ends before the first written
    token of the group (every scored token keeps its own context)."""
    n, width = batch.input_ids.shape
    if group_size < 2 or n == 0 or n % group_size:
        return None
    ids = batch.input_ids.cpu().numpy()
    lens = batch.attention_mask.sum(1).cpu().numpy()
    written = batch.written.cpu().numpy()
    first = np.where(written.any(1), written.argmax(1), lens)
    groups = n // group_size
    prefix = np.zeros(groups, dtype=np.int64)
    for g in range(groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        limit = int(first[rows].min())
        same = (ids[rows, :limit] == ids[g * group_size, :limit]).all(0)
        prefix[g] = limit if same.all() else int(np.argmin(same))
    packed = prefix + np.add.reduceat(
        lens - np.repeat(prefix, group_size), np.arange(0, n, group_size)
    )
    if 1.0 - packed.sum() / max(lens.sum(), 1) < min_saving:
        return None
    lp = int(packed.max())
    p_ids = np.zeros((groups, lp), dtype=np.int64)
    p_pos = np.zeros((groups, lp), dtype=np.int64)
    seg = np.full((groups, lp), -1, dtype=np.int64)  # 0 the prefix, i + 1 row i, -1 padding
    index = np.zeros((n, width), dtype=np.int64)
    for g in range(groups):
        p = int(prefix[g])
        base = g * group_size
        p_ids[g, :p] = ids[base, :p]
        p_pos[g, :p] = np.arange(p)
        seg[g, :p] = 0
        at = p
        for i in range(group_size):
            b = base + i
            k = int(lens[b]) - p
            p_ids[g, at : at + k] = ids[b, p : p + k]
            p_pos[g, at : at + k] = np.arange(p, p + k)
            seg[g, at : at + k] = i + 1
            index[b, :p] = g * lp + np.arange(p)
            index[b, p : p + k] = g * lp + at + np.arange(k)
            index[b, p + k :] = g * lp  # padding: any valid place
            at += k
    q, k_ = seg[:, :, None], seg[:, None, :]
    causal = np.tril(np.ones((lp, lp), dtype=bool))[None]
    mask = causal & ((k_ == 0) | (k_ == q)) & (k_ >= 0) & (q >= 0)
    mask |= np.eye(lp, dtype=bool)[None] & (q < 0)  # padding attends to itself (no NaN)
    dev = batch.input_ids.device
    return SharedPrefix(
        torch.from_numpy(p_ids).to(dev), torch.from_numpy(p_pos).to(dev),
        torch.from_numpy(mask[:, None]).to(dev), torch.from_numpy(index).to(dev),
    )  # fmt: skip


def token_logprobs(
    forward_hidden: Callable[..., torch.Tensor],
    lm_head: torch.nn.Module,
    batch: RolloutBatch,
    *,
    with_entropy: bool = False,
    packed: SharedPrefix | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp (B, L), hidden (B, L, H), entropy (B, L) or None): ``logp[b, t]`` is the log-
    probability of token t given the tokens before it (0 where not written); only written
    positions are projected to the vocabulary. With ``packed`` (:func:`shared_prefix` of
    the batch), the groups' shared prefixes run once: the same values, fewer tokens."""
    if packed is None:
        hidden = forward_hidden(batch.input_ids, None, None)  # right-padded rows
    else:
        flat = forward_hidden(packed.input_ids, packed.mask, packed.position_ids)
        flat = flat.reshape(-1, flat.shape[-1])
        hidden = flat[packed.index]  # (B, L, H), each row's states in its own layout
    rows, cols = torch.nonzero(batch.written, as_tuple=True)
    logits = lm_head(hidden[rows, cols - 1]).float()  # (K, V)
    logp_all = F.log_softmax(logits, dim=-1)
    picked = logp_all.gather(1, batch.input_ids[rows, cols][:, None]).squeeze(1)
    logp = torch.zeros(batch.input_ids.shape, dtype=picked.dtype, device=picked.device)
    logp = logp.index_put((rows, cols), picked)
    ent = None
    if with_entropy:
        e = -(logp_all.exp() * logp_all).sum(-1)
        ent = torch.zeros_like(logp).index_put((rows, cols), e)
    return logp, hidden, ent
