"""The training configuration: one dataclass for ``python -m trainer.train``, checked on load.

A config is a YAML mapping (``configs/*.yaml``) plus ``key=value`` overrides on the command
line; every key can be overridden by its dotted path (``stages.1.steps=1000``, ``seed=3``,
``eval.episodes=5``), the value read as a YAML scalar (``null``, ``true``, ``3e-4``, ``[1, 2]``).
Every error names the key and the fix, e.g.::

    configs/x.yaml: stages.1.init: 'bcc' is not an earlier stage; earlier stages are: bc

A stage mapping holds the loop's own keys (``algo``, ``steps``, ``name``, ``init``,
``batch_size``, ``lr_schedule``, ``optimizer``, ``grad_clip``, ``gamma``); every other key is a
hyper-parameter of the algorithm (checked by the algorithm when the run starts, before any training step).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from trainer.optim import OptimizerSpec


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with `3e-4` and `1e3` read as floats (plain PyYAML reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML the way configs and overrides are read."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and the fix."""


NATIVE_ALGOS = ("bc", "iql", "cql")
QA_ALGOS = ("qa_supervised", "qa_hybrid")  # segment stores: trainer.qa.runner
AGENT_ALGOS = ("sft", "ppo", "reinforce")  # sequence stores: trainer.agent.runner
PRECISIONS = ("fp32", "bf16", "fp16")
D3RLPY_PREFIX = "d3rlpy."
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def need_int(name: str, v: Any, minimum: int, what: str = "") -> None:
    """A ConfigError naming ``name`` unless ``v`` is an integer >= ``minimum``."""
    if not _is_int(v) or v < minimum:
        why = f" ({what})" if what else ""
        raise ConfigError(f"{name}: must be an integer >= {minimum}{why}, got {v!r}")


def need_number(name: str, v: Any, what: str) -> None:
    """A ConfigError naming ``name`` unless ``v`` is a number (not a bool)."""
    if not _is_number(v):
        raise ConfigError(f"{name}: must be a number ({what}), got {v!r}")


def need_in_range(name: str, v: Any, lo: float | None = None, hi: float | None = None) -> float:
    """``v`` as a float; a ConfigError naming ``name`` unless it is a finite number (not a
    bool) in ``[lo, hi]`` (None: open on that side)."""
    if not _is_number(v) or not math.isfinite(v):
        raise ConfigError(f"{name}: must be a number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{name}: must be in {rng}, got {v}")
    return float(v)


def need_choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    """A ConfigError naming ``name`` unless ``v`` is one of ``choices``."""
    if v not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {v!r}")


def check_gamma(name: str, v: Any) -> float | None:
    """A discount in [0, 1] as a float, or None (not set)."""
    if v is None:
        return None
    need_number(name, v, "the discount of TD targets, in [0, 1], or null")
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{name}: must be in [0, 1], got {v}")
    return float(v)


# --------------------------------------------------------------------------- sections


# The keys each `lr_schedule.kind` reads besides `kind`, `warmup_steps` and `warmup_ratio`
# (trainer.optim.LRFactor computes the factors).
SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear": ("final_fraction",),
    "cosine": ("final_fraction",),
    "cosine_with_restarts": ("final_fraction", "cycles"),
    "polynomial": ("final_fraction", "power"),
    "inverse_sqrt": ("timescale",),
    "step": ("step_size", "gamma"),
    "exponential": ("gamma",),
    "one_cycle": (
        "pct_start",
        "max_factor",
        "div_factor",
        "final_div_factor",
        "anneal_strategy",
        "three_phase",
    ),
    "reduce_on_plateau": (
        "metric",
        "mode",
        "factor",
        "patience",
        "threshold",
        "threshold_mode",
        "cooldown",
        "min_factor",
    ),
}


