"""Implicit Q-Learning (Kostrikov et al., 2021), discrete and continuous.

V is regressed to an upper expectile of the target critics' Q over the data's actions,
Q to ``r + gamma * V(s')``, and the actor by advantage-weighted regression with weights
``min(exp(beta * (Q - V)), max_weight)``. All three losses use the networks as they were
at the start of the step, and each reaches only its own network (targets and advantages
are detached), so one backward pass of their sum gives V, Q and the actor each the
gradient of its own loss; ``update`` then steps the three optimizers and the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.algos.base import (
    AlgoContext,
    AlgorithmBase,
    Metrics,
    check_dtype,
    check_grad_clip,
    check_hidden,
    check_optimizer,
    check_positive,
    make_optimizer,
    resolve_dtype,
)
from trainer.algos.bc import actor_action, actor_metrics, make_actor
from trainer.batch import TransitionBatch
from trainer.losses import (
    awr_loss,
    awr_weights,
    categorical_log_prob,
    expectile_loss,
    q_regression_loss,
    td_target,
)
from trainer.nets import (
    CategoricalActor,
    ContinuousCritic,
    DiscreteCritic,
    ValueNet,
    soft_update_,
)
from trainer.stepping import LossFunction, backward_and_step, check_bool


@dataclass
class IQLConfig:
    """Hyper-parameters of IQL (defaults: the paper's locomotion settings)."""

    hidden: Any = (256, 256)  # actor hidden layer widths (match BC's to start from it)
    critic_hidden: Any = (256, 256)  # Q and V hidden layer widths
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4  # Q ensemble
    value_lr: float = 3e-4  # V
    expectile: float = 0.7  # tau of the expectile loss, in (0, 1); 0.5 = mean regression
    beta: float = 3.0  # inverse temperature of the advantage weights
    max_weight: float = 100.0  # clip of exp(beta * adv)
    tau: float = 0.005  # Polyak rate of the target critics
    n_critics: int = 2  # ensemble size; the min over members is used
    grad_clip: float | None = None  # max gradient norm per network; None = no clipping
    # The stage's `optimizer` key (trainer.optim); None: Adam on trainer.stepping's lean path.
    optimizer: Any = None
    compute_dtype: str = "auto"  # hidden-layer matmuls: float32 / bfloat16 / auto (base.py)
    compile: bool = False  # torch.compile the losses and their gradient (trainer/stepping.py)

    def __post_init__(self) -> None:
        self.hidden = check_hidden(self.hidden, "iql.hidden")
        self.compile = check_bool(self.compile, "iql.compile")
        self.compute_dtype = check_dtype(self.compute_dtype, "iql.compute_dtype")
        self.critic_hidden = check_hidden(self.critic_hidden, "iql.critic_hidden")
        for name in ("actor_lr", "critic_lr", "value_lr", "beta", "max_weight"):
            setattr(self, name, check_positive(getattr(self, name), f"iql.{name}"))
        self.expectile = float(self.expectile)
        if not 0.0 < self.expectile < 1.0:
            raise ValueError(f"iql.expectile: must be in (0, 1), got {self.expectile}")
        self.tau = float(self.tau)
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"iql.tau: must be in (0, 1], got {self.tau}")
        if int(self.n_critics) < 1:
            raise ValueError(f"iql.n_critics: must be >= 1, got {self.n_critics}")
        self.n_critics = int(self.n_critics)
        self.grad_clip = check_grad_clip(self.grad_clip)
        self.optimizer = check_optimizer(self.optimizer, "iql.optimizer")


Critic = ContinuousCritic | DiscreteCritic


