"""The demo data is a test of offline RL, not of cloning: a minority of good episodes.

The trainer's demo (docs/RESULTS.md) holds IQL / CQL against BC and against the behaviour's
average return. That comparison only means something when the behaviour is of mixed
quality in the way of D4RL's medium-expert / medium-replay data: a few near-expert
episodes, most of the data from controllers whose errors are systematic. These checks
generate the demo data at a small scale and read it back (a few seconds).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCALE = 0.2  # 40 CartPole episodes, 20 Pendulum episodes


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_demo_data", REPO / "scripts" / "make_demo_data.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return load_generator()


@pytest.mark.parametrize(
    ("env_id", "behaviours", "episodes"),
    [
        ("CartPole-v1", "CARTPOLE_BEHAVIOURS", "CARTPOLE_EPISODES"),
        ("Pendulum-v1", "PENDULUM_BEHAVIOURS", "PENDULUM_EPISODES"),
    ],
)
def test_a_minority_of_good_data_and_an_average_far_below_it(
    gen: ModuleType, env_id: str, behaviours: str, episodes: str
) -> None:
    rng = np.random.default_rng(0)
    n = max(1, round(getattr(gen, episodes) * SCALE))
    data = gen.collect(env_id, getattr(gen, behaviours), n, "ep", 4, rng)
    expert, random_policy = (
        (gen.cartpole_expert, gen.cartpole_random)
        if env_id == "CartPole-v1"
        else (gen.pendulum_expert, gen.pendulum_random)
    )
    refs = gen.references(env_id, expert, random_policy, data)

    by_policy: dict[str, list[float]] = {}
    steps: dict[str, int] = {}
    for ep in data:
        by_policy.setdefault(ep.policy, []).append(ep.ret)
        steps[ep.policy] = steps.get(ep.policy, 0) + ep.length
    scores = {p: refs.normalized(float(np.mean(r))) for p, r in by_policy.items()}

    good = [p for p, s in scores.items() if s >= 90.0]
    assert good, scores  # near-expert episodes are in the data ...
    good_steps = sum(steps[p] for p in good)
    assert good_steps < 0.35 * sum(steps.values()), (scores, steps)  # ... as a minority
    # The sub-optimal controllers are structured, not noise: each is far below the expert
    # yet (but for the random one) far above random.
    assert sum(1 for s in scores.values() if 15.0 <= s < 90.0) >= 2, scores
    # The behaviour's average, the bar that offline RL must clear, is far below the best.
    assert refs.normalized(refs.behaviour) < 60.0, (scores, refs)
