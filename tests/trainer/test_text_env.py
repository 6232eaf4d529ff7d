"""textgrid-v0 and its teachers, held against a plain re-implementation of the rules.

The reference below reads the map off the prompt's text (not the env's internals), tracks
the agent itself, and recomputes open moves, the planner rule, rewards and BFS distances
with plain loops.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import deque
from dataclasses import dataclass

import pytest

from trainer.config import ConfigError
from trainer.envs import make_teacher, make_text_env, parse_action, run_episode

ENV = "textgrid-v0"
SEEDS = range(200)
STEP, BUMP, GOAL = -0.05, -0.2, 1.0
ANSWER = re.compile(r"<think>(.*)</think>\n<action>(up|down|left|right)</action>")
STATE = re.compile(r"at (\d),(\d) goal (\d),(\d); open:((?: \w+)*)$")


@dataclass
class Ref:
    """The map as the prompt draws it."""

    size: int
    walls: set[tuple[int, int]]
    start: tuple[int, int]
    goal: tuple[int, int]


def read_map(prompt: str) -> Ref:
    rows = [line for line in prompt.splitlines() if line and set(line) <= set(".#AG")]
    assert rows and all(len(r) == len(rows) for r in rows), prompt
    walls, start, goal = set(), None, None
    for r, line in enumerate(rows):
        for c, ch in enumerate(line):
            if ch == "#":
                walls.add((r, c))
            elif ch == "A":
                start = (r, c)
            elif ch == "G":
                goal = (r, c)
    assert start is not None and goal is not None
    return Ref(len(rows), walls, start, goal)


def ref_next(pos: tuple[int, int], move: str) -> tuple[int, int]:
    r, c = pos
    if move == "up":
        return (r - 1, c)
    if move == "down":
        return (r + 1, c)
    if move == "left":
        return (r, c - 1)
    return (r, c + 1)


def ref_free(m: Ref, cell: tuple[int, int]) -> bool:
    return 0 <= cell[0] < m.size and 0 <= cell[1] < m.size and cell not in m.walls


def ref_open(m: Ref, pos: tuple[int, int]) -> list[str]:
    return [mv for mv in ("up", "down", "left", "right") if ref_free(m, ref_next(pos, mv))]


def ref_rule(pos: tuple[int, int], goal: tuple[int, int], open_: list[str]) -> str:
    vert = "down" if goal[0] > pos[0] else "up" if goal[0] < pos[0] else None
    horiz = "right" if goal[1] > pos[1] else "left" if goal[1] < pos[1] else None
    if vert is not None and vert in open_:
        return vert
    if horiz is not None and horiz in open_:
        return horiz
    for mv in ("right", "down", "left", "up"):
        if mv in open_:
            return mv
    return "up"


def ref_think(pos: tuple[int, int], goal: tuple[int, int], open_: list[str], move: str) -> str:
    row = col = "stay"
    if goal[0] != pos[0]:
        row = f"{'down' if goal[0] > pos[0] else 'up'} {abs(goal[0] - pos[0])}"
    if goal[1] != pos[1]:
        col = f"{'right' if goal[1] > pos[1] else 'left'} {abs(goal[1] - pos[1])}"
    moves = "".join(" " + mv for mv in open_)
    return (
        f"row {pos[0]} to {goal[0]}: {row}; col {pos[1]} to {goal[1]}: {col}; "
        f"open:{moves}; go {move}"
    )


def bfs(m: Ref) -> int:
    dist = {m.start: 0}
    queue = deque([m.start])
    while queue:
        cell = queue.popleft()
        for mv in ("up", "down", "left", "right"):
            nxt = ref_next(cell, mv)
            if ref_free(m, nxt) and nxt not in dist:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    return dist[m.goal]


def state_of(text: str) -> tuple[tuple[int, int], tuple[int, int], list[str]]:
    m = STATE.search(text.splitlines()[-1].removesuffix("; out of turns"))
    assert m is not None, text
    r, c, gr, gc = (int(m.group(i)) for i in range(1, 5))
    return (r, c), (gr, gc), m.group(5).split()


def check_episode(seed: int, teacher: str) -> tuple[dict, Ref, int]:
    """Play one teacher episode and check every turn against the reference; returns the
    episode, the map and how many of the teacher's moves broke the planner rule."""
    env = make_text_env(ENV)
    ep = run_episode(env, make_teacher(ENV, teacher, seed).act, seed)
    m = read_map(ep["prompt"])
    pos = m.start
    assert state_of(ep["prompt"]) == (pos, m.goal, ref_open(m, pos))
    turns = ep["turns"]
    assert [t["role"] for t in turns] == ["assistant", "env"] * (len(turns) // 2)
    assert 1 <= len(turns) // 2 <= env.max_turns
    off_rule = 0
    for k in range(0, len(turns), 2):
        answer, obs = turns[k], turns[k + 1]
        got = ANSWER.fullmatch(answer["content"])
        assert got is not None, answer["content"]
        move = got.group(2)
        rule = ref_rule(pos, m.goal, ref_open(m, pos))
        off_rule += move != rule
        assert got.group(1) == ref_think(pos, m.goal, ref_open(m, pos), move)
        nxt = ref_next(pos, move)
        if ref_free(m, nxt):
            pos = nxt
            want = GOAL if pos == m.goal else STEP
            assert obs["content"].startswith(f"moved {move}; ")
        else:
            want = BUMP
            assert obs["content"].startswith("bumped a wall; ")
        assert answer["reward"] == pytest.approx(want)
        assert obs["reward"] == 0.0
        if pos == m.goal:
            assert obs["content"].endswith("reached the goal")
            assert k == len(turns) - 2
        else:
            assert state_of(obs["content"]) == (pos, m.goal, ref_open(m, pos))
    assert ep["success"] == (pos == m.goal)
    assert ep["return"] == pytest.approx(sum(t["reward"] for t in turns), abs=1e-12)
    return ep, m, off_rule


def test_planner_follows_the_rule_and_always_reaches_the_goal() -> None:
    optimal = 0
    for seed in SEEDS:
        ep, m, off_rule = check_episode(seed, "planner")
        assert off_rule == 0 and ep["success"], seed
        n = len(ep["turns"]) // 2
        shortest = bfs(m)
        assert n >= shortest >= 5  # min_distance 5 by default
        optimal += n == shortest
        assert len(m.walls) == 8 and m.size == 6
    assert optimal >= 0.8 * len(SEEDS)


def test_noisy_errs_and_succeeds_less_often() -> None:
    wins, errs, turns = 0, 0, 0
    for seed in SEEDS:
        ep, _, off_rule = check_episode(seed, "noisy")
        wins += ep["success"]
        errs += off_rule
        turns += len(ep["turns"]) // 2
    assert 0.4 <= wins / len(SEEDS) <= 0.75
    assert 0.25 <= errs / turns <= 0.45  # error rate 0.35 per turn


def test_reset_is_deterministic_and_seeds_differ() -> None:
    a, b = make_text_env(ENV), make_text_env(ENV)
    assert a.reset(7) == b.reset(7)
    for action in ("down", "left", "up", "bad", "right"):
        assert a.step(action) == b.step(action)
    prompts = {make_text_env(ENV).reset(s) for s in range(50)}
    assert len(prompts) == 50


def test_reset_restarts_the_episode() -> None:
    env = make_text_env(ENV)
    first = env.reset(3)
    steps = [env.step(mv) for mv in ("up", "up", "left")]
    assert env.reset(3) == first
    assert [env.step(mv) for mv in ("up", "up", "left")] == steps


def first_blocked(seed_range: range, want_wall: bool) -> tuple[int, str]:
    for seed in seed_range:
        m = read_map(make_text_env(ENV).reset(seed))
        for mv in ("up", "down", "left", "right"):
            nxt = ref_next(m.start, mv)
            on_map = 0 <= nxt[0] < m.size and 0 <= nxt[1] < m.size
            if on_map == want_wall and not ref_free(m, nxt):
                return seed, mv
    raise AssertionError("no such start in range")


@pytest.mark.parametrize("wall", [True, False], ids=["wall", "edge"])
def test_walls_and_edges_block(wall: bool) -> None:
    seed, move = first_blocked(range(500), wall)
    env = make_text_env(ENV)
    prompt = env.reset(seed)
    obs, reward, done, info = env.step(move)
    assert obs == "bumped a wall; " + prompt.splitlines()[-1]
    assert (reward, done, info["success"]) == (BUMP, False, False)


@pytest.mark.parametrize("action", ["", "jump", "up down", "<action>fly</action>", "north"])
def test_invalid_actions_are_penalised_steps(action: str) -> None:
    env = make_text_env(ENV)
    prompt = env.reset(11)
    obs, reward, done, info = env.step(action)
    assert obs == "no valid action; " + prompt.splitlines()[-1]
    assert (reward, done, info["success"]) == (BUMP, False, False)


def test_actions_are_read_leniently() -> None:
    env = make_text_env(ENV)
    m = read_map(env.reset(0))
    move = ref_rule(m.start, m.goal, ref_open(m, m.start))
    for text in (f"  {move.upper()}\n", f"<think>x</think>\n<action> {move} </action>"):
        env.reset(0)
        obs, reward, _, _ = env.step(text)
        assert obs.startswith(f"moved {move}; ") and reward == STEP


def test_episode_ends_after_max_turns() -> None:
    env = make_text_env(ENV, max_turns=10)
    prompt = env.reset(5)
    for turn in range(1, 11):
        obs, reward, done, info = env.step("stay")
        assert reward == BUMP and info["success"] is False
        assert done == (turn == 10)
    assert obs == "no valid action; " + prompt.splitlines()[-1] + "; out of turns"
    with pytest.raises(RuntimeError, match="reset"):
        env.step("up")


def test_run_episode_bookkeeping_with_a_bad_policy() -> None:
    env = make_text_env(ENV)
    answers = iter(["no tags", "<action>up</action>", "<action>sideways</action>"] * 10)
    seen: list[int] = []

    def policy(prompt: str, history: list[tuple[str, str]]) -> str:
        seen.append(len(history))
        return next(answers)

    ep = run_episode(env, policy, 2)
    rewards = [t["reward"] for t in ep["turns"] if t["role"] == "assistant"]
    assert seen == list(range(0, 2 * len(rewards), 2))
    assert ep["return"] == pytest.approx(sum(rewards), abs=1e-12)
    assert rewards[0] == BUMP and rewards[2] == BUMP and rewards[1] in (STEP, BUMP, GOAL)
    assert len(rewards) == env.max_turns or ep["success"]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("<think>a</think>\n<action>down</action>", "down"),
        ("<action> left </action> <action>up</action>", " left "),
        ("<action>\nright\n</action>", "\nright\n"),
        ("<action></action>", ""),
        ("down", None),
        ("<action>down", None),
        ("", None),
    ],
)
def test_parse_action(text: str, want: str | None) -> None:
    assert parse_action(text) == want


