"""The SFT / SAD loss: next-token cross-entropy on what the policy writes, weighted per span.

Structured Agent Distillation trains reasoning and action spans with their own weights. A
token's label (0 context, then one code per span, then ``other``) says which weight its
prediction takes; context tokens are read, never predicted. With ``W[c]`` the weight of
label ``c`` (``W[0] = 0``) and ``CE_t`` the cross-entropy of predicting token ``t`` from
the tokens before it::

    loss = sum_t W[label_t] * CE_t / sum_t W[label_t]

summed over the batch's targets (so a long episode counts by its tokens, as in TRL). The LM
head runs only at the positions that predict a target: on a large vocabulary the head and
its softmax are most of a small model's cost, and context is most of an agent episode.

With the teacher's top-k log-probabilities in the store, ``distill_weight * KL`` is added:
the KL from the teacher's distribution, renormalised over its top k tokens, to the
student's, at every target position that has teacher ids (mean over those positions).

Data-parallel, a rank's loss is not the mean over its own targets: the ranks' means,
averaged, are not the mean over the global batch when their target weights differ.
:func:`loss_norms` gives a batch's denominators (its target weight and its teacher
positions) before any forward pass; summed over the ranks and handed to :func:`sad_loss`
as ``norms``, each rank's loss is its share of the global batch's weighted mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from trainer.config import ConfigError

if TYPE_CHECKING:
    from trainer.agent.data import TokenBatch


def label_weights(label_names: list[str], span_weights: dict[str, float] | None) -> torch.Tensor:
    """(n_labels,) float32: 0 for context, ``span_weights[name]`` (default 1) for the others.

    ``span_weights`` may only name the store's labels (not ``context``); a weight is >= 0.
    """
    weights = dict(span_weights or {})
    names = list(label_names)
    for name, w in weights.items():
        if name not in names[1:]:
            raise ConfigError(
                f"span_weights.{name}: not a label of the store; its labels are "
                f"{', '.join(names[1:])} (context is never trained)"
            )
        if not isinstance(w, int | float) or isinstance(w, bool) or w < 0:
            raise ConfigError(f"span_weights.{name}: must be a number >= 0, got {w!r}")
    out = torch.tensor([0.0] + [float(weights.get(n, 1.0)) for n in names[1:]])
    if float(out.sum()) == 0.0:
        raise ConfigError("span_weights: every weight is 0; nothing would be trained")
    return out


def target_positions(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions whose NEXT token is a target (label > 0, same episode)."""
    nxt = batch.labels[:, 1:] > 0
    same = batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1]
    rows, cols = torch.nonzero(nxt & same, as_tuple=True)
    return rows, cols


def topk_kl(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """(K,) KL(teacher || student) over the teacher's top-k tokens (ids < 0 are unused slots).

    The teacher's probabilities are renormalised over its listed tokens; the student's are
    its full softmax at those ids.
    """
    valid = teacher_ids >= 0  # (K, k)
    t_lp = teacher_logprobs.float().masked_fill(~valid, float("-inf"))
    t_lp = t_lp - torch.logsumexp(t_lp, dim=-1, keepdim=True)
    s_lp = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_ids.clamp_min(0))
    p = t_lp.exp()
    terms = torch.where(valid, p * (t_lp - s_lp), torch.zeros_like(p))
    return terms.sum(-1)


def loss_norms(batch: TokenBatch, weights: torch.Tensor) -> torch.Tensor:
    """(2,) float32 the denominators of :func:`sad_loss` on ``batch``: the summed weight of
    its targets, and the number of its target positions with teacher ids (0 without)."""
    rows, cols = target_positions(batch)
    lab = batch.labels[rows, cols + 1]
    w_sum = weights.to(lab.device)[lab].sum()
    if batch.teacher_ids is None:
        has = torch.zeros((), device=lab.device)
    else:
        has = (batch.teacher_ids[rows, cols + 1] >= 0).any(-1).sum().float()
    return torch.stack([w_sum.float(), has])


def sad_loss(
    hidden: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    batch: TokenBatch,
    weights: torch.Tensor,
    *,
    distill_weight: float = 0.0,
    norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted loss of a batch and its metrics (0-dim tensors, no host sync).

    ``norms``: the (2,) denominators of the loss (:func:`loss_norms` of a global batch
    this one is a part of) instead of this batch's own; the metrics stay this batch's.

    ``hidden``: (B, L, H) the model's last hidden states; ``lm_head`` maps (K, H) to (K, V).
    Metrics: ``loss`` (the weighted CE), ``loss/LABEL`` and ``accuracy/LABEL`` per trained
    label code (by index; the caller names them), and ``distill_kl`` with a teacher.
    """
    rows, cols = target_positions(batch)
    targets = batch.input_ids[rows, cols + 1]
    lab = batch.labels[rows, cols + 1]
    logits = lm_head(hidden[rows, cols]).float()  # (K, V)
    ce = F.cross_entropy(logits, targets, reduction="none")  # (K,)
    w = weights.to(ce.device)[lab]
    ce_loss = (w * ce).sum() / w.sum().clamp_min(1e-8)
    loss = ce_loss
    n_labels = len(weights)
    correct = (logits.argmax(-1) == targets).float()
    sums = torch.zeros(n_labels, device=ce.device).index_add_(0, lab, ce.detach())
    hits = torch.zeros(n_labels, device=ce.device).index_add_(0, lab, correct)
    counts = torch.zeros(n_labels, device=ce.device).index_add_(0, lab, torch.ones_like(ce))
    metrics: dict[str, torch.Tensor] = {"ce": ce_loss.detach()}
    for c in range(1, n_labels):
        n = counts[c].clamp_min(1.0)
        metrics[f"loss/{c}"] = sums[c] / n
        metrics[f"accuracy/{c}"] = hits[c] / n
    if distill_weight and batch.teacher_ids is not None and batch.teacher_logprobs is not None:
        t_ids = batch.teacher_ids[rows, cols + 1]
        t_lp = batch.teacher_logprobs[rows, cols + 1]
        has = (t_ids >= 0).any(-1)
        kl = topk_kl(logits[has], t_ids[has], t_lp[has])
        kl_mean = kl.sum() / has.sum().clamp_min(1)
        loss = loss + distill_weight * kl_mean
        metrics["distill_kl"] = kl_mean.detach()
        if norms is not None:
            part = (w * ce).sum() / norms[0].clamp_min(1e-8)
            part = part + distill_weight * kl.sum() / norms[1].clamp_min(1)
            metrics["loss"] = loss.detach()
            return part, metrics
    metrics["loss"] = loss.detach()
    if norms is not None:
        return (w * ce).sum() / norms[0].clamp_min(1e-8), metrics
    return loss, metrics
