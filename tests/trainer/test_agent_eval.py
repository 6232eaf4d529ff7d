"""Action accuracy from one teacher-forced pass equals greedy decoding, span by span."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.agent.data import SequenceArrays
from trainer.agent.evaluation import action_runs, greedy_action_matches, offline_metrics
from trainer.agent.losses import label_weights

NAMES = ["context", "reasoning", "action", "other"]
CTX, REA, ACT, OTH = 0, 1, 2, 3


def episode(rng: np.random.Generator, turns: int, vocab: int) -> tuple[list[int], list[int]]:
    """Context, then per turn: other, reasoning, other, action, other (a closing tag)."""
    ids: list[int] = []
    labels: list[int] = []

    def add(n: int, lab: int) -> None:
        ids.extend(rng.integers(0, vocab, size=n).tolist())
        labels.extend([lab] * n)

    add(int(rng.integers(3, 8)), CTX)
    for _ in range(turns):
        add(1, OTH)
        add(int(rng.integers(1, 5)), REA)
        add(1, OTH)
        add(int(rng.integers(1, 3)), ACT)
        add(2, OTH)
        add(int(rng.integers(2, 5)), CTX)
    return ids, labels


def test_action_runs_score_the_span_and_the_token_after_it():
    labels = np.array([[0, 3, 2, 2, 3, 0, 3, 2, 3, 0]])
    scored, run = action_runs(labels, ACT)
    assert np.flatnonzero(scored[0]).tolist() == [2, 3, 4, 7, 8]
    assert run[0, [2, 3, 4, 7, 8]].tolist() == [0, 0, 0, 1, 1]


@pytest.fixture(scope="module")
def model_and_data():
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 7  # a small vocabulary: a random model's argmax hits the data often enough
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(3)
    eps = [episode(rng, int(rng.integers(1, 5)), vocab) for _ in range(40)]
    # make some actions the model's own greedy continuation, so both outcomes occur
    for ids, labels in eps[::2]:
        for j in range(1, len(ids)):
            if labels[j] in (ACT,) or (labels[j - 1] == ACT and labels[j] != ACT):
                with torch.no_grad():
                    ids[j] = int(model(torch.tensor([ids[:j]])).logits[0, -1].argmax())
    offsets = np.concatenate([[0], np.cumsum([len(i) for i, _ in eps])])
    arrays = SequenceArrays(
        np.concatenate([i for i, _ in eps]).astype(np.int32),
        np.concatenate([lab for _, lab in eps]).astype(np.int8),
        offsets.astype(np.int64),
    )
    return model, eps, arrays


def test_action_accuracy_equals_greedy_generation(model_and_data):
    model, eps, arrays = model_and_data

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        return model(x).logits

    want = [m for ids, labels in eps for m in greedy_action_matches(logits_fn, ids, labels, ACT)]
    assert 0 < sum(want) < len(want), "both outcomes occur"

    def forward(batch):
        out = model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
        return out.last_hidden_state

    import contextlib

    got = offline_metrics(
        forward,
        model.lm_head,
        arrays,
        np.arange(len(eps)),
        label_names=NAMES,
        weights=label_weights(NAMES, None),
        pad_id=0,
        batch_size=6,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
    )
    assert got["eval/actions"] == len(want)
    assert got["eval/action_accuracy"] == pytest.approx(sum(want) / len(want))
    # per-span token accuracy by a plain loop over every position
    hits = {c: [] for c in (REA, ACT, OTH)}
    with torch.no_grad():
        for ids, labels in eps:
            logits = model(torch.tensor([ids])).logits[0]
            for j in range(1, len(ids)):
                if labels[j]:
                    hits[labels[j]].append(int(logits[j - 1].argmax()) == ids[j])
    for c in (REA, ACT, OTH):
        assert got[f"eval/token_accuracy/{NAMES[c]}"] == pytest.approx(np.mean(hits[c]))
