"""Generate the QA demo data locally: long documents with planted facts, and questions on them.

Nothing is downloaded. Documents are slices of real English text that ships with Python
(``pydoc_data.topics``: the reference manual's topic pages, concatenated in key order and
cut into runs of 300-3000 words, log-uniformly). Into each document 1-5 FACTS are planted
at random sentence boundaries, one of three kinds, about an "<adjective> <noun>" from a
small local vocabulary::

    The secret code of the amber falcon is quillon.     What is the secret code of the amber falcon?
    The amber falcon uses the password vesper.          Which password does the amber falcon use?
    The amber falcon lives in Marrowby.                 Where does the amber falcon live?

Every planted fact gets its question (answer: the planted word, with its character offset).
About half the documents also get an UNANSWERABLE question: a fact that was not planted in
that document (often the same creature with another kind of fact, so only reading tells).
Because facts sit anywhere, how much of a document must be read to answer varies.

Written under ``--out`` (default ``data/raw/qa``), deterministically from ``--seed``:

``train-v2.0.json``, ``dev-v2.0.json``
    SQuAD v2.0 (``data[].paragraphs[].{context, qas[].{id, question, answers, is_impossible}}``),
    85% / 15% of the documents.
``jsonl/train.jsonl``, ``jsonl/dev.jsonl``
    The same records, one ``{id, title, question, context, answers, is_impossible}`` per line.

The train file ends with four deliberately bad records (an answer_start that misses its
answer, an empty context, a duplicate id, a question without text), the same in both
formats, so that the quarantine of ``python -m pipeline.build data_specs/qa-demo.yaml`` has
work to do.

Usage::

    python scripts/make_qa_demo_data.py --out data/raw/qa [--seed 0] [--docs 400]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ADJECTIVES = (
    "amber", "azure", "brave", "bronze", "crimson", "silent", "golden", "hollow", "iron",
    "jade", "lunar", "misty", "northern", "olive", "pale", "quiet", "rapid", "scarlet",
    "silver", "stormy", "tawny", "velvet", "wandering", "winter", "ancient", "bitter",
    "copper", "distant", "emerald", "frozen",
)  # fmt: skip
NOUNS = (
    "falcon", "otter", "lantern", "harbor", "violin", "badger", "beacon", "cathedral",
    "dragon", "ferry", "garden", "heron", "island", "jackal", "kettle", "lighthouse",
    "meadow", "monastery", "orchard", "panther", "quarry", "raven", "sparrow", "tower",
    "unicorn", "valley", "walrus", "windmill", "yak", "zeppelin",
)  # fmt: skip
CODES = (
    "quillon", "vesper", "marigold", "obsidian", "tamarind", "zephyr", "halcyon", "juniper",
    "sorrel", "peridot", "cobalt", "saffron", "basilisk", "nectarine", "tundra", "calypso",
    "gossamer", "pimento", "rhubarb", "sextant", "trillium", "umbra", "verdigris", "wisteria",
    "xylem", "yarrow", "zinnia", "anemone", "bergamot", "cinnabar", "damask", "ember",
    "fennel", "gardenia", "hyssop", "indigo", "jasmine", "kumquat", "lichen", "mandolin",
    "nutmeg", "oriole", "paprika", "quince", "rosemary", "sassafras", "thistle", "ukulele",
)  # fmt: skip
PLACES = (
    "Marrowby", "Eastwick", "Caldermoor", "Pennhaven", "Ostrava", "Lindqvist", "Tarragon",
    "Brightwater", "Kestrelford", "Valdoro", "Hollowmere", "Quenby", "Ravensgate", "Sunmarsh",
    "Thornbury", "Wexcombe", "Ardmore", "Bellhaven", "Dunmore", "Fairhollow",
)  # fmt: skip

# kind -> (fact template, question template, answer vocabulary); {a} {n}: the creature, {c}: answer
FACTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "code": (
        "The secret code of the {a} {n} is {c}.",
        "What is the secret code of the {a} {n}?",
        CODES,
    ),
    "password": (
        "The {a} {n} uses the password {c}.",
        "Which password does the {a} {n} use?",
        CODES,
    ),
    "home": ("The {a} {n} lives in {c}.", "Where does the {a} {n} live?", PLACES),
}
KINDS = tuple(FACTS)
MIN_WORDS, MAX_WORDS = 300, 3000
DEV_FRACTION = 0.15


@dataclass
class Doc:
    title: str
    context: str
    qas: list[dict[str, Any]] = field(default_factory=list)


def corpus_words() -> list[str]:
    """Every word of the Python reference manual's topic pages, in topic-key order."""
    from pydoc_data.topics import topics

    words: list[str] = []
    for key in sorted(topics):
        words.extend(topics[key].split())
    return words


