"""SFT batches from a sequence store: length-bucketed, padded or packed, drawn per step.

A sequence store holds one token sequence per episode (``input_ids``) and one label code per
token (``labels``: 0 context, then one code per span name, then ``other``). A batch is a
``(B, L)`` block::

    input_ids[b]      = episode tokens ..., then pad_id            (padded rows)
    labels[b]         = their label codes ..., then 0              (pad is never trained)
    attention_mask[b] = 1 on real tokens, 0 on padding
    position_ids[b]   = 0, 1, 2, ... within each episode

With ``pack=True`` a row holds several whole episodes one after the other (first-fit, in
the order drawn, up to ``max_len`` tokens); ``position_ids`` restart at 0 at each episode
and ``segment_ids`` say which episode of the row a token belongs to, so the model attends
within an episode only (:func:`packed_attention_mask`).

:class:`BucketSampler` draws the episodes of step ``k`` as a pure function of
``(seed, stream, k)``: a pool of ``buckets * batch_size`` distinct episodes uniformly among
those the curriculum admits at that step, sorted by length, and one of its ``buckets``
consecutive slices picked at random. Every admitted episode has the same chance to be in a
step's batch, and a batch holds episodes of similar lengths, so little of it is padding.
Its only state is the step counter, so a resumed run draws the same batches.

Data-parallel (``shards``, :class:`ShardedBucketSampler`): the training episodes are cut
into ``shards`` contiguous runs of about equal tokens, each drawn by its own
:class:`BucketSampler` of ``batch_size / shards`` episodes (its seed a function of the
shard too) under the run's common curriculum; a rank draws the shards it holds, and one
process holding every shard draws exactly the union of the ranks' batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.samplers import shard_episodes, step_seed

if TYPE_CHECKING:
    from pipeline.sequences.store import SequenceStore

PAD_LABEL = 0  # padding is context: never a loss target


@dataclass(frozen=True)
class SequenceArrays:
    """The token columns of a sequence store as flat host arrays (views of the store)."""

    input_ids: np.ndarray  # (T,) int32, episodes one after the other
    labels: np.ndarray  # (T,) int8 label codes
    offsets: np.ndarray  # (N + 1,) int64: episode i is [offsets[i], offsets[i + 1])
    teacher_ids: np.ndarray | None = None  # (T, k) int32 teacher's top-k ids (-1: none)
    teacher_logprobs: np.ndarray | None = None  # (T, k) float32 their log-probabilities

    @classmethod
    def from_store(cls, store: SequenceStore) -> SequenceArrays:
        teacher = store.teacher_topk
        return cls(
            input_ids=store.input_ids,
            labels=store.labels,
            offsets=np.asarray(store.offsets, dtype=np.int64),
            teacher_ids=None if teacher is None else teacher[0],
            teacher_logprobs=None if teacher is None else teacher[1],
        )

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # (N,)

    @property
    def n_episodes(self) -> int:
        return len(self.offsets) - 1


@dataclass(frozen=True)
class TokenBatch:
    """One SFT batch; every tensor is ``(B, L)`` unless said otherwise."""

    input_ids: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L) int64 label codes, 0 on context and padding
    attention_mask: torch.Tensor  # (B, L) int64: 1 real token, 0 padding
    position_ids: torch.Tensor  # (B, L) int64, restarting at 0 at each episode
    segment_ids: torch.Tensor  # (B, L) int64: the row's episode of each token (1, 2, ...), 0 pad
    n_tokens: int  # real (non-pad) tokens in the batch
    n_trained: int  # tokens with a label > 0 (the loss targets)
    teacher_ids: torch.Tensor | None = None  # (B, L, k) int64, -1 where none
    teacher_logprobs: torch.Tensor | None = None  # (B, L, k) float32
    max_segments: int = 1  # the most episodes in one row (> 1: packed, known on the host)

    @property
    def packed(self) -> bool:
        return self.max_segments > 1

    def to(self, device: torch.device | str) -> TokenBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return TokenBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            segment_ids=self.segment_ids.to(device, non_blocking=True),
            n_tokens=self.n_tokens,
            n_trained=self.n_trained,
            teacher_ids=move(self.teacher_ids),
            teacher_logprobs=move(self.teacher_logprobs),
            max_segments=self.max_segments,
        )


def pack_rows(lengths: np.ndarray, max_len: int) -> list[list[int]]:
    """First-fit packing of episodes (in the given order) into rows of at most ``max_len``
    tokens; returns, per row, the positions in ``lengths`` it holds, in order. An episode
    longer than ``max_len`` gets a row of its own (never cut)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths.tolist()):
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return rows


