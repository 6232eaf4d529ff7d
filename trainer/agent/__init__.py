"""Student training on sequence stores (``kind: sequences``): SFT / SAD with span-weighted
loss, LoRA and mixed precision, on any causal LM of ``transformers`` (:mod:`trainer.agent.runner`).

``python -m trainer.train CONFIG`` hands a config to :class:`trainer.agent.runner.AgentTrainer`
when :func:`wants_agent_runner` says so: its stages are sft stages, or its store is a
sequence store (which then fails with a message naming the stages to use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import TrainConfig


def is_sequence_store(path: str | Path) -> bool:
    """True when ``path`` holds a store whose manifest says ``kind: sequences``."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == "sequences"


def wants_agent_runner(cfg: TrainConfig) -> bool:
    """True for a config with sft stages or a sequence store."""
    return cfg.is_agent or is_sequence_store(cfg.store)
