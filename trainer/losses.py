"""Loss math of the algorithms, as small pure functions of tensors.

Nothing here owns a module or an optimizer: each function maps tensors to a tensor, so
``tests/trainer/test_losses.py`` can hold it against a NumPy reference. Shapes use ``K``
for the ensemble (critics), ``B`` for the batch, ``M`` for sampled actions per state,
``A`` for the action dimension and ``n`` for the number of discrete actions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------- values
def td_target(
    rewards: torch.Tensor, terminated: torch.Tensor, next_value: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``r + gamma * (1 - terminated) * V(s')``: no bootstrap where the episode really ended.

    ``rewards`` and ``terminated`` are (B,); ``next_value`` is (B,) or (K, B) and the
    result has its shape. Truncated transitions bootstrap as usual.
    """
    return rewards + gamma * (1.0 - terminated) * next_value


def q_regression_loss(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared TD error, averaged over the batch and summed over the ensemble.

    ``q`` is (K, B), ``target`` (B,) and detached by the caller. Summing over critics gives
    each critic the gradient it would get alone.
    """
    return (q - target).square().mean(dim=-1).sum()


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric squared loss ``|tau - 1(u < 0)| * u^2`` averaged, with ``u = target - v``.

    With ``expectile`` > 0.5, under-estimates (u > 0) cost more, so V tracks an upper
    expectile of Q over the data's actions (IQL's value loss).
    """
    weight = torch.where(diff < 0.0, 1.0 - expectile, expectile)
    return (weight * diff.square()).mean()


def double_dqn_target(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_q_online: torch.Tensor,
    next_q_target: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Double-DQN target: the online ensemble picks ``a*``, the target ensemble scores it.

    ``next_q_online`` and ``next_q_target`` are (K, B, n). ``a* = argmax_a mean_k
    Q_k(s', a)`` and the bootstrap value is ``min_k Q'_k(s', a*)``. Returns (B,).
    """
    best = next_q_online.mean(dim=0).argmax(dim=-1)  # (B,)
    index = best.view(1, -1, 1).expand(next_q_target.shape[0], -1, 1)
    next_value = next_q_target.gather(-1, index).squeeze(-1).amin(dim=0)  # (B,)
    return td_target(rewards, terminated, next_value, gamma)


# ----------------------------------------------------------------------------- policies
def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Log-density of a diagonal Gaussian, summed over the last dimension: (..., A) -> (...)."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std).sum(dim=-1) - HALF_LOG_2PI * x.shape[-1]


def tanh_log_det_jacobian(pre_tanh: torch.Tensor) -> torch.Tensor:
    """``sum log(1 - tanh(u)^2)`` over the last dimension, in a form stable for large ``|u|``."""
    return (2.0 * (LOG_2 - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(dim=-1)


def tanh_gaussian_log_prob(
    pre_tanh: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
) -> torch.Tensor:
    """Log-density of ``a = tanh(u)``, ``u ~ N(mean, std)``, evaluated at ``u = pre_tanh``."""
    return gaussian_log_prob(pre_tanh, mean, log_std) - tanh_log_det_jacobian(pre_tanh)


def clipped_atanh(action: torch.Tensor, eps: float) -> torch.Tensor:
    """``atanh`` of actions in [-1, 1], clipped to ``[-1 + eps, 1 - eps]`` first.

    Logged actions often sit exactly on the bounds, where ``atanh`` is infinite.
    """
    return torch.atanh(action.clamp(-1.0 + eps, 1.0 - eps))


def categorical_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[a]``: (B, n), (B,) int64 -> (B,)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """Advantage weights ``min(exp(beta * adv), max_weight)`` (no gradient flows through)."""
    return torch.exp(beta * advantage.detach()).clamp(max=max_weight)


def awr_loss(log_prob: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted negative log-likelihood of the data's actions, ``-mean(w * log pi(a|s))``."""
    return -(weights * log_prob).mean()


def sac_actor_loss(
    q: torch.Tensor, log_prob: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """SAC policy loss ``mean(alpha * log pi(a~|s) - Q(s, a~))``; ``temperature`` detached."""
    return (temperature * log_prob - q).mean()


def temperature_loss(
    log_temperature: torch.Tensor, log_prob: torch.Tensor, target_entropy: float
) -> torch.Tensor:
    """Loss on ``log alpha`` that raises alpha while the entropy is below ``target_entropy``."""
    return -(log_temperature * (log_prob.detach() + target_entropy).mean())


# ----------------------------------------------------------------------------- CQL
def cql_logsumexp_penalty(
    q_data: torch.Tensor, q_sampled: torch.Tensor, log_density: torch.Tensor | float
) -> torch.Tensor:
    """Conservative gap ``mean_B [logsumexp_m (Q(s, a_m) - log p(a_m)) - Q(s, a_data)]``.

    ``q_data`` is (K, B); ``q_sampled`` (K, B, M) holds Q at M actions per state drawn from
    proposal densities ``log_density`` (broadcastable to (K, B, M), detached): subtracting
    it is the importance correction that turns the sum over samples into an estimate of
    ``log integral exp Q(s, a) da``. For a discrete action set pass all n actions and
    ``log_density = 0``. Returns the gap per critic, (K,).
    """
    lse = torch.logsumexp(q_sampled - log_density, dim=-1)  # (K, B)
    return (lse - q_data).mean(dim=-1)


def discrete_cql_penalty(q_all: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Discrete CQL gap ``mean_B [logsumexp_a Q(s, a) - Q(s, a_data)]`` per critic: (K,)."""
    index = actions.view(1, -1, 1).expand(q_all.shape[0], -1, 1)
    q_data = q_all.gather(-1, index).squeeze(-1)  # (K, B)
    return cql_logsumexp_penalty(q_data, q_all, 0.0)


def cql_alpha_loss(
    log_alpha: torch.Tensor, penalty: torch.Tensor, target_gap: float
) -> torch.Tensor:
    """Lagrangian loss on ``log alpha``: alpha grows while the gap exceeds ``target_gap``.

    ``penalty`` is the per-critic gap (K,), detached here.
    """
    alpha = log_alpha.exp().clamp(0.0, 1e6)
    return -(alpha * (penalty.detach() - target_gap)).mean()
