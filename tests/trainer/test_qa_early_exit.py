"""Early exit: the reader encodes one segment at a time, drops an example from the batch
when it halts, and answers exactly as the simulated read (every segment read, the halt
worked out after) does."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.segments.store import SegmentStore
from trainer.qa.data import QAArrays, collate
from trainer.qa.runner import QAEvaluator, QASettings

from .test_qa_data import arrays, store, tiny_reader  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plain_answer(
    model: Any,
    qa: QAArrays,
    example: int,
    halt_threshold: float,
    answer_threshold: float,
) -> tuple[int, int, int]:
    """(segments read, start, end) of one example, reading it alone with the full read and
    walking its segments in a plain loop."""
    b = collate(qa, np.array([example]))
    with torch.no_grad():
        out = model.read(b)
    n = int(b.n_segments[0])
    best, ans = float("-inf"), (-1, -1)
    for t in range(n):
        m = float(out.margin[0, t])
        if m >= best:
            best = m
            off = int(b.token_offset[0, t]) - int(b.context_start[0, t])
            ans = (int(out.span_start[0, t]) + off, int(out.span_end[0, t]) + off)
        if t < n - 1 and float(torch.sigmoid(out.halt_logit[0, t])) > halt_threshold:
            break
    if best <= answer_threshold:
        ans = (-1, -1)
    return t + 1, ans[0], ans[1]


def spread_halting(model: Any, batch: Any, quantile: float | None) -> float:
    """Widen the halting head's outputs and return the threshold at ``quantile`` of its
    probabilities over the batch's decisions (None: 1.0, never halt)."""
    with torch.no_grad():
        model.halt_head[-1].weight.mul_(40.0)
        if quantile is None:
            return 1.0
        out = model.read(batch)
        t = torch.arange(out.halt_logit.shape[1])[None]
        can = t < (batch.n_segments[:, None] - 1)
        return float(torch.quantile(torch.sigmoid(out.halt_logit[can]), quantile))


@pytest.mark.parametrize(
    ("quantile", "reads_memory", "answer_threshold"),
    [(0.5, False, 0.0), (0.7, True, 0.0), (0.3, False, "median"), (None, False, 0.0)],
)
def test_early_exit_answers_as_the_plain_per_example_loop(
    store: SegmentStore,  # noqa: F811
    arrays: QAArrays,  # noqa: F811
    quantile: float | None,
    reads_memory: bool,
    answer_threshold: float | str,
) -> None:
    torch.manual_seed(0)
    model = tiny_reader(store, halt_reads_memory=reads_memory).eval()
    model.reset_policy(0.0)
    examples = np.arange(arrays.n_examples)
    batch = collate(arrays, examples)
    thr = spread_halting(model, batch, quantile)
    if answer_threshold == "median":  # some answers kept, some refused
        with torch.no_grad():
            m = model.read(batch).margin
        answer_threshold = float(m[torch.isfinite(m)].median())
    assert isinstance(answer_threshold, float)
    encoded = {"rows": 0}
    encode = model.encode

    def counting(ids: torch.Tensor, *a: Any) -> Any:
        encoded["rows"] += int(ids.shape[0])
        return encode(ids, *a)

    model.encode = counting  # type: ignore[method-assign]
    ee = model.read_early_exit(batch, thr, answer_threshold)
    model.encode = encode  # type: ignore[method-assign]
    got = {
        int(e): (int(r), int(s), int(t))
        for e, r, s, t in zip(batch.example_index, ee.n_read, ee.start, ee.end)
    }
    expect = {int(e): plain_answer(model, arrays, int(e), thr, answer_threshold) for e in examples}
    assert got == expect
    # only the segments read were encoded
    assert encoded["rows"] == int(ee.n_read.sum())
    n_read = np.array([v[0] for v in got.values()])
    n_seg = arrays.n_segments[list(got)]
    if quantile is None:
        assert (n_read == n_seg).all()  # never halts: reads everything
    else:
        assert (n_read < n_seg).any() and (n_read > 1).any()  # halts early, and late
    starts = [v[1] for v in got.values()]
    if answer_threshold != 0.0:
        assert min(starts) == -1 and max(starts) >= 0


