"""What every exporter does first: make sure the store is one it may hand on."""

from __future__ import annotations

from pathlib import Path

from pipeline.arrowio import read_manifest
from pipeline.format import StoreError
from pipeline.store import TransitionStore, open_store
from pipeline.transitions.layout import KIND


def check_verifies(path: Path) -> None:
    """StoreError, in one line, unless the store at ``path`` verifies: an export never hands
    on data the store would not stand by."""
    from pipeline.verify import verify

    problems = verify(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(
            f"{path}: the store does not verify, so it is not exported: {problems[0]}{more}; "
            f"see `python -m pipeline.verify {path}` and rebuild with --force"
        )


def open_verified_transitions(path: Path, to: str) -> TransitionStore:
    """The transition store at ``path``, refused unless it is one and it verifies (``to``
    names the format, for the message)."""
    kind = read_manifest(path).get("kind")
    if kind != KIND:
        raise StoreError(
            f"{path}: a {kind} store; --to {to} exports transition stores "
            "(--to hf exports every kind)"
        )
    check_verifies(path)
    return open_store(path)
