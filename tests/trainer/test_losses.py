"""Every loss in trainer.losses against a NumPy reference written from its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.typing import ArrayLike

from trainer import losses as L

RNG = np.random.default_rng(1234)
floats = st.floats(-50.0, 50.0, allow_nan=False, width=32)


def t(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def close(
    actual: torch.Tensor, expected: ArrayLike, rtol: float = 1e-5, atol: float = 1e-5
) -> None:
    np.testing.assert_allclose(
        actual.detach().double().numpy(),
        np.asarray(expected, dtype=np.float64),
        rtol=rtol,
        atol=atol,
    )


# ----------------------------------------------------------------------------- references
def np_logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_gaussian_log_prob(x: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> np.ndarray:
    var = np.exp(2 * log_std)
    return (-((x - mean) ** 2) / (2 * var) - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)


def np_log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - np_logsumexp(logits, -1)[..., None]


# ----------------------------------------------------------------------------- values
def test_td_target_fixed() -> None:
    r = np.array([1.0, -0.5, 2.0, 0.0])
    done = np.array([0.0, 1.0, 0.0, 1.0])
    v = np.array([10.0, 10.0, -3.0, 7.0])
    close(L.td_target(t(r), t(done), t(v), 0.9), r + 0.9 * (1 - done) * v)
    # an ensemble of next values broadcasts over the batch
    vk = RNG.normal(size=(2, 4))
    close(L.td_target(t(r), t(done), t(vk), 0.99), r + 0.99 * (1 - done) * vk)


def test_td_target_never_bootstraps_through_terminated() -> None:
    huge = t(np.full(3, 1e6))
    out = L.td_target(t([1.0, 2.0, 3.0]), t([1.0, 1.0, 1.0]), huge, 0.99)
    close(out, np.array([1.0, 2.0, 3.0]))


def test_q_regression_loss_sums_critics() -> None:
    q = RNG.normal(size=(3, 8))
    target = RNG.normal(size=8)
    close(L.q_regression_loss(t(q), t(target)), ((q - target) ** 2).mean(axis=1).sum())


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.integers(1, 40), elements=floats), st.floats(0.01, 0.99))
def test_expectile_loss_matches_reference(diff: np.ndarray, tau: float) -> None:
    expected = np.mean(np.abs(tau - (diff < 0).astype(np.float64)) * diff.astype(np.float64) ** 2)
    close(L.expectile_loss(t(diff), tau), expected, rtol=1e-4, atol=1e-3)


def test_expectile_loss_asymmetry() -> None:
    # tau = 0.7: a positive residual costs 0.7 u^2, a negative one 0.3 u^2
    close(L.expectile_loss(t([2.0]), 0.7), np.array(0.7 * 4))
    close(L.expectile_loss(t([-2.0]), 0.7), np.array(0.3 * 4))
    # tau = 0.5 is half the mean squared error
    d = RNG.normal(size=16)
    close(L.expectile_loss(t(d), 0.5), 0.5 * np.mean(d**2))


def test_double_dqn_target_fixed() -> None:
    r = np.array([0.5, 1.0, -1.0])
    done = np.array([0.0, 0.0, 1.0])
    online = RNG.normal(size=(2, 3, 4))
    target = RNG.normal(size=(2, 3, 4))
    best = online.mean(0).argmax(-1)
    next_v = target[:, np.arange(3), best].min(0)
    expected = r + 0.95 * (1 - done) * next_v
    close(L.double_dqn_target(t(r), t(done), t(online), t(target), 0.95), expected)


# ----------------------------------------------------------------------------- policies
def test_gaussian_log_prob_fixed() -> None:
    x, mean, log_std = (RNG.normal(size=(5, 3)) for _ in range(3))
    close(L.gaussian_log_prob(t(x), t(mean), t(log_std)), np_gaussian_log_prob(x, mean, log_std))


def test_gaussian_log_prob_matches_torch_distribution() -> None:
    x, mean, log_std = (torch.randn(7, 4) for _ in range(3))
    ref = torch.distributions.Normal(mean, log_std.exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(L.gaussian_log_prob(x, mean, log_std), ref)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, (6,), elements=st.floats(-8.0, 8.0, width=32)))
def test_tanh_log_det_is_stable_and_exact(u: np.ndarray) -> None:
    expected = np.log1p(-(np.tanh(u.astype(np.float64)) ** 2)).sum()
    out = L.tanh_log_det_jacobian(t(u))
    assert torch.isfinite(out)
    close(out, expected, rtol=1e-4, atol=1e-4)


def test_tanh_log_det_large_inputs_stay_finite() -> None:
    out = L.tanh_log_det_jacobian(t([[50.0, -60.0]]))
    assert torch.isfinite(out).all()
    # log(1 - tanh(u)^2) ~ 2 log 2 - 2|u| for large |u|
    close(out, np.array([2 * math.log(2) * 2 - 2 * 110.0]), rtol=1e-5)


def test_tanh_gaussian_log_prob_fixed() -> None:
    u, mean, log_std = (RNG.normal(size=(4, 2)) for _ in range(3))
    expected = np_gaussian_log_prob(u, mean, log_std) - np.log(1 - np.tanh(u) ** 2).sum(-1)
    close(L.tanh_gaussian_log_prob(t(u), t(mean), t(log_std)), expected, rtol=1e-4)


def test_tanh_gaussian_is_a_density_in_one_dimension() -> None:
    # integrate exp(log p(a)) over a in (-1, 1) numerically: it is a probability density
    a = np.linspace(-0.9999, 0.9999, 200001)
    u = np.arctanh(a)[:, None]
    logp = L.tanh_gaussian_log_prob(
        torch.tensor(u, dtype=torch.float64),
        torch.tensor([[0.3]], dtype=torch.float64),
        torch.tensor([[-0.5]], dtype=torch.float64),
    )
    integral = np.trapezoid(np.exp(logp.numpy()), a)
    assert integral == pytest.approx(1.0, abs=1e-3)


def test_clipped_atanh() -> None:
    a = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    expected = np.arctanh(np.clip(a, -1 + 1e-3, 1 - 1e-3))
    close(L.clipped_atanh(t(a), 1e-3), expected, rtol=1e-4)


def test_categorical_log_prob() -> None:
    logits = RNG.normal(size=(6, 5))
    actions = RNG.integers(0, 5, size=6)
    expected = np_log_softmax(logits)[np.arange(6), actions]
    close(L.categorical_log_prob(t(logits), torch.as_tensor(actions)), expected)


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float32, st.integers(1, 30), elements=floats),
    st.floats(0.1, 10.0),
    st.floats(1.0, 200.0),
)
def test_awr_weights(adv: np.ndarray, beta: float, max_weight: float) -> None:
    with np.errstate(over="ignore"):
        expected = np.minimum(np.exp(beta * adv.astype(np.float64)), max_weight)
    close(L.awr_weights(t(adv), beta, max_weight), expected, rtol=1e-4, atol=1e-6)


def test_awr_weights_carry_no_gradient() -> None:
    adv = torch.randn(4, requires_grad=True)
    assert not L.awr_weights(adv, 3.0, 100.0).requires_grad


def test_awr_loss() -> None:
    logp, w = RNG.normal(size=9), RNG.uniform(0, 5, size=9)
    close(L.awr_loss(t(logp), t(w)), -(w * logp).mean())


def test_sac_actor_and_temperature_losses() -> None:
    q, logp = RNG.normal(size=8), RNG.normal(size=8)
    close(L.sac_actor_loss(t(q), t(logp), torch.tensor(0.2)), (0.2 * logp - q).mean())
    log_temp = torch.tensor(math.log(0.5), requires_grad=True)
    loss = L.temperature_loss(log_temp, t(logp), -3.0)
    close(loss, -(math.log(0.5) * (logp - 3.0).mean()))
    loss.backward()
    # entropy -mean(logp) below the target -> the gradient step raises the temperature
    assert log_temp.grad is not None
    assert float(log_temp.grad) == pytest.approx(-(logp - 3.0).mean(), rel=1e-5)


# ----------------------------------------------------------------------------- CQL
def test_cql_logsumexp_penalty_fixed() -> None:
    k, b, m = 2, 5, 7
    q_data = RNG.normal(size=(k, b))
    q_sampled = RNG.normal(size=(k, b, m)) * 3
    log_density = RNG.normal(size=(b, m))
    expected = (np_logsumexp(q_sampled - log_density, -1) - q_data).mean(-1)
    close(L.cql_logsumexp_penalty(t(q_data), t(q_sampled), t(log_density)), expected, rtol=1e-5)


def test_cql_penalty_importance_correction_estimates_the_integral() -> None:
    # Q(s, a) = 0 on [-1, 1]^2 : log integral exp Q da = log 4. Uniform proposals have
    # density 1/4, so logsumexp(Q - log p) - log M -> log 4 exactly.
    m = 50
    q_sampled = torch.zeros(1, 3, m)
    log_density = torch.full((3, m), -2 * math.log(2))
    gap = L.cql_logsumexp_penalty(torch.zeros(1, 3), q_sampled, log_density)
    assert float(gap - math.log(m)) == pytest.approx(math.log(4.0), abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 5), st.integers(0, 10_000))
def test_discrete_cql_penalty(k: int, b: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(k, b, n)) * 5
    a = rng.integers(0, n, size=b)
    expected = (np_logsumexp(q, -1) - q[:, np.arange(b), a]).mean(-1)
    close(L.discrete_cql_penalty(t(q), torch.as_tensor(a)), expected, rtol=1e-5, atol=1e-5)
    # it is the cross-entropy of softmax(Q) with the data's actions
    ce = -np_log_softmax(q)[:, np.arange(b), a].mean(-1)
    np.testing.assert_allclose(expected, ce, rtol=1e-9)


def test_cql_alpha_loss() -> None:
    log_alpha = torch.tensor(math.log(2.0), requires_grad=True)
    gap = t([12.0, 14.0])
    loss = L.cql_alpha_loss(log_alpha, gap, 10.0)
    close(loss, np.array(-(2.0 * (np.array([12.0, 14.0]) - 10.0)).mean()))
    loss.backward()
    assert log_alpha.grad is not None and float(log_alpha.grad) < 0  # gap above target: alpha grows
