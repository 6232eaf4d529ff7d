"""QA training on a segment store: supervised reading, then hybrid supervised + REINFORCE halting.

``python -m trainer.train configs/qa-demo.yaml`` lands here when the stages are
``qa_supervised`` / ``qa_hybrid`` (:class:`QATrainer`). It shares the trajectory trainer's
config, run directory, checkpoints (:mod:`trainer.checkpoint`), metrics files
(:mod:`trainer.logging`), stop-on-signal and resume rules (:mod:`trainer.loop`).

Stages (hyper-parameters beside ``algo`` / ``steps`` in the stage mapping):

``qa_supervised`` (:class:`SupervisedParams`)
    Every segment of every document is read; span cross-entropy on each segment (a segment
    without the answer targets [CLS]). The initialisation of the hybrid stage.
``qa_hybrid`` (:class:`HybridParams`)
    The span loss goes on (same pass, every segment) while the halting policy learns by
    REINFORCE from episodes sampled on the same pass: after each segment the policy samples
    HALT or CONTINUE, and the episode's return is the F1 of the answer at the halt minus
    ``segment_cost`` per segment read. Advantages from GAE(gamma, gae_lambda) over a learned
    value (or the plain return minus the value), normalised per batch; an entropy bonus that
    decays to a floor; separate optimizers for the QA part and the policy;
    ``episodes_per_question`` episodes sampled from each question's pass; the value head
    alone learns for the first ``value_warmup_steps``. The episodes are
    exact samples of a reader that stops: what it computes for a segment does not depend on
    its decisions, so an episode halted after segment h is the prefix 0..h of the pass. The
    training reward's F1 is the token-span F1 against the gold span (on the device); the
    evaluation uses SQuAD's text F1.

Both stages draw questions of ``qa.train_split``; with ``qa.policy_holdout`` the supervised
stages draw from its documents outside a held-out fraction and the hybrid stages from the
held-out ones. Both draw through a curriculum (:class:`trainer.qa.data.CurriculumSampler`):
documents of at most ``curriculum.start_segments`` segments first, then longer ones, all of
them from ``curriculum.full_at`` of the stage on.

Evaluation (every ``eval.every`` stage steps, or the stage's own ``eval_every``, and at each
stage's end, on the ``qa.eval_split`` examples): F1 and exact match (SQuAD, in points
0-100), has-answer / no-answer accuracy, mean segments read and fraction read, with halting
(hybrid stages) and with reading everything (``eval/full_*``), and the combined score
``f1_weight * F1/100 + (1 - f1_weight) * (1 - fraction_read)``, which picks the best
checkpoint and drives early stopping by default. At a stage's end the best checkpoint's
weights are restored (``qa.restore_best``) and handed on.
At the start of a hybrid stage its initial model is evaluated reading everything: the
read-everything baseline in ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.format import StoreError
from pipeline.segments.store import SegmentStore, open_segment_store
from trainer.checkpoint import (
    CheckpointError,
    load_checkpoint,
    seed_everything,
)
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
from trainer.loop import (
    RANK_STREAM,
    RUN_ERRORS,
    RunError,
    StagedTrainer,
    resolved_shards,
)
from trainer.optim import OptimizerSpec, build_optimizer, make_schedulers
from trainer.precision import make_scaler, precision_context
from trainer.qa.data import CurriculumSampler, QAArrays, QABatch, collate, drop_tokens
from trainer.qa.losses import (
    discounted_returns,
    entropy_bonus,
    entropy_coefficient,
    gae_advantages,
    halting_episodes,
    masked_mean,
    normalize_advantages,
    policy_gradient_loss,
    span_loss,
    value_loss,
)
from trainer.qa.metrics import best_over_golds, span_f1
from trainer.qa.model import MemoryReader, ReaderConfig, ReadOutput, prefix_answers
from trainer.samplers import step_seed

QA_METRIC = "eval/combined"
_RESUME_FIXED = ("store", "seed", "stages", "qa", "store_hash", "shards")


# --------------------------------------------------------------------------- settings


@dataclass
class QASettings:
    """The ``qa`` section of a training config: the reader's sizes and the QA evaluation."""

    # The reader's sizes (trainer.qa.model.ReaderConfig); vocab and positions come from the store.
    model: ReaderConfig = field(default_factory=ReaderConfig)
    # The store split to train on (source.splits of the store's spec).
    train_split: str = "train"
    # The split evaluated during training (F1, exact match, segments read).
    eval_split: str = "dev"
    # Evaluate on the first N examples of eval_split only (null: all of them).
    eval_max_examples: int | None = None
    # Examples per forward pass in evaluation.
    eval_batch_size: int = 32
    # combined = f1_weight * F1 / 100 + (1 - f1_weight) * (1 - fraction_read).
    f1_weight: float = 0.7
    # Answer only when the best span's score beats the no-answer score by more than this.
    answer_threshold: float = 0.0
    # Evaluation halts after a segment when P(HALT) exceeds this (greedy at 0.5).
    halt_threshold: float = 0.5
    # At a stage's end, hand on the best evaluation's weights rather than the last ones.
    restore_best: bool = True
    # Fraction of the training split's documents that qa_supervised stages never read;
    # qa_hybrid stages draw their questions from these documents only, so the halting
    # policy learns how sure the reader is on text it has not memorised. (On the documents
    # it was trained on, the reader's first answer is almost always right, and a policy
    # trained there learns to halt on any answer.) The part is a fixed function of the
    # document ids, the same for every seed. 0: every stage reads the whole split.
    policy_holdout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("train_split", "eval_split"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"{key}: must be a split name such as train or dev")
        if self.eval_max_examples is not None and (
            not isinstance(self.eval_max_examples, int) or self.eval_max_examples < 1
        ):
            raise ConfigError(
                f"eval_max_examples: must be an integer >= 1 or null, got {self.eval_max_examples!r}"
            )
        need_int("eval_batch_size", self.eval_batch_size, 1)
        self.f1_weight = need_in_range("f1_weight", self.f1_weight, 0.0, 1.0)
        self.answer_threshold = need_in_range("answer_threshold", self.answer_threshold)
        self.halt_threshold = need_in_range("halt_threshold", self.halt_threshold, 0.0, 1.0)
        if not isinstance(self.restore_best, bool):
            raise ConfigError(f"restore_best: must be true or false, got {self.restore_best!r}")
        self.policy_holdout = need_in_range("policy_holdout", self.policy_holdout, 0.0, 1.0)
        if self.policy_holdout >= 1.0:
            raise ConfigError(
                "policy_holdout: must be below 1 (the supervised stages need documents too)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_settings(raw: dict[str, Any] | None) -> QASettings:
    """Check the ``qa`` section (errors are prefixed ``qa.``)."""
    raw = dict(raw or {})
    if "model" in raw:
        model = dict(raw["model"] or {}) if isinstance(raw["model"], dict) else raw["model"]
        if isinstance(model, dict):
            model.pop("vocab_size", None)  # always the store's
            model.pop("max_positions", None)
        raw["model"] = build_section(ReaderConfig, model, "qa.model")
    return build_section(QASettings, raw, "qa")


@dataclass
class Curriculum:
    """Which documents a stage trains on as it goes: short ones first."""

    # Documents of at most this many segments at the stage's first step (null: no curriculum).
    start_segments: int | None = None
    # From this fraction of the stage's steps on, every document is admitted (linear growth).
    full_at: float = 0.5

    def __post_init__(self) -> None:
        if self.start_segments is not None and (
            not isinstance(self.start_segments, int) or self.start_segments < 1
        ):
            raise ConfigError(
                f"start_segments: must be an integer >= 1 or null, got {self.start_segments!r}"
            )
        self.full_at = need_in_range("full_at", self.full_at, 0.0, 1.0)


def _check_eval_every(v: Any) -> None:
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise ConfigError(f"eval_every: must be an integer >= 0 or null (eval.every), got {v!r}")


@dataclass
class SupervisedParams:
    """``qa_supervised``: span cross-entropy over every segment."""

    # AdamW learning rate of the reader.
    lr: float = 1e-3
    # AdamW weight decay.
    weight_decay: float = 0.01
    # Short documents first (see Curriculum).
    curriculum: Curriculum = field(default_factory=Curriculum)
    # Evaluate every N steps of this stage (null: eval.every).
    eval_every: int | None = None
    # Max global gradient norm (the stage's grad_clip; null: none).
    grad_clip: float | None = None
    # Micro-batches of batch_size questions summed per optimizer step: the gradient of one
    # batch of batch_size * grad_accumulation questions, in the memory of one micro-batch.
    grad_accumulation: int = 1
    # Token dropout: each document token of a training batch becomes [UNK] with this
    # probability (the gold answer's tokens never do); 0: off.
    token_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.token_dropout = need_in_range("token_dropout", self.token_dropout, 0.0, 0.9)
        self.lr = need_in_range("lr", self.lr, 0.0)
        self.weight_decay = need_in_range("weight_decay", self.weight_decay, 0.0)
        _check_eval_every(self.eval_every)
        need_int("grad_accumulation", self.grad_accumulation, 1, "micro-batches per step")


@dataclass
class HybridParams:
    """``qa_hybrid``: span loss plus a REINFORCE halting policy (see the module docstring)."""

    # AdamW learning rate of the reader (the QA part: encoder, span head, memory).
    qa_lr: float = 3e-4
    # Adam learning rate of the policy part (halting and value heads).
    policy_lr: float = 3e-3
    # AdamW weight decay of the QA part.
    weight_decay: float = 0.01
    # lambda: reward = F1 at the halt - segment_cost * segments read.
    segment_cost: float = 0.01
    # Discount over decisions (1: the episode's return as such); the stage's `gamma` key,
    # else the run's `gamma` when set.
    gamma: float = 1.0
    # gae: GAE(gamma, gae_lambda) over the value head; reinforce: return minus the value.
    advantage: str = "gae"
    # GAE's lambda (1 = Monte Carlo return minus baseline, 0 = one-step TD).
    gae_lambda: float = 0.95
    # Normalise advantages over the batch's decisions (mean 0, std 1).
    normalize_advantages: bool = True
    # Weight of the value loss in the policy part's loss.
    value_coef: float = 0.5
    # Entropy bonus at the stage's first step ...
    entropy_coef: float = 0.05
    # ... multiplied by this every step ...
    entropy_decay: float = 0.995
    # ... never below this.
    entropy_floor: float = 0.001
    # Weight of the span loss (it keeps going for stability).
    sl_weight: float = 1.0
    # Halting episodes sampled per question from one read of its document: the reader's
    # pass is the cost of a step and sampling decisions is free, so more episodes lower the
    # variance of the policy gradient at almost no price.
    episodes_per_question: int = 1
    # Steps at the stage's start where only the value head learns (the policy samples but
    # is not updated): a fresh value head predicts ~0, so the first advantages would be
    # mostly its error; the warm-up lets it fit the initial policy's returns first. The
    # entropy schedule starts after the warm-up.
    value_warmup_steps: int = 0
    # A fresh halting head starts with P(HALT) = sigmoid(halt_bias_init) after every segment.
    halt_bias_init: float = -2.0
    # Short documents first (see Curriculum).
    curriculum: Curriculum = field(default_factory=Curriculum)
    # Evaluate every N steps of this stage (null: eval.every).
    eval_every: int | None = None
    # Max gradient norm, applied to each part separately (the stage's grad_clip; null: none).
    grad_clip: float | None = None
    # Micro-batches of batch_size questions per optimizer step. The span loss is that of the
    # whole step's questions; the halting episodes' advantages are normalised within each
    # micro-batch, whose policy and value losses weigh 1 / grad_accumulation each.
    grad_accumulation: int = 1
    # Token dropout on the training batches, as in qa_supervised; 0: off.
    token_dropout: float = 0.0

    def __post_init__(self) -> None:
        need_int("grad_accumulation", self.grad_accumulation, 1, "micro-batches per step")
        self.token_dropout = need_in_range("token_dropout", self.token_dropout, 0.0, 0.9)
        for key in ("qa_lr", "policy_lr", "weight_decay", "segment_cost", "value_coef"):
            setattr(self, key, need_in_range(key, getattr(self, key), 0.0))
        for key in ("gamma", "gae_lambda"):
            setattr(self, key, need_in_range(key, getattr(self, key), 0.0, 1.0))
        if self.advantage not in ("gae", "reinforce"):
            raise ConfigError(f"advantage: must be gae or reinforce, got {self.advantage!r}")
        if not isinstance(self.normalize_advantages, bool):
            raise ConfigError("normalize_advantages: must be true or false")
        self.entropy_coef = need_in_range("entropy_coef", self.entropy_coef, 0.0)
        self.entropy_decay = need_in_range("entropy_decay", self.entropy_decay, 0.0, 1.0)
        self.entropy_floor = need_in_range("entropy_floor", self.entropy_floor, 0.0)
        self.sl_weight = need_in_range("sl_weight", self.sl_weight, 0.0)
        self.halt_bias_init = need_in_range("halt_bias_init", self.halt_bias_init)
        need_int("episodes_per_question", self.episodes_per_question, 1)
        need_int("value_warmup_steps", self.value_warmup_steps, 0)
        _check_eval_every(self.eval_every)


StageParams = SupervisedParams | HybridParams


def stage_params(cfg: TrainConfig, index: int) -> StageParams:
    """The checked hyper-parameters of stage ``index`` (errors name ``stages.i.key``)."""
    st = cfg.stages[index]
    where = f"stages.{index}"
    if not st.is_qa:
        raise ConfigError(
            f"{where}.algo: {st.algo!r} does not train on a segment store; "
            "use qa_supervised or qa_hybrid"
        )
    cls: type = SupervisedParams if st.algo == "qa_supervised" else HybridParams
    raw = dict(st.params)
    if isinstance(raw.get("curriculum"), dict) or raw.get("curriculum") is None:
        raw["curriculum"] = build_section(Curriculum, raw.get("curriculum"), f"{where}.curriculum")
    raw["grad_clip"] = st.grad_clip
    gamma = st.gamma if st.gamma is not None else cfg.gamma
    if cls is HybridParams and gamma is not None:
        raw["gamma"] = gamma  # the stage's `gamma` loop key, else the run's
    elif st.gamma is not None:
        raise ConfigError(f"{where}.gamma: qa_supervised has no discount; remove the key")
    return build_section(cls, raw, where)


# --------------------------------------------------------------------------- stages


def holdout_mask(doc_ids: list[str], fraction: float) -> np.ndarray:
    """(n,) bool: the entries whose document falls in the held-out ``fraction``.

    A document's place is a hash of its id (stable across runs, seeds and machines), so
    every question on one document lands on the same side.
    """
    u = np.array(
        [int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest()) for d in doc_ids],
        dtype=np.float64,
    )
    return u / 2.0**64 < fraction