@dataclass
class LRSchedule:
    """How every optimizer's learning rate moves over a stage: a factor on the stage's LRs
    (trainer.optim.LRFactor), after an optional linear warm-up from 0."""

    # The shape after warm-up, one of SCHEDULE_KEYS: constant; linear / cosine /
    # polynomial decay to `final_fraction` at the stage's last step; cosine_with_restarts
    # (`cycles` cosine decays); inverse_sqrt (sqrt(timescale / (t + timescale)));
    # step (x `gamma` every `step_size` steps); exponential (x `gamma` every step);
    # one_cycle (torch's OneCycleLR as a factor); reduce_on_plateau (x `factor` when the
    # evaluation metric stops improving).
    kind: str = "constant"
    # Steps of linear warm-up from 0 to the schedule's first factor (0: none).
    warmup_steps: int = 0
    # linear / cosine / cosine_with_restarts / polynomial: the factor at the last step.
    final_fraction: float = 0.0
    # Warm-up as a fraction of the stage's steps, ceil(ratio * steps) (instead of
    # warmup_steps; null: warmup_steps).
    warmup_ratio: float | None = None
    # cosine_with_restarts: cosine decays from 1 to final_fraction, one after the other.
    cycles: int = 1
    # polynomial: final + (1 - final) * (1 - progress) ** power (1: linear).
    power: float = 1.0
    # inverse_sqrt: factor sqrt(timescale / (t + timescale)) at t steps after warm-up
    # (null: the warm-up's steps, or 1 without warm-up).
    timescale: int | None = None
    # step: steps between two multiplications by gamma.
    step_size: int | None = None
    # step: the factor every step_size steps (default 0.1); exponential: every step.
    gamma: float | None = None
    # one_cycle, as torch's OneCycleLR with max_lr = max_factor x the stage's LR: the share
    # of the steps rising, the start (peak / div_factor) and the end (start /
    # final_div_factor); cos or linear annealing; three_phase as torch's.
    pct_start: float = 0.3
    max_factor: float = 1.0
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal_strategy: str = "cos"
    three_phase: bool = False
    # reduce_on_plateau, as torch's ReduceLROnPlateau on the factor, stepped after every
    # evaluation: the evaluation metric (auto: early_stopping's metric) and its mode (auto:
    # early_stopping.mode); the multiplier per reduction; evaluations without improvement
    # before one; what counts as an improvement (rel: by threshold x |best|, abs: by
    # threshold); evaluations after a reduction that are not counted; the smallest factor.
    metric: str = "auto"
    mode: str = "auto"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        need_choice("kind", self.kind, tuple(SCHEDULE_KEYS))
        need_int("warmup_steps", self.warmup_steps, 0, "steps of linear warm-up")
        self._check_fraction("final_fraction", self.final_fraction, "the last step's factor")
        if self.warmup_ratio is not None:
            self._check_fraction("warmup_ratio", self.warmup_ratio, "of the stage's steps")
            if self.warmup_steps:
                raise ConfigError(
                    "warmup_ratio: warmup_steps is set too; give the warm-up one way only"
                )
        need_int("cycles", self.cycles, 1, "cosine decays in the stage")
        self._check_positive("power", self.power, "the polynomial's exponent")
        if self.timescale is not None:
            need_int("timescale", self.timescale, 1, "steps, or null")
        if self.step_size is not None:
            need_int("step_size", self.step_size, 1, "steps between two decays")
        elif self.kind == "step":
            raise ConfigError("step_size: kind step needs step_size (steps between decays)")
        if self.gamma is not None:
            self._check_positive("gamma", self.gamma, "the factor per decay")
        elif self.kind == "exponential":
            raise ConfigError("gamma: kind exponential needs gamma (the factor per step)")
        self._check_fraction("pct_start", self.pct_start, "of the steps rising")
        for key in ("max_factor", "div_factor", "final_div_factor"):
            self._check_positive(key, getattr(self, key), "a factor")
        need_choice("anneal_strategy", self.anneal_strategy, ("cos", "linear"))
        if not isinstance(self.three_phase, bool):
            raise ConfigError(f"three_phase: must be true or false, got {self.three_phase!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"metric: must be a metric name or auto, got {self.metric!r}")
        need_choice("mode", self.mode, ("auto", "min", "max"))
        self._check_fraction("factor", self.factor, "the multiplier per reduction")
        if self.factor >= 1.0:
            raise ConfigError(f"factor: must be < 1 (a reduction), got {self.factor}")
        need_int("patience", self.patience, 0, "evaluations without improvement")
        need_number("threshold", self.threshold, "the smallest improvement")
        if self.threshold < 0:
            raise ConfigError(f"threshold: must be >= 0, got {self.threshold}")
        need_choice("threshold_mode", self.threshold_mode, ("rel", "abs"))
        need_int("cooldown", self.cooldown, 0, "evaluations after a reduction")
        self._check_fraction("min_factor", self.min_factor, "the smallest factor")
        self._check_used()

    @staticmethod
    def _check_fraction(key: str, v: Any, what: str) -> None:
        need_number(key, v, what)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1] ({what}), got {v}")

    @staticmethod
    def _check_positive(key: str, v: Any, what: str) -> None:
        need_number(key, v, what)
        if not v > 0 or v == float("inf"):
            raise ConfigError(f"{key}: must be a finite number > 0 ({what}), got {v}")

    def _check_used(self) -> None:
        """A key set away from its default that this kind does not read is a mistake."""
        used = {"kind", "warmup_steps", "warmup_ratio", *SCHEDULE_KEYS[self.kind]}
        for f in fields(self):
            if f.name not in used and getattr(self, f.name) != f.default:
                keys = ", ".join(["warmup_steps", "warmup_ratio", *SCHEDULE_KEYS[self.kind]])
                raise ConfigError(
                    f"{f.name}: kind {self.kind} does not use it; its keys are: {keys}"
                )

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" and self.warmup_steps == 0 and not self.warmup_ratio

    def warmup(self, total_steps: int) -> int:
        """The warm-up's steps in a stage of ``total_steps``: ``warmup_steps``, or
        ``ceil(warmup_ratio * total_steps)``."""
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * total_steps)
        return self.warmup_steps

    def to_dict(self) -> dict[str, Any]:
        """``kind``, ``warmup_steps`` and ``final_fraction``, then every key set away from
        its default (so the resolved config of a run reads as it always has)."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "warmup_steps": self.warmup_steps,
            "final_fraction": self.final_fraction,
        }
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in d and v != f.default:
                d[f.name] = v
        return d


@dataclass
class StageConfig:
    """One training stage: an algorithm trained for a number of gradient steps."""

    # bc | iql | cql (native), or d3rlpy.NAME for any d3rlpy algorithm (d3rlpy.IQL, d3rlpy.CQL,
    # d3rlpy.DiscreteCQL, d3rlpy.BC, ...), built from its NAMEConfig class; on a segment store
    # qa_supervised | qa_hybrid (trainer.qa); on a sequence store sft (trainer.agent).
    algo: str
    # Gradient steps in this stage (early stopping may end it sooner). An sft stage may give
    # `epochs` instead (steps: 0 or left out): the runner turns them into steps.
    steps: int
    # The stage's name in metrics, checkpoints and `init`; default: the algo, made unique.
    name: str = ""
    # The name of an earlier stage whose final actor weights this stage's actor starts from.
    init: str | None = None
    # Transitions per gradient step: the global batch of a data-parallel (torchrun) run,
    # split evenly over its `shards` (one per rank by default), so a multiple of them.
    batch_size: int = 256
    # Learning-rate schedule (a string is shorthand for {kind: ...}).
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    # The optimizer of the stage's networks, {name: adamw, weight_decay: 0.01, ...}
    # (trainer.optim; a string is shorthand for {name: ...}); null: the stage's own (Adam
    # for bc / iql / cql, AdamW for qa_* and sft).
    optimizer: OptimizerSpec | None = None
    # Clip the global gradient norm of every update to this value (null: no clipping); passed
    # to the algorithm as `grad_clip`.
    grad_clip: float | None = None
    # Discount of this stage's TD targets, in [0, 1] (null: the run's `gamma`); on a
    # qa_hybrid stage, the discount over halting decisions.
    gamma: float | None = None
    # The algorithm's hyper-parameters: every other key of the stage mapping.
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.algo, str) or not self.algo:
            raise ConfigError(
                f"algo: must be a name (bc, iql, cql or d3rlpy.NAME), got {self.algo!r}"
            )
        known = (*NATIVE_ALGOS, *QA_ALGOS, *AGENT_ALGOS)
        if self.algo not in known and not self.algo.startswith(D3RLPY_PREFIX):
            raise ConfigError(
                f"algo: unknown algorithm {self.algo!r}{_suggest(self.algo, list(known))}; "
                "use bc, iql, cql, d3rlpy.NAME (e.g. d3rlpy.IQL), qa_supervised, qa_hybrid, "
                "sft, ppo or reinforce"
            )
        if self.algo == "sft" and self.params.get("epochs") is not None:
            need_int("steps", self.steps, 0, "0: from `epochs`")
        else:
            need_int("steps", self.steps, 1, "gradient steps in this stage")
        if not isinstance(self.name, str) or (self.name and not _NAME_RE.match(self.name)):
            raise ConfigError(
                f"name: {self.name!r} is used in file names: letters, digits, '.', '_' and '-' only"
            )
        if self.init is not None and not isinstance(self.init, str):
            raise ConfigError(f"init: must be the name of an earlier stage, got {self.init!r}")
        need_int("batch_size", self.batch_size, 1, "transitions per gradient step")
        if self.grad_clip is not None:
            need_number("grad_clip", self.grad_clip, "the max gradient norm, or null")
            if self.grad_clip <= 0:
                raise ConfigError(f"grad_clip: must be > 0 or null, got {self.grad_clip}")
            self.grad_clip = float(self.grad_clip)
        self.gamma = check_gamma("gamma", self.gamma)
        if self.optimizer is not None and self.is_d3rlpy:
            raise ConfigError(
                "optimizer: a d3rlpy stage sets d3rlpy's own optimizers "
                "(e.g. actor_optim_factory: {type: adam, params: {...}}); remove optimizer"
            )

    @property
    def is_d3rlpy(self) -> bool:
        return self.algo.startswith(D3RLPY_PREFIX)

    @property
    def is_qa(self) -> bool:
        return self.algo in QA_ALGOS

    @property
    def family(self) -> str:
        """The store kind the stage trains on: transitions, segments or sequences."""
        if self.algo in QA_ALGOS:
            return "segments"
        if self.algo in AGENT_ALGOS:
            return "sequences"
        return "transitions"

    def algo_config(self) -> dict[str, Any]:
        """The mapping handed to the algorithm: its hyper-parameters plus ``grad_clip`` (and
        ``optimizer`` when the stage names one)."""
        out = {**self.params, "grad_clip": self.grad_clip}
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer
        return out

    def to_dict(self) -> dict[str, Any]:
        """The flat YAML form (hyper-parameters beside the loop's keys)."""
        d: dict[str, Any] = {
            "algo": self.algo,
            "name": self.name,
            "steps": self.steps,
            "init": self.init,
            "batch_size": self.batch_size,
            "lr_schedule": self.lr_schedule.to_dict(),
            "grad_clip": self.grad_clip,
        }
        if self.optimizer is not None:
            d["optimizer"] = self.optimizer.to_dict()
        if self.gamma is not None:
            d["gamma"] = self.gamma
        d.update(self.params)
        return d


@dataclass
class EvalConfig:
    """When and how a policy is evaluated during training."""

    # Stage steps between evaluations; every stage is also evaluated at its last step
    # (0: only then).
    every: int = 5000
    # Online episodes in the store's gymnasium env per evaluation (0: no online evaluation).
    episodes: int = 10
    # Episode i of every evaluation is reset with seed `seed + i`: all evaluations and all runs
    # see the same starting states.
    seed: int = 10_000
    # Act with the policy's deterministic action (mean / argmax) rather than sampling.
    deterministic: bool = True
    # Override the env's time limit (null: the store spec's, else the env's own).
    max_episode_steps: int | None = None
    # Validation transitions used for offline metrics (algo.evaluate); null: all of them,
    # 0: none.
    val_transitions: int | None = 20_000
    # Transitions per forward pass in the offline validation.
    val_batch_size: int = 4096

    def __post_init__(self) -> None:
        need_int("every", self.every, 0, "stage steps between evaluations; 0 = only at the end")
        need_int("episodes", self.episodes, 0, "online evaluation episodes; 0 = none")
        need_int("seed", self.seed, 0, "the first evaluation episode's seed")
        if not isinstance(self.deterministic, bool):
            raise ConfigError(f"deterministic: must be true or false, got {self.deterministic!r}")
        if self.max_episode_steps is not None:
            need_int("max_episode_steps", self.max_episode_steps, 1, "or null")
        if self.val_transitions is not None:
            need_int("val_transitions", self.val_transitions, 0, "or null for all")
        need_int("val_batch_size", self.val_batch_size, 1, "transitions per forward pass")


@dataclass
class EarlyStoppingConfig:
    """Stop a stage when its evaluation metric stops improving; also picks the best checkpoint."""

    # Evaluations without improvement before the stage stops (null: never stop early).
    patience: int | None = None
    # The metric that decides "best" and early stopping: a key of an evaluation row such as
    # eval/normalized_score or val/loss; `auto`: eval/normalized_score when the store has
    # reference returns, else eval/return_mean when it has an env, else none (no best
    # checkpoint, no early stopping).
    metric: str = "auto"
    # max: larger is better; min: smaller is better (`auto` metrics are maximised).
    mode: str = "max"
    # An evaluation improves only if it beats the best by more than this.
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.patience is not None:
            need_int("patience", self.patience, 1, "evaluations without improvement, or null")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"metric: must be a metric name or `auto`, got {self.metric!r}")
        need_choice("mode", self.mode, ("max", "min"))
        need_number("min_delta", self.min_delta, "the smallest improvement that counts")
        if self.min_delta < 0:
            raise ConfigError(f"min_delta: must be >= 0, got {self.min_delta}")


