"""Optimizers and learning-rate schedules from a stage's config, shared by every stage.

A stage names its optimizer with ``optimizer: {name: adamw, weight_decay: 0.01}`` (or just
``optimizer: sgd``) and its schedule with ``lr_schedule: {kind: cosine, warmup_ratio: 0.05}``
(trainer.config.LRSchedule). Without ``optimizer`` a stage keeps its own: the lean fused
Adam of trainer.stepping for bc / iql / cql, AdamW for qa_* and sft.

Optimizers (the keys each takes; unset keys keep torch's defaults, except those the stage's
own hyper-parameters fill: its learning rate, and for qa_* / sft its ``weight_decay`` and
``betas``)::

    adam       lr betas eps weight_decay amsgrad
    adamw      lr betas eps weight_decay amsgrad
    sgd        lr momentum dampening nesterov weight_decay
    rmsprop    lr alpha eps weight_decay momentum centered
    adagrad    lr lr_decay eps weight_decay initial_accumulator_value
    adafactor  lr beta2_decay eps ([eps1 or null, eps2]) d weight_decay

Schedules are one factor on every optimizer's learning rate (:class:`LRFactor`, run by
torch's ``LambdaLR``), so warm-up composes with every shape: the warm-up rises linearly
from 0 to the shape's first factor, and the shape then runs over the remaining steps.
``reduce_on_plateau`` is that factor times a multiplier that :class:`PlateauScheduler`
lowers after an evaluation whose metric did not improve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.config import ConfigError, LRSchedule, _suggest

# --------------------------------------------------------------------------- optimizers


def _positive(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf
    return None if ok else "a finite number > 0"


def _non_negative(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < math.inf
    return None if ok else "a finite number >= 0"


def _unit(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "a number in [0, 1]"


def _non_positive(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and -math.inf < v <= 0
    return None if ok else "a number <= 0"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _betas(v: Any) -> str | None:
    ok = (
        isinstance(v, list | tuple)
        and len(v) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in v)
    )
    return None if ok else "two numbers in [0, 1), e.g. [0.9, 0.999]"


def _eps_pair(v: Any) -> str | None:
    ok = (
        isinstance(v, list | tuple)
        and len(v) == 2
        and (v[0] is None or _positive(v[0]) is None)
        and _positive(v[1]) is None
    )
    return None if ok else "[eps1 or null, eps2], e.g. [null, 0.001]"


Check = Callable[[Any], str | None]  # None: the value is fine; else what it must be

# name -> (torch class, {key: check}); the keys in the order the docs list them
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Check]]] = {
    "adam": (
        torch.optim.Adam,
        {
            "lr": _positive,
            "betas": _betas,
            "eps": _positive,
            "weight_decay": _non_negative,
            "amsgrad": _flag,
        },
    ),
    "adamw": (
        torch.optim.AdamW,
        {
            "lr": _positive,
            "betas": _betas,
            "eps": _positive,
            "weight_decay": _non_negative,
            "amsgrad": _flag,
        },
    ),
    "sgd": (
        torch.optim.SGD,
        {
            "lr": _positive,
            "momentum": _non_negative,
            "dampening": _unit,
            "nesterov": _flag,
            "weight_decay": _non_negative,
        },
    ),
    "rmsprop": (
        torch.optim.RMSprop,
        {
            "lr": _positive,
            "alpha": _unit,
            "eps": _positive,
            "weight_decay": _non_negative,
            "momentum": _non_negative,
            "centered": _flag,
        },
    ),
    "adagrad": (
        torch.optim.Adagrad,
        {
            "lr": _positive,
            "lr_decay": _non_negative,
            "eps": _positive,
            "weight_decay": _non_negative,
            "initial_accumulator_value": _non_negative,
        },
    ),
    "adafactor": (
        torch.optim.Adafactor,
        {
            "lr": _positive,
            "beta2_decay": _non_positive,
            "eps": _eps_pair,
            "d": _positive,
            "weight_decay": _non_negative,
        },
    ),
}


@dataclass(frozen=True)
class OptimizerSpec:
    """A stage's ``optimizer`` mapping, checked: the optimizer's name and the keys set."""

    # One of OPTIMIZERS.
    name: str
    # The keys the config sets (each one the optimizer takes), e.g. {"momentum": 0.9}.
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form, ``{name: ..., key: value, ...}``."""
        return {"name": self.name, **self.options}


