"""QA stages: gradient accumulation equal to one big batch where the math says so, and
mixed precision (bf16 autocast on CPU; fp16 refused off CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.segments.store import SegmentStore
from trainer.config import ConfigError
from trainer.qa.data import QAArrays, collate
from trainer.qa.runner import HybridParams, HybridStage, SupervisedParams, SupervisedStage

from .test_qa_data import arrays, store, tiny_reader  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def test_supervised_micro_batches_give_the_gradient_of_one_batch(
    store: SegmentStore,  # noqa: F811
    arrays: QAArrays,  # noqa: F811
) -> None:
    torch.manual_seed(0)
    model = tiny_reader(store)
    a, b = np.arange(0, 5), np.arange(5, 14)  # unequal sizes and segment counts
    stage = SupervisedStage(model, SupervisedParams(lr=0.0, grad_accumulation=2))
    m = stage.update([collate(arrays, a), collate(arrays, b)], 0)
    got = grads(model)
    # the plain way: one batch of every question, one backward
    model.zero_grad(set_to_none=True)
    loss, _ = SupervisedStage(model, SupervisedParams(lr=0.0)).loss(
        collate(arrays, np.concatenate([a, b]))
    )
    loss.backward()
    want = grads(model)
    assert float(m["loss/span"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    moved = 0
    for k, g in want.items():
        torch.testing.assert_close(got[k], g, rtol=1e-4, atol=1e-6)
        moved += int(bool(g.abs().sum() > 0))
    assert moved > 0


def test_hybrid_micro_batches_sum_their_parts(
    store: SegmentStore,  # noqa: F811
    arrays: QAArrays,  # noqa: F811
) -> None:
    """The reader's gradient is the span loss of all the step's segments (as one batch);
    the halting and value heads' is the mean of each micro-batch's policy gradient, each
    sampled with its own stream."""
    torch.manual_seed(0)
    model = tiny_reader(store)
    model.reset_policy(0.0)
    a, b = collate(arrays, np.arange(0, 6)), collate(arrays, np.arange(6, 13))
    kw = {"segment_cost": 0.05, "qa_lr": 0.0, "policy_lr": 0.0}
    acc = HybridStage(model, HybridParams(grad_accumulation=2, **kw), seed=0, stream=1,
                      answer_threshold=0.0)  # fmt: skip
    acc.update([a, b], 3)
    got = grads(model)
    reader = [
        n for n, _ in model.named_parameters() if not n.startswith(("halt_head", "value_head"))
    ]
    heads = [n for n, _ in model.named_parameters() if n.startswith(("halt_head", "value_head"))]
    # the reader: the span loss of one batch of both micro-batches' questions
    model.zero_grad(set_to_none=True)
    one = SupervisedStage(model, SupervisedParams(lr=0.0))
    span, _ = one.loss(collate(arrays, np.arange(0, 13)))
    span.backward()
    want = grads(model)
    for n in reader:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)
    # the heads: each micro-batch's policy part alone (no span loss), averaged
    plain = HybridStage(model, HybridParams(sl_weight=0.0, **kw), seed=0, stream=1,
                        answer_threshold=0.0)  # fmt: skip
    parts = []
    for i, mb in enumerate((a, b)):
        model.zero_grad(set_to_none=True)
        loss, _ = plain.loss(mb, 3, micro=i)
        loss.backward()
        parts.append(grads(model))
    for n in heads:
        torch.testing.assert_close(got[n], (parts[0][n] + parts[1][n]) / 2, rtol=1e-4, atol=1e-6)
    assert any(float(got[n].abs().sum()) > 0 for n in heads)
    # micro-batch 1 samples other decisions than micro-batch 0 would on the same questions
    l0, m0 = plain.loss(a, 3, micro=0)
    l1, m1 = plain.loss(a, 3, micro=1)
    assert float(m0["episode/segments_read"]) != float(m1["episode/segments_read"]) or float(
        l0
    ) != float(l1)


def test_bf16_autocast_trains_close_to_fp32_and_fp16_needs_cuda(
    store: SegmentStore,  # noqa: F811
    arrays: QAArrays,  # noqa: F811
) -> None:
    batch = collate(arrays, np.arange(0, 8))
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = tiny_reader(store)
        stage = SupervisedStage(model, SupervisedParams(lr=1e-2), precision=precision)
        first = float(stage.update([batch], 0)["loss/span"])
        for s in range(1, 6):
            last = float(stage.update([batch], s)["loss/span"])
        losses[precision] = (first, last)
    (f32, l32), (f16, l16) = losses["fp32"], losses["bf16"]
    assert f16 == pytest.approx(f32, rel=0.05) and l16 < f16 and l32 < f32
    assert f16 != f32  # bf16 did run (its rounding shows)
    model = tiny_reader(store)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        SupervisedStage(model, SupervisedParams(), precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        HybridStage(model, HybridParams(), seed=0, stream=0, answer_threshold=0.0,
                    precision="fp16", device="cpu")  # fmt: skip


def test_token_dropout_touches_only_document_tokens_outside_the_answer(
    store: SegmentStore,  # noqa: F811
    arrays: QAArrays,  # noqa: F811
) -> None:
    from trainer.qa.data import drop_tokens

    b = collate(arrays, np.arange(arrays.n_examples))
    unk = int(store.special_tokens["unk"])
    assert drop_tokens(b, 0.0, unk, torch.Generator()) is b
    gen = torch.Generator().manual_seed(0)
    d = drop_tokens(b, 0.5, unk, gen)
    again = drop_tokens(b, 0.5, unk, torch.Generator().manual_seed(0))
    assert torch.equal(d.input_ids, again.input_ids)  # a pure function of the generator
    changed = d.input_ids != b.input_ids
    eligible = 0
    for i, t, w in zip(*np.nonzero(np.ones(b.input_ids.shape, dtype=bool))):  # a plain loop
        st, en = int(b.start_target[i, t]), int(b.end_target[i, t])
        in_answer = st > 0 and st <= w <= en
        ok = bool(b.context_mask[i, t, w]) and not in_answer
        eligible += ok and int(b.input_ids[i, t, w]) != unk
        if changed[i, t, w]:
            assert ok and int(d.input_ids[i, t, w]) == unk
        elif not ok:
            assert int(d.input_ids[i, t, w]) == int(b.input_ids[i, t, w])
    assert 0.4 < int(changed.sum()) / eligible < 0.6
    assert torch.equal(d.start_target, b.start_target)
