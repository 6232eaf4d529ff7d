"""textgrid-v0: walk a small grid map, described in text, to a goal.

The map is a square grid (``size`` x ``size``, 4 to 9) with a few wall cells, the agent and
a goal. A position is ``ROW,COL`` (row 0 at the top, column 0 at the left). Every
observation ends with one *state line*::

    at 2,3 goal 4,1; open: up down left

(the agent's cell, the goal's cell, and the moves that do not run into a wall or off the
map, always in the order up, down, left, right). The prompt of :meth:`TextGridEnv.reset`
explains the task and the answer format, draws the map (``#`` wall, ``A`` agent, ``G``
goal, ``.`` open) and ends with the first state line. Each step's observation says what
happened (``moved down``, ``bumped a wall``, ``no valid action``) and gives the new state
line; the last one says ``reached the goal`` or ``out of turns``.

An action is one of ``up|down|left|right`` (case and surrounding blanks ignored; the text of
a whole answer is read through its ``<action>...</action>``). Rewards: ``step_reward``
(-0.05) for a move, ``bump_reward`` (-0.2) for a move into a wall or off the map and for an
invalid or unparseable action (the agent stays where it is), ``goal_reward`` (+1) for the
move that reaches the goal, which ends the episode with ``success`` True. After
``max_turns`` actions without the goal the episode ends with ``success`` False.

The planner rule (:func:`planner_move`) is a function of the state line alone: take the
vertical move towards the goal if it is open, else the horizontal move towards the goal if
it is open, else the first open move of ``FALLBACK``. Its reasoning spells that out::

    <think>row 2 to 4: down 2; col 3 to 1: left 2; open: up down left; go down</think>
    <action>down</action>

Maps are drawn by rejection sampling from ``random.Random(seed)`` until the planner, from
the start, reaches the goal within ``max_turns`` (so the planner's success rate is 1) and
the start is at least ``min_distance`` steps (Manhattan) from the goal. The "noisy" teacher
writes the same reasoning but, with probability ``error_rate`` on a turn, concludes with a
wrong move (one of the other three, walls included), drawn from ``(seed, turn)``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from trainer.config import ConfigError

ENV_ID = "textgrid-v0"
MOVES = ("up", "down", "left", "right")
DELTAS: dict[str, tuple[int, int]] = {
    "up": (-1, 0),
    "down": (1, 0),
    "left": (0, -1),
    "right": (0, 1),
}
# The planner's last resort when neither move towards the goal is open.
FALLBACK = ("right", "down", "left", "up")
MAX_LAYOUT_TRIES = 10_000
NOISY_ERROR_RATE = 0.35

Cell = tuple[int, int]

_STATE = re.compile(r"at (\d+),(\d+) goal (\d+),(\d+); open:((?: (?:up|down|left|right))*)")
_ACTION = re.compile(r"<action>(.*?)</action>", re.DOTALL)


@dataclass(frozen=True)
class GridConfig:
    """The keyword arguments of ``make_text_env("textgrid-v0", **kwargs)``."""

    # Side of the square map, in cells (4-9: every coordinate is one digit).
    size: int = 6
    # Wall cells drawn at random (besides the map's edge), fewer than a third of the cells.
    walls: int = 8
    # Actions per episode before it ends unsuccessfully.
    max_turns: int = 12
    # Smallest Manhattan distance from the start to the goal.
    min_distance: int = 5
    # Reward of a move into an open cell.
    step_reward: float = -0.05
    # Reward of a move into a wall or off the map, or of an invalid/unparseable action.
    bump_reward: float = -0.2
    # Reward of the move that reaches the goal.
    goal_reward: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or not 4 <= self.size <= 9:
            raise ConfigError(f"env.kwargs.size: must be an integer in 4..9, got {self.size!r}")
        cells = self.size * self.size
        if not isinstance(self.walls, int) or not 0 <= self.walls < cells // 3:
            raise ConfigError(
                f"env.kwargs.walls: must be an integer in 0..{cells // 3 - 1} for size "
                f"{self.size}, got {self.walls!r}"
            )
        if not isinstance(self.max_turns, int) or self.max_turns < 2 * (self.size - 1):
            raise ConfigError(
                f"env.kwargs.max_turns: must be an integer >= {2 * (self.size - 1)} (the "
                f"longest distance on a {self.size}x{self.size} map), got {self.max_turns!r}"
            )
        if not isinstance(self.min_distance, int) or not 1 <= self.min_distance <= self.size:
            raise ConfigError(
                f"env.kwargs.min_distance: must be an integer in 1..{self.size}, "
                f"got {self.min_distance!r}"
            )


@dataclass(frozen=True)
class Layout:
    """One map: its walls, the agent's start and the goal."""

    size: int
    walls: frozenset[Cell]
    start: Cell
    goal: Cell


