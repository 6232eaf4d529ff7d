"""What every algorithm offers the training loop, and the plumbing they share.

An algorithm owns its networks and optimizers and does one gradient step per
``update(batch)``. The order of its sub-updates is written out in that method of each
algorithm (bc.py, iql.py, cql.py); this module only holds what is not algorithm logic:
the context, the Protocol, config parsing, optimizer construction, state dicts and the
numpy-facing ``act``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch import nn

from pipeline.store import ActionSpace
from trainer.batch import TransitionBatch
from trainer.nets import ActionScaler, ObsNormalizer
from trainer.optim import OptimizerSpec, build_optimizer, parse_optimizer

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AlgoContext:
    """What an algorithm needs to know about the data and where to run."""

    obs_dim: int
    action_space: ActionSpace  # .type 'discrete' | 'continuous', .n, .dim, .low, .high
    obs_mean: np.ndarray  # (obs_dim,) from the store manifest
    obs_std: np.ndarray  # (obs_dim,)
    # The discount of TD targets: the run's `gamma` setting (trainer.config), which defaults
    # to the store's discount.
    discount: float
    device: torch.device


@runtime_checkable
class Algorithm(Protocol):
    """The interface the training loop, checkpoints and evaluation code against: the native
    algorithms (:class:`AlgorithmBase`) and d3rlpy's (``trainer.d3rlpy_adapter``)."""

    name: str

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer by name (the loop saves them and schedules their LRs)."""
        ...

    def update(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        """One gradient step; metrics are 0-dim detached tensors (no device sync)."""
        ...

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """(obs_dim,) or (B, obs_dim) raw observations -> action(s) in env units."""
        ...

    def evaluate(self, batch: TransitionBatch) -> dict[str, float]:
        """Offline validation metrics on a held-out batch."""
        ...

    def init_from(self, state: dict) -> None:
        """Start the actor from another algorithm's ``state_dict()`` (e.g. BC's)."""
        ...

    def state_dict(self) -> dict:
        """Models and optimizers; only tensors and primitive containers."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


# ----------------------------------------------------------------------------- config
C = TypeVar("C")


def parse_config(cls: type[C], config: dict[str, Any], algo: str) -> C:
    """Build the config dataclass ``cls`` from a mapping; unknown keys are a ValueError."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in config:
        if key not in names:
            raise ValueError(
                f"{algo}: unknown hyper-parameter {key!r}; valid keys are: {', '.join(names)}"
            )
    return cls(**config)


def check_hidden(value: Any, field: str) -> tuple[int, ...]:
    """Hidden sizes as a tuple of positive ints (YAML gives lists)."""
    if isinstance(value, int):
        value = (value,)
    try:
        sizes = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{field}: expected a list of layer widths like [256, 256], got {value!r}"
        ) from None
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"{field}: expected at least one positive layer width, got {value!r}")
    return sizes


def check_positive(value: Any, field: str, allow_zero: bool = False) -> float:
    v = float(value)
    if not (v > 0 or (allow_zero and v == 0)) or not np.isfinite(v):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field}: must be a finite number {bound}, got {value!r}")
    return v


def check_optimizer(value: Any, field: str) -> OptimizerSpec | None:
    """The stage's ``optimizer`` (trainer.optim), checked; None: the fused Adam."""
    return None if value is None else parse_optimizer(value, field)


def check_grad_clip(value: Any) -> float | None:
    if value is None:
        return None
    return check_positive(value, "grad_clip")


# Matmul precision of the hidden layers (``compute_dtype``, CQL's ``penalty_dtype``).
# Weights, optimizer state, output layers, losses and targets are always float32; only
# the hidden layers' matmuls and activations drop to bfloat16, which keeps network
# outputs within ~1e-4 of their float32 values (tests/trainer/test_algos.py). 'auto'
# takes bfloat16 where the device runs it natively (AVX512-BF16 / AMX CPUs, CUDA sm80+)
# and float32 elsewhere; 'float32' gives the exact reference arithmetic.
DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def check_dtype(value: Any, field: str) -> str:
    if value not in DTYPE_CHOICES:
        raise ValueError(f"{field}: expected one of {', '.join(DTYPE_CHOICES)}, got {value!r}")
    return str(value)


def resolve_dtype(value: str, device: torch.device) -> torch.dtype:
    """``'float32'`` / ``'bfloat16'`` as torch dtypes; ``'auto'`` is bfloat16 where
    ``device`` has native bfloat16 matmul units, else float32."""
    if value == "auto":
        return torch.bfloat16 if has_fast_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[value]


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively (faster than float32) on ``device``.

    CUDA: compute capability 8.0 or newer. CPU: the AVX512-BF16 or AMX-BF16 instructions
    (read from /proc/cpuinfo; other platforms answer False).
    """
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


# ----------------------------------------------------------------------------- optim
def make_adam(
    params: Iterable[nn.Parameter], lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this build has it (CPU and CUDA), else foreach."""
    params = list(params)
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, TypeError):  # fused unsupported by this build or dtype
            pass
    return torch.optim.Adam(params, lr=lr, foreach=True)


