"""The RL losses against plain-loop references.

Every function of ``trainer/rl_losses.py`` is held against an explicit loop over rows and
tokens in Python floats (Hypothesis draws the shapes, masks and turn layouts); gradients are
checked where the clip or the mask decides them; the KL estimators against exact
expectations on small distributions; the adaptive KL controller against its formula and a
checkpoint round trip. Masked-out entries hold ``nan`` wherever the function promises to
ignore them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainer.qa.losses as qa
from trainer import rl_losses
from trainer.config import ConfigError
from trainer.rl_losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_coefficient,
    entropy_from_logits,
    explained_variance,
    kl_to_reference,
    leave_one_out_baseline,
    place_turn_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_loss,
    sequence_to_tokens,
    token_gae,
    token_returns,
    value_baseline_advantages,
    whiten,
)

SETTINGS = settings(max_examples=40, deadline=None)
NAN = float("nan")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def close(got: torch.Tensor | float, ref: object, tol: float = 1e-4) -> bool:
    """Elementwise closeness of a tensor (or float) to nested Python floats."""
    g = np.asarray(got.tolist() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    return bool(np.allclose(g, np.asarray(ref, dtype=np.float64), atol=tol, rtol=tol))


@st.composite
def token_batches(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Random (B, T) rows: policy tokens scattered among masked ones, some turn ends,
    ``nan`` values and large rewards at masked positions (which must be ignored)."""
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(b, t, generator=g) < draw(st.floats(0.0, 1.0))
    turn_end = mask & (torch.rand(b, t, generator=g) < draw(st.floats(0.0, 1.0)))
    rewards = torch.where(mask, torch.randn(b, t, generator=g), 1e6)
    values = torch.where(mask, torch.randn(b, t, generator=g), NAN)
    return {"rewards": rewards, "values": values, "mask": mask, "turn_end": turn_end}


# --------------------------------------------------------------------------- GAE, returns


def reference_token_gae(
    rewards: list[float],
    values: list[float],
    mask: list[bool],
    turn_end: list[bool],
    gamma: float,
    lam: float,
    per_turn: bool,
) -> tuple[list[float], list[float]]:
    """One row, by the closed form ``A_i = sum_k (prod_{i<=j<k} gamma_j lam_j) delta_k``
    over the row's policy tokens (the steps), the last one terminal."""
    steps = [t for t in range(len(mask)) if mask[t]]
    n = len(steps)
    g = [gamma if (not per_turn or turn_end[s]) else 1.0 for s in steps]
    lm = [lam if (not per_turn or turn_end[s]) else 1.0 for s in steps]
    delta = []
    for i in range(n):
        v_next = values[steps[i + 1]] if i + 1 < n else 0.0
        delta.append(rewards[steps[i]] + g[i] * v_next - values[steps[i]])
    adv, ret = [0.0] * len(mask), [0.0] * len(mask)
    for i in range(n):
        total, weight = 0.0, 1.0
        for k in range(i, n):
            total += weight * delta[k]
            weight *= g[k] * lm[k]
        adv[steps[i]] = total
        ret[steps[i]] = total + values[steps[i]]
    return adv, ret


def reference_token_returns(
    rewards: list[float], mask: list[bool], turn_end: list[bool], gamma: float, per_turn: bool
) -> list[float]:
    """One row: ``G_i = sum_k (prod_{i<=j<k} gamma_j) r_k`` over its policy tokens."""
    steps = [t for t in range(len(mask)) if mask[t]]
    g = [gamma if (not per_turn or turn_end[s]) else 1.0 for s in steps]
    out = [0.0] * len(mask)
    for i in range(len(steps)):
        total, weight = 0.0, 1.0
        for k in range(i, len(steps)):
            total += weight * rewards[steps[k]]
            weight *= g[k]
        out[steps[i]] = total
    return out


