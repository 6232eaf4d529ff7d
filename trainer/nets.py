"""Networks: MLPs, ensembled critics, actors, and the observation / action scalers.

The twin (or K-member) critics are ONE module whose weights are shaped
``(K, in, out)``: a forward pass is one ``baddbmm`` per layer for the whole ensemble,
not K small matmuls. Value nets and actors are the same module with K = 1. Hidden layers
can run in bfloat16 (``compute_dtype``) with float32 master weights and a float32 output
layer.

Continuous actions live in a "unit" space inside the algorithms: for finite bounds,
``a_unit = (a - center) / half_range`` lies in [-1, 1] and actors are tanh-squashed
Gaussians; for infinite bounds actions are used as they are with a plain Gaussian.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from trainer.losses import clipped_atanh, gaussian_log_prob, tanh_gaussian_log_prob

LOG_STD_MIN = -5.0
LOG_STD_MAX = 2.0
# Data actions are clipped this far inside [-1, 1] before atanh (unit action space).
ACTION_EPS = 1e-4


# ----------------------------------------------------------------------------- scalers
class ObsNormalizer(nn.Module):
    """``(obs - mean) / std`` with the store manifest's statistics, held as buffers.

    Features with (near) zero spread are centred but not scaled.
    """

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(-1)
        std_t = torch.as_tensor(np.asarray(std, dtype=np.float32)).reshape(-1)
        if mean_t.shape != std_t.shape:
            raise ValueError(f"obs_mean has {mean_t.numel()} values but obs_std {std_t.numel()}")
        std_t = torch.where(torch.isfinite(std_t) & (std_t > 1e-6), std_t, torch.ones_like(std_t))
        self.register_buffer("mean", torch.nan_to_num(mean_t))
        self.register_buffer("scale", 1.0 / std_t)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) * self.scale


class ActionScaler(nn.Module):
    """Maps continuous actions between the env's box and the unit space of the actors."""

    center: torch.Tensor
    half_range: torch.Tensor

    def __init__(self, low: np.ndarray | None, high: np.ndarray | None, dim: int) -> None:
        super().__init__()
        lo = (
            np.full(dim, -np.inf)
            if low is None
            else np.broadcast_to(np.asarray(low, np.float64), (dim,))
        )
        hi = (
            np.full(dim, np.inf)
            if high is None
            else np.broadcast_to(np.asarray(high, np.float64), (dim,))
        )
        self.bounded = bool(np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)))
        if self.bounded:
            if np.any(hi <= lo):
                raise ValueError(f"action bounds need low < high, got low={lo} high={hi}")
            center, half = (hi + lo) / 2.0, (hi - lo) / 2.0
        else:
            center, half = np.zeros(dim), np.ones(dim)
        self.register_buffer("center", torch.as_tensor(center, dtype=torch.float32))
        self.register_buffer("half_range", torch.as_tensor(half, dtype=torch.float32))

    def to_unit(self, action: torch.Tensor) -> torch.Tensor:
        return (action - self.center) / self.half_range

    def from_unit(self, unit_action: torch.Tensor) -> torch.Tensor:
        return unit_action * self.half_range + self.center


# ----------------------------------------------------------------------------- ensembles
def is_low_precision(dtype: torch.dtype | None) -> bool:
    return dtype is not None and dtype != torch.float32


# Below this many rows a single member's output layer is faster as one baddbmm: the
# custom function's Python overhead eats what it saves (an ensemble's never is).
SCALAR_OUTPUT_MIN_ROWS = 2048
# Rows upcast to float32 at a time when the hidden activations are bfloat16 (~2 MB).
SCALAR_OUTPUT_CHUNK = 2048


