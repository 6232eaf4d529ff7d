"""SQuAD F1 / exact match, and the token-span F1 that rewards a halting episode."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.qa.metrics import best_over_golds, exact_match, f1, normalize_answer, span_f1


def test_normalisation_follows_squad() -> None:
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theory") == "theory"  # 'the' only as a word
    assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0


def test_f1_on_words() -> None:
    assert f1("Denver Broncos", "Denver Broncos") == 1.0
    assert math.isclose(
        f1("the Broncos of Denver", "Denver Broncos"), 2 * (2 / 3) * 1 / (2 / 3 + 1)
    )
    assert f1("Carolina", "Denver Broncos") == 0.0
    assert f1("a a b", "a b b") == 2 * (2 / 3) * (2 / 3) / (4 / 3)  # counts, not sets


def test_unanswerable_and_empty_answers() -> None:
    assert best_over_golds("", []) == (1.0, 1.0)
    assert best_over_golds("quillon", []) == (0.0, 0.0)
    assert best_over_golds("", ["quillon"]) == (0.0, 0.0)
    assert best_over_golds("Marrowby", ["in Marrowby", "Marrowby"]) == (1.0, 1.0)


def reference_span_f1(ps: int, pe: int, gs: int, ge: int) -> float:
    pred = set(range(ps, pe + 1)) if ps >= 0 else set()
    gold = set(range(gs, ge + 1)) if gs >= 0 else set()
    if not pred or not gold:
        return float(pred == gold)
    common = len(pred & gold)
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


spans = st.one_of(
    st.just((-1, -1)),
    st.tuples(st.integers(0, 20), st.integers(0, 6)).map(lambda x: (x[0], x[0] + x[1])),
)


@given(st.lists(st.tuples(spans, spans), min_size=1, max_size=20))
@settings(max_examples=100, deadline=None)
def test_span_f1_equals_the_set_reference(pairs: list) -> None:
    t = torch.tensor([[p[0], p[1], g[0], g[1]] for p, g in pairs])
    got = span_f1(t[:, 0], t[:, 1], t[:, 2], t[:, 3])
    for row, (p, g) in zip(got.tolist(), pairs):
        assert math.isclose(row, reference_span_f1(*p, *g), abs_tol=1e-6)