def _adamw(params: list[torch.nn.Parameter], lr: float, wd: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _optimizer(
    params: list[torch.nn.Parameter], spec: OptimizerSpec, **own: Any
) -> torch.optim.Optimizer:
    """The stage's ``optimizer`` over ``params``; the stage's ``own`` lr / weight decay
    fill the keys it leaves out."""
    return build_optimizer(params, spec, "optimizer", defaults=own)


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    return torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm else None


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _step(
    opts: list[torch.optim.Optimizer],
    params: list[torch.nn.Parameter],
    max_norm: float | None,
    scaler: torch.amp.GradScaler | None,
) -> torch.Tensor | None:
    """Clip ``params`` (unscaled first under fp16) and step ``opts``; the norm or None."""
    if scaler is not None:
        for opt in opts:
            scaler.unscale_(opt)
    norm = _clip(params, max_norm)
    for opt in opts:
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
    if scaler is not None:
        scaler.update()
    return norm


def _clip_unscaled(
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_norm: float | None,
    scaler: torch.amp.GradScaler | None,
) -> torch.Tensor | None:
    if scaler is not None:
        scaler.unscale_(opt)
    return _clip(params, max_norm)


def _batch_span_loss(out: ReadOutput, batch: QABatch) -> torch.Tensor:
    """The span loss of a read of ``batch`` over all of its segments (in float32 whatever
    the autocast type of the read)."""
    return span_loss(
        out.start_logits.float(),
        out.end_logits.float(),
        batch.start_target,
        batch.end_target,
        batch.span_mask,
        batch.segment_mask,
    )


def _segment_total(segments: list[torch.Tensor], dist: Distributed) -> torch.Tensor:
    """What a micro-batch's segment count is divided by to get its span loss's weight: the
    step's segments on one process; under torchrun the segments of every rank's micro-batches
    divided by the ranks (the gradient average divides by them again, so the average is the
    gradient of the union batch's span loss, each segment weighing alike)."""
    total = torch.stack(segments).sum()
    if not dist.enabled:
        return total
    means, _ = dist.mean_and_any({"segments": float(total)}, False)  # exact in float64
    return torch.tensor(means["segments"], dtype=torch.float32, device=total.device)


class SupervisedStage:
    """``qa_supervised``: one optimizer over the reader, span loss on every segment."""

    def __init__(
        self,
        model: MemoryReader,
        p: SupervisedParams,
        optimizer: OptimizerSpec | None = None,
        *,
        precision: str = "fp32",
        device: torch.device | str = "cpu",
        dist: Distributed | None = None,
    ) -> None:
        self.model, self.p = model, p
        self.dist = dist or Distributed.single()  # the ranks whose gradients are averaged
        precision_context(precision, device)  # fp16 off CUDA: one line now, not mid-run
        self.autocast = lambda: precision_context(precision, device)
        self.scaler = make_scaler(precision, device)
        self.qa_params = model.qa_parameters()
        self.optimizers = {
            "qa": _adamw(self.qa_params, p.lr, p.weight_decay)
            if optimizer is None
            else _optimizer(self.qa_params, optimizer, lr=p.lr, weight_decay=p.weight_decay)
        }

    def loss(self, batch: QABatch) -> tuple[torch.Tensor, dict[str, Any]]:
        """The span loss of ``batch`` (one pass over every segment) and its metrics."""
        with self.autocast():
            out = self.model.read(batch)
        loss = _batch_span_loss(out, batch)
        return loss, {"loss/span": loss.detach()}

    def update(
        self, batches: QABatch | list[QABatch], step: int, micro_ids: list[int] | None = None
    ) -> dict[str, Any]:
        """One gradient step over one batch or the micro-batches of one step (the span loss
        of all their segments together, and under torchrun of every rank's: the gradients are
        averaged before clipping and the step); metrics are 0-dim tensors (no host sync on
        one process)."""
        batches = batches if isinstance(batches, list) else [batches]
        opt = self.optimizers["qa"]
        opt.zero_grad(set_to_none=True)
        segments = [b.segment_mask.sum() for b in batches]
        total_segments = _segment_total(segments, self.dist)
        total = torch.zeros((), device=segments[0].device)
        for b, n in zip(batches, segments):
            loss, _ = self.loss(b)
            part = loss * (n / total_segments)  # this micro-batch's share of the segments
            _backward(part, self.scaler)
            total = total + part.detach()
        m: dict[str, Any] = {"loss/span": total}
        self.dist.average_gradients(self.qa_params)
        norm = _step([opt], self.qa_params, self.p.grad_clip, self.scaler)
        if norm is not None:
            m["grad_norm/qa"] = norm.detach()
        return m


class HybridStage:
    """``qa_hybrid``: span loss for the reader, REINFORCE for the halting policy."""

    def __init__(
        self,
        model: MemoryReader,
        p: HybridParams,
        *,
        seed: int,
        stream: int,
        answer_threshold: float,
        optimizer: OptimizerSpec | None = None,
        precision: str = "fp32",
        device: torch.device | str = "cpu",
        dist: Distributed | None = None,
    ) -> None:
        self.model, self.p = model, p
        self.dist = dist or Distributed.single()  # the ranks whose gradients are averaged
        precision_context(precision, device)  # fp16 off CUDA: one line now, not mid-run
        self.autocast = lambda: precision_context(precision, device)
        self.scaler = make_scaler(precision, device)
        self.seed, self.stream = seed, stream
        self.answer_threshold = answer_threshold
        self.qa_params = model.qa_parameters()
        self.policy_params = model.policy_parameters()
        if optimizer is None:
            self.optimizers = {
                "qa": _adamw(self.qa_params, p.qa_lr, p.weight_decay),
                "policy": torch.optim.Adam(self.policy_params, lr=p.policy_lr),
            }
        else:  # the policy part keeps no weight decay unless the optimizer sets one
            self.optimizers = {
                "qa": _optimizer(
                    self.qa_params, optimizer, lr=p.qa_lr, weight_decay=p.weight_decay
                ),
                "policy": _optimizer(
                    self.policy_params, optimizer, lr=p.policy_lr, weight_decay=0.0
                ),
            }

    def loss(
        self,
        batch: QABatch,
        step: int,
        micro: int = 0,
        span_share: torch.Tensor | None = None,
        micro_batches: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The hybrid loss at stage step ``step`` and its metrics, in the update's order:
        read every segment; span loss; decisions sampled from the policy (a generator seeded
        by the step and the micro-batch ``micro``); episodes, each ending at its first HALT;
        rewards from the F1 at the halt and the segments read; advantages (GAE or return -
        value), normalised; policy, entropy and value losses. ``span_share``: this
        micro-batch's share of the step's segments (its span loss's weight; 1 alone), the
        other losses weigh 1 / ``micro_batches`` (this process's micro-batches of the step;
        default grad_accumulation)."""
        p = self.p
        n_micro = p.grad_accumulation if micro_batches is None else micro_batches
        with self.autocast():
            out = self.model.read(batch)
        sl = _batch_span_loss(out, batch)
        # K episodes per question: rows k * B + b of the (K * B, T) tensors below
        k = p.episodes_per_question
        halt_logit, value = out.halt_logit.float().repeat(k, 1), out.value.float().repeat(k, 1)
        n_segments = batch.n_segments.repeat(k)
        with torch.no_grad():
            ps, pe = prefix_answers(out, batch, self.answer_threshold)
            prefix_f1 = span_f1(ps, pe, batch.gold_start[:, None], batch.gold_end[:, None])
            dev = halt_logit.device
            gen = torch.Generator(device=dev)
            stream = 0xEB150DE + self.stream + (micro << 24)  # micro 0: as with no accumulation
            gen.manual_seed(step_seed(self.seed, step, stream=stream))
            u = torch.rand(halt_logit.shape, generator=gen, device=dev)
            halt = u < torch.sigmoid(halt_logit)
            ep = halting_episodes(halt, n_segments, prefix_f1.repeat(k, 1), p.segment_cost)
        mask = ep.decision_mask
        if p.advantage == "gae":
            adv, targets = gae_advantages(ep.rewards, value, ep.dones, mask, p.gamma, p.gae_lambda)
        else:
            targets = discounted_returns(ep.rewards, ep.dones, mask, p.gamma)
            adv = torch.where(mask, targets - value.detach(), torch.zeros_like(targets))
        if p.normalize_advantages:
            adv = normalize_advantages(adv, mask)
        pg = policy_gradient_loss(halt_logit, ep.actions, adv, mask)
        ent = entropy_bonus(halt_logit, mask)
        vl = value_loss(value, targets, mask)
        policy_step = step - p.value_warmup_steps
        beta = entropy_coefficient(
            max(policy_step, 0), p.entropy_coef, p.entropy_decay, p.entropy_floor
        )
        share = 1.0 if span_share is None else span_share
        loss = p.sl_weight * sl * share + p.value_coef * vl / n_micro
        if policy_step >= 0:
            loss = loss + (pg - beta * ent) / n_micro
        n_read = ep.n_read.to(prefix_f1.dtype)
        m: dict[str, Any] = {
            "loss/span": sl.detach(),
            "loss/policy": pg.detach(),
            "loss/value": vl.detach(),
            "policy/entropy": ent.detach(),
            "policy/entropy_coef": beta if policy_step >= 0 else 0.0,
            "policy/halt_prob": masked_mean(torch.sigmoid(halt_logit.detach()), mask),
            "episode/return": ep.returns.mean(),
            "episode/f1": ep.final_f1.mean(),
            "episode/segments_read": n_read.mean(),
            "episode/fraction_read": (n_read / n_segments.to(n_read.dtype)).mean(),
        }
        return loss, m

    def update(
        self, batches: QABatch | list[QABatch], step: int, micro_ids: list[int] | None = None
    ) -> dict[str, Any]:
        """One gradient step: the hybrid loss of each micro-batch, one backward each (the
        two parts have disjoint parameters), the gradients averaged over the ranks under
        torchrun, each part clipped and stepped by its own optimizer. ``micro_ids``: each
        micro-batch's index among the step's micro-batches of every shard (its decisions'
        generator; default 0, 1, ...).

        Every micro-batch (of a shard) normalises its own advantages, and its policy and
        value losses weigh 1 / (micro-batches of the step, all ranks together): the ranks'
        average is then the gradient one process computes over the same micro-batches."""
        batches = batches if isinstance(batches, list) else [batches]
        ids = list(range(len(batches))) if micro_ids is None else micro_ids
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        segments = [b.segment_mask.sum() for b in batches]
        total_segments = _segment_total(segments, self.dist)
        weighted = len(batches) > 1 or self.dist.enabled
        sums: dict[str, Any] = {}
        for i, b, n in zip(ids, batches, segments):
            share = n / total_segments if weighted else None
            loss, mi = self.loss(b, step, micro=i, span_share=share, micro_batches=len(batches))
            _backward(loss, self.scaler)
            for key, v in mi.items():
                sums[key] = sums.get(key, 0.0) + v
        m = {key: v / len(batches) for key, v in sums.items()}
        self.dist.average_gradients([*self.qa_params, *self.policy_params])
        qa_norm = _clip_unscaled(
            self.optimizers["qa"], self.qa_params, self.p.grad_clip, self.scaler
        )
        pol_norm = _clip_unscaled(
            self.optimizers["policy"], self.policy_params, self.p.grad_clip, self.scaler
        )
        for opt in self.optimizers.values():
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        if step >= self.p.value_warmup_steps:  # the halting head has had a gradient
            self.model.policy_trained.fill_(True)
        if qa_norm is not None and pol_norm is not None:
            m["grad_norm/qa"], m["grad_norm/policy"] = qa_norm.detach(), pol_norm.detach()
        return m


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class _Reads:
    """Per-example answers of one evaluation pass (host arrays, in evaluation order)."""

    example: np.ndarray  # (N,) example rows
    n_segments: np.ndarray  # (N,)
    n_read: np.ndarray  # (N,) segments read with halting (= n_segments without)
    halt_span: np.ndarray  # (N, 2) document-token answer at the halt, -1 = no answer
    full_span: np.ndarray  # (N, 2) answer after reading everything
    seconds_full: float = 0.0  # reading every segment
    seconds_halting: float = 0.0  # the early-exit read (0 without halting)
    agreement: float = 1.0  # early exit = the halt simulated on the full read (fraction)


def _midpoint_thresholds(score: np.ndarray, n: int) -> list[float]:
    """``n`` thresholds at the quantiles (5% to 95%) of the finite values of ``score``, each
    halfway between two of them and never on one (a rule's halt must not hang on the last
    bits of a value), and one above them all (never passed: read everything)."""
    real = np.unique(score[np.isfinite(score)])  # sorted
    q = np.quantile(real, np.linspace(0.05, 0.95, n))
    above = np.minimum(np.searchsorted(real, q, side="right"), len(real) - 1)
    below = np.maximum(above - 1, 0)
    thresholds = sorted(set(((real[below] + real[above]) / 2).tolist()))
    thresholds.append(float(real.max()) + 1.0)
    return thresholds


class QAEvaluator:
    """F1 / exact match / segments read of a reader on a fixed set of examples."""

    def __init__(
        self,
        store: SegmentStore,
        arrays: QAArrays,
        examples: np.ndarray,
        settings: QASettings,
        device: torch.device,
    ) -> None:
        self.store, self.arrays, self.settings, self.device = store, arrays, settings, device
        self.examples = np.asarray(examples, dtype=np.int64)
        ex = store.examples
        self.golds = {
            int(e): ([] if ex.is_impossible[e] else list(ex.answers[e])) for e in self.examples
        }

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def read(self, model: MemoryReader, halting: bool) -> _Reads:
        """One pass over the examples reading every segment (the ``full`` answers) and,
        with ``halting``, one early-exit pass (:meth:`MemoryReader.read_early_exit`: an
        example leaves the batch when it halts) for the answers at the halt, each timed.
        The early-exit answers are checked against the halt simulated on the full read."""
        s = self.settings
        was_training = model.training
        model.eval()
        parts: list[list[np.ndarray]] = [[], [], [], [], []]
        t_full = t_halt = 0.0
        agree = 0
        try:
            with torch.no_grad():
                for i in range(0, len(self.examples), s.eval_batch_size):
                    batch = collate(self.arrays, self.examples[i : i + s.eval_batch_size])
                    batch = batch.to(self.device)
                    self._sync()
                    t0 = time.perf_counter()
                    out = model.read(batch)
                    ps, pe = prefix_answers(out, batch, s.answer_threshold)
                    n = batch.n_segments
                    last = (n - 1)[:, None]
                    full_span = torch.cat([ps.gather(1, last), pe.gather(1, last)], dim=1)
                    self._sync()
                    t_full += time.perf_counter() - t0
                    if halting:
                        t0 = time.perf_counter()
                        ee = model.read_early_exit(batch, s.halt_threshold, s.answer_threshold)
                        self._sync()
                        t_halt += time.perf_counter() - t0
                        h = ee.n_read - 1
                        halt_span = torch.stack([ee.start, ee.end], dim=1)
                        halt = torch.sigmoid(out.halt_logit) > s.halt_threshold
                        sim = halting_episodes(halt, n, torch.zeros_like(out.margin), 0.0).n_read
                        at = (sim - 1)[:, None]
                        sim_span = torch.cat([ps.gather(1, at), pe.gather(1, at)], dim=1)
                        same = (sim == ee.n_read) & (sim_span == halt_span).all(1)
                        agree += int(same.sum())
                    else:
                        h = n - 1
                        halt_span = full_span
                    for acc, v in zip(parts, (batch.example_index, n, h + 1, halt_span, full_span)):
                        acc.append(v.cpu().numpy())
        finally:
            model.train(was_training)
        ex_a, n_a, read_a, hs_a, fs_a = (np.concatenate(p) for p in parts)
        return _Reads(
            ex_a, n_a, read_a, hs_a, fs_a, t_full, t_halt,
            agree / len(ex_a) if halting else 1.0,
        )  # fmt: skip

    def _scores(self, example: np.ndarray, spans: np.ndarray) -> dict[str, float]:
        f1s, ems, answered = [], [], []
        for e, (a, b) in zip(example.tolist(), spans.tolist()):
            text = self.store.answer_text(e, a, b) if a >= 0 else ""
            f, m = best_over_golds(text, self.golds[e])
            f1s.append(f)
            ems.append(m)
            answered.append(a >= 0)
        f1a, ema, ans = np.array(f1s), np.array(ems), np.array(answered)
        has = np.array([bool(self.golds[e]) for e in example.tolist()])
        out = {"f1": 100 * f1a.mean(), "exact_match": 100 * ema.mean()}
        out["has_answer_f1"] = 100 * f1a[has].mean() if has.any() else float("nan")
        out["has_answer_accuracy"] = ans[has].mean() if has.any() else float("nan")
        out["no_answer_accuracy"] = (~ans[~has]).mean() if (~has).any() else float("nan")
        return {k: float(v) for k, v in out.items()}

    def halting_rules(self, model: MemoryReader, n_taus: int = 19) -> dict[str, Any]:
        """F1 and fraction read of the simple halting rules a user would try first, on the
        same reader: read the first k segments (k = 1..K), and halt once the best margin so
        far passes tau (taus at ``n_taus`` quantiles of the segments' margins, and one above
        them all: read everything); beside the learned policy's point. One full read of the
        examples; every rule's halt is worked out from it (the answers an early exit at the
        same halt gives, see :meth:`MemoryReader.read_early_exit`). ``learned_threshold``
        is the learned policy itself with its halting threshold swept the same way (its
        halting probabilities' quantiles): the curve a user gets from one trained policy
        by moving ``qa.halt_threshold``."""
        s = self.settings
        was_training = model.training
        model.eval()
        cols: list[list[np.ndarray]] = [[], [], [], [], [], [], []]
        try:
            with torch.no_grad():
                for i in range(0, len(self.examples), s.eval_batch_size):
                    batch = collate(self.arrays, self.examples[i : i + s.eval_batch_size])
                    batch = batch.to(self.device)
                    out = model.read(batch)
                    bs, be = prefix_answers(out, batch, s.answer_threshold)
                    halt = torch.sigmoid(out.halt_logit) > s.halt_threshold
                    greedy = halting_episodes(
                        halt, batch.n_segments, torch.zeros_like(out.margin), 0.0
                    ).n_read
                    t_max = self.arrays.n_segments[self.examples].max()
                    pad = int(t_max) - out.margin.shape[1]
                    for acc, v in zip(cols, (
                        batch.example_index, batch.n_segments, greedy,
                        F.pad(out.margin, (0, pad), value=float("-inf")),
                        F.pad(bs, (0, pad), value=-1), F.pad(be, (0, pad), value=-1),
                        F.pad(torch.sigmoid(out.halt_logit), (0, pad), value=float("-inf")),
                    )):  # fmt: skip
                        acc.append(v.cpu().numpy())
        finally:
            model.train(was_training)
        ex, n, learned, margin, ps, pe, p_halt = (np.concatenate(c) for c in cols)
        rows = np.arange(len(ex))

        def point(h: np.ndarray) -> dict[str, float]:  # h: segments read per example
            spans = np.stack([ps[rows, h - 1], pe[rows, h - 1]], axis=1)
            sc = self._scores(ex, spans)
            return {"f1": sc["f1"], "fraction_read": float(np.mean(h / n))}

        first_k = [{"k": k, **point(np.minimum(k, n))} for k in range(1, int(n.max()) + 1)]
        t = np.arange(margin.shape[1])[None, :]

        def sweep(score: np.ndarray, name: str) -> list[dict[str, float]]:
            """Halt at the first segment whose ``score`` passes each threshold."""
            pts = []
            for thr in _midpoint_thresholds(score, n_taus):
                hit = (score > thr) & (t < n[:, None])
                first = np.where(hit.any(1), hit.argmax(1) + 1, n)
                pts.append({name: thr, **point(first)})
            return pts

        best = np.maximum.accumulate(margin, axis=1)  # (N, T) best margin after segment t
        return {
            "learned": {"halt_threshold": s.halt_threshold, **point(learned)},
            "first_k": first_k,
            "margin": sweep(best, "tau"),
            "learned_threshold": sweep(p_halt, "halt_threshold"),
        }

    def __call__(self, model: MemoryReader, *, halting: bool) -> dict[str, float]:
        """The evaluation row: ``eval/...`` with halting (if asked), ``eval/full_...`` without."""
        r = self.read(model, halting)
        halt = self._scores(r.example, r.halt_span)
        full = self._scores(r.example, r.full_span) if halting else halt
        frac = float(np.mean(r.n_read / r.n_segments))
        row: dict[str, float] = {f"eval/{k}": v for k, v in halt.items()}
        row["eval/segments_read"] = float(r.n_read.mean())
        row["eval/fraction_read"] = frac
        row["eval/fraction_read_total"] = float(r.n_read.sum() / r.n_segments.sum())
        w = self.settings.f1_weight
        row["eval/combined"] = w * halt["f1"] / 100 + (1 - w) * (1 - frac)
        row.update({f"eval/full_{k}": v for k, v in full.items()})
        row["eval/full_segments_read"] = float(r.n_segments.mean())
        row["eval/examples"] = float(len(r.example))
        n = max(len(r.example), 1)
        row["eval/full_ms_per_question"] = 1000 * r.seconds_full / n
        if halting:
            row["eval/ms_per_question"] = 1000 * r.seconds_halting / n
            row["eval/time_fraction"] = r.seconds_halting / max(r.seconds_full, 1e-12)
            row["eval/early_exit_agreement"] = r.agreement
        return row


# --------------------------------------------------------------------------- the run

# What a QA run does not read (transition-store and sequence-store settings), with why.
_UNUSED = {
    "reward": "the reward of a QA run is the F1 at the halt less segment_cost per segment "
    "(stages.N.segment_cost)",
    "val_fraction": "QA runs evaluate on the store's dev split (qa.eval_split)",
    "eval.episodes": "a QA run plays no environment",
    "eval.seed": "a QA run plays no environment",
    "eval.deterministic": "halting is greedy in evaluation (qa.halt_threshold)",
    "eval.max_episode_steps": "a QA run plays no environment",
    "eval.val_transitions": "QA runs evaluate qa.eval_max_examples questions",
    "eval.val_batch_size": "QA runs evaluate qa.eval_batch_size questions at a time",
    "model": "the reader's sizes are qa.model",
    "agent": "agent settings are for sequence stores (sft, ppo, reinforce)",
}


def refuse_unused_keys(cfg: TrainConfig) -> None:
    """A key a QA run would accept and ignore, set to anything but its default: one line
    naming the key (and what the run reads instead)."""
    defaults = {
        f.name: f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        for f in fields(TrainConfig)
        if f.default is not MISSING or f.default_factory is not MISSING
    }
    for key, why in _UNUSED.items():
        head, _, tail = key.partition(".")
        given, default = getattr(cfg, head), defaults[head]
        if tail:
            given, default = getattr(given, tail), getattr(default, tail)
        if given == default:
            continue
        if dataclasses.is_dataclass(given):  # name the key inside the section
            key += "." + next(
                f.name for f in fields(given) if getattr(given, f.name) != getattr(default, f.name)
            )
        raise ConfigError(f"{key}: a QA run does not use it ({why}); remove it")


@dataclass
class _StageExtra:
    """QA bookkeeping per stage that a checkpoint carries beside StageProgress."""

    examples: int = 0
    segments: int = 0
    baseline_eval: dict[str, Any] | None = None
    handed_on: str = "final"
    halting_rules: dict[str, Any] | None = None  # the stage's reader under the simple rules

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _StageExtra:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class QATrainer(StagedTrainer):
    """Runs a QA training config in its run directory (the same layout as :class:`Trainer`)."""

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
        super().__init__(cfg, resume=resume, overwrite=overwrite, log=log, dist=dist)
        refuse_unused_keys(cfg)
        self.settings = parse_settings(cfg.qa)
        self.params = [stage_params(cfg, i) for i in range(len(cfg.stages))]
        es = cfg.early_stopping
        self.metric = QA_METRIC if es.metric == "auto" else es.metric
        self.mode = "max" if es.metric == "auto" else es.mode

    # ------------------------------------------------------------------ setup
    def _check_resumed(self, ckpt: dict[str, Any], path: Path) -> None:
        if ckpt.get("meta", {}).get("kind") != "qa":
            raise RunError(f"--resume: {path} is not a QA checkpoint; start a new run")

    def _open_store(self) -> SegmentStore:
        try:
            store = open_segment_store(self.cfg.store)
        except StoreError as e:
            msg = str(e)
            if "not segments" in msg:
                msg += "; qa_supervised / qa_hybrid stages need a segment store (kind: segments)"
            raise RunError(f"store: {msg}") from None
        if self.cfg.store_hash is not None and self.cfg.store_hash != store.content_hash:
            raise RunError(
                f"store: {self.cfg.store} has content hash {store.content_hash}, the config "
                f"expects {self.cfg.store_hash}; the store was rebuilt from other data "
                "(drop store_hash to accept it)"
            )
        return store

    def _reader_config(self, store: SegmentStore) -> ReaderConfig:
        m = self.settings.model.to_dict()
        m["vocab_size"] = int(store.manifest["tokenizer"]["vocab_size"])
        m["max_positions"] = int(
            store.manifest["segments"].get("max_input_width", store.input_width)
        )
        return ReaderConfig(**m)

    def _split(self, store: SegmentStore, name: str, key: str) -> np.ndarray:
        idx = store.split_indices(name)
        if len(idx) == 0:
            have = sorted(set(store.examples.split.tolist()))
            raise RunError(
                f"qa.{key}: the store has no {name!r} examples; its splits are: {', '.join(have)}"
            )
        return idx

    def _pools(self, store: SegmentStore) -> dict[str, np.ndarray]:
        """The training questions of each stage kind (see ``qa.policy_holdout``)."""
        pool = self._split(store, self.settings.train_split, "train_split")
        frac = self.settings.policy_holdout
        if frac == 0.0:
            return self._check_shards({"qa_supervised": pool, "qa_hybrid": pool})
        held = holdout_mask([store.examples.doc_id[int(e)] for e in pool], frac)
        fit, out = pool[~held], pool[held]
        if len(fit) == 0 or len(out) == 0:
            raise RunError(
                f"qa.policy_holdout: {frac} leaves {len(fit)} of the {len(pool)} training "
                f"questions to the supervised stages and {len(out)} to the hybrid ones; "
                "pick a fraction that leaves some to both"
            )
        return self._check_shards({"qa_supervised": fit, "qa_hybrid": out})

    def _check_shards(self, pools: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every stage's training questions fill the run's shards (a question each at least)."""
        k = self.n_shards
        for i, st in enumerate(self.cfg.stages):
            n = len(pools[st.algo])
            if n < k:
                who = f"{self.dist.world_size} ranks" if self.cfg.shards is None else f"shards={k}"
                raise RunError(
                    f"stages.{i}: {n} training question(s) cannot be shared by {who}: every "
                    "shard needs a question (start fewer ranks)"
                )
        return pools

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg, dist = self.cfg, self.dist
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # Every rank checks and opens what it needs; all go on, or all stop with one report.
        with dist.agreed(RUN_ERRORS):
            device = torch.device(cfg.resolved_device())
            if dist.enabled and device.type == "cuda":
                device = dist.device  # cuda:LOCAL_RANK
            self.device = device
            self.n_shards = resolved_shards(cfg, dist)
            if dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt = self._prepare_dir()
            store = self._open_store()
            self.store = store
            self.reader_cfg = self._reader_config(store)
            self._n_params = sum(p.numel() for p in MemoryReader(self.reader_cfg).parameters())
            self.arrays = QAArrays.from_store(store)
            self.pools = self._pools(store)
            eval_pool = self._split(store, self.settings.eval_split, "eval_split")
            if self.settings.eval_max_examples is not None:
                eval_pool = eval_pool[: self.settings.eval_max_examples]
            self.evaluator = QAEvaluator(store, self.arrays, eval_pool, self.settings, device)
            self._open_run(ckpt, store.content_hash, device)
            init_state = self._init_from_state(cfg.init_from) if cfg.init_from else None
            if ckpt is None:
                self.extra = [_StageExtra() for _ in cfg.stages]
            else:
                self.extra = [_StageExtra.from_dict(d) for d in ckpt["loop"]["qa"]]
        self._rank_digests: dict[str, list[str]] = {}
        self._run_stages(ckpt, init_state)
        return self._finish()

    def _resolved_config(self, store_hash: str, device: torch.device) -> dict[str, Any]:
        """Also the run's number of shards when there are several (one per rank unless the
        config sets it): a one-process run's config stays as it was."""
        resolved = super()._resolved_config(store_hash, device)
        if self.n_shards > 1:
            resolved["shards"] = self.n_shards
        return resolved

    def _init_from_state(self, path: str) -> dict[str, Any]:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            raise RunError(f"--init-from: {e}") from None
        meta = ckpt.get("meta", {})
        if meta.get("kind") != "qa":
            raise RunError(f"--init-from: {path} is not a QA checkpoint (trained by a QA run)")
        if meta.get("reader") != self.reader_cfg.to_dict():
            raise RunError(
                f"--init-from: {path} holds a reader of sizes {meta.get('reader')}, this run "
                f"builds {self.reader_cfg.to_dict()}; set qa.model to match"
            )
        return dict(ckpt["algo_state"])

    def _build_stage(self, index: int, model: MemoryReader) -> SupervisedStage | HybridStage:
        p, optimizer = self.params[index], self.cfg.stages[index].optimizer
        prec, dev = self.cfg.precision, self.device
        if isinstance(p, SupervisedParams):
            return SupervisedStage(model, p, optimizer, precision=prec, device=dev, dist=self.dist)
        return HybridStage(
            model,
            p,
            seed=self.cfg.seed,
            stream=index,
            answer_threshold=self.settings.answer_threshold,
            optimizer=optimizer,
            precision=prec,
            device=dev,
            dist=self.dist,
        )

    # ------------------------------------------------------------------ one stage
    def _run_stage(
        self, index: int, ckpt: dict[str, Any] | None, init_state: dict[str, Any] | None
    ) -> None:
        """Stage ``index``: resumed from ``ckpt`` or started (from ``init`` / ``init_state``),
        trained to its end or an early stop, then its weights handed on."""
        cfg, dist = self.cfg, self.dist
        stage, p = cfg.stages[index], self.params[index]
        self.state.stage_index = index
        if ckpt is None:
            seed_everything(step_seed(cfg.seed, index, stream=0x57A6E))
        model = MemoryReader(self.reader_cfg).to(self.device)
        model.train()
        sampler = self._sampler(index)
        if ckpt is not None:
            model.load_state_dict(ckpt["algo_state"])
        else:
            self._start_model(index, model, init_state)
        algo = self._build_stage(index, model)
        schedulers = self._schedulers(algo, stage)
        if ckpt is not None:
            self._resume_stage(ckpt, algo.optimizers, schedulers, sampler)
        else:
            self.state.stages[index].start_step = self.state.step
            self._write_stage_start(stage)
            if isinstance(p, HybridParams):
                self._write_baseline(index, model)
            if dist.rank > 0:  # the weights are built alike; each rank draws its own noise
                seed_everything(step_seed(cfg.seed, index, stream=RANK_STREAM + dist.rank))
        if dist.enabled:  # as DDP does: every rank starts from rank 0's weights
            dist.broadcast_tensors([*model.parameters(), *model.buffers()])

        elapsed = self._train_steps(
            index,
            self._pending_metrics(ckpt, self.device),
            step=self._stepper(index, algo, sampler),
            schedulers=schedulers,
            row_rates=self._row_rates(algo, stage),
            evaluate=lambda: self._evaluate(model, index),
            save=lambda buf: self._save_step(model, algo, schedulers, sampler, index, buf),
            every_eval=cfg.eval.every if p.eval_every is None else p.eval_every,
        )
        if dist.enabled:  # the trained weights and optimizer states: the same on every rank
            self._rank_digests[stage.name] = dist.same_state(
                {"model": model.state_dict(), "optimizers": {
                    k: o.state_dict() for k, o in algo.optimizers.items()
                }},
                f"stage {stage.name}",
            )  # fmt: skip
        self._restore_best(model, index)
        if isinstance(p, HybridParams) and dist.is_main:  # the learned policy beside the rules
            self.extra[index].halting_rules = self.evaluator.halting_rules(model)
        sp = self.state.stages[index]
        sp.done = True
        sp.wall_time_s = elapsed()
        self._final_states[stage.name] = {k: v.clone() for k, v in model.state_dict().items()}
        self._save_final(index, self._checkpoint(model, algo, schedulers, sampler, index, []))

    def _sampler(self, index: int) -> CurriculumSampler:
        """The curriculum sampler of stage ``index`` over its kind's training questions."""
        stage, p = self.cfg.stages[index], self.params[index]
        per_rank = self.n_shards // self.dist.world_size
        first = self.dist.rank * per_rank
        return CurriculumSampler(
            self.arrays.n_segments,
            self.pools[stage.algo],
            stage.batch_size,
            self.cfg.seed,
            stream=index,
            total_steps=stage.steps,
            start_segments=p.curriculum.start_segments,
            full_at=p.curriculum.full_at,
            shards=self.n_shards,
            local=range(first, first + per_rank),
        )

    def _start_model(
        self, index: int, model: MemoryReader, init_state: dict[str, Any] | None
    ) -> None:
        """A starting stage's weights: the ``init`` stage's (or ``init_state``); a hybrid
        stage whose halting head was never trained gets fresh policy heads."""
        stage, p = self.cfg.stages[index], self.params[index]
        source = self._stage_final_state(stage.init) if stage.init else init_state
        if source is not None:
            try:
                model.load_state_dict(source)
            except RuntimeError as e:
                where = f"stages.{index}.init" if stage.init else "--init-from"
                first = str(e).strip().splitlines()[0]
                raise RunError(f"{where}: the weights do not fit this reader ({first})") from None
        if isinstance(p, HybridParams) and not bool(model.policy_trained):
            model.reset_policy(p.halt_bias_init)

    def _write_baseline(self, index: int, model: MemoryReader) -> None:
        """The hybrid stage's initial model read everything: the baseline row and record
        (rank 0 evaluates, every rank keeps the record)."""
        stage = self.cfg.stages[index]
        base = self.dist.on_main(lambda: self.evaluator(model, halting=False), RUN_ERRORS)
        self.extra[index].baseline_eval = {"step": self.state.step, **base}
        self.writer.write(
            {
                "step": self.state.step,
                "stage": stage.name,
                "algo": stage.algo,
                "kind": "baseline",
                **{"baseline/" + k.split("/", 1)[1]: v for k, v in base.items()},
            }
        )

    def _stepper(
        self, index: int, algo: SupervisedStage | HybridStage, sampler: CurriculumSampler
    ) -> Callable[[int], dict[str, Any]]:
        """One training step of stage ``index`` at stage step ``s0``: a batch, one update.

        Each micro-batch is this process's draw from each of its shards, one collated batch
        per shard: micro-batch ``i`` of shard ``r`` is the step's micro-batch ``i * K + r``
        of the K shards (its token dropout's and its halting decisions' generator), so one
        process with K shards computes what K ranks compute together."""
        extra = self.extra[index]
        k = self.n_shards

        p = self.params[index]
        micro, dropout = p.grad_accumulation, p.token_dropout
        unk = self.store.special_tokens.get("unk")
        if dropout > 0 and unk is None:
            raise RunError(
                f"stages.{index}.token_dropout: the store's tokenizer has no [UNK] token"
            )
        gen = torch.Generator(device=self.device)

        def step(s0: int) -> dict[str, Any]:
            batches, ids = [], []
            for i in range(micro):
                for r, examples in zip(sampler.local, sampler.sample_shards()):
                    m = i * k + r
                    extra.examples += len(examples)
                    extra.segments += int(self.arrays.n_segments[examples].sum())
                    batch = collate(self.arrays, examples).to(self.device)
                    if dropout > 0:  # a pure function of (seed, stage, step, micro-batch)
                        seed = step_seed(self.cfg.seed, s0, stream=0x70D0 + 64 * index + m)
                        gen.manual_seed(seed)
                        batch = drop_tokens(batch, dropout, int(unk or 0), gen)
                    batches.append(batch)
                    ids.append(m)
            # one shard: the micro-batches' own order (update's default ids)
            metrics = algo.update(batches, s0) if k == 1 else algo.update(batches, s0, ids)
            metrics["curriculum/max_segments"] = float(sampler.limit(s0))
            return metrics

        return step

    @staticmethod
    def _row_rates(
        algo: SupervisedStage | HybridStage, stage: StageConfig
    ) -> Callable[[int, float], dict[str, Any]]:
        """The learning rate and throughputs of a metrics row."""

        def row_rates(steps: int, seconds: float) -> dict[str, Any]:
            return {
                "lr": float(algo.optimizers["qa"].param_groups[0]["lr"]),
                "steps_per_s": round(steps / seconds, 3),
                "examples_per_s": round(steps * stage.batch_size / seconds, 2),
            }

        return row_rates

    def _schedulers(
        self, algo: SupervisedStage | HybridStage, stage: StageConfig
    ) -> dict[str, Any]:
        return make_schedulers(algo.optimizers, stage.lr_schedule, stage.steps)

    def _restore_best(self, model: MemoryReader, index: int) -> None:
        """Hand on the best evaluation's weights (qa.restore_best) when they are not the last."""
        sp, extra = self.state.stages[index], self.extra[index]
        best, final = sp.best_eval, sp.final_eval
        if not self.settings.restore_best or best is None or final is None:
            extra.handed_on = "final"
            return
        if best["step"] == final["step"]:
            extra.handed_on = "final"
            return
        path = self.ckpts.best_path(sp.name)

        def load() -> None:
            try:
                model.load_state_dict(load_checkpoint(path)["algo_state"])
            except CheckpointError as e:
                raise RunError(f"restore_best: {e}") from None

        self.dist.on_main(load, RUN_ERRORS)  # rank 0 wrote it; the others get its weights
        self.dist.broadcast_tensors([*model.parameters(), *model.buffers()])
        extra.handed_on = "best"
        self._log(
            f"{sp.name}: restored the best weights (step {best['step']}, "
            f"{self.metric} {best.get(self.metric, float('nan')):.4f})"
        )

    def _evaluate(self, model: MemoryReader, index: int) -> bool:
        """Evaluate (rank 0, its results broadcast), log, keep the best checkpoint; True when
        early stopping says stop (on every rank alike)."""
        stage = self.cfg.stages[index]
        halting = stage.algo == "qa_hybrid"
        metrics = self.dist.on_main(lambda: self.evaluator(model, halting=halting), RUN_ERRORS)
        stop = False
        with self.dist.agreed(RUN_ERRORS):
            stop = self._after_eval(model, index, metrics)
        return stop

    def _after_eval(self, model: MemoryReader, index: int, metrics: dict[str, Any]) -> bool:
        record = self._write_eval(index, metrics)
        value = metrics.get(self.metric)
        if value is None:
            raise RunError(
                f"early_stopping.metric: {self.metric!r} is not among the QA evaluation metrics "
                f"({', '.join(sorted(metrics))})"
            )
        if not math.isfinite(value):
            return False
        return self._track_best(
            index, value, record, lambda: self._checkpoint(model, None, None, None, index, [])
        )

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(
        self,
        model: MemoryReader,
        algo: SupervisedStage | HybridStage | None,
        schedulers: dict[str, Any] | None,
        sampler: CurriculumSampler | None,
        index: int,
        pending: list[dict[str, Any]],
    ) -> dict[str, Any]:
        return self._checkpoint_record(
            index,
            model.state_dict(),
            algo.optimizers if algo else {},
            schedulers,
            sampler,
            pending,
            loop={"qa": [asdict(e) for e in self.extra]},
            meta={
                "kind": "qa",
                "store_hash": self.store.content_hash,
                "reader": self.reader_cfg.to_dict(),
                "config": self.cfg.to_dict(),
            },
        )

    def _save_step(
        self,
        model: MemoryReader,
        algo: SupervisedStage | HybridStage,
        schedulers: dict[str, Any],
        sampler: CurriculumSampler,
        index: int,
        pending: list[dict[str, Any]],
    ) -> None:
        ckpt = self._checkpoint(model, algo, schedulers, sampler, index, pending)  # every rank
        if self.dist.is_main:
            self.ckpts.save_step(ckpt, self.state.step)

    # ------------------------------------------------------------------ end
    def _handed_on_eval(self, index: int) -> dict[str, Any] | None:
        sp = self.state.stages[index]
        return sp.best_eval if self.extra[index].handed_on == "best" else sp.final_eval

    def _finish(self) -> dict[str, Any]:
        st = self.state
        stages = []
        for i, (sp, ex) in enumerate(zip(st.stages, self.extra)):
            d = sp.summary(self.metric)
            bs = self.cfg.stages[i].batch_size
            d["batch_size"] = bs
            d["examples_per_s"] = (
                round(sp.steps_done * bs / sp.train_time_s, 2) if sp.train_time_s > 0 else None
            )
            d["segments_per_s"] = (
                round(ex.segments / sp.train_time_s, 1) if sp.train_time_s > 0 else None
            )
            d["handed_on"] = ex.handed_on
            d["handed_on_eval"] = self._handed_on_eval(i)
            ev = d["handed_on_eval"] or {}
            d["read_everything"] = {
                "f1": ev.get("eval/full_f1"),
                "exact_match": ev.get("eval/full_exact_match"),
            }
            if ex.baseline_eval is not None:
                d["baseline_eval"] = ex.baseline_eval
            p = self.params[i]
            if isinstance(p, HybridParams):
                d["segment_cost"] = p.segment_cost
                d["halting_rules"] = ex.halting_rules
            stages.append(d)
        summary: dict[str, Any] = {
            "run": str(self.run_dir),
            "kind": "qa",
            "store": self.cfg.store,
            "store_hash": self.store.content_hash,
            "seed": self.cfg.seed,
            "device": str(self.device),
            "precision": self.cfg.precision,
            "total_steps": st.step,
            "wall_time_s": round(sum(s.wall_time_s for s in st.stages), 3),
            "metric": self.metric,
            "f1_weight": self.settings.f1_weight,
            "model": {**self.reader_cfg.to_dict(), "parameters": self._n_params},
            "split": {
                "train_split": self.settings.train_split,
                "train_examples": {k: int(len(v)) for k, v in self.pools.items()},
                "policy_holdout": self.settings.policy_holdout,
                "eval_split": self.settings.eval_split,
                "eval_examples": int(len(self.evaluator.examples)),
            },
            "stages": stages,
            **self._comparison(stages),
        }
        if self.dist.enabled or self.n_shards > 1:
            summary["data_parallel"] = {
                "ranks": self.dist.world_size,
                "shards": self.n_shards,
                # per stage trained by this process: each rank's sha256 of the trained
                # weights and optimizer states (checked equal)
                "state_sha256": self._rank_digests,
            }
        return self._write_summary(summary, plot_qa_curves)

    def _comparison(self, stages: list[dict[str, Any]]) -> dict[str, Any]:
        """The read-everything baseline and the last hybrid stage's reader, side by side."""
        keys = (
            "f1",
            "exact_match",
            "has_answer_f1",
            "has_answer_accuracy",
            "no_answer_accuracy",
            "segments_read",
            "fraction_read",
            "fraction_read_total",
            "combined",
        )
        baseline: dict[str, Any] | None = None
        hybrid: dict[str, Any] | None = None
        for d in stages:
            if d["algo"] == "qa_hybrid":
                src = d.get("baseline_eval")
                if src is not None and baseline is None:
                    baseline = {"source": f"{d['name']} initial weights, reading everything"}
                    baseline.update({k: src.get(f"eval/{k}") for k in keys})
                ev = d["handed_on_eval"]
                if ev is not None:
                    hybrid = {"stage": d["name"], "segment_cost": d.get("segment_cost")}
                    hybrid.update({k: ev.get(f"eval/{k}") for k in keys})
                    hybrid["read_everything_f1"] = ev.get("eval/full_f1")
                    hybrid["read_everything_exact_match"] = ev.get("eval/full_exact_match")
            elif d["algo"] == "qa_supervised" and d["handed_on_eval"] is not None:
                ev = d["handed_on_eval"]
                baseline = {"source": f"{d['name']} (read everything)"}
                baseline.update({k: ev.get(f"eval/{k}") for k in keys})
        out: dict[str, Any] = {"baseline": baseline, "hybrid": hybrid}
        if baseline and hybrid and baseline["f1"] is not None and hybrid["f1"] is not None:
            out["hybrid_vs_baseline"] = {
                "f1_delta": round(hybrid["f1"] - baseline["f1"], 3),
                "exact_match_delta": round(hybrid["exact_match"] - baseline["exact_match"], 3),
                "fewer_segments_read": round(1 - hybrid["fraction_read_total"], 4),
                "fraction_read": hybrid["fraction_read"],
            }
        return out


# --------------------------------------------------------------------------- curves


def plot_qa_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One PNG: F1 / exact match (with halting and reading everything), fraction read, the
    combined score, then every training metric, against the global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if r.get("kind") == "train"]
    baselines = [r for r in rows if r.get("kind") == "baseline"]
    panels: list[tuple[str, list[dict[str, Any]], list[str]]] = [
        ("F1 / exact match (dev)", evals, ["eval/f1", "eval/exact_match", "eval/full_f1"]),
        ("fraction of segments read", evals, ["eval/fraction_read"]),
        (QA_METRIC, evals, [QA_METRIC]),
    ]
    skip = {"step", "stage", "algo", "kind", "time", "lr", "steps_per_s", "examples_per_s"}
    keys = sorted(
        {k for r in train for k, v in r.items() if k not in skip and isinstance(v, int | float)}
    )
    panels += [(k, train, [k]) for k in keys]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.0 * nrows), squeeze=False)
    boundaries = stage_starts(rows)
    for i, (ax, (name, data, ks)) in enumerate(zip(axes.flat, panels)):
        for k in ks:
            pts = [(r["step"], r[k]) for r in data if isinstance(r.get(k), int | float)]
            if pts:
                xs, ys = zip(*pts)
                style = "--" if k == "eval/full_f1" else "-"
                ax.plot(xs, ys, style, marker="o" if data is evals else None, ms=3, lw=1.2, label=k)
                if k.startswith("loss/span") and min(ys) > 0:
                    ax.set_yscale("log")
        if i == 0:
            for r in baselines:
                ax.plot(
                    [r["step"]],
                    [r["baseline/f1"]],
                    "*",
                    ms=10,
                    color="C3",
                    label="read-everything baseline",
                )
            ax.legend(fontsize=7)
        mark_panel(ax, name, boundaries)
    return save_panels(fig, axes, len(panels), title, path, rect=(0, 0, 1, 0.98))
