"""The QA demo generator's distractors: facts of the asked kinds about near-miss creatures,
never asked about, while the default data stay as they were."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
try:
    import make_qa_demo_data as demo
finally:
    sys.path.pop(0)

FACT_RES = {kind: re.compile(t.replace(".", r"\.").replace("{a} {n}", r"(\w+) (\w+)")
                             .replace("{c}", r"(\w+)")) for kind, (t, _, _) in demo.FACTS.items()}  # fmt: skip


def planted(context: str) -> list[tuple[str, str, str, str]]:
    """(kind, adjective, noun, answer) of every fact sentence in a document, by regex."""
    out = []
    for kind, rx in FACT_RES.items():
        for m in rx.finditer(context):
            if m.group(1) in demo.ADJECTIVES and m.group(2) in demo.NOUNS:
                out.append((kind, m.group(1), m.group(2), m.group(3)))
    return out


def asked(qa: dict) -> tuple[str, str]:
    words = qa["question"].rstrip("?").split()
    pairs = [(a, n) for a, n in zip(words, words[1:]) if a in demo.ADJECTIVES and n in demo.NOUNS]
    assert len(pairs) == 1
    return pairs[0]


def test_distractors_are_unasked_near_misses_of_the_asked_kinds() -> None:
    train, dev = demo.generate(40, seed=3, distractors=3)
    n_docs = 0
    for doc in train[:-4] + dev:  # (the train file ends with 4 bad records)
        facts = planted(doc.context)
        answerable = [qa for qa in doc.qas if not qa["is_impossible"]]
        creatures = {asked(qa) for qa in answerable}
        extra = [f for f in facts if (f[1], f[2]) not in creatures]
        assert len(facts) == len(answerable) + 3
        assert len(extra) == 3
        kinds = {f[0] for f in facts if (f[1], f[2]) in creatures}
        for kind, adj, noun, _ in extra:
            assert kind in kinds  # a fact of an asked kind ...
            assert any(adj == a or noun == n for a, n in creatures)  # ... about a near miss
        for qa in doc.qas:
            if qa["is_impossible"]:  # never about a fact the document holds
                a, n = asked(qa)
                kind = next(k for k, (_, q, _) in demo.FACTS.items()
                            if q.format(a=a, n=n) == qa["question"])  # fmt: skip
                assert (kind, a, n) not in {(f[0], f[1], f[2]) for f in facts}
            else:
                ans = qa["answers"][0]
                at = ans["answer_start"]
                assert doc.context[at : at + len(ans["text"])] == ans["text"]
        n_docs += 1
    assert n_docs == 40


def test_without_distractors_the_documents_hold_only_asked_facts() -> None:
    train, dev = demo.generate(20, seed=3)
    for doc in train[:-4] + dev:
        answerable = [qa for qa in doc.qas if not qa["is_impossible"]]
        assert len(planted(doc.context)) == len(answerable)