@dataclass
class CheckpointConfig:
    """How often the run is saved for exact resume."""

    # Stage steps between checkpoints (each stage's end is always saved).
    every: int = 5000
    # Periodic checkpoints kept (the best and each stage's final one are kept apart).
    keep_last: int = 3

    def __post_init__(self) -> None:
        need_int("every", self.every, 1, "stage steps between checkpoints")
        need_int("keep_last", self.keep_last, 1, "periodic checkpoints to keep")


@dataclass
class RewardConfig:
    """The reward every stage of a transition-store run trains on: the store's `reward`, or
    its relabelling (`relabel`), then scaled by the sampler: r' = scale * r + shift (after
    normalisation)."""

    # Multiply rewards by this.
    scale: float = 1.0
    # Add this to every reward (after scaling), e.g. -1 for sparse-reward mazes.
    shift: float = 0.0
    # none, or return_range: also multiply by max_episode_length / (max_return - min_return)
    # over the training episodes (IQL's normalisation).
    normalize: str = "none"
    # A REWARD (docs/REWARDS.md) of `column` leaves naming `reward` (the store's reward) or a
    # named reward column of the store (its spec's fields.rewards), e.g. {type: weighted_sum,
    # components: [{weight: 1, reward: {column: reward}}, {weight: 0.1, reward: {column:
    # upright}}]}: the reward of every stage, computed once over the whole store before the
    # scaling above (trainer/relabel.py); null: the store's reward.
    relabel: Any = None

    def __post_init__(self) -> None:
        need_number("scale", self.scale, "a reward multiplier")
        need_number("shift", self.shift, "a reward offset")
        if self.scale == 0:
            raise ConfigError("scale: must not be 0 (every reward would be the same)")
        need_choice("normalize", self.normalize, ("none", "return_range"))
        self.scale, self.shift = float(self.scale), float(self.shift)
        if self.relabel is not None:
            from trainer.relabel import build_relabel

            build_relabel(self.relabel, "relabel")  # a bad spec fails now, naming its node

    def to_dict(self) -> dict[str, Any]:
        """The section as plain data; `relabel` only when set (resolved configs written
        before it existed read the same)."""
        d = asdict(self)
        if self.relabel is None:
            del d["relabel"]
        return d


