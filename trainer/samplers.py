"""Samplers over a transition store: the whole split as one matrix on a device, batches by gather.

A split of the store (the training or the validation episodes) is packed once into one
contiguous ``(N, width)`` float32 matrix on the chosen device, one column block per field::

    observation | action | reward | next_observation | terminated | truncated | return_to_go | timestep

A uniform batch is then ONE index draw (``torch.randint`` with a generator seeded from
``(seed, step)``) and ONE gather (``index_select`` on the matrix); the fields of the batch
are column views of the gathered rows. The batch drawn at step ``k`` is a pure function of
``(seed, k)``: a resumed run, or a run that skips ahead with :meth:`TransitionSampler.load_state_dict`,
sees exactly the batches of a run never interrupted, whatever happened in between.

Rewards are scaled here, once, when the matrix is packed (``scale``, ``shift``, or normalised
by the range of episode returns), and the return-to-go column is transformed consistently.

Discrete actions are stored as float32 in the matrix (exact below 2**24 actions) and come
out of a batch as int64.

Shards (data-parallel runs, trainer.distributed): the training episodes can be cut into
``K`` shards, contiguous runs of episodes of about equal numbers of transitions
(:func:`shard_episodes`). A batch of ``B`` is then ``B / K`` transitions from each shard,
shard ``r``'s drawn by its own generator seeded from ``(seed, step, r, K)``; the batch is a
pure function of ``(seed, step, K)``, whoever draws it. A rank of an ``N``-rank run packs
and draws only its own ``K / N`` shards (:class:`Shards`), and one process with ``K``
shards draws exactly the union of the ranks' batches, in rank order. ``K = 1`` is the
plain uniform draw above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.batch import TransitionBatch

if TYPE_CHECKING:
    from pipeline.store import Column, TransitionStore

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for the generator of ``step``: a SplitMix64 hash of (seed, stream, step).

    Nearby seeds and steps give unrelated streams; the result fits ``Generator.manual_seed``.
    """
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03 + step) & _MASK64
    for _ in range(2):
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x >> 1


# --------------------------------------------------------------------------- host arrays


