"""The training loop: stages of gradient steps, evaluation, checkpoints, resume.

One run trains its stages in order (e.g. BC, then IQL starting from the BC actor). Per
stage, every step is: one batch from the sampler, one ``algo.update``, one LR-scheduler
step. Training metrics stay on the device, collected as 0-dim tensors, and reach the host
once every ``log_every`` steps (one sync); evaluation runs every ``eval.every`` stage steps
and at each stage's end; checkpoints every ``checkpoint.every`` stage steps and at each
stage's end.

Exact resume: a checkpoint holds the step, the stage, the algorithm, its optimizers and
LR schedulers, the sampler's counter, every RNG, the early-stopping and best-checkpoint
state and the length of ``metrics.jsonl``; a run resumed from it repeats the steps after it
with the same batches and the same random numbers, so it ends with the same weights as a run
never interrupted. Each stage starts from generators reseeded from ``(seed, stage)`` and
evaluation runs in a fork of the generators, so neither the stage boundaries nor the
evaluation schedule move the training streams.

Data-parallel (``torchrun``, trainer.distributed): every rank runs this loop on its own
shards of the training episodes with the gradients averaged over the ranks; rank 0 alone
evaluates (and broadcasts the results, so early stopping and reduce-on-plateau decide
alike everywhere) and writes the run directory (config, metrics, TensorBoard, checkpoints,
curves, summary). Metrics rows are means over the ranks; a checkpoint holds every rank's
random generators, and every rank resumes from the same one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.format import StoreError
from pipeline.store import ActionSpace, TransitionStore, open_store
from trainer.algos.base import AlgoContext, Algorithm
from trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointDir,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_atomic,
    seed_everything,
    set_rng_state,
)
from trainer.config import (
    ConfigError,
    StageConfig,
    TrainConfig,
    dump_yaml,
    yaml_load,
)
from trainer.distributed import Distributed
from trainer.evaluation import EvalError, Evaluator
from trainer.logging import MetricsWriter, NullWriter, Progress, plot_curves, read_metrics
from trainer.optim import PLATEAU, LRFactor, PlateauScheduler, make_schedulers
from trainer.samplers import (
    DeviceTransitions,
    Shards,
    TransitionArrays,
    TransitionSampler,
    make_reward_scaling,
    shard_episodes,
    split_episodes,
    step_seed,
    validation_batches,
)
from trainer.stepping import gradient_sync

__all__ = ["LRFactor", "RunError", "StagedTrainer", "Trainer", "make_schedulers"]

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
# Keys of the resolved config that must not change when a run is resumed (they change what
# is trained).
RESUME_FIXED = (
    "store",
    "seed",
    "stages",
    "reward",
    "val_fraction",
    "gamma",
    "store_hash",
    "shards",
)
# How to resume with the run's own value of a RESUME_FIXED key, where the generic advice
# does not say it.
RESUME_HINTS = {
    "shards": "pass shards=N to resume an N-rank run on one process, or resume it on N ranks",
}
# Streams of the generators a stage starts from: rank 0 (and one process) the first, the
# other ranks of a data-parallel run their own.
STAGE_STREAM = 0x57A6E
RANK_STREAM = 0x7A4C0


class RunError(Exception):
    """A run that cannot start or go on; the message says why and how to fix it."""


# Errors a run reports in one line (the ranks of a data-parallel run agree on them).
RUN_ERRORS: tuple[type[BaseException], ...] = (
    RunError,
    ConfigError,
    StoreError,
    CheckpointError,
    EvalError,
    OSError,
)


# --------------------------------------------------------------------------- algorithms


def algo_context(store: TransitionStore, device: torch.device, gamma: float) -> AlgoContext:
    """What an algorithm knows of the store, with ``gamma`` as its TD discount."""
    return AlgoContext(
        obs_dim=store.obs_dim,
        action_space=store.action_space,
        obs_mean=store.obs_mean,
        obs_std=store.obs_std,
        discount=gamma,
        device=device,
    )


def build_algorithm(stage: StageConfig, ctx: AlgoContext, data: RunData) -> Algorithm:
    """The stage's algorithm: native (trainer.algos) or d3rlpy's (trainer.d3rlpy_adapter).

    A d3rlpy stage gets the converted dataset as a function: it is built only when that
    algorithm samples from it (``sampler: d3rlpy``), at its first update.
    """
    try:
        if stage.is_d3rlpy:
            from trainer.d3rlpy_adapter import make_d3rlpy_algorithm

            return make_d3rlpy_algorithm(
                stage.algo,
                ctx,
                stage.algo_config(),
                dataset=data.mdp_dataset,
                batch_size=stage.batch_size,
            )
        from trainer.algos import make_algorithm

        return make_algorithm(stage.algo, ctx, stage.algo_config())
    except (TypeError, ValueError, KeyError) as e:
        msg = str(e).strip("'\"") or type(e).__name__
        raise ConfigError(
            f"stages.{data.cfg.stage_index(stage.name)} ({stage.algo}): {msg}"
        ) from None


# --------------------------------------------------------------------------- run data


@dataclass
class RunData:
    """The store, its split and the device-resident transitions of a run.

    ``train`` holds this process's shards of the training episodes (all of them without
    torchrun); ``val`` exists on rank 0 only (it evaluates).
    """

    cfg: TrainConfig
    store: TransitionStore
    device: torch.device
    arrays: TransitionArrays
    train_episodes: np.ndarray
    val_episodes: np.ndarray
    train: DeviceTransitions
    val: DeviceTransitions | None
    shards: Shards  # the training transitions' shards and the ones ``train`` holds
    mdp: Any = None  # the d3rlpy dataset, once a stage asked for it
    # reward.relabel: {"reward/NAME": {mean, std[, weight]}} of the relabelled reward's
    # components over the store's rows (None: the store's reward is trained on)
    relabelled: dict[str, dict[str, float]] | None = None

    def mdp_dataset(self) -> Any:
        """The training episodes as a d3rlpy MDPDataset (converted on the first call)."""
        if self.mdp is None:
            from trainer.d3rlpy_adapter import to_mdp_dataset

            self.mdp = to_mdp_dataset(
                self.arrays, self.store.action_space, episodes=self.train_episodes
            )
        return self.mdp


def load_run_data(
    cfg: TrainConfig, device: torch.device, dist: Distributed | None = None
) -> RunData:
    """The run's store, split and training shards, as this rank of ``dist`` needs them:
    only its shards' rows are read from the memory-mapped store and packed."""
    dist = dist or Distributed.single()
    try:
        store = open_store(cfg.store)
    except StoreError as e:
        raise RunError(f"store: {e}") from None
    if cfg.store_hash is not None and cfg.store_hash != store.content_hash:
        raise RunError(
            f"store: {cfg.store} has content hash {store.content_hash}, the config expects "
            f"{cfg.store_hash}; the store was rebuilt from other data (drop store_hash to accept it)"
        )
    arrays = TransitionArrays.from_store(store)
    relabelled = None
    if cfg.reward.relabel is not None:  # once, over the whole store, before any scaling
        from trainer.relabel import StoreRewards, build_relabel, relabel_arrays

        node = build_relabel(cfg.reward.relabel, "reward.relabel")
        out = relabel_arrays(arrays, node, StoreRewards.of(store), store.discount)
        arrays, relabelled = out.arrays, out.components
    train_eps, val_eps = split_episodes(arrays.n_episodes, cfg.val_fraction, cfg.seed)
    try:
        scaling = make_reward_scaling(
            arrays,
            train_eps,
            scale=cfg.reward.scale,
            shift=cfg.reward.shift,
            normalize=cfg.reward.normalize,
        )
    except ValueError as e:
        raise ConfigError(f"reward: {e}") from None
    n_shards = resolved_shards(cfg, dist)
    try:
        parts = shard_episodes(arrays.episode_length[train_eps], n_shards)
    except ValueError:
        who = f"{dist.world_size} ranks" if cfg.shards is None else f"shards={n_shards}"
        raise RunError(
            f"{cfg.store}: {len(train_eps)} training episode(s) cannot be shared by {who}: "
            "every shard needs an episode (start fewer ranks, or lower val_fraction)"
        ) from None
    per_rank = n_shards // dist.world_size
    first = dist.rank * per_rank
    mine = np.concatenate(parts[first : first + per_rank])
    sizes = tuple(int(arrays.episode_length[train_eps[p]].sum()) for p in parts)
    kw = {"device": device, "rewards": scaling, "discount": store.discount}
    every = len(mine) == arrays.n_episodes  # no validation split, one process: no gather
    train = DeviceTransitions(arrays, None if every else train_eps[mine], **kw)  # type: ignore[arg-type]
    val = None
    if len(val_eps) and dist.is_main:
        val = DeviceTransitions(arrays, val_eps, **kw)  # type: ignore[arg-type]
    return RunData(
        cfg,
        store,
        device,
        arrays,
        train_eps,
        val_eps,
        train,
        val,
        Shards(sizes, first, per_rank),
        relabelled=relabelled,
    )


