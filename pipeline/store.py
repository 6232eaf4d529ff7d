"""The public reader of transition stores: ``open_store(path)`` and the types it hands out.

The implementation lives in :mod:`pipeline.transitions.store`; this module is the stable
import path (``from pipeline.store import open_store``) that scripts and the trainer use.
"""

from __future__ import annotations

from pipeline.arrowio import column_to_numpy, read_manifest
from pipeline.transitions.parts import Column, PartedColumn
from pipeline.transitions.store import ActionSpace, Episodes, TransitionStore, open_store

__all__ = [
    "ActionSpace",
    "Column",
    "Episodes",
    "PartedColumn",
    "TransitionStore",
    "column_to_numpy",
    "open_store",
    "read_manifest",
]
