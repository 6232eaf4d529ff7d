"""Rewards composed from YAML: leaves, a weighted sum, and post-processors on any node.

A REWARD (the ``reward:`` key of a ``ppo`` / ``reinforce`` stage, or of an IQL/CQL config
relabelling a transition store) is built by :func:`build_reward` into a tree of
:class:`RewardNode`. A node maps a batch of :class:`RewardInput` (one per generated turn) to
one float64 reward per sample; :meth:`RewardNode.evaluate` also returns every node's values
for the logs. Overview for users: ``docs/REWARDS.md``.

Grammar::

    REWARD := LEAF                                    # a bare name: env_return, success, ...
            | {type: LEAF, OPTION: VALUE, ..., name: NAME, post: [POST, ...]}
            | {LEAF: OPTIONS, name: NAME, post: [POST, ...]}   # short form, same meaning
            | {type: weighted_sum, components: [COMPONENT, ...], name: NAME, post: [POST, ...]}
    COMPONENT := {weight: W, reward: REWARD, name: NAME}      # name optional, W a finite number
    POST := {clip: [LO, HI]}                          # LO <= HI; null for an open side
          | {scale: {mul: M, add: A}}                 # x * M + A (defaults 1 and 0)
          | {ema_normalize: {decay: D, eps: E}}       # 0 < D < 1 (default 0.99), E > 0 (1e-8)

Leaves and their options (every leaf returns one float per sample):

=================  ==========================================================================
``env_return``     ``sample.env_return``, the environment's return for the turn.
``success``        ``sample.success`` as 0.0 / 1.0 (a float is passed through).
``exact_match``    1.0 when ``text`` equals ``target`` after SQuAD normalisation (lower case,
                   no punctuation or articles, single spaces: :mod:`trainer.qa.metrics`).
``token_f1``       word-overlap F1 of ``text`` against ``target``, same normalisation.
``bleu``           sacrebleu's sentence BLEU of ``text`` against ``target``, divided by 100
                   (so in [0, 1]). Options: ``tokenize`` (default ``13a``),
                   ``smooth_method`` (default ``exp``), ``lowercase`` (default false).
``rouge_l``        rouge-score's ROUGE-L F-measure of ``text`` against ``target``. Option:
                   ``use_stemmer`` (default false).
``length``         the length of the turn. Option ``unit``: ``tokens`` (default: the
                   policy's ``n_tokens``), ``words`` (whitespace-separated) or ``chars``.
``format``         1.0 when the regex ``pattern`` is found in ``text`` (``re.search``, with
                   ``re.DOTALL`` as for the store's spans), else 0.0; ``full: true`` asks the
                   whole text to match (``re.fullmatch``).
``python``         ``function: "module:function"`` (short form ``{python: "module:function"}``),
                   imported when the reward is built, called as
                   ``fn(sample: RewardInput) -> float`` once per sample.
``column``         a named per-sample reward column: ``{type: column, name: COL}`` (``name``
                   is the column, and the log name unless ``column: COL`` is given apart).
                   Read from ``sample.columns[COL]``, or from ``columns[COL]`` in :func:`relabel`.
=================  ==========================================================================

A leaf that reads a value the sample does not have (no ``target`` for ``bleu``, no
``n_tokens`` for ``length: {unit: tokens}``) raises :class:`RewardError`.

Example (the demo's PPO reward)::

    reward:
      type: weighted_sum
      components:
        - {weight: 1.0, reward: success}
        - {weight: 0.1, reward: {format: {pattern: "<action>.+</action>"}}}
        - {weight: -0.01, reward: {length: {unit: tokens}}}
      post: [{clip: [-1, 2]}, {ema_normalize: {decay: 0.99}}]

Post-processors run in the order listed, on the node's value, before any weighted sum above
it uses that value.

**EMA normalisation.** Each ``ema_normalize`` keeps a mean ``m``, a variance ``v`` and a
count ``n`` of batches seen. For a batch ``x`` of N >= 1 values with mean ``b`` and variance
``s`` (population variance, ddof 0), the state is updated FIRST::

    n == 0:  m = b,                     v = s
    n >= 1:  m = D * m + (1 - D) * b,   v = D * v + (1 - D) * s
    n += 1

and THEN the batch is normalised with the updated state: ``(x - m) / sqrt(v + E)``. The
first batch is thus normalised by its own statistics. An empty batch changes nothing.
``evaluate(..., update=False)`` normalises with the current state and leaves it unchanged
(with no state yet, by the batch's own statistics). :meth:`RewardNode.state_dict` holds every
EMA's ``(m, v, n)`` keyed by its YAML path (``reward.post[1]``): a checkpoint that saves it
and a resumed run that builds the same spec and loads it continue the same recursion.

**Logging.** :meth:`RewardNode.evaluate` returns ``(total, components)``; ``components``
holds, for every node of the tree, ``reward/NAME`` (N,): its value after its own
post-processors. A node with post-processors also reports ``reward_raw/NAME`` (before them),
and each component of a weighted sum reports ``reward_weight/NAME`` (N,), its weight in that
sum (not multiplied by the weights above it). NAME is the ``name`` given in the YAML, else
the leaf's type (``success``, ``format``; the function's name for ``python``, the column for
``column``), ``weighted_sum`` for an inner sum and ``total`` for the root sum. Default names
that clash are numbered in YAML order (``bleu_1``, ``bleu_2``); a given name that clashes is
a :class:`~trainer.config.ConfigError`.

**Relabelling a transition store.** :func:`relabel` evaluates a tree whose leaves are all
``column`` leaves on a mapping of named per-transition reward columns (a store spec may
declare several reward fields) and returns the new reward column, with no store rebuild.

A spec that cannot be built raises :class:`~trainer.config.ConfigError` with one line naming
the node's path in the YAML (``reward.components[1].reward: unknown leaf 'sucess' (did you
mean 'success'?); known: ...``). A NaN or infinite value raises :class:`RewardError` naming
the component and the sample (``reward/format produced NaN for sample 3``).
"""

