"""Policy-gradient loss math as pure functions of tensors: GAE and returns, PPO's clipped
policy and value losses, KL to a reference, entropy, REINFORCE and its baselines.

The token-level RL stages (PPO, REINFORCE on the text policy) and the QA halting policy
share these functions; ``trainer/qa/losses.py`` re-exports the ones it uses. Nothing here
owns a module or an optimizer, so ``tests/trainer/test_rl_losses.py`` holds each function
against a plain-loop reference.

Shapes: ``B`` rows (sampled sequences or episodes), ``T`` positions per row, ``V`` the
vocabulary. A ``mask`` (bool, the shape of the values) says which entries are the policy's
own decisions: for a token sequence, the tokens the policy wrote (not the prompt, the
environment's or other roles' tokens, nor padding). Masked-out entries get neither value
nor gradient: they are dropped with ``torch.where``, never multiplied by 0, so a padded
entry may hold ``inf`` or ``nan``.

Time steps. In a token sequence the steps of the MDP are the policy tokens of a row, in
order; the tokens between two of them (an observation, a tool result) are part of the
transition, not steps. Recursions over time (:func:`token_gae`, :func:`token_returns`)
therefore pass over masked positions: the bootstrap of a policy token is the value of the
row's next policy token, however many masked positions lie between. The last policy token
of a row is terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from trainer.config import ConfigError

KLEstimator = Literal["k1", "k2", "k3"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the true entries of ``mask`` (0 when there is none); a scalar.

    x: any shape; mask: bool, the same shape (or broadcastable to it).
    """
    m = mask.to(x.dtype)
    return torch.where(mask, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1.0)


# --------------------------------------------------------------------------- returns, GAE


def _step_factor(
    value: float, turn_end: torch.Tensor | None, like: torch.Tensor
) -> float | torch.Tensor:
    """``value`` at every step, or (B, T): ``value`` at turn ends, 1 inside a turn (the
    dtype and device of ``like``)."""
    if turn_end is None:
        return value
    return torch.where(turn_end, torch.full_like(like, value), torch.ones_like(like))


def _at(x: float | torch.Tensor, t: int) -> float | torch.Tensor:
    """Column ``t`` of a (B, T) factor, or the scalar itself."""
    return x[:, t] if isinstance(x, torch.Tensor) else x


