"""scripts/bench_ray_build.py --quick: builds the same input with both engines, in both
layouts, one file and in parts (written by the Ray workers), and prints the table (the smoke test of ``make bench``'s Ray benchmark; slow: it
starts two local Ray clusters a layout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("ray", reason="the Ray engine is an extra: pip install -e '.[ray]'")


@pytest.mark.slow
def test_bench_ray_build_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_ray_build.py"), "--quick",
         "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # non-zero: the two engines' hashes differ
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| store | local s | Ray s | Ray / local time |")
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| episode_per_line",
        "| episode_per_line, parts of 4,096",
        "| step_per_line",
        "| step_per_line, parts of 4,096",
    ]
    assert all(r.rstrip().endswith("| yes |") for r in rows[1:])
