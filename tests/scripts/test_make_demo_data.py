"""The demo-data generator, run as a real subprocess at a tiny scale."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import zstandard

from data_specs.schema import load_spec

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_demo_data.py"
SCALE = "0.1"  # 20 CartPole episodes, 10 Pendulum episodes, 30 replays
CARTPOLE_PARTS = ("part-0.jsonl", "part-1.jsonl.gz", "part-2.jsonl")
SPECS = ("cartpole-mixed", "pendulum-mixed", "pendulum-mixed-zarr", "replay-demo")


def generate(out: Path, seed: int = 0) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--seed", str(seed), "--scale", SCALE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    generate(out)
    return out


def cartpole_lines(raw: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for name in CARTPOLE_PARTS:
        path = raw / "cartpole" / name
        data = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
        rows += [(name, json.loads(line)) for line in data.decode().splitlines()]
    return rows


def pendulum_episodes(raw: Path) -> list[dict[str, Any]]:
    data = (raw / "pendulum" / "episodes.jsonl.zst").read_bytes()
    with zstandard.ZstdDecompressor().stream_reader(data) as reader:
        text = reader.read().decode()
    return [json.loads(line) for line in text.splitlines()]


def replay_lines(raw: Path) -> list[str]:
    return (raw / "replay" / "replays.jsonl").read_text().splitlines()


def test_files_are_written_in_the_promised_layouts(raw: Path) -> None:
    assert (raw / "cartpole" / "part-1.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip
    for name in ("part-0.jsonl", "part-2.jsonl"):
        json.loads((raw / "cartpole" / name).read_text().splitlines()[0])  # plain JSONL
    zst = (raw / "pendulum" / "episodes.jsonl.zst").read_bytes()
    assert zst[:4] == b"\x28\xb5\x2f\xfd"  # zstandard frame
    refs = json.loads((raw / "reference_returns.json").read_text())
    for env_id in ("CartPole-v1", "Pendulum-v1"):
        r = refs[env_id]
        assert r["random"] < r["behaviour"] < r["expert"], (env_id, r)


def test_cartpole_episodes_are_step_per_line_and_shuffled_across_files(raw: Path) -> None:
    episodes: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for name, row in cartpole_lines(raw):
        episodes[row["ep"]].append((name, row))
    assert len(episodes) == 20
    spread = 0
    for ep_id, lines in episodes.items():
        steps = sorted((row["t"], row) for _, row in lines)
        assert [t for t, _ in steps] == list(range(len(steps))), ep_id
        rows = [row for _, row in steps]
        last = rows[-1]
        assert last["terminated"] != last["truncated"], ep_id  # exactly one
        assert not any(r["terminated"] or r["truncated"] for r in rows[:-1]), ep_id
        assert last["truncated"] == (len(rows) == 500), ep_id  # CartPole-v1's time limit
        assert len(last["final_obs"]) == 4
        assert all("final_obs" not in r for r in rows[:-1]), ep_id
        assert all(r["action"] in (0, 1) and len(r["state"]) == 4 for r in rows), ep_id
        spread += len({name for name, _ in lines}) > 1
    assert spread >= len(episodes) - 2  # only the odd very short episode sits in one file
    # Within a file the lines are shuffled too, not grouped by episode.
    first = [row["ep"] for name, row in cartpole_lines(raw) if name == "part-0.jsonl"][:50]
    assert first != sorted(first)


def test_pendulum_episodes_are_truncated_and_actions_clipped(raw: Path) -> None:
    episodes = pendulum_episodes(raw)
    assert len(episodes) == 10
    # near-expert, wrong damping, lazy, random: every behaviour has at least one episode
    assert {ep["policy"] for ep in episodes} == {
        "expert-sigma0.1",
        "wrong-damping",
        "lazy0.4",
        "random",
    }
    for ep in episodes:
        steps = ep["steps"]
        assert len(steps) == 200, ep["episode"]
        assert [s["timeout"] for s in steps] == [False] * 199 + [True]
        assert not any(s["terminal"] for s in steps)
        assert all(len(s["act"]) == 1 and -2.0 <= s["act"][0] <= 2.0 for s in steps)
        assert all(set(s["obs"]) == {"cos", "sin", "vel"} for s in steps)
        # the second, shaped reward is the pole's height: the observation's cos(theta)
        assert all(s["upright"] == s["obs"]["cos"] for s in steps)
        assert set(ep["last_obs"]) == {"cos", "sin", "vel"}
    clipped = sum(abs(s["act"][0]) == 2.0 for ep in episodes for s in ep["steps"])
    assert clipped > 0  # the noisy and swing-up actions really hit the bounds


def test_behaviour_is_mixed_quality_with_a_minority_of_good_episodes(raw: Path) -> None:
    """The best episodes are near-expert, the dataset's average is far below them."""
    refs = json.loads((raw / "reference_returns.json").read_text())

    def normalized(env_id: str, ret: float) -> float:
        r = refs[env_id]
        return 100.0 * (ret - r["random"]) / (r["expert"] - r["random"])

    returns: dict[str, float] = defaultdict(float)
    for _, row in cartpole_lines(raw):
        returns[row["ep"]] += row["reward"]
    pendulum = {ep["episode"]: sum(s["rew"] for s in ep["steps"]) for ep in pendulum_episodes(raw)}
    for env_id, rets in (("CartPole-v1", returns), ("Pendulum-v1", pendulum)):
        scores = sorted(normalized(env_id, r) for r in rets.values())
        good = [s for s in scores if s > 90.0]
        assert good and len(good) <= len(scores) // 2, (env_id, scores)  # a minority
        assert normalized(env_id, refs[env_id]["behaviour"]) < 60.0, (env_id, scores)


