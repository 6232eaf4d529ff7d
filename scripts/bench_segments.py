"""Benchmark the segment-store build against a plain one-document-at-a-time Python loop.

    python scripts/bench_segments.py [--docs 400] [--rounds 3] [--quick]

Generates the QA demo data (``scripts/make_qa_demo_data.py``, ``--docs`` documents) in a
temporary directory and times, on the same files and with the same tokenizer:

* ``build, given tokenizer``: ``pipeline.build`` of a ``kind: segments`` spec whose
  ``tokenizer.path`` is the tokenizer a first build trained — read, validate, encode with
  ``encode_batch``, map answers and lay out rows with NumPy, write the Arrow files, hash,
  manifest (end to end, ``--force``);
* ``build, trains the tokenizer too``: the same with ``tokenizer.train``; its encode stage
  lays out the pieces of the words that training already split (no second tokenizer pass);
* per stage (the manifest's ``timings``): tokenization, and windows + answer spans;
* ``plain loop``: ``json.load`` the same files, then per document ``tokenizer.encode`` once,
  and per question ``encode`` the question, find the answer's tokens with a loop over the
  offsets and build each segment's ``input_ids`` as Python lists — the style this replaces.
  It writes nothing, so the end-to-end build is compared with less work on the loop side.

Contenders alternate in ``--rounds`` rounds (a busy machine slows them alike); the table
shows the median round, in documents/s and document tokens/s, and the speed-up over the
plain loop. The two sides are checked to make the same rows before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from make_qa_demo_data import generate, write  # noqa: E402  (scripts/ is on sys.path)

from pipeline.build import build  # noqa: E402
from pipeline.segments.store import open_segment_store  # noqa: E402

SEGMENTS = {"max_tokens": 128, "stride": 128, "max_question_tokens": 32}
ROWS = {  # key -> label, in print order
    "loop": "plain loop: json.load, encode, window, 1 by 1",
    "given": "pipeline.build, given tokenizer (writes it all)",
    "trained": "pipeline.build, trains the tokenizer too",
    "loop_tok": "plain loop: tokenizer.encode per document",
    "build_tok": "pipeline.build, given: encode_batch",
    "build_tok_trained": "pipeline.build, trained: words laid out",
    "loop_win": "plain loop: Python lists per segment",
    "build_win": "pipeline.build: NumPy gathers (segment stage)",
}
ROW_GROUP = {
    "loop": "end to end", "given": "end to end", "trained": "end to end",
    "loop_tok": "tokenize", "build_tok": "tokenize", "build_tok_trained": "tokenize",
    "loop_win": "windows + answer spans", "build_win": "windows + answer spans",
}  # fmt: skip


@dataclass
class LoopResult:
    documents: int
    tokens: int  # document tokens
    rows: int
    sample: list[Any]  # the rows of the first 50 questions
    seconds: float  # all of it
    tokenize_seconds: float  # inside tokenizer.encode


def plain_loop(files: list[Path], tok: Any, cls: int, sep: int) -> LoopResult:
    """Read, tokenize and window one document (and one question) at a time."""
    t_start = time.perf_counter()
    t_tok = 0.0
    w, s, mq = SEGMENTS["max_tokens"], SEGMENTS["stride"], SEGMENTS["max_question_tokens"]
    n_docs = n_tokens = n_rows = 0
    sample: list[Any] = []
    seen: set[str] = set()
    encoded: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
    for f in files:
        data = json.loads(f.read_text(encoding="utf-8"))
        for art in data["data"]:
            for par in art["paragraphs"]:
                context = par["context"]
                if not context.strip():
                    continue
                if context not in encoded:
                    t0 = time.perf_counter()
                    doc = tok.encode(context, add_special_tokens=False)
                    encoded[context] = (doc.ids, doc.offsets)
                    t_tok += time.perf_counter() - t0
                    n_docs += 1
                    n_tokens += len(doc.ids)
                ids, offsets = encoded[context]
                for qa in par["qas"]:
                    if qa["id"] in seen or not qa.get("question"):
                        continue
                    answers = qa["answers"][:1]
                    if not all(context.startswith(a["text"], a["answer_start"]) for a in answers):
                        continue
                    seen.add(qa["id"])
                    t0 = time.perf_counter()
                    q = tok.encode(qa["question"], add_special_tokens=False).ids[:mq]
                    t_tok += time.perf_counter() - t0
                    gs = ge = -1
                    for a in answers:
                        c0 = a["answer_start"]
                        c1 = c0 + len(a["text"])
                        for t, (cs, ce) in enumerate(offsets):
                            if ce > c0 and gs < 0:
                                gs = t
                            if cs < c1:
                                ge = t
                    rows = []
                    k = 0
                    while True:
                        off = k * s
                        seg = ids[off : off + w]
                        start = len(q) + 2
                        inside = gs >= 0 and gs >= off and ge < off + len(seg)
                        rows.append(
                            (
                                [cls, *q, sep, *seg, sep],
                                off,
                                gs - off + start if inside else -1,
                                ge - off + start if inside else -1,
                            )
                        )
                        if off + w >= len(ids):
                            break
                        k += 1
                    n_rows += len(rows)
                    if len(sample) < 50:
                        sample.append(rows)
    return LoopResult(n_docs, n_tokens, n_rows, sample, time.perf_counter() - t_start, t_tok)


def write_spec(path: Path, data: Path, tokenizer: dict[str, Any]) -> Path:
    spec = {
        "name": "bench-qa",
        "kind": "segments",
        "source": {"paths": [str(data / "*.json")], "format": "squad"},
        "tokenizer": tokenizer,
        "segments": SEGMENTS,
        "store": {"format": "arrow"},
    }
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--docs", type=int, default=400, help="documents of demo data (default 400)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    ap.add_argument("--quick", action="store_true", help="100 documents, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        args.docs, args.rounds = 100, 1
    with tempfile.TemporaryDirectory(prefix="bench-qa-") as tmp:
        t = Path(tmp)
        train, dev = generate(args.docs, seed=0)
        write(t / "data", train, dev)
        out = t / "stores"
        trained_spec = write_spec(t / "trained.yaml", t / "data", {"train": {"vocab_size": 8000}})
        first = build(trained_spec, out, force=True, progress=False)
        tok_path = t / "tokenizer.json"
        tok_path.write_bytes((first.path / "tokenizer.json").read_bytes())
        given_spec = write_spec(t / "given.yaml", t / "data", {"path": str(tok_path)})
        store = open_segment_store(build(given_spec, out, force=True, progress=False).path)
        tok = store.tokenizer
        sp = store.special_tokens
        files = sorted((t / "data").glob("*.json"))
        cls, sep = int(sp["cls"] or 0), int(sp["sep"] or 0)
        ref = plain_loop(files, tok, cls, sep)
        c = store.manifest["counts"]
        docs, tokens, rows = c["documents"], c["document_tokens"], c["segments"]
        # the same work on both sides
        assert (ref.documents, ref.tokens, ref.rows) == (docs, tokens, rows), (ref, c)
        sg = store.segments
        for e, want in enumerate(ref.sample):
            for k, (ids, off, ls, le) in enumerate(want):
                r = int(store.examples.segment_row[e]) + k
                got = sg.input_values[sg.input_offsets[r] : sg.input_offsets[r + 1]].tolist()
                assert got == ids and (sg.token_offset[r], sg.local_start[r], sg.local_end[r]) == (
                    off, ls, le,
                )  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in ROWS}
        for _ in range(args.rounds):
            loop = plain_loop(files, tok, cls, sep)
            times["loop"].append(loop.seconds)
            times["loop_tok"].append(loop.tokenize_seconds)
            times["loop_win"].append(loop.seconds - loop.tokenize_seconds)
            res = build(given_spec, out, force=True, progress=False)
            times["given"].append(res.seconds)
            times["build_tok"].append(res.manifest["timings"]["encode"])
            times["build_win"].append(res.manifest["timings"]["segment"])
            res = build(trained_spec, out, force=True, progress=False)
            times["trained"].append(res.seconds)
            times["build_tok_trained"].append(res.manifest["timings"]["encode"])
    print(
        f"segment store build: {docs} documents, {tokens} document tokens, {c['examples']} "
        f"questions -> {rows} rows (max_tokens 128, stride 128); median of {args.rounds} round(s)"
    )
    print(f"{'':<50} {'seconds':>8} {'documents/s':>12} {'tokens/s':>11} {'vs loop':>8}")
    for group, base in (
        ("end to end", "loop"),
        ("tokenize", "loop_tok"),
        ("windows + answer spans", "loop_win"),
    ):
        print(f"{group}")
        ref_s = statistics.median(times[base])
        for key, label in ROWS.items():
            if ROW_GROUP[key] != group:
                continue
            sec = statistics.median(times[key])
            print(
                f"  {label:<48} {sec:>8.3f} {docs / sec:>12.0f} {tokens / sec:>11.0f} "
                f"{ref_s / sec:>7.1f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