def parse_optimizer(raw: Any, where: str) -> OptimizerSpec:
    """Check a stage's ``optimizer`` value (a name, or a mapping with ``name``); errors name
    the key at ``where`` and list the known names or the optimizer's keys."""
    known = ", ".join(OPTIMIZERS)
    if isinstance(raw, OptimizerSpec):
        return raw
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: must be a name or a mapping such as {{name: adamw, weight_decay: 0.01}}; "
            f"known optimizers: {known}"
        )
    name = raw.get("name")
    if name not in OPTIMIZERS:
        what = "missing" if name is None else f"unknown optimizer {name!r}"
        hint = _suggest(str(name), list(OPTIMIZERS)) if isinstance(name, str) else ""
        raise ConfigError(f"{where}.name: {what}{hint}; known optimizers: {known}")
    checks = OPTIMIZERS[name][1]
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in checks:
            raise ConfigError(
                f"{where}.{key}: {name} takes no key {key!r}{_suggest(str(key), list(checks))}; "
                f"{name} keys: {', '.join(checks)}"
            )
        problem = checks[key](value)
        if problem is not None:
            raise ConfigError(f"{where}.{key}: must be {problem}, got {value!r}")
        options[str(key)] = list(value) if isinstance(value, list | tuple) else value
    nesterov_ok = options.get("momentum") and not options.get("dampening", 0)
    if name == "sgd" and options.get("nesterov") and not nesterov_ok:
        raise ConfigError(
            f"{where}.nesterov: needs momentum > 0 and dampening 0, got momentum "
            f"{options.get('momentum', 0)} and dampening {options.get('dampening', 0)}"
        )
    return OptimizerSpec(str(name), options)


def _fused_ok(params_or_groups: list[Any]) -> bool:
    """Whether every parameter is a floating tensor on the CPU or a CUDA device."""
    for item in params_or_groups:
        for p in item["params"] if isinstance(item, dict) else [item]:
            if not (p.is_floating_point() and p.device.type in ("cpu", "cuda")):
                return False
    return True


