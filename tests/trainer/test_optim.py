"""trainer.optim: optimizer factory, LR schedules, warm-up, reduce-on-plateau."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.config import (
    SCHEDULE_KEYS,
    ConfigError,
    LRSchedule,
    apply_overrides,
    config_from_dict,
    yaml_load,
)
from trainer.loop import LRFactor
from trainer.optim import (
    OPTIMIZERS,
    PLATEAU,
    OptimizerSpec,
    build_optimizer,
    make_schedulers,
    parse_optimizer,
)

ROOT = Path(__file__).resolve().parents[2]


class LegacyFactor:
    """The LR factor of constant / linear / cosine schedules as it was before the schedule
    factory (kept verbatim): existing configs must keep exactly these factors."""

    def __init__(self, kind: str, warmup: int, final: float, total: int) -> None:
        self.kind, self.warmup, self.final, self.total = kind, warmup, final, total

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(self.total - self.warmup - 1, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        if self.kind == "linear":
            return 1.0 - (1.0 - self.final) * progress
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["constant", "linear", "cosine"]),
    warmup=st.integers(0, 50),
    final=st.floats(0.0, 1.0),
    total=st.integers(1, 400),
)
def test_legacy_schedules_are_bit_identical(
    kind: str, warmup: int, final: float, total: int
) -> None:
    sched: dict[str, Any] = {"kind": kind, "warmup_steps": warmup}
    if kind != "constant":
        sched["final_fraction"] = final
    new = LRFactor(LRSchedule(**sched), total)
    old = LegacyFactor(kind, warmup, sched.get("final_fraction", 0.0), total)
    for step in range(total + 2):
        assert new(step) == old(step), (step, new(step), old(step))


def test_repository_configs_keep_their_factors_and_resolved_form() -> None:
    """Every lr_schedule in configs/*.yaml (mappings and `lr_schedule: cosine` strings) gives
    the factors it always gave, and is written back as {kind, warmup_steps, final_fraction}."""
    seen = 0
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml_load(path.read_text(encoding="utf-8")) or {}
        if not raw.get("stages"):
            continue
        for i, stage in enumerate(config_from_dict(raw).stages):
            sched = stage.lr_schedule
            assert sched.to_dict() == {
                "kind": sched.kind,
                "warmup_steps": sched.warmup_steps,
                "final_fraction": sched.final_fraction,
            }, (path, i)
            total = stage.steps or 1000
            new, old = LRFactor(sched, total), LegacyFactor(**_legacy_args(sched), total=total)
            assert [new(s) for s in range(total + 1)] == [old(s) for s in range(total + 1)]
            seen += sched.kind != "constant"
    assert seen >= 3  # the cosine stages of the demo configs
    short = config_from_dict(
        {"store": "s", "out": "o", "stages": [{"algo": "bc", "steps": 9, "lr_schedule": "cosine"}]}
    )
    assert short.stages[0].lr_schedule == LRSchedule("cosine")
    assert short.stages[0].to_dict()["lr_schedule"] == {
        "kind": "cosine",
        "warmup_steps": 0,
        "final_fraction": 0.0,
    }
    assert "optimizer" not in short.stages[0].to_dict()  # resumes of older runs still match


def _legacy_args(s: LRSchedule) -> dict[str, Any]:
    return {"kind": s.kind, "warmup": s.warmup_steps, "final": s.final_fraction}


# --------------------------------------------------------------------------- schedules


def _progress(step: int, warmup: int, total: int) -> float:
    return min(max(step - warmup, 0) / max(total - warmup - 1, 1), 1.0)


def _ramp(step: int, warmup: int) -> float:
    return (step + 1) / warmup


@settings(max_examples=60, deadline=None)
@given(
    warmup=st.integers(0, 30),
    total=st.integers(2, 300),
    final=st.floats(0.0, 1.0),
    cycles=st.integers(1, 5),
    power=st.floats(0.1, 4.0),
)
def test_decay_shapes_against_their_formulas(
    warmup: int, total: int, final: float, cycles: int, power: float
) -> None:
    restarts = LRFactor(LRSchedule("cosine_with_restarts", warmup, final, cycles=cycles), total)
    poly = LRFactor(LRSchedule("polynomial", warmup, final, power=power), total)
    span = max(total - warmup - 1, 1)
    for step in range(total):
        if step < warmup:
            assert restarts(step) == poly(step) == _ramp(step, warmup)
            continue
        t = step - warmup
        # the position in the current cycle, in [0, 1]: 1 only at the stage's last step
        cycle = span / cycles
        pos = 1.0 if t >= span else (t - cycle * ((t * cycles) // span)) / cycle
        expect = final + (1 - final) * (1 + math.cos(math.pi * pos)) / 2
        assert restarts(step) == pytest.approx(expect, rel=1e-9, abs=1e-9), step
        expect = final + (1 - final) * (1 - _progress(step, warmup, total)) ** power
        assert poly(step) == pytest.approx(expect, rel=1e-12, abs=1e-12), step
    if total - warmup > 1:
        assert restarts(total - 1) == pytest.approx(final) and poly(total - 1) == pytest.approx(
            final
        )
    one = LRFactor(LRSchedule("cosine_with_restarts", warmup, final, cycles=1), total)
    cos = LRFactor(LRSchedule("cosine", warmup, final), total)
    lin = LRFactor(LRSchedule("linear", warmup, final), total)
    poly1 = LRFactor(LRSchedule("polynomial", warmup, final), total)
    for step in range(total):
        assert one(step) == cos(step)
        assert poly1(step) == pytest.approx(lin(step), rel=1e-12, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(warmup=st.integers(1, 40), total=st.integers(50, 300))
def test_inverse_sqrt_is_sqrt_warmup_over_step(warmup: int, total: int) -> None:
    """With the default timescale (the warm-up), the classic sqrt(warmup / step) decay."""
    f = LRFactor(LRSchedule("inverse_sqrt", warmup_steps=warmup), total)
    for step in range(total):
        if step < warmup:
            assert f(step) == _ramp(step, warmup)
        else:
            assert f(step) == pytest.approx(math.sqrt(warmup / step), rel=1e-12)
    g = LRFactor(LRSchedule("inverse_sqrt", timescale=7), total)
    assert [g(s) for s in range(5)] == pytest.approx([math.sqrt(7 / (s + 7)) for s in range(5)])


@settings(max_examples=40, deadline=None)
@given(
    step_size=st.integers(1, 20),
    gamma=st.floats(0.05, 1.0),
    total=st.integers(1, 150),
)
def test_step_and_exponential_match_torch(step_size: int, gamma: float, total: int) -> None:
    """Without warm-up the factors are torch's StepLR / ExponentialLR learning rates at lr 1."""
    for sched, make in (
        (
            LRSchedule("step", step_size=step_size, gamma=gamma),
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size, gamma),
        ),
        (
            LRSchedule("exponential", gamma=gamma),
            lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma),
        ),
    ):
        f = LRFactor(sched, total)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        ref = make(opt)
        for step in range(total):
            assert f(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step
            opt.step()
            ref.step()
    default = LRFactor(LRSchedule("step", step_size=3), 10)
    assert [default(s) for s in (0, 2, 3, 6)] == pytest.approx([1.0, 1.0, 0.1, 0.01])


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(5, 200),
    pct_start=st.floats(0.05, 0.9),
    div=st.floats(1.5, 50.0),
    final_div=st.floats(1.0, 1e4),
    anneal=st.sampled_from(["cos", "linear"]),
    three_phase=st.booleans(),
    max_lr=st.floats(1e-4, 1.0),
)
def test_one_cycle_matches_torch(
    total: int,
    pct_start: float,
    div: float,
    final_div: float,
    anneal: str,
    three_phase: bool,
    max_lr: float,
) -> None:
    sched = LRSchedule(
        "one_cycle",
        pct_start=pct_start,
        div_factor=div,
        final_div_factor=final_div,
        anneal_strategy=anneal,
        three_phase=three_phase,
    )
    rise = pct_start * total
    assume_ok = rise - 1 > 0 and (not three_phase or rise - 1 < 2 * rise - 2 < total - 1)
    if not assume_ok:  # torch divides by zero in a phase of no steps
        return
    f = LRFactor(sched, total)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=max_lr,
        total_steps=total,
        pct_start=pct_start,
        anneal_strategy=anneal,  # type: ignore[arg-type]
        cycle_momentum=False,
        div_factor=div,
        final_div_factor=final_div,
        three_phase=three_phase,
    )
    for step in range(total):
        assert max_lr * f(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step
        opt.step()
        if step < total - 1:
            ref.step()


@settings(max_examples=30, deadline=None)
@given(warmup=st.integers(1, 30), rest=st.integers(30, 100), max_factor=st.floats(0.5, 4.0))
def test_one_cycle_composes_with_warmup(warmup: int, rest: int, max_factor: float) -> None:
    """The warm-up rises to the cycle's start; the cycle then runs over the other steps."""
    total = warmup + rest
    f = LRFactor(LRSchedule("one_cycle", warmup_steps=warmup, max_factor=max_factor), total)
    cycle = LRFactor(LRSchedule("one_cycle", max_factor=max_factor), total - warmup)
    start = max_factor / 25.0
    for step in range(total):
        if step < warmup:
            assert f(step) == pytest.approx(_ramp(step, warmup) * start, rel=1e-12)
        else:
            assert f(step) == cycle(step - warmup)
    peak = max(f(s) for s in range(total))  # the peak falls between two steps
    assert 0.98 * max_factor < peak <= max_factor


KINDS: list[dict[str, Any]] = [
    {"kind": "constant"},
    {"kind": "linear", "final_fraction": 0.1},
    {"kind": "cosine", "final_fraction": 0.05},
    {"kind": "cosine_with_restarts", "cycles": 3},
    {"kind": "polynomial", "power": 2.0, "final_fraction": 0.2},
    {"kind": "inverse_sqrt"},
    {"kind": "step", "step_size": 7, "gamma": 0.5},
    {"kind": "exponential", "gamma": 0.97},
    {"kind": "one_cycle", "pct_start": 0.25},
    {"kind": "reduce_on_plateau"},
]


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), ratio=st.floats(0.0, 0.5), total=st.integers(10, 200))
def test_warmup_ratio_is_the_same_as_its_steps(
    kind: dict[str, Any], ratio: float, total: int
) -> None:
    by_ratio = LRFactor(LRSchedule(**kind, warmup_ratio=ratio), total)
    by_steps = LRFactor(LRSchedule(**kind, warmup_steps=math.ceil(ratio * total)), total)
    assert by_ratio.warmup == math.ceil(ratio * total)
    assert [by_ratio(s) for s in range(total)] == [by_steps(s) for s in range(total)]


# --------------------------------------------------------------------------- reduce on plateau


def plateau_reference(values: list[float], p: dict[str, Any]) -> list[float]:
    """torch's ReduceLROnPlateau rule, written out on a factor that starts at 1."""
    scale, bad, cool = 1.0, 0, 0
    best = math.inf if p["mode"] == "min" else -math.inf
    out = []
    for v in values:
        rel, thr = p["threshold_mode"] == "rel", p["threshold"]
        if p["mode"] == "min":
            better = v < best * (1 - thr) if rel else v < best - thr
        else:
            better = v > best * (1 + thr) if rel else v > best + thr
        best, bad = (v, 0) if better else (best, bad + 1)
        if cool > 0:
            cool, bad = cool - 1, 0
        if bad > p["patience"]:
            new = max(scale * p["factor"], p["min_factor"])
            scale = new if scale - new > 1e-8 else scale
            cool, bad = p["cooldown"], 0
        out.append(scale)
    return out


PLATEAU_PARAMS = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["min", "max"]),
        "factor": st.sampled_from([0.1, 0.5, 0.9]),
        "patience": st.integers(0, 3),
        "threshold": st.sampled_from([0.0, 1e-4, 0.1]),
        "threshold_mode": st.sampled_from(["rel", "abs"]),
        "cooldown": st.integers(0, 2),
        "min_factor": st.sampled_from([0.0, 0.01, 0.3]),
    }
)
METRICS = st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.05, 2.0, 3.0]), max_size=25)


def _plateau_stage(p: dict[str, Any], warmup: int = 0) -> tuple[dict[str, Any], list[Any]]:
    """Two SGD optimizers (lr 0.5 and 0.1) under one reduce_on_plateau schedule."""
    opts = {
        name: torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=lr)
        for name, lr in (("a", 0.5), ("b", 0.1))
    }
    sched = LRSchedule("reduce_on_plateau", warmup_steps=warmup, metric="x", **p)
    return make_schedulers(opts, sched, 1000), list(opts.values())


def _train(schedulers: dict[str, Any], opts: list[Any], steps: int) -> None:
    """What the loop does per training step: the optimizers' steps, then the schedulers'."""
    for _ in range(steps):
        for o in opts:
            o.step()
        for s in schedulers.values():
            s.step()


@settings(max_examples=80, deadline=None)
@given(p=PLATEAU_PARAMS, values=METRICS)
def test_reduce_on_plateau_follows_torch(p: dict[str, Any], values: list[float]) -> None:
    schedulers, opts = _plateau_stage(p)
    plateau = schedulers[PLATEAU]
    plateau.resolve(None, "max")
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    torch_rule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, **{k: v for k, v in p.items() if k != "min_factor"}, min_lr=p["min_factor"]
    )
    expect = plateau_reference(values, p)
    for i, v in enumerate(values):
        _train(schedulers, opts, 3)  # training steps between two evaluations
        plateau.observe(v)
        torch_rule.step(v)
        scale = plateau.factors[0].scale
        assert scale == expect[i] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
        assert [o.param_groups[0]["lr"] for o in opts] == [0.5 * scale, 0.1 * scale]


@settings(max_examples=40, deadline=None)
@given(p=PLATEAU_PARAMS, values=METRICS, cut=st.integers(0, 25), warmup=st.integers(0, 40))
def test_reduce_on_plateau_resumes_exactly(
    p: dict[str, Any], values: list[float], cut: int, warmup: int
) -> None:
    """Saved after `cut` evaluations and loaded into a fresh stage, the schedule goes on as
    if never stopped; the warm-up multiplies the plateau's factor."""
    cut = min(cut, len(values))

    def run(
        schedulers: dict[str, Any], opts: list[Any], vals: list[float], start: int
    ) -> list[list[float]]:
        lrs = []
        for i, v in enumerate(vals):
            _train(schedulers, opts, 3)
            step = 3 * (start + i + 1)
            plateau = schedulers[PLATEAU]
            plateau.observe(v)
            ramp = (step + 1) / warmup if step < warmup else 1.0
            for o, base in zip(opts, (0.5, 0.1)):
                assert o.param_groups[0]["lr"] == pytest.approx(
                    base * ramp * plateau.factors[0].scale, rel=1e-12
                )
            lrs.append([o.param_groups[0]["lr"] for o in opts])
        return lrs

    whole, whole_opts = _plateau_stage(p, warmup)
    whole[PLATEAU].resolve(None, "max")
    expected = run(whole, whole_opts, values, 0)

    first, first_opts = _plateau_stage(p, warmup)
    first[PLATEAU].resolve(None, "max")
    head = run(first, first_opts, values[:cut], 0)
    saved = {k: s.state_dict() for k, s in first.items()}
    saved_opts = [o.state_dict() for o in first_opts]
    second, second_opts = _plateau_stage(p, warmup)
    second[PLATEAU].resolve(None, "max")
    for o, st_ in zip(second_opts, saved_opts):
        o.load_state_dict(st_)
    for k, s in second.items():
        s.load_state_dict(saved[k])
    assert head + run(second, second_opts, values[cut:], cut) == expected


def test_old_checkpoint_scheduler_state_loads() -> None:
    """A LambdaLR state saved before the schedule factory (four factor keys) still loads."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    (lam,) = make_schedulers({"a": opt}, LRSchedule("cosine", 5, 0.1), 50).values()
    state = lam.state_dict()
    state["lr_lambdas"] = [{"kind": "cosine", "warmup": 5, "final": 0.1, "total": 50}]
    state["last_epoch"] = 20
    lam.load_state_dict(state)
    assert lam.lr_lambdas[0](20) == LegacyFactor("cosine", 5, 0.1, 50)(20)


# --------------------------------------------------------------------------- optimizers

FULL_OPTIONS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
    "adamw": {"lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.2, "amsgrad": True},
    "sgd": {"lr": 0.05, "momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 0.01},
    "rmsprop": {
        "lr": 0.01,
        "alpha": 0.9,
        "eps": 1e-6,
        "weight_decay": 0.01,
        "momentum": 0.5,
        "centered": True,
    },
    "adagrad": {
        "lr": 0.1,
        "lr_decay": 0.01,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "initial_accumulator_value": 0.1,
    },
    "adafactor": {
        "lr": 0.01,
        "beta2_decay": -0.7,
        "eps": [None, 1e-3],
        "d": 2.0,
        "weight_decay": 0.01,
    },
}


def _regression_steps(opt: torch.optim.Optimizer, w: torch.Tensor, steps: int = 4) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (x @ w - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_optimizer_keys_are_the_ones_the_docs_list() -> None:
    assert list(OPTIMIZERS) == ["adam", "adamw", "sgd", "rmsprop", "adagrad", "adafactor"]
    for name, opts in FULL_OPTIONS.items():
        assert set(opts) == set(OPTIMIZERS[name][1]), name


@pytest.mark.parametrize("name", list(FULL_OPTIONS))
def test_each_optimizer_is_built_with_its_keys_and_steps(name: str) -> None:
    raw = {"name": name, **FULL_OPTIONS[name]}
    spec = parse_optimizer(raw, "stages.0.optimizer")
    assert spec.to_dict() == raw
    init = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    w = init.clone().requires_grad_(True)
    opt = build_optimizer([w], spec, "stages.0.optimizer")
    cls = OPTIMIZERS[name][0]
    assert type(opt) is cls
    group = opt.param_groups[0]
    for key, value in FULL_OPTIONS[name].items():
        assert group[key] == (tuple(value) if isinstance(value, list) else value), key
    # the same steps as the torch class built by hand with these keys
    w_ref = init.clone().requires_grad_(True)
    kwargs: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in FULL_OPTIONS[name].items()
    }
    ref = cls([w_ref], **kwargs)
    losses = _regression_steps(opt, w)
    ref_losses = _regression_steps(ref, w_ref)
    assert losses[-1] < losses[0]
    if name in ("adam", "adamw"):  # fused kernel here, the for-loop one there
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(w, w_ref) and losses == ref_losses


def test_stage_defaults_fill_the_keys_the_optimizer_leaves_out() -> None:
    w = torch.zeros(3, requires_grad=True)
    own = {"lr": 0.3, "weight_decay": 0.05, "betas": (0.5, 0.6)}
    sgd = build_optimizer([w], parse_optimizer("sgd", "o"), "o", defaults=own)
    assert sgd.param_groups[0]["lr"] == 0.3 and sgd.param_groups[0]["weight_decay"] == 0.05
    adamw = build_optimizer(
        [w], parse_optimizer({"name": "adamw", "lr": 0.1}, "o"), "o", defaults=own
    )
    assert adamw.param_groups[0]["lr"] == 0.1 and adamw.param_groups[0]["betas"] == (0.5, 0.6)
    groups = [
        {"params": [w]},
        {"params": [torch.zeros(2, requires_grad=True)], "weight_decay": 0.0},
    ]
    spec = parse_optimizer({"name": "adamw", "weight_decay": 0.2}, "o")
    opt = build_optimizer(groups, spec, "o", defaults=own)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


def test_plain_adam_keeps_the_lean_fused_step() -> None:
    """`optimizer: adam` builds the fused Adam that trainer.stepping steps itself."""
    from trainer.algos.base import make_adam, make_optimizer
    from trainer.stepping import _lean_adam_ok, adam_step

    w = torch.nn.Parameter(torch.randn(5))
    opt = make_optimizer([w], 1e-3, torch.device("cpu"), parse_optimizer("adam", "o"))
    default = make_adam([torch.nn.Parameter(torch.zeros(1))], 1e-3, torch.device("cpu"))
    assert type(opt) is type(default) is torch.optim.Adam
    assert opt.param_groups[0]["fused"] and default.param_groups[0]["fused"]
    w.grad = torch.ones(5)
    adam_step([opt])
    assert _lean_adam_ok(opt)
    sgd = make_optimizer([w], 1e-3, torch.device("cpu"), parse_optimizer("sgd", "o"))
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["lr"] == 1e-3


def test_native_algorithms_take_the_stage_optimizer() -> None:
    from pipeline.store import ActionSpace
    from trainer.algos import make_algorithm
    from trainer.loop import AlgoContext

    ctx = AlgoContext(
        obs_dim=3,
        action_space=ActionSpace("continuous", None, 1, np.array([-1.0]), np.array([1.0])),
        obs_mean=np.zeros(3, np.float32),
        obs_std=np.ones(3, np.float32),
        discount=0.99,
        device=torch.device("cpu"),
    )
    spec = parse_optimizer({"name": "rmsprop", "momentum": 0.5}, "o")
    small = {"hidden": [8], "critic_hidden": [8]}
    for name, extra in (("bc", {"hidden": [8]}), ("iql", small), ("cql", small)):
        algo = make_algorithm(name, ctx, {**extra, "optimizer": spec})
        nets = {"bc": ["actor"], "iql": ["actor", "critic", "value"], "cql": ["critic", "actor"]}
        for net in nets[name]:
            assert type(algo.optimizers[net]) is torch.optim.RMSprop, (name, net)
        default = make_algorithm(name, ctx, extra)
        assert all(type(o) is torch.optim.Adam for o in default.optimizers.values())


def test_qa_stages_take_the_stage_optimizer() -> None:
    from trainer.qa.model import MemoryReader, ReaderConfig
    from trainer.qa.runner import HybridParams, HybridStage, SupervisedParams, SupervisedStage

    sizes: dict[str, Any] = {
        "d_model": 8,
        "n_layers": 1,
        "n_heads": 2,
        "ffn_dim": 8,
        "memory_dim": 4,
    }
    model = MemoryReader(ReaderConfig(vocab_size=20, max_positions=16, head_hidden=4, **sizes))
    own = SupervisedStage(model, SupervisedParams(lr=0.01, weight_decay=0.02))
    assert type(own.optimizers["qa"]) is torch.optim.AdamW  # no optimizer key: as before
    sgd = parse_optimizer({"name": "sgd", "momentum": 0.9}, "o")
    sup = SupervisedStage(model, SupervisedParams(lr=0.01, weight_decay=0.02), sgd)
    group = sup.optimizers["qa"].param_groups[0]
    assert type(sup.optimizers["qa"]) is torch.optim.SGD
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 0.02)
    p = HybridParams(qa_lr=0.001, policy_lr=0.003, weight_decay=0.02)
    kw: dict[str, Any] = {"seed": 0, "stream": 0, "answer_threshold": 0.0}
    hybrid = HybridStage(model, p, optimizer=parse_optimizer("adamw", "o"), **kw)
    qa, policy = (hybrid.optimizers[k].param_groups[0] for k in ("qa", "policy"))
    assert (qa["lr"], qa["weight_decay"]) == (0.001, 0.02)
    assert (policy["lr"], policy["weight_decay"]) == (0.003, 0.0)
    before = HybridStage(model, p, **kw).optimizers
    assert [type(o) for o in before.values()] == [torch.optim.AdamW, torch.optim.Adam]


def test_sft_stage_takes_the_stage_optimizer() -> None:
    from trainer.agent.model import build_model, parse_model_settings
    from trainer.agent.runner import SFTParams, SFTStage

    settings = parse_model_settings(
        {"config": {"architecture": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2}}
    )
    loaded = build_model(settings, vocab_size=40, pad_id=0, end_id=1, max_positions=32, seed=0)
    params = SFTParams(lr=0.002, weight_decay=0.1, betas=(0.8, 0.9))
    kw: dict[str, Any] = {
        "precision": "fp32",
        "device": torch.device("cpu"),
        "grad_clip": None,
        "has_teacher": False,
    }
    own = SFTStage(loaded, params, torch.ones(3), **kw).optimizers["model"]
    assert type(own) is torch.optim.AdamW and own.param_groups[0]["foreach"]
    adamw = SFTStage(loaded, params, torch.ones(3), optimizer=parse_optimizer("adamw", "o"), **kw)
    groups = adamw.optimizers["model"].param_groups
    assert [(g["lr"], g["weight_decay"], g["betas"]) for g in groups] == [
        (0.002, 0.1, (0.8, 0.9)),
        (0.002, 0.0, (0.8, 0.9)),
    ]
    spec = parse_optimizer({"name": "adafactor", "weight_decay": 0.3}, "o")
    ada = SFTStage(loaded, params, torch.ones(3), optimizer=spec, **kw).optimizers["model"]
    assert type(ada) is torch.optim.Adafactor
    assert [g["weight_decay"] for g in ada.param_groups] == [0.3, 0.0]


# --------------------------------------------------------------------------- errors


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def _stage_error(stage: dict[str, Any]) -> str:
    raw = {"store": "s", "out": "o", "stages": [{"algo": "bc", "steps": 5, **stage}]}
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    return _one_line(e)


def test_unknown_names_and_keys_are_one_line_listing_the_known_ones() -> None:
    known = "known optimizers: adam, adamw, sgd, rmsprop, adagrad, adafactor"
    msg = _stage_error({"optimizer": "adamx"})
    assert (
        msg == f"stages.0.optimizer.name: unknown optimizer 'adamx' (did you mean 'adam'?); {known}"
    )
    msg = _stage_error({"optimizer": {"lr": 0.1}})
    assert msg.startswith("stages.0.optimizer.name: missing;") and known in msg
    msg = _stage_error({"optimizer": {"name": "sgd", "nesterv": True}})
    assert msg == (
        "stages.0.optimizer.nesterv: sgd takes no key 'nesterv' (did you mean 'nesterov'?); "
        "sgd keys: lr, momentum, dampening, nesterov, weight_decay"
    )
    msg = _stage_error({"optimizer": {"name": "sgd", "betas": [0.9, 0.99]}})
    assert "sgd takes no key 'betas'" in msg and "sgd keys: lr, momentum" in msg
    assert "must be a finite number > 0" in _stage_error({"optimizer": {"name": "adam", "lr": -1}})
    assert "needs momentum > 0" in _stage_error({"optimizer": {"name": "sgd", "nesterov": True}})
    assert "must be a name or a mapping" in _stage_error({"optimizer": 3})

    msg = _stage_error({"lr_schedule": "cosin"})
    kinds = ", ".join(SCHEDULE_KEYS)
    assert msg == f"stages.0.lr_schedule.kind: must be one of {kinds}, got 'cosin'"
    msg = _stage_error({"lr_schedule": {"kind": "cosine", "gamma": 0.5}})
    assert msg == (
        "stages.0.lr_schedule.gamma: kind cosine does not use it; its keys are: "
        "warmup_steps, warmup_ratio, final_fraction"
    )
    msg = _stage_error({"lr_schedule": {"kind": "step", "gama": 0.5}})
    assert msg.startswith("stages.0.lr_schedule.gama: unknown key (did you mean 'gamma'?)")
    assert "needs gamma" in _stage_error({"lr_schedule": {"kind": "exponential"}})
    assert "needs step_size" in _stage_error({"lr_schedule": {"kind": "step"}})
    both = {"kind": "linear", "warmup_steps": 3, "warmup_ratio": 0.1}
    assert "one way only" in _stage_error({"lr_schedule": both})
    d3 = {"algo": "d3rlpy.BC", "optimizer": "sgd"}
    assert "a d3rlpy stage sets d3rlpy's own optimizers" in _stage_error(d3)


def test_optimizer_round_trips_and_overrides() -> None:
    raw = {
        "store": "s",
        "out": "o",
        "stages": [{"algo": "bc", "steps": 5, "optimizer": "sgd", "lr_schedule": "step"}],
    }
    apply_overrides(
        raw,
        ["stages.0.optimizer.momentum=0.9", "stages.0.lr_schedule.step_size=2"],
    )
    cfg = config_from_dict(raw)
    assert cfg.stages[0].optimizer == OptimizerSpec("sgd", {"momentum": 0.9})
    resolved = cfg.to_dict()["stages"][0]
    assert resolved["optimizer"] == {"name": "sgd", "momentum": 0.9}
    assert resolved["lr_schedule"] == {
        "kind": "step",
        "warmup_steps": 0,
        "final_fraction": 0.0,
        "step_size": 2,
    }
    again = config_from_dict({"store": "s", "out": "o", "stages": [resolved]}).stages[0]
    assert again.optimizer == cfg.stages[0].optimizer
    assert again.lr_schedule == cfg.stages[0].lr_schedule


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.trainer.test_train import write_store

    return write_store(tmp_path_factory.mktemp("optim-store"), "pendulum", episodes=8)


def _bc_run(store: Path, out: Path, steps: int, **stage: Any) -> dict[str, Any]:
    from tests.trainer.test_train import tiny_config

    raw = tiny_config(store, out, tensorboard=False, log_every=5)
    raw["stages"] = [
        {"algo": "bc", "steps": steps, "batch_size": 16, "hidden": [16], "lr": 0.01, **stage}
    ]
    raw["eval"] = {"every": 5, "episodes": 0, "val_transitions": 32}
    raw["checkpoint"] = {"every": 10, "keep_last": 10}
    return raw


def _rows(run: Path, kind: str) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r["kind"] == kind]


def test_bc_with_sgd_and_a_step_schedule_trains(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.trainer.test_train import write_config
    from trainer.train import main

    run = tmp_path / "run"
    raw = _bc_run(
        store,
        run,
        30,
        optimizer={"name": "sgd", "momentum": 0.9},
        lr_schedule={"kind": "step", "step_size": 10, "gamma": 0.5, "warmup_steps": 2},
    )
    assert main([str(write_config(tmp_path / "c.yaml", raw))]) == 0, capsys.readouterr().err
    lrs = [(r["step"], r["lr"]) for r in _rows(run, "train")]
    # the row after s steps shows the LR of step s: 0.01 * 0.5 ** ((s - warm-up) // 10)
    assert lrs == [(s, pytest.approx(0.01 * 0.5 ** ((s - 2) // 10))) for s in range(5, 31, 5)]
    final = torch.load(run / "checkpoints" / "final-bc.pt", weights_only=True)
    group = final["optimizers"]["actor"]["param_groups"][0]
    assert group["momentum"] == 0.9 and "betas" not in group
    assert all("momentum_buffer" in s for s in final["optimizers"]["actor"]["state"].values())
    resolved = yaml.safe_load((run / "config.yaml").read_text())["stages"][0]
    assert resolved["optimizer"] == {"name": "sgd", "momentum": 0.9}


def test_reduce_on_plateau_follows_the_eval_metric_and_resumes_exactly(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A BC stage whose LR drops when val/log_likelihood stops falling (mode min on a
    rising likelihood: a reduction every other evaluation): the logged LRs follow torch's rule on the
    logged metric, and a run resumed from a checkpoint between two reductions ends with
    the same bits as the uninterrupted one."""
    from tests.trainer.test_checkpoint import assert_same_run
    from tests.trainer.test_train import write_config
    from trainer.train import main

    p = {
        "mode": "min",
        "factor": 0.5,
        "patience": 1,
        "threshold": 0.0,
        "threshold_mode": "abs",
        "cooldown": 0,
        "min_factor": 0.0,
    }
    sched = {"kind": "reduce_on_plateau", "metric": "val/log_likelihood", "warmup_steps": 3, **p}
    full = tmp_path / "full"
    cfg = write_config(tmp_path / "c.yaml", _bc_run(store, full, 40, lr_schedule=sched))
    assert main([str(cfg)]) == 0, capsys.readouterr().err
    evals = _rows(full, "eval")
    assert [r["step"] for r in evals] == list(range(5, 41, 5))
    scales = plateau_reference([r["val/log_likelihood"] for r in evals], p)
    assert scales[1] == 1.0 and scales[2] < 1.0 and scales[-1] < scales[3]  # before and after 20
    for r in _rows(full, "train"):  # the row of step s comes before the evaluation of step s
        scale = ([1.0] + scales)[r["step"] // 5 - 1]
        assert r["lr"] == pytest.approx(0.01 * scale, rel=1e-12), r["step"]

    cut = tmp_path / "cut"  # as if killed after the checkpoint of step 20
    shutil.copytree(full, cut)
    for f in (cut / "checkpoints").glob("*.pt"):
        if f.name.startswith("final") or int(f.stem.split("-")[1]) > 20:
            f.unlink()
    capsys.readouterr()
    assert main([str(cfg), f"out={cut}", "--resume"]) == 0
    assert "step-000000020.pt" in capsys.readouterr().err
    assert_same_run(full, cut)
    final = torch.load(full / "checkpoints" / "final-bc.pt", weights_only=True)
    assert final["schedulers"][PLATEAU]["evals"] == 8


def test_reduce_on_plateau_without_a_metric_is_one_line(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.trainer.test_train import write_config
    from trainer.train import main

    raw = _bc_run(store, tmp_path / "run", 5, lr_schedule="reduce_on_plateau")
    assert main([str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "stages.0.lr_schedule.metric: reduce_on_plateau follows" in err
