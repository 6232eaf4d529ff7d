"""The store kinds and the narrow interface each offers the command-line tools.

A kind is a subpackage of :mod:`pipeline` (``transitions``, ``segments``, ``sequences``) whose ``kind``
module provides the functions of :class:`StoreKind`. ``python -m pipeline.build``,
``pipeline.verify`` and ``pipeline.inspect`` look the kind up here by the spec's or the
manifest's ``kind`` and call those functions; adding a kind means a new subpackage and
one line in :data:`KINDS`, and touches no other kind.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, cast

from pipeline.format import StoreError
from pipeline.storage import BuildResult

# kind name -> module implementing StoreKind (imported only when that kind is used)
KINDS: dict[str, str] = {
    "transitions": "pipeline.transitions.kind",
    "segments": "pipeline.segments.kind",
    "sequences": "pipeline.sequences.kind",
}


class StoreKind(Protocol):
    """What a store kind offers ``pipeline.build`` / ``verify`` / ``inspect``."""

    def build(
        self,
        spec_path: str | Path,
        out_dir: str | Path,
        *,
        force: bool = False,
        max_bad_fraction: float | None = None,
        chunk_bytes: int = 16 << 20,
        progress: bool | None = None,
        workers: int | None = None,
    ) -> BuildResult:
        """Build (or find up to date) the store of ``spec_path`` under ``out_dir/NAME``;
        ``workers``: processes the build may use (None: the kind's default)."""
        ...

    def summary_lines(self, result: BuildResult) -> list[str]:
        """What the build command prints about ``result``."""
        ...

    def verify(self, path: str | Path) -> list[str]:
        """Problems found in the store (empty: it verifies); StoreError if unreadable."""
        ...

    def ok_line(self, path: str | Path, manifest: dict[str, Any]) -> str:
        """The one line the verify command prints for a store that verifies."""
        ...

    def describe(self, path: str | Path) -> str:
        """What the inspect command prints."""
        ...


def store_kind(name: object, where: str) -> StoreKind:
    """The implementation of kind ``name``; ``where`` names the spec or store for errors."""
    if not isinstance(name, str) or name not in KINDS:
        raise StoreError(
            f"{where}: unknown kind {name!r}; this version knows {', '.join(sorted(KINDS))}"
        )
    return cast(StoreKind, importlib.import_module(KINDS[name]))
