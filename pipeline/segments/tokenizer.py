"""The tokenizer of a segment store: trained here, deterministically, or loaded from a file.

A trained tokenizer is a BERT-style WordPiece tokenizer built with HF ``tokenizers``:
``BertNormalizer`` (lowercase, strip accents, clean control characters), ``BertPreTokenizer``
(split on whitespace and punctuation), a ``WordPiece`` model whose continuation pieces start
with ``##``, the ``WordPiece`` decoder, and a ``[CLS] A [SEP] B [SEP]`` post-processor.
Special tokens have fixed ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4.

Why the vocabulary is not learnt by ``tokenizers.trainers.WordPieceTrainer``: that trainer
(like the BPE and Unigram ones) breaks ties between equally frequent merges, and numbers
its alphabet, in hash-map order, so the same corpus gives a different ``tokenizer.json``
from run to run — and a store's content must be a function of its inputs. So the word
counts come from HF ``tokenizers`` (its normaliser and pre-tokenizer, counted by the
deterministic ``WordLevelTrainer`` and ``encode_batch``), and the merges are chosen here by
byte-pair merging over the distinct words with ties broken by the pair's text: same corpus,
same vocabulary, same bytes.

Encoding is batched: :func:`encode` runs ``encode_batch`` over many texts and returns flat
NumPy arrays (ids, character offsets) plus per-text lengths. A trained tokenizer encodes
the corpus it was trained on from the words its training already split
(:func:`encode_from_words`): each distinct word once, laid out with NumPy.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from data_specs.schema import SPECIAL_TOKENS
from pipeline.format import BuildError

try:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers as hf_trainers
except ImportError:  # an install without the `qa` extra
    raise BuildError(
        "segment stores need HF `tokenizers`: pip install -e '.[qa]' (or `make setup`)"
    ) from None

CONTINUATION = "##"
MAX_WORD_CHARS = 100  # longer words encode as [UNK] (WordPiece's max_input_chars_per_word)
ENCODE_BATCH = 1024  # texts per encode_batch call


@dataclass(frozen=True)
class Specials:
    """Ids of the tokens that frame a segment."""

    pad: int
    cls: int
    sep: int
    unk: int | None

    def to_dict(self) -> dict[str, int | None]:
        return {"pad": self.pad, "cls": self.cls, "sep": self.sep, "unk": self.unk}


@dataclass(frozen=True)
class Encoded:
    """Many texts encoded at once, as flat arrays.

    Text ``i`` owns ``ids[offsets[i]:offsets[i + 1]]``; ``starts``/``ends`` are each token's
    character span in the ORIGINAL text (end exclusive).
    """

    ids: np.ndarray  # (T,) int32
    starts: np.ndarray  # (T,) int32
    ends: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (N + 1,) int64

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # (N,) int64

    def take(self, keep: np.ndarray) -> Encoded:
        """The texts ``keep`` (indices, in this order)."""
        lengths = self.lengths[keep]
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        src = np.repeat(self.offsets[:-1][keep] - offsets[:-1], lengths) + np.arange(
            int(offsets[-1]), dtype=np.int64
        )
        return Encoded(self.ids[src], self.starts[src], self.ends[src], offsets)

    @staticmethod
    def concat(parts: Sequence[Encoded]) -> Encoded:
        """The texts of ``parts``, one after the other."""
        offsets = [np.zeros(1, dtype=np.int64)]
        carry = 0
        for p in parts:
            offsets.append(p.offsets[1:] + carry)
            carry += int(p.offsets[-1])
        return Encoded(
            ids=np.concatenate([p.ids for p in parts]),
            starts=np.concatenate([p.starts for p in parts]),
            ends=np.concatenate([p.ends for p in parts]),
            offsets=np.concatenate(offsets),
        )


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )


@dataclass(frozen=True)
class WordSplit:
    """Texts cut into the words the trained tokenizer's normaliser and pre-tokenizer make.

    Made once by :func:`split_words`; it gives the word counts the vocabulary is learnt
    from AND, through :func:`encode_from_words`, the final encoding without a second pass
    of normalisation and pre-tokenization over the corpus.
    """

    words: list[str]  # by word id: the normalised word, or a special token met in the text
    counts: np.ndarray  # (V,) int64 occurrences over all texts
    occurrences: Encoded  # ids = word ids; starts/ends = each occurrence's span in its text
    special_ids: frozenset[int]  # word ids of the special tokens (not learnt from)
    unknown: int  # word id of [UNK]: a stretch of text the splitter did not know


def split_words(texts: Sequence[str], lowercase: bool = True) -> WordSplit:
    """Split ``texts`` into words with HF ``tokenizers`` (a ``WordLevel`` model over the
    normaliser and pre-tokenizer of :func:`make_tokenizer`, with the same special tokens,
    so that ``[CLS]`` written in a text is met as the trained tokenizer meets it)."""
    counter = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS[1]))
    counter.normalizer = _normalizer(lowercase)
    counter.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = hf_trainers.WordLevelTrainer(
        vocab_size=2**31 - 1,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    counter.train_from_iterator(texts, trainer)
    occ = encode(counter, texts)
    n = counter.get_vocab_size()
    ids = counter.get_vocab()
    words = [""] * n
    for w, i in ids.items():
        words[i] = w
    return WordSplit(
        words=words,
        counts=np.bincount(occ.ids, minlength=n).astype(np.int64),
        occurrences=occ,
        special_ids=frozenset(ids[t] for t in SPECIAL_TOKENS),
        unknown=ids[SPECIAL_TOKENS[1]],
    )


def word_counts(split: WordSplit) -> tuple[list[str], np.ndarray]:
    """The distinct words met (special tokens aside) and how often each occurs."""
    keep = [i for i in np.flatnonzero(split.counts).tolist() if i not in split.special_ids]
    return [split.words[i] for i in keep], split.counts[keep]


def encode_from_words(
    tok: Tokenizer, texts: Sequence[str], split: WordSplit, which: np.ndarray
) -> Encoded:
    """``encode(tok, texts)`` for the trained tokenizer, from the words of ``split``.

    ``texts[j]`` is the text split as number ``which[j]``. Each distinct word is encoded
    once and its pieces are laid out at every occurrence with NumPy. That is exactly what
    encoding the whole text gives, because the normaliser works character by character and
    the model works word by word: a word's pieces are those of the word alone, their
    character spans those inside the word shifted to where it occurs. The shift is exact
    where the occurrence is ASCII and as long as its normalised word (no character was
    dropped or expanded); any other occurrence (accents, control characters, ...) is
    encoded from its own text, which is exact as well.
    """
    occ = split.occurrences.take(np.asarray(which, dtype=np.int64))
    n_texts = len(texts)
    occ_text = np.repeat(np.arange(n_texts, dtype=np.int64), occ.lengths)
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n_texts)
    text_base = np.concatenate([[0], np.cumsum(lens)])
    chars = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    non_ascii = np.concatenate([[0], np.cumsum(chars > 127)])
    g_s = text_base[:-1][occ_text] + occ.starts
    g_e = text_base[:-1][occ_text] + occ.ends
    word_len = np.fromiter((len(w) for w in split.words), dtype=np.int64, count=len(split.words))
    cached = (
        (non_ascii[g_e] == non_ascii[g_s])
        & (occ.ends - occ.starts == word_len[occ.ids])
        & (occ.ids != split.unknown)
    )
    uw = np.unique(occ.ids[cached])
    pieces_w = encode(tok, [split.words[i] for i in uw.tolist()])
    fallback = np.flatnonzero(~cached)
    subs: dict[str, int] = {}
    fb_entry = np.empty(len(fallback), dtype=np.int64)
    for k, (t, a, b) in enumerate(
        zip(occ_text[fallback].tolist(), occ.starts[fallback].tolist(), occ.ends[fallback].tolist())
    ):
        fb_entry[k] = subs.setdefault(texts[t][a:b], len(subs))
    pieces_f = encode(tok, list(subs))
    table = Encoded.concat([pieces_w, pieces_f])
    entry = np.empty(len(occ.ids), dtype=np.int64)
    entry[cached] = np.searchsorted(uw, occ.ids[cached])
    entry[fallback] = len(uw) + fb_entry
    n_pieces = table.lengths[entry]
    out_len = int(n_pieces.sum())
    first = np.cumsum(n_pieces) - n_pieces
    src = np.repeat(table.offsets[:-1][entry] - first, n_pieces) + np.arange(out_len)
    shift = np.repeat(occ.starts, n_pieces)
    per_text = np.bincount(occ_text, weights=n_pieces, minlength=n_texts).astype(np.int64)
    offsets = np.zeros(n_texts + 1, dtype=np.int64)
    np.cumsum(per_text, out=offsets[1:])
    return Encoded(
        ids=table.ids[src],
        starts=(table.starts[src] + shift).astype(np.int32),
        ends=(table.ends[src] + shift).astype(np.int32),
        offsets=offsets,
    )


def learn_vocab(
    words: Sequence[str], counts: np.ndarray, vocab_size: int, min_frequency: int
) -> list[str]:
    """A WordPiece vocabulary by byte-pair merging over distinct words, deterministically.

    Starts from the special tokens and every character (as a word start, and with ``##`` as
    a continuation), then repeatedly merges the most frequent adjacent pair of pieces
    (ties: the smallest pair of texts) until ``vocab_size`` tokens or no pair is seen
    ``min_frequency`` times. The alphabet is always kept whole, so a word of seen characters
    never becomes ``[UNK]``.
    """
    syms: list[list[str]] = []
    wcount: list[int] = []
    alphabet: set[str] = set()
    for w, c in zip(words, counts.tolist()):
        if not w or len(w) > MAX_WORD_CHARS:
            continue
        s = [w[0]] + [CONTINUATION + ch for ch in w[1:]]
        alphabet.update(s)
        syms.append(s)
        wcount.append(int(c))
    vocab = list(SPECIAL_TOKENS) + sorted(alphabet - set(SPECIAL_TOKENS))
    known = set(vocab)
    pairs: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, s in enumerate(syms):
        for p in zip(s, s[1:]):
            pairs[p] += wcount[i]
            where[p].add(i)
    heap = [(-c, a, b) for (a, b), c in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negc, a, b = heapq.heappop(heap)
        count = pairs.get((a, b), 0)
        if count != -negc or count <= 0:
            continue  # stale entry: the pair's current count has its own entry
        if count < min_frequency:
            break
        merged = a + b[len(CONTINUATION) :]
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop((a, b), ())):
            s = syms[i]
            c = wcount[i]
            out: list[str] = []
            j = 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            if len(out) == len(s):
                continue
            for p in zip(s, s[1:]):
                pairs[p] -= c
                changed.add(p)
            for p in zip(out, out[1:]):
                pairs[p] += c
                where[p].add(i)
                changed.add(p)
            syms[i] = out
        pairs.pop((a, b), None)
        for p in sorted(changed):
            c = pairs.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p[0], p[1]))
            else:
                pairs.pop(p, None)
    return vocab


def make_tokenizer(vocab: Sequence[str], lowercase: bool = True) -> Tokenizer:
    """A BERT-style WordPiece tokenizer over ``vocab`` (ids = positions in ``vocab``)."""
    tok = Tokenizer(
        models.WordPiece(
            {t: i for i, t in enumerate(vocab)},
            unk_token=SPECIAL_TOKENS[1],
            max_input_chars_per_word=MAX_WORD_CHARS,
        )
    )
    tok.normalizer = _normalizer(lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION)
    cls, sep = SPECIAL_TOKENS[2], SPECIAL_TOKENS[3]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab.index(cls)), (sep, vocab.index(sep))],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int,
    min_frequency: int,
    lowercase: bool = True,
    split: WordSplit | None = None,
) -> Tokenizer:
    """Train the store's tokenizer on ``texts`` (or on their ``split``, if made already);
    the same texts give the same bytes."""
    if split is None:
        split = split_words(texts, lowercase)
    words, counts = word_counts(split)
    return make_tokenizer(learn_vocab(words, counts, vocab_size, min_frequency), lowercase)


def load_tokenizer(path: str | Path, origin: str) -> Tokenizer:
    """Load a ``tokenizer.json``; errors name the spec key and the fix."""
    p = Path(path)
    if not p.is_file():
        raise BuildError(
            f"{origin}: tokenizer.path: {str(p)!r} is not a file (paths are relative to the "
            f"working directory {Path.cwd()}); give a HF tokenizer.json or use `train:`"
        )
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise BuildError(
            f"{origin}: tokenizer.path: {p} is not a HF tokenizer.json ({e}); save one with "
            "`Tokenizer.save` or use `train:`"
        ) from None


def specials_of(tok: Tokenizer, cls: str, sep: str, pad: str, origin: str) -> Specials:
    """The ids of the framing tokens; a token missing from the vocabulary is an error."""
    ids: dict[str, int] = {}
    for key, token in (("cls_token", cls), ("sep_token", sep), ("pad_token", pad)):
        i = tok.token_to_id(token)
        if i is None:
            raise BuildError(
                f"{origin}: tokenizer.{key}: {token!r} is not in the tokenizer's vocabulary; "
                f"set tokenizer.{key} to the tokenizer's own token (e.g. '<s>', '</s>', '<pad>')"
            )
        ids[key] = i
    unk = None
    model = tok.model
    unk_token = getattr(model, "unk_token", None)
    if isinstance(unk_token, str):
        unk = tok.token_to_id(unk_token)
    return Specials(pad=ids["pad_token"], cls=ids["cls_token"], sep=ids["sep_token"], unk=unk)


def tokenizer_bytes(tok: Tokenizer) -> bytes:
    """The canonical serialisation (what the store saves and hashes)."""
    return (tok.to_str(pretty=True) + "\n").encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(tok: Tokenizer, texts: Sequence[str], with_offsets: bool = True) -> Encoded:
    """Encode ``texts`` (no special tokens) with ``encode_batch``, in batches, to flat arrays."""
    ids: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for b in range(0, len(texts), ENCODE_BATCH):
        encs = tok.encode_batch(list(texts[b : b + ENCODE_BATCH]), add_special_tokens=False)
        for k, e in enumerate(encs):
            a = np.asarray(e.ids, dtype=np.int32)
            lengths[b + k] = len(a)
            ids.append(a)
            if with_offsets:
                o = np.fromiter(chain.from_iterable(e.offsets), np.int32, 2 * len(a))
                o = o.reshape(-1, 2)
                starts.append(o[:, 0])
                ends.append(o[:, 1])
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty = np.zeros(0, dtype=np.int32)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else empty

    flat = cat(ids)
    return Encoded(
        ids=flat,
        starts=cat(starts) if with_offsets else np.zeros(len(flat), np.int32),
        ends=cat(ends) if with_offsets else np.zeros(len(flat), np.int32),
        offsets=offsets,
    )


def decode_span(tok: Tokenizer, ids: Sequence[int]) -> str:
    """The text of a run of tokens that may start inside a word: a leading continuation
    piece (``##b``) decodes without its prefix."""
    text = tok.decode(list(ids), skip_special_tokens=False)
    if ids:
        first = tok.id_to_token(int(ids[0])) or ""
        if first.startswith(CONTINUATION) and text.startswith(CONTINUATION):
            text = text[len(CONTINUATION) :]
    return text


def normalize_for_compare(tok: Tokenizer, text: str) -> str:
    """``text`` as the tokenizer sees it, without whitespace: what decoded answers equal."""
    norm: Any = tok.normalizer
    s = norm.normalize_str(text) if norm is not None else text
    return "".join(s.split())
