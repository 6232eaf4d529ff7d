"""QA losses against plain-loop references, and policy-gradient convergence on toy problems.

Returns, GAE advantages, halting episodes and the span loss are checked against reference
Python loops on random inputs (Hypothesis); the REINFORCE machinery (episodes, advantages,
normalisation, policy and value losses) must find the known optimum of a two-armed bandit
and of a toy stopping problem.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.qa.losses import (
    bernoulli_entropy,
    discounted_returns,
    entropy_bonus,
    entropy_coefficient,
    gae_advantages,
    halt_log_prob,
    halting_episodes,
    masked_mean,
    normalize_advantages,
    policy_gradient_loss,
    span_loss,
    value_loss,
)

SETTINGS = settings(max_examples=60, deadline=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@st.composite
def episode_batches(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Random (B, T) episodes: n segments each, a decision prefix, dones at its end."""
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, t + 1, (b,), generator=g)
    halt = torch.rand(b, t, generator=g) < draw(st.floats(0.0, 1.0))
    f1 = torch.rand(b, t, generator=g)
    values = torch.randn(b, t, generator=g)
    return {"n": n, "halt": halt, "f1": f1, "values": values}


def reference_episode(halt: list[bool], n: int, f1: list[float], cost: float) -> dict:
    """One episode by the rules, step by step."""
    actions, rewards, decided = [], [], []
    t = 0
    while True:
        if t == n - 1:  # the last segment: stop without a decision
            if decided:
                rewards[-1] += f1[t]
            return {"h": t, "actions": actions, "rewards": rewards, "f1": f1[t]}
        decided.append(t)
        if halt[t]:
            actions.append(1.0)
            rewards.append(f1[t])
            return {"h": t, "actions": actions, "rewards": rewards, "f1": f1[t]}
        actions.append(0.0)
        rewards.append(-cost)
        t += 1


@given(episode_batches(), st.floats(0.0, 0.2))
@SETTINGS
def test_halting_episodes_match_the_step_by_step_rules(ep: dict, cost: float) -> None:
    out = halting_episodes(ep["halt"], ep["n"], ep["f1"], cost)
    for b in range(len(ep["n"])):
        ref = reference_episode(ep["halt"][b].tolist(), int(ep["n"][b]), ep["f1"][b].tolist(), cost)
        k = len(ref["actions"])
        assert int(out.n_read[b]) == ref["h"] + 1
        assert out.decision_mask[b].tolist() == [True] * k + [False] * (ep["f1"].shape[1] - k)
        assert out.actions[b, :k].tolist() == ref["actions"]
        assert torch.allclose(out.rewards[b, :k], torch.tensor(ref["rewards"]), atol=1e-6)
        assert not out.rewards[b, k:].any() and not out.actions[b, k:].any()
        assert out.dones[b].tolist() == [i == k - 1 for i in range(out.dones.shape[1])]
        assert math.isclose(float(out.final_f1[b]), ref["f1"], abs_tol=1e-6)
        # the rewards add up to the return less the first segment's cost
        assert math.isclose(float(out.returns[b]), ref["f1"] - cost * (ref["h"] + 1), abs_tol=1e-5)
        if k:  # a one-segment document has no decision, hence no rewards
            assert math.isclose(
                float(out.rewards[b].sum()), float(out.returns[b]) + cost, abs_tol=1e-5
            )


def reference_returns(rewards: list[float], gamma: float) -> list[float]:
    out, g = [], 0.0
    for r in reversed(rewards):
        g = r + gamma * g
        out.append(g)
    return out[::-1]