def make_optimizer(
    params: Iterable[nn.Parameter], lr: float, device: torch.device, spec: OptimizerSpec | None
) -> torch.optim.Optimizer:
    """A network's optimizer: the stage's ``optimizer`` (trainer.optim) at learning rate
    ``lr`` unless it sets its own; without one the fused Adam of :func:`make_adam`, whose
    step trainer.stepping runs on its lean path."""
    if spec is None:
        return make_adam(params, lr, device)
    return build_optimizer(list(params), spec, "optimizer", defaults={"lr": lr})


# ----------------------------------------------------------------------------- base
class AlgorithmBase:
    """State-dict and ``act`` plumbing shared by the algorithms (no update logic here).

    Subclasses register their networks in ``self.modules`` and optimizers in
    ``self.optimizers`` and implement ``update``, ``evaluate``, ``init_from`` and
    ``_act`` (normalised observations -> actions in env units).
    """

    name: ClassVar[str] = ""

    def __init__(self, ctx: AlgoContext) -> None:
        self.ctx = ctx
        self.device = torch.device(ctx.device)
        self.discrete = ctx.action_space.type == "discrete"
        if self.discrete:
            if not ctx.action_space.n or ctx.action_space.n < 2:
                raise ValueError(
                    f"discrete action space needs n >= 2 actions, got {ctx.action_space.n}"
                )
            self.n_actions = int(ctx.action_space.n)
            self.act_dim = 0
        else:
            if not ctx.action_space.dim or ctx.action_space.dim < 1:
                raise ValueError(
                    f"continuous action space needs dim >= 1, got {ctx.action_space.dim}"
                )
            self.n_actions = 0
            self.act_dim = int(ctx.action_space.dim)
        self.obs_norm = ObsNormalizer(ctx.obs_mean, ctx.obs_std)
        space = ctx.action_space
        self.action_scaler = ActionScaler(space.low, space.high, self.act_dim)
        self.modules = nn.ModuleDict(
            {"obs_norm": self.obs_norm, "action_scaler": self.action_scaler}
        )
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def _finish_init(self) -> None:
        self.modules.to(self.device)

    # the algorithm's own --------------------------------------------------------------
    def update(self, batch: TransitionBatch) -> Metrics:
        raise NotImplementedError

    def evaluate(self, batch: TransitionBatch) -> dict[str, float]:
        raise NotImplementedError

    def init_from(self, state: dict) -> None:
        raise NotImplementedError

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        raise NotImplementedError

    # acting --------------------------------------------------------------------------

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Action(s) for raw observations: (obs_dim,) -> one action, (B, obs_dim) -> B."""
        obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device)
        single = obs_t.dim() == 1
        if single:
            obs_t = obs_t.unsqueeze(0)
        if obs_t.dim() != 2 or obs_t.shape[1] != self.ctx.obs_dim:
            raise ValueError(
                f"act: expected observations of shape ({self.ctx.obs_dim},) or (B, {self.ctx.obs_dim}), "
                f"got {tuple(np.shape(obs))}"
            )
        with torch.inference_mode():
            action = self._act(self.obs_norm(obs_t), deterministic).cpu().numpy()
        return action[0] if single else action

    # state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "algo": self.name,
            "modules": {k: v.state_dict() for k, v in self.modules.items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("algo") != self.name:
            raise ValueError(
                f"a state of algorithm {state.get('algo')!r} cannot be loaded into {self.name!r}"
            )
        missing = set(self.modules) ^ set(state["modules"])
        if missing:
            raise ValueError(
                f"{self.name}: state has modules {sorted(state['modules'])}, expected {sorted(self.modules)}"
            )
        for k, module in self.modules.items():
            module.load_state_dict(state["modules"][k])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])

    def _actor_state(self, state: dict) -> dict[str, torch.Tensor]:
        """The ``actor`` weights of another algorithm's state, with a clear error if absent."""
        modules = state.get("modules", {})
        if "actor" not in modules:
            raise ValueError(
                f"{self.name}.init_from: the state (algorithm {state.get('algo')!r}) has no actor; "
                "start from a BC or IQL state"
            )
        return modules["actor"]

    def _load_actor(self, actor: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
        try:
            actor.load_state_dict(weights)
        except RuntimeError as e:
            raise ValueError(
                f"{self.name}.init_from: the {source} actor does not fit this one (different hidden "
                f"sizes or action space? set the same `hidden` in both stages): {e}"
            ) from None
