"""Input files: globbing, transparent decompression, hashing, and line-aligned chunks.

A chunk is a run of whole lines (at most ``chunk_bytes`` plus one line) with the 1-based
number of its first line, so every record keeps its exact ``file:line`` for quarantine.
The raw (possibly compressed) bytes are hashed while they are read: one pass per file.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from pipeline.format import BuildError

T = TypeVar("T")

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".ndjson", ".gz", ".zst")


@dataclass
class SourceFile:
    """One input file and what the build learned about it."""

    index: int  # position in the sorted list of inputs
    path: Path
    display: str  # the path as the user would write it (relative to cwd if possible)
    size: int
    mtime_ns: int
    sha256: str | None = None  # filled while reading
    records: int = 0  # non-blank lines read
    quarantined: int = 0
    blank_lines: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def manifest_entry(self, **extra: Any) -> dict[str, Any]:
        """What a manifest records of this input (``extra`` keys first, e.g. its format)."""
        return {
            "path": self.display,
            **extra,
            "sha256": self.sha256,
            "bytes": self.size,
            "mtime_ns": self.mtime_ns,
            "records": self.records,
            "records_kept": self.records - self.quarantined,
            "records_quarantined": self.quarantined,
            "blank_lines": self.blank_lines,
        }


def _display(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p.resolve())


def resolve_sources(
    patterns: tuple[str, ...] | list[str], origin: str = "spec"
) -> list[SourceFile]:
    """Expand globs (sorted, de-duplicated); a pattern that matches nothing is an error."""
    seen: dict[Path, None] = {}
    for pat in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise BuildError(
                f"{origin}: source.paths: {pat!r} matches no file (paths are relative to "
                f"the working directory {Path.cwd()}); generate the data first or fix the glob"
            )
        for f in files:
            seen.setdefault(f.resolve(), None)
    out: list[SourceFile] = []
    for i, p in enumerate(sorted(seen, key=lambda q: _display(q))):
        st = p.stat()
        out.append(SourceFile(i, p, _display(p), st.st_size, st.st_mtime_ns))
    return out


class _HashingReader(io.RawIOBase):
    """Wraps a binary file, hashing every byte read from it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hasher = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.hasher.update(data)
        return n

    def read_rest(self) -> None:
        while self._raw.read(1 << 20):
            pass


def _open_decoded(path: Path, raw: Any) -> Any:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith(".zst") or name.endswith(".zstd"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (of a directory source: :func:`dir_sha256`)."""
    if path.is_dir():
        return dir_sha256(path)
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def dir_sha256(root: Path, files: list[Path] | None = None) -> str:
    """sha256 of a directory source (a Minari dataset): over every file under ``root/data``
    (or ``root``), in order of relative path, each file's path, size and bytes (``files``:
    that listing, when the caller has it)."""
    data = root / "data" if (root / "data").is_dir() else root
    if files is None:
        files = [p for p in data.rglob("*") if p.is_file()]
    files = sorted(files, key=lambda p: p.relative_to(data).as_posix())
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(data).as_posix().encode()
        h.update(len(rel).to_bytes(4, "little") + rel + f.stat().st_size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _split_lines(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10).astype(np.int64)
    starts = np.empty_like(ends)
    if len(ends):
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
    return starts, ends


@dataclass
class Chunk:
    """A run of whole lines of one input file (what a worker process is sent).

    Where each line starts and ends is found when first asked for, unless the reader
    already knows it."""

    data: bytes  # whole lines, each ending in b"\n" (one is added to a last line without it)
    first_line: int  # 1-based line number of the first line in ``data``
    _bounds: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def starts(self) -> np.ndarray:
        """(L,) int64 byte offset of each line in ``data``."""
        return self._lines()[0]

    @property
    def ends(self) -> np.ndarray:
        """(L,) int64 byte offset of each line's ``\n``."""
        return self._lines()[1]

    def _lines(self) -> tuple[np.ndarray, np.ndarray]:
        if self._bounds is None:
            self._bounds = _split_lines(self.data)
        return self._bounds

    @property
    def n_lines(self) -> int:
        return self.data.count(b"\n") if self._bounds is None else len(self._bounds[0])

    def line(self, i: int) -> bytes:
        """The i-th line (0-based in the chunk), without its newline."""
        return self.data[self.starts[i] : self.ends[i]]

    def nonblank(self) -> np.ndarray:
        """Indices of the lines that hold something besides whitespace."""
        buf = np.frombuffer(self.data, dtype=np.uint8)
        starts, ends = self.starts, self.ends
        first = buf[np.minimum(starts, len(buf) - 1)] if len(buf) else np.zeros(0, np.uint8)
        ws_first = (ends == starts) | (first == 32) | (first == 9) | (first == 13)
        keep = ~ws_first
        for i in np.flatnonzero(ws_first):  # rare: lines that start with whitespace
            keep[i] = bool(self.data[starts[i] : ends[i]].strip())
        return np.flatnonzero(keep)


