"""Conservative Q-Learning (Kumar et al., 2020), continuous and discrete.

Continuous: SAC with twin critics, automatic entropy temperature, and the conservative
penalty ``logsumexp_a Q(s, a) - Q(s, a_data)``; the log-sum-exp is estimated with
uniform random actions and actions of the current policy at s and s', each corrected by
its proposal density. The penalty weight is fixed (``cql_alpha``) or a Lagrange
multiplier that holds the gap near ``cql_target_gap`` (``cql_auto_alpha``).

Discrete: double-DQN regression with the exact penalty over all actions; the policy is
greedy in Q.

The sampled-action Q values of the penalty are the bulk of a continuous step's
arithmetic (3 x ``n_action_samples`` evaluations per state and critic).
``penalty_dtype: bfloat16`` runs their hidden layers in bfloat16 (float32 master weights,
float32 output layer, so Q keeps float32 resolution: errors ~1e-4 of |Q|), several times
faster on CPUs and GPUs with bf16 units; ``auto`` (the default) picks bfloat16 where the
device has them and float32 elsewhere. ``compute_dtype`` does the same for the other
networks' hidden layers; losses, targets and optimizer state stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.algos.base import (
    AlgoContext,
    AlgorithmBase,
    Metrics,
    check_dtype,
    check_grad_clip,
    check_hidden,
    check_optimizer,
    check_positive,
    make_adam,
    make_optimizer,
    resolve_dtype,
)
from trainer.algos.bc import actor_action, actor_metrics
from trainer.batch import TransitionBatch
from trainer.losses import (
    LOG_2,
    cql_alpha_loss,
    cql_logsumexp_penalty,
    double_dqn_target,
    q_regression_loss,
    sac_actor_loss,
    td_target,
    temperature_loss,
)
from trainer.nets import (
    ContinuousCritic,
    DiscreteCritic,
    GaussianActor,
    gather_actions,
    soft_update_,
)
from trainer.stepping import LossFunction, backward_and_step, check_bool


@dataclass
class CQLConfig:
    """Hyper-parameters of CQL (continuous defaults follow the paper's locomotion runs)."""

    hidden: Any = (256, 256)  # actor hidden layer widths (match BC's to start from it)
    critic_hidden: Any = (256, 256)  # Q hidden layer widths
    actor_lr: float = 1e-4  # continuous only
    critic_lr: float = 3e-4
    temperature_lr: float = 1e-4  # continuous only: entropy temperature
    initial_temperature: float = 1.0  # continuous only
    auto_temperature: bool = True  # continuous only: tune the temperature to target_entropy
    target_entropy: float | None = None  # continuous only; None = -act_dim
    backup_entropy: bool = False  # continuous only: subtract temperature * log pi in the target
    cql_alpha: float | None = None  # penalty weight (multiplier's start); None: 5 cont., 1 disc.
    cql_auto_alpha: bool = False  # Lagrangian: tune cql_alpha to hold the gap at cql_target_gap
    cql_target_gap: float = 10.0  # Lagrangian threshold on the gap
    cql_alpha_lr: float = 3e-4  # Lagrangian multiplier's learning rate
    n_action_samples: int = 10  # continuous only: actions per proposal (random, pi(s), pi(s'))
    penalty_dtype: str = "auto"  # continuous only: 'float32', 'bfloat16', or 'auto' (see below)
    tau: float = 0.005  # Polyak rate of the target critics
    n_critics: int | None = None  # ensemble size; None = 2 (continuous) / 1 (discrete)
    grad_clip: float | None = None  # max gradient norm per network; None = no clipping
    # The stage's `optimizer` key (trainer.optim); None: Adam on trainer.stepping's lean path.
    optimizer: Any = None
    compute_dtype: str = "auto"  # the other hidden-layer matmuls: float32 / bfloat16 / auto
    compile: bool = False  # torch.compile the losses and their gradient (trainer/stepping.py)

    def __post_init__(self) -> None:
        self.hidden = check_hidden(self.hidden, "cql.hidden")
        self.compile = check_bool(self.compile, "cql.compile")
        self.critic_hidden = check_hidden(self.critic_hidden, "cql.critic_hidden")
        for name in (
            "actor_lr",
            "critic_lr",
            "temperature_lr",
            "initial_temperature",
            "cql_alpha_lr",
        ):
            setattr(self, name, check_positive(getattr(self, name), f"cql.{name}"))
        if self.cql_alpha is not None:
            self.cql_alpha = check_positive(self.cql_alpha, "cql.cql_alpha", allow_zero=True)
        if self.cql_auto_alpha and self.cql_alpha == 0:
            raise ValueError(
                "cql.cql_alpha: the Lagrangian multiplier cannot start at 0; use e.g. 1.0"
            )
        self.cql_target_gap = float(self.cql_target_gap)
        if int(self.n_action_samples) < 1:
            raise ValueError(f"cql.n_action_samples: must be >= 1, got {self.n_action_samples}")
        self.n_action_samples = int(self.n_action_samples)
        self.penalty_dtype = check_dtype(self.penalty_dtype, "cql.penalty_dtype")
        self.compute_dtype = check_dtype(self.compute_dtype, "cql.compute_dtype")
        self.tau = float(self.tau)
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"cql.tau: must be in (0, 1], got {self.tau}")
        if self.n_critics is not None:
            if int(self.n_critics) < 1:
                raise ValueError(f"cql.n_critics: must be >= 1, got {self.n_critics}")
            self.n_critics = int(self.n_critics)
        if self.target_entropy is not None:
            self.target_entropy = float(self.target_entropy)
        self.grad_clip = check_grad_clip(self.grad_clip)
        self.optimizer = check_optimizer(self.optimizer, "cql.optimizer")


