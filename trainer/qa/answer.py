"""Answer questions about a document with a trained reader, reading only until it halts.

    python -m trainer.qa.answer RUN_DIR --document FILE --question "Who ...?"
    python -m trainer.qa.answer RUN_DIR --document FILE --questions questions.jsonl [--json]

The document is tokenized and cut into segments exactly as the run's store cut its own
(its tokenizer, window, stride and question length); the reader of the run's best
checkpoint (``--checkpoint final`` or a path for another) reads one segment at a time and
stops where its halting head says so (:meth:`trainer.qa.model.MemoryReader.read_early_exit`,
at the run's ``qa.halt_threshold``; ``--read-all`` reads every segment). Each question
prints its answer (empty: no answer), the segments read out of the document's, and the
margin of the answer's span over "no answer". A questions file holds one JSON object per
line with ``question`` (and optionally ``id``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import ConfigError


class AnswerError(ValueError):
    """A run, a document or a questions file that cannot be used (one line)."""


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str  # "" when the reader finds no answer
    start: int  # the answer's document tokens (inclusive), -1 for none
    end: int
    segments_read: int
    segments: int
    margin: float
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "id" or v is not None}
        return d


def run_checkpoint(run: Path, which: str = "best") -> Path:
    """The checkpoint of a QA run's last stage (``best`` or ``final``), or ``which`` as a
    path. The last stage holds the halting head the run trained."""
    if which not in ("best", "final"):
        path = Path(which)
        if not path.is_file():
            raise AnswerError(f"--checkpoint: {which} is not a file")
        return path
    from trainer.config import load_config

    try:
        names = [st.name for st in load_config(run / "config.yaml").stages]
    except (ConfigError, OSError) as e:
        raise AnswerError(f"{run}: {e}") from None
    for name in reversed(names):  # a stage the run did not reach has no checkpoint yet
        path = run / "checkpoints" / f"{which}-{name}.pt"
        if path.is_file():
            return path
    raise AnswerError(f"{run}: no {which}-STAGE.pt in {run / 'checkpoints'} (is it a QA run?)")


class Reader:
    """A trained QA run's reader and its store's segmentation, ready to answer."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best") -> None:
        import torch

        from pipeline.segments.store import open_segment_store
        from trainer.checkpoint import load_checkpoint
        from trainer.config import load_config
        from trainer.qa.model import MemoryReader, ReaderConfig
        from trainer.qa.runner import parse_settings

        run = Path(run_dir)
        if not (run / "config.yaml").is_file():
            raise AnswerError(f"{run}: not a run directory (no config.yaml)")
        try:
            cfg = load_config(run / "config.yaml")
        except ConfigError as e:
            raise AnswerError(f"{run / 'config.yaml'}: {e}") from None
        self.settings = parse_settings(cfg.qa)
        try:
            self.store = open_segment_store(cfg.store)
        except Exception as e:  # noqa: BLE001 - the store's own one-line errors
            raise AnswerError(f"{run}: its store {cfg.store} cannot be opened: {e}") from None
        ckpt = load_checkpoint(run_checkpoint(run, checkpoint))
        meta = ckpt.get("meta", {})
        if meta.get("kind") != "qa":
            raise AnswerError(f"{run}: the checkpoint is not a QA reader's")
        self.model = MemoryReader(ReaderConfig(**meta["reader"]))
        self.model.load_state_dict(ckpt["algo_state"])
        self.model.eval()
        self.device = torch.device("cpu")
        seg = self.store.manifest["segments"]
        self.window, self.stride = int(seg["max_tokens"]), int(seg["stride"])
        self.max_question = int(seg["max_question_tokens"])
        self.tokenizer = self.store.tokenizer
        from pipeline.segments.tokenizer import Specials

        sp = self.store.special_tokens
        self.specials = Specials(
            pad=int(sp["pad"] or 0), cls=int(sp["cls"] or 0), sep=int(sp["sep"] or 0),
            unk=sp.get("unk"),
        )  # fmt: skip

    def answer(
        self,
        document: str,
        questions: list[str],
        *,
        halting: bool = True,
        halt_threshold: float | None = None,
        ids: list[str | None] | None = None,
    ) -> list[Answer]:
        """Answers to ``questions`` about ``document``, read in one batch."""
        import torch

        from pipeline.segments.build import segment_example_reference
        from trainer.qa.data import QAArrays, collate

        if not document.strip():
            raise AnswerError("the document is empty")
        if not questions:
            return []
        enc = self.tokenizer.encode(document, add_special_tokens=False)
        if not enc.ids:
            raise AnswerError("the document has no token the store's tokenizer knows")
        rows: list[dict[str, Any]] = []
        first, counts = [], []
        for q in questions:
            made = segment_example_reference(
                self.tokenizer, document, q, None, None, self.window, self.stride,
                self.max_question, self.specials,
            )  # fmt: skip
            first.append(len(rows))
            counts.append(len(made))
            rows += made
        width = max(len(r["input_ids"]) for r in rows)
        ids_m = np.full((len(rows), width), self.specials.pad, dtype=np.int32)
        for i, r in enumerate(rows):
            ids_m[i, : len(r["input_ids"])] = r["input_ids"]

        def col(name: str) -> np.ndarray:
            return np.array([r[name] for r in rows], dtype=np.int32)

        n = len(questions)
        arrays = QAArrays(
            input_ids=ids_m, lengths=np.array([len(r["input_ids"]) for r in rows], np.int32),
            context_start=col("context_start"), n_segment_tokens=col("n_segment_tokens"),
            token_offset=col("token_offset"), local_start=np.full(len(rows), -1, np.int32),
            local_end=np.full(len(rows), -1, np.int32),
            segment_row=np.array(first, np.int64), n_segments=np.array(counts, np.int32),
            global_start=np.full(n, -1, np.int32), global_end=np.full(n, -1, np.int32),
            is_impossible=np.zeros(n, bool), pad_id=self.specials.pad,
        )  # fmt: skip
        batch = collate(arrays, np.arange(n))
        thr = self.settings.halt_threshold if halt_threshold is None else halt_threshold
        with torch.no_grad():
            out = self.model.read_early_exit(
                batch, thr if halting else 2.0, self.settings.answer_threshold
            )
        offsets = enc.offsets
        answers: list[Answer | None] = [None] * n
        for k, e in enumerate(batch.example_index.tolist()):
            a, b = int(out.start[k]), int(out.end[k])
            text = document[offsets[a][0] : offsets[min(b, len(offsets) - 1)][1]] if a >= 0 else ""
            answers[e] = Answer(
                question=questions[e], answer=text, start=a, end=b,
                segments_read=int(out.n_read[k]), segments=counts[e],
                margin=float(out.margin[k]), id=None if ids is None else ids[e],
            )  # fmt: skip
        return [a for a in answers if a is not None]