class _ScalarOutput(torch.autograd.Function):
    """``y_k = h_k @ w_k + b_k`` with ONE output: (K, N, H), (K, H, 1), (K, 1, 1) -> (K, N, 1).

    A batched matmul with a single output column runs far below memory speed on CPU (the
    forward, and worse the outer-product input gradient and the weight gradient). Per
    member matrix-vector products, a broadcast multiply and the weight gradient computed
    transposed (``g^T h``) give the same values ~3x faster: it pays for every ensemble
    (twin critics) and for large single-member batches such as CQL's sampled-action
    penalty. ``h`` may be bfloat16 (``w``, ``b`` and the output are float32): rows are then
    upcast a chunk at a time and the input gradient is written in ``h``'s dtype, so no full
    float32 copy of the large activation is ever made.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(h, w)
        k_members, n = h.shape[:2]
        out = w.new_empty(k_members, n)
        chunk = n if h.dtype == w.dtype else SCALAR_OUTPUT_CHUNK
        for k in range(k_members):
            for s in range(0, n, chunk):
                rows = slice(s, s + chunk)
                torch.addmv(b[k, 0], h[k, rows].to(w.dtype), w[k, :, 0], out=out[k, rows])
        return out.unsqueeze(-1)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        h, w = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_h = grad_w = grad_b = None
        if needs[0]:  # (K, N, 1) * (K, 1, H), computed in float32, stored in h's dtype
            grad_h = torch.mul(grad, w.transpose(1, 2), out=torch.empty_like(h))
        if needs[1] and h.dtype == w.dtype:  # (K, 1, N) @ (K, N, H) -> (K, 1, H)
            grad_w = torch.bmm(grad.transpose(1, 2), h).transpose(1, 2)
        elif needs[1]:
            g = grad[..., 0]
            grad_w = torch.zeros_like(w[..., 0])
            for k in range(h.shape[0]):
                for s in range(0, h.shape[1], SCALAR_OUTPUT_CHUNK):
                    rows = slice(s, s + SCALAR_OUTPUT_CHUNK)
                    grad_w[k].addmv_(h[k, rows].to(w.dtype).t(), g[k, rows])
            grad_w = grad_w.unsqueeze(-1)
        if needs[2]:
            grad_b = grad.sum(dim=1, keepdim=True)
        return grad_h, grad_w, grad_b


class EnsembleLinear(nn.Module):
    """K independent linear layers, ``y_k = x_k @ W_k + b_k``, weights (K, in, out)."""

    def __init__(self, n_members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(n_members, 1, out_dim))
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self, x: torch.Tensor, detach_params: bool = False, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """(K, B, in) -> (K, B, out); ``dtype``: the matmul's dtype (x must have it already)."""
        w: torch.Tensor = self.weight
        b: torch.Tensor = self.bias
        if detach_params:
            w, b = w.detach(), b.detach()
        if is_low_precision(dtype):
            w, b = w.to(dtype), b.to(dtype)
        if self.scalar_path(x):
            return _ScalarOutput.apply(x, w, b)
        return torch.baddbmm(b, x, w)

    def scalar_path(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through :class:`_ScalarOutput` (one output; an ensemble, or
        many rows)."""
        members, _, out = self.weight.shape
        return out == 1 and (members > 1 or x.shape[-2] >= SCALAR_OUTPUT_MIN_ROWS)


class EnsembleMLP(nn.Module):
    """K MLPs evaluated together on one input: (B, in) -> (K, B, out).

    ``compute_dtype`` (e.g. ``torch.bfloat16``; None = float32) is the dtype of the hidden
    layers' matmuls: weights stay float32 (the optimizer's master copy) and are cast per
    call, and the output layer runs in float32 on the upcast last hidden activation, so
    outputs keep float32 resolution. ``forward(dtype=...)`` overrides it for one call;
    ``detach_params`` evaluates with the weights detached (gradients flow to the inputs
    only, e.g. Q(s, pi(s)) in an actor loss).
    """

    def __init__(
        self,
        n_members: int,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("an MLP here needs at least one hidden layer")
        self.n_members = n_members
        self.compute_dtype = compute_dtype
        dims = [in_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(
            EnsembleLinear(n_members, i, o) for i, o in zip(dims[:-1], dims[1:])
        )

    def forward(
        self, x: torch.Tensor, detach_params: bool = False, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        low = is_low_precision(dtype)
        h = x.to(dtype) if low else x
        h = h.unsqueeze(0) if self.n_members == 1 else h.expand(self.n_members, *h.shape)
        *hidden, last = self.layers
        for layer in hidden:
            # relu in place: no layer's backward needs its pre-activation
            h = layer(h, detach_params, dtype).relu_()
        if low and not last.scalar_path(h):  # type: ignore[operator]
            h = h.float()  # the scalar path upcasts in chunks itself
        return last(h, detach_params)


class ContinuousCritic(nn.Module):
    """K critics Q_k(s, a) for continuous actions, as one ensemble MLP on ``[s, a]``."""

    def __init__(
        self,
        n_critics: int,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int],
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.net = EnsembleMLP(n_critics, obs_dim + act_dim, hidden, 1, compute_dtype)

    def forward(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        detach_params: bool = False,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Q values: obs (B, D) with actions (B, A) -> (K, B), or (B, M, A) -> (K, B, M)."""
        if actions.dim() == 2:
            x = torch.cat([obs, actions], dim=-1)
            return self.net(x, detach_params, dtype).squeeze(-1)
        batch, m = actions.shape[:2]
        x = torch.cat([obs.unsqueeze(1).expand(-1, m, -1), actions], dim=-1).view(batch * m, -1)
        return self.net(x, detach_params, dtype).view(-1, batch, m)


