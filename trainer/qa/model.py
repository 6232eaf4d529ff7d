"""The reader: a segment encoder with a memory carried across segments, a span head, and a
halting policy with its value head.

Reading a document is a loop over its segments ``t = 0, 1, ...``::

    memory_{-1} = 0
    h_t      = Encoder([MEM(memory_{t-1}), CLS, question, SEP, segment_t, SEP])   # (W+1, d)
               # token + position + type (question / segment) + exact match with the question
    start_t, end_t = SpanHead(h_t[1:])                        # answer logits over positions
    margin_t = best span score - no-answer score ([CLS])      # how sure an answer is here
    x_t      = features(margin_t, max_{k<=t} margin_k, t, n)  # detached, see FEATURES
    memory_t = GRUCell([h_t[MEM], x_t], memory_{t-1})          # carried to segment t+1
    halt_t   = HaltHead(x_t)                # logit of HALT after segment t ([memory_t, x_t]
                                            # with halt_reads_memory)
    value_t  = ValueHead([memory_t, x_t])

The memory enters the next segment's encoding as an extra token in front of [CLS], so the
encoder, the span head and the memory cell are trained together by the span loss through
the segments (back-propagation through the whole document). The halting and value heads
read the features and the memory *detached*: the policy's gradient never reaches the
reader, which keeps the two optimizers (QA part, policy part) on disjoint parameters.

Because what the reader computes for segment ``t`` does not depend on whether it halts,
one pass over all segments (:meth:`MemoryReader.read`) gives every quantity that any halting
decision sequence needs; an episode that halts after segment ``h`` is the prefix ``0..h``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ConfigError, need_int
from trainer.qa.data import NO_ANSWER_POSITION, QABatch

# The policy's hand-made inputs beside the memory (all detached, all in [-1, 1] or [0, 1]):
FEATURES = (
    "margin",  # tanh(margin_t / 4): this segment's answer score minus its no-answer score
    "best_margin",  # tanh(max_{k<=t} margin_k / 4): the best answer read so far
    "has_answer",  # 1 if the best answer so far beats the no-answer threshold
    "read_fraction",  # (t + 1) / n: how much of the document has been read
    "log_length",  # log(n) / 4: how long the document is
)
N_FEATURES = len(FEATURES)
_MARGIN_SCALE = 4.0


@dataclass
class ReaderConfig:
    """Sizes of the reader (the ``qa.model`` section of a training config)."""

    # Token vocabulary: the store's tokenizer size (filled in from the store).
    vocab_size: int = 0
    # Longest input row the model accepts (filled in from the store: max_question_tokens +
    # max_tokens + 3).
    max_positions: int = 0
    # Width of the token states.
    d_model: int = 64
    # Transformer layers of the segment encoder.
    n_layers: int = 2
    # Attention heads per layer (must divide d_model).
    n_heads: int = 4
    # Hidden width of each layer's feed-forward block.
    ffn_dim: int = 128
    # Dropout in the encoder (0 to turn off).
    dropout: float = 0.1
    # Size of the memory carried from segment to segment.
    memory_dim: int = 64
    # Hidden width of the halting and value heads.
    head_hidden: int = 64
    # Longest answer span considered when predicting, in document tokens.
    max_answer_tokens: int = 16
    # The halting head reads the memory beside the hand-made features. Off by default: with
    # the memory's many inputs, REINFORCE found a direction that moved every state's HALT
    # logit at once, and the early, costly halts before the answer drove P(HALT) to 0
    # everywhere (on 2 seeds of 3 on the demo data) before the head could learn that halting
    # pays once the answer is found. The value head always reads both.
    halt_reads_memory: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "ffn_dim", "memory_dim", "head_hidden"):
            need_int(name, getattr(self, name), 1)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"n_heads: {self.n_heads} does not divide d_model {self.d_model}; "
                "pick n_heads among the divisors of d_model"
            )
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.halt_reads_memory, bool):
            raise ConfigError(
                f"halt_reads_memory: must be true or false, got {self.halt_reads_memory!r}"
            )
        need_int("max_answer_tokens", self.max_answer_tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReadOutput:
    """Everything one pass of the reader over a batch computes (padded segments: zeros)."""

    start_logits: torch.Tensor  # (B, T, W) raw span-start logits (mask with span_mask)
    end_logits: torch.Tensor  # (B, T, W)
    margin: torch.Tensor  # (B, T) best span score - no-answer score, -inf on padded segments
    span_start: torch.Tensor  # (B, T) int64 best span in this segment, local positions
    span_end: torch.Tensor  # (B, T) int64
    memory: torch.Tensor  # (B, T, memory_dim) memory after reading segment t
    features: torch.Tensor  # (B, T, N_FEATURES) detached policy features
    halt_logit: torch.Tensor  # (B, T) logit of HALT after segment t
    value: torch.Tensor  # (B, T) predicted return from the decision after segment t


def best_spans(
    start: torch.Tensor, end: torch.Tensor, context_mask: torch.Tensor, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best span of each row and its margin over the no-answer position.

    start, end: (N, W) logits; context_mask: (N, W) positions a span may use. A span is
    ``i <= j < i + max_tokens`` inside the context; its score is ``start_i + end_j``.
    Returns ``(margin, i, j)``, each (N,): margin = best score - (start_0 + end_0).
    """
    n, w = start.shape
    ln = min(max_tokens, w)
    # end_band[i, l] = end[i + l]: the ends a span starting at i may take (N, W, L)
    end_band = F.pad(end, (0, ln - 1)).unfold(1, ln, 1)
    ok_band = F.pad(context_mask, (0, ln - 1)).unfold(1, ln, 1)
    valid = context_mask[:, :, None] & ok_band
    scores = (start[:, :, None] + end_band).masked_fill(~valid, float("-inf"))
    best, flat = scores.flatten(1).max(dim=1)
    null = start[:, NO_ANSWER_POSITION] + end[:, NO_ANSWER_POSITION]
    i = flat // ln
    return best - null, i, i + flat % ln


