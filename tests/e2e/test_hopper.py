"""MuJoCo locomotion logs end to end, as a user runs them: Hopper-v5 episodes rolled out
locally by ``scripts/make_mujoco_data.py``, a store built from the shipped spec with
``python -m pipeline.build``, then BC and IQL trained with ``python -m trainer.train`` from
the shipped config and evaluated online on Hopper-v5.

Everything runs as a real subprocess in a fresh working directory (the spec's and the
config's paths are relative to it). Skipped where MuJoCo is not installed
(``pip install -e ".[mujoco]"``; ``make setup`` installs it).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
SPEC = REPO / "data_specs" / "hopper-mixed.yaml"
CONFIG = REPO / "configs" / "hopper-bc-iql.yaml"
GENERATOR = REPO / "scripts" / "make_mujoco_data.py"
INSTALL = 'pip install -e ".[mujoco]"'

EPISODES = 8  # 2 standing, 2 weak, 3 wrong-torso, 1 random (split by the behaviour shares)
TIME_LIMIT = 60  # the data's: standing episodes hit it, random ones fall well before
EVAL_EPISODES = 2
EVAL_TIME_LIMIT = 50
STAGE_STEPS = 40
EVAL_EVERY = 20


def run(
    *args: str | Path | int, cwd: Path, pythonpath: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a real subprocess, with the repository importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(map(str, (*pythonpath, REPO)))
    return subprocess.run(
        [PY, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def read_arrow(path: Path) -> pa.Table:
    """An Arrow IPC table, in the file or the stream format (both are Arrow IPC)."""
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()


def healthy(obs: np.ndarray) -> bool:
    """Hopper-v5's default health check, from an observation ``[z, pitch, q_joints (3),
    velocities (6)]``: z > 0.7, |pitch| < 0.2, joint angles within +-100."""
    return bool(obs[0] > 0.7 and abs(obs[1]) < 0.2 and np.all(np.abs(obs[2:5]) < 100.0))


@dataclass(frozen=True)
class Hopper:
    work: Path  # the working directory: data/raw/hopper, stores/hopper-mixed, runs/
    episodes: list[dict[str, Any]]  # the generated lines, parsed here (not by the pipeline)
    store: Path


def generate(work: Path, seed: int = 0) -> Path:
    """A few short Hopper episodes under ``work/data/raw/hopper``; returns the log."""
    gen = run(
        GENERATOR,
        *("--out", "data/raw", "--seed", seed, "--episodes", EPISODES),
        *("--max-episode-steps", TIME_LIMIT, "--reference-episodes", 1),
        cwd=work,
    )
    assert gen.returncode == 0, gen.stderr
    assert "fell" in gen.stdout and "timed out" in gen.stdout, gen.stdout
    return work / "data" / "raw" / "hopper" / "episodes.jsonl.gz"


@pytest.fixture(scope="module")
def hopper(tmp_path_factory: pytest.TempPathFactory) -> Hopper:
    pytest.importorskip("mujoco", reason=f"MuJoCo is not installed: {INSTALL} (make setup)")
    work = tmp_path_factory.mktemp("hopper")
    with gzip.open(generate(work), "rt") as f:
        episodes = [json.loads(line) for line in f]

    build = run("-m", "pipeline.build", SPEC, "--out", "stores", cwd=work)
    assert build.returncode == 0, build.stderr
    return Hopper(work=work, episodes=episodes, store=work / "stores" / "hopper-mixed")


def test_falls_end_terminated_and_time_limits_truncated(hopper: Hopper) -> None:
    """The generator keeps gymnasium's two ends apart, and they mean what Hopper says: a
    terminated episode's final observation is unhealthy, a truncated one's is not."""
    assert len(hopper.episodes) == EPISODES
    kinds = {"terminated": 0, "truncated": 0}
    for ep in hopper.episodes:
        steps = ep["steps"]
        assert 1 <= len(steps) <= TIME_LIMIT
        assert not any(s["terminal"] or s["timeout"] for s in steps[:-1]), ep["episode"]
        terminal, timeout = steps[-1]["terminal"], steps[-1]["timeout"]
        assert terminal != timeout, ep["episode"]  # exactly one end flag
        final = np.asarray(ep["final_observation"], dtype=np.float32)
        assert final.shape == (11,) and all(len(s["observation"]) == 11 for s in steps)
        assert all(len(s["action"]) == 3 and max(map(abs, s["action"])) <= 1 for s in steps)
        # every step before the end was healthy, or the episode would have ended there
        assert all(healthy(np.asarray(s["observation"])) for s in steps)
        if timeout:
            assert len(steps) == TIME_LIMIT and healthy(final), ep["episode"]
        else:
            assert not healthy(final), ep["episode"]
        kinds["terminated" if terminal else "truncated"] += 1
    assert kinds["terminated"] > 0 and kinds["truncated"] > 0, kinds
    policies = {ep["policy"] for ep in hopper.episodes}
    assert policies == {"stand-sigma0.1", "weak", "wrong-torso", "random"}


def test_generator_is_reproducible(hopper: Hopper, tmp_path: Path) -> None:
    log = hopper.work / "data" / "raw" / "hopper" / "episodes.jsonl.gz"
    (tmp_path / "same").mkdir()
    (tmp_path / "other").mkdir()
    assert generate(tmp_path / "same").read_bytes() == log.read_bytes()
    assert generate(tmp_path / "other", seed=1).read_bytes() != log.read_bytes()
    refs = json.loads((log.parent / "reference_returns.json").read_text())["Hopper-v5"]
    assert refs["max_episode_steps"] == TIME_LIMIT
    assert refs["random"] < refs["behaviour"]  # random falls within a few dozen steps
    returns = [math.fsum(s["reward"] for s in ep["steps"]) for ep in hopper.episodes]
    assert refs["behaviour"] == pytest.approx(np.mean(returns))


def test_store_keeps_every_step_and_both_end_kinds(hopper: Hopper) -> None:
    """The store against the generated lines, episode by episode, from the Arrow files."""
    episodes = read_arrow(hopper.store / "episodes.arrow").to_pylist()
    rows = read_arrow(hopper.store / "transitions.arrow")
    obs = np.asarray(rows.column("observation").to_pylist(), dtype=np.float32)
    nxt = np.asarray(rows.column("next_observation").to_pylist(), dtype=np.float32)
    act = np.asarray(rows.column("action").to_pylist(), dtype=np.float32)
    rew = np.asarray(rows.column("reward").to_pylist(), dtype=np.float32)
    rtg = np.asarray(rows.column("return_to_go").to_pylist(), dtype=np.float64)
    term = np.asarray(rows.column("terminated").to_pylist())
    trunc = np.asarray(rows.column("truncated").to_pylist())
    steps = np.asarray(rows.column("step").to_pylist())
    gamma = yaml.safe_load(SPEC.read_text())["store"]["discount"]

    by_id = {e["episode_id"]: e for e in episodes}
    assert sorted(by_id) == sorted(ep["episode"] for ep in hopper.episodes)
    assert len(rows) == sum(len(ep["steps"]) for ep in hopper.episodes)  # no step dropped
    for ep in hopper.episodes:
        e, src = by_id[ep["episode"]], ep["steps"]
        n, s = len(src), e["start"]
        part = slice(s, s + n)
        assert e["length"] == n
        assert (e["terminated"], e["truncated"]) == (src[-1]["terminal"], src[-1]["timeout"])
        np.testing.assert_array_equal(steps[part], np.arange(n))
        want_obs = np.asarray([x["observation"] for x in src], dtype=np.float32)
        np.testing.assert_array_equal(obs[part], want_obs)
        np.testing.assert_array_equal(
            nxt[part],
            np.vstack([want_obs[1:], np.asarray(ep["final_observation"], dtype=np.float32)]),
        )
        np.testing.assert_array_equal(act[part], [x["action"] for x in src])
        np.testing.assert_array_equal(
            rew[part], np.asarray([x["reward"] for x in src], dtype=np.float32)
        )
        # one end flag, on the last row only, of the kind the log says
        assert term[part].tolist() == [False] * (n - 1) + [src[-1]["terminal"]]
        assert trunc[part].tolist() == [False] * (n - 1) + [src[-1]["timeout"]]
        assert e["return"] == pytest.approx(math.fsum(x["reward"] for x in src), rel=1e-6)
        g = 0.0
        for t in reversed(range(n)):  # plain loop: return_to_go[t] = r_t + gamma g_{t+1}
            g = src[t]["reward"] + gamma * g
            assert rtg[s + t] == pytest.approx(g, rel=1e-5, abs=1e-4)

    counts = json.loads((hopper.store / "manifest.json").read_text())["counts"]
    assert counts["episodes_terminated"] == sum(e["terminated"] for e in episodes) > 0
    assert counts["episodes_truncated"] == sum(e["truncated"] for e in episodes) > 0
    assert counts["records_quarantined"] == 0


def _train(
    hopper: Hopper, out: str, pythonpath: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """The shipped config, with tiny networks and a few dozen steps per stage."""
    small = "[32, 32]"
    return run(
        "-m",
        "trainer.train",
        CONFIG,
        f"out={out}",
        *(
            f"stages.{i}.{k}={v}"
            for i in (0, 1)
            for k, v in (("steps", STAGE_STEPS), ("batch_size", 64), ("hidden", small))
        ),  # fmt: skip
        f"stages.1.critic_hidden={small}",
        f"eval.every={EVAL_EVERY}",
        f"eval.episodes={EVAL_EPISODES}",
        f"eval.max_episode_steps={EVAL_TIME_LIMIT}",
        "checkpoint.every=40",
        "log_every=10",
        "tensorboard=false",
        cwd=hopper.work,
        pythonpath=pythonpath,
    )


def test_bc_then_iql_train_and_evaluate_on_hopper(hopper: Hopper) -> None:
    proc = _train(hopper, "runs/hopper")
    assert proc.returncode == 0, proc.stderr
    run_dir = hopper.work / "runs" / "hopper"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["store"] == "stores/hopper-mixed"
    assert resolved["eval"]["max_episode_steps"] == EVAL_TIME_LIMIT
    manifest = json.loads((hopper.store / "manifest.json").read_text())
    assert manifest["spec"]["env"]["id"] == "Hopper-v5"
    refs = yaml.safe_load(SPEC.read_text())["reference_returns"]

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    evals = [r for r in rows if r["kind"] == "eval"]
    last = 2 * STAGE_STEPS
    assert [(r["step"], r["stage"]) for r in evals] == [
        (EVAL_EVERY, "bc"),
        (STAGE_STEPS, "bc"),
        (STAGE_STEPS + EVAL_EVERY, "iql"),
        (last, "iql"),
    ]
    for r in evals:
        ret, length = r["eval/return_mean"], r["eval/length_mean"]
        assert all(math.isfinite(r[k]) for k in ("eval/return_mean", "eval/return_std"))
        # episode lengths: whole steps, at most the evaluation's time limit
        assert 1 <= length <= EVAL_TIME_LIMIT and (length * EVAL_EPISODES).is_integer()
        # Hopper's reward per step: 1 for staying healthy, plus the forward velocity, minus a
        # small control cost; it stays within about [-0.2, 1.9] for any policy
        assert -0.5 * length < ret < 2.5 * length, r
        # the two episodes start from different seeds of Hopper's reset noise
        assert r["eval/return_std"] > 0, r
        assert r["eval/normalized_score"] == pytest.approx(
            100 * (ret - refs["random"]) / (refs["expert"] - refs["random"])
        )

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_steps"] == last
    assert [(s["name"], s["steps"]) for s in summary["stages"]] == [
        ("bc", STAGE_STEPS),
        ("iql", STAGE_STEPS),
    ]
    for stage, row in zip(summary["stages"], (evals[1], evals[3])):
        for key in ("eval/return_mean", "eval/return_std", "eval/length_mean"):
            assert stage["final_eval"][key] == row[key], key
        assert stage["best_eval"]["eval/normalized_score"] >= row["eval/normalized_score"]
    assert (run_dir / "checkpoints" / "final-iql.pt").is_file()


def hide_mujoco(root: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes ``import mujoco`` fail as if absent."""
    (root / "mujoco").mkdir(parents=True)
    (root / "mujoco" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'mujoco'\")\n"
    )
    return root


