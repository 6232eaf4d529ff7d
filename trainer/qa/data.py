"""QA batches from a segment store: one gather per batch, padding and masks made explicit.

A training example is one question with every segment of its document. A batch of ``B``
examples is a ``(B, T, W)`` block of input ids, ``T`` the most segments of any example in
the batch and ``W`` the longest row among its segments::

    input_ids[b, t]  = [CLS] question [SEP] segment_t [SEP] [PAD] ...   (t < n_segments[b])
    input_ids[b, t]  = [PAD] ...                                         (t >= n_segments[b])

Every padded place is marked, so nothing downstream has to guess: ``token_mask`` (real
tokens), ``segment_mask`` (real segments), ``span_mask`` (positions a span may start or end
at: the segment's document tokens, plus position 0, [CLS], which stands for "no answer
in this segment"). Span targets are local positions in ``input_ids``; a segment without
the answer targets 0. Padded segments hold ``IGNORE`` targets.

:class:`QAArrays` keeps the store's segment table as contiguous host arrays (the padded
``(R, width)`` id matrix and the per-row columns), and :func:`collate` builds a batch with
one fancy-index gather per field, no per-example Python loop. :class:`CurriculumSampler`
draws the examples of step ``k`` as a pure function of ``(seed, stream, k)`` among the
examples that the curriculum admits at that step, so a resumed run sees the same batches.

Shards (data-parallel runs, trainer.distributed): the training questions, sorted by their
number of segments, are dealt round-robin into ``K`` shards (every shard spans the lengths
the curriculum admits over time); a step draws ``batch_size / K`` questions from each
shard, shard ``r``'s with its own generator seeded from ``(seed, step, r, K)``. A rank of
an ``N``-rank run draws its own ``K / N`` shards, and one process with ``K`` shards draws
exactly the union of the ranks' draws. ``K = 1`` is the plain draw above.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.samplers import shard_seed

if TYPE_CHECKING:
    from pipeline.segments.store import SegmentStore

IGNORE = -100  # target of a padded segment (never read by a loss)
NO_ANSWER_POSITION = 0  # [CLS]: the span target of a segment without the answer


@dataclass(frozen=True)
class QAArrays:
    """The columns of a segment store that training and evaluation read, as host arrays."""

    input_ids: np.ndarray  # (R, width) int32, each row padded with pad_id
    lengths: np.ndarray  # (R,) int32 real tokens of each row
    context_start: np.ndarray  # (R,) int32 position of the segment's first document token
    n_segment_tokens: np.ndarray  # (R,) int32
    token_offset: np.ndarray  # (R,) int32 the segment's first document token
    local_start: np.ndarray  # (R,) int32 answer start in input_ids, or -1
    local_end: np.ndarray  # (R,) int32 answer end (inclusive) in input_ids, or -1
    segment_row: np.ndarray  # (E,) int64 first row of each example
    n_segments: np.ndarray  # (E,) int32
    global_start: np.ndarray  # (E,) int32 gold answer span in document tokens, or -1
    global_end: np.ndarray  # (E,) int32
    is_impossible: np.ndarray  # (E,) bool
    pad_id: int

    @classmethod
    def from_store(cls, store: SegmentStore) -> QAArrays:
        seg, ex = store.segments, store.examples
        return cls(
            input_ids=np.ascontiguousarray(seg.input_ids),
            lengths=seg.lengths,
            context_start=seg.context_start,
            n_segment_tokens=seg.n_segment_tokens,
            token_offset=seg.token_offset,
            local_start=seg.local_start,
            local_end=seg.local_end,
            segment_row=ex.segment_row.astype(np.int64),
            n_segments=ex.n_segments,
            global_start=ex.global_start,
            global_end=ex.global_end,
            is_impossible=ex.is_impossible,
            pad_id=store.pad_id,
        )

    @property
    def n_examples(self) -> int:
        return len(self.n_segments)


@dataclass(frozen=True)
class QABatch:
    """A batch of examples, each with all of its segments (see the module docstring)."""

    example_index: torch.Tensor  # (B,) int64 rows of the store's examples table
    input_ids: torch.Tensor  # (B, T, W) int64, pad_id where token_mask is false
    token_mask: torch.Tensor  # (B, T, W) bool, real tokens
    span_mask: torch.Tensor  # (B, T, W) bool, [CLS] and the segment's document tokens
    context_mask: torch.Tensor  # (B, T, W) bool, the segment's document tokens only
    segment_mask: torch.Tensor  # (B, T) bool, real segments
    start_target: torch.Tensor  # (B, T) int64, 0 = no answer here, IGNORE on padded segments
    end_target: torch.Tensor  # (B, T) int64
    context_start: torch.Tensor  # (B, T) int64
    token_offset: torch.Tensor  # (B, T) int64, global position of the segment's first token
    n_segments: torch.Tensor  # (B,) int64
    gold_start: torch.Tensor  # (B,) int64 answer span in document tokens, -1: unanswerable
    gold_end: torch.Tensor  # (B,) int64

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_real_segments(self) -> int:
        return int(self.segment_mask.sum())

    def to(self, device: torch.device | str) -> QABatch:
        """The same batch on ``device``."""
        return QABatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def collate(arrays: QAArrays, examples: np.ndarray | list[int]) -> QABatch:
    """The batch of ``examples`` (rows of the examples table): one gather per field.

    The batch holds the examples longest first (``example_index`` says which is where), so
    the examples that still have a segment ``t`` are always the first ones.
    """
    ex = np.asarray(examples, dtype=np.int64)
    if ex.ndim != 1 or len(ex) == 0:
        raise ValueError("collate: examples must be a non-empty 1-d list of example rows")
    ex = ex[np.argsort(-arrays.n_segments[ex], kind="stable")]  # longest first (the reader's order)
    n_seg = arrays.n_segments[ex].astype(np.int64)  # (B,)
    t_max = int(n_seg.max())
    t = np.arange(t_max)
    seg_mask = t[None, :] < n_seg[:, None]  # (B, T)
    rows = np.where(seg_mask, arrays.segment_row[ex][:, None] + t[None, :], 0)  # (B, T)
    lengths = np.where(seg_mask, arrays.lengths[rows], 0)  # (B, T)
    width = int(lengths.max())
    ids = arrays.input_ids[rows, :width].astype(np.int64)  # (B, T, W)
    pos = np.arange(width)[None, None, :]
    token_mask = pos < lengths[:, :, None]
    ids[~token_mask] = arrays.pad_id
    cstart = np.where(seg_mask, arrays.context_start[rows], 0).astype(np.int64)
    ctoks = np.where(seg_mask, arrays.n_segment_tokens[rows], 0).astype(np.int64)
    context_mask = (pos >= cstart[:, :, None]) & (pos < (cstart + ctoks)[:, :, None])
    span_mask = context_mask.copy()
    span_mask[:, :, NO_ANSWER_POSITION] = seg_mask
    ls, le = arrays.local_start[rows], arrays.local_end[rows]
    has = seg_mask & (ls >= 0)
    start_t = np.where(has, ls, NO_ANSWER_POSITION).astype(np.int64)
    end_t = np.where(has, le, NO_ANSWER_POSITION).astype(np.int64)
    start_t[~seg_mask] = IGNORE
    end_t[~seg_mask] = IGNORE
    offset = np.where(seg_mask, arrays.token_offset[rows], 0).astype(np.int64)
    return QABatch(
        example_index=torch.from_numpy(ex),
        input_ids=torch.from_numpy(ids),
        token_mask=torch.from_numpy(token_mask),
        span_mask=torch.from_numpy(span_mask),
        context_mask=torch.from_numpy(context_mask),
        segment_mask=torch.from_numpy(seg_mask),
        start_target=torch.from_numpy(start_t),
        end_target=torch.from_numpy(end_t),
        context_start=torch.from_numpy(cstart),
        token_offset=torch.from_numpy(offset),
        n_segments=torch.from_numpy(n_seg),
        gold_start=torch.from_numpy(arrays.global_start[ex].astype(np.int64)),
        gold_end=torch.from_numpy(arrays.global_end[ex].astype(np.int64)),
    )


# --------------------------------------------------------------------------- curriculum


def curriculum_limit(
    step: int, total_steps: int, start_segments: int | None, full_at: float, longest: int
) -> int:
    """The most segments an admitted document may have at stage step ``step``.

    Grows linearly from ``start_segments`` at step 0 to ``longest`` at
    ``full_at * total_steps``; ``start_segments`` None means no curriculum (all admitted).
    """
    if start_segments is None or start_segments >= longest:
        return longest
    ramp = full_at * total_steps
    if ramp <= 0 or step >= ramp:
        return longest
    return int(start_segments + (longest - start_segments) * step / ramp)


class CurriculumSampler:
    """Examples for each step, uniformly among those the curriculum admits at that step.

    The batch at step ``k`` is a pure function of ``(seed, stream, k)`` (and of ``shards``
    when there are several, see the module docstring): the sampler's only state is the step
    counter (:meth:`state_dict`), so a resumed run draws the same batches. ``batch_size`` is
    the batch of every shard together; this process draws ``batch_size / shards`` examples
    from each shard in ``local`` (default: all of them).
    """

    def __init__(
        self,
        n_segments: np.ndarray,
        pool: np.ndarray,
        batch_size: int,
        seed: int,
        *,
        stream: int,
        total_steps: int,
        start_segments: int | None = None,
        full_at: float = 0.5,
        shards: int = 1,
        local: range | None = None,
    ) -> None:
        if len(pool) == 0:
            raise ValueError("the training split has no examples")
        if shards < 1 or batch_size % shards:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {shards} shards")
        if len(pool) < shards:
            raise ValueError(f"{len(pool)} training question(s) cannot fill {shards} shards")
        local = range(shards) if local is None else local
        if len(local) == 0 or local.start < 0 or local.stop > shards:
            raise ValueError(f"shards {local} of {shards}")
        order = np.argsort(n_segments[pool], kind="stable")
        self.pool = np.asarray(pool, dtype=np.int64)[order]  # sorted by length
        self.lengths = n_segments[self.pool].astype(np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.total_steps = total_steps
        self.start_segments = start_segments
        self.full_at = full_at
        self.shards = shards
        self.local = local
        self.step = 0

    def limit(self, step: int) -> int:
        """Most segments admitted at ``step`` (never fewer than the shortest document's)."""
        longest = int(self.lengths[-1])
        lim = curriculum_limit(step, self.total_steps, self.start_segments, self.full_at, longest)
        return max(lim, int(self.lengths[0]))

    def shard_indices(self, step: int) -> list[np.ndarray]:
        """(batch_size / shards,) example rows of each local shard for ``step``, in shard
        order: one draw each, with replacement."""
        k, per, lim = self.shards, self.batch_size // self.shards, self.limit(step)
        out = []
        for r in self.local:
            pool, lengths = self.pool[r::k], self.lengths[r::k]
            # a shard's shortest document is admitted even when the others' shortest is shorter
            admitted = int(np.searchsorted(lengths, max(lim, int(lengths[0])), side="right"))
            rng = np.random.default_rng(shard_seed(self.seed, step, 0x5A0 + self.stream, r, k))
            out.append(pool[rng.integers(0, admitted, size=per)])
        return out

    def indices(self, step: int) -> np.ndarray:
        """(local batch,) example rows for ``step``: the local shards' draws end to end."""
        parts = self.shard_indices(step)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def sample_shards(self) -> list[np.ndarray]:
        """The local shards' examples of the current step; the counter moves on."""
        out = self.shard_indices(self.step)
        self.step += 1
        return out

    def sample(self) -> np.ndarray:
        out = self.indices(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def drop_tokens(batch: QABatch, p: float, unk_id: int, generator: torch.Generator) -> QABatch:
    """Token dropout: each document token of ``batch`` becomes ``unk_id`` with probability
    ``p``, except the gold answer's tokens (its span stays readable; the question, [CLS],
    [SEP] and padding are never touched). A regulariser of the supervised span loss: a
    reader cannot lean on memorised surface forms of a whole document."""
    if p <= 0:
        return batch
    u = torch.rand(batch.input_ids.shape, generator=generator, device=generator.device)
    pos = torch.arange(batch.input_ids.shape[-1], device=batch.input_ids.device)
    st, en = batch.start_target[..., None], batch.end_target[..., None]
    answer = (st > NO_ANSWER_POSITION) & (pos >= st) & (pos <= en)
    drop = batch.context_mask & ~answer & (u.to(batch.input_ids.device) < p)
    ids = torch.where(drop, torch.full_like(batch.input_ids, unk_id), batch.input_ids)
    return dataclasses.replace(batch, input_ids=ids)
