"""Mixed precision shared by the trainers: autocast to bf16 / fp16, and fp16's gradient
scaler (``precision: fp32 | bf16 | fp16`` of a config)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from trainer.config import PRECISIONS, ConfigError, need_choice


def precision_context(
    precision: str, device: torch.device | str
) -> contextlib.AbstractContextManager[Any]:
    """Autocast to bfloat16 / float16 for ``bf16`` / ``fp16`` on ``device``; nothing for fp32."""
    need_choice("precision", precision, PRECISIONS)
    dev = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError(f"precision: fp16 needs CUDA (device is {dev.type}); use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(dev.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 on CUDA (float16 gradients underflow without it); else None."""
    if precision == "fp16" and torch.device(device).type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
