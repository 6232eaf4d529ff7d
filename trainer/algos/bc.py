"""Behaviour cloning: maximum likelihood of the data's actions.

Discrete: cross-entropy of a categorical actor. Continuous: log-likelihood of a
tanh-squashed Gaussian (actions mapped to [-1, 1] and clipped slightly inside before
``atanh``), or, with ``loss: mse``, squared error of the actor's mean action.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

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
from trainer.batch import TransitionBatch
from trainer.losses import categorical_log_prob
from trainer.nets import ActionScaler, CategoricalActor, GaussianActor
from trainer.stepping import LossFunction, backward_and_step, check_bool


@dataclass
class BCConfig:
    """Hyper-parameters of behaviour cloning."""

    hidden: Any = (256, 256)  # actor hidden layer widths
    lr: float = 1e-3  # Adam learning rate
    loss: str = "nll"  # continuous only: 'nll' (Gaussian log-likelihood) or 'mse' (mean action)
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    # The stage's `optimizer` key (trainer.optim); None: Adam on trainer.stepping's lean path.
    optimizer: Any = None
    compute_dtype: str = "auto"  # hidden-layer matmuls: float32 / bfloat16 / auto (base.py)
    compile: bool = False  # torch.compile the loss and its gradient (trainer/stepping.py)

    def __post_init__(self) -> None:
        self.hidden = check_hidden(self.hidden, "bc.hidden")
        self.compile = check_bool(self.compile, "bc.compile")
        self.compute_dtype = check_dtype(self.compute_dtype, "bc.compute_dtype")
        self.lr = check_positive(self.lr, "bc.lr")
        if self.loss not in ("nll", "mse"):
            raise ValueError(f"bc.loss: expected 'nll' or 'mse', got {self.loss!r}")
        self.grad_clip = check_grad_clip(self.grad_clip)
        self.optimizer = check_optimizer(self.optimizer, "bc.optimizer")


class BC(AlgorithmBase):
    """Behaviour cloning for discrete or continuous actions."""

    name = "bc"

    def __init__(self, ctx: AlgoContext, config: BCConfig) -> None:
        super().__init__(ctx)
        self.config = config
        dtype = resolve_dtype(config.compute_dtype, self.device)
        self.actor = make_actor(ctx.obs_dim, self, config.hidden, dtype)
        self.modules["actor"] = self.actor
        self._finish_init()
        self.actor_params = list(self.actor.parameters())
        self.optimizers["actor"] = make_optimizer(
            self.actor_params, config.lr, self.device, config.optimizer
        )
        self._actor_loss = LossFunction(self._loss, config.compile, "bc")

    # ------------------------------------------------------------------------- training
    def update(self, batch: TransitionBatch) -> Metrics:
        loss, metrics = self._actor_loss(batch.observations, batch.actions)
        backward_and_step(
            loss, [(self.optimizers["actor"], self.actor_params)], self.config.grad_clip
        )
        return metrics

    def _loss(
        self, observations: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, Metrics]:
        """The BC loss of raw observations (B, obs_dim) and the data's actions."""
        obs = self.obs_norm(observations)
        if isinstance(self.actor, CategoricalActor):
            loss = F.cross_entropy(self.actor(obs), actions)
            return loss, {"bc_loss": loss.detach()}
        unit = self.action_scaler.to_unit(actions)
        mean, log_std = self.actor(obs)
        if self.config.loss == "mse":
            pred = torch.tanh(mean) if self.actor.squash else mean
            loss = (pred - unit).square().mean()
            return loss, {"bc_loss": loss.detach()}
        loss = -self.actor.log_prob(mean, log_std, unit).mean()
        return loss, {"bc_loss": loss.detach(), "log_std": log_std.detach().mean()}

    # ------------------------------------------------------------------------- using
    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        return actor_action(self.actor, self.action_scaler, obs, deterministic)

    @torch.no_grad()
    def evaluate(self, batch: TransitionBatch) -> dict[str, float]:
        obs = self.obs_norm(batch.observations)
        return actor_metrics(self.actor, self.action_scaler, obs, batch.actions)

    def init_from(self, state: dict) -> None:
        self._load_actor(self.actor, self._actor_state(state), str(state.get("algo")))


# ----------------------------------------------------------------------------- shared
Actor = GaussianActor | CategoricalActor


def make_actor(
    obs_dim: int, algo: AlgorithmBase, hidden: tuple[int, ...], dtype: torch.dtype
) -> Actor:
    """The actor every algorithm shares: categorical, or Gaussian squashed to bounded actions."""
    if algo.discrete:
        return CategoricalActor(obs_dim, algo.n_actions, hidden, dtype)
    return GaussianActor(obs_dim, algo.act_dim, hidden, algo.action_scaler.bounded, dtype)


def actor_action(
    actor: Actor, scaler: ActionScaler, obs: torch.Tensor, deterministic: bool
) -> torch.Tensor:
    """Env actions from an actor (categorical or Gaussian) for normalised observations."""
    if isinstance(actor, CategoricalActor):
        logits = actor(obs)
        if deterministic:
            return logits.argmax(dim=-1)
        return torch.distributions.Categorical(logits=logits).sample()
    if deterministic:
        unit = actor.deterministic(obs)
    else:
        mean, log_std = actor(obs)
        unit, _ = actor.sample(mean, log_std)
    return scaler.from_unit(unit)


def actor_metrics(
    actor: Actor, scaler: ActionScaler, obs: torch.Tensor, actions: torch.Tensor
) -> dict[str, float]:
    """How well an actor explains held-out actions.

    Discrete: accuracy of the greedy action and mean NLL. Continuous: mean log-likelihood
    (of actions in unit space) and MSE of the deterministic action (env units).
    """
    if isinstance(actor, CategoricalActor):
        logits = actor(obs)
        accuracy = (logits.argmax(dim=-1) == actions).float().mean()
        nll = -categorical_log_prob(logits, actions).mean()
        return {"accuracy": float(accuracy), "nll": float(nll)}
    mean, log_std = actor(obs)
    log_lik = actor.log_prob(mean, log_std, scaler.to_unit(actions)).mean()
    pred = scaler.from_unit(torch.tanh(mean) if actor.squash else mean)
    mse = (pred - actions).square().mean()
    return {"log_likelihood": float(log_lik), "action_mse": float(mse)}
