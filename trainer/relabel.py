"""Relabel a transition store's rewards at training time: ``reward.relabel`` of a config.

The config's ``reward: {relabel: REWARD}`` is a REWARD (:mod:`trainer.rewards`,
``docs/REWARDS.md``) whose leaves are all ``column`` leaves. A leaf names ``reward`` (the
store's reward) or a named reward column of the store (its spec's ``fields.rewards``,
stored as ``reward_NAME``)::

    reward:
      relabel:
        type: weighted_sum
        components:
          - {weight: 1.0, reward: {column: reward}}
          - {weight: 0.1, reward: {column: upright}}

When the run starts, :func:`relabel_arrays` evaluates the tree ONCE, vectorised, over every
row of the store (training and validation episodes alike) plus the last steps the store
dropped as unbootstrappable (their rewards are kept in the episodes table), and the run's
samplers pack the result instead of the stored ``reward``: every stage of the run trains on
it, the d3rlpy stages too. ``return_to_go`` and the episode returns are recomputed from it
with the store's discount, a dropped last step's relabelled reward included, so that
``reward.normalize: return_range`` and ``reward.scale`` / ``shift``, which apply after the
relabelling, see the relabelled returns. The online evaluation (``eval/return_mean``,
``eval/normalized_score``) plays the environment and is not affected.

An ``ema_normalize`` post-processor sees the whole store as ONE batch: its first (and only)
update sets its mean and variance to the store's, so it standardises the column. The result
is a pure function of the store and the spec, so a resumed run recomputes the same rewards
and no reward state is checkpointed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.config import ConfigError
from trainer.rewards import Column, Leaf, RewardError, RewardNode, build_reward

if TYPE_CHECKING:
    from pipeline.store import PartedColumn, TransitionStore
    from trainer.samplers import TransitionArrays

MAIN = "reward"  # the name of the store's own reward in a relabelling tree


def build_relabel(spec: Any, where: str = "relabel") -> RewardNode:
    """The reward tree of ``reward.relabel``; ConfigError (one line naming the node's path)
    for a spec that cannot be built or a leaf that is not a ``column`` leaf."""
    node = build_reward(spec, where)
    for sub in node.nodes():
        if isinstance(sub, Leaf) and not isinstance(sub, Column):
            raise ConfigError(
                f"{sub.path}: leaf {sub.kind!r} cannot relabel a transition store; use "
                f"{{column: NAME}} with NAME `{MAIN}` or a named reward column of the store"
            )
    return node


def columns_used(node: RewardNode) -> list[tuple[str, str]]:
    """(YAML path, column) of every ``column`` leaf of ``node``, in YAML order."""
    return [(sub.path, sub.column) for sub in node.nodes() if isinstance(sub, Column)]


@dataclass(frozen=True)
class StoreRewards:
    """The reward columns a relabelling reads: one value per row, and per episode the
    value of a last step the store dropped (0 where none was)."""

    # {name: (N,)}: `reward` and every named reward column (a parted store's: PartedColumn,
    # read whole by np.asarray)
    rows: dict[str, np.ndarray | PartedColumn]
    dropped: dict[str, np.ndarray]  # {name: (E,) float64}
    where: str = "the store"  # named in errors

    @classmethod
    def of(cls, store: TransitionStore) -> StoreRewards:
        """``reward`` and the named reward columns of an opened transition store."""
        ep = store.episodes
        rows = {MAIN: store.rewards, **store.reward_columns}
        dropped = {MAIN: ep.dropped_reward, **ep.dropped_named_rewards}
        return cls(rows, dropped, f"store {store.path}")


@dataclass(frozen=True)
class Relabelled:
    """The relabelled arrays and what the run's summary records of them."""

    arrays: TransitionArrays
    # {"reward/NAME": {"mean", "std"} (+ "weight" for a weighted component)} over the rows
    components: dict[str, dict[str, float]]


def relabel_arrays(
    arrays: TransitionArrays,
    node: RewardNode,
    rewards: StoreRewards,
    discount: float,
    where: str = "reward.relabel",
) -> Relabelled:
    """``arrays`` with ``rewards`` (N,), ``return_to_go`` (N,) and the episodes' dropped
    rewards replaced by ``node`` evaluated on the store's reward columns (see the module
    docstring). ``where`` prefixes errors: ConfigError for a column the store lacks (naming
    the leaf's path and the store's columns), for a value that is not finite."""
    known = sorted(rewards.rows)
    for path, column in columns_used(node):
        if column not in rewards.rows:
            raise ConfigError(
                f"{path}: no reward column {column!r} in {rewards.where}; its reward columns "
                f"are: {', '.join(known)} (named ones come from its spec's fields.rewards)"
            )
    n = arrays.n_transitions
    last_dropped = (
        np.zeros(arrays.n_episodes, dtype=bool)
        if arrays.episode_last_dropped is None
        else np.asarray(arrays.episode_last_dropped, dtype=bool)
    )
    # one batch: every row, then the dropped last step of each episode that has one
    batch = {
        name: np.concatenate(
            [
                np.asarray(rewards.rows[name], dtype=np.float64),
                np.asarray(rewards.dropped[name], dtype=np.float64)[last_dropped],
            ]
        )
        for name in known
    }
    try:
        total, logs = node.evaluate_columns(batch)
    except RewardError as e:
        raise ConfigError(f"{where}: {e}") from None
    dropped = np.zeros(arrays.n_episodes, dtype=np.float64)
    dropped[last_dropped] = total[n:]
    rtg = returns_to_go(total[:n], dropped, arrays.episode_start, arrays.episode_length, discount)
    new = replace(
        arrays,
        rewards=total[:n].astype(np.float32),
        return_to_go=rtg.astype(np.float32),
        episode_dropped_reward=dropped,
        episode_last_dropped=last_dropped,
    )
    order = [f"reward/{sub.name}" for sub in node.nodes()]
    return Relabelled(new, component_stats(logs, n, order))


def returns_to_go(
    rewards: np.ndarray,
    dropped: np.ndarray,
    episode_start: np.ndarray,
    episode_length: np.ndarray,
    discount: float,
) -> np.ndarray:
    """(N,) float64: the discounted return from each row to its episode's end, the episode's
    ``dropped`` reward (E,) counted one step after its last row (as the store does)."""
    from pipeline.transitions.episodes import discounted_returns

    length = np.asarray(episode_length, dtype=np.int64)
    has_dropped = dropped != 0  # a dropped reward of 0 adds nothing to any return
    extended = length + has_dropped
    ext_start = np.cumsum(extended) - extended
    offset = np.arange(len(rewards)) - np.repeat(episode_start, length)
    rows = np.repeat(ext_start, length) + offset  # each row's place in the extended order
    values = np.zeros(int(extended.sum()), dtype=np.float64)
    values[rows] = rewards
    values[(ext_start + length)[has_dropped]] = dropped[has_dropped]
    starts = np.zeros(len(values), dtype=bool)
    starts[ext_start[extended > 0]] = True
    return discounted_returns(values, starts, discount)[rows]


def component_stats(
    logs: Mapping[str, np.ndarray], n: int, order: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """{"reward/NAME": {mean, std[, weight]}} over the first ``n`` values (the store's rows)
    of every node's logged values (:meth:`RewardNode.evaluate`), in ``order`` (default: the
    logs' own)."""
    keys = order if order is not None else [k for k in logs if k.startswith("reward/")]
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        rows = logs[key][:n]
        out[key] = {"mean": float(rows.mean()), "std": float(rows.std())} if n else {}
    for key, values in logs.items():
        if key.startswith("reward_weight/") and len(values):
            out.setdefault("reward/" + key.split("/", 1)[1], {})["weight"] = float(values[0])
    return out
