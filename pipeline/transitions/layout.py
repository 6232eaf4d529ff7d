"""Names and the version of the transition store layout (see docs/FORMAT.md)."""

from __future__ import annotations

KIND = "transitions"
# Bump on any change to the layout or semantics of a transition store, with a CHANGELOG entry.
FORMAT_VERSION = 3

TRANSITIONS_ARROW = "transitions.arrow"
EPISODES_ARROW = "episodes.arrow"
ZARR_GROUP = "store.zarr"

# A parted arrow store (spec `store.part_rows`) holds its transitions in
# TRANSITION_PARTS/part-00000.arrow, part-00001.arrow, ... instead of TRANSITIONS_ARROW,
# and lists them in the manifest under PARTS_KEY.
TRANSITION_PARTS = "transitions"
PARTS_KEY = "transition_parts"


def part_file(index: int) -> str:
    """The store-relative path of part ``index`` (``transitions/part-00003.arrow``)."""
    return f"{TRANSITION_PARTS}/part-{index:05d}.arrow"