def reference_gae(
    rewards: list[float], values: list[float], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """One episode that ends after its last reward (no bootstrap)."""
    adv = [0.0] * len(rewards)
    a = 0.0
    for t in reversed(range(len(rewards))):
        v_next = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * v_next - values[t]
        a = delta + gamma * lam * a
        adv[t] = a
    return adv, [x + v for x, v in zip(adv, values)]


@given(episode_batches(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 0.1))
@SETTINGS
def test_returns_and_gae_equal_the_reference_loops(
    ep: dict, gamma: float, lam: float, cost: float
) -> None:
    e = halting_episodes(ep["halt"], ep["n"], ep["f1"], cost)
    g = discounted_returns(e.rewards, e.dones, e.decision_mask, gamma)
    adv, targets = gae_advantages(e.rewards, ep["values"], e.dones, e.decision_mask, gamma, lam)
    for b in range(len(ep["n"])):
        k = int(e.decision_mask[b].sum())
        r = e.rewards[b, :k].tolist()
        v = ep["values"][b, :k].tolist()
        assert np.allclose(g[b, :k].tolist(), reference_returns(r, gamma), atol=1e-5)
        ref_adv, ref_t = reference_gae(r, v, gamma, lam)
        assert np.allclose(adv[b, :k].tolist(), ref_adv, atol=1e-5)
        assert np.allclose(targets[b, :k].tolist(), ref_t, atol=1e-5)
        assert not g[b, k:].any() and not adv[b, k:].any() and not targets[b, k:].any()


def test_gae_with_lambda_one_is_the_return_minus_the_baseline() -> None:
    g = torch.Generator().manual_seed(0)
    halt = torch.rand(6, 9, generator=g) < 0.2
    n = torch.randint(1, 10, (6,), generator=g)
    e = halting_episodes(halt, n, torch.rand(6, 9, generator=g), 0.03)
    v = torch.randn(6, 9, generator=g)
    adv, targets = gae_advantages(e.rewards, v, e.dones, e.decision_mask, 0.97, 1.0)
    ret = discounted_returns(e.rewards, e.dones, e.decision_mask, 0.97)
    m = e.decision_mask
    assert torch.allclose(adv[m], (ret - v)[m], atol=1e-5)
    assert torch.allclose(targets[m], ret[m], atol=1e-5)


def test_span_loss_equals_cross_entropy_per_real_segment() -> None:
    g = torch.Generator().manual_seed(1)
    b, t, w = 3, 4, 7
    start, end = torch.randn(b, t, w, generator=g), torch.randn(b, t, w, generator=g)
    seg = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    span = torch.rand(b, t, w, generator=g) < 0.6
    span[..., 0] = True
    st_t = torch.randint(0, w, (b, t), generator=g)
    en_t = torch.randint(0, w, (b, t), generator=g)
    span[torch.arange(b)[:, None], torch.arange(t)[None, :], st_t] = True
    span[torch.arange(b)[:, None], torch.arange(t)[None, :], en_t] = True
    got = span_loss(start, end, st_t, en_t, span, seg)
    ref = []
    for i in range(b):
        for j in range(t):
            if not seg[i, j]:
                continue
            ls = start[i, j][span[i, j]]
            le = end[i, j][span[i, j]]
            ps = int(span[i, j][: st_t[i, j]].sum())
            pe = int(span[i, j][: en_t[i, j]].sum())
            ce = F.cross_entropy(ls[None], torch.tensor([ps])) + F.cross_entropy(
                le[None], torch.tensor([pe])
            )
            ref.append(float(ce) / 2)
    assert math.isclose(float(got), float(np.mean(ref)), rel_tol=1e-5)


def test_policy_loss_gradient_is_minus_advantage_times_score() -> None:
    z = torch.tensor([0.3, -1.2, 2.0, 0.0], requires_grad=True)
    a = torch.tensor([1.0, 0.0, 1.0, 0.0])
    adv = torch.tensor([0.5, -2.0, 1.0, 3.0])
    mask = torch.tensor([True, True, True, False])
    policy_gradient_loss(z, a, adv, mask).backward()
    p = torch.sigmoid(z.detach())
    expected = -(adv * (a - p)) * mask / 3  # d log pi / dz = a - p
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_entropy_and_log_prob_match_their_definitions() -> None:
    z = torch.linspace(-30, 30, 61)
    p = torch.sigmoid(z.double())
    ref = -(p * torch.log(p.clamp(min=1e-300)) + (1 - p) * torch.log((1 - p).clamp(min=1e-300)))
    assert torch.allclose(bernoulli_entropy(z).double(), ref, atol=1e-5)
    assert torch.isfinite(bernoulli_entropy(z)).all()
    assert torch.allclose(halt_log_prob(z, torch.ones_like(z)).exp(), torch.sigmoid(z), atol=1e-6)
    mask = torch.zeros(61, dtype=torch.bool)
    mask[30] = True  # z = 0: log 2
    assert math.isclose(float(entropy_bonus(z, mask)), math.log(2), rel_tol=1e-6)


def test_normalized_advantages_and_masked_means_ignore_padding() -> None:
    adv = torch.tensor([[1.0, 2.0, 3.0, float("inf")], [4.0, 5.0, float("nan"), 7.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = normalize_advantages(adv, mask)
    real = out[mask]
    assert math.isclose(float(real.mean()), 0.0, abs_tol=1e-6)
    assert math.isclose(float(real.std()), 1.0, rel_tol=1e-5)
    assert (out[~mask] == 0).all()
    assert math.isclose(float(masked_mean(adv, mask)), 3.0)
    assert math.isclose(float(value_loss(adv, torch.zeros_like(adv), mask)), 0.5 * 55 / 5)
    assert float(masked_mean(adv, torch.zeros_like(mask))) == 0.0


def test_entropy_coefficient_decays_to_its_floor() -> None:
    c = [entropy_coefficient(s, 0.1, 0.9, 0.01) for s in range(100)]
    assert c[0] == 0.1 and math.isclose(c[1], 0.09)
    assert all(a >= b for a, b in zip(c, c[1:]))
    assert c[-1] == 0.01 and min(c) == 0.01


# --------------------------------------------------------------------------- convergence


def _reinforce_step(
    z: torch.Tensor,
    opt: torch.optim.Optimizer,
    actions: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    logits: torch.Tensor,
    beta: float = 0.0,
) -> None:
    opt.zero_grad()
    loss = policy_gradient_loss(logits, actions, normalize_advantages(adv, mask), mask)
    (loss - beta * entropy_bonus(logits, mask)).backward()
    opt.step()


def test_reinforce_finds_the_better_arm_of_a_bandit() -> None:
    """Arm HALT pays Bernoulli(0.7), arm CONTINUE Bernoulli(0.4): the optimum is P(HALT) = 1."""
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(150):
        logits = z.expand(64)
        a = (torch.rand(64, generator=g) < torch.sigmoid(logits.detach())).float()
        r = (torch.rand(64, generator=g) < torch.where(a > 0, 0.7, 0.4)).float()
        mask = torch.ones(64, dtype=torch.bool)
        _reinforce_step(z, opt, a, r, mask, logits)
    assert float(torch.sigmoid(z.detach())) > 0.97


def test_halting_policy_learns_to_stop_right_after_the_answer() -> None:
    """Stopping toy: the answer sits in segment a ~ U{0..T-1}; F1 after t is 1 iff t >= a.

    With a small cost per segment the optimal policy continues until the answer is read and
    halts at once: its expected return is 1 - cost * (a + 1). The policy sees (found, 1).
    """
    g = torch.Generator().manual_seed(0)
    b, t, cost = 128, 8, 0.05
    w = torch.zeros(2, requires_grad=True)
    v = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w, v], lr=0.1)
    n = torch.full((b,), t)
    for step in range(150):
        a = torch.randint(0, t, (b,), generator=g)
        found = (torch.arange(t)[None, :] >= a[:, None]).float()  # (B, T)
        x = torch.stack([found, torch.ones_like(found)], dim=-1)
        logits, values = x @ w, x @ v
        halt = torch.rand(b, t, generator=g) < torch.sigmoid(logits.detach())
        ep = halting_episodes(halt, n, found, cost)
        adv, targets = gae_advantages(ep.rewards, values, ep.dones, ep.decision_mask, 1.0, 0.95)
        beta = entropy_coefficient(step, 0.05, 0.98, 0.0)
        opt.zero_grad()
        m = ep.decision_mask
        loss = (
            policy_gradient_loss(logits, ep.actions, normalize_advantages(adv, m), m)
            - beta * entropy_bonus(logits, m)
            + value_loss(values, targets, m)
        )
        loss.backward()
        opt.step()
    with torch.no_grad():
        p_found = float(torch.sigmoid(w[0] + w[1]))
        p_not = float(torch.sigmoid(w[1]))
        a = torch.arange(t).repeat(4)
        found = (torch.arange(t)[None, :] >= a[:, None]).float()
        greedy = (torch.stack([found, torch.ones_like(found)], -1) @ w) > 0
        ep = halting_episodes(greedy, torch.full((len(a),), t), found, cost)
    assert p_found > 0.95 and p_not < 0.05, (p_found, p_not)
    assert torch.equal(ep.n_read, a + 1)  # halts right after the answer, every time
    assert float(ep.final_f1.mean()) == 1.0


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_returns_do_not_leak_across_episode_ends(gamma: float) -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    dones = torch.tensor([[False, True, False, True]])
    mask = torch.ones_like(dones)
    g = discounted_returns(rewards, dones, mask, gamma)
    assert torch.allclose(g, torch.tensor([[1 + gamma * 2, 2.0, 3 + gamma * 4, 4.0]]))
