"""Names and the version of the on-disk store format (see docs/FORMAT.md)."""

from __future__ import annotations

FORMAT_NAME = "offrl-store"
# Bump on any change to the layout or semantics of a store, with a CHANGELOG entry.
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
TRANSITIONS_ARROW = "transitions.arrow"
EPISODES_ARROW = "episodes.arrow"
QUARANTINE = "quarantine.jsonl"
ZARR_GROUP = "store.zarr"
SPEC_COPY = "spec.yaml"

# Data files of an arrow / zarr store, in the order the content hash reads them.
ARROW_DATA_FILES = (TRANSITIONS_ARROW, EPISODES_ARROW, QUARANTINE)


class StoreError(Exception):
    """A store that cannot be read or does not hold what its manifest says."""


class BuildError(Exception):
    """A build that cannot go on; the message says why and how to fix it."""
