"""Names and the version of the transition store layout (see docs/FORMAT.md)."""

from __future__ import annotations

KIND = "transitions"
# Bump on any change to the layout or semantics of a transition store, with a CHANGELOG entry.
FORMAT_VERSION = 2

TRANSITIONS_ARROW = "transitions.arrow"
EPISODES_ARROW = "episodes.arrow"
ZARR_GROUP = "store.zarr"