@dataclass
class TrainConfig:
    """Everything ``python -m trainer.train`` needs; saved resolved as ``RUN/config.yaml``."""

    # A built transition store (python -m pipeline.build SPEC).
    store: str
    # The run directory (config.yaml, metrics.jsonl, checkpoints/, curves.png, summary.json).
    out: str
    # Seeds the split, the samplers, the networks and every RNG.
    seed: int = 0
    # auto (cuda when available, else cpu), cpu, cuda or cuda:N.
    device: str = "auto"
    # Trained in order; later stages may start from earlier ones (`init`).
    stages: list[StageConfig] = field(default_factory=list)
    # Evaluation schedule and settings.
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Early stopping and best-checkpoint metric.
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Checkpoint schedule.
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Reward scaling applied by the sampler.
    reward: RewardConfig = field(default_factory=RewardConfig)
    # Fraction of episodes held out for offline validation metrics, split by episode from the
    # seed; in [0, 1).
    val_fraction: float = 0.05
    # Steps between training-metric rows in metrics.jsonl / TensorBoard (the only host syncs).
    log_every: int = 100
    # Also write TensorBoard event files under RUN/tensorboard.
    tensorboard: bool = True
    # auto: a progress bar only when stderr is a terminal; true / false to force it.
    progress: str | bool = "auto"
    # torch CPU threads (null: torch's default).
    num_threads: int | None = None
    # A checkpoint of another run: the first stage's actor starts from its weights
    # (also --init-from on the command line).
    init_from: str | None = None
    # The store's content hash; the resolved config.yaml records it, and a run whose store
    # no longer has this hash stops with an error (null: not checked).
    store_hash: str | None = None
    # Discount of the TD targets of every stage (IQL, CQL, d3rlpy.*), in [0, 1]; a stage's own
    # `gamma` overrides it. null: the store's discount (store.discount of its spec, the one
    # its return_to_go column was built with). A training setting: another gamma needs no
    # rebuild of the store. The resolved config.yaml records the value used. On QA runs: the
    # qa_hybrid stages' discount over halting decisions (null: their default, 1).
    gamma: float | None = None
    # QA runs (segment store, qa_* stages): the reader's sizes and the QA evaluation, checked
    # by trainer.qa.runner.QASettings (null: its defaults).
    qa: dict[str, Any] | None = None
    # Sequence-store runs (sft stages): the student model, {path: DIR} (a local transformers
    # model directory) or {config: {architecture: llama|gpt2, hidden_size, num_layers,
    # num_heads, ...}} to train from scratch, with an optional `lora: {r, alpha, dropout,
    # target_modules}` (trainer.agent.model.ModelSettings).
    model: dict[str, Any] | None = None
    # fp32 | bf16 | fp16: the forward and backward passes under autocast in that type
    # (fp16 with a gradient scaler, CUDA only); the weights and the optimizer stay float32.
    precision: str = "fp32"
    # Sequence-store runs: the evaluation split and the online evaluation, checked by
    # trainer.agent.runner.AgentSettings (null: its defaults).
    agent: dict[str, Any] | None = None
    # The preset overlay applied (configs/presets/NAME.yaml), chosen with `preset=NAME`.
    preset: str | None = None
    # Transition-store runs: the sampling shards of the training episodes (contiguous runs
    # of about equal transitions); each step draws batch_size / shards transitions from
    # every shard, so a stage's batch_size is the global batch and must be divisible by it.
    # null: the number of processes (torchrun's ranks, 1 without torchrun); under torchrun
    # a multiple of the ranks, each rank holding its own shards. A batch is a function of
    # (seed, step, shards): one process with shards=N draws exactly the batches of an
    # N-rank run (and resumes its checkpoints). sft stages shard a sequence store's
    # training episodes alike (about equal tokens per shard, batch_size episodes).
    # QA stages deal a segment store's training questions into shards (by length, round
    # robin), batch_size questions.
    shards: int | None = None

    def __post_init__(self) -> None:
        for key in ("store", "out"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{key}: must be a path, got {v!r}")
        need_int("seed", self.seed, 0, "the run's seed")
        if not isinstance(self.device, str) or not re.match(
            r"^(auto|cpu|cuda(:\d+)?)$", self.device
        ):
            raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.stages:
            raise ConfigError(
                "stages: must list at least one stage, e.g. [{algo: bc, steps: 5000}]"
            )
        need_number("val_fraction", self.val_fraction, "the fraction of episodes held out")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        need_int("log_every", self.log_every, 1, "steps between training-metric rows")
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"tensorboard: must be true or false, got {self.tensorboard!r}")
        if self.progress not in ("auto", True, False):
            raise ConfigError(f"progress: must be auto, true or false, got {self.progress!r}")
        if self.num_threads is not None:
            need_int("num_threads", self.num_threads, 1, "or null")
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise ConfigError(
                f"init_from: must be a checkpoint path or null, got {self.init_from!r}"
            )
        if self.store_hash is not None and not isinstance(self.store_hash, str):
            raise ConfigError(
                f"store_hash: must be a content hash string or null, got {self.store_hash!r}"
            )
        self.gamma = check_gamma("gamma", self.gamma)
        if self.qa is not None and not isinstance(self.qa, dict):
            raise ConfigError(
                f"qa: must be a mapping such as {{model: {{d_model: 64}}}}, got {self.qa!r}"
            )
        families = [st.family for st in self.stages]
        for i, fam in enumerate(families):
            if fam != families[0]:
                raise ConfigError(
                    f"stages.{i}.algo: {self.stages[i].algo!r} cannot share a run with "
                    f"{self.stages[0].algo!r}; QA stages (qa_supervised, qa_hybrid) train on a "
                    "segment store, sft on a sequence store, the others on a transition store"
                )
        if self.reward.relabel is not None and families[0] != "transitions":
            raise ConfigError(
                f"reward.relabel: relabels the rewards of a transition store; these stages "
                f"train on a {families[0]} store (a ppo / reinforce stage takes its own reward)"
            )
        need_choice("precision", self.precision, PRECISIONS)
        for key in ("model", "agent"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{key}: must be a mapping, got {v!r}")
        if self.shards is not None:
            need_int("shards", self.shards, 1, "sampling shards of the training episodes, or null")
            if families[0] not in ("transitions", "sequences", "segments"):
                raise ConfigError(
                    f"shards: splits a transition store's training episodes; these stages "
                    f"train on a {families[0]} store, on one process"
                )
            self.check_batch_sizes(self.shards, f"shards={self.shards}")
        self._name_stages()

    def check_batch_sizes(self, shards: int, what: str) -> None:
        """Every stage's batch_size (the global batch) divisible by ``shards`` (``what``
        says where that number comes from)."""
        for i, st in enumerate(self.stages):
            if st.batch_size % shards:
                raise ConfigError(
                    f"stages.{i}.batch_size: {st.batch_size} is the global batch, split evenly "
                    f"over {what}; make it a multiple of {shards}"
                )

    @property
    def is_qa(self) -> bool:
        """True when the stages are QA stages (qa_supervised / qa_hybrid)."""
        return any(st.is_qa for st in self.stages)

    @property
    def is_agent(self) -> bool:
        """True when the stages train a text policy on a sequence store (sft)."""
        return any(st.family == "sequences" for st in self.stages)

    def _name_stages(self) -> None:
        seen: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            if not st.name:
                base = st.algo
                st.name = base if base not in seen else f"{base}-{i}"
            if st.name in seen:
                raise ConfigError(
                    f"stages.{i}.name: {st.name!r} is already stage {seen[st.name]}; give each stage a unique name"
                )
            if st.init is not None and st.init not in seen:
                earlier = ", ".join(seen) or "none"
                raise ConfigError(
                    f"stages.{i}.init: {st.init!r} is not an earlier stage; earlier stages are: {earlier}"
                )
            seen[st.name] = i

    def stage_index(self, name: str) -> int:
        for i, st in enumerate(self.stages):
            if st.name == name:
                return i
        raise KeyError(name)

    def stage_gamma(self, index: int, default: float) -> float:
        """The discount of stage ``index``: its own ``gamma``, else the run's, else ``default``
        (the store's discount)."""
        own = self.stages[index].gamma
        return own if own is not None else self.gamma if self.gamma is not None else default

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"device: {self.device!r} but no CUDA device is available; use device=cpu"
            )
        return self.device

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (valid as a config file itself)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "stages":
                d["stages"] = [s.to_dict() for s in v]
            elif hasattr(v, "__dataclass_fields__"):
                d[f.name] = v.to_dict() if hasattr(v, "to_dict") else asdict(v)
            else:
                d[f.name] = v
        return d