@dataclass(frozen=True)
class TransitionArrays:
    """The columns of a transition store (or synthetic data) as host arrays, episodes in order.

    A parted store's numeric columns are :class:`~pipeline.store.PartedColumn` s (one
    memory-mapped view per part): rows are gathered from them by fancy indexing, as from
    an array; a whole column is read with ``np.asarray`` (a copy)."""

    observations: Column  # (N, obs_dim) float32
    actions: Column  # (N,) int64 or (N, act_dim) float32
    rewards: Column  # (N,) float32
    next_observations: Column  # (N, obs_dim) float32
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    return_to_go: Column  # (N,) float32
    episode_start: np.ndarray  # (E,) int64, first row of each episode
    episode_length: np.ndarray  # (E,) int64
    # (E,) float64: reward of a last step the store dropped as unbootstrappable (else 0);
    # None: no step was dropped. It counts in the return and in every return_to_go.
    episode_dropped_reward: np.ndarray | None = None
    # (E,) bool: that last step was dropped (one more reward after the last row)
    episode_last_dropped: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.rewards)
        for name in ("observations", "actions", "next_observations", "terminated", "truncated"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, rewards has {n}")
        if int(self.episode_length.sum()) != n:
            raise ValueError(
                f"episode lengths sum to {int(self.episode_length.sum())}, not {n} rows"
            )

    @classmethod
    def from_store(cls, store: TransitionStore) -> TransitionArrays:
        """Zero-copy views of an opened store's columns."""
        ep = store.episodes
        return cls(
            observations=store.observations,
            actions=store.actions,
            rewards=store.rewards,
            next_observations=store.next_observations,
            terminated=store.terminated,
            truncated=store.truncated,
            return_to_go=store.return_to_go,
            episode_start=ep.start,
            episode_length=ep.length,
            episode_dropped_reward=ep.dropped_reward,
            episode_last_dropped=ep.last_step_dropped,
        )

    @property
    def n_transitions(self) -> int:
        return len(self.rewards)

    @property
    def n_episodes(self) -> int:
        return len(self.episode_start)

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def discrete(self) -> bool:
        return self.actions.ndim == 1

    def episode_returns(self) -> np.ndarray:
        """(E,) float64: the undiscounted return of each episode, every logged reward
        counted (a dropped last step's too)."""
        if self.n_transitions == 0:
            return np.zeros(0)
        sums = np.add.reduceat(self.rewards.astype(np.float64), self.episode_start)
        sums = np.where(self.episode_length > 0, sums, 0.0)
        if self.episode_dropped_reward is not None:
            sums = sums + self.episode_dropped_reward
        return sums

    def rewards_after_last_row(self) -> np.ndarray:
        """(E,) int64: 1 where the episode's unbootstrappable last step was dropped, else 0."""
        if self.episode_last_dropped is None:
            return np.zeros(self.n_episodes, dtype=np.int64)
        return self.episode_last_dropped.astype(np.int64)

    def rows_of(self, episodes: np.ndarray) -> np.ndarray:
        """(M,) int64: the rows of the given episodes, episode after episode, in order."""
        starts = self.episode_start[episodes]
        lengths = self.episode_length[episodes]
        if len(lengths) == 0:
            return np.zeros(0, dtype=np.int64)
        offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(starts, lengths) + (np.arange(int(lengths.sum())) - offsets)

    def timesteps(self) -> np.ndarray:
        """(N,) int64: each row's step within its episode."""
        return np.arange(self.n_transitions) - np.repeat(self.episode_start, self.episode_length)


def split_episodes(
    n_episodes: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split episode indices into (train, validation), both sorted, by a seeded permutation.

    The validation set holds ``round(val_fraction * n_episodes)`` episodes, at least one when
    ``val_fraction > 0`` and there are two episodes or more, and never all of them. The same
    ``(n_episodes, val_fraction, seed)`` always gives the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * n_episodes))
    if val_fraction > 0 and n_episodes >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n_episodes - 1, 0))
    perm = np.random.default_rng([seed, 0x5EED5]).permutation(n_episodes)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


# --------------------------------------------------------------------------- shards


def shard_episodes(lengths: np.ndarray, shards: int) -> list[np.ndarray]:
    """Cut episodes (their ``lengths``, in order) into ``shards`` contiguous runs of about
    equal numbers of transitions, each of one episode at least: (positions into
    ``lengths``) per shard. A ValueError when there are fewer episodes than shards."""
    n_eps = len(lengths)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if n_eps < shards:
        raise ValueError(f"{n_eps} episode(s) cannot be cut into {shards} shards")
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # (E + 1,)
    total = int(bounds[-1])
    cuts = [0]
    for i in range(1, shards):
        target = total * i / shards
        c = int(np.searchsorted(bounds, target))  # first boundary at or past the target
        if c > 0 and target - bounds[c - 1] <= bounds[min(c, n_eps)] - target:
            c -= 1  # the boundary before is as close or closer
        cuts.append(min(max(c, cuts[-1] + 1), n_eps - (shards - i)))
    cuts.append(n_eps)
    return [np.arange(a, b, dtype=np.int64) for a, b in zip(cuts[:-1], cuts[1:])]


@dataclass(frozen=True)
class Shards:
    """The shards of a run's training transitions, and the ones this process's data holds.

    ``sizes[r]`` is shard ``r``'s number of transitions; the process's
    :class:`DeviceTransitions` holds shards ``first .. first + count - 1``, end to end.
    """

    sizes: tuple[int, ...]
    first: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"every shard needs a transition, got sizes {self.sizes}")
        if self.first < 0 or self.count < 1 or self.first + self.count > len(self.sizes):
            raise ValueError(
                f"shards {self.first}..{self.first + self.count - 1} of {len(self.sizes)}"
            )

    @classmethod
    def whole(cls, n_transitions: int) -> Shards:
        """One shard: the plain uniform draw over all ``n_transitions``."""
        return cls((n_transitions,))

    @property
    def total(self) -> int:
        """Transitions of every shard together (the whole training split)."""
        return sum(self.sizes)

    @property
    def local(self) -> range:
        return range(self.first, self.first + self.count)

    @property
    def local_transitions(self) -> int:
        return sum(self.sizes[r] for r in self.local)


