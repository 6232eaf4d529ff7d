"""Student training on a sequence store: ``algo: sft`` (SFT / Structured Agent Distillation).

``python -m trainer.train configs/agent-sft.yaml`` lands here when the stages are ``sft``
(:class:`AgentTrainer`). It shares the other trainers' run directory, checkpoints, exact
resume, best-checkpoint tracking, early stopping, ``metrics.jsonl``, TensorBoard,
``curves.png`` and ``summary.json`` (:class:`trainer.loop.StagedTrainer`).

The model is any causal LM of ``transformers`` (``model:`` of the config,
:mod:`trainer.agent.model`): a local directory, or a config trained from scratch, with
LoRA through ``peft``. ``precision`` runs the passes under autocast.

An ``sft`` stage (:class:`SFTParams`, the keys beside ``algo`` / ``steps``): AdamW over the
trainable weights; each optimizer step sums ``grad_accumulation`` micro-batches of
``batch_size`` episodes (so ``batch_size * grad_accumulation`` episodes per step), clips
the gradient norm (``grad_clip``), and follows the stage's ``lr_schedule``. Batches come
from :class:`trainer.agent.data.BucketSampler` (similar lengths together; ``pack`` puts
several episodes in a row; ``curriculum`` admits short episodes first). The loss is
:func:`trainer.agent.losses.sad_loss`: token cross-entropy on what the policy writes,
``span_weights`` per span name, plus ``distill_weight`` * KL to the teacher's top-k when
the store has them. ``epochs`` instead of ``steps``: ``ceil(epochs * train episodes /
(batch_size * grad_accumulation))`` steps.

Evaluation (:mod:`trainer.agent.evaluation`) on held-out episodes chosen by episode id
(``agent.eval_fraction``), and online in the store's text environment when it names one.
The best checkpoint is picked by ``eval/success_rate`` when the student plays the store's
environment, else by ``eval/action_accuracy``, unless ``early_stopping.metric``
says otherwise. At the end, the student is written as a plain model directory
(``RUN/model/``: merged weights with LoRA, the store's tokenizer beside them) that
``AutoModelForCausalLM.from_pretrained`` opens.

Data-parallel (``torchrun``, :mod:`trainer.distributed`; ``ppo`` and ``reinforce``: see
:mod:`trainer.agent.rl`): the training episodes are cut into ``shards`` (one per rank unless the config says more), each
rank draws ``batch_size / ranks`` episodes per micro-batch from its own shards
(:class:`trainer.agent.data.ShardedBucketSampler`), and one process with ``shards=N``
draws the union of N ranks' batches. The loss is normalised by the global batch's target
weight (summed over the ranks before the forward passes), so the averaged gradient is the
one of the union batch; it is averaged before clipping and the step. Rank 0 alone
evaluates (its results broadcast) and writes the run directory; a checkpoint holds every
rank's generators.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.format import StoreError
from trainer.agent.data import (
    BucketSampler,
    SequenceArrays,
    ShardedBucketSampler,
    collate,
    packed_attention_mask,
)
from trainer.agent.evaluation import offline_metrics, play_online
from trainer.agent.losses import label_weights, loss_norms, sad_loss
from trainer.checkpoint import CheckpointError, load_checkpoint, seed_everything
from trainer.config import (
    ConfigError,
    StageConfig,
    TrainConfig,
    build_section,
    need_in_range,
    need_int,
)
from trainer.distributed import Distributed
from trainer.logging import mark_panel, save_panels, stage_starts
from trainer.loop import RANK_STREAM, RUN_ERRORS, RunError, StagedTrainer, resolved_shards
from trainer.optim import OptimizerSpec, build_optimizer, make_schedulers
from trainer.samplers import step_seed

AGENT_METRIC = "eval/action_accuracy"  # early_stopping.metric auto, offline
ONLINE_METRIC = "eval/success_rate"  # ... and when the store's environment is played
_RESUME_FIXED = ("store", "seed", "stages", "model", "precision", "agent", "store_hash", "shards")


# --------------------------------------------------------------------------- settings


@dataclass
class AgentSettings:
    """The ``agent`` section of a config: the held-out split and the evaluations."""

    # Fraction of the store's episodes held out for evaluation, chosen by a hash of
    # (split_seed, episode id): the same episodes whatever the run's seed or the store's order.
    eval_fraction: float = 0.1
    # Seed of the held-out split (kept apart from `seed`, so runs of several seeds are
    # evaluated on the same episodes).
    split_seed: int = 0
    # Held-out episodes scored offline per evaluation (null: all of them).
    eval_max_episodes: int | None = 500
    # Episodes per forward pass of the offline evaluation.
    eval_batch_size: int = 32
    # Held-out policy turns decoded greedily after their stored context and scored against
    # the store's text (eval/turn_exact_match, turn_token_f1, turn_rouge_l); 0: off.
    eval_turns: int = 128
    # Online evaluation: most tokens the student may write per turn.
    max_new_tokens: int = 96
    # Online evaluation: 0 acts greedily, > 0 samples at this temperature.
    temperature: float = 0.0
    # The role of the environment's turns in the store (null: the store's most common
    # non-policy role).
    env_role: str | None = None
    # A scripted teacher of the env (trainer.envs.make_teacher) played on the same seeds,
    # once per run, for eval/success_vs_teacher (null: none).
    teacher: str | None = "planner"
    # Write RUN/model/ (merged weights, config, tokenizer) at the end of the run.
    export_merged: bool = True

    def __post_init__(self) -> None:
        need_in_range("eval_fraction", self.eval_fraction, 0.0, 0.9)
        need_int("split_seed", self.split_seed, 0, "the held-out split's seed")
        if self.eval_max_episodes is not None:
            need_int("eval_max_episodes", self.eval_max_episodes, 1, "or null for all")
        need_int("eval_batch_size", self.eval_batch_size, 1, "episodes per forward pass")
        need_int("eval_turns", self.eval_turns, 0, "held-out turns decoded, 0 for none")
        need_int("max_new_tokens", self.max_new_tokens, 1, "tokens per generated turn")
        need_in_range("temperature", self.temperature, 0.0)
        for key in ("env_role", "teacher"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{key}: must be a name or null, got {v!r}")
        if not isinstance(self.export_merged, bool):
            raise ConfigError(f"export_merged: must be true or false, got {self.export_merged!r}")


@dataclass
class Curriculum:
    """Short episodes first: the longest admitted grows from ``start_tokens`` to every episode
    at ``full_at`` of the stage (null start_tokens: no curriculum)."""

    start_tokens: int | None = None
    full_at: float = 0.5

    def __post_init__(self) -> None:
        if self.start_tokens is not None:
            need_int("start_tokens", self.start_tokens, 1, "or null for no curriculum")
        need_in_range("full_at", self.full_at, 0.0, 1.0)


@dataclass
class SFTParams:
    """The hyper-parameters of an ``sft`` stage."""

    # AdamW learning rate, weight decay and betas.
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    # Loss weight per label: span names of the store and `other` (default 1 each).
    span_weights: dict[str, float] = field(default_factory=dict)
    # Weight of the KL to the teacher's top-k log-probabilities (needs them in the store).
    distill_weight: float = 0.0
    # Micro-batches of `batch_size` episodes summed per optimizer step.
    grad_accumulation: int = 1
    # Several whole episodes per row (attention stays within an episode).
    pack: bool = False
    # Row length when packing (null: the longest episode of the batch).
    pack_max_tokens: int | None = None
    # Pools of batch_size episodes drawn per step, sorted by length, one picked: more
    # buckets, less padding (1: no bucketing).
    buckets: int = 8
    # Short-to-long curriculum.
    curriculum: Curriculum = field(default_factory=Curriculum)
    # Train for this many passes over the training episodes instead of `steps`.
    epochs: float | None = None
    # Stage steps between evaluations (null: eval.every).
    eval_every: int | None = None

    def __post_init__(self) -> None:
        need_in_range("lr", self.lr, 0.0)
        need_in_range("weight_decay", self.weight_decay, 0.0)
        if (
            not isinstance(self.betas, list | tuple)
            or len(self.betas) != 2
            or not all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas)
        ):
            raise ConfigError(f"betas: must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not isinstance(self.span_weights, dict):
            raise ConfigError(
                f"span_weights: must map span names to weights, e.g. {{reasoning: 0.5, "
                f"action: 1.0}}, got {self.span_weights!r}"
            )
        need_in_range("distill_weight", self.distill_weight, 0.0)
        need_int("grad_accumulation", self.grad_accumulation, 1, "micro-batches per step")
        if not isinstance(self.pack, bool):
            raise ConfigError(f"pack: must be true or false, got {self.pack!r}")
        if self.pack_max_tokens is not None:
            need_int("pack_max_tokens", self.pack_max_tokens, 1, "tokens per packed row")
        need_int("buckets", self.buckets, 1, "pools per step; 1 = no bucketing")
        if isinstance(self.curriculum, dict):
            self.curriculum = build_section(Curriculum, self.curriculum, "curriculum")
        if self.epochs is not None:
            need_in_range("epochs", self.epochs, 0.0)
            if self.epochs <= 0:
                raise ConfigError(f"epochs: must be > 0, got {self.epochs}")
        if self.eval_every is not None:
            need_int("eval_every", self.eval_every, 0, "stage steps between evaluations")


def stage_params(cfg: TrainConfig, index: int) -> Any:
    """An ``sft`` stage's :class:`SFTParams`, a ``ppo`` / ``reinforce`` stage's
    :class:`trainer.agent.rl.RLParams`."""
    from trainer.agent.rl import RL_ALGOS, RLParams

    stage = cfg.stages[index]
    where = f"stages.{index}"
    if stage.algo != "sft" and stage.algo not in RL_ALGOS:
        raise ConfigError(
            f"{where}.algo: {stage.algo!r} is not a sequence-store stage (sft, ppo, reinforce)"
        )
    try:
        if stage.algo in RL_ALGOS:
            return build_section(RLParams, dict(stage.params), where)
        return build_section(SFTParams, dict(stage.params), where)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}.{msg}") from None


def parse_settings(raw: dict[str, Any] | None) -> AgentSettings:
    return build_section(AgentSettings, raw or {}, "agent")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


# --------------------------------------------------------------------------- one stage


class SFTStage:
    """One ``sft`` stage's update: ``grad_accumulation`` micro-batches, one AdamW step."""

    def __init__(
        self,
        loaded: Any,
        params: SFTParams,
        weights: torch.Tensor,
        *,
        precision: str,
        device: torch.device,
        grad_clip: float | None,
        has_teacher: bool,
        optimizer: OptimizerSpec | None = None,
        dist: Distributed | None = None,
    ) -> None:
        """``dist``: the ranks of a data-parallel run, over which each update normalises
        the loss and averages the gradients (None: one process)."""
        from trainer.agent.model import hidden_and_head, make_scaler, precision_context

        self.loaded = loaded
        self.p = params
        self.weights = weights.to(device)
        self.device = device
        self.grad_clip = grad_clip
        self.dist = dist if dist is not None and dist.enabled else None
        self.forward_hidden, self.lm_head = hidden_and_head(loaded)
        self.autocast = lambda: precision_context(precision, device)
        self.scaler = make_scaler(precision, device)
        self.trainable = [p for p in loaded.model.parameters() if p.requires_grad]
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "model": torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": params.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=params.lr,
                betas=params.betas,
                foreach=True,
            )
            if optimizer is None  # else the stage's optimizer; lr, weight_decay, betas its own
            else build_optimizer(
                [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                optimizer,
                "optimizer",
                defaults={
                    "lr": params.lr,
                    "weight_decay": params.weight_decay,
                    "betas": params.betas,
                },
            )
        }
        self.distill = params.distill_weight if has_teacher else 0.0

    def hidden(self, batch: Any) -> torch.Tensor:
        """(B, L, H) last hidden states of a :class:`TokenBatch`: packed rows attend within
        each episode; unpacked rows are right-padded at positions 0, 1, ..., which the
        model runs as plain causal attention (no mask, no host sync)."""
        if batch.packed:
            mask = packed_attention_mask(batch.segment_ids)
            return self.forward_hidden(batch.input_ids, mask, batch.position_ids)
        return self.forward_hidden(batch.input_ids, None, None)

    def update(self, batches: list[Any]) -> dict[str, torch.Tensor]:
        """One optimizer step over the micro-batches (already on the device)."""
        opt = self.optimizers["model"]
        # a micro-batch's loss is its weighted mean; weighted by its share of the step's
        # total target weight, the sum is the weighted mean over the whole step (as one
        # batch of every micro-batch's episodes would give), with no host sync
        shares = [self.weights[b.labels].sum() for b in batches]
        norms: list[torch.Tensor | None] = [None] * len(batches)
        ranks = 1
        if self.dist is not None:
            # data-parallel: every micro-batch's shares and denominators over the global
            # batch (one all-reduce), each rank's loss its part of the global weighted mean,
            # times the ranks as the gradient average divides by them
            local = torch.stack(
                [torch.cat([s.reshape(1).float(), loss_norms(b, self.weights)])
                 for s, b in zip(shares, batches)]
            )  # fmt: skip
            glob = self.dist.all_sum(local)
            shares = list(glob[:, 0].unbind())
            norms = list(glob[:, 1:].unbind())
            ranks = self.dist.world_size
        total_w = torch.stack(shares).sum().clamp_min(1e-8)
        metrics: list[dict[str, torch.Tensor]] = []
        for b, share, norm in zip(batches, shares, norms):
            with self.autocast():
                hidden = self.hidden(b)
                loss, m = sad_loss(
                    hidden, self.lm_head, b, self.weights, distill_weight=self.distill,
                    norms=norm,
                )  # fmt: skip
            scaled = loss * (share / total_w)
            if ranks > 1:
                scaled = scaled * ranks
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            metrics.append(m)
        if self.dist is not None:  # before unscaling: an inf on any rank is seen by all
            self.dist.average_gradients(self.trainable)
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(
            self.trainable, self.grad_clip if self.grad_clip is not None else float("inf")
        )
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        out = {k: torch.stack([m[k] for m in metrics]).mean() for k in metrics[0]}
        out["grad_norm"] = norm.detach()
        return out