class DiscreteCritic(nn.Module):
    """K critics Q_k(s, .) with one output per discrete action: (B, D) -> (K, B, n)."""

    def __init__(
        self,
        n_critics: int,
        obs_dim: int,
        n_actions: int,
        hidden: Sequence[int],
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.net = EnsembleMLP(n_critics, obs_dim, hidden, n_actions, compute_dtype)

    def forward(self, obs: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        return self.net(obs, detach_params)

    def q_of(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_k(s, a) at the given actions (B,) int64: (K, B)."""
        return gather_actions(self(obs), actions)


def gather_actions(q_all: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Pick ``q_all[k, b, actions[b]]``: (K, B, n), (B,) -> (K, B)."""
    index = actions.view(1, -1, 1).expand(q_all.shape[0], -1, 1)
    return q_all.gather(-1, index).squeeze(-1)


class ValueNet(nn.Module):
    """State value V(s): (B, D) -> (B,)."""

    def __init__(
        self, obs_dim: int, hidden: Sequence[int], compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.net = EnsembleMLP(1, obs_dim, hidden, 1, compute_dtype)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).view(-1)


# ----------------------------------------------------------------------------- actors
class GaussianActor(nn.Module):
    """Diagonal Gaussian policy in unit action space, tanh-squashed when actions are bounded.

    One head outputs the mean and the state-dependent log-std (clamped to
    [LOG_STD_MIN, LOG_STD_MAX]). BC, IQL and CQL share this architecture so that any of
    them can start from another's actor.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int],
        squash: bool,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.act_dim = act_dim
        self.squash = squash
        self.net = EnsembleMLP(1, obs_dim, hidden, 2 * act_dim, compute_dtype)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) -> mean (B, A) and log-std (B, A) of the pre-squash Gaussian."""
        mean, log_std = self.net(obs)[0].split(self.act_dim, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The mode's action in unit space: ``tanh(mean)`` (or ``mean`` when unbounded)."""
        mean, _ = self(obs)
        return torch.tanh(mean) if self.squash else mean

    def log_prob(
        self, mean: torch.Tensor, log_std: torch.Tensor, unit_actions: torch.Tensor
    ) -> torch.Tensor:
        """log pi(a|s) of given unit-space actions (B, A) -> (B,)."""
        if not self.squash:
            return gaussian_log_prob(unit_actions, mean, log_std)
        return tanh_gaussian_log_prob(clipped_atanh(unit_actions, ACTION_EPS), mean, log_std)

    def sample(
        self, mean: torch.Tensor, log_std: torch.Tensor, n: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised samples and their log-probs.

        ``n=None``: (B, A) and (B,); else ``n`` samples per state: (B, n, A) and (B, n).
        """
        if n is not None:
            mean, log_std = mean.unsqueeze(1), log_std.unsqueeze(1)
            noise = torch.randn(
                mean.shape[0], n, self.act_dim, device=mean.device, dtype=mean.dtype
            )
        else:
            noise = torch.randn_like(mean)
        pre = mean + noise * log_std.exp()
        if not self.squash:
            return pre, gaussian_log_prob(pre, mean, log_std)
        return torch.tanh(pre), tanh_gaussian_log_prob(pre, mean, log_std)


class CategoricalActor(nn.Module):
    """Categorical policy over n discrete actions: (B, D) -> logits (B, n)."""

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        hidden: Sequence[int],
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.net = EnsembleMLP(1, obs_dim, hidden, n_actions, compute_dtype)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)[0]


# ----------------------------------------------------------------------------- targets
@torch.no_grad()
def soft_update_(
    target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], tau: float
) -> None:
    """Polyak averaging ``target <- (1 - tau) * target + tau * source``, in one foreach op."""
    torch._foreach_lerp_(list(target), list(source), tau)
