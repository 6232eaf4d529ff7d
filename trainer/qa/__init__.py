"""The QA reader on segment stores: a memory reader that answers with a span and learns,
by REINFORCE, when it has read enough (``qa_supervised`` then ``qa_hybrid`` stages).

``python -m trainer.train CONFIG`` hands a config to :class:`trainer.qa.runner.QATrainer`
when :func:`wants_qa_runner` says so: its stages are QA stages, or its store is a segment
store (which then fails with a message naming the stages to use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import TrainConfig


def is_segment_store(path: str | Path) -> bool:
    """True when ``path`` holds a store whose manifest says ``kind: segments``."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == "segments"


def wants_qa_runner(cfg: TrainConfig) -> bool:
    """True for a config with qa_* stages or a segment store."""
    return cfg.is_qa or is_segment_store(cfg.store)