def shard_seed(seed: int, step: int, stream: int, shard: int, shards: int) -> int:
    """The generator seed of ``shard`` (of ``shards``) at ``step``; with one shard, the
    plain sampler's ``step_seed(seed, step, stream)``."""
    base = step_seed(seed, step, stream)
    return base if shards == 1 else step_seed(base, shard, stream=shards)


# --------------------------------------------------------------------------- reward scaling


@dataclass(frozen=True)
class RewardScaling:
    """``r' = scale * r + shift``, applied to rewards and, consistently, to returns-to-go."""

    scale: float = 1.0
    shift: float = 0.0

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.shift == 0.0

    def rewards(self, r: np.ndarray) -> np.ndarray:
        return (r.astype(np.float64) * self.scale + self.shift).astype(np.float32)

    def returns(self, rtg: np.ndarray, remaining: np.ndarray, discount: float) -> np.ndarray:
        """Returns-to-go of the scaled rewards; ``remaining`` counts rows from t to the episode's end."""
        out = rtg.astype(np.float64) * self.scale
        if self.shift:
            if discount == 1.0:
                out += self.shift * remaining
            else:
                out += (
                    self.shift * (1.0 - discount ** remaining.astype(np.float64)) / (1.0 - discount)
                )
        return out.astype(np.float32)


def make_reward_scaling(
    arrays: TransitionArrays,
    episodes: np.ndarray | None = None,
    *,
    scale: float = 1.0,
    shift: float = 0.0,
    normalize: str = "none",
) -> RewardScaling:
    """The reward transform of a run.

    ``normalize="return_range"`` multiplies ``scale`` by ``max_len / (max_R - min_R)``, the
    episode returns and lengths taken over ``episodes`` (default: all): rewards then span
    the same range whatever the task's units (IQL's locomotion normalisation).
    """
    if normalize == "none":
        return RewardScaling(scale, shift)
    if normalize != "return_range":
        raise ValueError(f"normalize must be `none` or `return_range`, got {normalize!r}")
    eps = np.arange(arrays.n_episodes) if episodes is None else episodes
    returns = arrays.episode_returns()[eps]
    if len(returns) == 0:
        raise ValueError("return_range normalisation needs at least one episode")
    span = float(returns.max() - returns.min())
    if span <= 0:
        raise ValueError(
            "return_range normalisation: every episode has the same return; use reward.scale instead"
        )
    max_len = float(arrays.episode_length[eps].max())
    return RewardScaling(scale * max_len / span, shift)


# --------------------------------------------------------------------------- device matrix