from __future__ import annotations

import difflib
import importlib
import math
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.config import ConfigError

LEAVES = (
    "bleu",
    "column",
    "env_return",
    "exact_match",
    "format",
    "length",
    "python",
    "rouge_l",
    "success",
    "token_f1",
)
COMBINATORS = ("weighted_sum",)
POST_PROCESSORS = ("clip", "ema_normalize", "scale")
LENGTH_UNITS = ("chars", "tokens", "words")
_NODE_KEYS = ("name", "post", "type")


class RewardError(ValueError):
    """A reward that cannot be computed for a batch (a NaN, an inf, a missing input)."""

    def __init__(self, message: str, component: str = "", sample: int | None = None) -> None:
        super().__init__(message)
        self.component = component  # "reward/NAME"
        self.sample = sample  # index in the batch, when one sample is at fault


@dataclass(frozen=True)
class RewardInput:
    """One generated turn, as the reward leaves see it.

    Fields a leaf needs must be set (``target`` for text overlap, ``n_tokens`` for a length in
    tokens, ...); the others may stay ``None``.
    """

    text: str  # the turn the policy generated
    target: str | None = None  # the store's target text of that turn
    env_return: float | None = None  # the environment's return for the turn
    success: float | bool | None = None  # the episode's outcome
    n_tokens: int | None = None  # tokens the policy generated for the turn
    prompt: str | None = None  # the context the turn answers (for python leaves)
    columns: Mapping[str, float] = field(default_factory=dict)  # named reward columns


# --------------------------------------------------------------------------------------------
# Evaluation context
# --------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """What one evaluation reads: samples (RL rollouts) or named columns (a transition store)."""

    n: int
    samples: Sequence[RewardInput] | None = None
    columns: Mapping[str, np.ndarray] | None = None
    # Deferred errors (data-parallel: the ranks' EMA statistics are summed inside the
    # evaluation, so a rank must not leave it half-way): recorded, the values NaN, raised at
    # the end. None: raised at once.
    errors: list[RewardError] | None = None

    def check(self, values: np.ndarray, component: str, path: str) -> None:
        try:
            _check_finite(values, component, path)
        except RewardError as e:
            if self.errors is None:
                raise
            self.errors.append(e)


def _check_finite(values: np.ndarray, component: str, path: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "NaN" if math.isnan(values[i]) else "inf"
        raise RewardError(
            f"reward/{component} produced {what} for sample {i} ({path})", f"reward/{component}", i
        )


# --------------------------------------------------------------------------------------------
# Post-processors
# --------------------------------------------------------------------------------------------


class PostOp:
    """A post-processor: values (N,) -> values (N,), possibly stateful."""

    path: str

    def apply(self, x: np.ndarray, update: bool) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any] | None:
        """The op's state, or None for a stateless op."""
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError


class Clip(PostOp):
    """``{clip: [LO, HI]}``: values clipped into [LO, HI] (null: no bound on that side)."""

    def __init__(self, lo: float, hi: float, path: str) -> None:
        self.lo, self.hi, self.path = lo, hi, path

    def apply(self, x: np.ndarray, update: bool) -> np.ndarray:
        return np.clip(x, self.lo, self.hi)