# --------------------------------------------------------------------------- the run


@dataclass
class _StageExtra:
    """Per-stage bookkeeping a checkpoint carries beside StageProgress."""

    tokens: int = 0  # real tokens trained on
    trained_tokens: int = 0  # tokens with a loss target
    episodes: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _StageExtra:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class AgentTrainer(StagedTrainer):
    """Runs an SFT config on a sequence store in its run directory."""

    resume_fixed = _RESUME_FIXED
    metric: str

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        log: Any = None,
        dist: Distributed | None = None,
    ) -> None:
        from trainer.agent.model import parse_model_settings

        super().__init__(cfg, resume=resume, overwrite=overwrite, log=log, dist=dist)
        self.settings = parse_settings(cfg.agent)
        self.model_settings = parse_model_settings(cfg.model, where="model")
        self.params = [stage_params(cfg, i) for i in range(len(cfg.stages))]
        es = cfg.early_stopping
        self.metric = AGENT_METRIC if es.metric == "auto" else es.metric
        self.mode = "max" if es.metric == "auto" else es.mode

    # ------------------------------------------------------------------ setup
    def _check_resumed(self, ckpt: dict[str, Any], path: Path) -> None:
        if ckpt.get("meta", {}).get("kind") != "agent":
            raise RunError(f"--resume: {path} is not a checkpoint of an sft run; start a new run")

    def _open_store(self) -> Any:
        from pipeline.sequences.store import open_sequence_store

        try:
            store = open_sequence_store(self.cfg.store)
        except StoreError as e:
            raise RunError(
                f"store: {e}; sft stages need a sequence store (kind: sequences)"
            ) from None
        if self.cfg.store_hash is not None and self.cfg.store_hash != store.content_hash:
            raise RunError(
                f"store: {self.cfg.store} has content hash {store.content_hash}, the config "
                f"expects {self.cfg.store_hash}; the store was rebuilt from other data "
                "(drop store_hash to accept it)"
            )
        return store

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        from trainer.agent.data import split_episodes

        held = split_episodes(
            list(self.store.episode_ids), self.settings.eval_fraction, self.settings.split_seed
        )
        train = np.flatnonzero(~held)
        evals = np.flatnonzero(held)
        if len(train) == 0:
            raise RunError(
                f"agent.eval_fraction: {self.settings.eval_fraction} leaves no training episode"
            )
        if self.settings.eval_max_episodes is not None:
            evals = evals[: self.settings.eval_max_episodes]
        return train, evals

    def _resolve_steps(self) -> None:
        """``epochs`` -> steps, once the training split's size is known."""
        n = len(self.train_pool)
        for st, p in zip(self.cfg.stages, self.params):
            if isinstance(p, SFTParams) and p.epochs is not None:
                per_step = st.batch_size * p.grad_accumulation
                st.steps = max(1, math.ceil(p.epochs * n / per_step))

    def _roles(self) -> tuple[str, str | None]:
        policy_roles = list(self.store.manifest["spec"]["fields"]["policy_roles"])
        turns = self.store.turns
        others: dict[str, int] = {}
        for role, pol in zip(turns.role, turns.policy.tolist()):
            if not pol:
                others[role] = others.get(role, 0) + 1
        env_role = self.settings.env_role or (
            max(others, key=others.__getitem__) if others else None
        )
        return policy_roles[0], env_role

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg, dist = self.cfg, self.dist
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # Every rank checks and loads what it needs; all go on, or all stop with one report.
        with dist.agreed(RUN_ERRORS):
            device = torch.device(cfg.resolved_device())
            if dist.enabled and device.type == "cuda":
                device = dist.device  # cuda:LOCAL_RANK
            self.device = device
            if dist.world_size > 1:
                self._check_data_parallel()
            self.n_shards = resolved_shards(cfg, dist) if dist.enabled else cfg.shards or 1
            if dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt = self._prepare_dir()
            self.store = self._open_store()
            self.text = self.store.text()
            self.arrays = SequenceArrays.from_store(self.store)
            self.label_names = list(self.store.label_names)
            self.train_pool, self.eval_pool = self._split()
            self._check_shards()
            self._check_rl_shards()
            self._resolve_steps()
            self.policy_role, self.env_role = self._roles()
            if self.cfg.early_stopping.metric == "auto" and self._plays_online():
                # held-out action accuracy saturates long before the student can act on its
                # own: with an environment, the best checkpoint is the one that succeeds most
                self.metric = ONLINE_METRIC
            self._open_run(ckpt, self.store.content_hash, device)
            init_state = self._init_from_state(cfg.init_from) if cfg.init_from else None
        self._rank_digests: dict[str, list[str]] = {}
        if ckpt is None:
            self.extra = [_StageExtra() for _ in cfg.stages]
        else:
            self.extra = [_StageExtra.from_dict(d) for d in ckpt["loop"]["agent"]]
        self._teacher_eval: dict[str, float] | None = None
        self._eval_prompts: Any = None
        self._model_info: dict[str, Any] = {}
        self._run_stages(ckpt, init_state)
        return self._finish()

    def _check_data_parallel(self) -> None:
        """Nothing to refuse before the shards are known (see :meth:`_check_rl_shards`)."""

    def _check_rl_shards(self) -> None:
        """The RL stages' global sizes the shards split evenly: the prompts of a step (the
        batch_size, checked with the config), the anchor batch and PPO's minibatches."""
        n = self.n_shards
        if n == 1:
            return
        who = f"{self.dist.world_size} ranks" if self.cfg.shards is None else f"shards={n}"
        for i, (st, p) in enumerate(zip(self.cfg.stages, self.params)):
            if isinstance(p, SFTParams):
                continue
            if st.batch_size % n:
                raise RunError(
                    f"stages.{i}.batch_size: {st.batch_size} prompts per step are split "
                    f"evenly over {who}; make it a multiple of {n}"
                )
            if (p.sft_weight > 0 or p.sft_every is not None) and p.sft_batch_size % n:
                raise RunError(
                    f"stages.{i}.sft_batch_size: {p.sft_batch_size} anchor episodes are split "
                    f"evenly over {who}; make it a multiple of {n}"
                )
            if st.algo == "ppo" and p.minibatch_episodes % (p.group_size * n):
                raise RunError(
                    f"stages.{i}.minibatch_episodes: {p.minibatch_episodes} episodes per "
                    f"minibatch are whole groups of {p.group_size} split evenly over {who}; "
                    f"make it a multiple of {p.group_size * n}"
                )

    def _check_shards(self) -> None:
        """Every shard needs a training episode; the per-episode trained-token counts for
        the global batch's token counts."""
        self._trained_per_episode: np.ndarray | None = None
        if self.n_shards == 1:
            return
        if len(self.train_pool) < self.n_shards:
            who = (
                f"{self.dist.world_size} ranks" if self.cfg.shards is None
                else f"shards={self.n_shards}"
            )  # fmt: skip
            raise RunError(
                f"{self.cfg.store}: {len(self.train_pool)} training episode(s) cannot be shared "
                f"by {who}: every shard needs an episode (start fewer ranks, or lower "
                "agent.eval_fraction)"
            )
        trained = np.concatenate([[0], np.cumsum(self.arrays.labels > 0, dtype=np.int64)])
        offsets = self.arrays.offsets
        self._trained_per_episode = trained[offsets[1:]] - trained[offsets[:-1]]

    def _resolved_config(self, store_hash: str, device: torch.device) -> dict[str, Any]:
        """Also the number of shards of a data-parallel run (one per rank unless the config
        sets it)."""
        resolved = super()._resolved_config(store_hash, device)
        if self.n_shards > 1:
            resolved["shards"] = self.n_shards
        return resolved

    def _init_from_state(self, path: str) -> dict[str, Any]:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            raise RunError(f"--init-from: {e}") from None
        if ckpt.get("meta", {}).get("kind") != "agent":
            raise RunError(f"--init-from: {path} is not a checkpoint of an sft run")
        return dict(ckpt["algo_state"])

    def _build_model(self) -> Any:
        from trainer.agent.model import build_model

        store_vocab = int(self.text.vocab_size)
        return build_model(
            self.model_settings,
            vocab_size=store_vocab,
            pad_id=int(self.text.pad_id),
            end_id=int(self.text.end_id),
            max_positions=int(self.store.manifest["sequences"]["max_tokens"]),
            seed=self.cfg.seed,
        )

    @staticmethod
    def _state(loaded: Any) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model: the trainable weights under LoRA (the base
        is rebuilt from its path or seeded config), else every weight."""
        sd = loaded.model.state_dict()
        if not loaded.is_lora:
            return {k: v.detach().clone() for k, v in sd.items()}
        names = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in sd.items() if k in names}

    @staticmethod
    def _load_state(loaded: Any, state: dict[str, torch.Tensor], where: str) -> None:
        try:
            missing, unexpected = loaded.model.load_state_dict(state, strict=not loaded.is_lora)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise RunError(f"{where}: the weights do not fit this model ({first})") from None
        if unexpected:
            raise RunError(f"{where}: weights this model does not have: {unexpected[:3]}")

    # ------------------------------------------------------------------ one stage
    def _run_stage(
        self, index: int, ckpt: dict[str, Any] | None, init_state: dict[str, Any] | None
    ) -> None:
        cfg = self.cfg
        stage, p = cfg.stages[index], self.params[index]
        self.state.stage_index = index
        if ckpt is None:
            seed_everything(step_seed(cfg.seed, index, stream=0xA6E7))
        loaded = self._build_model()
        loaded.model.to(self.device)
        loaded.model.train()
        self._model_info = loaded.describe()
        if ckpt is not None:
            self._load_state(loaded, ckpt["algo_state"], "--resume")
        else:
            source = self._stage_final_state(stage.init) if stage.init else init_state
            if source is not None:
                where = f"stages.{index}.init" if stage.init else "--init-from"
                self._load_state(loaded, source, where)
        if stage.algo != "sft":
            self._run_rl_stage(index, ckpt, init_state, loaded)
            return
        weights = label_weights(self.label_names, p.span_weights)
        has_teacher = self.arrays.teacher_ids is not None
        if p.distill_weight > 0 and not has_teacher:
            raise RunError(
                f"stages.{index}.distill_weight: {p.distill_weight} but the store carries no "
                "teacher log-probabilities (fields.teacher of its spec)"
            )
        dist = self.dist
        algo = SFTStage(
            loaded, p, weights, precision=cfg.precision, device=self.device,
            grad_clip=stage.grad_clip, has_teacher=has_teacher, optimizer=stage.optimizer,
            dist=dist,
        )  # fmt: skip
        sampler: BucketSampler | ShardedBucketSampler
        if self.n_shards == 1:
            sampler = BucketSampler(
                self.arrays.lengths, self.train_pool, stage.batch_size, cfg.seed,
                stream=index, buckets=p.buckets, total_steps=stage.steps,
                start_tokens=p.curriculum.start_tokens, full_at=p.curriculum.full_at,
            )  # fmt: skip
        else:
            per_rank = self.n_shards // dist.world_size
            sampler = ShardedBucketSampler(
                self.arrays.lengths, self.train_pool, stage.batch_size, cfg.seed,
                shards=self.n_shards, local=range(dist.rank * per_rank, (dist.rank + 1) * per_rank),
                stream=index, buckets=p.buckets, total_steps=stage.steps,
                start_tokens=p.curriculum.start_tokens, full_at=p.curriculum.full_at,
            )  # fmt: skip
        schedulers = self._schedulers(algo, stage)
        if ckpt is not None:
            self._resume_stage(ckpt, algo.optimizers, schedulers, sampler)
        else:
            self.state.stages[index].start_step = self.state.step
            self._write_stage_start(stage)
            if dist.rank > 0:  # the weights are built alike; each rank draws its own noise
                seed_everything(step_seed(cfg.seed, index, stream=RANK_STREAM + dist.rank))
        if dist.enabled:  # as DDP does: every rank starts from rank 0's weights
            dist.broadcast_tensors([t for t in loaded.model.parameters() if t.requires_grad])
        self._train_stage(
            index, ckpt, algo, self._stepper(index, algo, sampler), schedulers, sampler
        )

    def _train_stage(
        self,
        index: int,
        ckpt: dict[str, Any] | None,
        algo: Any,
        step: Callable[[int], dict[str, Any]],
        schedulers: dict[str, Any],
        sampler: BucketSampler | ShardedBucketSampler,
    ) -> None:
        """Stage ``index``'s steps to its end (or an early stop), its final checkpoint, and
        the exported model after the last stage."""
        cfg, p = self.cfg, self.params[index]
        stage = cfg.stages[index]
        self._algo = algo
        elapsed = self._train_steps(
            index,
            self._pending_metrics(ckpt, self.device),
            step=step,
            schedulers=schedulers,
            row_rates=self._row_rates(index, algo),
            evaluate=lambda: self._evaluate(algo, index),
            save=lambda buf: self._save_step(algo, schedulers, sampler, index, buf),
            every_eval=cfg.eval.every if p.eval_every is None else p.eval_every,
        )
        sp = self.state.stages[index]
        sp.done = True
        sp.wall_time_s = elapsed()
        self._final_states[stage.name] = self._state(algo.loaded)
        if self.dist.enabled:  # weights and optimizer states: the same on every rank
            self._rank_digests[stage.name] = self.dist.same_state(
                {
                    "model": self._final_states[stage.name],
                    "optimizers": {k: o.state_dict() for k, o in algo.optimizers.items()},
                    # an RL stage's value head, KL coefficient and reward EMA state
                    **({"rl": algo.state_dict()} if hasattr(algo, "value_head") else {}),
                },
                f"stage {stage.name}",
            )
        self._save_final(index, self._checkpoint(algo, schedulers, sampler, index, []))
        if index == len(cfg.stages) - 1 and self.settings.export_merged and self.dist.is_main:
            self._export(algo.loaded)

    def _run_rl_stage(
        self,
        index: int,
        ckpt: dict[str, Any] | None,
        init_state: dict[str, Any] | None,
        loaded: Any,
    ) -> None:
        """A ``ppo`` / ``reinforce`` stage (:mod:`trainer.agent.rl`) on the loaded model."""
        from trainer.agent.model import hidden_and_head
        from trainer.agent.rl import RLStage, RolloutSetup

        cfg = self.cfg
        stage, p = cfg.stages[index], self.params[index]
        made = self._env()
        pattern = self.store.span_patterns.get("action")
        can_play = made is not None and pattern is not None
        mode = p.rollouts if p.rollouts != "auto" else ("env" if can_play else "store")
        if mode == "env" and not can_play:
            raise RunError(
                f"stages.{index}.rollouts: env plays episodes in the store's environment: its "
                "spec needs `env:` and an `action` span with a pattern (and eval.episodes > 0); "
                "`rollouts: store` samples the store's turns instead"
            )
        prompts = None
        if mode == "store":
            prompts = self._prompts(self.train_pool)
            if len(prompts) == 0:
                raise RunError(
                    f"stages.{index}.rollouts: store: the training split has no turn of the "
                    f"policy role {self.policy_role!r}"
                )
            if len(prompts) < self.n_shards:
                raise RunError(
                    f"stages.{index}.rollouts: store: {len(prompts)} turn(s) of the policy "
                    f"role cannot be shared by {self.n_shards} shards: every shard needs one"
                )
        make_env, max_turns = made if made is not None else (None, 0)
        sft_params = SFTParams(
            lr=p.lr, weight_decay=p.weight_decay, betas=p.betas, span_weights=p.span_weights
        )
        weights = label_weights(self.label_names, p.span_weights)
        sft = SFTStage(
            loaded, sft_params, weights, precision=cfg.precision, device=self.device,
            grad_clip=stage.grad_clip, has_teacher=False, optimizer=stage.optimizer,
        )  # fmt: skip
        reference = None
        if not loaded.is_lora:  # the reference: the stage's starting weights, frozen
            ref = self._build_model()
            source = self._stage_final_state(stage.init) if stage.init else init_state
            if source is not None:
                self._load_state(ref, source, f"stages.{index}.init")
            ref.model.to(self.device).eval().requires_grad_(False)
            reference = hidden_and_head(ref)
        max_positions = int(self.store.manifest["sequences"]["max_tokens"])
        setup = RolloutSetup(
            self.text, make_env, self.policy_role, str(self.env_role), pattern or "",
            self.settings.max_new_tokens, max_turns, max_positions, mode, prompts, cfg.seed,
        )  # fmt: skip
        dist = self.dist
        per_rank = self.n_shards // dist.world_size
        local = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        algo = RLStage(
            stage.algo, sft, p, setup, batch_size=stage.batch_size, total_steps=stage.steps,
            reference=reference, dist=dist, shards=self.n_shards, local_shards=local,
        )  # fmt: skip
        sampler: BucketSampler | ShardedBucketSampler
        if self.n_shards == 1:
            sampler = BucketSampler(
                self.arrays.lengths, self.train_pool, p.sft_batch_size, cfg.seed, stream=index,
                total_steps=stage.steps,
            )  # fmt: skip
        else:  # each rank's share of the global anchor batch, from its own shards
            sampler = ShardedBucketSampler(
                self.arrays.lengths, self.train_pool, p.sft_batch_size, cfg.seed,
                shards=self.n_shards, local=local, stream=index, total_steps=stage.steps,
            )  # fmt: skip
        schedulers = make_schedulers(
            {"model": algo.optimizers["model"]}, stage.lr_schedule, stage.steps
        )
        if ckpt is not None:
            self._resume_stage(ckpt, algo.optimizers, schedulers, sampler)
            algo.load_state_dict(ckpt["loop"]["rl"])
        else:
            self.state.stages[index].start_step = self.state.step
            self._write_stage_start(stage)
            if dist.rank > 0:  # the weights are built alike; each rank draws its own noise
                seed_everything(step_seed(cfg.seed, index, stream=RANK_STREAM + dist.rank))
        if dist.enabled:  # as DDP does: every rank starts from rank 0's weights
            dist.broadcast_tensors(
                [t for t in loaded.model.parameters() if t.requires_grad]
                + list(algo.value_head.parameters())
            )
        if ckpt is None and p.eval_at_start:
            self._evaluate(algo, index)
        extra = self.extra[index]
        pad = int(self.text.pad_id)

        def anchor() -> Any:
            while True:
                b = collate(self.arrays, sampler.sample(), pad)
                yield b.to(self.device)

        anchors = anchor()

        def step(s0: int) -> dict[str, Any]:
            from trainer.agent.rl import NonFinite

            try:
                out = algo.update(s0, anchors)
            except NonFinite as e:
                at = self.state.stages[index].start_step + s0 + 1
                raise RunError(
                    f"stages.{index} ({stage.name}) step {at} (stage step {s0 + 1}): {e}; "
                    "stopped, the last checkpoint is the last good state (--resume "
                    "continues from it)"
                ) from None
            extra.tokens += int(out["rollout/generated_tokens"])
            extra.episodes += stage.batch_size * p.group_size
            return out

        self._train_stage(index, ckpt, algo, step, schedulers, sampler)

    def _prompts(self, episodes: np.ndarray) -> Any:
        from trainer.agent.prompts import StorePrompts

        header = len(self.text.header_ids(self.policy_role))
        return StorePrompts.from_store(self.store, episodes, self.policy_role, header)

    def _schedulers(self, algo: SFTStage, stage: StageConfig) -> dict[str, Any]:
        return make_schedulers(algo.optimizers, stage.lr_schedule, stage.steps)

    def _stepper(
        self, index: int, algo: SFTStage, sampler: BucketSampler | ShardedBucketSampler
    ) -> Callable[[int], dict[str, Any]]:
        p, extra = self.params[index], self.extra[index]
        names = self.label_names
        pad = int(self.text.pad_id)

        lengths, trained = self.arrays.lengths, self._trained_per_episode

        def step(s0: int) -> dict[str, Any]:
            batches = []
            for _ in range(p.grad_accumulation):
                episodes = sampler.sample()
                b = collate(self.arrays, episodes, pad, pack=p.pack, max_len=p.pack_max_tokens)
                if isinstance(sampler, ShardedBucketSampler):  # the global batch's counts
                    every = sampler.last_all
                    extra.tokens += int(lengths[every].sum())
                    extra.trained_tokens += int(trained[every].sum())  # type: ignore[index]
                    extra.episodes += len(every)
                else:
                    extra.tokens += b.n_tokens
                    extra.trained_tokens += b.n_trained
                    extra.episodes += len(episodes)
                batches.append(b.to(self.device))
            m = algo.update(batches)
            out: dict[str, Any] = {}
            for k, v in m.items():
                head, _, code = k.partition("/")
                out[f"{head}/{names[int(code)]}" if code.isdigit() else k] = v
            out["curriculum/max_tokens"] = float(sampler.limit(s0))
            return out

        return step

    def _row_rates(self, index: int, algo: Any) -> Callable[[int, float], dict[str, Any]]:
        extra = self.extra[index]
        last = {"tokens": extra.tokens, "trained": extra.trained_tokens}

        def row_rates(steps: int, seconds: float) -> dict[str, Any]:
            tok = extra.tokens - last["tokens"]
            trained = extra.trained_tokens - last["trained"]
            last["tokens"], last["trained"] = extra.tokens, extra.trained_tokens
            return {
                "lr": float(algo.optimizers["model"].param_groups[0]["lr"]),
                **{  # every other optimizer's (an RL stage's value head)
                    f"lr/{name}": float(opt.param_groups[0]["lr"])
                    for name, opt in algo.optimizers.items()
                    if name != "model"
                },
                "steps_per_s": round(steps / seconds, 3),
                "tokens_per_s": round(tok / seconds, 1),
                "trained_tokens_per_s": round(trained / seconds, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }

        return row_rates

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, algo: Any, index: int) -> bool:
        """Evaluate (rank 0, its results broadcast), log, track the best checkpoint; True
        when early stopping says stop (on every rank alike)."""
        metrics = self.dist.on_main(lambda: self._eval_metrics(algo), RUN_ERRORS)
        with self.dist.agreed(RUN_ERRORS):
            stop = self._after_eval(algo, index, metrics)
        return stop

    def _eval_metrics(self, algo: Any) -> dict[str, Any]:
        model = algo.loaded.model
        model.eval()
        try:
            metrics = offline_metrics(
                algo.hidden,
                algo.lm_head,
                self.arrays,
                self.eval_pool,
                label_names=self.label_names,
                weights=algo.weights.cpu(),
                pad_id=int(self.text.pad_id),
                batch_size=self.settings.eval_batch_size,
                device=self.device,
                autocast=algo.autocast,
            )
            metrics.update(self._online(algo))
            metrics.update(self._text_overlap(algo))
        finally:
            model.train()
        if self.device.type == "cuda":
            metrics["eval/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        metrics["eval/peak_rss_mb"] = peak_rss_mb()
        return metrics

    def _after_eval(self, algo: Any, index: int, metrics: dict[str, Any]) -> bool:
        record = self._write_eval(index, metrics)
        value = metrics.get(self.metric)
        if value is None:
            raise RunError(
                f"early_stopping.metric: {self.metric!r} is not among this run's evaluation "
                f"metrics ({', '.join(sorted(metrics))})"
            )
        if not math.isfinite(value):
            return False
        return self._track_best(
            index, value, record, lambda: self._checkpoint(algo, None, None, index, [])
        )

    def _text_overlap(self, algo: Any) -> dict[str, float]:
        """Greedy turns after ``agent.eval_turns`` held-out contexts, against the store's."""
        n = self.settings.eval_turns
        if n == 0:
            return {}
        from trainer.agent.prompts import text_overlap

        if self._eval_prompts is None:
            self._eval_prompts = self._prompts(self.eval_pool)
        prompts = self._eval_prompts
        return text_overlap(
            algo.loaded.model, self.text, prompts, prompts.spread(n),
            max_new_tokens=self.settings.max_new_tokens, device=self.device,
            batch_size=self.settings.eval_batch_size,
            max_context=int(self.store.manifest["sequences"]["max_tokens"]),
            autocast=algo.autocast,
        )  # fmt: skip

    def _env(self) -> tuple[Callable[[], Any], int] | None:
        env_spec = self.store.env
        if not env_spec or self.cfg.eval.episodes == 0 or self.env_role is None:
            return None
        from trainer.envs import make_text_env

        kwargs = dict(env_spec.get("kwargs") or {})
        env_id = str(env_spec["id"])
        probe = make_text_env(env_id, **kwargs)
        max_turns = self.cfg.eval.max_episode_steps or int(probe.max_turns)
        return (lambda: make_text_env(env_id, **kwargs)), max_turns

    def _plays_online(self) -> bool:
        return self._env() is not None and "action" in self.store.span_patterns

    def _online(self, algo: Any) -> dict[str, float]:
        made = self._env()
        if made is None:
            return {}
        make_env, max_turns = made
        seeds = [self.cfg.eval.seed + i for i in range(self.cfg.eval.episodes)]
        pattern = self.store.span_patterns.get("action")
        if pattern is None:
            return {}
        res = play_online(
            algo.loaded.model,
            self.text,
            make_env,
            seeds,
            policy_role=self.policy_role,
            env_role=str(self.env_role),
            action_pattern=pattern,
            max_new_tokens=self.settings.max_new_tokens,
            max_turns=max_turns,
            device=self.device,
            temperature=0.0 if self.cfg.eval.deterministic else max(self.settings.temperature, 1.0),
            autocast=algo.autocast,
            max_context=int(self.store.manifest["sequences"]["max_tokens"]),
        )
        metrics: dict[str, float] = dict(res["metrics"])
        teacher = self._teacher(make_env, seeds, max_turns)
        if teacher is not None:
            metrics["eval/teacher_success_rate"] = teacher["success_rate"]
            metrics["eval/success_vs_teacher"] = (
                metrics["eval/success_rate"] / teacher["success_rate"]
                if teacher["success_rate"] > 0
                else float("nan")
            )
        return metrics

    def _teacher(
        self, make_env: Callable[[], Any], seeds: list[int], max_turns: int
    ) -> dict[str, float] | None:
        """The scripted teacher's success rate on the evaluation seeds (once per run)."""
        name = self.settings.teacher
        if name is None or self.store.env is None:
            return None
        if self._teacher_eval is None:
            from trainer.envs import make_teacher, run_episode

            env_id = str(self.store.env["id"])
            wins = 0
            for s in seeds:
                teacher = make_teacher(env_id, name, s)
                ep = run_episode(make_env(), teacher.act, s)
                wins += bool(ep["success"])
            self._teacher_eval = {"success_rate": wins / len(seeds)}
        return self._teacher_eval

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(
        self,
        algo: Any,
        schedulers: dict[str, Any] | None,
        sampler: BucketSampler | ShardedBucketSampler | None,
        index: int,
        pending: list[dict[str, Any]],
    ) -> dict[str, Any]:
        return self._checkpoint_record(
            index,
            self._state(algo.loaded),
            algo.optimizers if schedulers is not None else {},
            schedulers,
            sampler,
            pending,
            loop={
                "agent": [asdict(e) for e in self.extra],
                **({"rl": algo.state_dict()} if hasattr(algo, "value_head") else {}),
            },
            meta={
                "kind": "agent",
                "store_hash": self.store.content_hash,
                "model": self.cfg.model,
                "config": self.cfg.to_dict(),
            },
        )

    def _save_step(
        self,
        algo: Any,
        schedulers: dict[str, Any],
        sampler: BucketSampler | ShardedBucketSampler,
        index: int,
        pending: list[dict[str, Any]],
    ) -> None:
        ckpt = self._checkpoint(algo, schedulers, sampler, index, pending)
        if self.dist.is_main:
            self.ckpts.save_step(ckpt, self.state.step)

    def _export(self, loaded: Any) -> None:
        """RUN/model/: the student as a plain model directory with the store's tokenizer."""
        from trainer.agent.model import export_merged

        out = self.run_dir / "model"
        with contextlib.suppress(FileNotFoundError):
            import shutil

            shutil.rmtree(out)
        export_merged(loaded, out, tokenizer_dir=self.store.tokenizer_dir)

    # ------------------------------------------------------------------ end
    def _finish(self) -> dict[str, Any]:
        st = self.state
        stages = []
        for i, (sp, ex) in enumerate(zip(st.stages, self.extra)):
            d = sp.summary(self.metric)
            stage, p = self.cfg.stages[i], self.params[i]
            d["batch_size"] = stage.batch_size
            if isinstance(p, SFTParams):
                d["grad_accumulation"] = p.grad_accumulation
                d["episodes_per_step"] = stage.batch_size * p.grad_accumulation
            else:  # sampled episodes per step; tokens below are generated tokens
                d["episodes_per_step"] = stage.batch_size * p.group_size
            t = sp.train_time_s
            d["tokens"] = ex.tokens
            d["tokens_per_s"] = round(ex.tokens / t, 1) if t > 0 else None
            d["trained_tokens_per_s"] = round(ex.trained_tokens / t, 1) if t > 0 else None
            d["epochs_done"] = round(ex.episodes / max(len(self.train_pool), 1), 3)
            stages.append(d)
        summary: dict[str, Any] = {
            "run": str(self.run_dir),
            "kind": "agent",
            "store": self.cfg.store,
            "store_hash": self.store.content_hash,
            "seed": self.cfg.seed,
            "device": str(self.device),
            "precision": self.cfg.precision,
            "total_steps": st.step,
            "wall_time_s": round(sum(s.wall_time_s for s in st.stages), 3),
            "metric": self.metric,
            "model": self._model_info,
            "labels": self.label_names,
            "split": {
                "train_episodes": int(len(self.train_pool)),
                "eval_episodes": int(len(self.eval_pool)),
                "eval_fraction": self.settings.eval_fraction,
                "split_seed": self.settings.split_seed,
            },
            "teacher": None
            if self._teacher_eval is None
            else {"name": self.settings.teacher, **self._teacher_eval},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "exported_model": str(self.run_dir / "model") if self.settings.export_merged else None,
            "stages": stages,
        }
        if self.dist.enabled or self.n_shards > 1:
            summary["data_parallel"] = {
                "ranks": self.dist.world_size,
                "shards": self.n_shards,
                # per stage trained by this process: each rank's sha256 of the final
                # weights and optimizer states (checked equal)
                "state_sha256": self._rank_digests,
            }
        return self._write_summary(summary, plot_agent_curves)


