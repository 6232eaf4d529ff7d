"""QA collation, the curriculum sampler and the reader on a real (tiny) segment store.

The padding test is the contract of collation: whatever the ids and targets of padded
positions and padded segments, the supervised and the hybrid losses and every gradient
are the same.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline.build import build
from pipeline.segments.store import SegmentStore, open_segment_store
from trainer.config import ConfigError
from trainer.qa.data import IGNORE, CurriculumSampler, QAArrays, QABatch, collate, curriculum_limit
from trainer.qa.model import (
    MemoryReader,
    ReaderConfig,
    best_spans,
    prefix_answers,
    question_match,
)
from trainer.qa.runner import HybridParams, HybridStage, SupervisedParams, SupervisedStage

ADJ = ("amber", "azure", "brave", "bronze", "crimson", "silent", "golden", "hollow")
NOUN = ("falcon", "otter", "lantern", "harbor", "violin", "badger", "beacon", "heron")
PLACES = ("Marrowby", "Eastwick", "Caldermoor", "Pennhaven", "Ostrava", "Tarragon")
FILLER = (
    "the", "reader", "turns", "a", "page", "about", "python", "grammar", "while", "the",
    "tired", "cat", "sleeps", "near", "an", "open", "window", "and", "rain", "falls", "on",
    "old", "roofs", "of", "the", "quiet", "town",
)  # fmt: skip


def tiny_records(n_docs: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    """Short documents of filler words, one planted fact each, a question on it, and for
    every third document an unanswerable question."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_docs):
        words = [FILLER[j] for j in rng.integers(0, len(FILLER), int(rng.integers(15, 70)))]
        a, n = ADJ[int(rng.integers(len(ADJ)))], NOUN[int(rng.integers(len(NOUN)))]
        place = PLACES[int(rng.integers(len(PLACES)))]
        at = int(rng.integers(0, len(words) + 1))
        head = " ".join(words[:at])
        fact = f"The {a} {n} lives in {place}."
        context = " ".join(x for x in (head, fact, " ".join(words[at:])) if x)
        start = context.index(fact) + len(fact) - len(place) - 1
        out.append(
            {
                "id": f"{prefix}{i}",
                "question": f"Where does the {a} {n} live?",
                "context": context,
                "answers": [{"text": place, "answer_start": start}],
            }
        )
        if i % 3 == 0:
            other = NOUN[(NOUN.index(n) + 1) % len(NOUN)]
            out.append(
                {
                    "id": f"{prefix}{i}-x",
                    "question": f"Where does the {a} {other} live?",
                    "context": context,
                    "answers": [],
                    "is_impossible": True,
                }
            )
    return out