class Scale(PostOp):
    """``{scale: {mul: M, add: A}}``: ``x * M + A``."""

    def __init__(self, mul: float, add: float, path: str) -> None:
        self.mul, self.add, self.path = mul, add, path

    def apply(self, x: np.ndarray, update: bool) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # an inf is reported by the caller
            return x * self.mul + self.add


class EmaNormalize(PostOp):
    """``{ema_normalize: {decay: D, eps: E}}``: update the EMA of batch mean and variance with
    this batch, then return ``(x - mean) / sqrt(var + eps)`` (see the module docstring)."""

    def __init__(self, decay: float, eps: float, path: str) -> None:
        self.decay, self.eps, self.path = decay, eps, path
        self.mean, self.var, self.count = 0.0, 1.0, 0
        # data-parallel: sums a float64 vector over the ranks, so that the batch statistics
        # are the global batch's and the state stays the same on every rank (None: local)
        self.reduce: Callable[[np.ndarray], np.ndarray] | None = None

    def _moments(self, x: np.ndarray) -> tuple[int, float, float]:
        """(N, mean, population variance) of the batch, over every rank with ``reduce``."""
        if self.reduce is None:
            return (x.size, float(x.mean()), float(x.var())) if x.size else (0, 0.0, 1.0)
        n, total = self.reduce(np.array([x.size, x.sum()], dtype=np.float64)).tolist()
        if n == 0:
            return 0, 0.0, 1.0
        b = total / n
        s = float(self.reduce(np.array([((x - b) ** 2).sum()], dtype=np.float64))[0]) / n
        return int(n), b, s

    def apply(self, x: np.ndarray, update: bool) -> np.ndarray:
        n, b, s = self._moments(x)  # on every rank alike: collectives inside
        if n == 0 or x.size == 0:
            return x.copy()
        if self.count == 0:
            mean, var = b, s
        else:
            d = self.decay
            mean, var = d * self.mean + (1.0 - d) * b, d * self.var + (1.0 - d) * s
        if update:
            self.mean, self.var, self.count = mean, var, self.count + 1
        elif self.count > 0:
            mean, var = self.mean, self.var
        return (x - mean) / math.sqrt(var + self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean, self.var, self.count = (
            float(state["mean"]),
            float(state["var"]),
            int(state["count"]),
        )


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


class RewardNode:
    """A node of a reward tree: ``node(samples) -> (N,)`` float64, with logging and state.

    Calling a node (or :meth:`evaluate`) with ``update=True`` advances the state of its
    ``ema_normalize`` post-processors by one batch.
    """

    kind: str = ""

    def __init__(self, path: str, name: str | None, post: Sequence[PostOp]) -> None:
        self.path = path  # the node's place in the YAML, e.g. "reward.components[1].reward"
        self.given_name = name  # the YAML's `name`, if any
        self.name = name or ""  # unique log name, set by build_reward
        self.post = tuple(post)

    # -- public API --------------------------------------------------------------------------
    def __call__(self, samples: Sequence[RewardInput], update: bool = True) -> np.ndarray:
        """The reward of each sample, (N,) float64."""
        return self.evaluate(samples, update=update)[0]

    def evaluate(
        self, samples: Sequence[RewardInput], update: bool = True
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(total (N,), {"reward/NAME": (N,), "reward_weight/NAME": (N,), ...})``."""
        logs: dict[str, np.ndarray] = {}
        shared = any(
            isinstance(op, EmaNormalize) and op.reduce is not None
            for node in self.nodes()
            for op in node.post
        )
        batch = _Batch(len(samples), samples=samples, errors=[] if shared else None)
        total = self._evaluate(batch, logs, update)
        if batch.errors:
            raise batch.errors[0]
        return total, logs

    def evaluate_columns(
        self, columns: Mapping[str, np.ndarray], update: bool = True
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """:meth:`evaluate` on named (N,) reward columns, for trees of ``column`` leaves
        (use :func:`relabel`, which checks the tree and the columns first)."""
        n = len(next(iter(columns.values()))) if columns else 0
        logs: dict[str, np.ndarray] = {}
        total = self._evaluate(_Batch(n, columns=columns), logs, update)
        return total, logs

    def nodes(self) -> Iterator[RewardNode]:
        """This node and every node below it, in YAML order (pre-order)."""
        yield self

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every stateful post-processor's state, keyed by its YAML path (JSON-serialisable)."""
        out: dict[str, dict[str, Any]] = {}
        for node in self.nodes():
            for op in node.post:
                state = op.state_dict()
                if state is not None:
                    out[op.path] = state
        return out

    def share_statistics(self, reduce: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """Data-parallel: every ``ema_normalize`` below updates from the global batch's
        statistics, ``reduce`` summing a float64 vector over the ranks (None: this batch's)."""
        for node in self.nodes():
            for op in node.post:
                if isinstance(op, EmaNormalize):
                    op.reduce = reduce

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore :meth:`state_dict`'s output; the tree must come from the same spec."""
        ops = {op.path: op for node in self.nodes() for op in node.post if op.state_dict()}
        missing, unexpected = sorted(set(ops) - set(state)), sorted(set(state) - set(ops))
        if missing or unexpected:
            raise ValueError(
                f"reward state does not match the reward spec: missing {missing}, "
                f"unexpected {unexpected}; resume with the spec the checkpoint was saved with"
            )
        for path, op in ops.items():
            op.load_state_dict(state[path])

    # -- internals ---------------------------------------------------------------------------
    def _evaluate(self, batch: _Batch, logs: dict[str, np.ndarray], update: bool) -> np.ndarray:
        try:
            raw = self._raw(batch, logs, update)
        except RewardError as e:
            if batch.errors is None:
                raise
            batch.errors.append(e)
            raw = np.full(batch.n, np.nan)
        values = np.asarray(raw, dtype=np.float64)
        batch.check(values, self.name, self.path)
        if self.post:
            logs[f"reward_raw/{self.name}"] = values
            for op in self.post:
                values = op.apply(values, update)
                batch.check(values, self.name, op.path)
        logs[f"reward/{self.name}"] = values
        return values

    def _raw(self, batch: _Batch, logs: dict[str, np.ndarray], update: bool) -> np.ndarray:
        raise NotImplementedError

    def _default_name(self) -> str:
        return self.kind


class WeightedSum(RewardNode):
    """``{type: weighted_sum, components: [{weight: W, reward: REWARD}, ...]}``."""

    kind = "weighted_sum"

    def __init__(
        self,
        path: str,
        name: str | None,
        post: Sequence[PostOp],
        weights: Sequence[float],
        children: Sequence[RewardNode],
    ) -> None:
        super().__init__(path, name, post)
        self.weights = tuple(float(w) for w in weights)
        self.children = tuple(children)

    def nodes(self) -> Iterator[RewardNode]:
        yield self
        for child in self.children:
            yield from child.nodes()

    def _raw(self, batch: _Batch, logs: dict[str, np.ndarray], update: bool) -> np.ndarray:
        total = np.zeros(batch.n, dtype=np.float64)
        for w, child in zip(self.weights, self.children, strict=True):
            values = child._evaluate(batch, logs, update)
            with np.errstate(over="ignore", invalid="ignore"):  # reported by _check_finite
                total = total + w * values
            logs[f"reward_weight/{child.name}"] = np.full(batch.n, w, dtype=np.float64)
        return total


class Leaf(RewardNode):
    """A leaf: one value per sample, from the sample (or from named columns)."""

    def _raw(self, batch: _Batch, logs: dict[str, np.ndarray], update: bool) -> np.ndarray:
        if batch.samples is None:
            raise ConfigError(
                f"{self.path}: leaf {self.kind!r} cannot relabel a transition store; "
                "use {type: column, name: COL}"
            )
        return np.fromiter(
            (self.one(s, i) for i, s in enumerate(batch.samples)), np.float64, batch.n
        )

    def one(self, sample: RewardInput, i: int) -> float:
        """The leaf's value for sample ``i``."""
        raise NotImplementedError

    def _need(self, value: Any, what: str, i: int) -> Any:
        if value is None:
            raise RewardError(
                f"reward/{self.name} needs the sample's {what}; sample {i} has none ({self.path})",
                f"reward/{self.name}",
                i,
            )
        return value


class EnvReturn(Leaf):
    kind = "env_return"

    def one(self, sample: RewardInput, i: int) -> float:
        return float(self._need(sample.env_return, "env_return", i))


class Success(Leaf):
    kind = "success"

    def one(self, sample: RewardInput, i: int) -> float:
        return float(self._need(sample.success, "success", i))


class ExactMatch(Leaf):
    kind = "exact_match"

    def __init__(self, path: str, name: str | None, post: Sequence[PostOp]) -> None:
        super().__init__(path, name, post)
        from trainer.qa.metrics import exact_match  # imports torch: only when used

        self._fn = exact_match

    def one(self, sample: RewardInput, i: int) -> float:
        return self._fn(sample.text, self._need(sample.target, "target", i))


class TokenF1(Leaf):
    kind = "token_f1"

    def __init__(self, path: str, name: str | None, post: Sequence[PostOp]) -> None:
        super().__init__(path, name, post)
        from trainer.qa.metrics import f1  # imports torch: only when used

        self._fn = f1

    def one(self, sample: RewardInput, i: int) -> float:
        return self._fn(sample.text, self._need(sample.target, "target", i))


class Bleu(Leaf):
    kind = "bleu"

    def __init__(
        self,
        path: str,
        name: str | None,
        post: Sequence[PostOp],
        tokenize: str,
        smooth_method: str,
        lowercase: bool,
    ) -> None:
        super().__init__(path, name, post)
        from sacrebleu.metrics import BLEU

        # what sacrebleu.sentence_bleu builds on every call (effective order on)
        self._bleu = BLEU(
            tokenize=tokenize,
            smooth_method=smooth_method,
            lowercase=lowercase,
            effective_order=True,
        )

    def one(self, sample: RewardInput, i: int) -> float:
        target = self._need(sample.target, "target", i)
        return float(self._bleu.sentence_score(sample.text, [target]).score) / 100.0


class RougeL(Leaf):
    kind = "rouge_l"

    def __init__(self, path: str, name: str | None, post: Sequence[PostOp], stem: bool) -> None:
        super().__init__(path, name, post)
        rouge_scorer = _import_rouge_scorer()
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)

    def one(self, sample: RewardInput, i: int) -> float:
        target = self._need(sample.target, "target", i)
        return float(self._scorer.score(target, sample.text)["rougeL"].fmeasure)


def _import_rouge_scorer() -> Any:
    """rouge_score's scorer module; importing it (nltk) draws from Python's global random
    stream, which a run checkpoints: the stream is left as it was, so a run that imports it
    first and a resumed one that had already imported it stay the same run."""
    state = random.getstate()
    try:
        from rouge_score import rouge_scorer
    finally:
        random.setstate(state)
    return rouge_scorer


class Length(Leaf):
    kind = "length"

    def __init__(self, path: str, name: str | None, post: Sequence[PostOp], unit: str) -> None:
        super().__init__(path, name, post)
        self.unit = unit

    def one(self, sample: RewardInput, i: int) -> float:
        if self.unit == "tokens":
            return float(self._need(sample.n_tokens, "n_tokens", i))
        if self.unit == "words":
            return float(len(sample.text.split()))
        return float(len(sample.text))


class Format(Leaf):
    kind = "format"

    def __init__(
        self, path: str, name: str | None, post: Sequence[PostOp], pattern: str, full: bool
    ) -> None:
        super().__init__(path, name, post)
        regex = re.compile(pattern, re.DOTALL)
        self._match = regex.fullmatch if full else regex.search

    def one(self, sample: RewardInput, i: int) -> float:
        return 1.0 if self._match(sample.text) is not None else 0.0


class Python(Leaf):
    kind = "python"

    def __init__(
        self,
        path: str,
        name: str | None,
        post: Sequence[PostOp],
        target: str,
        fn: Callable[[RewardInput], float],
    ) -> None:
        super().__init__(path, name, post)
        self.target, self._fn = target, fn

    def _default_name(self) -> str:
        return self.target.rsplit(":", 1)[1].rsplit(".", 1)[-1]

    def one(self, sample: RewardInput, i: int) -> float:
        value = self._fn(sample)
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise RewardError(
                f"reward/{self.name}: {self.target} returned {value!r} for sample {i}; "
                "it must return a float",
                f"reward/{self.name}",
                i,
            )
        return float(value)


class Column(Leaf):
    kind = "column"

    def __init__(self, path: str, name: str | None, post: Sequence[PostOp], column: str) -> None:
        super().__init__(path, name, post)
        self.column = column

    def _default_name(self) -> str:
        return self.column

    def _raw(self, batch: _Batch, logs: dict[str, np.ndarray], update: bool) -> np.ndarray:
        if batch.columns is None:
            return super()._raw(batch, logs, update)
        if self.column not in batch.columns:
            raise ConfigError(
                f"{self.path}: no reward column {self.column!r}; "
                f"the columns are: {', '.join(sorted(batch.columns)) or '(none)'}"
            )
        return np.asarray(batch.columns[self.column], dtype=np.float64)

    def one(self, sample: RewardInput, i: int) -> float:
        if self.column not in sample.columns:
            raise RewardError(
                f"reward/{self.name} needs the sample's column {self.column!r}; "
                f"sample {i} has: {', '.join(sorted(sample.columns)) or '(none)'} ({self.path})",
                f"reward/{self.name}",
                i,
            )
        return float(sample.columns[self.column])


# --------------------------------------------------------------------------------------------
# Building from YAML
# --------------------------------------------------------------------------------------------


def _suggest(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v: Any, where: str, what: str) -> float:
    if not _is_number(v) or not math.isfinite(v):
        raise ConfigError(f"{where}: {what} must be a finite number, got {v!r}")
    return float(v)


def _check_keys(opts: Mapping[str, Any], allowed: Sequence[str], where: str, what: str) -> None:
    for key in opts:
        if key not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise ConfigError(
                f"{where}: unknown key {key!r} for {what}{_suggest(str(key), allowed)}; "
                f"known: {known}"
            )


def _build_post(spec: Any, where: str) -> list[PostOp]:
    if spec is None:
        return []
    if not isinstance(spec, list):
        raise ConfigError(
            f"{where}: post must be a list such as [{{clip: [-1, 1]}}, {{scale: {{mul: 2}}}}]"
        )
    ops: list[PostOp] = []
    for i, item in enumerate(spec):
        at = f"{where}[{i}]"
        if isinstance(item, str):
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(
                f"{at}: a post-processor is one key: {{clip: [LO, HI]}}, "
                "{scale: {mul: M, add: A}} or {ema_normalize: {decay: D}}"
            )
        ((kind, opts),) = item.items()
        if kind == "clip":
            if not isinstance(opts, list | tuple) or len(opts) != 2:
                raise ConfigError(f"{at}.clip: write [LO, HI] (null for an open side)")
            lo = -math.inf if opts[0] is None else opts[0]
            hi = math.inf if opts[1] is None else opts[1]
            for v in (lo, hi):
                if not _is_number(v) or math.isnan(v):
                    raise ConfigError(f"{at}.clip: bounds must be numbers or null, got {v!r}")
            if lo > hi:
                raise ConfigError(f"{at}.clip: LO {lo} > HI {hi}; write [LO, HI] with LO <= HI")
            ops.append(Clip(float(lo), float(hi), at))
        elif kind == "scale":
            opts = {} if opts is None else opts
            if not isinstance(opts, dict):
                raise ConfigError(f"{at}.scale: write {{mul: M, add: A}}")
            _check_keys(opts, ("add", "mul"), f"{at}.scale", "scale")
            mul = _finite(opts.get("mul", 1.0), f"{at}.scale.mul", "mul")
            add = _finite(opts.get("add", 0.0), f"{at}.scale.add", "add")
            ops.append(Scale(mul, add, at))
        elif kind == "ema_normalize":
            opts = {} if opts is None else opts
            if not isinstance(opts, dict):
                raise ConfigError(f"{at}.ema_normalize: write {{decay: D, eps: E}}")
            _check_keys(opts, ("decay", "eps"), f"{at}.ema_normalize", "ema_normalize")
            decay = opts.get("decay", 0.99)
            if not _is_number(decay) or not 0.0 < decay < 1.0:
                raise ConfigError(
                    f"{at}.ema_normalize.decay: {decay!r} is not in (0, 1); e.g. decay: 0.99"
                )
            eps = opts.get("eps", 1e-8)
            if not _is_number(eps) or not 0.0 < eps < math.inf:
                raise ConfigError(
                    f"{at}.ema_normalize.eps: {eps!r} must be a positive number, e.g. 1e-8"
                )
            ops.append(EmaNormalize(float(decay), float(eps), at))
        else:
            raise ConfigError(
                f"{at}: unknown post-processor {kind!r}{_suggest(str(kind), POST_PROCESSORS)}; "
                f"known: {', '.join(POST_PROCESSORS)}"
            )
    return ops


def _import_function(target: Any, where: str) -> Callable[[RewardInput], float]:
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ConfigError(f"{where}: write the function as 'module:function', got {target!r}")
    module_name, attr = target.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # any error while importing user code, reported on one line
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"{where}: cannot import module {module_name!r} ({type(e).__name__}: {detail}); "
            "check the module is on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {target!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(
            f"{where}: {target!r} is a {type(obj).__name__}, not a function "
            "fn(sample: RewardInput) -> float"
        )
    return obj


def _normalise_spec(spec: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(type, options including name/post) of any of the accepted forms of a REWARD."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(
            f"{where}: a reward is a leaf name (e.g. success) or a mapping "
            f"such as {{type: weighted_sum, components: [...]}}, got {spec!r}"
        )
    if "type" in spec:
        opts = {k: v for k, v in spec.items() if k != "type"}
        return spec["type"], opts
    keys = [k for k in spec if k not in _NODE_KEYS]
    if len(keys) != 1:
        raise ConfigError(
            f"{where}: give the reward's type, e.g. {{type: format, pattern: ...}} or "
            f"{{format: {{pattern: ...}}}}; got keys {', '.join(map(str, spec))}"
        )
    kind = keys[0]
    inner = spec[kind]
    opts = {k: v for k, v in spec.items() if k != kind}
    if inner is None:
        pass
    elif isinstance(inner, dict):
        for k, v in inner.items():
            if k in opts:
                raise ConfigError(f"{where}: {k!r} given twice")
            opts[k] = v
    elif kind == "python":
        opts["function"] = inner
    elif kind == "column":
        opts["column"] = inner
    else:
        raise ConfigError(f"{where}.{kind}: options must be a mapping, got {inner!r}")
    return kind, opts


def _build(spec: Any, where: str) -> RewardNode:
    kind, opts = _normalise_spec(spec, where)
    name = opts.pop("name", None)
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[\w.\-]+", name)):
        raise ConfigError(f"{where}.name: {name!r} must be a word (letters, digits, _ . -)")
    post = _build_post(opts.pop("post", None), f"{where}.post")
    if not isinstance(kind, str) or kind not in LEAVES + COMBINATORS:
        raise ConfigError(
            f"{where}: unknown leaf {kind!r}{_suggest(str(kind), LEAVES + COMBINATORS)}; "
            f"known: {', '.join(LEAVES)}; combinator: {', '.join(COMBINATORS)}"
        )
    allowed = {
        "weighted_sum": ("components",),
        "bleu": ("lowercase", "smooth_method", "tokenize"),
        "rouge_l": ("use_stemmer",),
        "length": ("unit",),
        "format": ("full", "pattern"),
        "python": ("function",),
        "column": ("column",),
    }.get(kind, ())
    _check_keys(opts, allowed, where, kind)

    if kind == "weighted_sum":
        comps = opts.get("components")
        if not isinstance(comps, list) or not comps:
            raise ConfigError(
                f"{where}.components: give a non-empty list of {{weight: W, reward: REWARD}}"
            )
        weights, children = [], []
        for i, comp in enumerate(comps):
            at = f"{where}.components[{i}]"
            if not isinstance(comp, dict) or "reward" not in comp or "weight" not in comp:
                raise ConfigError(f"{at}: write {{weight: W, reward: REWARD}}, got {comp!r}")
            _check_keys(comp, ("name", "reward", "weight"), at, "a component")
            weights.append(_finite(comp["weight"], f"{at}.weight", "weight"))
            child = _build(comp["reward"], f"{at}.reward")
            if "name" in comp:
                if child.given_name is not None and child.given_name != comp["name"]:
                    raise ConfigError(f"{at}.name: the reward below is already named")
                child_name = comp["name"]
                if not isinstance(child_name, str) or not re.fullmatch(r"[\w.\-]+", child_name):
                    raise ConfigError(
                        f"{at}.name: {child_name!r} must be a word (letters, digits, _ . -)"
                    )
                child.given_name = child.name = child_name
            children.append(child)
        return WeightedSum(where, name, post, weights, children)
    if kind == "env_return":
        return EnvReturn(where, name, post)
    if kind == "success":
        return Success(where, name, post)
    if kind == "exact_match":
        return ExactMatch(where, name, post)
    if kind == "token_f1":
        return TokenF1(where, name, post)
    if kind == "bleu":
        return _build_bleu(where, name, post, opts)
    if kind == "rouge_l":
        stem = opts.get("use_stemmer", False)
        if not isinstance(stem, bool):
            raise ConfigError(f"{where}.use_stemmer: write true or false, got {stem!r}")
        return RougeL(where, name, post, stem)
    if kind == "length":
        unit = opts.get("unit", "tokens")
        if unit not in LENGTH_UNITS:
            raise ConfigError(
                f"{where}.unit: unknown unit {unit!r}{_suggest(str(unit), LENGTH_UNITS)}; "
                f"known: {', '.join(LENGTH_UNITS)}"
            )
        return Length(where, name, post, unit)
    if kind == "format":
        pattern, full = opts.get("pattern"), opts.get("full", False)
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}.pattern: give a regex, e.g. pattern: '<action>.+</action>'")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}.pattern: invalid regex {pattern!r}: {e}") from None
        if not isinstance(full, bool):
            raise ConfigError(f"{where}.full: write true or false, got {full!r}")
        return Format(where, name, post, pattern, full)
    if kind == "python":
        if "function" not in opts:
            raise ConfigError(f"{where}: give function: 'module:function'")
        fn = _import_function(opts["function"], f"{where}.function")
        return Python(where, name, post, opts["function"], fn)
    # column
    column = opts.get("column", name)
    if not isinstance(column, str) or not column:
        raise ConfigError(f"{where}: give the column, e.g. {{type: column, name: reward_env}}")
    return Column(where, name, post, column)


