"""How a student is judged: per-span loss and accuracy, action accuracy, and acting online.

Offline (held-out episodes of the store, teacher-forced):

- ``eval/span_loss/NAME`` and ``eval/token_accuracy/NAME``: mean cross-entropy and greedy
  next-token accuracy over the tokens labelled NAME (every span, and ``other``);
- ``eval/action_accuracy``: for each action span (one per policy turn in the demo), does
  greedy decoding, started where the teacher's action starts (everything before it
  teacher-forced), write exactly the teacher's action tokens and then the token that
  follows the span (the start of its closing tag)? Greedy decoding reproduces a token
  sequence exactly when the argmax at each of its positions, given the teacher's prefix, is
  that token; so one teacher-forced pass scores every action of an episode at once, with
  no generation loop. (:func:`greedy_action_matches` is the generation loop, for tests.)

Online (with the store's text environment): the student plays ``episodes`` episodes
through its own generated text, all in lockstep, one ``generate`` call per turn for the
batch: the prompt and the environment's replies are laid out exactly as the store lays
them out (``SequenceText``), the student's turns are its own tokens, the action is parsed
from them with the store's ``action`` span pattern. ``eval/success_rate``,
``eval/return_mean``, ``eval/turns_mean`` and ``eval/parse_failure_rate``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from trainer.agent.data import SequenceArrays, collate
from trainer.agent.losses import target_positions


def action_runs(labels: np.ndarray, action_code: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``labels`` (B, L): which target positions ``j`` (token j predicted from
    j - 1) score an action span, and the span's number (0.. within the batch).

    A span's scored targets are its tokens and the one token right after it (when that
    token is trained: the policy wrote it, e.g. the closing tag). Returns
    ``(scored (B, L) bool, run (B, L) int64, -1 where not scored)``.
    """
    B, L = labels.shape
    is_a = labels == action_code
    prev_a = np.zeros_like(is_a)
    prev_a[:, 1:] = is_a[:, :-1]
    start = is_a & ~prev_a
    closing = prev_a & ~is_a & (labels > 0)  # the closing tag's first token (a trained label)
    scored = is_a | closing
    scored[:, 0] = False  # the first token of a row is never predicted
    run_no = np.cumsum(start.reshape(-1)).reshape(B, L) - 1  # closing belongs to the span before
    run = np.where(scored, run_no, -1)
    return scored, run


def greedy_action_matches(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ids: list[int],
    labels: list[int],
    action_code: int,
) -> list[bool]:
    """The plain generation loop: for each action span of one episode, decode greedily from
    the teacher's prefix for as many tokens as the span has plus one, and compare."""
    out = []
    j = 0
    n = len(ids)
    while j < n:
        if labels[j] == action_code and (j == 0 or labels[j - 1] != action_code):
            end = j
            while end < n and labels[end] == action_code:
                end += 1
            want = ids[j : min(end + 1, n)]
            ctx = list(ids[:j])
            got = []
            for _ in range(len(want)):
                nxt = int(logits_fn(torch.tensor([ctx]))[0, -1].argmax())
                got.append(nxt)
                ctx.append(nxt)
            out.append(got == want)
            j = end
        else:
            j += 1
    return out


