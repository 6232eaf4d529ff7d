"""scripts/bench_minari_import.py at a tiny size: exports a small store to Minari, imports it
back, reads it with Minari, checks that the store holds Minari's episodes, and prints the
table (the smoke test of ``make bench``'s Minari import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("minari")


def test_bench_minari_import_tiny(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_minari_import.py"), "--steps", "3000",
         "--episode-length", "300", "--rounds", "1", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "2,999 steps in 10 episodes" in out, out
    assert "| method | seconds (median) | steps/s | minari iterate / method |" in out
    for row in ("| import (`pipeline.build`", "| import's reading alone", "| minari.MinariDataset",
                "| reopen the imported store"):  # fmt: skip
        assert row in out, out
    assert "the imported store holds Minari's episodes" in out
    assert "target: import >= 3x faster than iterating with Minari:" in out
    assert (tmp_path / "stores" / "imported" / "manifest.json").is_file()