def discounted_returns(
    rewards: torch.Tensor,
    dones: torch.Tensor | None,
    mask: torch.Tensor,
    gamma: float | torch.Tensor,
) -> torch.Tensor:
    """Discounted returns ``G_t = r_t + gamma_t * G_next``, 0 at masked entries; (B, T).

    rewards: (B, T); dones: (B, T) bool or None, no bootstrap past a done (the end of each
    row is terminal anyway); mask: (B, T) bool, the steps; ``G_next`` is the return of the
    row's next step (masked positions are passed over, their rewards ignored); gamma: a
    float, or (B, T), the discount from step ``t`` to the next step.
    """
    out = torch.zeros_like(rewards)
    g = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        if dones is None:
            g_t = rewards[:, t] + _at(gamma, t) * g
        else:
            g_t = rewards[:, t] + _at(gamma, t) * g * (~dones[:, t]).to(rewards.dtype)
        g = torch.where(mask[:, t], g_t, g)
        out[:, t] = torch.where(mask[:, t], g_t, torch.zeros_like(g_t))
    return out


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor | None,
    mask: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and their value targets, (B, T) each, 0 where masked.

    rewards, values: (B, T) (values are detached here); dones: (B, T) bool or None; mask:
    (B, T) bool, the steps; gamma, lam: floats, or (B, T) factors of the step from ``t`` to
    the next. With ``next`` the row's next step after ``t`` (masked positions passed over;
    after the row's last step ``V_next = A_next = 0``)::

        delta_t = r_t + gamma_t * V_next * (1 - done_t) - V_t
        A_t     = delta_t + gamma_t * lam_t * (1 - done_t) * A_next
        target_t = A_t + V_t

    ``lam = 1`` gives the discounted return minus the baseline; ``lam = 0`` one-step TD.
    """
    values = values.detach()
    adv = torch.zeros_like(rewards)
    a_next = torch.zeros_like(rewards[:, 0])
    v_next = torch.zeros_like(rewards[:, 0])
    gl = gamma * lam
    for t in range(rewards.shape[1] - 1, -1, -1):
        g_t, gl_t = _at(gamma, t), _at(gl, t)
        if dones is None:
            delta = rewards[:, t] + g_t * v_next - values[:, t]
            a = delta + gl_t * a_next
        else:
            live = (~dones[:, t]).to(rewards.dtype)
            delta = rewards[:, t] + g_t * v_next * live - values[:, t]
            a = delta + gl_t * live * a_next
        m = mask[:, t]
        adv[:, t] = torch.where(m, a, torch.zeros_like(a))
        a_next = torch.where(m, a, a_next)
        v_next = torch.where(m, values[:, t], v_next)
    targets = torch.where(mask, adv + values, torch.zeros_like(adv))
    return adv, targets


def token_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    turn_end: torch.Tensor,
    gamma: float,
    lam: float,
    per_turn: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the policy's tokens: (advantages, returns), (B, T) each, 0 where masked.

    rewards: (B, T), a turn's reward on its last policy token (see
    :func:`place_turn_rewards`; a per-token term such as a KL penalty may sit on any policy
    token; rewards at masked positions are ignored); values: (B, T) the value head at each
    token (detached here); mask: (B, T) bool, the policy's tokens; turn_end: (B, T) bool,
    the last policy token of each turn.

    The steps are the policy tokens of a row in order (masked positions passed over: the
    bootstrap of a turn's last token is the value of the first policy token of the next
    turn). The row's last policy token is terminal. ``per_turn=False``: ``gamma`` and
    ``lam`` apply at every step. ``per_turn=True``: the turn is the time step, so both apply
    only on the step out of a turn's last token and are 1 inside a turn (a token's advantage
    is then the rest of its turn's rewards, plus ``gamma`` times the next turn's value and
    ``gamma * lam`` times its advantage, minus its own value). ``returns = advantages +
    values``, the value head's targets. See :func:`gae_advantages` for the recursion.
    """
    te = turn_end if per_turn else None
    return gae_advantages(
        rewards,
        values,
        None,
        mask,
        _step_factor(gamma, te, rewards),
        _step_factor(lam, te, rewards),
    )


def token_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    turn_end: torch.Tensor,
    gamma: float,
    per_turn: bool = False,
) -> torch.Tensor:
    """Discounted reward-to-go at each policy token, (B, T), 0 where masked.

    The steps and discounts of :func:`token_gae` (equal to its returns with ``lam = 1`` and
    zero values): rewards, mask, turn_end are (B, T).
    """
    return discounted_returns(
        rewards, None, mask, _step_factor(gamma, turn_end if per_turn else None, rewards)
    )


def place_turn_rewards(turn_rewards: torch.Tensor, turn_end: torch.Tensor) -> torch.Tensor:
    """(B, T) rewards with the ``k``-th turn's reward on the row's ``k``-th turn end.

    turn_rewards: (B, K), a row's turn rewards in order (padding after its last turn);
    turn_end: (B, T) bool, at most K true entries per row (more would reuse the last).
    """
    k = turn_rewards.shape[1]
    idx = (turn_end.long().cumsum(1) - 1).clamp(0, k - 1)  # (B, T) turn of each position
    placed = turn_rewards.gather(1, idx)
    return torch.where(turn_end, placed, torch.zeros_like(placed))


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over the true entries of ``mask``; masked entries are 0.

    x, mask: the same shape. ``std`` is the unbiased (n - 1) standard deviation of the
    masked entries. Advantage normalisation, for the QA policy and the token policies.
    """
    n = mask.sum().clamp(min=1).to(x.dtype)
    mean = masked_mean(x, mask)
    var = torch.where(mask, (x - mean) ** 2, torch.zeros_like(x)).sum() / (n - 1).clamp(min=1)
    out = (x - mean) / (var.sqrt() + eps)
    return torch.where(mask, out, torch.zeros_like(out))


# --------------------------------------------------------------------------- baselines


def leave_one_out_baseline(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's baseline: the mean reward of the OTHER samples of its group; (N,).

    rewards: (N,) float, one per sample (e.g. the return of a sampled completion);
    group_ids: (N,) int, the prompt each sample answers (any integers, in any order). A
    group of one has no other sample: its baseline is 0, so its advantage is its reward
    (a plain REINFORCE term, still unbiased; using its own reward would cancel its signal).
    Memory is O(N^2): N is the number of samples in a rollout batch, not tokens.
    """
    n = rewards.shape[0]
    same = group_ids[:, None] == group_ids[None, :]  # (N, N)
    others = same & ~torch.eye(n, dtype=torch.bool, device=rewards.device)
    total = torch.where(others, rewards[None, :], torch.zeros_like(rewards)[None, :]).sum(1)
    count = others.sum(1).to(rewards.dtype)
    return torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))


