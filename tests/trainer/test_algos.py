"""The contract every native algorithm keeps, on tiny synthetic problems.

One parametrised test per property runs over every algorithm x {discrete, continuous}
(plus a few non-default configurations), so a new algorithm is checked by adding it to
``trainer.algos.ALGORITHMS``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.store import ActionSpace
from trainer.algos import ALGORITHMS, AlgoContext, make_algorithm
from trainer.algos.base import AlgorithmBase
from trainer.batch import TransitionBatch

OBS_DIM, ACT_DIM, N_ACTIONS, BATCH = 4, 2, 3, 64
LOW, HIGH = np.array([-2.0, 0.0]), np.array([2.0, 1.0])  # not [-1, 1]: exercises the scaling
SMALL = {"hidden": (32, 32)}
SMALL_CRITIC = {"hidden": (32, 32), "critic_hidden": (32, 32)}

CASES: list[tuple[str, bool, dict[str, Any]]] = [
    (name, discrete, dict(SMALL if name == "bc" else SMALL_CRITIC))
    for name in ALGORITHMS
    for discrete in (False, True)
]
CASES += [
    ("bc", False, {**SMALL, "loss": "mse", "grad_clip": 1.0}),
    ("cql", False, {**SMALL_CRITIC, "cql_auto_alpha": True, "penalty_dtype": "bfloat16"}),
    ("cql", True, {**SMALL_CRITIC, "cql_auto_alpha": True, "n_critics": 2, "grad_clip": 10.0}),
    ("iql", False, {**SMALL_CRITIC, "grad_clip": 1.0, "compute_dtype": "float32"}),
    ("iql", True, {**SMALL_CRITIC, "compute_dtype": "float32"}),
    ("bc", True, {**SMALL, "compute_dtype": "float32"}),
    ("cql", False, {**SMALL_CRITIC, "compute_dtype": "float32", "penalty_dtype": "float32"}),
]
IDS = [f"{n}-{'discrete' if d else 'continuous'}-{i}" for i, (n, d, _) in enumerate(CASES)]

torch.set_num_threads(1)


def make_ctx(discrete: bool, discount: float = 0.9) -> AlgoContext:
    if discrete:
        space = ActionSpace("discrete", N_ACTIONS, None, None, None)
    else:
        space = ActionSpace("continuous", None, ACT_DIM, LOW, HIGH)
    rng = np.random.default_rng(0)
    return AlgoContext(
        obs_dim=OBS_DIM,
        action_space=space,
        obs_mean=rng.normal(size=OBS_DIM).astype(np.float32),
        obs_std=rng.uniform(0.5, 2.0, size=OBS_DIM).astype(np.float32),
        discount=discount,
        device=torch.device("cpu"),
    )


class ExpertProblem:
    """Observations ~ N(0, I); the expert's action is a fixed function of the observation.

    Rewards are 1 at the expert's action and fall off away from it, so a value function
    has something to fit and a cloned policy has something to match.
    """

    def __init__(self, discrete: bool, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.discrete = discrete
        self.w = torch.randn(OBS_DIM, N_ACTIONS if discrete else ACT_DIM, generator=g)
        self.g = g

    def expert(self, obs: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return (obs @ self.w).argmax(dim=-1)
        unit = torch.tanh(obs @ self.w) * 0.9
        return torch.as_tensor((LOW + HIGH) / 2, dtype=torch.float32) + unit * torch.as_tensor(
            (HIGH - LOW) / 2, dtype=torch.float32
        )

    def batch(self, size: int = BATCH, noise: float = 0.0) -> TransitionBatch:
        obs = torch.randn(size, OBS_DIM, generator=self.g)
        actions = self.expert(obs)
        if noise and not self.discrete:
            actions = actions + noise * torch.randn(actions.shape, generator=self.g)
            actions = torch.maximum(
                torch.minimum(actions, torch.as_tensor(HIGH).float()), torch.as_tensor(LOW).float()
            )
        if self.discrete:
            rewards = (actions == self.expert(obs)).float()
        else:
            rewards = 1.0 - (actions - self.expert(obs)).square().sum(-1)
        terminated = (torch.rand(size, generator=self.g) < 0.1).float()
        return TransitionBatch(
            observations=obs,
            actions=actions,
            rewards=rewards,
            next_observations=torch.randn(size, OBS_DIM, generator=self.g),
            terminated=terminated,
            truncated=torch.zeros(size),
            return_to_go=rewards,
        )


def build(name: str, discrete: bool, config: dict[str, Any], seed: int = 0) -> AlgorithmBase:
    torch.manual_seed(seed)
    algo = make_algorithm(name, make_ctx(discrete), config)
    assert isinstance(algo, AlgorithmBase)
    return algo


def params_of(algo: AlgorithmBase) -> dict[str, torch.Tensor]:
    return {
        f"{opt_name}/{i}": p.detach().clone()
        for opt_name, opt in algo.optimizers.items()
        for group in opt.param_groups
        for i, p in enumerate(group["params"])
    }


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize(("name", "discrete", "config"), CASES, ids=IDS)
def test_update_changes_weights_and_returns_detached_scalars(
    name: str, discrete: bool, config: dict[str, Any]
) -> None:
    algo = build(name, discrete, config)
    problem = ExpertProblem(discrete)
    before = params_of(algo)
    metrics = algo.update(problem.batch())
    after = params_of(algo)
    for opt_name in algo.optimizers:
        changed = [
            k
            for k in before
            if k.startswith(opt_name + "/") and not torch.equal(before[k], after[k])
        ]
        assert changed, f"{name}: no parameter of optimizer {opt_name!r} moved"
    assert metrics
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert not value.requires_grad, key
        assert torch.isfinite(value), key
    evaluation = algo.evaluate(problem.batch())
    assert evaluation and all(isinstance(v, float) and np.isfinite(v) for v in evaluation.values())


@pytest.mark.parametrize(("name", "discrete", "config"), CASES, ids=IDS)
def test_state_dict_round_trip(name: str, discrete: bool, config: dict[str, Any]) -> None:
    problem = ExpertProblem(discrete)
    algo = build(name, discrete, config, seed=0)
    for _ in range(3):
        algo.update(problem.batch())
    buf = io.BytesIO()
    torch.save(algo.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    clone = build(name, discrete, config, seed=1)  # different initial weights
    clone.load_state_dict(state)
    obs = np.random.default_rng(3).normal(size=(16, OBS_DIM)).astype(np.float32)
    np.testing.assert_array_equal(algo.act(obs), clone.act(obs))

    # identical next steps: optimizer moments, step counts and scalars came along
    batch = problem.batch()
    torch.manual_seed(7)
    m1 = algo.update(batch)
    torch.manual_seed(7)
    m2 = clone.update(batch)
    for key in m1:
        torch.testing.assert_close(m1[key], m2[key], rtol=0, atol=0)
    for k, v in params_of(algo).items():
        torch.testing.assert_close(v, params_of(clone)[k], rtol=0, atol=0)


@pytest.mark.parametrize(("name", "discrete", "config"), CASES, ids=IDS)
def test_init_from_bc_copies_the_actor(name: str, discrete: bool, config: dict[str, Any]) -> None:
    problem = ExpertProblem(discrete)
    same = {k: config[k] for k in ("hidden", "compute_dtype") if k in config}
    bc = build("bc", discrete, same, seed=5)
    for _ in range(5):
        bc.update(problem.batch())
    algo = build(name, discrete, config, seed=6)
    obs = np.random.default_rng(4).normal(size=(32, OBS_DIM)).astype(np.float32)
    algo.init_from(bc.state_dict())
    np.testing.assert_allclose(algo.act(obs), bc.act(obs), rtol=1e-6, atol=1e-6)
    single = algo.act(obs[0])
    assert single.shape == (() if discrete else (ACT_DIM,))
    if not discrete:
        assert np.all(algo.act(obs, deterministic=False) >= LOW - 1e-6)
        assert np.all(algo.act(obs, deterministic=False) <= HIGH + 1e-6)


@pytest.mark.parametrize(("name", "discrete", "config"), CASES, ids=IDS)
def test_tiny_problem_learns(name: str, discrete: bool, config: dict[str, Any]) -> None:
    problem = ExpertProblem(discrete, seed=11)
    config = {**config, **({"lr": 3e-3} if name == "bc" else {})}
    algo = build(name, discrete, config, seed=2)
    val = problem.batch(512, noise=0.1)
    first = algo.evaluate(val)
    for _ in range(200):
        algo.update(problem.batch(noise=0.1))
    last = algo.evaluate(val)
    if name == "bc":
        if discrete:
            assert last["accuracy"] > 0.85, (first, last)
        else:
            assert last["action_mse"] < 0.5 * first["action_mse"], (first, last)
    else:
        assert last["td_error"] < 0.5 * first["td_error"], (first, last)


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize(
    ("name", "discrete"), [("iql", False), ("iql", True), ("cql", False), ("cql", True)]
)
def test_no_bootstrap_through_terminated(name: str, discrete: bool) -> None:
    """With the bootstrap value pinned to C, the TD loss equals the one for r + g(1-d)C."""
    algo = build(name, discrete, dict(SMALL_CRITIC), seed=0)
    modules: Any = algo.modules
    big = 1000.0
    # Pin what the target bootstraps from (IQL: V(s'), CQL: the target critics) to `big`.
    pinned = (
        modules["value"].net.layers[-1]
        if name == "iql"
        else modules["target_critic"].net.layers[-1]
    )
    with torch.no_grad():
        pinned.weight.zero_()
        pinned.bias.fill_(big)
    batch = ExpertProblem(discrete).batch()
    terminated = torch.zeros(BATCH)
    terminated[::2] = 1.0  # half really ended ...
    truncated = 1.0 - terminated  # ... the other half were cut off: they bootstrap
    batch = TransitionBatch(
        batch.observations,
        batch.actions,
        batch.rewards,
        batch.next_observations,
        terminated,
        truncated,
        batch.return_to_go,
    )
    with torch.no_grad():
        obs = algo.obs_norm(batch.observations)
        critic = modules["critic"]
        if discrete:
            q = (
                critic(obs)
                .gather(-1, batch.actions.view(1, -1, 1).expand(critic.net.n_members, -1, 1))
                .squeeze(-1)
            )
        else:
            q = critic(obs, algo.action_scaler.to_unit(batch.actions))
    target = batch.rewards + algo.ctx.discount * (1.0 - terminated) * big
    expected = (q - target).square().mean(dim=-1).sum()
    metrics = algo.update(batch)
    td = metrics["q_loss"] if name == "iql" else metrics["td_loss"]
    torch.testing.assert_close(td, expected, rtol=1e-5, atol=1e-3)
    bootstrapped_all = (q - (batch.rewards + algo.ctx.discount * big)).square().mean(dim=-1).sum()
    assert abs(float(td) - float(bootstrapped_all)) > 1.0


# ----------------------------------------------------------------------------- config
def test_unknown_hyper_parameter_is_named() -> None:
    with pytest.raises(ValueError, match="'expectle'"):
        make_algorithm("iql", make_ctx(False), {"expectle": 0.7})
    with pytest.raises(ValueError, match="unknown algorithm 'dqn'"):
        make_algorithm("dqn", make_ctx(False), {})


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("iql", {"expectile": 1.5}, "iql.expectile"),
        ("bc", {"hidden": []}, "bc.hidden"),
        ("cql", {"penalty_dtype": "float16"}, "cql.penalty_dtype"),
        ("iql", {"compute_dtype": "fp8"}, "iql.compute_dtype"),
        ("bc", {"loss": "huber"}, "bc.loss"),
    ],
)
def test_bad_values_say_which_field(name: str, config: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_algorithm(name, make_ctx(False), config)


def test_init_from_mismatched_actor_is_a_clear_error() -> None:
    bc = build("bc", False, {"hidden": (16,)})
    iql = build("iql", False, dict(SMALL_CRITIC))
    with pytest.raises(ValueError, match="hidden"):
        iql.init_from(bc.state_dict())


def test_continuous_cql_needs_finite_bounds() -> None:
    ctx = make_ctx(False)
    space = ActionSpace(
        "continuous", None, ACT_DIM, np.full(ACT_DIM, -np.inf), np.full(ACT_DIM, np.inf)
    )
    unbounded = AlgoContext(ctx.obs_dim, space, ctx.obs_mean, ctx.obs_std, ctx.discount, ctx.device)
    with pytest.raises(ValueError, match="finite action"):
        make_algorithm("cql", unbounded, {})
    # BC and IQL use an unsquashed Gaussian there
    for name in ("bc", "iql"):
        algo = make_algorithm(name, unbounded, dict(SMALL_CRITIC) if name == "iql" else dict(SMALL))
        assert algo.act(np.zeros(OBS_DIM, np.float32)).shape == (ACT_DIM,)


def test_bf16_penalty_matches_float32() -> None:
    """Fast (bfloat16 hidden layers) and exact penalty agree in value and gradient."""
    from trainer.losses import cql_logsumexp_penalty
    from trainer.nets import ContinuousCritic

    torch.manual_seed(0)
    critic = ContinuousCritic(2, 17, 6, (256, 256))
    last: Any = critic.net.layers[-1]
    with torch.no_grad():  # Q around 100, as after some training
        last.weight.mul_(30.0)
        last.bias.fill_(100.0)
    obs, data = torch.randn(128, 17), torch.rand(128, 6) * 2 - 1
    sampled, log_density = torch.rand(128, 30, 6) * 2 - 1, torch.randn(128, 30)

    def penalty(dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        critic.zero_grad()
        q_sampled = critic(obs, sampled, dtype=dtype)
        gap = cql_logsumexp_penalty(critic(obs, data), q_sampled, log_density)
        gap.sum().backward()
        grad = torch.cat([p.grad.flatten() for p in critic.parameters() if p.grad is not None])
        return q_sampled.detach(), gap.detach(), grad

    q32, gap32, grad32 = penalty(None)
    q16, gap16, grad16 = penalty(torch.bfloat16)
    assert q16.dtype == torch.float32
    assert float((q32 - q16).abs().mean()) < 1e-3 * float(q32.abs().mean())
    torch.testing.assert_close(gap16, gap32, rtol=0, atol=1e-2)
    assert float(torch.nn.functional.cosine_similarity(grad32, grad16, dim=0)) > 0.99


def test_scalar_output_layer_matches_batched_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast single-output layer (large batches) equals baddbmm in value and gradient."""
    from trainer import nets

    monkeypatch.setattr(nets, "SCALAR_OUTPUT_CHUNK", 3)  # several chunks, a ragged last one
    torch.manual_seed(0)
    for k, n in [(2, 7), (1, 5), (3, 40)]:
        h = torch.randn(k, n, 16, dtype=torch.float64, requires_grad=True)
        w = torch.randn(k, 16, 1, dtype=torch.float64, requires_grad=True)
        b = torch.randn(k, 1, 1, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(nets._ScalarOutput.apply, (h, w, b))
        torch.testing.assert_close(nets._ScalarOutput.apply(h, w, b), torch.baddbmm(b, h, w))
    # bfloat16 activations: float32 output, input gradient back in bfloat16
    h = torch.randn(2, 10, 16).to(torch.bfloat16).requires_grad_()
    w = torch.randn(2, 16, 1, requires_grad=True)
    b = torch.randn(2, 1, 1, requires_grad=True)
    y = nets._ScalarOutput.apply(h, w, b)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.baddbmm(b, h.float(), w))
    y.sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16
