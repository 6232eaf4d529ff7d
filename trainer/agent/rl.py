"""RL on the text policy: one ``ppo`` or ``reinforce`` update from sampled rollouts.

:class:`RLStage` owns the update of an RL stage; the staged trainer gives it the model
(after SFT), and it does, per step (the value head is a linear map of the policy's last
hidden states, trained on them detached, so only the policy loss moves the body):

1. sample ``batch_size`` seeds x ``group_size`` episodes of the student in the store's
   environment (:func:`trainer.agent.rollouts.collect`, temperature / top-k / top-p), or,
   with ``rollouts: store``, ``batch_size`` policy turns of the store x ``group_size``
   samples after their stored context (:func:`trainer.agent.prompts.collect_prompts`);
2. score each policy turn with the REWARD of the stage (:mod:`trainer.rewards`: the turn's
   text, the environment's reward for it, success on the episode's last turn, the tokens
   it wrote), logged per component as ``reward/NAME``;
3. score the written tokens under the policy (the rollout policy, ``logp_old``) and under
   the frozen reference (the SFT weights: with LoRA the base with the adapter disabled, no
   second copy), and the value head; a group whose samples share their prompt is scored
   as one packed row (:func:`trainer.agent.rollouts.shared_prefix`);
4. ``ppo``: a per-token KL penalty ``-kl_coef * (logp_old - logp_ref)`` on every written
   token and each turn's reward on its last token, GAE over the written tokens
   (:func:`trainer.rl_losses.token_gae`), whitened advantages, then ``ppo_epochs`` passes of
   minibatches with the clipped surrogate, the clipped value loss and an entropy bonus;
   ``reinforce``: the episode's reward minus its KL penalty, less a leave-one-out baseline
   over the episodes of the same seed (or the value head, or none), on every written token,
   one gradient step;
5. in both, ``sft_weight`` (from ``sft_weight`` to ``sft_weight_end`` over the stage, a
   curriculum from SFT-heavy to RL-heavy) times the SAD loss of a batch of the store keeps
   a supervised anchor, and ``sft_every`` puts a plain SFT step after every N RL steps (N
   moving to ``sft_every_end``);
6. the KL coefficient is fixed or adapts towards ``kl_target``
   (:class:`trainer.rl_losses.AdaptiveKLController`).

Data-parallel (``torchrun``, or one process with ``shards=N``): a step's ``batch_size``
prompts are cut into the run's shards, each rank playing its shards' groups, each group
sampled under a torch generator seeded by (seed_base, the run's seed, step, global group
index) so that one process with ``shards=N`` plays the ranks' very episodes. Token-mean
losses are normalised by the global minibatch's token count, the SFT anchor by the global
anchor batch's target weight, the advantages whitened with global statistics, and the
gradients averaged before clipping and the step; PPO's minibatches take
``minibatch_episodes / shards`` episodes (whole groups) of each shard. The reward's
``ema_normalize`` state, the adaptive KL coefficient and the episode-reward EMA update
from the global batch (all-reduced sums), so they stay alike on every rank.

Metrics: ``reward/*``, ``reward/episode`` and its moving average ``reward/episode_ema``,
``kl``, ``kl_coef``, ``clip_fraction``, ``approx_kl``, ``entropy``, ``value_loss``,
``explained_variance``, ``policy_loss``, ``sft_loss``, ``sft_weight``, the rollouts'
``rollout/success_rate`` and ``rollout/generated_tokens_per_s``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainer.agent.losses import loss_norms, sad_loss
from trainer.agent.prompts import StorePrompts, collect_prompts
from trainer.agent.rollouts import (
    Episode,
    RolloutBatch,
    collect,
    shared_prefix,
    to_batch,
    token_logprobs,
)
from trainer.config import ConfigError, need_in_range, need_int
from trainer.distributed import Distributed
from trainer.rewards import RewardError, RewardInput, build_reward
from trainer.rl_losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_coefficient,
    explained_variance,
    kl_to_reference,
    leave_one_out_baseline,
    masked_mean,
    place_turn_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_loss,
    sequence_to_tokens,
    token_gae,
    token_returns,
    value_baseline_advantages,
    whiten,
)

RL_ALGOS = ("ppo", "reinforce")


class NonFinite(ArithmeticError):
    """A NaN or inf reward or loss; the stage stops (the caller names the step) and the last
    checkpoint written stays the last good one."""


BASELINES = ("loo", "value", "none")
ROLLOUTS = ("auto", "env", "store")
# Reward leaves that need the environment, and those that compare with the store's turn.
ENV_LEAVES = ("env_return", "success")
TARGET_LEAVES = ("exact_match", "token_f1", "bleu", "rouge_l")


@dataclass
class RLParams:
    """The hyper-parameters of a ``ppo`` / ``reinforce`` stage (beside ``batch_size``: the
    seeds sampled per step)."""

    # AdamW of the policy (and of the value head).
    lr: float = 1e-5
    value_lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    # The REWARD of each policy turn (trainer/rewards.py, docs/REWARDS.md).
    reward: Any = "success"
    # Episodes sampled per seed (the leave-one-out groups).
    group_size: int = 2
    # Sampling: temperature (> 0), top-k (0: off), top-p (1: off), tokens per turn (null:
    # agent.max_new_tokens), turns per episode (null: the environment's).
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    max_turns: int | None = None
    # PPO: passes over each rollout batch and episodes per minibatch.
    ppo_epochs: int = 2
    minibatch_episodes: int = 8
    clip: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    per_turn: bool = True  # discount per turn, not per token
    whiten_advantages: bool = True
    # Entropy bonus: coef * decay^step, never below floor.
    entropy_coef: float = 0.0
    entropy_decay: float = 1.0
    entropy_floor: float = 0.0
    # KL to the reference: fixed coefficient, or adaptive towards kl_target.
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    # REINFORCE's baseline: leave-one-out over the seed's group, the value head, or none.
    baseline: str = "loo"
    # The supervised anchor: weight of the SAD loss, linear from sft_weight to
    # sft_weight_end over the stage (null: constant), on batches of sft_batch_size episodes.
    sft_weight: float = 0.0
    sft_weight_end: float | None = None
    sft_batch_size: int = 8
    # Alternating: after every `sft_every` RL steps, one plain SFT step (the SAD loss, weight
    # 1) on a batch of the store; with `sft_every_end`, the interval moves linearly from
    # sft_every to sft_every_end over the stage (e.g. 2 -> 10: SFT-heavy to RL-heavy).
    # null: off.
    sft_every: int | None = None
    sft_every_end: int | None = None
    span_weights: dict[str, float] = field(default_factory=dict)
    # Where the rollouts come from: `env` plays episodes in the store's environment; `store`
    # samples one turn after the context of a policy turn of the training split, scored
    # against the store's text of that turn (text-overlap rewards, no environment needed);
    # `auto`: env when the store has one (and an action span), else store.
    rollouts: str = "auto"
    # Training seeds start here (far from eval.seed); step k samples seeds
    # seed_base + k * batch_size + i (with rollouts: store, the turns of step k are drawn
    # by a generator seeded with (seed_base, the run's seed, k)).
    seed_base: int = 5_000_000
    # Moving average of the episode reward: its decay.
    reward_ema_decay: float = 0.9
    # Stage steps between evaluations (null: eval.every).
    eval_every: int | None = None
    # Evaluate the starting policy (the SFT weights) before the first step: the stage's
    # curve and its summary start from where it began.
    eval_at_start: bool = True

    def __post_init__(self) -> None:
        for k in ("lr", "value_lr", "weight_decay", "temperature", "vf_coef", "kl_coef",
                  "entropy_coef", "entropy_floor", "sft_weight"):  # fmt: skip
            need_in_range(k, getattr(self, k), 0.0)
        if self.temperature <= 0:
            raise ConfigError("temperature: must be > 0 for sampled rollouts")
        need_in_range("top_p", self.top_p, 0.0, 1.0)
        need_int("top_k", self.top_k, 0, "0 for no top-k")
        need_int("group_size", self.group_size, 1, "episodes per seed")
        need_int("ppo_epochs", self.ppo_epochs, 1, "passes per rollout batch")
        need_int("minibatch_episodes", self.minibatch_episodes, 1, "episodes per minibatch")
        need_int("sft_batch_size", self.sft_batch_size, 1, "episodes of the anchor batch")
        need_int("seed_base", self.seed_base, 0, "first training seed")
        need_in_range("clip", self.clip, 0.0, 1.0)
        need_in_range("gamma", self.gamma, 0.0, 1.0)
        need_in_range("lam", self.lam, 0.0, 1.0)
        need_in_range("entropy_decay", self.entropy_decay, 0.0, 1.0)
        need_in_range("reward_ema_decay", self.reward_ema_decay, 0.0, 1.0)
        if self.value_clip is not None:
            need_in_range("value_clip", self.value_clip, 0.0)
        if self.kl_target is not None:
            need_in_range("kl_target", self.kl_target, 0.0)
        need_in_range("kl_horizon", self.kl_horizon, 1.0)
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"kl_estimator: one of k1, k2, k3, got {self.kl_estimator!r}")
        if not isinstance(self.eval_at_start, bool):
            raise ConfigError(f"eval_at_start: must be true or false, got {self.eval_at_start!r}")
        if self.rollouts not in ROLLOUTS:
            raise ConfigError(f"rollouts: one of {', '.join(ROLLOUTS)}, got {self.rollouts!r}")
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline: one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.sft_weight_end is not None:
            need_in_range("sft_weight_end", self.sft_weight_end, 0.0)
        for k in ("sft_every", "sft_every_end"):
            v = getattr(self, k)
            if v is not None:
                need_int(k, v, 1, "RL steps per SFT step, or null")
        if self.sft_every_end is not None and self.sft_every is None:
            raise ConfigError("sft_every_end: needs sft_every (the interval at the start)")
        for k in ("max_new_tokens", "max_turns", "eval_every"):
            v = getattr(self, k)
            if v is not None:
                need_int(k, v, 1 if k != "eval_every" else 0, "or null")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        build_reward(self.reward, "reward")  # errors name the node's path now


@dataclass
class RolloutSetup:
    """What sampling needs besides the model (from the store and the config): an
    environment (``mode == "env"``) or the store's policy turns (``mode == "store"``)."""

    text: Any
    make_env: Callable[[], Any] | None
    policy_role: str
    env_role: str
    action_pattern: str
    max_new_tokens: int
    max_turns: int
    max_positions: int
    mode: str = "env"
    prompts: StorePrompts | None = None
    seed: int = 0  # the run's seed (store mode: which turns each step draws)


