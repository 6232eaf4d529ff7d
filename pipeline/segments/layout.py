"""Names and the version of the segment store layout (see docs/FORMAT.md)."""

from __future__ import annotations

KIND = "segments"
# Bump on any change to the layout or semantics of a segment store, with a CHANGELOG entry.
FORMAT_VERSION = 1

EXAMPLES_ARROW = "examples.arrow"
SEGMENTS_ARROW = "segments.arrow"
DOCUMENTS_ARROW = "documents.arrow"
TOKENIZER_JSON = "tokenizer.json"
DATA_FILES = (DOCUMENTS_ARROW, EXAMPLES_ARROW, SEGMENTS_ARROW, TOKENIZER_JSON, "quarantine.jsonl")
NO_ANSWER = -1  # local/global answer positions where there is no answer
LAYOUT = "segments-1"  # part of the build key: a change to how rows are made rebuilds stores