# ------------------------------------------------------------------ the rule, on plain values


def step_cell(pos: Cell, move: str) -> Cell:
    """The cell one ``move`` away from ``pos`` (it may be a wall or off the map)."""
    dr, dc = DELTAS[move]
    return pos[0] + dr, pos[1] + dc


def is_free(layout: Layout, cell: Cell) -> bool:
    """Whether ``cell`` lies on the map and is not a wall."""
    r, c = cell
    return 0 <= r < layout.size and 0 <= c < layout.size and cell not in layout.walls


def open_moves(layout: Layout, pos: Cell) -> tuple[str, ...]:
    """The moves from ``pos`` into a free cell, in the order of ``MOVES``."""
    return tuple(m for m in MOVES if is_free(layout, step_cell(pos, m)))


def needs(pos: Cell, goal: Cell) -> list[tuple[str, int]]:
    """The moves towards the goal with their counts: the vertical one first, e.g.
    ``[("down", 2), ("left", 2)]``; empty at the goal."""
    out: list[tuple[str, int]] = []
    dr, dc = goal[0] - pos[0], goal[1] - pos[1]
    if dr:
        out.append(("down" if dr > 0 else "up", abs(dr)))
    if dc:
        out.append(("right" if dc > 0 else "left", abs(dc)))
    return out


def planner_move(pos: Cell, goal: Cell, open_: tuple[str, ...]) -> str:
    """The planner's move: the first move towards the goal that is open (vertical before
    horizontal), else the first open move of ``FALLBACK`` (``up`` if none is open)."""
    for move, _ in needs(pos, goal):
        if move in open_:
            return move
    return next((m for m in FALLBACK if m in open_), "up")


def planner_path(layout: Layout, max_turns: int) -> list[str] | None:
    """The planner's moves from the start to the goal, or None if it does not get there
    within ``max_turns`` moves."""
    pos = layout.start
    moves: list[str] = []
    while pos != layout.goal:
        if len(moves) == max_turns:
            return None
        move = planner_move(pos, layout.goal, open_moves(layout, pos))
        moves.append(move)
        if is_free(layout, step_cell(pos, move)):
            pos = step_cell(pos, move)
    return moves


def generate_layout(seed: int, cfg: GridConfig) -> Layout:
    """The map of episode ``seed``: drawn from ``random.Random(seed)`` until the planner
    solves it within ``cfg.max_turns`` from a start ``cfg.min_distance`` or more away."""
    rng = random.Random(seed)
    cells = [(r, c) for r in range(cfg.size) for c in range(cfg.size)]
    for _ in range(MAX_LAYOUT_TRIES):
        picked = rng.sample(cells, cfg.walls + 2)
        start, goal = picked[0], picked[1]
        if abs(start[0] - goal[0]) + abs(start[1] - goal[1]) < cfg.min_distance:
            continue
        layout = Layout(cfg.size, frozenset(picked[2:]), start, goal)
        if planner_path(layout, cfg.max_turns) is not None:
            return layout
    raise RuntimeError(f"textgrid: no solvable map in {MAX_LAYOUT_TRIES} tries (seed {seed})")


# ------------------------------------------------------------------ text


def state_line(pos: Cell, goal: Cell, open_: tuple[str, ...]) -> str:
    """``at R,C goal R,C; open: MOVES`` (see the module docstring)."""
    return f"at {pos[0]},{pos[1]} goal {goal[0]},{goal[1]}; open:" + "".join(f" {m}" for m in open_)


def parse_state(text: str) -> tuple[Cell, Cell, tuple[str, ...]] | None:
    """The position, goal and open moves of the last state line in ``text`` (None if none)."""
    found = list(_STATE.finditer(text))
    if not found:
        return None
    m = found[-1]
    r, c, gr, gc = (int(m.group(i)) for i in range(1, 5))
    return (r, c), (gr, gc), tuple(m.group(5).split())


def reasoning(pos: Cell, goal: Cell, open_: tuple[str, ...], move: str) -> str:
    """The planner's reasoning for ``move`` in a state: each coordinate next to the goal's
    with the move it asks for (``stay`` when equal), what is open, the move. Each
    comparison sits beside its two digits, which a small student learns quickly."""
    dr, dc = goal[0] - pos[0], goal[1] - pos[1]
    row = f"{'down' if dr > 0 else 'up'} {abs(dr)}" if dr else "stay"
    col = f"{'right' if dc > 0 else 'left'} {abs(dc)}" if dc else "stay"
    moves = "".join(f" {m}" for m in open_)
    return (
        f"row {pos[0]} to {goal[0]}: {row}; col {pos[1]} to {goal[1]}: {col}; "
        f"open:{moves}; go {move}"
    )