# --------------------------------------------------------------------------- parsing

_STAGE_KEYS = {
    "algo",
    "steps",
    "name",
    "init",
    "batch_size",
    "lr_schedule",
    "optimizer",
    "grad_clip",
    "gamma",
}


def build_section(cls: type, raw: Any, where: str) -> Any:
    """``cls(**raw)`` with unknown keys and failed checks reported at ``where``."""
    prefix = f"{where}." if where else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where or 'config'}: must be a mapping (key: value), got {type(raw).__name__}"
        )
    allowed = [f.name for f in fields(cls)]
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"{prefix}{key}: unknown key{_suggest(str(key), allowed)}; allowed keys: {', '.join(allowed)}"
            )
    try:
        return cls(**raw)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    except TypeError as e:  # a required key is missing
        missing = re.findall(r"'(\w+)'", str(e))
        what = missing[0] if missing else str(e)
        raise ConfigError(f"{prefix}{what}: missing required key") from None


def _stage(raw: Any, where: str) -> StageConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: must be a mapping such as {{algo: bc, steps: 5000}}, got {raw!r}"
        )
    loop = {k: v for k, v in raw.items() if k in _STAGE_KEYS}
    params = {str(k): v for k, v in raw.items() if k not in _STAGE_KEYS}
    if "params" in params and isinstance(params["params"], dict):  # nested form is accepted too
        nested = params.pop("params")
        params = {**nested, **params}
    sched = loop.get("lr_schedule")
    if isinstance(sched, str) or sched is None:
        sched = {"kind": sched or "constant"}
    loop["lr_schedule"] = build_section(LRSchedule, sched, f"{where}.lr_schedule")
    if loop.get("optimizer") is not None:
        from trainer.optim import parse_optimizer

        loop["optimizer"] = parse_optimizer(loop["optimizer"], f"{where}.optimizer")
    if "steps" not in loop and loop.get("algo") == "sft" and "epochs" in params:
        loop["steps"] = 0  # from epochs, once the store is open
    for key in ("algo", "steps"):
        if key not in loop:
            raise ConfigError(f"{where}.{key}: missing required key")
    try:
        return StageConfig(**loop, params=params)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def config_from_dict(raw: Any) -> TrainConfig:
    """Check a parsed YAML mapping and turn it into a :class:`TrainConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"must be a mapping of keys (store, out, stages, ...), got {type(raw).__name__}"
        )
    raw = dict(raw)
    stages = raw.get("stages")
    if stages is not None and not isinstance(stages, list):
        raise ConfigError("stages: must be a list of stages, e.g. [{algo: bc, steps: 5000}]")
    sections = {
        "eval": EvalConfig,
        "early_stopping": EarlyStoppingConfig,
        "checkpoint": CheckpointConfig,
        "reward": RewardConfig,
    }
    for key, cls in sections.items():
        if key in raw:
            raw[key] = build_section(cls, raw[key], key)
    if stages is not None:
        raw["stages"] = [_stage(s, f"stages.{i}") for i, s in enumerate(stages)]
    return build_section(TrainConfig, raw, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` -> (["a", "b", "0", "c"], YAML-parsed value)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override {text!r}: expected key=value, e.g. seed=3 or stages.1.steps=1000"
        )
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: empty part in the dotted key {key!r}")
    try:
        parsed = yaml_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({first})") from None
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``dotted.key=value`` in ``raw`` (in place, and returned).

    Missing mappings on the way are created; list items are addressed by index and must
    exist (``stages.2.steps`` needs a third stage).
    """
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit():
                    raise ConfigError(
                        f"override {text!r}: {'.'.join(parts[:depth])} is a list; use an index, not {part!r}"
                    )
                idx = int(part)
                if idx >= len(node):
                    raise ConfigError(
                        f"override {text!r}: {'.'.join(parts[:depth])} has {len(node)} entries "
                        f"(indices 0-{len(node) - 1})"
                    )
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    elif isinstance(node[part], str) and here.endswith("lr_schedule"):
                        node[part] = {"kind": node[part]}
                    elif isinstance(node[part], str) and here.endswith("optimizer"):
                        node[part] = {"name": node[part]}
                    node = node[part]
            else:
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[:depth])} is {node!r}, not a mapping or list"
                )
    return raw


