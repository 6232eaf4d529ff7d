"""Checkpoints: RNG round trips, atomic writes, keep-last-k, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.trainer.test_train import (
    CLOCK_KEYS,
    assert_same_state,
    tiny_config,
    write_config,
    write_store,
)
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
from trainer.train import main

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


# Runs trainer.train and SIGKILLs itself right after the first training-metrics row at a
# global step >= argv[1] has reached the disk: a kill between two checkpoints, with rows the
# resumed run must cut back. Nothing else differs from ``python -m trainer.train``.
KILL_DRIVER = """
import os, signal, sys
from trainer.logging import MetricsWriter
from trainer.train import main
kill_at = int(sys.argv[1])
write = MetricsWriter.write
def write_then_die(self, row):
    write(self, row)
    if row.get("kind") == "train" and row["step"] >= kill_at:
        self.offset()  # flush the rows written since the last checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
MetricsWriter.write = write_then_die
sys.exit(main(sys.argv[2:]))
"""


def start_killed_training(argv: list[str], kill_at: int) -> subprocess.Popen[str]:
    """``python -m trainer.train ARGV`` in a fresh process that SIGKILLs itself at ``kill_at``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", KILL_DRIVER, str(kill_at), *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def train_here(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``trainer.train`` in this process (the CLI's entry point); its stderr."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def comparable_rows(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in CLOCK_KEYS} for r in rows]


def assert_same_run(full: Path, resumed: Path) -> None:
    """Every checkpoint file of both runs holds the same state bit for bit (models,
    optimizers, LR schedulers, sampler, RNG, loop bookkeeping), and the metrics read alike."""
    names = sorted(p.name for p in (full / "checkpoints").glob("*.pt"))
    assert names == sorted(p.name for p in (resumed / "checkpoints").glob("*.pt"))
    for name in names:
        a = torch.load(full / "checkpoints" / name, weights_only=True)
        b = torch.load(resumed / "checkpoints" / name, weights_only=True)
        assert_same_state(a, b, name)
    assert comparable_rows(full) == comparable_rows(resumed)
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((resumed / "summary.json").read_text())
    for x, y in zip(sa["stages"], sb["stages"]):
        for key in ("final_eval", "best_eval"):
            assert_same_state(x[key], y[key], f"summary {key}")


def test_sigkill_then_resume_is_bit_for_bit_the_uninterrupted_run(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real process killed with SIGKILL inside the CQL stage, between two checkpoints,
    resumes (here) to the same bits as a run never interrupted (here, meanwhile)."""
    raw = tiny_config(store, tmp_path / "unused", tensorboard=False, log_every=3)
    raw["stages"] = [
        {"algo": "bc", "steps": 10, "batch_size": 16, "hidden": [16]},
        # CQL draws random actions every step: the torch RNG must be restored exactly too.
        {
            "algo": "cql",
            "steps": 30,
            "init": "bc",
            "batch_size": 16,
            "lr_schedule": "cosine",
            "hidden": [16],
            "critic_hidden": [16],
            "n_action_samples": 2,
        },
    ]
    raw["eval"] = {"every": 10, "episodes": 1, "val_transitions": 32}
    # log_every 3 does not divide checkpoint.every 8: pending metrics cross the resume
    raw["checkpoint"] = {"every": 8, "keep_last": 10}
    cfg = str(write_config(tmp_path / "c.yaml", raw))
    full, killed = tmp_path / "full", tmp_path / "killed"

    # killed after the row of CQL stage step 21 (global 31): the last checkpoint is step 16
    victim = start_killed_training([cfg, f"out={killed}"], kill_at=31)
    train_here([cfg, f"out={full}"], capsys)
    code, err = finish(victim)
    assert code == -signal.SIGKILL, err
    steps = sorted(int(p.name[5:-3]) for p in (killed / "checkpoints").glob("step-*.pt"))
    assert steps[-1] == 26 and not (killed / "checkpoints" / "final-cql.pt").exists()
    assert max(r["step"] for r in comparable_rows(killed)) == 31  # rows past the checkpoint

    err = train_here([cfg, f"out={killed}", "--resume"], capsys)
    assert "resuming" in err and "step-000000026.pt" in err
    assert_same_run(full, killed)
    final = torch.load(full / "checkpoints" / "final-cql.pt", weights_only=True)
    assert final["step"] == 40 and final["schedulers"]  # the LR schedulers were compared too
    assert set(final["schedulers"]) == set(final["optimizers"])


def test_resumed_d3rlpy_stage_keeps_its_lr_schedule(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """d3rlpy's own LR scheduler (a cosine schedule of the actor) goes on where it stopped."""
    from trainer.config import config_from_dict
    from trainer.d3rlpy_adapter import D3rlpyAlgorithm
    from trainer.loop import Interrupted, Trainer

    enc = {"hidden_units": [16]}
    cosine = {"lr_scheduler_factory": {"type": "cosine_annealing", "params": {"T_max": 12}}}

    def config(out: Path) -> Any:
        raw = tiny_config(store, out, tensorboard=False, log_every=4)
        raw["stages"] = [
            {
                "algo": "d3rlpy.IQL",
                "steps": 12,
                "batch_size": 16,
                "actor_optim_factory": cosine,
                **{f"{k}_encoder_factory": enc for k in ("actor", "critic", "value")},
            }
        ]
        raw["eval"] = {"every": 0, "episodes": 0, "val_transitions": 32}
        raw["checkpoint"] = {"every": 4, "keep_last": 10}
        return config_from_dict(raw)

    Trainer(config(tmp_path / "full"), log=lambda m: None).run()
    update = D3rlpyAlgorithm.update

    def update_then_signal(self: D3rlpyAlgorithm, batch: Any) -> Any:
        out = update(self, batch)
        if self.algo.grad_step == 7:  # a stop signal between two checkpoints
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(D3rlpyAlgorithm, "update", update_then_signal)
    with pytest.raises(Interrupted):
        Trainer(config(tmp_path / "cut"), log=lambda m: None).run()
    monkeypatch.setattr(D3rlpyAlgorithm, "update", update)
    Trainer(config(tmp_path / "cut"), resume=True, log=lambda m: None).run()

    a = torch.load(tmp_path / "full" / "checkpoints" / "final-d3rlpy.IQL.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "final-d3rlpy.IQL.pt", weights_only=True)
    lr = a["optimizers"]["actor_optim"]["param_groups"][0]["lr"]
    assert lr < 1e-5  # the cosine schedule ran its course: 3e-4 at step 0, ~0 at T_max
    assert b["optimizers"]["actor_optim"]["param_groups"][0]["lr"] == lr
    assert_same_state(a, b)
