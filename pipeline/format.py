"""Names every store kind shares (see docs/FORMAT.md); each kind has its own layout module
(``pipeline/transitions/layout.py``, ``pipeline/segments/layout.py``) with its file names
and its format version."""

from __future__ import annotations

FORMAT_NAME = "offrl-store"

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
SPEC_COPY = "spec.yaml"


class StoreError(Exception):
    """A store that cannot be read or does not hold what its manifest says."""


class BuildError(Exception):
    """A build that cannot go on; the message says why and how to fix it."""