def _build_bleu(where: str, name: str | None, post: Sequence[PostOp], opts: dict) -> Bleu:
    from sacrebleu.metrics import BLEU

    tokenize = opts.get("tokenize", "13a")
    smooth = opts.get("smooth_method", "exp")
    lowercase = opts.get("lowercase", False)
    tokenizers = sorted(BLEU.TOKENIZERS)
    if tokenize not in tokenizers:
        raise ConfigError(
            f"{where}.tokenize: unknown tokenizer {tokenize!r}{_suggest(str(tokenize), tokenizers)}; "
            f"known: {', '.join(tokenizers)}"
        )
    smooths = sorted(BLEU.SMOOTH_DEFAULTS)
    if smooth not in smooths:
        raise ConfigError(
            f"{where}.smooth_method: unknown method {smooth!r}; known: {', '.join(smooths)}"
        )
    if not isinstance(lowercase, bool):
        raise ConfigError(f"{where}.lowercase: write true or false, got {lowercase!r}")
    try:
        return Bleu(where, name, post, tokenize, smooth, lowercase)
    except Exception as e:  # a tokenizer whose own dependency is missing (mecab, spm, ...)
        raise ConfigError(
            f"{where}.tokenize: sacrebleu cannot use {tokenize!r} here ({type(e).__name__}: {e})"
        ) from None


