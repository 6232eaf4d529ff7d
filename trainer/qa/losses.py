"""The QA losses as pure functions of tensors: span cross-entropy, halting episodes,
REINFORCE returns, GAE advantages, the policy-gradient, entropy and value losses.

The math the QA policy shares with the token-level RL stages (masked means, returns, GAE,
advantage normalisation, REINFORCE, the value loss, the entropy schedule) lives in
``trainer/rl_losses.py``; this module re-exports it under the names the QA code uses.

Shapes: ``B`` examples, ``T`` segments (padded), ``W`` positions per segment. Every
function takes the masks that say which entries are real and gives padded entries neither
value nor gradient (selection with ``torch.where``, never multiplication by 0 of a value
that may be infinite).

A halting episode over a document of ``n`` segments: the reader reads segment 0, then after
each segment ``t < n - 1`` decides CONTINUE (read segment t+1) or HALT; after segment
``n - 1`` it stops anyway (no decision). With ``h`` the segment after which it stops,
the episode's return is ``F1(answer after h) - cost * (h + 1)``, spread over the decisions
as rewards: ``-cost`` for each CONTINUE (the segment it makes the reader read) and the F1
on the last decision. (The first segment's cost, paid before any decision, is outside the
rewards but inside the reported return.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.rl_losses import (
    discounted_returns,
    entropy_coefficient,
    gae_advantages,
    masked_mean,
    reinforce_loss,
    value_loss,
)
from trainer.rl_losses import whiten as normalize_advantages

__all__ = [
    "CONTINUE",
    "HALT",
    "Episodes",
    "bernoulli_entropy",
    "discounted_returns",
    "entropy_bonus",
    "entropy_coefficient",
    "gae_advantages",
    "halt_log_prob",
    "halting_episodes",
    "masked_mean",
    "normalize_advantages",
    "policy_gradient_loss",
    "span_loss",
    "value_loss",
]

HALT, CONTINUE = 1.0, 0.0


# --------------------------------------------------------------------------- supervised


def span_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start_target: torch.Tensor,
    end_target: torch.Tensor,
    span_mask: torch.Tensor,
    segment_mask: torch.Tensor,
) -> torch.Tensor:
    """Span cross-entropy, averaged over the real segments.

    start_logits, end_logits: (B, T, W); start_target, end_target: (B, T) positions (0 =
    no answer in this segment); span_mask: (B, T, W) positions a span may use (masked
    logits take no probability); segment_mask: (B, T) real segments. Per segment
    ``(CE(start) + CE(end)) / 2``.
    """
    neg = torch.finfo(start_logits.dtype).min
    mask = span_mask & segment_mask[..., None]
    sl = start_logits.masked_fill(~mask, neg).log_softmax(-1)
    el = end_logits.masked_fill(~mask, neg).log_softmax(-1)
    st = torch.where(segment_mask, start_target, 0)[..., None]
    et = torch.where(segment_mask, end_target, 0)[..., None]
    nll = -(sl.gather(-1, st).squeeze(-1) + el.gather(-1, et).squeeze(-1)) / 2
    return masked_mean(nll, segment_mask)


# --------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class Episodes:
    """Halting episodes of a batch (see the module docstring)."""

    actions: torch.Tensor  # (B, T) float, HALT (1) / CONTINUE (0) at decision steps, else 0
    decision_mask: torch.Tensor  # (B, T) bool, the decisions taken (a prefix of each row)
    rewards: torch.Tensor  # (B, T) float, 0 outside decisions
    dones: torch.Tensor  # (B, T) bool, the last decision of each episode
    n_read: torch.Tensor  # (B,) int64 segments read (h + 1)
    final_f1: torch.Tensor  # (B,) F1 of the answer at the halt
    returns: torch.Tensor  # (B,) final_f1 - cost * n_read


def halting_episodes(
    halt: torch.Tensor, n_segments: torch.Tensor, prefix_f1: torch.Tensor, cost: float
) -> Episodes:
    """Episodes from sampled decisions: each row stops at its first HALT.

    halt: (B, T) bool, the decision that would be taken after each segment (samples or
    greedy); n_segments: (B,); prefix_f1: (B, T) F1 of the answer after reading ``0..t``;
    cost: the price of reading one segment (lambda).
    """
    b, t_max = halt.shape
    t = torch.arange(t_max, device=halt.device)[None, :]
    n = n_segments[:, None]
    can = t < n - 1  # a decision exists after segment t
    stops = halt & can
    first = torch.where(stops, t, t_max).min(dim=1).values  # (B,)
    h = torch.minimum(first, n_segments - 1)  # the segment after which reading stops
    decision_mask = can & (t <= h[:, None])
    last = torch.minimum(h, n_segments - 2)[:, None]  # the last decision (if any)
    dones = decision_mask & (t == last)
    halted = decision_mask & (t == h[:, None])  # only when h < n - 1
    f1 = prefix_f1.gather(1, h[:, None]).squeeze(1)
    zero = torch.zeros_like(prefix_f1)
    rewards = torch.where(decision_mask & ~halted, zero - cost, zero)
    rewards = rewards + torch.where(dones, f1[:, None].expand_as(prefix_f1), zero)
    return Episodes(
        actions=halted.to(prefix_f1.dtype),
        decision_mask=decision_mask,
        rewards=rewards,
        dones=dones,
        n_read=h + 1,
        final_f1=f1,
        returns=f1 - cost * (h + 1).to(f1.dtype),
    )


# --------------------------------------------------------------------------- policy


def halt_log_prob(halt_logit: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(action) of a Bernoulli HALT policy with logit ``halt_logit``."""
    return actions * F.logsigmoid(halt_logit) + (1.0 - actions) * F.logsigmoid(-halt_logit)


def bernoulli_entropy(halt_logit: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the HALT / CONTINUE distribution, elementwise."""
    p = torch.sigmoid(halt_logit)
    return p * F.softplus(-halt_logit) + (1.0 - p) * F.softplus(halt_logit)


def policy_gradient_loss(
    halt_logit: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """REINFORCE: ``-mean(A_t * log pi(a_t | s_t))`` over the decisions (A is a constant)."""
    return reinforce_loss(halt_log_prob(halt_logit, actions), advantages, mask)


def entropy_bonus(halt_logit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean policy entropy over the decisions (subtract ``coef *`` this from the loss)."""
    return masked_mean(bernoulli_entropy(halt_logit), mask)