def build_optimizer(
    params_or_groups: Iterable[Any],
    spec: OptimizerSpec,
    where: str,
    *,
    defaults: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The torch optimizer ``spec`` names over ``params_or_groups`` (parameters, or
    parameter-group dicts whose own keys win).

    ``defaults`` are the stage's own settings (``lr``, ``weight_decay``, ``betas``): each
    fills the key of that name when the optimizer takes it and ``spec`` leaves it unset.
    Adam and AdamW use the fused kernel where every parameter allows it (so a plain
    ``adam`` keeps trainer.stepping's lean step), else ``foreach``.
    """
    cls, checks = OPTIMIZERS[spec.name]
    kwargs = {k: v for k, v in (defaults or {}).items() if k in checks}
    kwargs.update(spec.options)
    for key in ("betas", "eps"):
        if isinstance(kwargs.get(key), list | tuple):
            kwargs[key] = tuple(float(x) if x is not None else None for x in kwargs[key])
    items = list(params_or_groups)
    try:
        if spec.name in ("adam", "adamw") and _fused_ok(items):
            try:
                return cls(items, **kwargs, fused=True)  # type: ignore[call-arg]
            except (RuntimeError, TypeError):  # fused unsupported by this build or dtype
                pass
        if spec.name in ("adam", "adamw"):
            return cls(items, **kwargs, foreach=True)  # type: ignore[call-arg]
        return cls(items, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {spec.name}: {e}") from None


# --------------------------------------------------------------------------- schedules


def _anneal(start: float, end: float, pct: float, strategy: str) -> float:
    """torch's OneCycleLR annealing from ``start`` to ``end`` at ``pct`` of a phase."""
    if strategy == "linear":
        return (end - start) * pct + start
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


class LRFactor:
    """The LR multiplier at a stage step: warm-up, then the schedule's shape, times the
    reduce-on-plateau multiplier ``scale`` (1 unless a :class:`PlateauScheduler` lowered it).

    A plain object (not a closure), so ``LambdaLR.state_dict`` saves it as data; a
    checkpoint written before a key existed loads with that key from the config.
    """

    def __init__(self, schedule: LRSchedule, total_steps: int) -> None:
        self.kind = schedule.kind
        self.warmup = schedule.warmup(total_steps)
        self.final = schedule.final_fraction
        self.total = total_steps
        self.scale = 1.0  # reduce_on_plateau's multiplier
        self.cycles = schedule.cycles
        self.power = schedule.power
        self.timescale = schedule.timescale or max(self.warmup, 1)
        self.step_size = schedule.step_size or 1
        self.gamma = schedule.gamma if schedule.gamma is not None else 0.1
        self.pct_start = schedule.pct_start
        self.max_factor = schedule.max_factor
        self.div_factor = schedule.div_factor
        self.final_div_factor = schedule.final_div_factor
        self.anneal_strategy = schedule.anneal_strategy
        self.three_phase = schedule.three_phase

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup * self._start() * self.scale
        return self._shape(step) * self.scale

    def _start(self) -> float:
        """The shape's first factor, where the warm-up ends: 1, or one_cycle's start."""
        return self._one_cycle(0) if self.kind == "one_cycle" else 1.0

    def _shape(self, step: int) -> float:
        """The factor of the shape alone at stage step ``step`` (>= the warm-up's end)."""
        if self.kind in ("constant", "reduce_on_plateau"):
            return 1.0
        t = step - self.warmup  # steps since the warm-up
        if self.kind == "inverse_sqrt":
            return math.sqrt(self.timescale / (t + self.timescale))
        if self.kind == "step":
            return float(self.gamma ** (t // self.step_size))
        if self.kind == "exponential":
            return float(self.gamma**t)
        if self.kind == "one_cycle":
            return self._one_cycle(t)
        span = max(self.total - self.warmup - 1, 1)
        progress = min(max(t, 0) / span, 1.0)
        if self.kind == "linear":
            return 1.0 - (1.0 - self.final) * progress
        if self.kind == "polynomial":
            return self.final + (1.0 - self.final) * (1.0 - progress) ** self.power
        if self.kind == "cosine_with_restarts":  # where in its cycle, in integers: exact
            progress = 1.0 if progress >= 1.0 else (max(t, 0) * self.cycles % span) / span
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _one_cycle(self, t: int) -> float:
        """torch's OneCycleLR over the steps after the warm-up, as a factor of the LR."""
        n = max(self.total - self.warmup, 1)
        t = min(t, n - 1)
        peak = self.max_factor
        initial = peak / self.div_factor
        low = initial / self.final_div_factor
        rise = float(self.pct_start * n) - 1
        if self.three_phase:
            phases = [(rise, initial, peak), (float(2 * self.pct_start * n) - 2, peak, initial)]
            phases.append((n - 1, initial, low))
        else:
            phases = [(rise, initial, peak), (n - 1, peak, low)]
        start = 0.0
        for i, (end, a, b) in enumerate(phases):
            if t <= end or i == len(phases) - 1:
                pct = (t - start) / (end - start) if end != start else 1.0
                return _anneal(a, b, pct, self.anneal_strategy)
            start = end
        raise AssertionError("unreachable")


PLATEAU = "reduce_on_plateau"  # the schedulers entry of a reduce_on_plateau stage


class PlateauScheduler:
    """``reduce_on_plateau``: torch's ReduceLROnPlateau rule applied to the LR factors of
    a stage's LambdaLRs, stepped by the training loop after each evaluation
    (:meth:`observe`). It sits in the stage's schedulers beside them, so checkpoints save it
    and resume restores it; its per-step :meth:`step` does nothing."""

    def __init__(
        self, schedule: LRSchedule, schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    ) -> None:
        self.schedulers = schedulers
        self.metric = schedule.metric
        self.mode = schedule.mode
        self.factor = schedule.factor
        self.patience = schedule.patience
        self.threshold = schedule.threshold
        self.threshold_mode = schedule.threshold_mode
        self.cooldown = schedule.cooldown
        self.min_factor = schedule.min_factor
        self.eps = 1e-8  # torch's: a smaller reduction is skipped
        self.best: float | None = None
        self.num_bad_evals = 0
        self.cooldown_counter = 0
        self.evals = 0

    def resolve(self, metric: str | None, mode: str) -> None:
        """Fill ``auto`` from the run's early-stopping metric and mode; a ConfigError when
        the run has no metric to follow."""
        if self.metric == "auto":
            if metric is None:
                raise ConfigError(
                    "lr_schedule.metric: reduce_on_plateau follows an evaluation metric and "
                    "this run has none; set lr_schedule.metric (e.g. val/loss, mode: min) or "
                    "early_stopping.metric"
                )
            self.metric = metric
        if self.mode == "auto":
            self.mode = mode

    @property
    def factors(self) -> list[LRFactor]:
        return [fn for s in self.schedulers for fn in s.lr_lambdas]  # type: ignore[misc]

    def step(self) -> None:
        """A training step: nothing to do (the LambdaLRs move the factors)."""

    def _is_better(self, value: float) -> bool:
        """torch's comparison; before the first evaluation the best is the worst value."""
        best = self.best
        if best is None:
            best = math.inf if self.mode == "min" else -math.inf
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return value < best * (1.0 - self.threshold)
            return value < best - self.threshold
        if self.threshold_mode == "rel":
            return value > best * (self.threshold + 1.0)
        return value > best + self.threshold

    def observe(self, value: float) -> bool:
        """One evaluation's metric; True when it lowered the learning rates (applied now,
        from the next training step on)."""
        self.evals += 1
        if self._is_better(value):
            self.best = float(value)
            self.num_bad_evals = 0
        else:
            self.num_bad_evals += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_evals = 0
        if self.num_bad_evals <= self.patience:
            return False
        self.cooldown_counter = self.cooldown
        self.num_bad_evals = 0
        old = self.factors[0].scale
        new = max(old * self.factor, self.min_factor)
        if old - new <= self.eps:
            return False
        for fn in self.factors:
            fn.scale = new
        for s in self.schedulers:
            for group, base, lam in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
                group["lr"] = base * lam(s.last_epoch)  # what LambdaLR sets at a step
            s._last_lr = [group["lr"] for group in s.optimizer.param_groups]
        return True

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (the factors' ``scale`` is in the LambdaLRs' states)."""
        keys = ("best", "num_bad_evals", "cooldown_counter", "evals")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def make_schedulers(
    optimizers: Mapping[str, torch.optim.Optimizer], schedule: LRSchedule, total_steps: int
) -> dict[str, Any]:
    """One LambdaLR per optimizer (none for a constant schedule without warm-up), and a
    :class:`PlateauScheduler` under :data:`PLATEAU` for ``reduce_on_plateau``."""
    if schedule.is_constant:
        return {}
    out: dict[str, Any] = {
        name: torch.optim.lr_scheduler.LambdaLR(opt, LRFactor(schedule, total_steps))
        for name, opt in optimizers.items()
    }
    if schedule.kind == "reduce_on_plateau":
        out[PLATEAU] = PlateauScheduler(schedule, list(out.values()))
    return out