def policy_features(
    margin: torch.Tensor, best_margin: torch.Tensor, t: int, n_segments: torch.Tensor
) -> torch.Tensor:
    """(N, N_FEATURES) the policy's inputs after segment ``t`` (see :data:`FEATURES`)."""
    n = n_segments.to(margin.dtype)
    return torch.stack(
        [
            torch.tanh(margin / _MARGIN_SCALE),
            torch.tanh(best_margin / _MARGIN_SCALE),
            (best_margin > 0).to(margin.dtype),
            (t + 1) / n,
            torch.log(n) / 4.0,
        ],
        dim=-1,
    )


def question_match(
    ids: torch.Tensor, is_question: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """(N, W) int64: 1 where a segment token's id also occurs among the question's tokens.

    The exact-match feature of DrQA-style readers; [CLS] and the first [SEP] are part of
    ``is_question`` but never match (position 0 and the position before the segment).
    """
    q = is_question.clone()
    q[:, 0] = False  # [CLS]
    q &= torch.roll(is_question, -1, dims=1)  # drop the [SEP] closing the question
    same = ids[:, :, None] == ids[:, None, :]  # (N, W, W)
    hit = (same & q[:, None, :]).any(-1)
    return (hit & ~is_question & token_mask).long()


def _mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 1))