def resolved_shards(cfg: TrainConfig, dist: Distributed) -> int:
    """The run's number of shards: ``cfg.shards``, else one per rank; a ConfigError when
    the ranks cannot share them or a stage's batch cannot be split over them."""
    if cfg.shards is None:
        cfg.check_batch_sizes(dist.world_size, f"the {dist.world_size} ranks")
        return dist.world_size
    if cfg.shards % dist.world_size:
        raise ConfigError(
            f"shards: {cfg.shards} shards cannot be shared evenly by {dist.world_size} ranks; "
            f"use a multiple of {dist.world_size}, or null (one per rank)"
        )
    return cfg.shards


def make_evaluator(cfg: TrainConfig, data: RunData) -> Evaluator:
    store = data.store
    refs = store.reference_returns
    env = store.env if cfg.eval.episodes > 0 else None
    val_limit = cfg.eval.val_transitions
    batches = (
        validation_batches(data.val, val_limit, cfg.eval.val_batch_size)
        if data.val is not None and val_limit != 0
        else []
    )
    return Evaluator(
        env_spec=env,
        episodes=cfg.eval.episodes,
        seed=cfg.eval.seed,
        deterministic=cfg.eval.deterministic,
        max_episode_steps=cfg.eval.max_episode_steps,
        normalize=(lambda r: float(store.normalized_score(r))) if refs else None,
        score_span=(float(refs["expert"]) - float(refs["random"])) if refs else None,
        obs_dim=store.obs_dim,
        val_batches=batches,
    )


