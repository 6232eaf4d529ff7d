"""scripts/bench_minari_export.py --steps 3000: builds a small store, exports it to Minari
and records the same episodes with minari.DataCollector, checks that both datasets hold
the same episodes, and prints the table (the smoke test of ``make bench``'s Minari export)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("minari")
pytest.importorskip("jax")  # minari.DataCollector records through jax (minari[create])


def test_bench_minari_export_tiny(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_minari_export.py"),
            "--steps",
            "3000",
            "--episode-length",
            "300",
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
    assert "2,999 steps in 10 episodes" in out and "1 cut off" in out, out
    assert "| method | seconds (median) | steps/s | DataCollector / method |" in out
    for row in ("| export (`python -m pipeline.export`", "| minari.DataCollector recording"):
        assert row in out, out
    assert "both datasets read back by minari.MinariDataset hold the same episodes" in out
    assert "target: export >= 3x faster than recording:" in out
    assert (tmp_path / "export" / "exported-v0" / "data" / "metadata.json").is_file()
    assert (tmp_path / "collector" / "recorded-v0" / "data" / "metadata.json").is_file()