def value_baseline_advantages(
    returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``returns - values`` (values detached) at the true entries of ``mask``, else 0.

    returns, values, mask: the same shape, e.g. (B, T) from :func:`token_returns`.
    """
    return torch.where(mask, returns - values.detach(), torch.zeros_like(returns))


def sequence_to_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-row value (B,) on each of the row's policy tokens, (B, T); 0 where masked."""
    wide = x[:, None].expand(mask.shape)
    return torch.where(mask, wide, torch.zeros_like(wide))


# --------------------------------------------------------------------------- policy losses


def reinforce_loss(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """REINFORCE: ``-mean(A_t * log pi(a_t | s_t))`` over the masked entries; a scalar.

    logp: (B, T) log-probability of each taken action (token) under the current policy;
    advantages: (B, T), a constant (detached here); mask: (B, T) bool.
    """
    adv = torch.where(mask, advantages.detach(), torch.zeros_like(logp))  # no 0 * nan gradient
    return -masked_mean(adv * logp, mask)


@dataclass(frozen=True)
class PolicyLoss:
    """PPO's clipped surrogate and its metrics (scalars; the metrics are detached)."""

    loss: torch.Tensor  # () the clipped surrogate, to minimise
    clip_fraction: torch.Tensor  # () share of tokens whose clipped term is the active one
    approx_kl: torch.Tensor  # () k3 estimate of KL(old || new): mean((r - 1) - log r)


def ppo_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> PolicyLoss:
    """PPO's clipped surrogate, mean over the masked tokens.

    logp_new: (B, T) log pi(token) under the policy being trained; logp_old: (B, T) under
    the rollout policy; advantages: (B, T); mask: (B, T) bool; clip: epsilon. With
    ``r = exp(logp_new - logp_old)``: ``loss = mean(max(-A r, -A clamp(r, 1 - eps, 1 +
    eps)))``, so a token whose ratio is already past the clip in the direction its
    advantage pushes gets no gradient. ``clip_fraction`` is the share of masked tokens where
    the clipped term is strictly larger (TRL's ``clipfrac``); ``approx_kl`` the k3
    estimator ``mean((r - 1) - log r)`` (>= 0).
    """
    log_ratio = torch.where(mask, logp_new - logp_old.detach(), torch.zeros_like(logp_new))
    ratio = log_ratio.exp()
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


# --------------------------------------------------------------------------- value losses


def value_loss(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((V - target)^2)`` over the masked entries (targets detached); a scalar."""
    diff = torch.where(mask, values - targets.detach(), torch.zeros_like(values))
    return 0.5 * masked_mean(diff**2, mask)


@dataclass(frozen=True)
class ValueLoss:
    """PPO's clipped value loss and its metric (scalars; the metric is detached)."""

    loss: torch.Tensor  # () 0.5 * mean(max(unclipped, clipped squared error))
    clip_fraction: torch.Tensor  # () share of tokens where the clipped error is larger


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> ValueLoss:
    """PPO's clipped value loss, masked mean.

    values: (B, T) the value head now; old_values: (B, T) at the rollout; returns: (B, T)
    the targets; mask: (B, T) bool; clip: epsilon, or None for the plain
    :func:`value_loss`. ``V_clip = V_old + clamp(V - V_old, -eps, eps)``;
    ``loss = 0.5 * mean(max((V - R)^2, (V_clip - R)^2))``.
    """
    if clip is None:
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        return ValueLoss(loss=value_loss(values, returns, mask), clip_fraction=zero)
    zero = torch.zeros_like(values)
    values = torch.where(mask, values, zero)  # masked entries may be nan: no gradient through
    old = torch.where(mask, old_values.detach(), zero)
    target = torch.where(mask, returns.detach(), zero)
    v_clip = old + (values - old).clamp(-clip, clip)
    unclipped = (values - target) ** 2
    clipped = (v_clip - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLoss(loss=loss, clip_fraction=frac)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over the masked entries; ``nan`` when ``Var[R] = 0``.

    values, returns, mask: the same shape. 1 is a perfect value head, 0 one no better than
    the mean return, below 0 worse. (A detached scalar.)
    """
    with torch.no_grad():
        r_mean = masked_mean(returns, mask)
        var_r = masked_mean((returns - r_mean) ** 2, mask)
        diff = returns - values
        var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
        nan = torch.full_like(var_r, float("nan"))
        return torch.where(var_r > 0, 1.0 - var_d / torch.where(var_r > 0, var_r, 1.0), nan)


# --------------------------------------------------------------------------- KL, entropy


def kl_to_reference(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token estimates of KL(pi || pi_ref) on tokens sampled from pi, and their mean.

    logp, logp_ref: (B, T) log-probability of each sampled token under the policy and the
    frozen reference; mask: (B, T) bool. With ``d = logp - logp_ref``: ``k1 = d`` (unbiased,
    may be negative), ``k2 = d^2 / 2``, ``k3 = exp(-d) - 1 + d`` (unbiased and >= 0;
    Schulman's estimators). Returns ((B, T) per token, 0 where masked; () masked mean).
    Gradients flow through ``logp`` (the reference is detached); as a reward penalty the
    caller detaches.
    """
    d = torch.where(mask, logp - logp_ref.detach(), torch.zeros_like(logp))
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d**2
    elif estimator == "k3":
        kl = torch.exp(-d) - 1.0 + d
    else:
        raise ConfigError(f"kl estimator: unknown {estimator!r}; use one of k1, k2, k3")
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl, masked_mean(kl, mask)


class KLController(Protocol):
    """The KL penalty's coefficient: read ``value``, ``update`` once per rollout batch."""

    value: float

    def update(self, kl: float, n_steps: int) -> None:
        """Adjust ``value`` after a batch of ``n_steps`` samples whose mean KL was ``kl``."""

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint keeps."""

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict`."""


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float) -> None:
        if not coef >= 0:
            raise ConfigError(f"kl_coef: must be >= 0, got {coef!r}")
        self.value = float(coef)

    def update(self, kl: float, n_steps: int) -> None:
        """Nothing to adjust."""

    def state_dict(self) -> dict[str, float]:
        """``{"value": coef}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019)'s adaptive KL coefficient, aiming the KL at ``target``.

    After a batch of ``n_steps`` samples with mean KL ``kl``::

        e = clip(kl / target - 1, -0.2, 0.2)
        coef *= 1 + e * n_steps / horizon
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if not init_coef >= 0:
            raise ConfigError(f"kl_coef: must be >= 0, got {init_coef!r}")
        if not target > 0:
            raise ConfigError(f"kl_target: must be > 0, got {target!r}")
        if not horizon > 0:
            raise ConfigError(f"kl_horizon: must be > 0, got {horizon!r}")
        self.value = float(init_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        """One step of the proportional rule above."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """``{"value": coef}`` (target and horizon come from the config)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient."""
        self.value = float(state["value"])


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax over the last axis, computed in float32: (..., V) -> (...).

    The logits must be finite (the training forward's, not top-k-filtered ones).
    """
    z = logits.float()
    logp = F.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token entropy over the masked positions; a float32 scalar.

    logits: (B, T, V) the policy's logits at each position that predicts a policy token;
    mask: (B, T) bool. Add ``-coef *`` this to the loss as a bonus (see
    :func:`entropy_coefficient`).
    """
    return masked_mean(token_entropy(logits), mask)


def entropy_coefficient(step: int, start: float, decay: float, floor: float) -> float:
    """The entropy bonus at stage step ``step``: ``max(start * decay**step, floor)``."""
    return max(start * decay**step, floor)