def answer(think: str, move: str) -> str:
    """A turn as the teachers write it."""
    return f"<think>{think}</think>\n<action>{move}</action>"


def render_map(layout: Layout, pos: Cell) -> str:
    """The map, one line per row: ``#`` wall, ``A`` agent, ``G`` goal, ``.`` open."""
    rows = []
    for r in range(layout.size):
        row = ""
        for c in range(layout.size):
            cell = (r, c)
            row += (
                "A"
                if cell == pos
                else "G"
                if cell == layout.goal
                else "#"
                if cell in layout.walls
                else "."
            )
        rows.append(row)
    return "\n".join(rows)


def read_move(action: str) -> str | None:
    """The move of an action: ``up|down|left|right`` itself (case and blanks ignored), or
    that inside the first ``<action>...</action>`` of a whole answer; None otherwise."""
    move = action.strip().lower()
    if move in DELTAS:
        return move
    m = _ACTION.search(action)
    if m is not None and m.group(1).strip().lower() in DELTAS:
        return m.group(1).strip().lower()
    return None


# ------------------------------------------------------------------ environment and teachers


class TextGridEnv:
    """The textgrid-v0 environment (see the module docstring)."""

    def __init__(self, cfg: GridConfig) -> None:
        self.cfg = cfg
        self.max_turns = cfg.max_turns
        self.layout: Layout | None = None
        self.pos: Cell = (0, 0)
        self.turn = 0
        self.done = True

    def reset(self, seed: int) -> str:
        """Start episode ``seed``; returns the task prompt, ending with the first state line."""
        self.layout = generate_layout(int(seed), self.cfg)
        self.pos = self.layout.start
        self.turn = 0
        self.done = False
        cfg = self.cfg
        return (
            f"Walk to the goal on a {cfg.size}x{cfg.size} map "
            "(row 0 at the top, col 0 at the left; # wall, A you, G goal):\n"
            f"{render_map(self.layout, self.pos)}\n"
            f"A move costs {-cfg.step_reward:g}, a bump or invalid action {-cfg.bump_reward:g}, "
            f"the goal gives {cfg.goal_reward:g}; at most {cfg.max_turns} turns. "
            "Answer <think>...</think> then <action>up|down|left|right</action>.\n"
            f"{self.state()}"
        )

    def state(self) -> str:
        """The current state line."""
        assert self.layout is not None
        return state_line(self.pos, self.layout.goal, open_moves(self.layout, self.pos))

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply one action; returns (observation, reward, done, info with ``success``)."""
        if self.layout is None or self.done:
            raise RuntimeError("textgrid: call reset(seed) before step (the episode is over)")
        self.turn += 1
        move = read_move(action)
        if move is None:
            event, reward = "no valid action", self.cfg.bump_reward
        elif not is_free(self.layout, step_cell(self.pos, move)):
            event, reward = "bumped a wall", self.cfg.bump_reward
        else:
            self.pos = step_cell(self.pos, move)
            event, reward = f"moved {move}", self.cfg.step_reward
        success = self.pos == self.layout.goal
        if success:
            self.done = True
            return f"{event}; reached the goal", self.cfg.goal_reward, True, {"success": True}
        self.done = self.turn >= self.cfg.max_turns
        obs = f"{event}; {self.state()}" + ("; out of turns" if self.done else "")
        return obs, reward, self.done, {"success": False, "truncated": self.done}


class GridTeacher:
    """A scripted teacher reading the state line of the latest observation (or the prompt):
    the planner rule, wrong with probability ``error_rate`` per turn (drawn from the seed
    and the turn, so ``act`` is a pure function of its arguments)."""

    def __init__(self, name: str, seed: int, error_rate: float) -> None:
        self.name = name
        self.seed = int(seed)
        self.error_rate = error_rate

    def act(self, prompt: str, history: list[tuple[str, str]]) -> str:
        """The answer ``<think>...</think>\\n<action>MOVE</action>`` for the next turn."""
        last = next((content for role, content in reversed(history) if role != "assistant"), prompt)
        state = parse_state(last)
        if state is None:
            raise ValueError(
                f"textgrid teacher: no state line ('at R,C goal R,C; open: ...') in {last!r}"
            )
        pos, goal, open_ = state
        move = planner_move(pos, goal, open_)
        turn = sum(role == "assistant" for role, _ in history)
        rng = random.Random(f"{self.name}:{self.seed}:{turn}")
        if self.error_rate > 0 and rng.random() < self.error_rate:
            move = rng.choice([m for m in MOVES if m != move])
        return answer(reasoning(pos, goal, open_, move), move)
