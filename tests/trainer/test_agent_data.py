"""SFT batches and the SAD loss, held against plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.agent.data import (
    BucketSampler,
    SequenceArrays,
    collate,
    curriculum_limit,
    pack_rows,
    packed_attention_mask,
    split_episodes,
)
from trainer.agent.losses import label_weights, sad_loss, topk_kl
from trainer.config import ConfigError

PAD = 99


def make_arrays(lengths: list[int], seed: int = 0, n_labels: int = 4, k: int = 0) -> SequenceArrays:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    ids = rng.integers(0, 50, size=total).astype(np.int32)
    labels = rng.integers(0, n_labels, size=total).astype(np.int8)
    t_ids = t_lp = None
    if k:
        t_ids = rng.integers(0, 50, size=(total, k)).astype(np.int32)
        t_ids[labels == 0] = -1
        t_lp = np.log(rng.dirichlet(np.ones(k), size=total)).astype(np.float32)
    return SequenceArrays(ids, labels, offsets, t_ids, t_lp)


def plain_rows(arrays: SequenceArrays, episodes: list[int]) -> list[list[int]]:
    return [arrays.input_ids[arrays.offsets[e] : arrays.offsets[e + 1]].tolist() for e in episodes]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    pick=st.lists(st.integers(0, 11), min_size=1, max_size=8),
    pack=st.booleans(),
    cap=st.integers(1, 60),
)
def test_collate_lays_out_every_episode_whole(lengths, pick, pack, cap):
    arrays = make_arrays(lengths)
    episodes = [p % len(lengths) for p in pick]
    b = collate(arrays, np.array(episodes), PAD, pack=pack, max_len=cap)
    want = plain_rows(arrays, episodes)
    # read the batch back episode by episode with a plain loop over rows and segments
    got: list[list[int]] = []
    got_labels: list[list[int]] = []
    for r in range(b.input_ids.shape[0]):
        seg = b.segment_ids[r].tolist()
        for s in range(1, max(seg) + 1):
            cols = [c for c in range(len(seg)) if seg[c] == s]
            assert cols == list(range(cols[0], cols[0] + len(cols))), "an episode is contiguous"
            assert b.position_ids[r, cols].tolist() == list(range(len(cols)))
            got.append(b.input_ids[r, cols].tolist())
            got_labels.append(b.labels[r, cols].tolist())
        pad = [c for c in range(len(seg)) if seg[c] == 0]
        assert all(b.input_ids[r, c] == PAD and b.labels[r, c] == 0 for c in pad)
        assert b.attention_mask[r].tolist() == [int(s > 0) for s in seg]
        if pack:
            assert sum(x > 0 for x in seg) <= max(cap, max(lengths)), "a row holds at most max_len"
    if not pack:
        assert got == want
    else:
        assert sorted(map(tuple, got)) == sorted(map(tuple, want))
    assert b.n_tokens == sum(map(len, want))
    assert b.input_ids.shape[1] % 8 == 0
    assert b.n_trained == int((b.labels > 0).sum())
    for g, lab in zip(got, got_labels):
        e = next(i for i, w in zip(episodes, want) if w == g)
        assert lab == arrays.labels[arrays.offsets[e] : arrays.offsets[e + 1]].tolist()


def test_pack_rows_first_fit():
    assert pack_rows(np.array([5, 4, 3, 2, 9]), 8) == [[0, 2], [1, 3], [4]]
    assert pack_rows(np.array([1, 1, 1]), 2) == [[0, 1], [2]]


def test_collate_carries_teacher_rows():
    arrays = make_arrays([5, 7], k=3)
    b = collate(arrays, np.array([1, 0]), PAD)
    assert arrays.teacher_ids is not None and b.teacher_ids is not None
    assert b.teacher_ids[0, :7].tolist() == arrays.teacher_ids[5:12].tolist()
    assert (b.teacher_ids[1, 5:] == -1).all()


def test_packed_mask_gives_the_logits_of_separate_episodes():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    arrays = make_arrays([6, 9, 4])
    b = collate(arrays, np.array([0, 1, 2]), PAD, pack=True, max_len=16)
    assert b.input_ids.shape[0] == 2  # first fit into 16: [6, 9] and [4]
    out = model(
        b.input_ids,
        attention_mask=packed_attention_mask(b.segment_ids),
        position_ids=b.position_ids,
    ).logits
    for r in range(b.input_ids.shape[0]):
        for s in range(1, int(b.segment_ids[r].max()) + 1):
            cols = (b.segment_ids[r] == s).nonzero().flatten()
            alone = model(b.input_ids[r, cols][None]).logits[0]
            torch.testing.assert_close(out[r, cols], alone, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- sampler


def test_sampler_is_a_function_of_seed_and_step_and_resumes():
    lengths = np.random.default_rng(1).integers(5, 200, size=300)
    a = BucketSampler(lengths, np.arange(300), 8, seed=3, total_steps=100)
    first = [a.sample() for _ in range(10)]
    b = BucketSampler(lengths, np.arange(300), 8, seed=3, total_steps=100)
    b.load_state_dict({"step": 5})
    assert all(np.array_equal(x, y) for x, y in zip(first[5:], [b.sample() for _ in range(5)]))
    c = BucketSampler(lengths, np.arange(300), 8, seed=4, total_steps=100)
    assert not np.array_equal(first[0], c.indices(0))


def test_sampler_draws_every_episode_alike_and_buckets_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=200)
    s = BucketSampler(lengths, np.arange(200), 4, seed=0, buckets=8)
    counts = np.zeros(200)
    spread, random_spread = [], []
    for k in range(5000):
        batch = s.indices(k)
        assert len(set(batch.tolist())) == 4
        counts[batch] += 1
        spread.append(np.ptp(lengths[batch]))
        random_spread.append(np.ptp(lengths[rng.choice(200, 4, replace=False)]))
    expected = 5000 * 4 / 200
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected
    assert np.mean(spread) < 0.4 * np.mean(random_spread)


def test_sampler_curriculum_admits_short_episodes_first():
    lengths = np.arange(10, 1010, 10)  # 100 episodes
    s = BucketSampler(
        lengths, np.arange(100), 4, seed=0, total_steps=100, start_tokens=100, full_at=0.5
    )
    assert lengths[s.indices(0)].max() <= 100
    assert lengths[s.indices(25)].max() <= curriculum_limit(25, 100, 100, 0.5, 1000)
    late = np.concatenate([s.indices(k) for k in range(50, 100)])
    assert lengths[late].max() > 900


def test_split_is_by_id_not_position():
    ids = [f"ep{i}" for i in range(2000)]
    held = split_episodes(ids, 0.1, seed=0)
    assert 0.07 < held.mean() < 0.13
    shuffled = ids[::-1]
    held_r = split_episodes(shuffled, 0.1, seed=0)
    assert held_r.tolist() == held[::-1].tolist()
    assert split_episodes(ids, 0.1, seed=1).tolist() != held.tolist()


# --------------------------------------------------------------------------- loss


def plain_sad(logits: np.ndarray, batch, weights: np.ndarray) -> tuple[float, dict[int, float]]:
    """The weighted CE by a loop over every position of every row."""
    num = den = 0.0
    per: dict[int, list[float]] = {}
    B, L = batch.input_ids.shape
    for b in range(B):
        for t in range(L - 1):
            lab = int(batch.labels[b, t + 1])
            if lab == 0 or batch.segment_ids[b, t + 1] != batch.segment_ids[b, t]:
                continue
            row = logits[b, t].astype(np.float64)
            lse = math.log(np.exp(row - row.max()).sum()) + row.max()
            ce = lse - row[int(batch.input_ids[b, t + 1])]
            num += weights[lab] * ce
            den += weights[lab]
            per.setdefault(lab, []).append(ce)
    return num / den, {k: float(np.mean(v)) for k, v in per.items()}


@pytest.mark.parametrize("pack", [False, True])
def test_sad_loss_matches_a_plain_loop(pack):
    torch.manual_seed(0)
    arrays = make_arrays([9, 14, 6, 11], seed=2)
    b = collate(arrays, np.array([0, 1, 2, 3]), PAD, pack=pack, max_len=25)
    H, V = 16, 100
    hidden = torch.randn(*b.input_ids.shape, H)
    head = torch.nn.Linear(H, V, bias=False)
    weights = label_weights(["context", "reasoning", "action", "other"], {"reasoning": 0.3})
    loss, m = sad_loss(hidden, head, b, weights)
    full = head(hidden).detach().numpy()
    want, per = plain_sad(full, b, weights.numpy())
    assert loss.item() == pytest.approx(want, rel=1e-5)
    for lab, v in per.items():
        assert m[f"loss/{lab}"].item() == pytest.approx(v, rel=1e-5)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_span_weights_move_the_loss_toward_the_heavier_span():
    torch.manual_seed(0)
    arrays = make_arrays([30, 30], seed=5)
    b = collate(arrays, np.array([0, 1]), PAD)
    hidden = torch.randn(*b.input_ids.shape, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    names = ["context", "reasoning", "action", "other"]
    _, m = sad_loss(hidden, head, b, label_weights(names, None))
    only_action, _ = sad_loss(hidden, head, b, label_weights(names, {"reasoning": 0, "other": 0}))
    assert only_action.item() == pytest.approx(m["loss/2"].item(), rel=1e-5)


def test_label_weights_refuse_unknown_and_all_zero():
    names = ["context", "reasoning", "action", "other"]
    assert label_weights(names, {"action": 2}).tolist() == [0.0, 1.0, 2.0, 1.0]
    with pytest.raises(ConfigError, match=r"span_weights.actoin: not a label"):
        label_weights(names, {"actoin": 1})
    with pytest.raises(ConfigError, match="context is never trained"):
        label_weights(names, {"context": 1})
    with pytest.raises(ConfigError, match="every weight is 0"):
        label_weights(names, {"reasoning": 0, "action": 0, "other": 0})


def test_topk_kl_against_numpy():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(5, 12)), dtype=torch.float32)
    ids = torch.tensor(rng.integers(0, 12, size=(5, 3)))
    ids[2, 2] = -1
    lp = torch.tensor(np.log(rng.dirichlet(np.ones(3), size=5)), dtype=torch.float32)
    got = topk_kl(logits, ids, lp).numpy()
    for i in range(5):
        keep = ids[i].numpy() >= 0
        t = lp[i].numpy()[keep].astype(np.float64)
        t = t - np.log(np.exp(t).sum())
        s_all = logits[i].numpy().astype(np.float64)
        s = s_all - (np.log(np.exp(s_all - s_all.max()).sum()) + s_all.max())
        want = float((np.exp(t) * (t - s[ids[i].numpy()[keep]])).sum())
        assert got[i] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_distillation_pulls_the_student_to_the_teacher():
    torch.manual_seed(0)
    arrays = make_arrays([20, 20], seed=1, k=4)
    b = collate(arrays, np.array([0, 1]), PAD)
    hidden = torch.randn(*b.input_ids.shape, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    w = label_weights(["context", "reasoning", "action", "other"], None)
    plain, _ = sad_loss(hidden, head, b, w)
    both, m = sad_loss(hidden, head, b, w, distill_weight=0.5)
    assert both.item() == pytest.approx(plain.item() + 0.5 * m["distill_kl"].item(), rel=1e-5)
    assert m["distill_kl"].item() > 0
