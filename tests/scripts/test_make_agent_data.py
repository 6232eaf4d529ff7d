"""The agent-data generator, run as a real subprocess at a tiny scale; every recorded episode
is replayed in a fresh environment."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainer.envs import make_text_env, parse_action
from trainer.envs.textgrid import GridConfig

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_agent_data.py"
ARGS = ["--planner", "30", "--noisy", "20", "--per-file", "12"]
FILES = {
    "planner": ["planner-000.jsonl", "planner-001.jsonl", "planner-002.jsonl"],
    "noisy": ["noisy-000.jsonl", "noisy-001.jsonl"],
}
KEYS = ["id", "teacher", "seed", "task", "turns", "success", "return"]


def generate(out: Path, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("raw")
    return out, generate(out)


def records(out: Path, teacher: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for name in FILES[teacher]:
        text = (out / "agent" / name).read_text(encoding="utf-8")
        rows += [(name, json.loads(line)) for line in text.splitlines()]
    return rows


def test_files_and_summary(raw: tuple[Path, str]) -> None:
    out, stdout = raw
    assert sorted(p.name for p in (out / "agent").iterdir()) == sorted(sum(FILES.values(), []))
    assert [len(records(out, t)) for t in FILES] == [30, 20]
    lines = [len((out / "agent" / f).read_text().splitlines()) for f in FILES["planner"]]
    assert lines == [12, 12, 6]
    assert len(stdout.splitlines()) == 1
    assert "planner 30 episodes in 3 files, success 100.0%" in stdout
    assert "noisy 20 episodes in 2 files" in stdout


@pytest.mark.parametrize("teacher", ["planner", "noisy"])
def test_records_replay_in_the_environment(raw: tuple[Path, str], teacher: str) -> None:
    out, _ = raw
    rows = records(out, teacher)
    for i, (_, r) in enumerate(rows):
        assert list(r) == KEYS
        assert r["id"] == f"{teacher}-{i:06d}" and r["teacher"] == teacher
        env = make_text_env("textgrid-v0")
        assert env.reset(r["seed"]) == r["task"]
        turns = r["turns"]
        assert [t["role"] for t in turns] == ["assistant", "env"] * (len(turns) // 2)
        success = False
        for answer, obs in zip(turns[::2], turns[1::2]):
            assert list(answer) == ["role", "content", "reward"]
            assert re.fullmatch(r"<think>[^<]+</think>\n<action>\w+</action>", answer["content"])
            action = parse_action(answer["content"])
            assert action is not None
            want_obs, want_reward, done, info = env.step(action)
            assert (obs["content"], answer["reward"], obs["reward"]) == (want_obs, want_reward, 0.0)
            success = bool(info["success"])
        assert done and r["success"] == success
        assert r["return"] == pytest.approx(sum(t["reward"] for t in turns), abs=1e-12)
    wins = sum(r["success"] for _, r in rows) / len(rows)
    assert wins == 1.0 if teacher == "planner" else wins < 1.0


def test_seeds_are_distinct_and_above_the_evaluation_seeds(raw: tuple[Path, str]) -> None:
    out, _ = raw
    seeds = [r["seed"] for t in FILES for _, r in records(out, t)]
    assert len(set(seeds)) == len(seeds) == 50
    assert min(seeds) >= 1_000_000
    tasks = [r["task"] for t in FILES for _, r in records(out, t)]
    assert len(set(tasks)) == len(tasks)


def test_rerun_is_byte_identical_and_removes_stale_files(
    raw: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = raw
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "planner-009.jsonl").write_text("stale\n")
    (tmp_path / "agent" / "notes.txt").write_text("kept\n")
    generate(tmp_path)
    assert not (tmp_path / "agent" / "planner-009.jsonl").exists()
    assert (tmp_path / "agent" / "notes.txt").exists()
    for name in sum(FILES.values(), []):
        assert (tmp_path / "agent" / name).read_bytes() == (out / "agent" / name).read_bytes()


def test_another_seed_gives_other_episodes(raw: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = raw
    generate(tmp_path, "--seed", "1")
    mine = {r["task"] for _, r in records(tmp_path, "planner")}
    assert not mine & {r["task"] for _, r in records(out, "planner")}


def test_bad_arguments_fail_with_a_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--per-file", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--per-file" in proc.stderr


@pytest.mark.parametrize(
    ("spec", "teachers"), [("agent-demo", ["planner"]), ("agent-mixed", ["planner", "noisy"])]
)
def test_specs_read_these_files_with_the_env_they_were_made_with(
    spec: str, teachers: list[str]
) -> None:
    raw = yaml.safe_load((REPO / "data_specs" / f"{spec}.yaml").read_text())
    assert raw["name"] == spec and raw["kind"] == "sequences"
    names = [f"data/raw/agent/{n}" for t in FILES for n in FILES[t]]
    read = {n for n in names if any(fnmatch.fnmatch(n, g) for g in raw["source"]["paths"])}
    assert read == {f"data/raw/agent/{n}" for t in teachers for n in FILES[t]}
    env = raw["env"]
    assert env["id"] == "textgrid-v0"
    defaults = GridConfig()
    assert all(getattr(defaults, k) == v for k, v in env["kwargs"].items())
    assert raw["fields"]["spans"]["action"]["pattern"] == "<action>(.*?)</action>"