def assert_install_hint(proc: subprocess.CompletedProcess[str]) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    for needle in ("Hopper-v5", "MuJoCo", INSTALL, "make setup"):
        assert needle in lines[0], (needle, lines[0])


def test_without_mujoco_evaluation_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """gymnasium's own MuJoCo import fails, as where it is not installed (this needs no
    MuJoCo): the evaluation's error says how to install it."""
    from trainer.evaluation import EvalError, make_env

    monkeypatch.setitem(sys.modules, "mujoco", None)  # `import mujoco` raises ImportError
    for name in [m for m in sys.modules if m.startswith("gymnasium.envs.mujoco")]:
        monkeypatch.delitem(sys.modules, name)  # so that gymnasium imports it again
    with pytest.raises(EvalError) as err:
        make_env({"id": "Hopper-v5"})
    for needle in ("Hopper-v5", "MuJoCo", INSTALL, "make setup"):
        assert needle in str(err.value), (needle, str(err.value))


def test_without_mujoco_the_generator_names_the_extra(tmp_path: Path) -> None:
    fake = hide_mujoco(tmp_path / "no-mujoco")
    proc = run(GENERATOR, "--out", tmp_path / "raw", cwd=tmp_path, pythonpath=(fake,))
    assert_install_hint(proc)
    assert not (tmp_path / "raw").exists()


@pytest.mark.slow
def test_without_mujoco_training_stops_with_the_install_command(
    hopper: Hopper, tmp_path: Path
) -> None:
    """The trainer checks the env before it trains: one line on stderr, no run."""
    proc = _train(hopper, "runs/no-mujoco", pythonpath=(hide_mujoco(tmp_path / "no-mujoco"),))
    assert_install_hint(proc)
    assert not (hopper.work / "runs" / "no-mujoco" / "checkpoints").exists()
