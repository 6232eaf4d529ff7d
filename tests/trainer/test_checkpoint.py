"""Checkpoints: RNG round trips, atomic writes, keep-last-k, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.trainer.test_train import SMALL, SMALL_CRITIC, tiny_config, write_config, write_store
from trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointDir,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_atomic,
    seed_everything,
    set_rng_state,
)

ROOT = Path(__file__).resolve().parents[2]


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))  # noqa: NPY002


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    seed_everything(11)
    np.random.randn()  # noqa: NPY002 - leave a cached gaussian in the legacy state
    random.gauss(0, 1)
    save_atomic({"rng": rng_state()}, tmp_path / "r.pt")
    expected = [_draws() for _ in range(3)]
    seed_everything(999)
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert [_draws() for _ in range(3)] == expected


def test_save_atomic_replaces_and_leaves_no_temporaries(tmp_path: Path) -> None:
    p = tmp_path / "ck" / "a.pt"
    save_atomic({"x": torch.ones(3)}, p)
    save_atomic({"x": torch.zeros(3)}, p)
    assert torch.equal(torch.load(p, weights_only=True)["x"], torch.zeros(3))
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.pt"]


def test_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    p = tmp_path / "a.pt"
    save_atomic({"x": torch.ones(2)}, p)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save_atomic({"bad": lambda: 0}, p)
    assert torch.equal(torch.load(p, weights_only=True)["x"], torch.ones(2))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.pt"]


def test_checkpoint_dir_keeps_the_last_k(tmp_path: Path) -> None:
    d = CheckpointDir(tmp_path, keep_last=2)
    assert d.latest() is None
    for step in (10, 20, 30, 40):
        d.save_step({"step": step}, step)
    save_atomic({"best": 1}, d.best_path("bc"))
    assert [s for s, _ in d.step_files()] == [30, 40]
    assert d.latest() == d.step_path(40)
    assert d.best_path("bc").exists()


def test_load_checkpoint_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match=f"not an {CHECKPOINT_FORMAT} file"):
        load_checkpoint(other)
    old = tmp_path / "old.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION + 1}, old)
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(old)


# --------------------------------------------------------------------------- SIGKILL resume


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("ckstore"), "pendulum", episodes=10)


def _train(cfg: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.train", str(cfg), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _comparable_rows(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in rows]


def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path: Path, store: Path) -> None:
    raw = tiny_config(store, tmp_path / "unused")
    raw["stages"] = [
        {"algo": "bc", "steps": 40, "batch_size": 32, **SMALL},
        # CQL draws random actions every step: the torch RNG must be restored exactly too.
        {
            "algo": "cql",
            "steps": 200,
            "init": "bc",
            "batch_size": 32,
            "lr_schedule": "cosine",
            **SMALL_CRITIC,
        },
    ]
    raw["eval"] = {"every": 40, "episodes": 1, "val_transitions": 64}
    raw["checkpoint"] = {"every": 25, "keep_last": 3}
    raw["log_every"] = 15  # not a divisor of checkpoint.every: pending metrics cross a resume
    raw["tensorboard"] = (
        False  # a faster start; resume of the event files is TensorBoard's purge_step
    )
    cfg = write_config(tmp_path / "c.yaml", raw)
    full, killed = tmp_path / "full", tmp_path / "killed"

    ref = _train(cfg, f"out={full}")  # the uninterrupted run, alongside the killed one
    victim = _train(cfg, f"out={killed}")
    ckdir = killed / "checkpoints"
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and victim.poll() is None:
        steps = [int(p.name[5:-3]) for p in ckdir.glob("step-*.pt")] if ckdir.is_dir() else []
        if any(s >= 65 for s in steps):  # inside the CQL stage, with its checkpoints
            victim.send_signal(signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.005)
    victim.wait(timeout=60)
    assert killed_at is not None, (
        f"the run ended before it could be killed: {victim.stderr.read() if victim.stderr else ''}"
    )
    assert victim.returncode == -signal.SIGKILL
    assert not (ckdir / "final-cql.pt").exists(), "killed too late to test a resume"

    resumed = _train(cfg, f"out={killed}", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in err
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err

    a = torch.load(full / "checkpoints" / "final-cql.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "final-cql.pt", weights_only=True)
    assert a["step"] == b["step"] == 240
    for name, mod in a["algo_state"]["modules"].items():
        for k, t in mod.items():
            torch.testing.assert_close(b["algo_state"]["modules"][name][k], t, rtol=1e-5, atol=1e-6)
    for name, opt in a["optimizers"].items():
        for pid, st in opt["state"].items():
            torch.testing.assert_close(
                b["optimizers"][name]["state"][pid]["exp_avg"], st["exp_avg"], rtol=1e-5, atol=1e-6
            )
    assert a["sampler"] == b["sampler"]
    # The metrics file reads like the uninterrupted run's (rows cut back at the checkpoint).
    ra, rb = _comparable_rows(full), _comparable_rows(killed)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-5), (x["step"], k)
            else:
                assert x[k] == y[k]
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sa["stages"][1]["best_eval"] == sb["stages"][1]["best_eval"]