def build_tiny_store(root: Path, n_train: int = 24, n_dev: int = 8) -> Path:
    """A real segment store (JSONL -> pipeline.build): 1-7 segments of 12 tokens per doc."""
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        lines = [json.dumps(r) for r in tiny_records(n, seed, f"{name}-")]
        (raw / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = {
        "name": "qa-tiny",
        "kind": "segments",
        "source": {
            "paths": [str(raw / "*.jsonl")],
            "format": "jsonl",
            "splits": {"train": "train*", "dev": "dev*"},
        },
        "tokenizer": {"train": {"vocab_size": 200, "min_frequency": 1}},
        "segments": {"max_tokens": 12, "stride": 12, "max_question_tokens": 12},
        "store": {"format": "arrow"},
    }
    spec_path = root / "qa-tiny.yaml"
    spec_path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return build(spec_path, root / "stores", progress=False).path


def tiny_reader(store: SegmentStore, **kw: Any) -> MemoryReader:
    cfg = ReaderConfig(
        vocab_size=int(store.manifest["tokenizer"]["vocab_size"]),
        max_positions=int(store.manifest["segments"]["max_input_width"]),
        **{"d_model": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32, "memory_dim": 8,
           "head_hidden": 8, "dropout": 0.0, **kw},
    )  # fmt: skip
    return MemoryReader(cfg)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SegmentStore:
    return open_segment_store(build_tiny_store(tmp_path_factory.mktemp("qa_tiny")))


@pytest.fixture(scope="module")
def arrays(store: SegmentStore) -> QAArrays:
    return QAArrays.from_store(store)


# --------------------------------------------------------------------------- collation


def test_collate_lays_out_every_segment_with_explicit_masks(
    store: SegmentStore, arrays: QAArrays
) -> None:
    ex = np.arange(len(store.examples))
    b = collate(arrays, ex)
    n = store.examples.n_segments
    assert sorted(b.example_index.tolist()) == ex.tolist()
    assert (np.diff(b.n_segments.numpy()) <= 0).all()  # longest first
    assert b.input_ids.shape[:2] == (len(ex), int(n.max()))
    for i, e in enumerate(b.example_index.tolist()):
        rows = range(*store.rows_of(e).indices(len(store.segments)))
        assert b.segment_mask[i].tolist() == [t < n[e] for t in range(b.input_ids.shape[1])]
        for t, r in enumerate(rows):
            length = int(store.segments.lengths[r])
            ids = store.segments.input_values[
                store.segments.input_offsets[r] : store.segments.input_offsets[r + 1]
            ]
            assert b.input_ids[i, t, :length].tolist() == ids.tolist()
            assert b.token_mask[i, t].sum() == length
            assert (b.input_ids[i, t, length:] == store.pad_id).all()
            cs, ln = int(store.segments.context_start[r]), int(store.segments.n_segment_tokens[r])
            want = [p == 0 or cs <= p < cs + ln for p in range(b.input_ids.shape[2])]
            assert b.span_mask[i, t].tolist() == want
            ls = int(store.segments.local_start[r])
            assert int(b.start_target[i, t]) == (ls if ls >= 0 else 0)
            assert int(b.end_target[i, t]) == max(int(store.segments.local_end[r]), 0)
        pad = ~b.segment_mask[i]
        assert (b.start_target[i][pad] == IGNORE).all() and not b.span_mask[i][pad].any()
        assert not b.token_mask[i][pad].any()


def _perturbed(b: QABatch, seed: int, vocab: int) -> QABatch:
    """The same batch with random ids at every padded position and random targets on
    padded segments."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.where(
        b.token_mask, b.input_ids, torch.randint(0, vocab, b.input_ids.shape, generator=g)
    )
    seg = b.segment_mask
    rnd = torch.randint(0, b.input_ids.shape[2], seg.shape, generator=g)
    return dataclasses.replace(
        b,
        input_ids=ids,
        start_target=torch.where(seg, b.start_target, rnd),
        end_target=torch.where(seg, b.end_target, rnd.flip(0)),
        context_start=torch.where(seg, b.context_start, rnd),
        token_offset=torch.where(seg, b.token_offset, rnd * 7),
    )


def _loss_and_grads(model: MemoryReader, loss: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=False)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros(()) for p in model.parameters()]
    return float(loss.detach()), grads


@pytest.mark.parametrize("stage", ["supervised", "hybrid", "hybrid-k3"])
def test_padding_never_enters_a_loss_or_a_gradient(
    store: SegmentStore, arrays: QAArrays, stage: str
) -> None:
    torch.manual_seed(0)
    model = tiny_reader(store)
    model.reset_policy(0.0)
    ex = np.arange(len(store.examples))[:12]
    b = collate(arrays, ex)
    assert (~b.segment_mask).any(), "the batch must hold padded segments"
    assert (~b.token_mask & b.segment_mask[..., None]).any(), "and padded positions"
    vocab = model.cfg.vocab_size
    assert not torch.equal(_perturbed(b, 1, vocab).input_ids, b.input_ids)
    results = []
    for variant in (b, _perturbed(b, 1, vocab), _perturbed(b, 2, vocab)):
        if stage == "supervised":
            loss, _ = SupervisedStage(model, SupervisedParams()).loss(variant)
        else:
            k = 3 if stage == "hybrid-k3" else 1
            params = HybridParams(segment_cost=0.05, episodes_per_question=k)
            algo = HybridStage(model, params, seed=0, stream=1, answer_threshold=0.0)
            loss, _ = algo.loss(variant, step=3)
        results.append(_loss_and_grads(model, loss))
    (l0, g0), *others = results
    assert np.isfinite(l0)
    assert any(float(g.abs().sum()) > 0 for g in g0)
    for li, gi in others:
        assert li == pytest.approx(l0, abs=1e-6)
        for a, c in zip(g0, gi):
            assert torch.allclose(a, c, atol=1e-6)


def _policy_gradients(
    model: MemoryReader, b: QABatch, k: int, steps: range
) -> tuple[torch.Tensor, list[float]]:
    """The policy part's flattened gradient at each step (the span loss off), and the
    mean episode count seen per step."""
    params = HybridParams(
        segment_cost=0.05, episodes_per_question=k, sl_weight=0.0, normalize_advantages=False
    )
    algo = HybridStage(model, params, seed=0, stream=1, answer_threshold=0.0)
    grads, reads = [], []
    for step in steps:
        loss, m = algo.loss(b, step=step)
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.halt_head.parameters()]))
        reads.append(float(m["episode/segments_read"]))
    return torch.stack(grads), reads


def test_more_episodes_per_question_lower_the_policy_gradient_variance(
    store: SegmentStore, arrays: QAArrays
) -> None:
    torch.manual_seed(0)
    model = tiny_reader(store)
    model.reset_policy(-1.0)
    b = collate(arrays, np.arange(12))
    one, reads_one = _policy_gradients(model, b, 1, range(60))
    eight, reads_eight = _policy_gradients(model, b, 8, range(60))
    # the same estimator: means agree within the noise of the K = 1 estimate ...
    se = one.std(0) / 60**0.5
    assert ((one.mean(0) - eight.mean(0)).abs() <= 4 * se + 1e-6).float().mean() > 0.95
    # ... with a fraction of the variance (1/8 in expectation)
    ratio = float(eight.var(0).sum() / one.var(0).sum())
    assert ratio < 0.3, ratio
    # episodes are sampled afresh per copy: their lengths differ between copies
    assert np.std(reads_eight) < np.std(reads_one)


def test_episodes_per_question_must_be_a_positive_integer() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="episodes_per_question"):
            HybridParams(episodes_per_question=bad)


# --------------------------------------------------------------------------- the reader


def test_reader_is_causal_and_carries_its_memory(store: SegmentStore, arrays: QAArrays) -> None:
    torch.manual_seed(0)
    model = tiny_reader(store).eval()
    e = int(np.argmax(store.examples.n_segments))
    b = collate(arrays, [e])
    assert int(b.n_segments[0]) >= 3
    out = model.read(b)
    ids = b.input_ids.clone()
    ids[0, 2, 5] = (ids[0, 2, 5] + 1) % model.cfg.vocab_size  # change segment 2 only
    out2 = model.read(dataclasses.replace(b, input_ids=ids))
    assert torch.equal(out.start_logits[0, :2], out2.start_logits[0, :2])  # the past is fixed
    assert not torch.equal(out.start_logits[0, 3:], out2.start_logits[0, 3:])  # memory carries


@pytest.mark.parametrize("reads_memory", [False, True])
def test_the_halting_head_reads_the_memory_only_when_asked(reads_memory: bool) -> None:
    torch.manual_seed(0)
    model = MemoryReader(
        ReaderConfig(vocab_size=50, max_positions=20, d_model=16, n_layers=1, n_heads=2,
                     ffn_dim=32, memory_dim=8, head_hidden=8, halt_reads_memory=reads_memory)
    )  # fmt: skip
    feats, mem = torch.rand(6, 5), torch.randn(6, 8)
    halt, value = model.policy(mem, feats)
    halt2, value2 = model.policy(mem + torch.randn(6, 8), feats)
    assert not torch.allclose(value, value2)  # the value head always reads the memory
    assert torch.equal(halt, halt2) != reads_memory
    halt3, _ = model.policy(mem, feats.flip(0))
    assert not torch.allclose(halt, halt3)  # and the features, always
    with pytest.raises(ConfigError, match="halt_reads_memory"):
        ReaderConfig(halt_reads_memory="yes")  # type: ignore[arg-type]


def test_reader_output_does_not_depend_on_batch_order(
    store: SegmentStore, arrays: QAArrays
) -> None:
    torch.manual_seed(0)
    model = tiny_reader(store).eval()
    b = collate(arrays, np.arange(10))
    perm = torch.tensor([3, 0, 9, 1, 2, 8, 4, 7, 6, 5])
    shuffled = QABatch(**{k: v[perm] for k, v in b.__dict__.items()})
    out, out_s = model.read(b), model.read(shuffled)
    assert torch.allclose(out.start_logits[perm], out_s.start_logits, atol=1e-5)
    assert torch.allclose(out.halt_logit[perm], out_s.halt_logit, atol=1e-5)


def test_best_span_is_the_brute_force_best() -> None:
    g = torch.Generator().manual_seed(0)
    n, w, ln = 40, 20, 4
    s, e = torch.randn(n, w, generator=g), torch.randn(n, w, generator=g)
    ctx = torch.rand(n, w, generator=g) < 0.7
    ctx[:, 0] = False
    ctx[:, 5] = True
    margin, i, j = best_spans(s, e, ctx, ln)
    for r in range(n):
        cands = [
            (float(s[r, a] + e[r, c]), a, c)
            for a in range(w)
            for c in range(a, min(a + ln, w))
            if ctx[r, a] and ctx[r, c]
        ]
        best = max(cands)
        assert (int(i[r]), int(j[r])) == best[1:]
        assert float(margin[r]) == pytest.approx(best[0] - float(s[r, 0] + e[r, 0]), abs=1e-5)


def test_prefix_answers_map_the_best_segment_to_document_tokens(
    store: SegmentStore, arrays: QAArrays
) -> None:
    b = collate(arrays, np.arange(6))
    model = tiny_reader(store).eval()
    out = model.read(b)
    # Plant a perfect answer for every answerable example: its gold span wins from its segment on.
    margin = torch.full_like(out.margin, -1.0).masked_fill(~b.segment_mask, float("-inf"))
    sp, ep = out.span_start.clone(), out.span_end.clone()
    has = b.start_target > 0
    margin[has] = 5.0
    sp[has], ep[has] = b.start_target[has], b.end_target[has]
    fake = dataclasses.replace(out, margin=margin, span_start=sp, span_end=ep)
    ps, pe = prefix_answers(fake, b)
    for i in range(len(b.n_segments)):
        k = int(has[i].nonzero()[0]) if has[i].any() else None
        for t in range(int(b.n_segments[i])):
            if k is None or t < k:
                assert (int(ps[i, t]), int(pe[i, t])) == (-1, -1)
            else:
                assert (int(ps[i, t]), int(pe[i, t])) == (int(b.gold_start[i]), int(b.gold_end[i]))


def test_question_match_equals_the_plain_loop(store: SegmentStore, arrays: QAArrays) -> None:
    b = collate(arrays, np.arange(len(store.examples)))
    n, t, w = b.input_ids.shape
    ids, tok = b.input_ids.reshape(n * t, w), b.token_mask.reshape(n * t, w)
    cs = b.context_start.reshape(-1)
    is_q = torch.arange(w)[None, :] < cs[:, None]
    got = question_match(ids, is_q, tok)
    seen = set()
    for r in range(n * t):
        c = int(cs[r])
        qtoks = set(ids[r, 1 : c - 1].tolist())  # between [CLS] and [SEP]
        row = ids[r].tolist()
        for p in range(w):
            want = int(p >= c and bool(tok[r, p]) and row[p] in qtoks)
            assert int(got[r, p]) == want, (r, p)
            seen.add(want)
    assert seen == {0, 1}


# --------------------------------------------------------------------------- curriculum


def test_curriculum_admits_short_documents_first_then_all() -> None:
    lims = [curriculum_limit(s, 100, 4, 0.5, 40) for s in range(101)]
    assert lims[0] == 4 and lims[50] == 40 and lims[-1] == 40
    assert all(a <= b for a, b in zip(lims, lims[1:]))
    assert curriculum_limit(0, 100, None, 0.5, 40) == 40


def test_sampler_is_a_pure_function_of_the_step(arrays: QAArrays) -> None:
    pool = np.arange(arrays.n_examples)

    def make() -> CurriculumSampler:
        return CurriculumSampler(
            arrays.n_segments, pool, 8, 3, stream=1, total_steps=20, start_segments=2, full_at=0.5
        )

    a, b = make(), make()
    first = [a.sample() for _ in range(20)]
    b.load_state_dict({"step": 7})
    assert all(np.array_equal(x, y) for x, y in zip(first[7:], (b.sample() for _ in range(13))))
    for step, idx in enumerate(first):
        assert (arrays.n_segments[idx] <= a.limit(step)).all()
    assert a.limit(0) < a.limit(19) == int(arrays.n_segments.max())
    other = CurriculumSampler(arrays.n_segments, pool, 8, 4, stream=1, total_steps=20)
    assert not all(np.array_equal(x, other.indices(i)) for i, x in enumerate(first))
