"""`discounted_returns` (the vectorised blocked scan) against the plain reference loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.store import open_store
from pipeline.transitions.episodes import discounted_returns, discounted_returns_reference

from .conftest import build_store, step_record, write_lines, write_spec

GAMMAS = (0.0, 0.5, 0.99, 1.0)

# short segments, and long ones that span many 32-row blocks (> 1000 rows)
segment_lengths = st.lists(
    st.one_of(st.integers(1, 40), st.integers(1000, 3000)), min_size=1, max_size=6
)


def layout_of(lengths: list[int]) -> np.ndarray:
    starts = np.zeros(sum(lengths), dtype=bool)
    starts[np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)] = True
    return starts


@given(
    lengths=segment_lengths,
    gamma=st.sampled_from(GAMMAS),
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["normal", "integers", "sparse"]),
)
@settings(max_examples=60, deadline=None)
def test_discounted_returns_equals_reference(
    lengths: list[int], gamma: float, seed: int, kind: str
) -> None:
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    if kind == "normal":
        rewards = rng.normal(size=n)
    elif kind == "integers":
        rewards = rng.integers(-3, 4, size=n).astype(np.float64)
    else:  # a reward only at the end of each segment (the replay format)
        rewards = np.zeros(n)
        rewards[np.cumsum(lengths) - 1] = rng.choice([-1.0, 1.0], size=len(lengths))
    starts = layout_of(lengths)
    got = discounted_returns(rewards, starts, gamma)
    want = discounted_returns_reference(rewards, starts, gamma)
    assert got.shape == (n,)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * scale)


@given(lengths=segment_lengths, gamma=st.sampled_from(GAMMAS))
@settings(max_examples=20, deadline=None)
def test_starts_flag_on_row_zero_is_implied(lengths: list[int], gamma: float) -> None:
    rewards = np.ones(sum(lengths))
    starts = layout_of(lengths)
    without_first = starts.copy()
    without_first[0] = False
    np.testing.assert_array_equal(
        discounted_returns(rewards, without_first, gamma),
        discounted_returns(rewards, starts, gamma),
    )


@pytest.mark.parametrize("gamma", GAMMAS)
def test_known_values(gamma: float) -> None:
    # two segments: [1, 2, 3] and [4]
    rewards = np.array([1.0, 2.0, 3.0, 4.0])
    starts = np.array([True, False, False, True])
    expected = [1 + gamma * 2 + gamma**2 * 3, 2 + gamma * 3, 3.0, 4.0]
    np.testing.assert_allclose(discounted_returns(rewards, starts, gamma), expected)


def test_undiscounted_long_segment_is_a_reverse_cumulative_sum() -> None:
    rewards = np.ones(5000)
    starts = np.zeros(5000, dtype=bool)
    np.testing.assert_array_equal(
        discounted_returns(rewards, starts, 1.0), np.arange(5000, 0, -1, dtype=np.float64)
    )


def test_empty_input() -> None:
    out = discounted_returns(np.zeros(0), np.zeros(0, dtype=bool), 0.99)
    assert out.shape == (0,)


def test_does_not_modify_its_inputs() -> None:
    rewards = np.arange(100, dtype=np.float64)
    starts = np.zeros(100, dtype=bool)
    starts[[10, 50]] = True
    before = rewards.copy(), starts.copy()
    discounted_returns(rewards, starts, 0.9)
    np.testing.assert_array_equal(rewards, before[0])
    np.testing.assert_array_equal(starts, before[1])


def test_returns_are_sums_of_the_rewards_the_store_holds(tmp_path: Path) -> None:
    """Rewards that float32 cannot hold exactly: the episode return, the returns-to-go and a
    dropped step's reward are computed from the stored (float32) rewards, so a store's rows
    give its returns back exactly (and an export re-imported gives the same store)."""
    rewards = [0.1, 1 / 3, 2.7182818284, -0.7]
    lines = [step_record("a", t, rew=r, last=t == 3) for t, r in enumerate(rewards)]
    lines += [step_record("b", t, rew=r) for t, r in enumerate(rewards)]  # cut off: no final obs
    spec = write_spec(tmp_path, [write_lines(tmp_path / "log.jsonl", lines)], discount=0.9)
    s = open_store(build_store(spec, tmp_path / "out").path)
    stored = np.asarray(rewards, dtype=np.float32).astype(np.float64)
    ep = s.episode_table().to_pydict()
    assert ep["return"] == [stored.sum(), stored.sum()]  # exactly, both episodes
    assert ep["dropped_reward"] == [0.0, stored[-1]]
    rtg = [sum(0.9 ** (j - t) * stored[j] for j in range(t, 4)) for t in range(4)]
    want = np.asarray(rtg[:4] + rtg[:3], dtype=np.float32)
    np.testing.assert_allclose(s.column("return_to_go"), want, rtol=1e-6)
    exact = np.asarray(rewards, dtype=np.float64).sum()
    assert ep["return"][0] != exact  # the float64 log sum differs: the test can tell
