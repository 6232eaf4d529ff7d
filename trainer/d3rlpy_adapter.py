"""d3rlpy's algorithms on our stores, trained step by step in our loop.

``algo: d3rlpy.IQL`` (or ``d3rlpy.CQL``, ``d3rlpy.BC``, ``d3rlpy.DiscreteCQL``, any d3rlpy
algorithm by the name of its ``NAMEConfig`` class) builds d3rlpy's own implementation and
wraps it in the interface of our algorithms, so the loop samples, logs, evaluates and
checkpoints it exactly like a native one: it is the reference the native algorithms are
held against.

Conversion to d3rlpy's dataset (:func:`to_mdp_dataset`): ``terminals = terminated``,
``timeouts = truncated``. d3rlpy's episodes hold T observations and make T-1 transitions
unless the episode terminated, which would drop the last transition of every truncated
episode; so every truncated episode gets one extra row (its final ``next_observation``, a
zero reward, a repeated action) that carries the timeout flag. Every transition of the
store is then a transition of the dataset, and episodes end where the store's do.

Stage keys read here (beside the d3rlpy config's own fields, e.g. ``expectile``,
``actor_learning_rate``, ``actor_encoder_factory: {type: vector, params: {hidden_units: [256, 256]}}``):

- ``observation_scaler``: ``standard`` (default; the store manifest's mean / std) or ``none``;
- ``action_scaler`` (continuous): ``min_max`` (default; the store's action bounds) or ``none``;
- ``sampler``: ``store`` (default; our sampler's batches, identical to a native run's) or
  ``d3rlpy`` (d3rlpy's own ``sample_transition_batch`` on the converted dataset);
- ``gamma`` is the stage's (the loop key: the stage's own, else the run's, else the store's
  discount); ``grad_clip`` sets every optimizer factory's ``clip_grad_norm``.

The dataset is converted only for ``sampler: d3rlpy``, at the first update: the loop hands
over a function that converts it, not the dataset.

State (:meth:`D3rlpyAlgorithm.state_dict`): what d3rlpy's own checkpointer saves, through
its public interfaces: every entry of ``impl.modules.create_checkpointer(...).modules``
(the networks, and each optimizer wrapper's state: the optimizer and its LR scheduler, e.g.
a cosine ``lr_scheduler_factory``), plus ``grad_step`` (restored with ``set_grad_step``), so
a resumed stage goes on exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.store import ActionSpace
from trainer.batch import TransitionBatch
from trainer.samplers import TransitionArrays

PREFIX = "d3rlpy."
_OWN_KEYS = ("observation_scaler", "action_scaler", "sampler", "grad_clip")


def import_d3rlpy() -> Any:
    """``import d3rlpy``, without the notice its ``gym`` import prints on stderr."""
    with contextlib.redirect_stderr(io.StringIO()):
        import d3rlpy
    return d3rlpy


# --------------------------------------------------------------------------- dataset


def mdp_arrays(
    arrays: TransitionArrays, episodes: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The columns d3rlpy's ``MDPDataset`` takes, with one extra row after each truncated episode."""
    eps = np.arange(arrays.n_episodes) if episodes is None else np.asarray(episodes, dtype=np.int64)
    rows = arrays.rows_of(eps)
    starts = arrays.episode_start[eps]
    lengths = arrays.episode_length[eps]
    last = starts + lengths - 1  # (E,) source row of each episode's last transition
    trunc_ep = ~arrays.terminated[last]  # (E,) episodes that need the extra row
    n = len(rows)
    n_extra = int(trunc_ep.sum())
    # Position in the output of each source row: shifted by the extra rows before it.
    ends_out = np.cumsum(lengths + trunc_ep)  # (E,) exclusive end of each episode in the output
    base = ends_out - lengths - trunc_ep
    pos = np.repeat(base, lengths) + (
        np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    extra_pos = ends_out[trunc_ep] - 1

    obs_dim = arrays.obs_dim
    act = arrays.actions
    discrete = act.ndim == 1
    out_obs = np.empty((n + n_extra, obs_dim), dtype=np.float32)
    out_act = np.empty((n + n_extra,) if discrete else (n + n_extra, act.shape[1]), dtype=act.dtype)
    out_rew = np.zeros(n + n_extra, dtype=np.float32)
    out_term = np.zeros(n + n_extra, dtype=np.float32)
    out_time = np.zeros(n + n_extra, dtype=np.float32)

    out_obs[pos] = arrays.observations[rows]
    out_act[pos] = act[rows]
    out_rew[pos] = arrays.rewards[rows]
    out_term[pos] = arrays.terminated[rows]
    last_t = last[trunc_ep]
    out_obs[extra_pos] = arrays.next_observations[last_t]
    out_act[extra_pos] = act[last_t]
    out_time[extra_pos] = 1.0
    return {
        "observations": out_obs,
        "actions": out_act,
        "rewards": out_rew,
        "terminals": out_term,
        "timeouts": out_time,
    }


def to_mdp_dataset(
    arrays: TransitionArrays, action_space: ActionSpace, episodes: np.ndarray | None = None
) -> Any:
    """The store's episodes (default: all) as a d3rlpy ``MDPDataset``; checks nothing was lost."""
    d3rlpy = import_d3rlpy()
    cols = mdp_arrays(arrays, episodes)
    if action_space.discrete:
        space, size = d3rlpy.ActionSpace.DISCRETE, int(action_space.n or 0)
    else:
        space, size = d3rlpy.ActionSpace.CONTINUOUS, int(action_space.dim or 0)
    with contextlib.redirect_stdout(io.StringIO()):  # d3rlpy logs its signature inference
        dataset = d3rlpy.dataset.MDPDataset(
            observations=cols["observations"],
            actions=cols["actions"],
            rewards=cols["rewards"],
            terminals=cols["terminals"],
            timeouts=cols["timeouts"],
            action_space=space,
            action_size=size,
        )
    eps = np.arange(arrays.n_episodes) if episodes is None else episodes
    want = int(arrays.episode_length[eps].sum())
    if dataset.transition_count != want or len(dataset.episodes) != len(eps):
        raise RuntimeError(
            f"d3rlpy dataset has {dataset.transition_count} transitions in {len(dataset.episodes)} "
            f"episodes, the store {want} in {len(eps)}"
        )
    return dataset


# --------------------------------------------------------------------------- config


def config_class(algo: str) -> Any:
    """d3rlpy's ``NAMEConfig`` class for ``d3rlpy.NAME``."""
    d3rlpy = import_d3rlpy()
    name = algo[len(PREFIX) :] if algo.startswith(PREFIX) else algo
    cls = getattr(d3rlpy.algos, f"{name}Config", None)
    if cls is None:
        known = sorted(
            k[: -len("Config")]
            for k in dir(d3rlpy.algos)
            if k.endswith("Config") and k not in ("LearnableConfig", "Config")
        )
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean d3rlpy.{close[0]}?)" if close else ""
        raise ValueError(f"no d3rlpy algorithm {name!r}{hint}; available: {', '.join(known)}")
    return cls