def test_evaluation_reads_with_early_exit_and_times_both_paths(
    store: SegmentStore,  # noqa: F811
    arrays: QAArrays,  # noqa: F811
) -> None:
    torch.manual_seed(1)
    model = tiny_reader(store)
    model.reset_policy(0.0)
    thr = spread_halting(model, collate(arrays, np.arange(arrays.n_examples)), 0.5)
    settings = QASettings(eval_batch_size=8, halt_threshold=thr)
    ev = QAEvaluator(store, arrays, np.arange(arrays.n_examples), settings, torch.device("cpu"))
    row = ev(model, halting=True)
    assert row["eval/early_exit_agreement"] == 1.0
    assert row["eval/ms_per_question"] > 0 and row["eval/full_ms_per_question"] > 0
    assert row["eval/time_fraction"] > 0
    reads = ev.read(model, True)
    model.eval()
    b = collate(arrays, reads.example)
    ee = model.read_early_exit(b, thr, settings.answer_threshold)
    alone = dict(zip(b.example_index.tolist(), ee.n_read.tolist()))
    assert reads.n_read.tolist() == [alone[e] for e in reads.example.tolist()]
    assert row["eval/fraction_read"] == pytest.approx(
        float(np.mean(reads.n_read / reads.n_segments))
    )
    assert row["eval/fraction_read"] < 1.0