# The keys a preset (configs/presets/NAME.yaml) may set: run-time settings that change how
# fast and how closely a run is watched, never what is trained on or the model's sizes.
# `stages.*.KEY` sets KEY on every stage.
PRESET_KEYS: dict[str, str] = {
    "precision": "fp32 | bf16 | fp16 autocast",
    "num_threads": "torch CPU threads",
    "log_every": "steps between training-metric rows",
    "tensorboard": "TensorBoard event files on or off",
    "progress": "the progress bar",
    "eval.every": "stage steps between evaluations",
    "eval.episodes": "online evaluation episodes",
    "eval.val_transitions": "offline validation size",
    "checkpoint.every": "stage steps between checkpoints",
    "checkpoint.keep_last": "periodic checkpoints kept",
    "early_stopping.patience": "evaluations without improvement before a stop",
    "agent.eval_max_episodes": "held-out episodes of the offline evaluation",
    "agent.export_merged": "write the merged model directory at the end",
    "stages.*.grad_accumulation": "micro-batches per optimizer step",
    "stages.*.pack": "pack episodes into rows",
    "stages.*.eval_every": "a stage's own evaluation interval",
}


def _preset_file(name: str, config_path: Path) -> Path:
    for base in (config_path.parent, Path(__file__).resolve().parents[1] / "configs"):
        f = base / "presets" / f"{name}.yaml"
        if f.is_file():
            return f
    raise ConfigError(
        f"preset: no preset {name!r}; presets are files configs/presets/NAME.yaml "
        f"(next to {config_path} or in the repository's configs/)"
    )