def _merge(default: Any, value: Any) -> Any:
    """A user value over d3rlpy's serialized default (factories: {type, params} or params only)."""
    if isinstance(default, dict) and "type" in default and "params" in default:
        if isinstance(value, str):
            return {"type": value, "params": {}}
        if isinstance(value, dict) and "type" in value:
            params = value.get("params") or {}
            same = value["type"] == default["type"]
            return {
                "type": value["type"],
                "params": {**(default["params"] if same else {}), **params},
            }
        if isinstance(value, dict):
            return {"type": default["type"], "params": {**default["params"], **value}}
    return value


def _check_params_kept(got: dict[str, Any], wanted: dict[str, Any], owner: str) -> None:
    """d3rlpy drops unknown factory params silently; refuse them instead."""
    for key, value in wanted.items():
        if isinstance(value, dict) and "params" in value and isinstance(got.get(key), dict):
            lost = sorted(set(value["params"]) - set(got[key].get("params", {})))
            if lost:
                raise ValueError(
                    f"{key}: {lost[0]!r} is not a parameter of d3rlpy's {value['type']!r} "
                    f"factory in {owner}"
                )


def build_config(
    algo: str,
    params: dict[str, Any],
    action_space: ActionSpace,
    obs_mean: np.ndarray,
    obs_std: np.ndarray,
    discount: float,
) -> Any:
    """d3rlpy's config object for ``algo`` from a stage's hyper-parameters."""
    d3rlpy = import_d3rlpy()
    cls = config_class(algo)
    default = cls().serialize_to_dict()
    allowed = sorted(set(default) | set(_OWN_KEYS))
    merged = copy.deepcopy(default)
    if "gamma" in default:
        merged["gamma"] = discount  # the stage's gamma (its own, the run's or the store's)
    for key, value in params.items():
        if key in _OWN_KEYS:
            continue
        if key not in default:
            import difflib

            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}: not a field of d3rlpy's {cls.__name__}{hint}")
        merged[key] = _merge(default[key], value)
        if (
            isinstance(value, dict)
            and "type" not in value
            and "hidden_units" in value
            and merged[key].get("type") == "default"
        ):
            merged[key] = {
                "type": "vector",
                "params": dict(value),
            }  # hidden_units means a vector encoder
    clip = params.get("grad_clip")
    if clip is not None:
        for key, value in merged.items():
            if key.endswith("optim_factory") and isinstance(value, dict):
                value["params"]["clip_grad_norm"] = float(clip)
    try:
        config = cls.deserialize_from_dict(merged)
    except Exception as e:  # dataclasses_json raises several types for a bad value
        raise ValueError(f"invalid d3rlpy {cls.__name__} ({type(e).__name__}: {e})") from None
    _check_params_kept(config.serialize_to_dict(), merged, cls.__name__)

    obs_scaler = params.get("observation_scaler", "standard")
    if obs_scaler == "standard":
        config = dataclasses.replace(
            config,
            observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(
                mean=np.asarray(obs_mean, np.float32), std=np.asarray(obs_std, np.float32)
            ),
        )
    elif obs_scaler not in ("none", None):
        raise ValueError(f"observation_scaler: must be standard or none, got {obs_scaler!r}")
    act_scaler = params.get("action_scaler", "min_max" if not action_space.discrete else "none")
    if act_scaler == "min_max":
        if action_space.discrete:
            raise ValueError("action_scaler: min_max is for continuous actions; use none")
        low, high = action_space.low, action_space.high
        if low is None or high is None or not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise ValueError(
                "action_scaler: min_max needs finite action bounds in the store spec; use none"
            )
        config = dataclasses.replace(
            config,
            action_scaler=d3rlpy.preprocessing.MinMaxActionScaler(
                minimum=np.asarray(low, np.float32), maximum=np.asarray(high, np.float32)
            ),
        )
    elif act_scaler not in ("none", None):
        raise ValueError(f"action_scaler: must be min_max or none, got {act_scaler!r}")
    return config


