"""``quarantine.jsonl``: one line per rejected record, in file then line order.

Records rejected while a chunk is read are written at once (chunks come in file/line
order); records rejected later, when their episode is known to be bad (step_per_line), are
deferred and merged in by one pass over their files at the end.
"""

from __future__ import annotations

import base64
import heapq
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.sources import SourceFile, read_lines
from pipeline.transitions.parse import Rejected


@dataclass
class Quarantine:
    """Rejected records: written as found (already in file/line order), plus deferred ones
    (records of rejected episodes found later) resolved by one pass over their files."""

    path: Path
    sources: list[SourceFile]
    reasons: Counter[str] = field(default_factory=Counter)
    deferred: list[tuple[int, int, str, str, str | None]] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self._fh = self.path.open("wb")

    def record(
        self,
        src: SourceFile,
        line: int,
        reason: str,
        detail: str,
        raw: bytes,
        episode_id: str | None,
    ) -> None:
        self._fh.write(_quarantine_line(src, line, reason, detail, raw, episode_id))
        self._count(src, reason)

    def _count(self, src: SourceFile, reason: str) -> None:
        self.reasons[reason] += 1
        src.quarantined += 1
        self.count += 1

    def record_all(self, src: SourceFile, rejected: Iterable[Rejected]) -> None:
        """Records of ``src`` rejected while its lines were read, in line order."""
        for r in rejected:
            self.record(src, r.line, r.reason, r.detail, r.raw, r.episode_id)

    def defer(
        self, file_idx: int, line: int, reason: str, detail: str, episode_id: str | None
    ) -> None:
        self.deferred.append((file_idx, line, reason, detail, episode_id))
        self._count(self.sources[file_idx], reason)

    def finish(self, final: Path) -> None:
        self._fh.close()
        by_file: dict[int, set[int]] = {}
        for fi, ln, *_ in self.deferred:
            by_file.setdefault(fi, set()).add(ln)
        raw: dict[tuple[int, int], bytes] = {}
        for fi, lines in by_file.items():
            for ln, text in read_lines(self.sources[fi], lines).items():
                raw[(fi, ln)] = text
        deferred = sorted(self.deferred, key=lambda r: (r[0], r[1]))
        index = {s.display: s.index for s in self.sources}

        def immediate() -> Iterator[tuple[tuple[int, int], bytes]]:
            with self.path.open("rb") as f:
                for line in f:
                    rec = orjson.loads(line)
                    yield (index[rec["file"]], rec["line"]), line

        def later() -> Iterator[tuple[tuple[int, int], bytes]]:
            for fi, ln, reason, detail, ep in deferred:
                src = self.sources[fi]
                yield (
                    (fi, ln),
                    _quarantine_line(src, ln, reason, detail, raw.get((fi, ln), b""), ep),
                )

        with final.open("wb") as out:
            for _, line in heapq.merge(immediate(), later(), key=lambda x: x[0]):
                out.write(line)
        self.path.unlink()


def _quarantine_line(
    src: SourceFile, line: int, reason: str, detail: str, raw: bytes, episode_id: str | None
) -> bytes:
    rec: dict[str, Any] = {
        "file": src.display,
        "line": line,
        "reason": reason,
        "detail": detail,
        "episode_id": episode_id,
    }
    try:
        rec["raw"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        rec["raw"] = raw.decode("utf-8", errors="replace")
        rec["raw_base64"] = base64.b64encode(raw).decode("ascii")
    return orjson.dumps(rec) + b"\n"