class RLStage:
    """One RL stage's update (see the module docstring). ``sft`` is the stage's
    :class:`trainer.agent.runner.SFTStage` (the policy's optimizer, the hidden/head split,
    autocast and the anchor's loss weights); ``reference`` scores under the SFT weights."""

    def __init__(
        self,
        algo: str,
        sft: Any,
        params: RLParams,
        setup: RolloutSetup,
        *,
        batch_size: int,
        total_steps: int,
        reference: Any | None,
        dist: Distributed | None = None,
        shards: int = 1,
        local_shards: range | None = None,
    ) -> None:
        """``dist``: the ranks of a data-parallel run (None: one process); ``shards``: the
        prompts of a step are cut into that many shards (``batch_size / shards`` groups
        each), this process plays those of ``local_shards`` (every shard by default)."""
        if algo not in RL_ALGOS:
            raise ConfigError(f"algo: {algo!r} is not an RL stage ({', '.join(RL_ALGOS)})")
        self.algo = algo
        self.sft = sft
        self.p = params
        self.setup = setup
        self.batch_size = batch_size
        self.total_steps = max(total_steps, 1)
        self.reference = reference  # a frozen model, or None: the LoRA base (adapter off)
        self.loaded = sft.loaded
        self.device = sft.device
        hidden_size = int(self.loaded.model.config.hidden_size)
        self.value_head = torch.nn.Linear(hidden_size, 1).to(self.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.optimizers = {
            **sft.optimizers,
            "value": torch.optim.AdamW(self.value_head.parameters(), lr=params.value_lr),
        }
        self.reward = build_reward(params.reward, "reward")
        _check_leaves(self.reward, setup.mode)
        self.kl: Any = (
            FixedKLController(params.kl_coef)
            if params.kl_target is None
            else AdaptiveKLController(params.kl_coef, params.kl_target, params.kl_horizon)
        )
        self.reward_ema: float | None = None
        self.dist = dist if dist is not None and dist.enabled else None
        self.ranks = self.dist.world_size if self.dist is not None else 1
        self.n_shards = shards
        self.local_shards = range(shards) if local_shards is None else local_shards
        if batch_size % shards:
            raise ConfigError(
                f"batch_size: {batch_size} prompts per step cannot be split evenly over "
                f"{shards} shards; make it a multiple of {shards}"
            )
        self.per_shard = batch_size // shards  # groups of each shard per step
        if self.dist is not None:  # the reward's EMA statistics: the global batch's
            dist_ = self.dist

            def reduce(v: np.ndarray) -> np.ndarray:
                t = torch.from_numpy(v).to(dist_.device)
                return dist_.all_sum(t).cpu().numpy()

            self.reward.share_statistics(reduce)
        # the evaluation reads these as from an SFTStage
        self.hidden = sft.hidden
        self.lm_head = sft.lm_head
        self.weights = sft.weights
        self.autocast = sft.autocast

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "value_head": {k: v.detach().clone() for k, v in self.value_head.state_dict().items()},
            "kl": self.kl.state_dict(),
            "reward": self.reward.state_dict(),
            "reward_ema": self.reward_ema,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value_head.load_state_dict(state["value_head"])
        self.kl.load_state_dict(state["kl"])
        self.reward.load_state_dict(state["reward"])
        self.reward_ema = state["reward_ema"]

    # ------------------------------------------------------------------ one step
    def sft_weight(self, step: int) -> float:
        p = self.p
        if p.sft_weight_end is None:
            return p.sft_weight
        frac = min(step / self.total_steps, 1.0)
        return p.sft_weight + (p.sft_weight_end - p.sft_weight) * frac

    def sft_step_due(self, step: int) -> bool:
        """Whether stage step ``step`` (0-based) ends with a plain SFT step."""
        p = self.p
        if p.sft_every is None:
            return False
        if p.sft_every_end is None:
            return (step + 1) % p.sft_every == 0
        # the interval moves linearly; an SFT step falls where the running sum of
        # 1 / interval crosses an integer, so the steps stay evenly spread at every rate
        return math.floor(self._sft_phase(step + 1) + 1e-9) > math.floor(
            self._sft_phase(step) + 1e-9
        )

    def _sft_phase(self, k: int) -> float:
        p = self.p
        assert p.sft_every is not None and p.sft_every_end is not None
        a, b = p.sft_every, p.sft_every_end
        return sum(1.0 / (a + (b - a) * min(i / self.total_steps, 1.0)) for i in range(k))

    def seeds(self, step: int) -> list[int]:
        base = self.p.seed_base + step * self.batch_size
        return [base + i for i in range(self.batch_size) for _ in range(self.p.group_size)]

    def local_groups(self) -> list[int]:
        """The global indices of the groups (prompts) this process plays each step."""
        k = self.per_shard
        return [s * k + j for s in self.local_shards for j in range(k)]

    def _seed(self, *key: int) -> int:
        """A seed drawn from (seed_base, the run's seed, *key): alike on every rank."""
        seq = np.random.SeedSequence([self.p.seed_base, self.setup.seed, *key])
        return int(seq.generate_state(1, dtype=np.uint64)[0] % (2**63))

    def shard_prompt_rows(self, step: int) -> list[int]:
        """Store mode, several shards: each shard's ``batch_size / shards`` turns of step
        ``step``, drawn among the shard's prompts by a generator of (seed_base, the run's
        seed, step, shard); the groups of this process's shards, in global order."""
        assert self.setup.prompts is not None
        parts = np.array_split(self.setup.prompts.rows, self.n_shards)
        out = []
        for s in self.local_shards:
            rng = np.random.default_rng([self.p.seed_base, self.setup.seed, step, s])
            out += [int(r) for r in parts[s][rng.integers(0, len(parts[s]), size=self.per_shard)]]
        return out

    def prompt_rows(self, step: int) -> list[int]:
        """Store mode: the turns of step ``step``, each ``group_size`` times in a row."""
        assert self.setup.prompts is not None
        rng = np.random.default_rng([self.p.seed_base, self.setup.seed, step])
        rows = self.setup.prompts.sample(rng, self.batch_size)
        return [r for r in rows for _ in range(self.p.group_size)]

    def rollout(self, step: int) -> tuple[list[Episode], float]:
        if self.n_shards > 1:
            return self._sharded_rollout(step)
        model = self.loaded.model
        model.eval()
        t0 = time.perf_counter()
        try:
            if self.setup.mode == "store":
                eps = self._collect(model, self.prompt_rows(step))
            else:
                eps = self._collect(model, self.seeds(step))
        finally:
            model.train()
        return eps, time.perf_counter() - t0

    def _collect(self, model: Any, starts: list[int]) -> list[Episode]:
        """Episodes sampled from ``model``, one from each of ``starts``: the store's turns
        (``rollouts: store``), or the environment's reset seeds."""
        s, p = self.setup, self.p
        sampling: dict[str, Any] = dict(
            max_new_tokens=p.max_new_tokens or s.max_new_tokens, device=self.device,
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
            max_context=s.max_positions, autocast=self.autocast,
        )  # fmt: skip
        if s.mode == "store":
            assert s.prompts is not None
            return collect_prompts(model, s.text, s.prompts, starts, **sampling)
        assert s.make_env is not None
        return collect(
            model, s.text, s.make_env, starts, policy_role=s.policy_role,
            env_role=s.env_role, action_pattern=s.action_pattern,
            max_turns=p.max_turns or s.max_turns, **sampling,
        )  # fmt: skip

    def _sharded_rollout(self, step: int) -> tuple[list[Episode], float]:
        """This process's groups, one ``generate`` per group, each sampled with the torch
        generator seeded by (seed_base, the run's seed, step, global group index): one
        process with ``shards=N`` samples what N ranks sample, whichever rank plays it."""
        s, p = self.setup, self.p
        model = self.loaded.model
        model.eval()
        t0 = time.perf_counter()
        groups = self.local_groups()
        rows = self.shard_prompt_rows(step) if s.mode == "store" else []
        devices = [self.device] if self.device.type == "cuda" else []
        eps: list[Episode] = []
        try:
            for i, gi in enumerate(groups):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self._seed(step, gi))
                    start = (
                        rows[i] if s.mode == "store" else p.seed_base + step * self.batch_size + gi
                    )
                    eps += self._collect(model, [start] * p.group_size)
        finally:
            model.train()
        return eps, time.perf_counter() - t0

    def _sum(self, values: list[float | torch.Tensor]) -> list[float]:
        """``values`` summed over the ranks (one all-reduce, float64); as they are alone."""
        vec = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu()
                           for v in values])  # fmt: skip
        if self.dist is not None:
            vec = self.dist.all_sum(vec.to(self.dist.device)).cpu()
        return [float(v) for v in vec.tolist()]

    def _any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank must ask alike)."""
        return self._sum([float(flag)])[0] > 0 if self.dist is not None else flag

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """:func:`whiten` over the global batch: mean and unbiased variance of every rank's
        masked entries."""
        if self.dist is None:
            return whiten(x, mask, eps)
        zero = torch.zeros_like(x)
        m = mask.to(x.dtype)
        n_sum = self.dist.all_sum(torch.stack([m.sum(), torch.where(mask, x, zero).sum()]))
        n = n_sum[0].clamp(min=1)
        mean = n_sum[1] / n
        ss = self.dist.all_sum(torch.where(mask, (x - mean) ** 2, zero).sum().reshape(1))[0]
        var = ss / (n - 1).clamp(min=1)
        out = (x - mean) / (var.sqrt() + eps)
        return torch.where(mask, out, zero)

    def turn_rewards(self, eps: list[Episode]) -> tuple[list[list[float]], dict[str, float]]:
        """Each policy turn's reward, and the mean of every logged component."""
        samples, owner = [], []
        for i, e in enumerate(eps):
            n = len(e.texts)
            for j, said in enumerate(e.texts):
                if e.targets:  # a turn of the store: no environment, a target text
                    start = e.written.index(True) if any(e.written) else len(e.ids)
                    samples.append(RewardInput(
                        text=said, target=e.targets[j], n_tokens=self._turn_tokens(e, j),
                        prompt=str(self.setup.text.decode(e.ids[:start])),
                    ))  # fmt: skip
                else:
                    last = j == n - 1
                    samples.append(RewardInput(
                        text=said, env_return=e.env_rewards[j],
                        success=float(e.success and last), n_tokens=self._turn_tokens(e, j),
                    ))  # fmt: skip
                owner.append(i)
        error: RewardError | None = None
        try:
            total, logs = self.reward.evaluate(samples)
        except RewardError as e:  # a NaN or inf from a component: stop, naming it
            error = e
        if self.dist is not None:  # every rank stops, with the first failing rank's words
            reports = [m for m in self.dist.gather(None if error is None else str(error)) if m]
            if reports:
                raise NonFinite(f"the reward: {reports[0]}")
        elif error is not None:
            raise NonFinite(f"the reward: {error}") from None
        out: list[list[float]] = [[] for _ in eps]
        for i, v in zip(owner, total.tolist()):
            out[i].append(float(v))
        metrics = {k: float(np.mean(v)) for k, v in logs.items() if k.startswith("reward/")}
        return out, metrics

    @staticmethod
    def _turn_tokens(e: Episode, j: int) -> int:
        end = e.turn_ends[j]
        if end < 0:
            return 0
        start = end
        while start > 0 and e.written[start - 1]:
            start -= 1
        return end - start + 1

    def _scores(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logp_old, logp_ref, values_old), detached."""
        fwd, head = self.sft.forward_hidden, self.lm_head
        packed = shared_prefix(batch, self.p.group_size)
        with torch.no_grad(), self.autocast():
            logp_old, hidden, _ = token_logprobs(fwd, head, batch, packed=packed)
            values = self.value_head(hidden.float()).squeeze(-1)
            if self.reference is None:
                with self.loaded.model.disable_adapter():
                    logp_ref, _, _ = token_logprobs(fwd, head, batch, packed=packed)
            else:
                ref_fwd, ref_head = self.reference
                logp_ref, _, _ = token_logprobs(ref_fwd, ref_head, batch, packed=packed)
        return logp_old, logp_ref, values

    def update(self, step: int, sft_batches: Iterator[Any]) -> dict[str, Any]:
        """One RL step at stage step ``step``; ``sft_batches`` yields anchor batches (on the
        device) when ``sft_weight`` > 0."""
        p = self.p
        eps, rollout_s = self.rollout(step)
        per_turn, reward_metrics = self.turn_rewards(eps)
        batch = to_batch(eps, per_turn, int(self.setup.text.pad_id), self.setup.max_positions)
        batch = batch.to(self.device)
        mask = batch.written
        logp_old, logp_ref, values_old = self._scores(batch)
        kl_tok = torch.where(mask, logp_old - logp_ref, torch.zeros_like(logp_old))
        coef = float(self.kl.value)
        rewards = place_turn_rewards(batch.turn_rewards, batch.turn_end) - coef * kl_tok
        if self.algo == "ppo":
            adv, returns = token_gae(
                rewards, values_old, mask, batch.turn_end, p.gamma, p.lam, p.per_turn
            )
        else:
            returns = token_returns(rewards, mask, batch.turn_end, p.gamma, p.per_turn)
            adv = self._reinforce_advantages(batch, rewards, returns, values_old)
        if p.whiten_advantages:
            adv = self._whiten(adv, mask)
        ent_coef = entropy_coefficient(step, p.entropy_coef, p.entropy_decay, p.entropy_floor)
        w_sft = self.sft_weight(step)
        stats = self._optimise(
            batch, logp_old, values_old, adv, returns, ent_coef, w_sft, sft_batches, step
        )
        if self.sft_step_due(step):
            stats["sft_step_loss"] = self._sft_step(next(sft_batches))
        kl_tok_est, kl_local = kl_to_reference(logp_old, logp_ref, mask, p.kl_estimator)  # type: ignore[arg-type]
        generated = sum(e.n_generated for e in eps)
        if self.dist is None:
            kl_mean = float(kl_local)
            n_eps = len(eps)
            episode_reward = float(np.mean([sum(r) for r in per_turn])) if per_turn else 0.0
        else:  # the global batch's: the KL coefficient and the EMA stay alike on every rank
            kl_sum, n_tok, r_sum, n_eps_f, generated_f = self._sum([
                kl_tok_est.sum(), mask.sum(), float(sum(sum(r) for r in per_turn)),
                float(len(eps)), float(generated),
            ])  # fmt: skip
            kl_mean = kl_sum / max(n_tok, 1.0)
            n_eps = int(n_eps_f)
            episode_reward = r_sum / n_eps if n_eps else 0.0
            generated = int(generated_f)
        self.kl.update(kl_mean, n_eps)
        d = p.reward_ema_decay
        self.reward_ema = (
            episode_reward
            if self.reward_ema is None
            else d * self.reward_ema + (1 - d) * episode_reward
        )
        return {
            **reward_metrics,
            **stats,
            "reward/episode": episode_reward,
            "reward/episode_ema": self.reward_ema,
            "kl": kl_mean,
            "kl_coef": coef,
            "entropy_coef": ent_coef,
            "sft_weight": w_sft,
            "explained_variance": float(explained_variance(values_old, returns, mask)),
            **(
                {"rollout/success_rate": float(np.mean([e.success for e in eps]))}
                if self.setup.mode == "env"
                else {}
            ),
            "rollout/turns_mean": float(np.mean([len(e.texts) for e in eps])),
            "rollout/generated_tokens": float(generated),
            "rollout/generated_tokens_per_s": generated / max(rollout_s, 1e-9),
            "rollout/seconds": rollout_s,
        }

    def _sft_step(self, sb: Any) -> float:
        """One plain SFT step (the SAD loss) on the policy's optimizer."""
        loss, scaled = self._anchor_loss(sb)
        if self._any(not bool(torch.isfinite(loss))):
            raise NonFinite("the loss is not finite (sft_step_loss)")
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        scaled.backward()
        if self.dist is not None:
            self.dist.average_gradients(self.sft.trainable)
        clip = self.sft.grad_clip
        torch.nn.utils.clip_grad_norm_(
            self.sft.trainable, clip if clip is not None else float("inf")
        )
        opt.step()
        return float(loss.detach())

    def _anchor_loss(self, sb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The SAD loss of an anchor batch (this rank's part of the global one) to log, and
        the term to differentiate: normalised by the global batch's target weight, times
        the ranks (as the gradient average divides by them)."""
        if self.dist is None:
            with self.autocast():
                loss, _ = sad_loss(self.sft.hidden(sb), self.lm_head, sb, self.weights)
            return loss, loss
        norms = self.dist.all_sum(loss_norms(sb, self.weights))
        with self.autocast():
            part, _ = sad_loss(self.sft.hidden(sb), self.lm_head, sb, self.weights, norms=norms)
        # averaged over the ranks (as the metrics are), the logged loss is the global one
        return part * self.ranks, part * self.ranks

    def _whole_groups(self, n: int) -> bool:
        size = self.p.minibatch_episodes if self.algo == "ppo" else n
        return n % self.p.group_size == 0 and size % self.p.group_size == 0

    def _minibatches(self, n: int, step: int) -> Iterator[torch.Tensor]:
        """The rows of every minibatch of every epoch. With several shards each shard's
        groups are shuffled by a generator of (seed_base, the run's seed, step, epoch,
        shard) and a minibatch takes ``minibatch_episodes / shards`` of each shard's
        episodes: one process with ``shards=N`` steps on the union of N ranks' minibatches."""
        p, g = self.p, self.p.group_size
        epochs = p.ppo_epochs if self.algo == "ppo" else 1
        size = p.minibatch_episodes if self.algo == "ppo" else n
        if self.n_shards > 1:
            k = self.per_shard
            per_mb = max(size // g // self.n_shards, 1) if self.algo == "ppo" else k
            for epoch in range(epochs):
                perms = []
                for s in self.local_shards:
                    gen = torch.Generator().manual_seed(self._seed(step, epoch, s, 1))
                    perms.append(torch.randperm(k, generator=gen))
                for lo in range(0, k, per_mb):
                    groups = torch.cat([i * k + perm[lo : lo + per_mb]
                                        for i, perm in enumerate(perms)])  # fmt: skip
                    yield (groups[:, None] * g + torch.arange(g)).reshape(-1)
            return
        whole_groups = self._whole_groups(n)  # minibatches of whole groups
        for _ in range(epochs):
            if whole_groups:  # shuffle the groups, keep each group's rows together
                order = (torch.randperm(n // g)[:, None] * g + torch.arange(g)).reshape(-1)
            else:
                order = torch.randperm(n)
            for start in range(0, n, size):
                yield order[start : start + size]

    def _reinforce_advantages(
        self, batch: RolloutBatch, rewards: torch.Tensor, returns: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        mask = batch.written
        if self.p.baseline == "value":
            return value_baseline_advantages(returns, values, mask)
        episode = (rewards * mask).sum(1)  # (B,) the episode's reward less its KL penalty
        if self.p.baseline == "loo":
            groups = torch.arange(len(episode), device=episode.device) // self.p.group_size
            episode = episode - leave_one_out_baseline(episode, groups)
        return sequence_to_tokens(episode, mask)

    def _optimise(
        self, batch: RolloutBatch, logp_old: torch.Tensor, values_old: torch.Tensor,
        adv: torch.Tensor, returns: torch.Tensor, ent_coef: float, w_sft: float,
        sft_batches: Iterator[Any],
        step: int = 0,
    ) -> dict[str, float]:  # fmt: skip
        p = self.p
        params = self.sft.trainable + list(self.value_head.parameters())
        sums: dict[str, float] = {}
        count = 0
        g = p.group_size
        whole_groups = self._whole_groups(batch.input_ids.shape[0])
        for rows in self._minibatches(batch.input_ids.shape[0], step):
            rows = rows.to(self.device)
            mb = batch.rows(rows)
            packed = shared_prefix(mb, g) if whole_groups else None
            with self.autocast():
                logp, hidden, ent = token_logprobs(
                    self.sft.forward_hidden,
                    self.lm_head,
                    mb,
                    with_entropy=ent_coef > 0,
                    packed=packed,
                )
                # the value head reads the policy's features but does not train them:
                # a value loss that spikes (returns of a freshly normalised reward)
                # would otherwise pull the policy's body along with it
                values = self.value_head(hidden.detach().float()).squeeze(-1)
            mask = mb.written
            # a mean over the minibatch's tokens is one over the global minibatch's
            # (times the ranks, as the gradient average divides by them)
            scale: torch.Tensor | float = 1.0
            if self.dist is not None:
                n_local = mask.sum().to(torch.float32)
                n_all = self.dist.all_sum(n_local.clone().reshape(1))[0]
                scale = n_local * self.ranks / n_all.clamp(min=1.0)
            if self.algo == "ppo":
                pl = ppo_policy_loss(logp, logp_old[rows], adv[rows], mask, p.clip)
                vl = ppo_value_loss(values, values_old[rows], returns[rows], mask, p.value_clip)
                policy_loss, value_loss = pl.loss, vl.loss
                extra = {
                    "clip_fraction": float(pl.clip_fraction),
                    "approx_kl": float(pl.approx_kl),
                }
            else:
                policy_loss = reinforce_loss(logp, adv[rows], mask)
                value_loss = (
                    ppo_value_loss(values, values_old[rows], returns[rows], mask, None).loss
                    if p.baseline == "value"
                    else torch.zeros((), device=self.device)
                )
                extra = {}
            loss = policy_loss + p.vf_coef * value_loss
            entropy = masked_mean(ent, mask) if ent is not None else torch.zeros(())
            if ent is not None:
                loss = loss - ent_coef * entropy
            loss = loss * scale
            sft_loss = torch.zeros((), device=self.device)
            if w_sft > 0:
                sft_loss, scaled = self._anchor_loss(next(sft_batches))
                loss = loss + w_sft * scaled
            if self._any(not bool(torch.isfinite(loss))):
                parts = {"policy_loss": policy_loss, "value_loss": value_loss,
                         "entropy": entropy, "sft_loss": sft_loss}  # fmt: skip
                bad = [k for k, v in parts.items() if not bool(torch.isfinite(v))]
                raise NonFinite(f"the loss is not finite ({', '.join(bad) or 'loss'})")
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.dist is not None:
                self.dist.average_gradients(params)
            clip = self.sft.grad_clip
            torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
            for opt in self.optimizers.values():
                opt.step()
            for k, v in {
                "policy_loss": float(policy_loss.detach()),
                "value_loss": float(value_loss.detach()),
                "entropy": float(entropy.detach()), "sft_loss": float(sft_loss.detach()),
                **extra,
            }.items():  # fmt: skip
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}


def frozen_reference(loaded: Any) -> Any | None:
    """What scores under the reference: None with LoRA (the base with the adapter off),
    else a frozen copy's (forward_hidden, lm_head)."""
    if loaded.is_lora:
        return None
    from trainer.agent.model import hidden_and_head

    frozen = copy.deepcopy(loaded.model).eval().requires_grad_(False)
    return hidden_and_head(dataclasses.replace(loaded, model=frozen, base=frozen))


def _check_leaves(reward: Any, mode: str) -> None:
    """A reward whose leaves the rollouts cannot feed: one line naming the leaf's path."""
    for node in reward.nodes():
        if mode == "store" and node.kind in ENV_LEAVES:
            raise ConfigError(
                f"{node.path}: leaf {node.kind!r} needs an environment, and this stage's "
                "rollouts are the store's turns (rollouts: store); compare with the target "
                f"turn instead ({', '.join(TARGET_LEAVES)})"
            )
        if mode == "env" and node.kind in TARGET_LEAVES:
            raise ConfigError(
                f"{node.path}: leaf {node.kind!r} compares with the store's text of the turn, "
                "which episodes played in the environment do not have; set `rollouts: store`"
            )