class DeviceTransitions:
    """Transitions of some episodes packed into one contiguous float32 matrix on ``device``.

    ``columns[name]`` is the slice of the matrix's columns that holds ``name``; the episode
    structure (``episode_start``, ``episode_end`` per row) stays beside it for slice sampling.
    """

    def __init__(
        self,
        arrays: TransitionArrays,
        episodes: np.ndarray | None = None,
        *,
        device: str | torch.device = "cpu",
        rewards: RewardScaling | None = None,
        discount: float = 1.0,
    ) -> None:
        self.device = torch.device(device)
        self.discrete = arrays.discrete
        eps = np.arange(arrays.n_episodes) if episodes is None else np.asarray(episodes, np.int64)
        if len(eps) == 0:
            raise ValueError("no episodes to sample from")
        rows = None if episodes is None else arrays.rows_of(eps)
        lengths = arrays.episode_length[eps]
        n = int(lengths.sum())
        if n == 0:
            raise ValueError("the selected episodes hold no transitions")
        self.obs_dim = arrays.obs_dim
        self.act_dim = 1 if self.discrete else int(arrays.actions.shape[1])
        if self.discrete and arrays.n_transitions and int(arrays.actions.max()) >= 1 << 24:
            raise ValueError("discrete actions >= 2**24 cannot be packed exactly into float32")

        widths = [
            ("observations", self.obs_dim),
            ("actions", self.act_dim),
            ("rewards", 1),
            ("next_observations", self.obs_dim),
            ("terminated", 1),
            ("truncated", 1),
            ("return_to_go", 1),
            ("timestep", 1),
        ]
        self.columns: dict[str, slice] = {}
        at = 0
        for name, w in widths:
            self.columns[name] = slice(at, at + w)
            at += w
        self.width = at

        def take(a: Column) -> np.ndarray:
            return np.asarray(a) if rows is None else a[rows]

        # New episode boundaries in the packed order.
        starts = np.cumsum(lengths) - lengths
        row_start = np.repeat(starts, lengths)
        row_end = np.repeat(starts + lengths, lengths)
        timestep = np.arange(n) - row_start
        scaling = rewards or RewardScaling()

        host = np.empty((n, self.width), dtype=np.float32)
        c = self.columns
        host[:, c["observations"]] = take(arrays.observations)
        acts = take(arrays.actions)
        host[:, c["actions"]] = acts.reshape(n, -1)
        host[:, c["rewards"]] = scaling.rewards(take(arrays.rewards))[:, None]
        host[:, c["next_observations"]] = take(arrays.next_observations)
        host[:, c["terminated"]] = take(arrays.terminated)[:, None]
        host[:, c["truncated"]] = take(arrays.truncated)[:, None]
        rtg = take(arrays.return_to_go)
        if not scaling.identity:
            # return_to_go counts a dropped last step's reward: its shift counts too
            extra = np.repeat(arrays.rewards_after_last_row()[eps], lengths)
            rtg = scaling.returns(rtg, row_end - np.arange(n) + extra, discount)
        host[:, c["return_to_go"]] = rtg[:, None]
        host[:, c["timestep"]] = timestep[:, None]

        self.matrix = torch.from_numpy(host).to(self.device)  # (N, width) float32, contiguous
        self.episode_start = torch.from_numpy(starts.astype(np.int64)).to(self.device)  # (E,)
        self.episode_length = torch.from_numpy(lengths.astype(np.int64)).to(self.device)  # (E,)
        self.row_end = torch.from_numpy(row_end.astype(np.int64)).to(self.device)  # (N,) exclusive
        self.n_transitions = n
        self.n_episodes = len(eps)
        self.source_episodes = eps  # indices of the episodes in the source arrays

    def __len__(self) -> int:
        return self.n_transitions

    def batch_from_rows(self, rows: torch.Tensor) -> TransitionBatch:
        """The transitions at ``rows`` (a gathered ``(B, width)`` block) as a batch of views."""
        c = self.columns
        actions = rows[:, c["actions"]]
        return TransitionBatch(
            observations=rows[:, c["observations"]],  # (B, obs_dim)
            actions=actions[:, 0].long() if self.discrete else actions,  # (B,) | (B, act_dim)
            rewards=rows[:, c["rewards"].start],  # (B,)
            next_observations=rows[:, c["next_observations"]],  # (B, obs_dim)
            terminated=rows[:, c["terminated"].start],  # (B,)
            truncated=rows[:, c["truncated"].start],  # (B,)
            return_to_go=rows[:, c["return_to_go"].start],  # (B,)
        )

    def gather(self, index: torch.Tensor) -> TransitionBatch:
        """One ``index_select`` of the matrix; the batch's fields are views of its rows."""
        return self.batch_from_rows(self.matrix.index_select(0, index))

    def all_rows(self, start: int = 0, stop: int | None = None) -> TransitionBatch:
        """A contiguous range of rows as a batch (no copy): for validation passes."""
        return self.batch_from_rows(self.matrix[start:stop])


# --------------------------------------------------------------------------- samplers


