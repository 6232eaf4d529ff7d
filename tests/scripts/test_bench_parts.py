"""scripts/bench_parts.py --quick: builds the same input as one file and in parts, and
prints the table of gather times (the smoke test of ``make bench``'s parts benchmark)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_parts_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_parts.py"),
            "--quick",
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "20,000 transitions" in out and "4 parts of 5,000 rows" in out
    assert "| path | single file (s) | 4 parts (s) | 4 parts / single file |" in out
    for row in ("| trainer's gather path", "| 200 gathers of 256 random rows x 7 columns"):
        assert row in out, out
    assert "target: parted / single <= 1.5x on the trainer's gather path:" in out
    parts = sorted((tmp_path / "stores" / "parted" / "transitions").glob("part-*.arrow"))
    assert len(parts) == 4 and (tmp_path / "stores" / "single" / "transitions.arrow").exists()