@given(token_batches(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.booleans())
@SETTINGS
def test_token_gae_and_returns_equal_the_reference_sums(
    tb: dict, gamma: float, lam: float, per_turn: bool
) -> None:
    r, v, m, te = tb["rewards"], tb["values"], tb["mask"], tb["turn_end"]
    adv, ret = token_gae(r, v, m, te, gamma, lam, per_turn=per_turn)
    g = token_returns(r, m, te, gamma, per_turn=per_turn)
    for b in range(r.shape[0]):
        row = (r[b].tolist(), v[b].tolist(), m[b].tolist(), te[b].tolist())
        ref_adv, ref_ret = reference_token_gae(*row, gamma, lam, per_turn)
        assert close(adv[b], ref_adv) and close(ret[b], ref_ret)
        ref_g = reference_token_returns(row[0], row[2], row[3], gamma, per_turn)
        assert close(g[b], ref_g, tol=1e-3)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


@given(token_batches(), st.floats(0.0, 1.0), st.booleans())
@SETTINGS
def test_gae_with_lambda_one_is_the_return_minus_the_value_baseline(
    tb: dict, gamma: float, per_turn: bool
) -> None:
    r, v, m, te = tb["rewards"], tb["values"], tb["mask"], tb["turn_end"]
    adv, ret = token_gae(r, v, m, te, gamma, 1.0, per_turn=per_turn)
    g = token_returns(r, m, te, gamma, per_turn=per_turn)
    base = value_baseline_advantages(g, v, m)
    assert torch.allclose(adv, base, atol=1e-3) and torch.allclose(ret, g, atol=1e-3)
    for b in range(r.shape[0]):
        for t in range(r.shape[1]):
            want = float(g[b, t]) - float(v[b, t]) if m[b, t] else 0.0
            assert math.isclose(float(base[b, t]), want, abs_tol=1e-6)


def test_a_turn_end_bootstraps_from_the_next_policy_token_past_the_observation() -> None:
    # prompt prompt a1 a2| obs obs b1| pad : the reward of each turn on its last token
    mask = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    turn_end = torch.tensor([[0, 0, 0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([[9.0, 9.0, 0.0, 1.0, 9.0, 9.0, 2.0, 9.0]])
    values = torch.tensor([[NAN, NAN, 0.5, 0.25, 7.0, 7.0, 1.5, NAN]])
    gamma, lam = 0.9, 0.8
    adv, ret = token_gae(rewards, values, mask, turn_end, gamma, lam)
    a_b1 = 2.0 - 1.5  # the row's last policy token: terminal
    a_a2 = 1.0 + gamma * 1.5 - 0.25 + gamma * lam * a_b1  # bootstraps on V(b1), not V(obs)
    a_a1 = 0.0 + gamma * 0.25 - 0.5 + gamma * lam * a_a2
    assert close(adv, [[0, 0, a_a1, a_a2, 0, 0, a_b1, 0]], tol=1e-6)
    assert close(ret, [[0, 0, a_a1 + 0.5, a_a2 + 0.25, 0, 0, a_b1 + 1.5, 0]], tol=1e-6)
    # per turn: no discount inside a turn; gamma and lam on the step out of a2
    adv_t, _ = token_gae(rewards, values, mask, turn_end, gamma, lam, per_turn=True)
    a1_turn = 0.0 + 1.0 * 0.25 - 0.5 + 1.0 * a_a2
    assert close(adv_t, [[0, 0, a1_turn, a_a2, 0, 0, a_b1, 0]], tol=1e-6)
    g = token_returns(rewards, mask, turn_end, gamma, per_turn=True)
    assert close(g, [[0, 0, 1 + gamma * 2, 1 + gamma * 2, 0, 0, 2, 0]], tol=1e-6)


def test_rows_do_not_leak_into_each_other_and_each_row_end_is_terminal() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    te = torch.zeros_like(mask)
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    values = torch.tensor([[0.0, 0.0, 100.0], [0.0, 0.0, 0.0]])
    adv, _ = token_gae(rewards, values, mask, te, 1.0, 1.0)
    assert close(adv, [[1.0, 1.0, 0.0], [5.0, 5.0, 5.0]], tol=1e-6)


def test_turn_rewards_land_on_their_turn_ends() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        mask = torch.rand(3, 10, generator=g) < 0.7
        turn_end = mask & (torch.rand(3, 10, generator=g) < 0.4)
        k = max(int(turn_end.sum(1).max()), 1)
        turn_rewards = torch.randn(3, k, generator=g)
        got = place_turn_rewards(turn_rewards, turn_end)
        for b in range(3):
            seen = 0
            for t in range(10):
                if turn_end[b, t]:
                    assert float(got[b, t]) == float(turn_rewards[b, seen])
                    seen += 1
                else:
                    assert float(got[b, t]) == 0.0


# --------------------------------------------------------------------------- PPO


@st.composite
def ppo_batches(draw: st.DrawFn) -> dict:
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 10))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(b, t, generator=g) < draw(st.floats(0.1, 1.0))
    old = -3.0 * torch.rand(b, t, generator=g)
    new = old + 0.5 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    return {
        "new": torch.where(mask, new, NAN),
        "old": torch.where(mask, old, NAN),
        "adv": torch.where(mask, adv, NAN),
        "mask": mask,
        "clip": draw(st.floats(0.05, 0.5)),
    }


@given(ppo_batches())
@SETTINGS
def test_ppo_policy_loss_metrics_and_gradient_equal_the_token_loop(pb: dict) -> None:
    new = pb["new"].clone().requires_grad_(True)
    out = ppo_policy_loss(new, pb["old"], pb["adv"], pb["mask"], pb["clip"])
    out.loss.backward()
    eps = pb["clip"]
    losses, clipped_n, kls, n = 0.0, 0, 0.0, 0
    grad = [[0.0] * new.shape[1] for _ in range(new.shape[0])]
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if not pb["mask"][b, t]:
                continue
            n += 1
            r = math.exp(float(pb["new"][b, t]) - float(pb["old"][b, t]))
            a = float(pb["adv"][b, t])
            unclipped, clipped = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            losses += max(unclipped, clipped)
            clipped_n += clipped > unclipped
            kls += (r - 1) - math.log(r)
            grad[b][t] = 0.0 if clipped > unclipped else -a * r  # d/dlogp of -a r is -a r
    n_ = max(n, 1)
    assert close(out.loss, losses / n_)
    assert close(out.clip_fraction, clipped_n / n_)
    assert close(out.approx_kl, kls / n_)
    assert close(new.grad, [[x / n_ for x in row] for row in grad])
    assert not out.clip_fraction.requires_grad and not out.approx_kl.requires_grad


def test_ppo_gradient_is_zero_only_in_the_clipped_direction() -> None:
    eps = 0.2
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    old = torch.full((5,), -1.0)
    new = (old + ratios.log()).requires_grad_(True)
    mask = torch.ones(5, dtype=torch.bool)
    out = ppo_policy_loss(new[None], old[None], adv[None], mask[None], eps)
    out.loss.backward()
    g = new.grad
    assert g is not None
    assert g[0] == 0.0  # A > 0, ratio above 1 + eps: no further push up
    assert g[1] != 0.0  # A < 0, ratio above 1 + eps: may still come down
    assert g[2] == 0.0  # A < 0, ratio below 1 - eps: no further push down
    assert g[3] != 0.0  # A > 0, ratio below 1 - eps: may still come up
    assert math.isclose(float(g[4]), -1.1 / 5, rel_tol=1e-5)  # inside the clip
    assert math.isclose(float(out.clip_fraction), 2 / 5, rel_tol=1e-6)
    # at ratio 1 the loss is -mean(A) and the gradient -A / n (the policy gradient)
    new1 = old.clone().requires_grad_(True)
    ppo_policy_loss(new1[None], old[None], adv[None], mask[None], eps).loss.backward()
    assert new1.grad is not None and torch.allclose(new1.grad, -adv / 5)


@given(ppo_batches())
@SETTINGS
def test_ppo_value_loss_equals_the_token_loop(pb: dict) -> None:
    old, mask, eps = pb["old"], pb["mask"], pb["clip"]
    values = pb["new"].clone().requires_grad_(True)
    returns = torch.where(mask, pb["adv"] + old, NAN)
    out = ppo_value_loss(values, old, returns, mask, eps)
    out.loss.backward()
    total, n, frac = 0.0, 0, 0
    grad = [[0.0] * old.shape[1] for _ in range(old.shape[0])]
    for b in range(old.shape[0]):
        for t in range(old.shape[1]):
            if not mask[b, t]:
                continue
            n += 1
            v, vo, r = float(pb["new"][b, t]), float(old[b, t]), float(returns[b, t])
            vc = vo + min(max(v - vo, -eps), eps)
            unclipped, clipped = (v - r) ** 2, (vc - r) ** 2
            total += max(unclipped, clipped)
            frac += clipped > unclipped
            grad[b][t] = 0.0 if clipped > unclipped else (v - r)  # d/dv of 0.5 (v - r)^2
    n_ = max(n, 1)
    assert close(out.loss, 0.5 * total / n_)
    assert close(out.clip_fraction, frac / n_)
    assert close(values.grad, [[x / n_ for x in row] for row in grad])
    plain = ppo_value_loss(values, old, returns, mask, None).loss
    ref = sum(
        (float(pb["new"][b, t]) - float(returns[b, t])) ** 2
        for b in range(old.shape[0])
        for t in range(old.shape[1])
        if mask[b, t]
    )
    assert close(plain, 0.5 * ref / n_)


def test_explained_variance_over_the_masked_entries() -> None:
    g = torch.Generator().manual_seed(5)
    returns = torch.randn(3, 6, generator=g)
    values = returns + 0.3 * torch.randn(3, 6, generator=g)
    mask = torch.rand(3, 6, generator=g) < 0.7
    mask[0, 0] = mask[1, 1] = True
    r = [float(x) for x in returns[mask]]
    d = [float(a) - float(b) for a, b in zip(returns[mask], values[mask])]
    var = lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)  # noqa: E731
    got = explained_variance(torch.where(mask, values, NAN), torch.where(mask, returns, NAN), mask)
    assert close(got, 1 - var(d) / var(r))
    assert float(explained_variance(returns, returns, mask)) == 1.0
    assert math.isnan(float(explained_variance(values, torch.ones_like(values), mask)))


# --------------------------------------------------------------------------- KL, entropy


@given(ppo_batches(), st.sampled_from(["k1", "k2", "k3"]))
@SETTINGS
def test_kl_estimators_equal_their_formulas_per_token(pb: dict, estimator: str) -> None:
    logp, ref, mask = pb["new"].clone().requires_grad_(True), pb["old"], pb["mask"]
    per_token, mean = kl_to_reference(logp, ref, mask, estimator)  # type: ignore[arg-type]
    want = [[0.0] * ref.shape[1] for _ in range(ref.shape[0])]
    grad = [[0.0] * ref.shape[1] for _ in range(ref.shape[0])]
    for b in range(ref.shape[0]):
        for t in range(ref.shape[1]):
            if mask[b, t]:
                d = float(pb["new"][b, t]) - float(ref[b, t])
                want[b][t] = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[estimator]
                grad[b][t] = {"k1": 1.0, "k2": d, "k3": 1 - math.exp(-d)}[estimator]
    n = max(int(mask.sum()), 1)
    assert close(per_token, want) and close(mean, sum(map(sum, want)) / n)
    mean.backward()
    assert close(logp.grad, [[x / n for x in row] for row in grad])


def test_k1_and_k3_are_unbiased_estimates_of_the_kl_on_exact_distributions() -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        logp = torch.log_softmax(2 * torch.randn(1, 6, generator=g, dtype=torch.float64), -1)
        logq = torch.log_softmax(2 * torch.randn(1, 6, generator=g, dtype=torch.float64), -1)
        p = logp.exp()[0].tolist()
        kl = sum(pi * (a - b) for pi, a, b in zip(p, logp[0].tolist(), logq[0].tolist()))
        mask = torch.ones(1, 6, dtype=torch.bool)
        for est in ("k1", "k3"):
            per_token, _ = kl_to_reference(logp, logq, mask, est)
            expectation = sum(pi * float(k) for pi, k in zip(p, per_token[0]))
            assert math.isclose(expectation, kl, rel_tol=1e-9, abs_tol=1e-12), est
        k3, _ = kl_to_reference(logp, logq, mask, "k3")
        k2, _ = kl_to_reference(logp, logq, mask, "k2")
        assert (k3 >= 0).all() and (k2 >= 0).all()
    with pytest.raises(ConfigError, match="k1, k2, k3"):
        kl_to_reference(logp, logq, mask, "k4")  # type: ignore[arg-type]


def test_adaptive_kl_controller_follows_the_formula_and_survives_a_round_trip() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    coef = 0.2
    updates = [(12.0, 256), (6.5, 256), (1.0, 512), (5.9, 128), (30.0, 1024), (0.0, 64)]
    for kl, n in updates:
        e = kl / 6.0 - 1.0
        e = 0.2 if e > 0.2 else (-0.2 if e < -0.2 else e)
        coef = coef * (1 + e * n / 10_000)
        ctl.update(kl, n)
        assert math.isclose(ctl.value, coef, rel_tol=1e-12)
    assert ctl.value != 0.2
    state = ctl.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    other = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    other.load_state_dict(dict(state))
    for kl, n in [(3.0, 100), (9.0, 300)]:
        ctl.update(kl, n)
        other.update(kl, n)
    assert other.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    again = FixedKLController(0.0)
    again.load_state_dict(fixed.state_dict())
    assert again.value == 0.05
    with pytest.raises(ConfigError, match="kl_target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ConfigError, match="kl_horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=-1)


def test_entropy_from_logits_equals_the_softmax_loop() -> None:
    g = torch.Generator().manual_seed(11)
    logits = 3 * torch.randn(2, 5, 7, generator=g)
    mask = torch.rand(2, 5, generator=g) < 0.6
    mask[0, 0] = True
    total, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                z = logits[b, t].tolist()
                zs = [math.exp(x - max(z)) for x in z]
                p = [x / sum(zs) for x in zs]
                total += -sum(q * math.log(q) for q in p)
                n += 1
    assert close(entropy_from_logits(logits, mask), total / n)
    uniform = torch.zeros(1, 2, 50, dtype=torch.bfloat16)
    got = entropy_from_logits(uniform, torch.ones(1, 2, dtype=torch.bool))
    assert got.dtype == torch.float32 and math.isclose(float(got), math.log(50), rel_tol=1e-6)


def test_entropy_coefficient_is_the_decayed_start_with_a_floor() -> None:
    for step in range(0, 300, 13):
        assert entropy_coefficient(step, 0.05, 0.99, 0.01) == max(0.05 * 0.99**step, 0.01)


# --------------------------------------------------------------------------- REINFORCE


@given(ppo_batches())
@SETTINGS
def test_reinforce_loss_and_gradient_equal_the_loop(pb: dict) -> None:
    logp = pb["new"].clone().requires_grad_(True)
    adv = pb["adv"].clone().requires_grad_(True)
    loss = reinforce_loss(logp, adv, pb["mask"])
    loss.backward()
    n = max(int(pb["mask"].sum()), 1)
    ref, grad = 0.0, [[0.0] * logp.shape[1] for _ in range(logp.shape[0])]
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if pb["mask"][b, t]:
                a = float(pb["adv"][b, t])
                ref -= a * float(pb["new"][b, t])
                grad[b][t] = -a / n
    assert close(loss, ref / n) and close(logp.grad, grad)
    assert adv.grad is None  # the advantage is a constant


@given(
    st.lists(st.tuples(st.integers(0, 4), st.floats(-5, 5)), min_size=1, max_size=12),
)
@SETTINGS
def test_leave_one_out_baseline_is_the_mean_of_the_others(samples: list) -> None:
    ids = torch.tensor([s[0] * 7 - 3 for s in samples])  # arbitrary integer ids
    rewards = torch.tensor([s[1] for s in samples], dtype=torch.float64)
    got = leave_one_out_baseline(rewards, ids)
    for i, (gi, _) in enumerate(samples):
        others = [r for j, (gj, r) in enumerate(samples) if gj == gi and j != i]
        want = sum(others) / len(others) if others else 0.0
        assert math.isclose(float(got[i]), want, abs_tol=1e-9)


def test_leave_one_out_advantages_sum_to_zero_per_group_and_a_lone_sample_keeps_its_reward() -> (
    None
):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0])
    ids = torch.tensor([0, 0, 0, 0, 9])
    adv = rewards - leave_one_out_baseline(rewards, ids)
    assert close(adv, [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3, 3.0], tol=1e-6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    tok = sequence_to_tokens(adv, mask)
    for b in range(5):
        for t in range(3):
            assert float(tok[b, t]) == (float(adv[b]) if mask[b, t] else 0.0)


@given(token_batches())
@SETTINGS
def test_whiten_equals_the_masked_mean_and_unbiased_std_loop(tb: dict) -> None:
    x, mask = tb["values"], tb["mask"]
    out = whiten(x, mask)
    real = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    n = len(real)
    mean = sum(real) / n if n else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in real) / max(n - 1, 1))
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            want = (float(x[b, t]) - mean) / (std + 1e-8) if mask[b, t] else 0.0
            assert math.isclose(float(out[b, t]), want, rel_tol=1e-4, abs_tol=1e-3)


def test_the_qa_policy_uses_the_same_functions() -> None:
    for qa_name, name in [
        ("masked_mean", "masked_mean"),
        ("discounted_returns", "discounted_returns"),
        ("gae_advantages", "gae_advantages"),
        ("normalize_advantages", "whiten"),
        ("value_loss", "value_loss"),
        ("entropy_coefficient", "entropy_coefficient"),
    ]:
        assert getattr(qa, qa_name) is getattr(rl_losses, name), qa_name