class IQL(AlgorithmBase):
    """IQL with an ensemble of critics, a state-value net and an AWR actor."""

    name = "iql"

    def __init__(self, ctx: AlgoContext, config: IQLConfig) -> None:
        super().__init__(ctx)
        self.config = config
        d, k = ctx.obs_dim, config.n_critics
        dtype = resolve_dtype(config.compute_dtype, self.device)
        hidden = config.critic_hidden
        self.actor = make_actor(d, self, config.hidden, dtype)
        self.critic: Critic
        self.target_critic: Critic
        if self.discrete:
            self.critic = DiscreteCritic(k, d, self.n_actions, hidden, dtype)
            self.target_critic = DiscreteCritic(k, d, self.n_actions, hidden, dtype)
        else:
            self.critic = ContinuousCritic(k, d, self.act_dim, hidden, dtype)
            self.target_critic = ContinuousCritic(k, d, self.act_dim, hidden, dtype)
        self.value = ValueNet(d, hidden, dtype)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.modules.update(
            {
                "actor": self.actor,
                "critic": self.critic,
                "target_critic": self.target_critic,
                "value": self.value,
            }
        )
        self._finish_init()
        self.actor_params = list(self.actor.parameters())
        self.critic_params = list(self.critic.parameters())
        self.value_params = list(self.value.parameters())
        self.target_params = list(self.target_critic.parameters())
        self.optimizers["actor"] = make_optimizer(
            self.actor_params, config.actor_lr, self.device, config.optimizer
        )
        self.optimizers["critic"] = make_optimizer(
            self.critic_params, config.critic_lr, self.device, config.optimizer
        )
        self.optimizers["value"] = make_optimizer(
            self.value_params, config.value_lr, self.device, config.optimizer
        )
        self._losses = LossFunction(self._compute_losses, config.compile, "iql")

    # ------------------------------------------------------------------------- training
    def update(self, batch: TransitionBatch) -> Metrics:
        loss, metrics = self._losses(
            batch.observations,
            batch.actions,
            batch.rewards,
            batch.terminated,
            batch.next_observations,
        )
        # V's, Q's and the actor's losses summed: one backward, each network its own gradient
        backward_and_step(
            loss,
            [
                (self.optimizers["value"], self.value_params),
                (self.optimizers["critic"], self.critic_params),
                (self.optimizers["actor"], self.actor_params),
            ],
            self.config.grad_clip,
        )
        self._update_target()
        return metrics

    def _compute_losses(
        self,
        observations: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        next_observations: torch.Tensor,
    ) -> tuple[torch.Tensor, Metrics]:
        """The sum of the V, Q and actor losses of one batch (raw observations), and metrics."""
        obs = self.obs_norm(observations)
        next_obs = self.obs_norm(next_observations)
        if not self.discrete:
            actions = self.action_scaler.to_unit(actions)
        with torch.no_grad():
            target_q = self._q(self.target_critic, obs, actions).amin(dim=0)  # (B,)
            next_v = self.value(next_obs)  # (B,)
        v_loss, adv, metrics = self._v_loss(obs, target_q)
        q_loss, q_metrics = self._q_loss(obs, actions, rewards, terminated, next_v)
        actor_loss, actor_metrics_ = self._actor_loss(obs, actions, adv)
        return v_loss + q_loss + actor_loss, metrics | q_metrics | actor_metrics_

    @staticmethod
    def _q(critic: Critic, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_k(s, a) of every ensemble member: (K, B)."""
        if isinstance(critic, ContinuousCritic):
            return critic(obs, actions)
        return critic.q_of(obs, actions)

    def _v_loss(
        self, obs: torch.Tensor, target_q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
        v = self.value(obs)
        diff = target_q - v  # the advantage Q - V, before this step
        loss = expectile_loss(diff, self.config.expectile)
        adv = diff.detach()
        return (
            loss,
            adv,
            {"v_loss": loss.detach(), "v_mean": v.detach().mean(), "adv_mean": adv.mean()},
        )

    def _q_loss(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        next_v: torch.Tensor,
    ) -> tuple[torch.Tensor, Metrics]:
        target = td_target(rewards, terminated, next_v, self.ctx.discount)
        q = self._q(self.critic, obs, actions)  # (K, B)
        loss = q_regression_loss(q, target)
        return loss, {"q_loss": loss.detach(), "q_mean": q.detach().mean()}

    def _actor_loss(
        self, obs: torch.Tensor, actions: torch.Tensor, adv: torch.Tensor
    ) -> tuple[torch.Tensor, Metrics]:
        weights = awr_weights(adv, self.config.beta, self.config.max_weight)
        if isinstance(self.actor, CategoricalActor):
            log_prob = categorical_log_prob(self.actor(obs), actions)
        else:
            mean, log_std = self.actor(obs)
            log_prob = self.actor.log_prob(mean, log_std, actions)
        loss = awr_loss(log_prob, weights)
        return loss, {"actor_loss": loss.detach(), "awr_weight_mean": weights.mean()}

    def _update_target(self) -> None:
        soft_update_(self.target_params, self.critic_params, self.config.tau)

    # ------------------------------------------------------------------------- using
    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        return actor_action(self.actor, self.action_scaler, obs, deterministic)

    @torch.no_grad()
    def evaluate(self, batch: TransitionBatch) -> dict[str, float]:
        """Actor metrics (as BC's), and the TD error ``(Q(s, a) - r - gamma V(s'))^2``."""
        obs = self.obs_norm(batch.observations)
        next_obs = self.obs_norm(batch.next_observations)
        actions = batch.actions if self.discrete else self.action_scaler.to_unit(batch.actions)
        target = td_target(batch.rewards, batch.terminated, self.value(next_obs), self.ctx.discount)
        q = self._q(self.critic, obs, actions)
        metrics = actor_metrics(self.actor, self.action_scaler, obs, batch.actions)
        metrics["td_error"] = float((q - target).square().mean())
        metrics["q_mean"] = float(q.mean())
        metrics["v_mean"] = float(self.value(obs).mean())
        return metrics

    def init_from(self, state: dict) -> None:
        self._load_actor(self.actor, self._actor_state(state), str(state.get("algo")))