def iter_chunks(src: SourceFile, chunk_bytes: int = 32 << 20) -> Iterator[Chunk]:
    """Yield line-aligned chunks of the decoded file; sets ``src.sha256`` at the end.

    Raises :class:`BuildError` if a compressed file is corrupt (its name and the error).
    """
    with src.path.open("rb") as fh:
        hashing = _HashingReader(fh)
        reader = _open_decoded(src.path, io.BufferedReader(hashing, 1 << 20))
        line_no = 1
        carry = b""
        try:
            while True:
                block = reader.read(chunk_bytes)
                if not block:
                    break
                data = carry + block
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                carry = data[cut + 1 :]
                data = data[: cut + 1]
                chunk = Chunk(data, line_no, _split_lines(data))
                yield chunk
                line_no += chunk.n_lines
        except (OSError, EOFError) as e:
            raise BuildError(
                f"{src.display}: cannot decompress ({e}); the file is corrupt or truncated"
            ) from None
        except Exception as e:  # zstandard raises its own ZstdError
            if type(e).__name__ == "ZstdError":
                raise BuildError(
                    f"{src.display}: cannot decompress ({e}); the file is corrupt or truncated"
                ) from None
            raise
        if carry:
            yield Chunk(carry + b"\n", line_no)
        hashing.read_rest()
        src.sha256 = hashing.hasher.hexdigest()


COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")


@dataclass(frozen=True)
class FileRange:
    """A run of whole lines of an uncompressed input named by its byte range: what a task
    of the Ray engine carries instead of the bytes (the worker reads them, :meth:`load`)."""

    path: str  # absolute: a worker does not run in the building process's directory
    offset: int
    length: int
    first_line: int  # 1-based line number of the first line
    n_lines: int
    newline: bool  # the range ends in b"\n" (False only for a file's unterminated last line)

    def load(self) -> Chunk:
        """The :class:`Chunk` of these bytes, as :func:`iter_chunks` would give it."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise BuildError(
                f"{self.path}: {self.length} bytes expected at offset {self.offset}, "
                f"{len(data)} read; the file changed during the build"
            )
        return Chunk(data if self.newline else data + b"\n", self.first_line)


def iter_ranges(src: SourceFile, chunk_bytes: int = 32 << 20) -> Iterator[Chunk | FileRange]:
    """Line-aligned chunks of ``src`` as :class:`FileRange` (a compressed file: as
    :class:`Chunk` from :func:`iter_chunks`), cut where :func:`iter_chunks` cuts them; one
    read that hashes the file (``src.sha256``) and counts its lines."""
    if src.path.name.lower().endswith(COMPRESSED_SUFFIXES):
        yield from iter_chunks(src, chunk_bytes)
        return
    path = str(src.path.resolve())
    h = hashlib.sha256()
    offset = 0  # of the first byte not yet in a range
    line_no = 1
    carry = 0  # bytes after the last newline, not yet in a range
    with src.path.open("rb") as fh:
        while block := fh.read(chunk_bytes):
            h.update(block)
            cut = block.rfind(b"\n")
            if cut < 0:
                carry += len(block)
                continue
            length = carry + cut + 1
            n = block.count(b"\n", 0, cut + 1)
            yield FileRange(path, offset, length, line_no, n, True)
            offset += length
            line_no += n
            carry = len(block) - cut - 1
    if carry:
        yield FileRange(path, offset, carry, line_no, 1, False)
    src.sha256 = h.hexdigest()


def as_chunk(chunk: Chunk | FileRange) -> Chunk:
    """``chunk`` itself, or the bytes of a :class:`FileRange` read into a :class:`Chunk`."""
    return chunk.load() if isinstance(chunk, FileRange) else chunk


def read_lines(src: SourceFile, wanted: set[int]) -> dict[int, bytes]:
    """Return the raw bytes of the given 1-based line numbers (one streaming pass)."""
    out: dict[int, bytes] = {}
    if not wanted:
        return out
    last = max(wanted)
    with src.path.open("rb") as fh:
        reader = _open_decoded(src.path, fh)
        stream: Any = io.BufferedReader(reader, 1 << 20) if reader is not fh else fh
        for i, line in enumerate(stream, start=1):
            if i in wanted:
                out[i] = line.rstrip(b"\n")
            if i >= last:
                break
    return out


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run ``items`` in a background thread, ``depth`` items ahead of the consumer.

    Reading, decompressing, hashing and polars parsing release the GIL, so the stages
    of the build overlap on several cores."""
    import queue
    import threading

    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("error", e))

    t = threading.Thread(target=run, name="chunk-reader", daemon=True)
    t.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        while t.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            t.join(timeout=0.05)