def test_teacher_act_is_a_pure_function_of_its_inputs() -> None:
    env = make_text_env(ENV)
    prompt = env.reset(4)
    history = [("assistant", "<action>up</action>"), ("env", env.step("up")[0])]
    for name in ("planner", "noisy"):
        t = make_teacher(ENV, name, 4)
        assert (
            t.act(prompt, history)
            == t.act(prompt, history)
            == make_teacher(ENV, name, 4).act(prompt, history)
        )
    # the noisy teacher's errors depend on its seed
    answers = {make_teacher(ENV, "noisy", s).act(prompt, []) for s in range(40)}
    assert len(answers) > 1


def test_teacher_reads_the_latest_observation() -> None:
    t = make_teacher(ENV, "planner", 0)
    obs = "moved up; at 3,3 goal 0,3; open: down left right"
    out = t.act("at 0,0 goal 5,5; open: down right", [("assistant", "x"), ("env", obs)])
    assert out == (
        "<think>row 3 to 0: up 3; col 3 to 3: stay; open: down left right; go right</think>\n"
        "<action>right</action>"
    )
    with pytest.raises(ValueError, match="state line"):
        t.act("no state here", [])


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="textgrid-v0"):
        make_text_env("gridworld-v9")
    with pytest.raises(ConfigError, match="unknown key.*colour"):
        make_text_env(ENV, colour="red")
    with pytest.raises(ConfigError, match="size"):
        make_text_env(ENV, size=12)
    with pytest.raises(ConfigError, match="walls"):
        make_text_env(ENV, size=4, walls=8)
    with pytest.raises(ValueError, match="planner, noisy"):
        make_teacher(ENV, "oracle", 0)


def test_other_sizes() -> None:
    env = make_text_env(ENV, size=5, walls=4, max_turns=10, min_distance=3)
    for seed in range(30):
        ep = run_episode(env, make_teacher(ENV, "planner", seed).act, seed)
        m = read_map(ep["prompt"])
        assert (m.size, len(m.walls), ep["success"]) == (5, 4, True)


def test_import_does_not_pull_torch() -> None:
    code = "import sys, trainer.envs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
