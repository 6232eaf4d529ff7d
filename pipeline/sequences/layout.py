"""Names and the version of the sequence store layout (see docs/FORMAT.md)."""

from __future__ import annotations

KIND = "sequences"
# Bump on any change to the layout or semantics of a sequence store, with a CHANGELOG entry.
FORMAT_VERSION = 1

SEQUENCES_ARROW = "sequences.arrow"
TURNS_ARROW = "turns.arrow"
ZARR_GROUP = "store.zarr"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_JSON = "tokenizer/tokenizer.json"
LAYOUT = "sequences-1"  # part of the build key: a change to how rows are made rebuilds stores
PROMPT_TURN = -1  # turn_index of the prompt's tokens
CONTEXT = 0  # label code of what the model reads but never writes