def test_answer_cli_segments_a_document_as_the_store_did_and_answers_as_evaluation(
    tmp_path: Any, capsys: Any
) -> None:
    """A document and question of the store, given as plain text to the answer CLI: the same
    segments read, span and margin as the early-exit read of the store's example."""
    from pipeline.segments.store import open_segment_store
    from trainer.qa.answer import Reader, main
    from trainer.train import main as train_main

    from .test_qa_data import build_tiny_store
    from .test_qa_train import CONFIG, overrides

    store_path = build_tiny_store(tmp_path / "store")
    run = tmp_path / "run"
    assert (
        train_main([str(CONFIG), *overrides(store_path, run, "stages.1.halt_bias_init=0.0")]) == 0
    )
    st = open_segment_store(store_path)
    reader = Reader(run)
    # the reader of the last stage (the one with a trained halting head), not the first's
    from trainer.checkpoint import load_checkpoint

    want_state = load_checkpoint(run / "checkpoints" / "best-hybrid.pt")["algo_state"]
    for k, v in reader.model.state_dict().items():
        assert torch.equal(v, want_state[k]), k
    qa = QAArrays.from_store(st)
    ex = st.examples
    doc = int(ex.doc_index[0])
    same_doc = [e for e in range(len(ex.doc_index)) if int(ex.doc_index[e]) == doc]
    context = st.documents.context[doc]
    questions = [st.examples.question[e] for e in same_doc]
    got = reader.answer(context, questions)
    batch = collate(qa, np.array(same_doc))
    ee = reader.model.read_early_exit(
        batch, reader.settings.halt_threshold, reader.settings.answer_threshold
    )
    want = {
        int(e): (int(r), int(s), int(t), float(m))
        for e, r, s, t, m in zip(batch.example_index, ee.n_read, ee.start, ee.end, ee.margin)
    }
    for e, a in zip(same_doc, got):
        r, s, t, m = want[e]
        assert (a.segments_read, a.start, a.end) == (r, s, t)
        assert a.margin == pytest.approx(m, rel=1e-5, abs=1e-5)
        assert a.segments == int(qa.n_segments[e])
        assert a.answer == st.answer_text(e, s, t)
    # the command line: one question, a questions file, JSON lines, one-line errors
    (tmp_path / "doc.txt").write_text(context, encoding="utf-8")
    assert (
        main([str(run), "--document", str(tmp_path / "doc.txt"), "--question", questions[0]]) == 0
    )
    text = capsys.readouterr().out
    assert questions[0] in text and f"of {got[0].segments} segments" in text
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n"
                             for i, q in enumerate(questions)))  # fmt: skip
    assert main([str(run), "--document", str(tmp_path / "doc.txt"), "--questions", str(qfile),
                 "--json", "--read-all"]) == 0  # fmt: skip
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["id"] for x in lines] == [f"q{i}" for i in range(len(questions))]
    assert all(x["segments_read"] == x["segments"] for x in lines)
    assert main([str(run), "--document", str(tmp_path / "nope.txt"), "--question", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.txt" in err


def test_halting_rules_match_a_plain_per_example_loop(
    store: SegmentStore,  # noqa: F811
    arrays: QAArrays,  # noqa: F811
) -> None:
    from trainer.qa.metrics import best_over_golds

    torch.manual_seed(2)
    model = tiny_reader(store).eval()
    model.reset_policy(0.0)
    examples = np.arange(arrays.n_examples)
    thr = spread_halting(model, collate(arrays, examples), 0.5)
    settings = QASettings(eval_batch_size=7, halt_threshold=thr)
    ev = QAEvaluator(store, arrays, examples, settings, torch.device("cpu"))
    rules = ev.halting_rules(model, n_taus=5)
    # each example alone: its margins and spans per segment, walked in plain loops
    per, p_halt = [], []
    for e in examples.tolist():
        b = collate(arrays, np.array([e]))
        with torch.no_grad():
            out = model.read(b)
        n = int(b.n_segments[0])
        off = (b.token_offset[0] - b.context_start[0]).tolist()
        per.append((e, n, out.margin[0, :n].tolist(),
                    [(int(out.span_start[0, t]) + off[t], int(out.span_end[0, t]) + off[t])
                     for t in range(n)]))  # fmt: skip
        p_halt.append(torch.sigmoid(out.halt_logit[0, :n]).tolist())

    def score(read: list[int]) -> tuple[float, float]:
        f1s, fr = [], []
        for (e, n, m, spans), h in zip(per, read):
            best, ans = float("-inf"), (-1, -1)
            for t in range(h):
                if m[t] >= best:
                    best, ans = m[t], spans[t]
            text = store.answer_text(e, *ans) if best > settings.answer_threshold else ""
            golds = [] if store.examples.is_impossible[e] else list(store.examples.answers[e])
            f1s.append(best_over_golds(text, golds)[0])
            fr.append(h / n)
        return 100 * float(np.mean(f1s)), float(np.mean(fr))

    for row in rules["first_k"][:3] + rules["first_k"][-1:]:
        f1, fr = score([min(row["k"], n) for _, n, _, _ in per])
        assert (row["f1"], row["fraction_read"]) == pytest.approx((f1, fr)), row
    assert rules["first_k"][-1]["fraction_read"] == 1.0
    for row in rules["margin"]:
        read = []
        for _, n, m, _ in per:
            best, h = float("-inf"), n
            for t in range(n):
                best = max(best, m[t])
                if best > row["tau"]:
                    h = t + 1
                    break
            read.append(h)
        f1, fr = score(read)
        assert (row["f1"], row["fraction_read"]) == pytest.approx((f1, fr)), row
    assert rules["margin"][-1]["fraction_read"] == 1.0  # the last tau: never passed
    for row in rules["learned_threshold"]:  # the policy's own halt, threshold moved
        read = []
        for (_, n, _, _), ps in zip(per, p_halt):
            passed = [t + 1 for t in range(n) if ps[t] > row["halt_threshold"]]
            read.append(passed[0] if passed else n)
        f1, fr = score(read)
        assert (row["f1"], row["fraction_read"]) == pytest.approx((f1, fr)), row
    assert rules["learned_threshold"][-1]["fraction_read"] == 1.0
    assert len({r["fraction_read"] for r in rules["learned_threshold"]}) > 2
    assert len({r["fraction_read"] for r in rules["margin"]}) > 2  # the taus spread the reads
    row = ev(model, halting=True)
    assert rules["learned"]["f1"] == pytest.approx(row["eval/f1"])
    assert rules["learned"]["fraction_read"] == pytest.approx(row["eval/fraction_read"])
