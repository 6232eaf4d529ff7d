"""The fast-step plumbing computes what the plain one does (trainer/stepping.py).

- ``adam_step`` leaves parameters and optimizer states bit-for-bit where ``opt.step()``
  leaves them, through LR changes, skipped parameters and optimizers it does not handle;
- IQL's single backward pass gives each network the gradient of its own loss alone;
- a compile that fails falls back to the eager function with a warning, and (slow) a
  compiled update matches an eager one.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.store import ActionSpace
from trainer.algos import AlgoContext, make_algorithm
from trainer.batch import TransitionBatch
from trainer.stepping import LossFunction, adam_step, backward_and_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBS_DIM, ACT_DIM, N_ACTIONS, BATCH = 5, 2, 3, 32
SMALL = {"hidden": (16, 16), "compute_dtype": "float32"}


def nets(seed: int) -> list[nn.Sequential]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3)]


def optimizers(models: list[nn.Sequential]) -> list[torch.optim.Optimizer]:
    a, b, c = (list(m.parameters()) for m in models)
    return [
        torch.optim.Adam(a, lr=1e-2, fused=True),
        # two groups with their own hyper-parameters, one with weight decay
        torch.optim.Adam(
            [{"params": b[:2], "lr": 3e-3}, {"params": b[2:], "lr": 5e-3, "weight_decay": 0.1}],
            betas=(0.8, 0.95),
            eps=1e-6,
            fused=True,
        ),
        torch.optim.SGD(c, lr=1e-2, momentum=0.9),  # not a fused Adam: its own step()
    ]


def train(step_all: Any, steps: int = 6) -> tuple[list[nn.Sequential], list[torch.optim.Optimizer]]:
    models = nets(0)
    opts = optimizers(models)
    schedule = torch.optim.lr_scheduler.LambdaLR(opts[0], lambda k: 1.0 / (1 + k))
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 4, generator=g)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss = sum(m(x).square().mean() for m in models)
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        if step == 3:  # a parameter without a gradient this step is left alone
            models[1][0].bias.grad = None
        step_all(opts)
        schedule.step()
    return models, opts


def test_adam_step_equals_optimizer_step_bit_for_bit() -> None:
    def one_by_one(opts: list[torch.optim.Optimizer]) -> None:
        for opt in opts:
            opt.step()

    ref_models, ref_opts = train(one_by_one)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the LR scheduler's "step() before optimizer.step()"
        models, opts = train(adam_step)
    for a, b in zip(ref_models, models):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    for ref_opt, opt in zip(ref_opts, opts):
        sa, sb = ref_opt.state_dict(), opt.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        assert sa["state"].keys() == sb["state"].keys()
        for k in sa["state"]:
            for name, value in sa["state"][k].items():
                assert torch.equal(value, sb["state"][k][name]), (k, name)


def test_adam_step_takes_the_fused_kernel_once_per_hyper_parameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models = nets(0)
    opts = optimizers(models)
    for m in models:
        m(torch.randn(3, 4)).sum().backward()
    for opt in opts:
        opt.step()  # Adam creates its state on the first step
    calls: list[int] = []
    fused = torch._fused_adam_

    def counting(params: list[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        calls.append(len(params))
        fused(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", counting)
    adam_step(opts)
    assert sorted(calls) == [2, 2, 4]  # the first Adam's 4 tensors, then 2 groups of 2


def ctx(discrete: bool) -> AlgoContext:
    if discrete:
        space = ActionSpace("discrete", N_ACTIONS, None, None, None)
    else:
        space = ActionSpace("continuous", None, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM))
    return AlgoContext(
        obs_dim=OBS_DIM,
        action_space=space,
        obs_mean=np.zeros(OBS_DIM, np.float32),
        obs_std=np.ones(OBS_DIM, np.float32),
        discount=0.9,
        device=torch.device("cpu"),
    )


def batch(discrete: bool, seed: int) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    if discrete:
        actions = torch.randint(0, N_ACTIONS, (BATCH,), generator=g)
    else:
        actions = torch.rand(BATCH, ACT_DIM, generator=g) * 2 - 1
    return TransitionBatch(
        observations=torch.randn(BATCH, OBS_DIM, generator=g),
        actions=actions,
        rewards=torch.randn(BATCH, generator=g),
        next_observations=torch.randn(BATCH, OBS_DIM, generator=g),
        terminated=(torch.rand(BATCH, generator=g) < 0.2).float(),
        truncated=torch.zeros(BATCH),
        return_to_go=torch.zeros(BATCH),
    )


@pytest.mark.parametrize("discrete", [False, True])
def test_iql_one_backward_gives_each_network_its_own_loss_gradient(discrete: bool) -> None:
    algo: Any = make_algorithm("iql", ctx(discrete), dict(SMALL))
    b = batch(discrete, 0)
    obs, next_obs = algo.obs_norm(b.observations), algo.obs_norm(b.next_observations)
    actions = b.actions if discrete else algo.action_scaler.to_unit(b.actions)
    with torch.no_grad():
        target_q = algo._q(algo.target_critic, obs, actions).amin(dim=0)
        next_v = algo.value(next_obs)
    v_loss, adv, _ = algo._v_loss(obs, target_q)
    q_loss, _ = algo._q_loss(obs, actions, b.rewards, b.terminated, next_v)
    actor_loss, _ = algo._actor_loss(obs, actions, adv)
    own = [
        (v_loss, algo.value_params),
        (q_loss, algo.critic_params),
        (actor_loss, algo.actor_params),
    ]
    expected = [torch.autograd.grad(loss, params, retain_graph=True) for loss, params in own]

    total, _ = algo._losses(b.observations, b.actions, b.rewards, b.terminated, b.next_observations)
    for p in algo.value_params + algo.critic_params + algo.actor_params:
        p.grad = None
    total.backward()
    for grads, (_, params) in zip(expected, own):
        for g, p in zip(grads, params):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


def test_cql_penalty_in_blocks_of_states_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.algos import cql

    # float32 throughout: "auto" would pick bfloat16 on CPUs with bf16 units, whose GEMM
    # blocking (and so rounding) depends on the block's row count
    config = {**SMALL, "critic_hidden": (16, 16), "penalty_dtype": "float32"}
    algo: Any = make_algorithm("cql", ctx(False), config)
    b = batch(False, 0)
    obs, next_obs = algo.obs_norm(b.observations), algo.obs_norm(b.next_observations)
    actions = algo.action_scaler.to_unit(b.actions)
    mean, log_std = algo.actor(obs)
    results = []
    for rows in (10**9, 70):  # one pass; blocks of 2 states (31 actions each), ragged last
        monkeypatch.setattr(cql, "PENALTY_CHUNK_ROWS", rows)
        torch.manual_seed(0)
        loss, metrics = algo._continuous_critic_loss(
            obs, actions, b.rewards, b.terminated, next_obs, mean.detach(), log_std.detach()
        )
        grads = torch.autograd.grad(loss, algo.critic_params)
        results.append((loss.detach(), metrics["gap"], grads))
    (loss1, gap1, grads1), (loss2, gap2, grads2) = results
    torch.testing.assert_close(loss2, loss1)
    torch.testing.assert_close(gap2, gap1)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)


def test_backward_and_step_clips_each_network_on_its_own() -> None:
    a, b = nn.Linear(3, 1), nn.Linear(3, 1)
    opt_a = torch.optim.SGD(a.parameters(), lr=1.0)
    opt_b = torch.optim.SGD(b.parameters(), lr=1.0)
    before_a = [p.detach().clone() for p in a.parameters()]
    x = torch.ones(4, 3)
    loss = 1000.0 * a(x).sum() + 1e-3 * b(x).sum()
    backward_and_step(loss, [(opt_a, list(a.parameters())), (opt_b, list(b.parameters()))], 1.0)
    step_a = torch.cat([(p0 - p.detach()).flatten() for p0, p in zip(before_a, a.parameters())])
    assert abs(float(step_a.norm()) - 1.0) < 1e-5  # clipped to norm 1 ...
    grad_b = torch.cat([p.grad.flatten() for p in b.parameters()])  # type: ignore[union-attr]
    assert float(grad_b.norm()) < 0.1  # ... while b's small gradient is left as it is


def test_compile_flag_is_a_boolean() -> None:
    for name in ("bc", "iql", "cql"):
        with pytest.raises(ValueError, match=rf"{name}\.compile: expected true or false"):
            make_algorithm(name, ctx(False), {"compile": "yes"})


def test_failed_compile_falls_back_to_eager_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    lin = nn.Linear(3, 2)

    def losses(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = lin(x).square().mean()
        return loss, {"loss": loss.detach()}

    torch._dynamo.reset()
    fn = LossFunction(losses, compile=True, name="tiny")
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="tiny: torch.compile failed .*compile: false"):
        loss, metrics = fn(x)
    assert not fn.is_compiled
    torch.testing.assert_close(loss, losses(x)[0])
    loss2, _ = fn(x)  # eager from now on, no second warning
    torch.testing.assert_close(loss2, loss)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,discrete",
    [("bc", False), ("iql", False), ("iql", True), ("cql", False), ("cql", True)],
)
def test_compiled_update_matches_eager(name: str, discrete: bool) -> None:
    """torch.compile (inductor) of the losses: same weights after a few updates, up to float
    rounding; CQL's sampled actions come from the same random stream."""
    torch._dynamo.reset()
    config: dict[str, Any] = dict(SMALL)
    if name != "bc":
        config["critic_hidden"] = (16, 16)
    if name == "cql" and not discrete:
        config["penalty_dtype"] = "float32"
    torch.manual_seed(0)
    eager: Any = make_algorithm(name, ctx(discrete), config)
    compiled: Any = make_algorithm(name, ctx(discrete), {**config, "compile": True})
    compiled.load_state_dict(eager.state_dict())
    for step in range(4):
        b = batch(discrete, step)
        torch.manual_seed(100 + step)
        m_eager = eager.update(b)
        torch.manual_seed(100 + step)
        m_compiled = compiled.update(b)
        assert m_eager.keys() == m_compiled.keys()
    assert any(f.is_compiled for f in vars(compiled).values() if isinstance(f, LossFunction))
    for key, module in eager.modules.items():
        for (pname, p), q in zip(
            module.state_dict().items(), compiled.modules[key].state_dict().values()
        ):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"{key}.{pname}")