def resolve_metric(cfg: TrainConfig, store: TransitionStore) -> tuple[str | None, str]:
    """The metric (and mode) for best checkpoints and early stopping."""
    es = cfg.early_stopping
    if es.metric != "auto":
        return es.metric, es.mode
    online = store.env is not None and cfg.eval.episodes > 0
    if online and store.reference_returns:
        return "eval/normalized_score", "max"
    if online:
        return "eval/return_mean", "max"
    return None, "max"


# --------------------------------------------------------------------------- loop state


@dataclass
class StageProgress:
    """Per-stage bookkeeping that a checkpoint carries."""

    name: str
    algo: str
    steps: int
    steps_done: int = 0
    start_step: int = 0  # global step at the stage's start
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    stopped_early: bool = False
    done: bool = False
    first_eval: dict[str, Any] | None = None
    final_eval: dict[str, Any] | None = None
    best_eval: dict[str, Any] | None = None
    best_value: float | None = None
    evals_since_best: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageProgress:
        return cls(**d)

    def summary(self, metric: str | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "algo": self.algo,
            "steps": self.steps_done,
            "planned_steps": self.steps,
            "stopped_early": self.stopped_early,
            "wall_time_s": round(self.wall_time_s, 3),
            "train_time_s": round(self.train_time_s, 3),
            "steps_per_s": round(self.steps_done / self.train_time_s, 2)
            if self.train_time_s > 0
            else None,
            "best_metric": metric,
            "first_eval": self.first_eval,
            "final_eval": self.final_eval,
            "best_eval": self.best_eval,
        }


@dataclass
class LoopState:
    step: int = 0  # global gradient steps done
    stage_index: int = 0
    stages: list[StageProgress] = field(default_factory=list)