@torch.no_grad()
def offline_metrics(
    forward: Callable[[Any], torch.Tensor],
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    arrays: SequenceArrays,
    episodes: np.ndarray,
    *,
    label_names: list[str],
    weights: torch.Tensor,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> dict[str, float]:
    """Teacher-forced metrics over ``episodes`` (see the module docstring).

    ``forward(batch)`` gives the (B, L, H) hidden states of a :class:`TokenBatch`.
    """
    n_labels = len(label_names)
    sums = np.zeros(n_labels)
    hits = np.zeros(n_labels)
    counts = np.zeros(n_labels)
    w = weights.double().numpy()
    action_code = label_names.index("action") if "action" in label_names else None
    act_ok = act_n = 0
    lengths = arrays.lengths[episodes]
    order = episodes[np.argsort(lengths, kind="stable")]  # similar lengths together: less padding
    for a in range(0, len(order), batch_size):
        batch = collate(arrays, order[a : a + batch_size], pad_id).to(device)
        with autocast():
            hidden = forward(batch)
        rows, cols = target_positions(batch)
        logits = lm_head(hidden[rows, cols]).float()
        targets = batch.input_ids[rows, cols + 1]
        lab = batch.labels[rows, cols + 1].cpu().numpy()
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu().numpy()
        ok = (logits.argmax(-1) == targets).cpu().numpy()
        np.add.at(sums, lab, ce)
        np.add.at(hits, lab, ok)
        np.add.at(counts, lab, 1)
        if action_code is not None:
            labels_np = batch.labels.cpu().numpy()
            scored, run = action_runs(labels_np, action_code)
            # correctness of every scored target: argmax at j - 1 equals token j
            correct = np.zeros(labels_np.shape, dtype=bool)
            r_np, c_np = rows.cpu().numpy(), cols.cpu().numpy() + 1
            correct[r_np, c_np] = ok
            if scored.any():
                runs = run[scored]
                good = correct[scored]
                n_runs = int(runs.max()) + 1
                bad = np.zeros(n_runs, dtype=bool)
                np.logical_or.at(bad, runs, ~good)
                act_ok += int((~bad).sum())
                act_n += n_runs
    out: dict[str, float] = {}
    trained = counts[1:].sum()
    denom = float((w[1:] * counts[1:]).sum())
    out["eval/loss"] = float((w * sums).sum() / denom) if denom > 0 else float("nan")
    out["eval/ce"] = float(sums[1:].sum() / trained) if trained else float("nan")
    out["eval/token_accuracy"] = float(hits[1:].sum() / trained) if trained else float("nan")
    for c in range(1, n_labels):
        if counts[c]:
            out[f"eval/span_loss/{label_names[c]}"] = float(sums[c] / counts[c])
            out[f"eval/token_accuracy/{label_names[c]}"] = float(hits[c] / counts[c])
    if action_code is not None:
        out["eval/action_accuracy"] = act_ok / act_n if act_n else float("nan")
        out["eval/actions"] = float(act_n)
    out["eval/episodes"] = float(len(episodes))
    return out


# --------------------------------------------------------------------------- online


def turn_tail(text: Any, role: str) -> list[int]:
    """The ids a turn has after its end marker (context, e.g. a newline), from the store's
    own layout of a turn."""
    ids = list(text.turn_ids(role, "x", False))
    end = text.end_id
    last = max(i for i, t in enumerate(ids) if t == end) if end in ids else len(ids) - 1
    return ids[last + 1 :]


@torch.no_grad()
def play_online(
    model: Any,
    text: Any,
    make_env: Callable[[], Any],
    seeds: list[int],
    *,
    policy_role: str,
    env_role: str,
    action_pattern: str,
    max_new_tokens: int,
    max_turns: int,
    device: torch.device,
    temperature: float = 0.0,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    max_context: int | None = None,
) -> dict[str, Any]:
    """The student acts in ``len(seeds)`` episodes of the text env, in lockstep (see the
    module docstring; :func:`trainer.agent.rollouts.collect` plays them). Returns the
    ``eval/*`` metrics and the episodes' transcripts."""
    from trainer.agent.rollouts import collect

    eps = collect(
        model, text, make_env, seeds, policy_role=policy_role, env_role=env_role,
        action_pattern=action_pattern, max_new_tokens=max_new_tokens, max_turns=max_turns,
        device=device, temperature=temperature, max_context=max_context, autocast=autocast,
    )  # fmt: skip
    n = len(eps)
    turns = sum(len(e.texts) for e in eps)
    returns = [sum(e.env_rewards) for e in eps]
    return {
        "metrics": {
            "eval/success_rate": sum(e.success for e in eps) / n,
            "eval/return_mean": float(np.mean(returns)),
            "eval/return_std": float(np.std(returns)),
            "eval/turns_mean": turns / n,
            "eval/parse_failure_rate": sum(e.parse_failures for e in eps) / max(turns, 1),
            "eval/online_episodes": float(n),
        },
        "transcripts": [
            [
                x
                for said, obs in zip(e.texts, e.observations)
                for x in ((policy_role, said), (env_role, obs))
            ]
            for e in eps
        ],
    }