def collate(
    arrays: SequenceArrays,
    episodes: np.ndarray,
    pad_id: int,
    *,
    pack: bool = False,
    max_len: int | None = None,
    multiple_of: int = 8,
) -> TokenBatch:
    """The batch of ``episodes`` (store rows): one gather per field.

    Unpacked: one row per episode, right-padded to the longest (rounded up to
    ``multiple_of``). Packed: episodes first-fit into rows of ``max_len`` tokens (default:
    the longest episode of the batch).
    """
    episodes = np.asarray(episodes, dtype=np.int64)
    starts = arrays.offsets[episodes]
    lens = arrays.offsets[episodes + 1] - starts
    if pack:
        cap = int(max_len or lens.max(initial=1))
        rows = pack_rows(lens, cap)
    else:
        rows = [[i] for i in range(len(episodes))]
    row_len = np.array([int(lens[r].sum()) for r in rows], dtype=np.int64)
    width = int(row_len.max(initial=1))
    width = -(-width // multiple_of) * multiple_of
    n_rows = len(rows)
    # every real token's (row, column) and its flat index in the store
    member = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])  # episode order
    row_of = np.repeat(np.arange(n_rows), [len(r) for r in rows])
    ep_len = lens[member]
    first = np.cumsum([0] + [len(r) for r in rows])[:-1]
    csum = np.cumsum(ep_len) - ep_len
    ep_col0 = csum - np.repeat(csum[first], [len(r) for r in rows])
    seg_no = np.arange(len(member)) - np.repeat(first, [len(r) for r in rows]) + 1
    total = int(ep_len.sum())
    tok_ep = np.repeat(np.arange(len(member)), ep_len)
    within = np.arange(total, dtype=np.int64) - np.repeat(csum, ep_len)
    src = starts[member][tok_ep] + within
    r_idx = row_of[tok_ep]
    c_idx = ep_col0[tok_ep] + within

    ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    labels = np.zeros((n_rows, width), dtype=np.int64)
    mask = np.zeros((n_rows, width), dtype=np.int64)
    pos = np.zeros((n_rows, width), dtype=np.int64)
    seg = np.zeros((n_rows, width), dtype=np.int64)
    ids[r_idx, c_idx] = arrays.input_ids[src]
    labels[r_idx, c_idx] = arrays.labels[src]
    mask[r_idx, c_idx] = 1
    pos[r_idx, c_idx] = within
    seg[r_idx, c_idx] = seg_no[tok_ep]
    t_ids = t_lp = None
    if arrays.teacher_ids is not None and arrays.teacher_logprobs is not None:
        k = arrays.teacher_ids.shape[1]
        t_ids_np = np.full((n_rows, width, k), -1, dtype=np.int64)
        t_lp_np = np.zeros((n_rows, width, k), dtype=np.float32)
        t_ids_np[r_idx, c_idx] = arrays.teacher_ids[src]
        t_lp_np[r_idx, c_idx] = arrays.teacher_logprobs[src]
        t_ids, t_lp = torch.from_numpy(t_ids_np), torch.from_numpy(t_lp_np)
    return TokenBatch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(pos),
        segment_ids=torch.from_numpy(seg),
        n_tokens=total,
        n_trained=int((labels > 0).sum()),
        teacher_ids=t_ids,
        teacher_logprobs=t_lp,
        max_segments=max((len(r) for r in rows), default=1),
    )


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean mask (True: may attend): a token attends to the earlier tokens of
    its own episode. Padding (segment 0) attends to itself only, so no row is empty."""
    seg = segment_ids
    L = seg.shape[1]
    same = seg[:, :, None] == seg[:, None, :]
    allowed = same & torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
    allowed |= torch.eye(L, dtype=torch.bool, device=seg.device)
    return allowed[:, None]


# --------------------------------------------------------------------------- sampling


def curriculum_limit(
    step: int, total_steps: int, start_tokens: int | None, full_at: float, longest: int
) -> int:
    """The longest episode (in tokens) admitted at stage step ``step``: a linear ramp from
    ``start_tokens`` at step 0 to every episode at ``full_at * total_steps`` (None: no
    curriculum)."""
    if start_tokens is None or start_tokens >= longest:
        return longest
    ramp = full_at * total_steps
    if ramp <= 0 or step >= ramp:
        return longest
    return int(start_tokens + (longest - start_tokens) * step / ramp)


class BucketSampler:
    """Episodes of each step: similar lengths together, short ones first under a curriculum.

    The batch of step ``k`` is a pure function of ``(seed, stream, k)`` (see the module
    docstring); :meth:`state_dict` is the step counter.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        pool: np.ndarray,
        batch_size: int,
        seed: int,
        *,
        stream: int = 0,
        buckets: int = 8,
        total_steps: int = 1,
        start_tokens: int | None = None,
        full_at: float = 0.5,
        shard: tuple[int, int] = (0, 1),
        longest: int | None = None,
    ) -> None:
        """``shard``: (this shard, of how many); its draws are seeded apart (one shard: the
        plain draw). ``longest``: the longest training episode of the run, from which the
        curriculum ramps (default: this pool's)."""
        if len(pool) == 0:
            raise ValueError("the training split has no episodes")
        order = np.argsort(lengths[pool], kind="stable")
        self.pool = np.asarray(pool, dtype=np.int64)[order]  # by length
        self.lengths = np.asarray(lengths, dtype=np.int64)[self.pool]
        self.batch_size = batch_size
        self.buckets = max(1, buckets)
        self.seed = seed
        self.stream = stream
        self.total_steps = total_steps
        self.start_tokens = start_tokens
        self.full_at = full_at
        self.shard = shard
        self.longest = int(self.lengths[-1]) if longest is None else int(longest)
        self.step = 0

    def limit(self, step: int) -> int:
        """Longest episode admitted at ``step`` (never fewer than the shortest's length)."""
        longest = self.longest
        lim = curriculum_limit(step, self.total_steps, self.start_tokens, self.full_at, longest)
        return max(lim, int(self.lengths[0]))

    def indices(self, step: int) -> np.ndarray:
        """(batch_size,) store rows for ``step``, sorted by length."""
        admitted = int(np.searchsorted(self.lengths, self.limit(step), side="right"))
        seed = step_seed(self.seed, step, stream=0x5F7 + self.stream)
        shard, shards = self.shard
        if shards > 1:
            seed = step_seed(seed, shard, stream=shards)
        rng = np.random.default_rng(seed)
        want = self.batch_size * self.buckets
        if admitted >= want:
            pick = np.sort(rng.choice(admitted, size=want, replace=False))
        else:  # fewer admitted than a pool: draw with replacement
            pick = np.sort(rng.integers(0, admitted, size=want))
        b = int(rng.integers(0, self.buckets))
        return self.pool[pick[b * self.batch_size : (b + 1) * self.batch_size]]

    def sample(self) -> np.ndarray:
        out = self.indices(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


class ShardedBucketSampler:
    """The episodes of each step drawn from ``shards`` shards of the training episodes,
    ``batch_size / shards`` from each; this process draws the shards of ``local``.

    :meth:`sample` returns this process's episodes (its shards' draws, in shard order) and
    keeps every shard's in :attr:`last_all`, so each rank knows the step's global batch
    (for its token counts) without a collective. Its state is the step counter.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        pool: np.ndarray,
        batch_size: int,
        seed: int,
        *,
        shards: int,
        local: range,
        stream: int = 0,
        buckets: int = 8,
        total_steps: int = 1,
        start_tokens: int | None = None,
        full_at: float = 0.5,
    ) -> None:
        if batch_size % shards:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {shards} shards")
        pool = np.asarray(pool, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        parts = shard_episodes(lengths[pool], shards)  # ValueError: fewer episodes than shards
        longest = int(lengths[pool].max())
        self.shortest = int(lengths[pool].min())
        self.samplers = [
            BucketSampler(
                lengths, pool[part], batch_size // shards, seed, stream=stream,
                buckets=buckets, total_steps=total_steps, start_tokens=start_tokens,
                full_at=full_at, shard=(i, shards), longest=longest,
            )
            for i, part in enumerate(parts)
        ]  # fmt: skip
        self.sizes = tuple(int(lengths[pool[part]].sum()) for part in parts)  # tokens per shard
        self.local = local
        self.batch_size = batch_size
        self.step = 0
        self.last_all = np.zeros(0, dtype=np.int64)

    def limit(self, step: int) -> int:
        """The curriculum's longest admitted episode at ``step`` (the same in every shard,
        which admits its shortest at least)."""
        s = self.samplers[0]
        lim = curriculum_limit(step, s.total_steps, s.start_tokens, s.full_at, s.longest)
        return max(lim, self.shortest)

    def indices(self, step: int) -> list[np.ndarray]:
        """Every shard's episodes of ``step``."""
        return [s.indices(step) for s in self.samplers]

    def sample(self) -> np.ndarray:
        per_shard = self.indices(self.step)
        self.step += 1
        self.last_all = np.concatenate(per_shard)
        return np.concatenate([per_shard[i] for i in self.local])

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def split_episodes(episode_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the held-out (evaluation) episodes: a hash of (seed, id) below
    ``fraction``, so an episode's side never depends on the store's order or size."""
    import hashlib

    out = np.zeros(len(episode_ids), dtype=bool)
    if fraction <= 0:
        return out
    for i, eid in enumerate(episode_ids):
        h = hashlib.blake2b(f"{seed}:{eid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2**64 < fraction
    return out