def _boundaries(words: list[str]) -> np.ndarray:
    """Word indices that start a sentence (the previous word ends with . ! ? or :)."""
    ends = np.array([w[-1] in ".!?:" for w in words], dtype=bool)
    return np.flatnonzero(ends[:-1]) + 1


def _distractors(
    facts: list[tuple[str, str, str, str]], k: int, rng: np.random.Generator
) -> list[tuple[str, str, str, str]]:
    """``k`` facts of the same kinds as the asked ones, about near-miss creatures (one word
    of an asked creature changed), with their own answers; never a creature asked about."""
    taken = {(a, n) for _, a, n, _ in facts}
    out: list[tuple[str, str, str, str]] = []
    for _ in range(100 * k):
        if len(out) == k:
            break
        kind, adj, noun, _ = facts[int(rng.integers(len(facts)))]
        if rng.random() < 0.5:
            adj = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
        else:
            noun = NOUNS[int(rng.integers(len(NOUNS)))]
        if (adj, noun) in taken:
            continue
        taken.add((adj, noun))
        vocab = FACTS[kind][2]
        out.append((kind, adj, noun, vocab[int(rng.integers(len(vocab)))]))
    return out


def make_doc(i: int, words: list[str], rng: np.random.Generator, distractors: int = 0) -> Doc:
    """One document: a slice of the corpus with 1-5 facts planted and their questions (and
    ``distractors`` unasked facts of the same kinds about near-miss creatures)."""
    n = int(np.exp(rng.uniform(np.log(MIN_WORDS), np.log(MAX_WORDS))))
    start = int(rng.integers(0, len(words) - n))
    body = words[start : start + n]
    n_facts = int(rng.integers(1, 6))
    # distinct creatures; kinds may repeat across creatures
    pairs = rng.choice(len(ADJECTIVES) * len(NOUNS), size=n_facts, replace=False)
    facts = []
    for p in pairs.tolist():
        adj, noun = ADJECTIVES[p // len(NOUNS)], NOUNS[p % len(NOUNS)]
        kind = KINDS[int(rng.integers(len(KINDS)))]
        vocab = FACTS[kind][2]
        facts.append((kind, adj, noun, vocab[int(rng.integers(len(vocab)))]))
    asked = len(facts)
    if distractors:  # (no draw at all without them: the default data stay as they were)
        facts += _distractors(facts, distractors, rng)
        order = rng.permutation(len(facts))  # distractors anywhere, before or after
    n_facts = len(facts)
    cand = _boundaries(body)
    if len(cand) < n_facts:
        cand = np.arange(1, len(body))
    where = np.sort(rng.choice(cand, size=n_facts, replace=False))
    if distractors:
        facts = [facts[j] for j in order.tolist()]
        is_asked = [j < asked for j in order.tolist()]
    else:
        is_asked = [True] * n_facts
    pieces: list[str] = []
    answers: list[tuple[int, int]] = []  # (fact index, character start of the answer)
    pos = 0
    prev = 0
    for f, w in enumerate(where.tolist()):
        text = " ".join(body[prev:w])
        pieces.append(text + " ")
        pos += len(text) + 1
        kind, adj, noun, answer = facts[f]
        template = FACTS[kind][0]
        lead = template[: template.index("{c}")].format(a=adj, n=noun)
        sentence = template.format(a=adj, n=noun, c=answer)
        answers.append((f, pos + len(lead)))
        pieces.append(sentence + " ")
        pos += len(sentence) + 1
        prev = w
    pieces.append(" ".join(body[prev:]))
    context = "".join(pieces)
    doc = Doc(title=f"doc-{i:04d}", context=context)
    for f, at in answers:
        kind, adj, noun, answer = facts[f]
        assert context[at : at + len(answer)] == answer
        if not is_asked[f]:
            continue
        doc.qas.append(
            {
                "id": f"qa-{i:04d}-{len(doc.qas):02d}",
                "question": FACTS[kind][1].format(a=adj, n=noun),
                "answers": [{"text": answer, "answer_start": at}],
                "is_impossible": False,
            }
        )
    if rng.random() < 0.5:
        planted = {(k, a, n) for k, a, n, _ in facts}
        asked_facts = [f for f, a in zip(facts, is_asked) if a]
        for _ in range(100):
            if rng.random() < 0.5:  # a planted creature, another kind of fact
                _, adj, noun, _ = asked_facts[int(rng.integers(len(asked_facts)))]
            else:
                adj = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
                noun = NOUNS[int(rng.integers(len(NOUNS)))]
            kind = KINDS[int(rng.integers(len(KINDS)))]
            if (kind, adj, noun) not in planted:
                break
        else:
            return doc
        doc.qas.append(
            {
                "id": f"qa-{i:04d}-{len(doc.qas):02d}",
                "question": FACTS[kind][1].format(a=adj, n=noun),
                "answers": [],
                "is_impossible": True,
            }
        )
    return doc


def bad_records(first: Doc) -> list[Doc]:
    """Four records the build must quarantine, one per paragraph (same in both formats)."""
    ctx = first.context
    good = first.qas[0]
    ans = good["answers"][0]
    return [
        Doc("bad-answer-start", ctx, [{
            "id": "bad-0001", "question": good["question"], "is_impossible": False,
            "answers": [{"text": ans["text"], "answer_start": ans["answer_start"] + 3}],
        }]),
        Doc("bad-empty-context", "", [{
            "id": "bad-0002", "question": "What is the secret code of the pale yak?",
            "answers": [], "is_impossible": True,
        }]),
        Doc("bad-duplicate-id", ctx, [{
            "id": good["id"], "question": good["question"], "answers": good["answers"],
            "is_impossible": False,
        }]),
        Doc("bad-no-question", ctx, [{"id": "bad-0004", "answers": [], "is_impossible": True}]),
    ]  # fmt: skip


def to_squad(docs: list[Doc]) -> dict[str, Any]:
    return {
        "version": "v2.0",
        "data": [
            {"title": d.title, "paragraphs": [{"context": d.context, "qas": d.qas}]} for d in docs
        ],
    }


def to_jsonl(docs: list[Doc]) -> bytes:
    lines = []
    for d in docs:
        for qa in d.qas:
            rec = {"id": qa["id"], "title": d.title, "question": qa.get("question"),
                   "context": d.context, "answers": qa["answers"], "is_impossible": qa["is_impossible"]}  # fmt: skip
            if "question" not in qa:
                del rec["question"]
            lines.append(orjson.dumps(rec))
    return b"\n".join(lines) + b"\n"


def generate(n_docs: int, seed: int, distractors: int = 0) -> tuple[list[Doc], list[Doc]]:
    """(train documents, dev documents), deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    words = corpus_words()
    docs = [make_doc(i, words, rng, distractors) for i in range(n_docs)]
    n_dev = max(1, int(round(n_docs * DEV_FRACTION))) if n_docs > 1 else 0
    train, dev = docs[: n_docs - n_dev], docs[n_docs - n_dev :]
    return train + bad_records(train[0]), dev


def write(out: Path, train: list[Doc], dev: list[Doc]) -> None:
    (out / "jsonl").mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("dev", dev)):
        (out / f"{name}-v2.0.json").write_bytes(orjson.dumps(to_squad(docs)) + b"\n")
        (out / "jsonl" / f"{name}.jsonl").write_bytes(to_jsonl(docs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", default="data/raw/qa", help="output directory (default data/raw/qa)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs", type=int, default=400, help="number of documents (default 400)")
    ap.add_argument(
        "--distractors", type=int, default=0,
        help="unasked facts per document, of the asked kinds, about near-miss creatures",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.docs < 2:
        print("error: --docs must be at least 2 (one train and one dev document)", file=sys.stderr)
        return 2
    if args.distractors < 0:
        print("error: --distractors must be 0 or more", file=sys.stderr)
        return 2
    train, dev = generate(args.docs, args.seed, args.distractors)
    out = Path(args.out)
    write(out, train, dev)
    for name, docs in (("train", train), ("dev", dev)):
        qas = [qa for d in docs for qa in d.qas]
        imp = sum(qa["is_impossible"] for qa in qas)
        words = np.array([len(d.context.split()) for d in docs if d.context])
        print(
            f"{out}/{name}-v2.0.json (+ jsonl/{name}.jsonl): {len(docs)} documents, "
            f"{len(qas)} questions ({imp} unanswerable); words per document "
            f"median {int(np.median(words))}, max {int(words.max())}"
        )
    print("  train ends with 4 deliberately bad records (quarantined by the build)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