class TransitionSampler:
    """Uniform batches of transitions; the batch at step ``k`` is a pure function of
    ``(seed, k)``, and of the number of shards when there are several (module docstring).

    ``batch_size`` is the batch of every shard together; this process draws
    ``batch_size / K`` rows from each shard its ``data`` holds (``shards``; default: one
    shard, all of ``data``). ``sample()`` returns the batch of the current step and
    advances the counter; the counter and the seed are the whole state (``state_dict``).
    """

    def __init__(
        self,
        data: DeviceTransitions,
        batch_size: int,
        seed: int,
        *,
        stream: int = 0,
        shards: Shards | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shards = shards or Shards.whole(data.n_transitions)
        k = len(shards.sizes)
        if batch_size % k:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {k} shards")
        if shards.local_transitions != data.n_transitions:
            raise ValueError(
                f"the data holds {data.n_transitions} transitions, its shards "
                f"{shards.local_transitions}"
            )
        self.data = data
        self.batch_size = batch_size
        self.shards = shards
        self.seed = seed
        self.stream = stream
        self.step = 0
        self._generator = torch.Generator(device=data.device)
        # where each local shard starts in data's rows
        offsets = np.cumsum([0, *(shards.sizes[r] for r in shards.local)])[:-1]
        self._local = [(r, shards.sizes[r], int(o)) for r, o in zip(shards.local, offsets)]

    @property
    def local_batch_size(self) -> int:
        """Rows this process draws per step: ``batch_size / K`` per shard it holds."""
        return self.batch_size // len(self.shards.sizes) * self.shards.count

    def indices(self, step: int) -> torch.Tensor:
        """(local B,) int64 rows of ``data`` drawn for ``step``, on the data's device."""
        k = len(self.shards.sizes)
        per = self.batch_size // k
        dev = self.data.device
        parts = []
        for shard, size, offset in self._local:
            self._generator.manual_seed(shard_seed(self.seed, step, self.stream, shard, k))
            rows = torch.randint(0, size, (per,), generator=self._generator, device=dev)
            parts.append(rows if offset == 0 else rows + offset)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batch_at(self, step: int) -> TransitionBatch:
        """The batch of ``step``, without moving the counter."""
        return self.data.gather(self.indices(step))

    def sample(self) -> TransitionBatch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The same on every rank of a run: the counter, the seed, the shards' sizes."""
        return {
            "kind": "transition",
            "seed": self.seed,
            "stream": self.stream,
            "step": self.step,
            "batch_size": self.batch_size,
            "n_transitions": self.shards.total,
            "shards": len(self.shards.sizes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_same(state, "transition", self.batch_size, self.shards.total)
        k = int(state.get("shards", 1))
        if k != len(self.shards.sizes):
            raise ValueError(
                f"sampler state was drawn from {k} shard(s), this sampler has "
                f"{len(self.shards.sizes)}: set shards={k} to resume it"
            )
        self.seed = int(state["seed"])
        self.stream = int(state["stream"])
        self.step = int(state["step"])


def _check_same(state: dict[str, Any], kind: str, batch_size: int, n: int) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"sampler state is for a {state.get('kind')} sampler, not {kind}")
    if int(state["n_transitions"]) != n:
        raise ValueError(
            f"sampler state was saved over {state['n_transitions']} transitions, this data has {n}: "
            "the store or the validation split changed"
        )
    if int(state["batch_size"]) != batch_size:
        raise ValueError(
            f"sampler state has batch_size {state['batch_size']}, this sampler {batch_size}"
        )


@dataclass(frozen=True)
class TrajectoryBatch:
    """Fixed-length windows of consecutive steps within episodes; padding has ``mask == 0``.

    Padded positions hold zeros in every field (and timestep 0).
    """

    observations: torch.Tensor  # (B, L, obs_dim) float32
    actions: torch.Tensor  # (B, L) int64 or (B, L, act_dim) float32
    rewards: torch.Tensor  # (B, L) float32
    next_observations: torch.Tensor  # (B, L, obs_dim) float32
    terminated: torch.Tensor  # (B, L) float32
    truncated: torch.Tensor  # (B, L) float32
    return_to_go: torch.Tensor  # (B, L) float32
    timesteps: torch.Tensor  # (B, L) int64, step within the episode
    mask: torch.Tensor  # (B, L) float32, 1 for a real step, 0 for padding


class TrajectorySliceSampler:
    """Windows of ``length`` consecutive steps that never cross an episode boundary.

    A window starts at a uniformly drawn transition and runs to ``length`` steps or the
    episode's end, whichever comes first; short windows are padded on the left (``pad="left"``:
    the last real step is always at position ``L - 1``, as sequence policies read it) or on
    the right. Like :class:`TransitionSampler`, the batch at step ``k`` depends only on
    ``(seed, k)``; the draw is one ``randint``, the rows are one gather of ``B * L`` rows.
    """

    def __init__(
        self,
        data: DeviceTransitions,
        batch_size: int,
        length: int,
        seed: int,
        *,
        pad: str = "left",
        stream: int = 1,
    ) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if pad not in ("left", "right"):
            raise ValueError(f"pad must be `left` or `right`, got {pad!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.length = length
        self.pad = pad
        self.seed = seed
        self.stream = stream
        self.step = 0
        self._generator = torch.Generator(device=data.device)
        self._positions = torch.arange(length, device=data.device)  # (L,)

    def batch_at(self, step: int) -> TrajectoryBatch:
        d = self.data
        self._generator.manual_seed(step_seed(self.seed, step, self.stream))
        start = torch.randint(
            0, d.n_transitions, (self.batch_size,), generator=self._generator, device=d.device
        )  # (B,)
        valid = torch.clamp(d.row_end.index_select(0, start) - start, max=self.length)  # (B,)
        pos = self._positions.unsqueeze(0)  # (1, L)
        if self.pad == "left":
            offset = pos - (self.length - valid).unsqueeze(1)  # (B, L), < 0 on padding
            mask = offset >= 0
        else:
            offset = pos.expand(self.batch_size, -1)
            mask = offset < valid.unsqueeze(1)
        rows = start.unsqueeze(1) + torch.where(mask, offset, torch.zeros_like(offset))  # (B, L)
        block = d.matrix.index_select(0, rows.reshape(-1)).view(self.batch_size, self.length, -1)
        maskf = mask.to(block.dtype)
        block = block * maskf.unsqueeze(-1)  # zero the padding
        c = d.columns
        actions = block[..., c["actions"]]
        return TrajectoryBatch(
            observations=block[..., c["observations"]],
            actions=actions[..., 0].long() if d.discrete else actions,
            rewards=block[..., c["rewards"].start],
            next_observations=block[..., c["next_observations"]],
            terminated=block[..., c["terminated"].start],
            truncated=block[..., c["truncated"].start],
            return_to_go=block[..., c["return_to_go"].start],
            timesteps=block[..., c["timestep"].start].long(),
            mask=maskf,
        )

    def sample(self) -> TrajectoryBatch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "trajectory",
            "seed": self.seed,
            "stream": self.stream,
            "step": self.step,
            "batch_size": self.batch_size,
            "length": self.length,
            "n_transitions": self.data.n_transitions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_same(state, "trajectory", self.batch_size, self.data.n_transitions)
        if int(state["length"]) != self.length:
            raise ValueError(
                f"sampler state has length {state['length']}, this sampler {self.length}"
            )
        self.seed = int(state["seed"])
        self.stream = int(state["stream"])
        self.step = int(state["step"])


def validation_batches(
    data: DeviceTransitions, limit: int | None, batch_size: int
) -> Sequence[TransitionBatch]:
    """A fixed set of validation batches over ``limit`` rows (``None``: every row).

    The rows are a deterministic sample over every validation episode (not just the first
    ones), so offline metrics are comparable between evaluations and between runs.
    """
    n = data.n_transitions
    take = n if limit is None or limit >= n else max(limit, 0)
    if take == n:
        order = torch.arange(n, device=data.device)
    else:
        g = torch.Generator().manual_seed(0xE7A1)
        order = torch.randperm(n, generator=g)[:take].sort().values.to(data.device)
    return [data.gather(order[i : i + batch_size]) for i in range(0, take, max(batch_size, 1))]