# --------------------------------------------------------------------------- curves


def plot_agent_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One PNG: action accuracy and success rate, per-span eval loss, then the training
    losses and throughput, against the global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if r.get("kind") == "train"]
    span_eval = sorted({k for r in evals for k in r if k.startswith("eval/span_loss/")})
    span_train = sorted({k for r in train for k in r if k.startswith("loss/")})
    acc_train = sorted({k for r in train for k in r if k.startswith("accuracy/")})
    panels: list[tuple[str, list[dict[str, Any]], list[str]]] = [
        (
            "held-out accuracy / online success",
            evals,
            ["eval/action_accuracy", "eval/success_rate", "eval/teacher_success_rate"],
        ),
        ("held-out loss per span", evals, span_eval),
        ("training loss per span", train, span_train),
        ("training token accuracy per span", train, acc_train),
        ("loss", train, ["loss"]),
        ("tokens/s", train, ["tokens_per_s", "trained_tokens_per_s"]),
    ]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.0 * nrows), squeeze=False)
    boundaries = stage_starts(rows)
    for ax, (name, data, ks) in zip(axes.flat, panels):
        for k in ks:
            pts = [(r["step"], r[k]) for r in data if isinstance(r.get(k), int | float)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if data is evals else None, ms=3, lw=1.2, label=k)
        if len(ks) > 1:
            ax.legend(fontsize=6)
        mark_panel(ax, name, boundaries)
    return save_panels(fig, axes, len(panels), title, path, rect=(0, 0, 1, 0.97))