def test_replays_are_well_formed_except_the_deliberately_bad_lines(raw: Path) -> None:
    good: list[dict[str, Any]] = []
    bad: dict[str, dict[str, Any]] = {}
    not_json = []
    for line in replay_lines(raw):
        try:
            replay = json.loads(line)  # the stdlib reads a bare NaN
        except json.JSONDecodeError:
            not_json.append(line)
            continue
        if replay["replay_id"].startswith("bad-"):
            bad[replay["replay_id"]] = replay
        else:
            good.append(replay)
    assert len(good) == 30
    assert len(not_json) == 1
    assert set(bad) == {
        "bad-target_out_of_range",
        "bad-nan_hp",
        "bad-empty_steps",
        "bad-missing_reward",
    }
    assert any(
        s["action_type"] == 0 and s["action_target"] > 3
        for s in bad["bad-target_out_of_range"]["steps"]
    )
    assert any(
        math.isnan(h) for s in bad["bad-nan_hp"]["steps"] for h in s["observation"]["team_hp"]
    )
    assert bad["bad-empty_steps"]["steps"] == []
    assert any("reward" not in s for s in bad["bad-missing_reward"]["steps"])

    finished = cut = 0
    for replay in good:
        steps = replay["steps"]
        assert steps, replay["replay_id"]
        assert [s["observation"]["turn"] for s in steps] == list(range(len(steps)))
        for s in steps:
            assert len(s["observation"]["team_hp"]) == 6
            assert s["action_target"] in range({0: 4, 1: 6}[s["action_type"]])
        assert not any(s["done"] for s in steps[:-1])
        assert all(s["reward"] == 0.0 for s in steps[:-1])
        assert replay["total_reward"] == sum(s["reward"] for s in steps)
        if steps[-1]["done"]:
            finished += 1
            assert steps[-1]["reward"] in (1.0, -1.0)
        else:  # a cut log: no done, no reward
            cut += 1
            assert replay["total_reward"] == 0.0
    assert finished > 0 and cut > 0


def test_same_seed_same_bytes_and_other_seed_other_data(raw: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", seed=0)
    generate(tmp_path / "other", seed=1)
    files = sorted(p.relative_to(raw) for p in raw.rglob("*") if p.is_file())
    assert len(files) == 6
    for rel in files:
        assert (tmp_path / "again" / rel).read_bytes() == (raw / rel).read_bytes(), rel
    assert (tmp_path / "other" / "pendulum" / "episodes.jsonl.zst").read_bytes() != (
        raw / "pendulum" / "episodes.jsonl.zst"
    ).read_bytes()


@pytest.mark.parametrize("name", SPECS)
def test_shipped_specs_read_what_the_generator_writes(raw: Path, name: str) -> None:
    spec = load_spec(REPO / "data_specs" / f"{name}.yaml")
    for pattern in spec.source.paths:
        assert pattern.startswith("data/raw/"), pattern
        assert list(raw.glob(pattern.removeprefix("data/raw/"))), pattern
    if spec.reference_returns is not None:
        assert spec.env is not None
        # random and expert use fixed evaluation seeds, so any --seed / --scale reproduces them
        refs = json.loads((raw / "reference_returns.json").read_text())[spec.env.id]
        assert spec.reference_returns.random == pytest.approx(refs["random"], abs=0.01)
        assert spec.reference_returns.expert == pytest.approx(refs["expert"], abs=0.01)
