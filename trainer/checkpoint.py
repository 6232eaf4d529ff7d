"""Checkpoints that resume a run exactly, written atomically, loadable with ``weights_only=True``.

A checkpoint is one ``torch.save`` of plain data (tensors, numbers, strings, lists, dicts):

    format, format_version       "offrl-checkpoint", 1
    step, stage_index, stage_step, stage_name, algo, stage_done
    algo_state                   the algorithm's state_dict()
    optimizers, schedulers       {name: state_dict()}
    sampler                      the sampler's state_dict()
    rng                          python, numpy, torch (and cuda) generator states
    loop                         early-stopping / best tracking, finished stages, metrics offset
    meta                         store content hash, obs_dim, action space, config
    ranks                        data-parallel runs (torchrun): per rank, its generators'
                                 states and its metrics not yet logged (rank 0 writes the
                                 file; each rank of a resumed run takes its own)

Files in ``RUN/checkpoints/``: ``step-XXXXXXXXX.pt`` (the last ``keep_last`` are kept),
``best-<stage>.pt`` (the best evaluation of each stage) and ``final-<stage>.pt`` (each
stage's last step). Every file is written to a temporary name in the same folder, flushed
to disk and renamed over the target (``os.replace``): a killed run leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "offrl-checkpoint"
CHECKPOINT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the run; the message says why."""


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as weights_only-loadable data."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)  # noqa: NPY002 - the legacy global RNG is saved on purpose
    assert isinstance(np_state, dict)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        {
            "bit_generator": nps["bit_generator"],
            "state": {"key": nps["key"].numpy().astype(np.uint32), "pos": nps["pos"]},
            "has_gauss": nps["has_gauss"],
            "gauss": nps["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - code may use the global RNG
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- files


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True`` and check its format."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a broken or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a loadable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not an {CHECKPOINT_FORMAT} file (written by trainer.train)")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format_version {ckpt.get('format_version')}, this trainer reads "
            f"{CHECKPOINT_VERSION}"
        )
    return ckpt


class CheckpointDir:
    """The ``checkpoints/`` folder of a run: periodic, best and final checkpoints."""

    def __init__(self, path: str | Path, keep_last: int) -> None:
        self.path = Path(path)
        self.keep_last = keep_last

    def step_path(self, step: int) -> Path:
        return self.path / f"step-{step:09d}.pt"

    def best_path(self, stage: str) -> Path:
        return self.path / f"best-{stage}.pt"

    def final_path(self, stage: str) -> Path:
        return self.path / f"final-{stage}.pt"

    def step_files(self) -> list[tuple[int, Path]]:
        """Periodic checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        out = []
        for p in self.path.iterdir():
            m = _STEP_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        files = self.step_files()
        return files[-1][1] if files else None

    def save_step(self, ckpt: dict[str, Any], step: int) -> Path:
        path = save_atomic(ckpt, self.step_path(step))
        self.prune()
        return path

    def prune(self) -> None:
        files = self.step_files()
        for _, p in files[: max(len(files) - self.keep_last, 0)]:
            p.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every checkpoint (a fresh start in an existing run directory)."""
        if self.path.is_dir():
            for p in self.path.glob("*.pt"):
                p.unlink()