# --------------------------------------------------------------------------- algorithm


class D3rlpyAlgorithm:
    """A d3rlpy algorithm behind our ``Algorithm`` interface."""

    def __init__(
        self,
        algo: str,
        config: Any,
        *,
        obs_dim: int,
        action_space: ActionSpace,
        device: torch.device,
        dataset: Callable[[], Any] | None = None,
        sampler: str = "store",
        batch_size: int | None = None,
    ) -> None:
        self.name = algo
        self.action_space = action_space
        self.discrete = action_space.discrete
        dev = str(device)
        if dev in ("cpu", "cuda"):
            dev = f"{dev}:0"
        self.device = dev
        self.algo = config.create(device=dev)
        if not hasattr(self.algo, "need_returns_to_go"):
            raise ValueError(
                f"{algo} trains on trajectories, not transitions; the loop runs transition-based "
                "d3rlpy algorithms (IQL, CQL, BC, DiscreteCQL, TD3PlusBC, ...)"
            )
        size = int(action_space.n if self.discrete else action_space.dim)  # type: ignore[arg-type]
        with contextlib.redirect_stdout(io.StringIO()):
            self.algo.create_impl((obs_dim,), size)
        self.sampler = sampler
        self.make_dataset = dataset
        self.dataset: Any = None  # converted at the first update that samples from it
        self.batch_size = batch_size or config.batch_size
        if sampler == "d3rlpy" and dataset is None:
            raise ValueError("sampler: d3rlpy needs the converted dataset")
        # d3rlpy's checkpointer entries: networks and optimizer wrappers (optimizer + LR
        # scheduler), by d3rlpy's names ("policy", "q_funcs", "actor_optim", ...)
        self.saved = self.algo.impl.modules.create_checkpointer(dev).modules

    # ------------------------------------------------------------------ modules
    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        from d3rlpy.types import OptimizerWrapperProto

        return {k: v.optim for k, v in self.saved.items() if isinstance(v, OptimizerWrapperProto)}

    def _torch_modules(self) -> dict[str, torch.nn.Module]:
        return {k: v for k, v in self.saved.items() if isinstance(v, torch.nn.Module)}

    # ------------------------------------------------------------------ training
    def _mini_batch(self, batch: TransitionBatch) -> Any:
        from d3rlpy.dataset import TransitionMiniBatch

        def np2(x: torch.Tensor) -> np.ndarray:
            a = x.detach().cpu().numpy().astype(np.float32, copy=False)
            return np.ascontiguousarray(a.reshape(len(a), -1))

        actions = np2(batch.actions)
        transitions: list[Any] = []
        if self.algo.need_returns_to_go:
            # d3rlpy sums gamma^i * rewards_to_go[i]; one element gives the store's return-to-go.
            transitions = [
                SimpleNamespace(rewards_to_go=np.array([[g]], dtype=np.float32))
                for g in batch.return_to_go.detach().cpu().numpy()
            ]
        return TransitionMiniBatch(
            observations=np2(batch.observations),
            actions=actions,
            rewards=np2(batch.rewards),
            next_observations=np2(batch.next_observations),
            next_actions=np.zeros_like(actions),  # not kept by the store; unused by IQL/CQL/BC
            terminals=np2(batch.terminated),
            intervals=np.ones((len(actions), 1), dtype=np.float32),
            transitions=transitions,
        )

    def update(self, batch: TransitionBatch) -> dict[str, torch.Tensor]:
        if self.sampler == "d3rlpy":
            if self.dataset is None:
                assert self.make_dataset is not None
                self.dataset = self.make_dataset()
            mini = self.dataset.sample_transition_batch(self.batch_size)
        else:
            mini = self._mini_batch(batch)
        metrics = self.algo.update(mini)
        return {k: torch.tensor(float(v)) for k, v in metrics.items()}

    # ------------------------------------------------------------------ acting / evaluation
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        single = x.ndim == 1
        if single:
            x = x[None]
        a = self.algo.predict(x) if deterministic else self.algo.sample_action(x)
        return a[0] if single else a

    def evaluate(self, batch: TransitionBatch) -> dict[str, float]:
        obs = batch.observations.detach().cpu().numpy().astype(np.float32)
        acts = batch.actions.detach().cpu().numpy()
        pred = self.algo.predict(obs)
        out: dict[str, float] = {}
        if self.discrete:
            out["accuracy"] = float((pred.reshape(-1) == acts.reshape(-1)).mean())
        else:
            out["action_mse"] = float(((pred - acts) ** 2).mean())
        try:
            q = self.algo.predict_value(obs, acts)
            nxt = batch.next_observations.detach().cpu().numpy().astype(np.float32)
            q_next = self.algo.predict_value(nxt, self.algo.predict(nxt))
        except (AssertionError, NotImplementedError, AttributeError):
            return out  # no Q-function (e.g. BC)
        r = batch.rewards.detach().cpu().numpy()
        done = batch.terminated.detach().cpu().numpy()
        target = r + self.algo.config.gamma * (1.0 - done) * q_next
        out["td_error"] = float(((q - target) ** 2).mean())
        out["q_mean"] = float(q.mean())
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What d3rlpy's checkpointer saves (networks, optimizers, LR schedulers) and the
        gradient-step counter."""
        return {
            "d3rlpy_algo": self.name,
            "modules": {k: dict(m.state_dict()) for k, m in self.saved.items()},
            "grad_step": int(self.algo.grad_step),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("d3rlpy_algo") != self.name:
            raise ValueError(
                f"a state of {state.get('d3rlpy_algo') or state.get('algo')!r} cannot be loaded "
                f"into {self.name!r}"
            )
        missing = sorted(set(self.saved) - set(state["modules"]))
        if missing:
            raise ValueError(
                f"{self.name}: the checkpoint has no {', '.join(missing)} (written by an older "
                "trainer, without d3rlpy's optimizer and LR-scheduler state); start a new run"
            )
        for k, entry in self.saved.items():
            entry.load_state_dict(state["modules"][k])
        self.algo.set_grad_step(int(state["grad_step"]))

    def init_from(self, state: dict[str, Any]) -> None:
        """Start the policy from another d3rlpy algorithm's policy (e.g. d3rlpy.BC -> d3rlpy.IQL)."""
        if "d3rlpy_algo" not in state:
            raise ValueError(
                f"{self.name} can start only from another d3rlpy algorithm's weights; "
                "use a d3rlpy.BC stage (policy_type: stochastic) before it"
            )
        src = state["modules"]
        source_key = next((k for k in ("policy", "imitator") if k in src), None)
        mods = self._torch_modules()
        if source_key is None or "policy" not in mods:
            raise ValueError(
                f"cannot start {self.name} from {state['d3rlpy_algo']}: no policy module to copy "
                f"(source has {', '.join(src)}, target {', '.join(mods)})"
            )
        source = src[source_key]
        for k in ("policy", "targ_policy"):
            if k not in mods:
                continue
            target = mods[k].state_dict()
            copied = {
                name: t
                for name, t in source.items()
                if name in target and target[name].shape == t.shape
            }
            # Everything but a state-independent log-std must come from the source.
            missing = [name for name in target if name not in copied and "logstd" not in name]
            if missing:
                raise ValueError(
                    f"cannot start {self.name} from {state['d3rlpy_algo']}'s {source_key}: "
                    f"{', '.join(missing[:3])} differ; for continuous actions use d3rlpy.BC with "
                    "policy_type: stochastic and the same encoder"
                )
            mods[k].load_state_dict({**target, **copied})


def make_d3rlpy_algorithm(
    algo: str,
    ctx: Any,
    config: dict[str, Any],
    dataset: Callable[[], Any] | None = None,
    batch_size: int | None = None,
) -> D3rlpyAlgorithm:
    """Build ``d3rlpy.NAME`` for a stage; ``dataset()`` gives the MDPDataset that
    ``sampler: d3rlpy`` samples from (called at the first update, never otherwise)."""
    params = dict(config)
    if batch_size is not None and "batch_size" not in params:
        params["batch_size"] = batch_size
    sampler = params.get("sampler", "store")
    if sampler not in ("store", "d3rlpy"):
        raise ValueError(f"sampler: must be store or d3rlpy, got {sampler!r}")
    d3_config = build_config(
        algo, params, ctx.action_space, ctx.obs_mean, ctx.obs_std, ctx.discount
    )
    return D3rlpyAlgorithm(
        algo,
        d3_config,
        obs_dim=ctx.obs_dim,
        action_space=ctx.action_space,
        device=ctx.device,
        dataset=dataset if sampler == "d3rlpy" else None,
        sampler=sampler,
        batch_size=batch_size,
    )