def apply_preset(raw: dict[str, Any], name: Any, config_path: Path) -> list[str]:
    """The overrides preset ``name`` makes, as ``key=value`` strings, applied to ``raw``.

    A preset is a mapping of dotted keys to values; every key must be one of
    :data:`PRESET_KEYS`, so a preset can never change the data, the model or the algorithm.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"preset: must be a preset name such as fast, got {name!r}")
    f = _preset_file(name, config_path)
    try:
        overlay = yaml_load(f.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{f}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(overlay, dict):
        raise ConfigError(f"{f}: must be a mapping of dotted keys to values")
    out: list[str] = []
    stages = raw.get("stages") or []
    n_stages = len(stages)
    qa_run = bool(stages) and all(
        isinstance(st, dict) and str(st.get("algo", "")).startswith("qa_") for st in stages
    )
    for key, value in overlay.items():
        if key not in PRESET_KEYS:
            raise ConfigError(
                f"{f}: {key}: a preset may only set {', '.join(PRESET_KEYS)}{_suggest(str(key), list(PRESET_KEYS))}"
            )
        if qa_run and (key == "eval.episodes" or key.startswith("agent.")):
            continue  # what a QA run does not read (it refuses them when a user sets them)
        keys = (
            [key.replace("*", str(i)) for i in range(n_stages)]
            if key.startswith("stages.*.")
            else [key]
        )
        out += [f"{k}={json.dumps(value)}" for k in keys]
    apply_overrides(raw, out)
    raw["preset"] = name
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides and check the result."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    try:
        raw = yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: must be a mapping of keys (store, out, stages, ...)")
    try:
        rest = []
        preset = raw.get("preset")
        for text in overrides or []:
            parts, value = parse_override(text)
            if parts == ["preset"]:
                preset = value
            else:
                rest.append(text)
        if preset is not None:
            apply_preset(raw, preset, p)
        apply_overrides(raw, rest)
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