def mean_metrics(buf: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the buffered steps: one stack and one host transfer for all tensors.

    A metric missing from some steps (an actor updated every other step) is averaged over
    the steps that report it.
    """
    keys: dict[str, None] = {}
    for m in buf:
        keys.update(dict.fromkeys(m))
    out: dict[str, float] = {}
    tensor_means: list[torch.Tensor] = []
    tensor_keys: list[str] = []
    for k in keys:
        vals = [m[k] for m in buf if k in m]
        if all(isinstance(v, torch.Tensor) for v in vals):
            tensor_keys.append(k)
            tensor_means.append(torch.stack([v.detach().float().reshape(()) for v in vals]).mean())
        else:
            out[k] = float(np.mean([float(v) for v in vals]))
    if tensor_means:
        out.update(zip(tensor_keys, torch.stack(tensor_means).tolist()))
    return {k: out[k] for k in keys}


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Interrupted(Exception):
    """The run was stopped by a signal after saving a checkpoint."""


# --------------------------------------------------------------------------- the trainer


class StagedTrainer:
    """What every trainer of a run directory shares: the directory and its resume checks,
    the resolved config, the stages in order under a stop-on-signal flag, the step loop of
    a stage (metrics rows, evaluation, periodic checkpoints, stop on signal) and the
    checkpoint record. :class:`Trainer` trains on transition stores,
    :class:`trainer.qa.runner.QATrainer` on segment stores."""

    # Keys that must not change when a run is resumed (they change what is trained).
    resume_fixed: tuple[str, ...] = RESUME_FIXED
    # Set by a subclass's run() before the stages start.
    metric: str | None
    mode: str
    state: LoopState
    writer: MetricsWriter | NullWriter
    progress: Progress
    _stop: _StopFlag
    _final_states: dict[str, dict[str, Any]]
    _plateau: PlateauScheduler | None = None  # the running stage's reduce_on_plateau
    _resume_file: str  # the checkpoint a resumed run starts from

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        log: Any = None,
        dist: Distributed | None = None,
    ) -> None:
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.run_dir = Path(cfg.out)
        self.ckpts = CheckpointDir(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        # the ranks of a torchrun run; only rank 0 writes the run directory and logs
        self.dist = dist or Distributed.single()
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        if not self.dist.is_main:
            self._log = lambda msg: None

    # ------------------------------------------------------------------ setup
    def _prepare_dir(self) -> dict[str, Any] | None:
        """Check the run directory; returns the checkpoint to resume from, if any (checked
        against the store and the run's config by :meth:`_open_run`)."""
        has_run = self.ckpts.latest() is not None or (self.run_dir / "metrics.jsonl").exists()
        if self.resume:
            latest = self.ckpts.latest()
            if latest is None:
                self._log(f"{self.run_dir}: no checkpoint to resume from; starting at step 0")
                return None
            ckpt = load_checkpoint(latest)
            self._check_resumed(ckpt, latest)
            self._resume_file = latest.name
            return ckpt
        if has_run and not self.overwrite:
            raise RunError(
                f"out: {self.run_dir} already holds a run; pass --resume to continue it, "
                "--overwrite to start it again, or choose another out=..."
            )
        if self.overwrite and self.dist.is_main:
            self.ckpts.clear()
        return None

    def _check_resumed(self, ckpt: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint this trainer did not write (a subclass's check)."""

    def _check_same_config(self, cfg_path: Path, now: dict[str, Any]) -> None:
        """Refuse to resume with a resolved config ``now`` that trains something else than
        the run's own (``resume_fixed`` keys)."""
        import yaml

        try:
            saved = yaml_load(cfg_path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RunError(
                f"{cfg_path}: unreadable ({e}); cannot check the resumed config"
            ) from None
        for key in self.resume_fixed:
            if key in saved and saved[key] != now.get(key):
                how = RESUME_HINTS.get(key, "resume with the run's own config")
                raise RunError(
                    f"--resume: `{key}` differs from {cfg_path} ({saved[key]!r} there, {now.get(key)!r} "
                    f"now); {how} or start a new run (another out=)"
                )

    def _open_run(self, ckpt: dict[str, Any] | None, store_hash: str, device: torch.device) -> None:
        """Once the store is open: a resumed run checked against its checkpoint's store and
        its own config, then the resolved ``config.yaml`` written."""
        self._check_resumed_store(ckpt, store_hash)
        self._write_config(store_hash, device)
        if ckpt is not None:
            self._log(f"resuming {self.run_dir} from {self._resume_file} (step {ckpt['step']})")

    def _check_resumed_store(self, ckpt: dict[str, Any] | None, content_hash: str) -> None:
        if ckpt is not None and ckpt["meta"]["store_hash"] != content_hash:
            raise RunError(
                f"--resume: the checkpoint was trained on store content {ckpt['meta']['store_hash']}, "
                f"{self.cfg.store} now holds {content_hash}; start a new run"
            )

    def _resolved_config(self, store_hash: str, device: torch.device) -> dict[str, Any]:
        """The config as this run trains it: the store's content hash and the device filled in."""
        resolved = self.cfg.to_dict()
        resolved["store_hash"] = store_hash
        resolved["device"] = str(device) if self.cfg.device == "auto" else self.cfg.device
        return resolved

    def _write_config(self, store_hash: str, device: torch.device) -> None:
        """``config.yaml``, the resolved config; a resumed run is checked against it first
        (by rank 0, which writes it)."""
        if not self.dist.is_main:
            return
        resolved = self._resolved_config(store_hash, device)
        path = self.run_dir / CONFIG_FILE
        if self.resume and path.exists():
            self._check_same_config(path, resolved)
        header = (
            "# Resolved training config, written by trainer.train; run it again with\n"
            f"#   python -m trainer.train {path} out=NEW_DIR\n"
        )
        path.write_text(header + dump_yaml(resolved), encoding="utf-8")

    # ------------------------------------------------------------------ the stages
    def _run_stages(self, ckpt: dict[str, Any] | None, init_state: dict[str, Any] | None) -> None:
        """Every stage not done yet, in order; the first one resumes from ``ckpt``."""
        cfg = self.cfg
        state = LoopState(stages=[StageProgress(s.name, s.algo, s.steps) for s in cfg.stages])
        if ckpt is not None:
            state.step = int(ckpt["step"])
            state.stage_index = int(ckpt["stage_index"])
            state.stages = [StageProgress.from_dict(d) for d in ckpt["loop"]["stages"]]
        self.writer = (
            MetricsWriter(
                self.run_dir,
                resume_offset=int(ckpt["loop"]["metrics_offset"]) if ckpt is not None else None,
                tensorboard=cfg.tensorboard,
                purge_step=state.step if ckpt is not None else None,
            )
            if self.dist.is_main
            else NullWriter()
        )
        self.progress = Progress(
            sum(s.steps for s in cfg.stages),
            state.step,
            cfg.progress if self.dist.is_main else False,
        )
        self.state = state
        self._final_states = {}
        try:
            with _StopFlag() as stop:
                self._stop = stop
                for i in range(state.stage_index, len(cfg.stages)):
                    if state.stages[i].done:
                        continue
                    resume_ckpt = (
                        ckpt if ckpt is not None and int(ckpt["stage_index"]) == i else None
                    )
                    self._run_stage(i, resume_ckpt, init_state if i == 0 else None)
                    ckpt = None
        finally:
            self.progress.close()
            self.writer.close()

    def _run_stage(
        self, index: int, ckpt: dict[str, Any] | None, init_state: dict[str, Any] | None
    ) -> None:
        raise NotImplementedError

    def _stage_final_state(self, name: str) -> dict[str, Any]:
        if name in self._final_states:
            return self._final_states[name]
        path = self.ckpts.final_path(name)
        try:
            return dict(load_checkpoint(path)["algo_state"])
        except CheckpointError as e:
            raise RunError(f"init: stage {name!r} has no final checkpoint ({e})") from None

    def _resume_stage(
        self,
        ckpt: dict[str, Any],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        sampler: Any,
    ) -> None:
        """A stage's optimizers, LR schedulers, sampler and every RNG as ``ckpt`` left them
        (this rank's generators, for a checkpoint of as many ranks)."""
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        for name, sch in schedulers.items():
            sch.load_state_dict(ckpt["schedulers"][name])
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(self._rank_part(ckpt, "rng", ckpt["rng"]))

    def _rank_part(self, ckpt: dict[str, Any], key: str, default: Any) -> Any:
        """This rank's ``key`` of a checkpoint of as many ranks (``ckpt["ranks"]``), else
        ``default`` (rank 0's, or the one process's)."""
        ranks = ckpt.get("ranks")
        if ranks is not None and len(ranks) == self.dist.world_size:
            return ranks[self.dist.rank][key]
        return default

    def _write_stage_start(self, stage: StageConfig) -> None:
        self.writer.write(
            {
                "step": self.state.step,
                "stage": stage.name,
                "algo": stage.algo,
                "kind": "stage_start",
            }
        )

    def _pending_metrics(
        self, ckpt: dict[str, Any] | None, device: torch.device
    ) -> list[dict[str, Any]]:
        """The metrics of the steps after the checkpoint's last row (0-dim tensors; this
        rank's own, for a checkpoint of as many ranks)."""
        if ckpt is None:
            return []
        return [
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in m.items()}
            for m in self._rank_part(ckpt, "pending_metrics", ckpt["loop"]["pending_metrics"])
        ]

    def _train_steps(
        self,
        index: int,
        buf: list[dict[str, Any]],
        *,
        step: Callable[[int], dict[str, Any]],
        schedulers: dict[str, Any],
        row_rates: Callable[[int, float], dict[str, Any]],
        evaluate: Callable[[], bool],
        save: Callable[[list[dict[str, Any]]], None],
        every_eval: int,
    ) -> Callable[[], float]:
        """The steps of stage ``index`` from where it stands to its end or an early stop.

        Per step: ``step(stage_step)`` (its metrics go to ``buf``), one LR-scheduler step
        (a reduce_on_plateau schedule steps after each evaluation, in :meth:`_write_eval`);
        a metrics row every ``log_every`` steps (``row_rates(steps, seconds)`` adds the
        learning rate and throughput), ``evaluate()`` every ``every_eval`` steps and at the
        end (true: stop early), ``save(buf)`` every ``checkpoint.every`` steps and on a stop
        signal (then :class:`Interrupted`). Sets the stage's train time and
        ``stopped_early``; returns the stage's wall clock.
        """
        cfg, state = self.cfg, self.state
        stage, sp = cfg.stages[index], state.stages[index]
        every_ckpt, log_every = cfg.checkpoint.every, cfg.log_every
        self._plateau = schedulers.get(PLATEAU)
        if self._plateau is not None:
            try:
                self._plateau.resolve(self.metric, self.mode)
            except ConfigError as e:
                raise ConfigError(f"stages.{index}.{e}") from None
        wall0 = sp.wall_time_s
        t_stage = t_row = time.perf_counter()
        row_steps, row_pause = 0, 0.0  # steps and seconds of eval / checkpoints since the last row
        stop_now = False

        def elapsed() -> float:
            return wall0 + time.perf_counter() - t_stage

        dist = self.dist
        while sp.steps_done < stage.steps:
            buf.append(step(sp.steps_done))
            for sch in schedulers.values():
                sch.step()
            sp.steps_done += 1
            state.step += 1
            row_steps += 1
            s = sp.steps_done
            last = s == stage.steps
            # one process stops after any step; the ranks of a run together, at a row
            stop_signal = self._stop.signum is not None and not dist.enabled
            if s % log_every == 0 or last:
                # the only host sync of the hot loop (and, across ranks, one all-reduce)
                row_metrics, stop_signal = dist.mean_and_any(
                    mean_metrics(buf), self._stop.signum is not None
                )
                buf.clear()
                now = time.perf_counter()
                dt = max(now - t_row - row_pause, 1e-9)
                sp.train_time_s += dt
                row: dict[str, Any] = {
                    "step": state.step,
                    "stage": stage.name,
                    "algo": stage.algo,
                    "kind": "train",
                    **row_metrics,
                    **row_rates(row_steps, dt),
                    "time": round(elapsed(), 3),
                }
                self.writer.write(row)
                self.progress.update(state.step, row_metrics, stage.name)
                t_row, row_steps, row_pause = now, 0, 0.0
            if (every_eval and s % every_eval == 0) or last:
                t0 = time.perf_counter()
                stop_now = evaluate()
                row_pause += time.perf_counter() - t0
            if stop_signal:
                sp.train_time_s += max(time.perf_counter() - t_row - row_pause, 0.0)
                sp.wall_time_s = elapsed()
                save(buf)
                by = f"signal {self._stop.signum}" if self._stop.signum else "a signal"
                raise Interrupted(
                    f"stopped by {by} at step {state.step}; "
                    f"continue with --resume (out={self.run_dir})"
                )
            if stop_now or last:
                break
            if s % every_ckpt == 0:
                t0 = time.perf_counter()
                sp.wall_time_s = elapsed()
                save(buf)
                row_pause += time.perf_counter() - t0
        if row_steps:  # an early stop between two rows
            sp.train_time_s += max(time.perf_counter() - t_row - row_pause, 0.0)
        sp.stopped_early = stop_now and sp.steps_done < stage.steps
        if sp.stopped_early:
            self._log(
                f"{stage.name}: early stop at stage step {sp.steps_done} "
                f"({self.metric} did not improve for {cfg.early_stopping.patience} evaluations)"
            )
        return elapsed

    def _write_eval(self, index: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """An evaluation's row and progress update; its record, now the stage's last. A
        reduce_on_plateau schedule sees the evaluation's metric here."""
        stage, sp = self.cfg.stages[index], self.state.stages[index]
        if self._plateau is not None:
            self._step_plateau(index, self._plateau, metrics)
        row = {
            "step": self.state.step,
            "stage": stage.name,
            "algo": stage.algo,
            "kind": "eval",
            **metrics,
        }
        self.writer.write(row)
        self.progress.update(self.state.step, metrics, stage.name)
        record = {"step": self.state.step, "stage_step": sp.steps_done, **metrics}
        if sp.first_eval is None:
            sp.first_eval = record
        sp.final_eval = record
        return record

    def _step_plateau(self, index: int, plateau: PlateauScheduler, metrics: dict[str, Any]) -> None:
        """Step the stage's reduce_on_plateau schedule with this evaluation's metric."""
        value = metrics.get(plateau.metric)
        if value is None:
            raise RunError(
                f"stages.{index}.lr_schedule.metric: {plateau.metric!r} is not among the "
                f"evaluation metrics ({', '.join(sorted(metrics))})"
            )
        if plateau.observe(float(value)):
            self._log(
                f"{self.cfg.stages[index].name}: {plateau.metric} stopped improving; "
                f"reduce_on_plateau factor now {plateau.factors[0].scale:g}"
            )

    def _track_best(
        self,
        index: int,
        value: float,
        record: dict[str, Any],
        checkpoint: Callable[[], dict[str, Any]],
    ) -> bool:
        """Keep the best evaluation (and ``checkpoint()`` as the best checkpoint) by the
        early-stopping metric's ``value``; True when patience has run out."""
        stage, sp = self.cfg.stages[index], self.state.stages[index]
        delta = self.cfg.early_stopping.min_delta
        better = sp.best_value is None or (
            value > sp.best_value + delta if self.mode == "max" else value < sp.best_value - delta
        )
        if better:
            sp.best_value = float(value)
            sp.best_eval = record
            sp.evals_since_best = 0
            ckpt = checkpoint()  # on every rank: it gathers what the ranks hold
            if self.dist.is_main:
                save_atomic(ckpt, self.ckpts.best_path(stage.name))
        else:
            sp.evals_since_best += 1
        patience = self.cfg.early_stopping.patience
        return patience is not None and sp.evals_since_best >= patience

    def _write_summary(self, summary: dict[str, Any], plot: Callable[..., Path]) -> dict[str, Any]:
        """``summary.json`` and the curves PNG (drawn by ``plot``) of the finished run
        (rank 0; every rank returns the summary)."""
        if not self.dist.is_main:
            return summary
        (self.run_dir / SUMMARY_FILE).write_text(
            json.dumps(summary, indent=2) + "\n", encoding="utf-8"
        )
        rows = read_metrics(self.run_dir / "metrics.jsonl")
        title = f"{self.run_dir.name}: " + " -> ".join(s.name for s in self.cfg.stages)
        plot(rows, self.run_dir / CURVES_FILE, title=title)
        return summary

    def _checkpoint_record(
        self,
        index: int,
        algo_state: dict[str, Any],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any] | None,
        sampler: Any,
        pending: list[dict[str, Any]],
        *,
        meta: dict[str, Any],
        loop: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A checkpoint of stage ``index`` at the current step; ``loop`` adds the
        trainer's own loop state, ``meta`` what its runs are checked against.

        Data-parallel: every rank builds it at the same step (rank 0 writes it); ``ranks``
        holds every rank's generators and pending metrics, for an exact resume on as many
        ranks."""
        st = self.state
        pending_metrics = [
            {
                k: (v.detach().cpu() if isinstance(v, torch.Tensor) else float(v))
                for k, v in m.items()
            }
            for m in pending
        ]
        extra: dict[str, Any] = {}
        if self.dist.enabled:
            extra["ranks"] = self.dist.gather(
                {"rng": rng_state(), "pending_metrics": pending_metrics}
            )
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "step": st.step,
            "stage_index": index,
            "stage_name": self.cfg.stages[index].name,
            "algo": self.cfg.stages[index].algo,
            "algo_state": algo_state,
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()},
            "sampler": sampler.state_dict() if sampler is not None else None,
            "rng": rng_state(),
            "loop": {
                "stages": [s.to_dict() for s in st.stages],
                **(loop or {}),
                "metrics_offset": self.writer.offset(),
                "pending_metrics": pending_metrics,
            },
            "meta": meta,
            **extra,
        }

    def _save_final(self, index: int, ckpt: dict[str, Any]) -> None:
        """A stage's final checkpoint, and the same as the step checkpoint of its last step."""
        if not self.dist.is_main:
            return
        save_atomic(ckpt, self.ckpts.final_path(self.cfg.stages[index].name))
        self.ckpts.save_step(ckpt, self.state.step)


class Trainer(StagedTrainer):
    """Runs one training config in its run directory (``cfg.out``)."""

    evaluator: Evaluator | None = None  # rank 0's (the others do not evaluate)

    def run(self) -> dict[str, Any]:
        cfg, dist = self.cfg, self.dist
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # Every rank checks and loads what it needs; all go on, or all stop with one report.
        with dist.agreed(RUN_ERRORS):
            device = torch.device(cfg.resolved_device())
            if dist.enabled and device.type == "cuda":
                device = dist.device  # cuda:LOCAL_RANK
            if dist.world_size > 1:
                self._check_data_parallel()
            ckpt = self._prepare_dir()
            data = load_run_data(cfg, device, dist)
            self.data = data
            if dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            self._open_run(ckpt, data.store.content_hash, data.device)
            if dist.is_main:
                self.evaluator = make_evaluator(cfg, data)
                self.evaluator.check()
            self.metric, self.mode = resolve_metric(cfg, data.store)

            # Build every stage's algorithm once: a bad hyper-parameter fails now, not hours in.
            for i, st in enumerate(cfg.stages):
                build_algorithm(st, self._context(i), data)
            init_state = self._init_from_state(cfg.init_from) if cfg.init_from else None
        self._rank_digests: dict[str, list[str]] = {}
        self._run_stages(ckpt, init_state)
        return self._finish()

    def _check_data_parallel(self) -> None:
        """What several ranks cannot train (yet): d3rlpy's algorithms step their own
        optimizers, out of reach of the gradient average."""
        for i, st in enumerate(self.cfg.stages):
            if st.is_d3rlpy:
                raise RunError(
                    f"stages.{i}.algo: {st.algo} trains on one process for now; run it with "
                    "python -m trainer.train, or use the native bc / iql / cql under torchrun"
                )

    def _context(self, index: int) -> AlgoContext:
        """Stage ``index``'s algorithm context: the store, the device and the stage's gamma."""
        store = self.data.store
        return algo_context(store, self.data.device, self.cfg.stage_gamma(index, store.discount))

    def _resolved_config(self, store_hash: str, device: torch.device) -> dict[str, Any]:
        """Also the run's gamma (the store's discount unless the config sets it) and its
        number of shards (one per rank unless the config sets it)."""
        resolved = super()._resolved_config(store_hash, device)
        if resolved.get("gamma") is None:
            resolved["gamma"] = float(self.data.store.discount)
        resolved["shards"] = len(self.data.shards.sizes)
        return resolved

    def _init_from_state(self, path: str) -> dict[str, Any]:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            raise RunError(f"--init-from: {e}") from None
        meta = ckpt["meta"]
        store = self.data.store
        if meta["obs_dim"] != store.obs_dim or meta["action_space"] != _space_dict(
            store.action_space
        ):
            raise RunError(
                f"--init-from: {path} was trained on obs_dim {meta['obs_dim']} / actions "
                f"{meta['action_space']}, this store has {store.obs_dim} / {_space_dict(store.action_space)}"
            )
        return dict(ckpt["algo_state"])

    # ------------------------------------------------------------------ one stage
    def _run_stage(
        self, index: int, ckpt: dict[str, Any] | None, init_state: dict[str, Any] | None
    ) -> None:
        cfg, data, state = self.cfg, self.data, self.state
        stage = cfg.stages[index]
        sp = state.stages[index]
        state.stage_index = index
        dist = self.dist
        if ckpt is None:
            seed_everything(step_seed(cfg.seed, index, stream=STAGE_STREAM))
        algo = build_algorithm(stage, self._context(index), data)
        schedulers = make_schedulers(algo.optimizers, stage.lr_schedule, stage.steps)
        sampler = TransitionSampler(
            data.train, stage.batch_size, cfg.seed, stream=index, shards=data.shards
        )
        if ckpt is not None:
            algo.load_state_dict(ckpt["algo_state"])
            self._resume_stage(ckpt, algo.optimizers, schedulers, sampler)
        else:
            sp.start_step = state.step
            source = None
            if stage.init is not None:
                source = self._stage_final_state(stage.init)
            elif init_state is not None:
                source = init_state
            if source is not None:
                try:
                    algo.init_from(source)
                except ValueError as e:
                    where = f"stages.{index}.init" if stage.init is not None else "--init-from"
                    raise RunError(f"{where}: {e}") from None
            self._write_stage_start(stage)
            if dist.rank > 0:  # the weights are built alike; each rank draws its own noise
                seed_everything(step_seed(cfg.seed, index, stream=RANK_STREAM + dist.rank))
        if dist.enabled:  # as DDP does: every rank starts from rank 0's weights
            dist.broadcast_tensors(
                [t for m in algo_modules(algo) for t in (*m.parameters(), *m.buffers())]
            )

        lr_opt = next(iter(algo.optimizers.values()), None)

        def row_rates(steps: int, seconds: float) -> dict[str, Any]:
            rates: dict[str, Any] = {}
            if lr_opt is not None:
                rates["lr"] = float(lr_opt.param_groups[0]["lr"])
            rates["steps_per_s"] = round(steps / seconds, 2)
            return rates

        with gradient_sync(dist.average_gradients if dist.enabled else None):
            elapsed = self._train_steps(
                index,
                self._pending_metrics(ckpt, data.device),
                step=lambda s0: algo.update(sampler.sample()),
                schedulers=schedulers,
                row_rates=row_rates,
                evaluate=lambda: self._evaluate(algo, index),
                save=lambda buf: self._save_step(algo, schedulers, sampler, index, buf),
                every_eval=cfg.eval.every,
            )
        sp.done = True
        sp.wall_time_s = elapsed()
        self._final_states[stage.name] = algo.state_dict()
        if dist.enabled:  # weights, targets and optimizer states: the same on every rank
            self._rank_digests[stage.name] = dist.same_state(
                self._final_states[stage.name], f"stage {stage.name}"
            )
        self._save_final(index, self._checkpoint(algo, schedulers, sampler, index, []))

    def _evaluate(self, algo: Algorithm, index: int) -> bool:
        """Evaluate (rank 0, its results broadcast), log, track the best checkpoint; True
        when early stopping says stop (on every rank alike)."""
        metrics = self.dist.on_main(lambda: self._evaluator()(algo), RUN_ERRORS)
        stop = False
        with self.dist.agreed(RUN_ERRORS):
            stop = self._after_eval(algo, index, metrics)
        return stop

    def _evaluator(self) -> Evaluator:
        assert self.evaluator is not None, "only rank 0 evaluates"
        return self.evaluator

    def _after_eval(self, algo: Algorithm, index: int, metrics: dict[str, Any]) -> bool:
        if not metrics:
            return False
        record = self._write_eval(index, metrics)
        if self.metric is None:
            return False
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            if self.metric.startswith(("eval/", "val/")) and value is None:
                raise RunError(
                    f"early_stopping.metric: {self.metric!r} is not among the evaluation metrics "
                    f"({', '.join(sorted(metrics))})"
                )
            return False
        return self._track_best(
            index, value, record, lambda: self._checkpoint(algo, None, None, index, [])
        )

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(
        self,
        algo: Algorithm,
        schedulers: dict[str, Any] | None,
        sampler: TransitionSampler | None,
        index: int,
        pending: list[dict[str, Any]],
    ) -> dict[str, Any]:
        store = self.data.store
        return self._checkpoint_record(
            index,
            algo.state_dict(),
            algo.optimizers,
            schedulers,
            sampler,
            pending,
            meta={
                "store_hash": store.content_hash,
                "obs_dim": store.obs_dim,
                "action_space": _space_dict(store.action_space),
                "config": self.cfg.to_dict(),
            },
        )

    def _save_step(
        self,
        algo: Algorithm,
        schedulers: dict[str, Any],
        sampler: TransitionSampler,
        index: int,
        pending: list[dict[str, Any]],
    ) -> None:
        ckpt = self._checkpoint(algo, schedulers, sampler, index, pending)
        if self.dist.is_main:
            self.ckpts.save_step(ckpt, self.state.step)

    # ------------------------------------------------------------------ end
    def _finish(self) -> dict[str, Any]:
        st = self.state
        store = self.data.store
        refs = store.reference_returns
        reference: dict[str, Any] | None = None
        if refs:
            reference = dict(refs)
            if refs.get("behaviour") is not None:
                reference["behaviour_normalized_score"] = float(
                    store.normalized_score(refs["behaviour"])
                )
        summary = {
            "run": str(self.run_dir),
            "store": self.cfg.store,
            "store_hash": store.content_hash,
            "seed": self.cfg.seed,
            "device": str(self.data.device),
            "total_steps": st.step,
            "wall_time_s": round(sum(s.wall_time_s for s in st.stages), 3),
            "metric": self.metric,
            "reference_returns": reference,
            "split": {
                "train_episodes": int(len(self.data.train_episodes)),
                "val_episodes": int(len(self.data.val_episodes)),
                "train_transitions": self.data.shards.total,
            },
            "stages": [s.summary(self.metric) for s in st.stages],
        }
        shards = self.data.shards
        if self.dist.enabled or len(shards.sizes) > 1:
            summary["data_parallel"] = {
                "ranks": self.dist.world_size,
                "shards": len(shards.sizes),
                "shard_transitions": list(shards.sizes),
                # per stage trained by this process: each rank's sha256 of the final
                # weights and optimizer states (checked equal)
                "state_sha256": self._rank_digests,
            }
        if self.data.relabelled is not None:  # reward.relabel: what the stages trained on
            summary["reward_relabel"] = self.data.relabelled
        return self._write_summary(summary, plot_curves)


def algo_modules(algo: Algorithm) -> list[torch.nn.Module]:
    """The networks of a native algorithm (``modules``), for broadcasting their weights."""
    modules = getattr(algo, "modules", None)
    return list(modules.values()) if isinstance(modules, torch.nn.ModuleDict) else []


def _space_dict(space: ActionSpace) -> dict[str, Any]:
    if space.discrete:
        return {"type": "discrete", "n": space.n}
    return {"type": "continuous", "dim": space.dim}