def _questions(args: argparse.Namespace) -> tuple[list[str], list[str | None]]:
    if args.question is not None:
        return [args.question], [None]
    path = Path(args.questions)
    if not path.is_file():
        raise AnswerError(f"--questions: {path} is not a file")
    qs: list[str] = []
    ids: list[str | None] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnswerError(f"--questions: {path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str):
            raise AnswerError(f"--questions: {path}:{i}: needs an object with a 'question' string")
        qs.append(obj["question"])
        ids.append(None if obj.get("id") is None else str(obj["id"]))
    return qs, ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m trainer.qa.answer", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("run", help="a QA run directory")
    ap.add_argument("--document", required=True, help="a UTF-8 text file")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--question", help="one question")
    group.add_argument("--questions", help="a JSONL file of {question, id?} objects")
    ap.add_argument("--checkpoint", default="best", help="best (default), final, or a path")
    ap.add_argument("--halt-threshold", type=float, default=None)
    ap.add_argument("--read-all", action="store_true", help="read every segment")
    ap.add_argument("--json", action="store_true", help="one JSON object per answer")
    args = ap.parse_args(argv)
    try:
        doc_path = Path(args.document)
        if not doc_path.is_file():
            raise AnswerError(f"--document: {doc_path} is not a file")
        try:
            document = doc_path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise AnswerError(f"--document: {doc_path} is not UTF-8 text") from None
        questions, ids = _questions(args)
        reader = Reader(args.run, args.checkpoint)
        answers = reader.answer(
            document, questions, halting=not args.read_all,
            halt_threshold=args.halt_threshold, ids=ids,
        )  # fmt: skip
    except AnswerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for a in answers:
        if args.json:
            print(json.dumps(a.to_dict()))
        else:
            shown = a.answer if a.answer else "(no answer)"
            print(
                f"{a.question}\n  answer: {shown}\n  read {a.segments_read} of {a.segments} "
                f"segments, margin {a.margin:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
