"""Answer metrics: SQuAD's F1 and exact match on text, and a token-span F1 for rewards.

Text metrics follow the official SQuAD v2.0 evaluation script: answers are normalised
(lower case, punctuation and the articles a / an / the removed, whitespace collapsed), F1 is
the harmonic mean of precision and recall over the normalised words, and an example scores
the maximum over its gold answers. An unanswerable question has the single gold answer
``""``: the empty prediction scores 1, anything else 0 (and an empty prediction on an
answerable question scores 0).

:func:`span_f1` is the same F1 on document-token spans (predicted vs gold token indices),
vectorised in torch: the reward of a halting episode, computed without leaving the device.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Word-overlap F1 of two answers after normalisation."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(F1, exact match) of ``prediction`` against the best-matching gold answer.

    ``golds`` empty means unanswerable: the gold answer is ``""``.
    """
    candidates = [g for g in golds if normalize_answer(g)] or [""]
    return (
        max(f1(prediction, g) for g in candidates),
        max(exact_match(prediction, g) for g in candidates),
    )


def span_f1(
    pred_start: torch.Tensor,
    pred_end: torch.Tensor,
    gold_start: torch.Tensor,
    gold_end: torch.Tensor,
) -> torch.Tensor:
    """Token-span F1, elementwise; a start of -1 is the empty answer.

    Both empty: 1; one empty: 0; else ``2 * overlap / (len_pred + len_gold)`` with spans
    inclusive of both ends.
    """
    p_empty, g_empty = pred_start < 0, gold_start < 0
    overlap = (torch.minimum(pred_end, gold_end) - torch.maximum(pred_start, gold_start) + 1).clamp(
        min=0
    )
    lengths = (pred_end - pred_start + 1) + (gold_end - gold_start + 1)
    score = 2.0 * overlap.float() / lengths.clamp(min=1).float()
    return torch.where(p_empty | g_empty, (p_empty & g_empty).float(), score)
