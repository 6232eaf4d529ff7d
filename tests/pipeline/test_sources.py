"""Line-aligned chunks: blank lines are found the same on the fast path (no line is empty
or starts with whitespace) and the slow one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.sources import Chunk

LINES = st.lists(
    st.sampled_from([b"", b" ", b"\t", b"\r", b" \t ", b"\x0b", b"{}", b" {}", b"\t{}", b"x "]),
    max_size=12,
)


def blank(line: bytes) -> bool:
    """Empty, or starting with a space, tab or CR and holding only whitespace."""
    return line == b"" or (line[:1] in (b" ", b"\t", b"\r") and not line.strip())


@given(LINES)
def test_nonblank_lines(lines: list[bytes]) -> None:
    chunk = Chunk(b"".join(line + b"\n" for line in lines), first_line=1)
    assert chunk.n_lines == len(lines)
    assert chunk.nonblank().tolist() == [i for i, line in enumerate(lines) if not blank(line)]
    assert [chunk.line(i) for i in range(len(lines))] == lines