class MemoryReader(nn.Module):
    """The reader (see the module docstring)."""

    policy_trained: torch.Tensor  # () bool buffer

    def __init__(self, cfg: ReaderConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1 or cfg.max_positions < 1:
            raise ValueError("ReaderConfig: vocab_size and max_positions come from the store")
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_positions + 1, d)  # position 0: the memory token
        self.type_emb = nn.Embedding(3, d)  # 0 memory, 1 [CLS] + question, 2 segment
        self.match_emb = nn.Embedding(2, d)  # segment token that also occurs in the question
        self.mem_in = nn.Linear(cfg.memory_dim, d)
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.n_heads,
            cfg.ffn_dim,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.span_head = nn.Linear(d, 2)
        self.memory_cell = nn.GRUCell(d + N_FEATURES, cfg.memory_dim)
        halt_in = N_FEATURES + (cfg.memory_dim if cfg.halt_reads_memory else 0)
        self.halt_head = _mlp(halt_in, cfg.head_hidden)
        self.value_head = _mlp(cfg.memory_dim + N_FEATURES, cfg.head_hidden)
        # Set once a hybrid stage has trained the halting head (a fresh head is re-initialised).
        self.register_buffer("policy_trained", torch.zeros((), dtype=torch.bool))
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        nn.init.normal_(self.type_emb.weight, std=0.02)
        nn.init.normal_(self.match_emb.weight, std=0.02)

    # ------------------------------------------------------------------ parameter groups
    def qa_parameters(self) -> list[nn.Parameter]:
        """The reader: embeddings, encoder, span head, memory cell (the QA optimizer's)."""
        policy = {id(p) for p in self.policy_parameters()}
        return [p for p in self.parameters() if id(p) not in policy]

    def policy_parameters(self) -> list[nn.Parameter]:
        """The halting and value heads (the policy optimizer's)."""
        return [*self.halt_head.parameters(), *self.value_head.parameters()]

    def reset_policy(self, halt_bias: float) -> None:
        """Fresh halting and value heads; P(HALT) starts at sigmoid(halt_bias) everywhere."""
        for head in (self.halt_head, self.value_head):
            for m in head:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        last = self.halt_head[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.fill_(halt_bias)

    # ------------------------------------------------------------------ one segment
    def encode(
        self,
        ids: torch.Tensor,
        token_mask: torch.Tensor,
        context_start: torch.Tensor,
        memory: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (N, W, d) and the memory token's state (N, d) of N segment rows.

        ids, token_mask: (N, W); context_start: (N,); memory: (N, memory_dim).
        """
        n, w = ids.shape
        pos = torch.arange(w, device=ids.device)
        is_question = pos[None, :] < context_start[:, None]  # (N, W) [CLS] + question + [SEP]
        kind = torch.where(is_question, 1, 2)
        x = self.tok_emb(ids) + self.pos_emb(pos + 1)[None] + self.type_emb(kind)
        x = x + self.match_emb(question_match(ids, is_question, token_mask))
        m = self.mem_in(memory) + self.pos_emb.weight[0] + self.type_emb.weight[0]  # (N, d)
        h = torch.cat([m[:, None, :], x], dim=1)  # (N, W + 1, d)
        pad = torch.cat([token_mask.new_zeros(n, 1), ~token_mask], dim=1)  # True = ignore
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        return h[:, 1:], h[:, 0]

    def policy(self, memory: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(halt logit, value) from the memory and features, both detached: (...,) each.
        The halting head reads the features alone unless ``halt_reads_memory``."""
        feats = features.detach()
        x = torch.cat([memory.detach(), feats], dim=-1)
        halt = self.halt_head(x if self.cfg.halt_reads_memory else feats)
        return halt.squeeze(-1), self.value_head(x).squeeze(-1)

    # ------------------------------------------------------------------ early exit
    @torch.no_grad()
    def read_early_exit(
        self, batch: QABatch, halt_threshold: float = 0.5, answer_threshold: float = 0.0
    ) -> EarlyExit:
        """Read one segment at a time and drop each example from the batch as soon as the
        halting head says stop (its probability above ``halt_threshold``; an example always
        stops after its last segment): only the segments read are ever encoded.

        The answer is the best span among the segments read (the largest margin, the later
        segment on a tie) if its margin beats ``answer_threshold``: what :meth:`read`, then
        :func:`prefix_answers` at the greedy halt, gives for the same example.
        """
        b = batch.input_ids.shape[0]
        dev = batch.input_ids.device
        nseg = batch.n_segments
        memory = torch.zeros(b, self.cfg.memory_dim, device=dev)
        best = torch.full((b,), float("-inf"), device=dev)
        start = torch.full((b,), -1, dtype=torch.long, device=dev)
        end = torch.full((b,), -1, dtype=torch.long, device=dev)
        n_read = torch.zeros(b, dtype=torch.long, device=dev)
        active = torch.arange(b, device=dev)
        t = 0
        while True:
            active = active[nseg[active] > t]
            if active.numel() == 0:
                break
            cstart = batch.context_start[active, t]
            states, summary = self.encode(
                batch.input_ids[active, t], batch.token_mask[active, t], cstart, memory[active]
            )
            logits = self.span_head(states)
            margin, sp, ep = best_spans(
                logits[..., 0], logits[..., 1], batch.context_mask[active, t],
                self.cfg.max_answer_tokens,
            )  # fmt: skip
            prev = best[active]
            better = margin >= prev  # cummax's tie rule: the later segment
            best_k = torch.maximum(prev, margin)
            off = batch.token_offset[active, t]
            start[active] = torch.where(better, sp - cstart + off, start[active])
            end[active] = torch.where(better, ep - cstart + off, end[active])
            best[active] = best_k
            x = policy_features(margin, best_k, t, nseg[active])
            new_mem = self.memory_cell(torch.cat([summary, x], dim=-1), memory[active])
            memory[active] = new_mem
            n_read[active] = t + 1
            halt, _ = self.policy(new_mem, x)
            stop = (torch.sigmoid(halt) > halt_threshold) & (t < nseg[active] - 1)
            active = active[~stop]
            t += 1
        has = best > answer_threshold
        none = torch.full_like(start, -1)
        return EarlyExit(n_read, torch.where(has, start, none), torch.where(has, end, none), best)

    # ------------------------------------------------------------------ a whole batch
    def read(self, batch: QABatch) -> ReadOutput:
        """Read every segment of every example of ``batch`` in order (see the module doc).

        Only real segments are encoded: at step ``t`` the examples that still have a
        segment ``t`` are gathered, so padded segments never enter the encoder, the memory
        or any output.
        """
        b, t_max, w = batch.input_ids.shape
        dev = batch.input_ids.device
        memory = torch.zeros(b, self.cfg.memory_dim, device=dev)
        best = torch.full((b,), float("-inf"), device=dev)
        starts, ends, margins, sps, eps, mems, feats = [], [], [], [], [], [], []
        active_counts = batch.segment_mask.sum(dim=0).tolist()  # (T,) one host read
        ids, tok = batch.input_ids, batch.token_mask
        cmask, cstart, nseg = batch.context_mask, batch.context_start, batch.n_segments
        order = None
        if b > 1 and not bool((nseg[1:] <= nseg[:-1]).all()):
            # examples must be longest first (collate sorts them): sort once, unsort at the end
            order = torch.argsort(nseg, descending=True, stable=True)
            ids, tok, cmask, cstart, nseg = (x[order] for x in (ids, tok, cmask, cstart, nseg))
        for t in range(t_max):
            k = int(active_counts[t])  # examples 0..k-1 have a segment t
            states, summary = self.encode(ids[:k, t], tok[:k, t], cstart[:k, t], memory[:k])
            logits = self.span_head(states)  # (k, W, 2)
            st, en = logits[..., 0], logits[..., 1]
            with torch.no_grad():
                margin, sp, ep = best_spans(
                    st.detach(), en.detach(), cmask[:k, t], self.cfg.max_answer_tokens
                )
                best_k = torch.maximum(best[:k], margin)
                best = torch.cat([best_k, best[k:]])
                x = policy_features(margin, best_k, t, nseg[:k])
            new_mem = self.memory_cell(torch.cat([summary, x], dim=-1), memory[:k])
            memory = torch.cat([new_mem, memory[k:]])
            pad = b - k
            starts.append(F.pad(st, (0, 0, 0, pad)))
            ends.append(F.pad(en, (0, 0, 0, pad)))
            margins.append(F.pad(margin, (0, pad), value=float("-inf")))
            sps.append(F.pad(sp, (0, pad)))
            eps.append(F.pad(ep, (0, pad)))
            mems.append(F.pad(new_mem, (0, 0, 0, pad)))
            feats.append(F.pad(x, (0, 0, 0, pad)))
        stacked = [torch.stack(v, dim=1) for v in (starts, ends, margins, sps, eps, mems, feats)]
        if order is not None:
            inverse = torch.argsort(order)
            stacked = [v[inverse] for v in stacked]
        start_l, end_l, margin_all, sp_all, ep_all, mem_all, feat_all = stacked
        halt, value = self.policy(mem_all, feat_all)
        return ReadOutput(
            start_logits=start_l,
            end_logits=end_l,
            margin=margin_all,
            span_start=sp_all,
            span_end=ep_all,
            memory=mem_all,
            features=feat_all,
            halt_logit=halt,
            value=value,
        )


@dataclass(frozen=True)
class EarlyExit:
    """What an early-exit read of a batch returns (one row per example)."""

    n_read: torch.Tensor  # (B,) int64 segments encoded before the reader halted
    start: torch.Tensor  # (B,) int64 answer in document tokens, -1 = no answer
    end: torch.Tensor  # (B,) int64
    margin: torch.Tensor  # (B,) best margin among the segments read


def prefix_answers(
    out: ReadOutput, batch: QABatch, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer after reading segments ``0..t``, for every t, in document tokens.

    The best span among the segments read (largest margin) if its margin beats
    ``threshold``, else no answer (-1, -1). Returns ``(start, end)``, each (B, T) int64.
    """
    best, arg = torch.cummax(out.margin, dim=1)  # (B, T)
    sp = out.span_start.gather(1, arg) - batch.context_start.gather(1, arg)
    ep = out.span_end.gather(1, arg) - batch.context_start.gather(1, arg)
    off = batch.token_offset.gather(1, arg)
    has = best > threshold
    neg = torch.full_like(sp, -1)
    return torch.where(has, sp + off, neg), torch.where(has, ep + off, neg)


def describe(model: MemoryReader) -> str:
    """One line: the reader's sizes and parameter count."""
    c = model.cfg
    n = sum(p.numel() for p in model.parameters())
    return (
        f"reader d={c.d_model} layers={c.n_layers} heads={c.n_heads} memory={c.memory_dim}: "
        f"{n / 1e6:.2f}M parameters"
    )