def _assign_names(root: RewardNode) -> None:
    nodes = list(root.nodes())
    given: dict[str, str] = {}
    for node in nodes:
        if node.given_name is not None:
            if node.given_name in given:
                raise ConfigError(
                    f"{node.path}: name {node.given_name!r} is also the name of "
                    f"{given[node.given_name]}; names must be unique"
                )
            given[node.given_name] = node.path
    unnamed = [n for n in nodes if n.given_name is None]
    defaults = [
        "total" if n is root and isinstance(n, WeightedSum) else n._default_name() for n in unnamed
    ]
    taken = set(given)
    counts = {d: defaults.count(d) for d in defaults}
    seen: dict[str, int] = {}
    for node, default in zip(unnamed, defaults, strict=True):
        if counts[default] == 1 and default not in taken:
            node.name = default
        else:
            k = seen.get(default, 0)
            while True:
                k += 1
                candidate = f"{default}_{k}"
                if candidate not in taken and candidate not in counts:
                    break
            seen[default] = k
            node.name = candidate
        taken.add(node.name)


def build_reward(spec: Any, where: str = "reward") -> RewardNode:
    """Build a reward tree from its YAML form (see the module docstring for the grammar).

    ``where`` is the spec's path in its file, the prefix of every error message, e.g.
    ``"configs/agent-sft-ppo.yaml: stages.1.reward"``. Raises
    :class:`~trainer.config.ConfigError` with one line naming the faulty node's path.
    """
    root = _build(spec, where)
    _assign_names(root)
    return root


def relabel(node: RewardNode, columns: Mapping[str, np.ndarray], update: bool = True) -> np.ndarray:
    """The reward of each transition (N,) float64, computed from named reward columns.

    ``columns`` maps a store's reward column names to (N,) arrays; every leaf of ``node``
    must be a ``column`` leaf. No store is changed; the tree's ``ema_normalize`` state is
    advanced by one batch unless ``update`` is false. Raises ConfigError for a leaf that
    is not a column or a column that ``columns`` lacks.
    """
    for sub in node.nodes():
        if isinstance(sub, Leaf) and not isinstance(sub, Column):
            raise ConfigError(
                f"{sub.path}: leaf {sub.kind!r} cannot relabel a transition store; "
                "use {type: column, name: COL}"
            )
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    lengths = {k: a.shape for k, a in arrays.items()}
    shapes = set(lengths.values())
    if len(shapes) > 1 or any(len(s) != 1 for s in shapes):
        raise ValueError(f"relabel: reward columns must be 1-D of one length, got {lengths}")
    return node.evaluate_columns(arrays, update=update)[0]