Critic = ContinuousCritic | DiscreteCritic

# On CPU the sampled-action Q values are computed for a block of states at a time, about
# this many (state, action) rows: a block's activations stay in cache from one layer to
# the next (all 31 actions of 256 states are ~8 MB per layer and critic), which makes the
# critic step ~10-15% faster. The values are the same up to float rounding (the backward
# pass sums the blocks' weight gradients).
PENALTY_CHUNK_ROWS = 512


class CQL(AlgorithmBase):
    """CQL: SAC-based for continuous actions, double-DQN-based for discrete ones."""

    name = "cql"

    def __init__(self, ctx: AlgoContext, config: CQLConfig) -> None:
        super().__init__(ctx)
        self.config = config
        d = ctx.obs_dim
        k = config.n_critics or (1 if self.discrete else 2)
        dtype = resolve_dtype(config.compute_dtype, self.device)
        self.compute_dtype = dtype
        hidden = config.critic_hidden
        self.critic: Critic
        self.target_critic: Critic
        if self.discrete:
            self.critic = DiscreteCritic(k, d, self.n_actions, hidden, dtype)
            self.target_critic = DiscreteCritic(k, d, self.n_actions, hidden, dtype)
        else:
            if not self.action_scaler.bounded:
                raise ValueError(
                    "cql: continuous CQL samples uniform random actions and needs finite action "
                    "bounds; set fields.action.low/high in the spec"
                )
            self.critic = ContinuousCritic(k, d, self.act_dim, hidden, dtype)
            self.target_critic = ContinuousCritic(k, d, self.act_dim, hidden, dtype)
            self.actor = GaussianActor(d, self.act_dim, config.hidden, True, dtype)
            self.log_temperature = nn.Parameter(torch.tensor(math.log(config.initial_temperature)))
            self.modules["actor"] = self.actor
            self.modules["scalars"] = _Scalars(log_temperature=self.log_temperature)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.modules["critic"] = self.critic
        self.modules["target_critic"] = self.target_critic
        self.cql_alpha = (
            config.cql_alpha if config.cql_alpha is not None else (1.0 if self.discrete else 5.0)
        )
        if config.cql_auto_alpha:
            self.log_cql_alpha = nn.Parameter(torch.tensor(math.log(self.cql_alpha)))
            self.modules["lagrange"] = _Scalars(log_cql_alpha=self.log_cql_alpha)
        self._finish_init()

        self.critic_params = list(self.critic.parameters())
        self.target_params = list(self.target_critic.parameters())
        self.optimizers["critic"] = make_optimizer(
            self.critic_params, config.critic_lr, self.device, config.optimizer
        )
        if not self.discrete:
            self.actor_params = list(self.actor.parameters())
            self.target_entropy = (
                config.target_entropy if config.target_entropy is not None else -float(self.act_dim)
            )
            self.penalty_dtype = resolve_dtype(config.penalty_dtype, self.device)
            self.optimizers["actor"] = make_optimizer(
                self.actor_params, config.actor_lr, self.device, config.optimizer
            )
            if config.auto_temperature:
                self.optimizers["temperature"] = make_adam(
                    [self.log_temperature], config.temperature_lr, self.device
                )
        if config.cql_auto_alpha:
            self.optimizers["cql_alpha"] = make_adam(
                [self.log_cql_alpha], config.cql_alpha_lr, self.device
            )
        self._critic_network = [(self.optimizers["critic"], self.critic_params)]
        compile_ = config.compile
        if self.discrete:
            self._discrete_critic_loss = LossFunction(
                self._discrete_critic_loss_fn, compile_, "cql"
            )
        else:
            self._critic_loss = LossFunction(self._continuous_critic_loss, compile_, "cql")
            self._actor_loss = LossFunction(self._actor_loss_fn, compile_, "cql")

    # ------------------------------------------------------------------------- training
    def update(self, batch: TransitionBatch) -> Metrics:
        if self.discrete:
            return self._update_discrete(batch)
        obs = self.obs_norm(batch.observations)
        next_obs = self.obs_norm(batch.next_observations)
        actions = self.action_scaler.to_unit(batch.actions)
        # pi(.|s) is computed once: its detached output feeds the critic's penalty, and
        # the actor's loss backpropagates through it after the critic step.
        mean, log_std = self.actor(obs)
        metrics, gap = self._update_critic(
            obs, actions, batch.rewards, batch.terminated, next_obs, mean, log_std
        )
        if self.config.cql_auto_alpha:
            metrics |= self._update_cql_alpha(gap)
        actor_metrics_, log_prob = self._update_actor(obs, mean, log_std)
        metrics |= actor_metrics_
        if self.config.auto_temperature:
            metrics |= self._update_temperature(log_prob)
        self._update_target()
        return metrics

    def _update_discrete(self, batch: TransitionBatch) -> Metrics:
        loss, metrics = self._discrete_critic_loss(
            batch.observations,
            batch.actions,
            batch.rewards,
            batch.terminated,
            batch.next_observations,
        )
        backward_and_step(loss, self._critic_network, self.config.grad_clip)
        gap = metrics.pop("gap")
        if self.config.cql_auto_alpha:
            metrics |= self._update_cql_alpha(gap)
        self._update_target()
        return metrics

    def _penalty_weight(self) -> torch.Tensor | float:
        if self.config.cql_auto_alpha:
            return self.log_cql_alpha.detach().exp().clamp(0.0, 1e6)
        return self.cql_alpha

    def _temperature(self) -> torch.Tensor:
        return self.log_temperature.detach().exp()

    def _update_critic(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        next_obs: torch.Tensor,
        mean: torch.Tensor,
        log_std: torch.Tensor,
    ) -> tuple[Metrics, torch.Tensor]:
        loss, metrics = self._critic_loss(
            obs, actions, rewards, terminated, next_obs, mean.detach(), log_std.detach()
        )
        backward_and_step(loss, self._critic_network, self.config.grad_clip)
        gap = metrics.pop("gap")
        return metrics, gap

    def _continuous_critic_loss(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        next_obs: torch.Tensor,
        mean: torch.Tensor,
        log_std: torch.Tensor,
    ) -> tuple[torch.Tensor, Metrics]:
        """TD loss + weighted conservative gap, and metrics with the per-critic ``gap`` (K,)."""
        n = self.config.n_action_samples
        with torch.no_grad():
            next_mean, next_log_std = self.actor(next_obs)
            next_actions, next_log_prob = self.actor.sample(next_mean, next_log_std)
            next_q = self.target_critic(next_obs, next_actions).amin(dim=0)  # (B,)
            if self.config.backup_entropy:
                next_q = next_q - self._temperature() * next_log_prob
            target = td_target(rewards, terminated, next_q, self.ctx.discount)
            # Proposals for the log-sum-exp: uniform on [-1, 1]^A, pi(.|s), pi(.|s').
            random_actions = torch.empty(obs.shape[0], n, self.act_dim, device=obs.device).uniform_(
                -1.0, 1.0
            )
            pi_actions, pi_log_prob = self.actor.sample(mean, log_std, n)
            next_pi_actions, next_pi_log_prob = self.actor.sample(next_mean, next_log_std, n)
            sampled = torch.cat([random_actions, pi_actions, next_pi_actions], dim=1)  # (B, 3n, A)
            random_log_density = torch.full_like(pi_log_prob, -self.act_dim * LOG_2)
            log_density = torch.cat([random_log_density, pi_log_prob, next_pi_log_prob], dim=1)
        if self.penalty_dtype == self.compute_dtype:
            # Same arithmetic either way: one pass over [a_data, sampled] saves a call.
            both = torch.cat([actions.unsqueeze(1), sampled], dim=1)  # (B, 1 + 3n, A)
            q_both = self._q_in_chunks(obs, both, self.penalty_dtype)  # (K, B, 1 + 3n)
            q_data, q_sampled = q_both[..., 0], q_both[..., 1:]
        else:
            q_data = self.critic(obs, actions)  # (K, B)
            q_sampled = self._q_in_chunks(obs, sampled, self.penalty_dtype)  # (K, B, 3n)
        gap = cql_logsumexp_penalty(q_data, q_sampled, log_density)  # (K,)
        td_loss = q_regression_loss(q_data, target)
        loss = td_loss + self._penalty_weight() * gap.sum()
        gap = gap.detach()
        return loss, {
            "td_loss": td_loss.detach(),
            "cql_gap": gap.mean(),
            "q_mean": q_data.detach().mean(),
            "gap": gap,
        }

    def _q_in_chunks(
        self, obs: torch.Tensor, actions: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Q of M actions per state, (B, D) and (B, M, A) -> (K, B, M), on CPU a block of
        about PENALTY_CHUNK_ROWS rows at a time (the same values, see there)."""
        per = max(1, PENALTY_CHUNK_ROWS // actions.shape[1])
        if obs.device.type != "cpu" or obs.shape[0] <= per:
            return self.critic(obs, actions, dtype=dtype)
        blocks = zip(obs.split(per), actions.split(per))
        return torch.cat([self.critic(o, a, dtype=dtype) for o, a in blocks], dim=1)

    def _discrete_critic_loss_fn(
        self,
        observations: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        next_observations: torch.Tensor,
    ) -> tuple[torch.Tensor, Metrics]:
        """Double-DQN TD loss + weighted exact gap (raw observations), metrics with ``gap``."""
        obs = self.obs_norm(observations)
        next_obs = self.obs_norm(next_observations)
        with torch.no_grad():
            target = double_dqn_target(
                rewards,
                terminated,
                self.critic(next_obs),
                self.target_critic(next_obs),
                self.ctx.discount,
            )
        q_all = self.critic(obs)  # (K, B, n)
        q_data = gather_actions(q_all, actions)  # (K, B)
        gap = cql_logsumexp_penalty(q_data, q_all, 0.0)  # (K,)
        td_loss = q_regression_loss(q_data, target)
        loss = td_loss + self._penalty_weight() * gap.sum()
        gap = gap.detach()
        return loss, {
            "td_loss": td_loss.detach(),
            "cql_gap": gap.mean(),
            "q_mean": q_data.detach().mean(),
            "gap": gap,
        }

    def _update_cql_alpha(self, gap: torch.Tensor) -> Metrics:
        loss = cql_alpha_loss(self.log_cql_alpha, gap, self.config.cql_target_gap)
        backward_and_step(loss, [(self.optimizers["cql_alpha"], [self.log_cql_alpha])], None)
        return {"cql_alpha": self.log_cql_alpha.detach().exp()}

    def _update_actor(
        self, obs: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
    ) -> tuple[Metrics, torch.Tensor]:
        loss, metrics = self._actor_loss(obs, mean, log_std)
        backward_and_step(
            loss, [(self.optimizers["actor"], self.actor_params)], self.config.grad_clip
        )
        log_prob = metrics.pop("log_prob")
        return metrics, log_prob

    def _actor_loss_fn(
        self, obs: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
    ) -> tuple[torch.Tensor, Metrics]:
        """SAC's actor loss through pi(s)'s ``mean`` and ``log_std``; metrics with ``log_prob``."""
        actions, log_prob = self.actor.sample(mean, log_std)
        # Gradients flow through Q into the actions only: the critic is not changed here.
        q = self.critic(obs, actions, detach_params=True).amin(dim=0)
        loss = sac_actor_loss(q, log_prob, self._temperature())
        log_prob = log_prob.detach()
        return loss, {
            "actor_loss": loss.detach(),
            "entropy": -log_prob.mean(),
            "log_prob": log_prob,
        }

    def _update_temperature(self, log_prob: torch.Tensor) -> Metrics:
        loss = temperature_loss(self.log_temperature, log_prob, self.target_entropy)
        backward_and_step(loss, [(self.optimizers["temperature"], [self.log_temperature])], None)
        return {"temperature": self.log_temperature.detach().exp()}

    def _update_target(self) -> None:
        soft_update_(self.target_params, self.critic_params, self.config.tau)

    # ------------------------------------------------------------------------- using
    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        if not self.discrete:
            return actor_action(self.actor, self.action_scaler, obs, deterministic)
        q = self.critic(obs).mean(dim=0)  # (B, n)
        if deterministic:
            return q.argmax(dim=-1)
        return torch.distributions.Categorical(logits=q).sample()

    @torch.no_grad()
    def evaluate(self, batch: TransitionBatch) -> dict[str, float]:
        """TD error against this step's target, the conservative gap, and actor metrics."""
        obs = self.obs_norm(batch.observations)
        next_obs = self.obs_norm(batch.next_observations)
        if self.discrete:
            target = double_dqn_target(
                batch.rewards,
                batch.terminated,
                self.critic(next_obs),
                self.target_critic(next_obs),
                self.ctx.discount,
            )
            q_all = self.critic(obs)
            q = gather_actions(q_all, batch.actions)
            gap = cql_logsumexp_penalty(q, q_all, 0.0)
            accuracy = (q_all.mean(dim=0).argmax(dim=-1) == batch.actions).float().mean()
            metrics = {"accuracy": float(accuracy)}
        else:
            actions = self.action_scaler.to_unit(batch.actions)
            next_actions = self.actor.deterministic(next_obs)
            next_q = self.target_critic(next_obs, next_actions).amin(dim=0)
            target = td_target(batch.rewards, batch.terminated, next_q, self.ctx.discount)
            q = self.critic(obs, actions)
            mean, log_std = self.actor(obs)
            pi_actions, pi_log_prob = self.actor.sample(mean, log_std, self.config.n_action_samples)
            gap = cql_logsumexp_penalty(q, self.critic(obs, pi_actions), pi_log_prob)
            metrics = actor_metrics(self.actor, self.action_scaler, obs, batch.actions)
        metrics["td_error"] = float((q - target).square().mean())
        metrics["q_mean"] = float(q.mean())
        metrics["cql_gap"] = float(gap.mean())
        return metrics

    def init_from(self, state: dict) -> None:
        """Continuous: load the actor. Discrete: every critic starts as the BC network.

        With ``Q = logits`` the greedy policy is BC's and the discrete CQL gap is exactly
        BC's cross-entropy, so Q-learning starts at the minimum of the penalty.
        """
        weights = self._actor_state(state)
        if not self.discrete:
            self._load_actor(self.actor, weights, str(state.get("algo")))
            return
        assert isinstance(self.critic, DiscreteCritic)
        own = self.critic.state_dict()
        shapes = {k: tuple(v.shape[1:]) for k, v in weights.items()}
        expected = {k: tuple(v.shape[1:]) for k, v in own.items()}
        if shapes != expected:
            raise ValueError(
                f"cql.init_from: the {state.get('algo')} actor's layers {shapes} do not fit the "
                f"critic's {expected}; set critic_hidden to the BC stage's hidden sizes"
            )
        # every ensemble member starts as the (K = 1) actor network
        self.critic.load_state_dict({k: v.expand_as(own[k]) for k, v in weights.items()})
        self.target_critic.load_state_dict(self.critic.state_dict())


class _Scalars(nn.Module):
    """Learnable scalars (log-temperature, log-multiplier), held so the state dict has them."""

    def __init__(self, **params: nn.Parameter) -> None:
        super().__init__()
        for name, param in params.items():
            self.register_parameter(name, param)
