"""QA documents -> a segment store (``kind: segments``); see docs/FORMAT.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.format import BuildError


def build_segments(
    spec_path: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    max_bad_fraction: float | None = None,
    progress: bool | None = None,
) -> Any:
    raise BuildError(f"{spec_path}: kind: segments (QA documents) is not supported yet")


def verify_segments(path: Path) -> list[str]:
    return [f"{path}: segment stores cannot be verified by this version"]


def describe(path: Path) -> str:
    return f"{path}: a segment store (not described by this version)"
