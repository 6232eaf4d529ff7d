"""The spec schema: what a YAML file in ``data_specs/`` may say, checked on load.

A spec tells ``pipeline.build`` where every field of a step sits in the user's JSONL
and how to turn it into a store. Every error names the key and the fix, e.g.::

    data_specs/x.yaml: fields.action.n: must be an integer >= 1 (the number of discrete actions), got 0

Two kinds of spec share this module: ``kind: transitions`` (trajectory logs) and
``kind: segments`` (QA documents). The resolved form (``to_dict``) is what a store's
manifest records and hashes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SPEC_DIR = Path(__file__).resolve().parent


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file, the key and the fix."""


# --------------------------------------------------------------------------- helpers


class _Ctx:
    """Where we are in the YAML, to name it in errors."""

    def __init__(self, origin: str, key: str = "") -> None:
        self.origin = origin
        self.key = key

    def child(self, key: str | int) -> _Ctx:
        k = str(key)
        return _Ctx(self.origin, f"{self.key}.{k}" if self.key else k)

    def fail(self, msg: str) -> SpecError:
        where = f"{self.key}: " if self.key else ""
        return SpecError(f"{self.origin}: {where}{msg}")


def _mapping(value: Any, ctx: _Ctx, allowed: set[str], required: set[str] = frozenset()) -> dict:  # type: ignore[assignment]
    if not isinstance(value, Mapping):
        raise ctx.fail(f"must be a mapping (key: value), got {type(value).__name__}")
    unknown = sorted((k for k in value if k not in allowed), key=str)
    if unknown:
        raise ctx.fail(f"unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}")
    for key in sorted(required):
        if key not in value:
            raise ctx.fail(f"missing required key {key!r}")
    return dict(value)


def _str(value: Any, ctx: _Ctx, what: str = "a string") -> str:
    if not isinstance(value, str) or not value:
        raise ctx.fail(f"must be {what}, got {value!r}")
    return value


def _int(value: Any, ctx: _Ctx, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ctx.fail(f"must be an integer >= {minimum} ({what}), got {value!r}")
    return value


def _float(value: Any, ctx: _Ctx, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ctx.fail(f"must be a number ({what}), got {value!r}")
    return float(value)


def _str_list(value: Any, ctx: _Ctx, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ctx.fail(f"must be a non-empty list of {what}, got {value!r}")
    return tuple(_str(v, ctx.child(i)) for i, v in enumerate(value))


def _path(value: Any, ctx: _Ctx) -> str:
    p = _str(value, ctx, "a dotted field path such as `obs` or `info.state`")
    if any(not part for part in p.split(".")):
        raise ctx.fail(f"{p!r} is not a dotted path: empty part between dots")
    return p


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class ObsKey:
    """One named piece of a dict observation: a scalar (size None) or a list of ``size`` numbers."""

    path: str  # dotted, relative to the observation dict
    size: int | None = None  # None: a scalar; an int: a fixed-length list

    @property
    def width(self) -> int:
        return 1 if self.size is None else self.size


@dataclass(frozen=True)
class ObservationSpec:
    """Where the observation is and how it is flattened into one float vector."""

    path: str  # dotted path relative to a step
    keys: tuple[ObsKey, ...] | None = None  # a dict flattened in this order; None: a list or scalar
    size: int | None = None  # list observations: its length (None: inferred from the first record)
    scalar: bool = False  # true: the value is a single number

    @property
    def dim(self) -> int | None:
        if self.keys is not None:
            return sum(k.width for k in self.keys)
        if self.scalar:
            return 1
        return self.size


@dataclass(frozen=True)
class CompositeCase:
    """One branch of a composite action: index = offset + value, value in [0, n)."""

    offset: int
    n: int


@dataclass(frozen=True)
class CompositeSpec:
    """Several fields mapped to one discrete index by a declared rule.

    ``select`` picks the branch (e.g. ``action_type``), ``value`` the index inside it
    (e.g. ``action_target``); branch ``k`` maps ``value`` to ``cases[k].offset + value``.
    """

    select: str
    value: str
    cases: tuple[tuple[int, CompositeCase], ...]


@dataclass(frozen=True)
class ActionSpec:
    type: Literal["discrete", "continuous"]
    path: str | None = None  # None only for composite actions
    n: int | None = None  # discrete: number of actions
    size: int | None = None  # continuous: action dimension
    low: tuple[float, ...] | None = None  # continuous: per-dimension lower bound
    high: tuple[float, ...] | None = None
    composite: CompositeSpec | None = None


@dataclass(frozen=True)
class FieldPath:
    path: str


@dataclass(frozen=True)
class EndSpec:
    """An episode-level end reason: a string field mapped to terminated / truncated."""

    path: str
    terminated: tuple[str, ...]
    truncated: tuple[str, ...]


# A named reward column: a word that is not `reward` (the main reward's name in relabelling).
REWARD_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
REWARD_COLUMN_PREFIX = "reward_"  # named reward NAME is the store column reward_NAME


def reward_column(name: str) -> str:
    """The store column of the named reward ``name`` (``reward_NAME``)."""
    return f"{REWARD_COLUMN_PREFIX}{name}"


@dataclass(frozen=True)
class FieldsSpec:
    observation: ObservationSpec
    action: ActionSpec
    reward: FieldPath
    terminated: FieldPath | None = None
    truncated: FieldPath | None = None
    end: EndSpec | None = None
    final_observation: FieldPath | None = None
    # Named extra per-step rewards, (NAME, field) in the spec's order: each is stored as the
    # float32 column reward_NAME, beside `reward` (for relabelling at training time).
    rewards: tuple[tuple[str, FieldPath], ...] = ()


@dataclass(frozen=True)
class SourceSpec:
    paths: tuple[str, ...]  # globs, relative to the working directory
    layout: Literal["step_per_line", "episode_per_line"] = "step_per_line"
    episode_key: str = "episode"
    step_key: str | None = None  # step_per_line: order within the episode
    steps_key: str | None = None  # episode_per_line: the list of steps
    # "jsonl": trajectory logs, one record per line; "minari": Minari dataset directories
    # (or dataset ids under MINARI_DATASETS_PATH), whose spaces give the fields
    format: Literal["jsonl", "minari"] = "jsonl"
    # minari: a Dict observation's keys, flattened in this order (None: the dataset's order)
    observation_keys: tuple[str, ...] | None = None


# `store.part_rows: auto`: a store of more transitions than this is written in parts of
# this many rows (pipeline/transitions/layout.py); a smaller one stays one file.
AUTO_PART_ROWS = 1 << 20


@dataclass(frozen=True)
class StoreSpec:
    format: Literal["arrow", "zarr"] = "arrow"
    discount: float = 0.99  # for return_to_go
    # arrow only: write transitions/part-NNNNN.arrow of at most this many rows each instead
    # of transitions.arrow; "auto": parts of AUTO_PART_ROWS once the store holds more
    # transitions than that; None (the default): one file
    part_rows: int | Literal["auto"] | None = None

    def rows_per_part(self, transitions: int) -> int | None:
        """Rows per part file for a store of ``transitions`` rows; None: one file."""
        if self.part_rows == "auto":
            return AUTO_PART_ROWS if transitions > AUTO_PART_ROWS else None
        return self.part_rows


@dataclass(frozen=True)
class EnvSpec:
    id: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    max_episode_steps: int | None = None


@dataclass(frozen=True)
class ReferenceReturns:
    """Average returns used for normalized scores: 100 * (R - random) / (expert - random)."""

    random: float
    expert: float
    behaviour: float | None = None


@dataclass(frozen=True)
class TransitionSpec:
    name: str
    source: SourceSpec
    fields: FieldsSpec
    store: StoreSpec = field(default_factory=StoreSpec)
    env: EnvSpec | None = None
    reference_returns: ReferenceReturns | None = None
    description: str = ""
    license: str | None = None  # the data's license (an SPDX id such as cc-by-4.0), for exports
    kind: Literal["transitions"] = "transitions"
    origin: str = field(default="<spec>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("origin")
        rewards = d["fields"].pop("rewards")
        if rewards:  # absent when empty: a spec without `rewards` hashes as it always has
            d["fields"]["rewards"] = {name: dict(fp) for name, fp in rewards}
        if d["store"]["part_rows"] is None:  # likewise: a one-file store's spec is unchanged
            del d["store"]["part_rows"]
        if d["source"]["format"] == "jsonl":  # and a log's spec, from before Minari sources
            del d["source"]["format"]
        if d["source"]["observation_keys"] is None:
            del d["source"]["observation_keys"]
        _drop_absent_license(d)
        return _jsonable(d)

    def sha256(self) -> str:
        return spec_hash(self.to_dict())


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def spec_hash(d: Mapping[str, Any]) -> str:
    blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- parsing


def _parse_obs_key(value: Any, ctx: _Ctx) -> ObsKey:
    if isinstance(value, str):
        return ObsKey(_path(value, ctx))
    if isinstance(value, Mapping) and len(value) == 1:
        ((name, size),) = value.items()
        return ObsKey(_path(name, ctx), _int(size, ctx.child(name), 1, "the length of this list"))
    raise ctx.fail(
        f"must be a key name (a scalar) or `{{name: N}}` (a list of N numbers), got {value!r}"
    )


def _parse_observation(value: Any, ctx: _Ctx) -> ObservationSpec:
    if isinstance(value, str):
        value = {"path": value}
    d = _mapping(value, ctx, {"path", "keys", "shape", "scalar"}, {"path"})
    path = _path(d["path"], ctx.child("path"))
    if "keys" in d:
        if "shape" in d or d.get("scalar"):
            raise ctx.fail("give either `keys` (a dict observation) or `shape`/`scalar`, not both")
        raw = d["keys"]
        if not isinstance(raw, list) or not raw:
            raise ctx.child("keys").fail("must be a non-empty list of key names, e.g. [cos, sin]")
        keys = tuple(_parse_obs_key(k, ctx.child("keys").child(i)) for i, k in enumerate(raw))
        names = [k.path for k in keys]
        if len(set(names)) != len(names):
            raise ctx.child("keys").fail("lists a key twice")
        return ObservationSpec(path=path, keys=keys)
    scalar = bool(d.get("scalar", False))
    size = None
    if "shape" in d:
        shape = d["shape"]
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = [shape]
        if not isinstance(shape, list) or len(shape) != 1:
            raise ctx.child("shape").fail("must be a one-element list such as [3]")
        size = _int(shape[0], ctx.child("shape").child(0), 1, "the observation length")
    return ObservationSpec(path=path, size=size, scalar=scalar)


def _bounds(value: Any, size: int, ctx: _Ctx) -> tuple[float, ...]:
    if isinstance(value, list):
        if len(value) != size:
            raise ctx.fail(f"has {len(value)} values, the action has {size} dimensions (shape)")
        return tuple(_float(v, ctx.child(i), "a bound") for i, v in enumerate(value))
    return (_float(value, ctx, "a bound"),) * size


def _parse_action(value: Any, ctx: _Ctx) -> ActionSpec:
    d = _mapping(value, ctx, {"path", "type", "n", "shape", "low", "high", "composite"}, {"type"})
    kind = d["type"]
    if kind == "discrete":
        if "shape" in d or "low" in d or "high" in d:
            raise ctx.fail("discrete actions take `n`, not shape/low/high")
        n = _int(d.get("n"), ctx.child("n"), 1, "the number of discrete actions")
        composite = None
        if "composite" in d:
            composite = _parse_composite(d["composite"], ctx.child("composite"), n)
            if "path" in d:
                raise ctx.fail("a composite action takes its fields from `composite`, drop `path`")
            return ActionSpec(type="discrete", n=n, composite=composite)
        if "path" not in d:
            raise ctx.fail("missing required key 'path' (or a `composite` rule)")
        return ActionSpec(type="discrete", path=_path(d["path"], ctx.child("path")), n=n)
    if kind == "continuous":
        if "n" in d or "composite" in d:
            raise ctx.fail("continuous actions take shape/low/high, not n/composite")
        if "path" not in d:
            raise ctx.fail("missing required key 'path'")
        shape = d.get("shape")
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = [shape]
        if not isinstance(shape, list) or len(shape) != 1:
            raise ctx.child("shape").fail("must be a one-element list such as [6]")
        size = _int(shape[0], ctx.child("shape").child(0), 1, "the action dimension")
        low = _bounds(d["low"], size, ctx.child("low")) if "low" in d else (float("-inf"),) * size
        high = (
            _bounds(d["high"], size, ctx.child("high")) if "high" in d else (float("inf"),) * size
        )
        for i, (lo, hi) in enumerate(zip(low, high)):
            if not lo < hi:
                raise ctx.fail(f"dimension {i}: low ({lo}) must be below high ({hi})")
        return ActionSpec(
            type="continuous",
            path=_path(d["path"], ctx.child("path")),
            size=size,
            low=low,
            high=high,
        )
    raise ctx.child("type").fail(f"must be `discrete` or `continuous`, got {kind!r}")


def _parse_composite(value: Any, ctx: _Ctx, n: int) -> CompositeSpec:
    d = _mapping(value, ctx, {"select", "value", "cases"}, {"select", "value", "cases"})
    raw = d["cases"]
    if not isinstance(raw, Mapping) or not raw:
        raise ctx.child("cases").fail(
            "must map each value of `select` to {offset, n}, e.g. {0: {offset: 0, n: 4}}"
        )
    cases: list[tuple[int, CompositeCase]] = []
    covered: list[int] = []
    for k, v in raw.items():
        cctx = ctx.child("cases").child(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise cctx.fail("case keys must be integers (values of the `select` field)")
        cd = _mapping(v, cctx, {"offset", "n"}, {"offset", "n"})
        case = CompositeCase(
            _int(cd["offset"], cctx.child("offset"), 0, "first index of this branch"),
            _int(cd["n"], cctx.child("n"), 1, "number of values in this branch"),
        )
        if case.offset + case.n > n:
            raise cctx.fail(
                f"maps to indices {case.offset}..{case.offset + case.n - 1}, beyond action n={n}"
            )
        covered.extend(range(case.offset, case.offset + case.n))
        cases.append((k, case))
    if len(set(covered)) != len(covered):
        raise ctx.child("cases").fail("two branches map to the same index; give disjoint offsets")
    return CompositeSpec(
        select=_path(d["select"], ctx.child("select")),
        value=_path(d["value"], ctx.child("value")),
        cases=tuple(sorted(cases)),
    )


def _parse_field(value: Any, ctx: _Ctx) -> FieldPath:
    if isinstance(value, str):
        return FieldPath(_path(value, ctx))
    d = _mapping(value, ctx, {"path"}, {"path"})
    return FieldPath(_path(d["path"], ctx.child("path")))


def _parse_end(value: Any, ctx: _Ctx) -> EndSpec:
    d = _mapping(value, ctx, {"path", "terminated", "truncated"}, {"path"})
    term = _str_list(d.get("terminated", ["terminated"]), ctx.child("terminated"), "end reasons")
    trunc = _str_list(d.get("truncated", ["truncated"]), ctx.child("truncated"), "end reasons")
    both = set(term) & set(trunc)
    if both:
        raise ctx.fail(f"end reason {sorted(both)[0]!r} is listed as both terminated and truncated")
    return EndSpec(_path(d["path"], ctx.child("path")), term, trunc)


def _parse_rewards(value: Any, ctx: _Ctx) -> tuple[tuple[str, FieldPath], ...]:
    """``{NAME: {path: FIELD}, ...}`` (or ``{NAME: FIELD}``): the named reward columns."""
    if not isinstance(value, Mapping) or not value:
        raise ctx.fail(
            "must map a reward name to its field, e.g. {shaped: {path: info.shaped_reward}}"
        )
    out: list[tuple[str, FieldPath]] = []
    for name, field_value in value.items():
        if not isinstance(name, str) or not REWARD_NAME_RE.match(name):
            raise ctx.fail(
                f"reward name {name!r} must be a word (a letter, then letters, digits or _): "
                f"it names the store column reward_NAME"
            )
        if name == "reward":
            raise ctx.child(name).fail(
                "`reward` is the main reward (fields.reward); give this one another name"
            )
        out.append((name, _parse_field(field_value, ctx.child(name))))
    return tuple(out)


def _parse_fields(value: Any, ctx: _Ctx) -> FieldsSpec:
    allowed = {
        "observation",
        "action",
        "reward",
        "rewards",
        "terminated",
        "truncated",
        "end",
        "final_observation",
    }
    d = _mapping(value, ctx, allowed, {"observation", "action", "reward"})
    end = _parse_end(d["end"], ctx.child("end")) if "end" in d else None
    if end is not None and ("terminated" in d or "truncated" in d):
        raise ctx.fail(
            "give the end of an episode either per step (terminated/truncated) or as `end`, not both"
        )
    return FieldsSpec(
        observation=_parse_observation(d["observation"], ctx.child("observation")),
        action=_parse_action(d["action"], ctx.child("action")),
        reward=_parse_field(d["reward"], ctx.child("reward")),
        terminated=_parse_field(d["terminated"], ctx.child("terminated"))
        if "terminated" in d
        else None,
        truncated=_parse_field(d["truncated"], ctx.child("truncated"))
        if "truncated" in d
        else None,
        end=end,
        final_observation=(
            _parse_field(d["final_observation"], ctx.child("final_observation"))
            if "final_observation" in d
            else None
        ),
        rewards=_parse_rewards(d["rewards"], ctx.child("rewards")) if "rewards" in d else (),
    )


def _parse_source(value: Any, ctx: _Ctx) -> SourceSpec:
    keys = {"paths", "layout", "episode_key", "step_key", "steps_key", "format", "observation_keys"}
    d = _mapping(value, ctx, keys, {"paths"})
    fmt = d.get("format", "jsonl")
    if fmt not in ("jsonl", "minari"):
        raise ctx.child("format").fail(
            f"must be `jsonl` (trajectory logs) or `minari` (Minari datasets), got {fmt!r}"
        )
    paths = _str_list(d["paths"], ctx.child("paths"), "file globs")
    if fmt == "minari":
        other = sorted(k for k in d if k not in ("paths", "format", "observation_keys"))
        if other:
            raise ctx.child(other[0]).fail(
                "a Minari source has its own layout; give `paths` (dataset directories or ids) "
                "and, for a Dict observation, `observation_keys`"
            )
        obs_keys = None
        if "observation_keys" in d:
            obs_keys = _str_list(
                d["observation_keys"], ctx.child("observation_keys"), "observation keys"
            )
        # the layout of the steps the build makes of each Minari episode
        return SourceSpec(
            paths, "episode_per_line", "id", steps_key="steps", format="minari",
            observation_keys=obs_keys,
        )  # fmt: skip
    if "observation_keys" in d:
        raise ctx.child("observation_keys").fail(
            "is for Minari sources (format: minari); a log's dict observation takes "
            "fields.observation.keys"
        )
    layout = d.get("layout", "step_per_line")
    if layout not in ("step_per_line", "episode_per_line"):
        raise ctx.child("layout").fail(
            f"must be `step_per_line` or `episode_per_line`, got {layout!r}"
        )
    episode_key = _path(d.get("episode_key", "episode"), ctx.child("episode_key"))
    if layout == "step_per_line":
        if "steps_key" in d:
            raise ctx.fail("`steps_key` is for layout episode_per_line; use `step_key` here")
        if "step_key" not in d:
            raise ctx.fail("layout step_per_line needs `step_key` (the field that orders steps)")
        return SourceSpec(
            paths, layout, episode_key, step_key=_path(d["step_key"], ctx.child("step_key"))
        )
    if "step_key" in d:
        raise ctx.fail("`step_key` is for layout step_per_line; use `steps_key` here")
    steps_key = _path(d.get("steps_key", "steps"), ctx.child("steps_key"))
    return SourceSpec(paths, layout, episode_key, steps_key=steps_key)


# The fields of a Minari source until the build reads the dataset's spaces
# (pipeline.interchange.minari_import.resolve_spec fills in shapes, action type and bounds).
MINARI_FIELDS = FieldsSpec(
    observation=ObservationSpec(path="observations"),
    action=ActionSpec(type="continuous", path="actions"),
    reward=FieldPath("rewards"),
    terminated=FieldPath("terminations"),
    truncated=FieldPath("truncations"),
)


def _parse_store(value: Any, ctx: _Ctx) -> StoreSpec:
    d = _mapping(value, ctx, {"format", "discount", "part_rows"})
    fmt = d.get("format", "arrow")
    if fmt not in ("arrow", "zarr"):
        raise ctx.child("format").fail(f"must be `arrow` or `zarr`, got {fmt!r}")
    discount = _float(d.get("discount", 0.99), ctx.child("discount"), "the discount factor")
    if not 0.0 <= discount <= 1.0:
        raise ctx.child("discount").fail(f"must be in [0, 1], got {discount}")
    part_rows = d.get("part_rows")
    if part_rows is not None:
        where = ctx.child("part_rows")
        if fmt != "arrow":
            raise where.fail(
                f"parts are written for store.format `arrow` only, not {fmt!r}; remove "
                "part_rows (a zarr store is chunked already)"
            )
        whole = isinstance(part_rows, int) and not isinstance(part_rows, bool)
        if part_rows != "auto" and not (whole and part_rows >= 1):
            raise where.fail(
                "must be an integer >= 1 (transitions per part file) or `auto` (parts of "
                f"{AUTO_PART_ROWS} rows above that many transitions), got {part_rows!r}"
            )
    return StoreSpec(format=fmt, discount=discount, part_rows=part_rows)


def _parse_env(value: Any, ctx: _Ctx) -> EnvSpec:
    d = _mapping(value, ctx, {"id", "kwargs", "max_episode_steps"}, {"id"})
    kwargs = d.get("kwargs", {}) or {}
    if not isinstance(kwargs, Mapping):
        raise ctx.child("kwargs").fail("must be a mapping of keyword arguments for gymnasium.make")
    mes = d.get("max_episode_steps")
    return EnvSpec(
        id=_str(d["id"], ctx.child("id"), "a gymnasium id such as Pendulum-v1"),
        kwargs=tuple(sorted(kwargs.items())),
        max_episode_steps=None
        if mes is None
        else _int(mes, ctx.child("max_episode_steps"), 1, "steps"),
    )


def _parse_refs(value: Any, ctx: _Ctx) -> ReferenceReturns:
    d = _mapping(value, ctx, {"random", "expert", "behaviour"}, {"random", "expert"})
    r = ReferenceReturns(
        random=_float(d["random"], ctx.child("random"), "average return of a random policy"),
        expert=_float(d["expert"], ctx.child("expert"), "average return of an expert"),
        behaviour=(
            _float(d["behaviour"], ctx.child("behaviour"), "average return in the data")
            if d.get("behaviour") is not None
            else None
        ),
    )
    if r.expert == r.random:
        raise ctx.fail("expert and random returns must differ (they scale normalized scores)")
    return r


def parse_transition_spec(raw: Any, origin: str = "<spec>") -> TransitionSpec:
    ctx = _Ctx(origin)
    allowed = {
        "name",
        "kind",
        "source",
        "fields",
        "store",
        "env",
        "reference_returns",
        "description",
        "license",
    }
    d = _mapping(raw, ctx, allowed, {"name", "source"})
    name = _str(d["name"], ctx.child("name"), "a store name")
    if "/" in name or name.startswith("."):
        raise ctx.child("name").fail(f"{name!r} is used as a directory name: no '/' or leading '.'")
    if d.get("kind", "transitions") != "transitions":
        raise ctx.child("kind").fail("must be `transitions` here")
    source = _parse_source(d["source"], ctx.child("source"))
    if source.format == "minari":
        if "fields" in d:
            raise ctx.child("fields").fail(
                "a Minari source brings its fields (observations, actions, rewards, "
                "terminations, truncations); remove `fields`"
            )
        fields = MINARI_FIELDS
    elif "fields" not in d:
        raise ctx.fail("missing required key 'fields'")
    else:
        fields = _parse_fields(d["fields"], ctx.child("fields"))
    return TransitionSpec(
        name=name,
        source=source,
        fields=fields,
        store=_parse_store(d.get("store", {}), ctx.child("store")),
        env=_parse_env(d["env"], ctx.child("env")) if d.get("env") else None,
        reference_returns=(
            _parse_refs(d["reference_returns"], ctx.child("reference_returns"))
            if d.get("reference_returns")
            else None
        ),
        description=str(d.get("description", "")),
        license=parse_license(d, ctx),
        origin=origin,
    )


def parse_license(d: Mapping[str, Any], ctx: _Ctx) -> str | None:
    """The spec's optional ``license``: the data's license, named as exports carry it (an
    SPDX id such as ``cc-by-4.0``, or ``other``)."""
    if d.get("license") is None:
        return None
    return _str(d["license"], ctx.child("license"), "a license id such as cc-by-4.0")


def _drop_absent_license(d: dict[str, Any]) -> None:
    """A spec without a license hashes as it did before specs had one."""
    if d.get("license") is None:
        d.pop("license", None)


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{p}: no such spec file") from None
    except OSError as e:
        raise SpecError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{p}: not UTF-8 text (byte {e.start}); save the spec as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{p}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None


def load_spec(path: str | Path) -> TransitionSpec:
    """Load and check a transition spec (``kind: transitions``)."""
    raw = read_yaml(path)
    return parse_transition_spec(raw, origin=str(path))


def spec_kind(
    path: str | Path, known: Iterable[str] = ("transitions", "segments", "sequences")
) -> str:
    """The spec's ``kind`` (default ``transitions``); SpecError unless it is one of ``known``."""
    raw = read_yaml(path)
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: a spec must be a YAML mapping")
    kind = raw.get("kind", "transitions")
    names = sorted(known)
    if kind not in names:
        raise SpecError(
            f"{path}: kind: must be one of {', '.join(f'`{k}`' for k in names)}, got {kind!r}"
        )
    return str(kind)


# --------------------------------------------------------------------------- segments (QA)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 of a trained tokenizer


@dataclass(frozen=True)
class QASourceSpec:
    """Where the QA records are and how they are written."""

    paths: tuple[str, ...]  # globs, relative to the working directory
    format: Literal["squad", "jsonl"] = "squad"  # SQuAD v1.1/v2.0 JSON, or one record per line
    # split name -> fnmatch pattern on the file name (e.g. {train: "train*", dev: "dev*"});
    # empty: every example is in split "train"
    splits: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TokenizerTrainSpec:
    """A WordPiece tokenizer trained on the kept corpus (contexts + questions)."""

    vocab_size: int = 8000  # target size, specials and the character alphabet included
    min_frequency: int = 2  # a merge must be seen at least this often
    lowercase: bool = True  # BERT-style normaliser: lowercase and strip accents


@dataclass(frozen=True)
class TokenizerSpec:
    """Either ``train`` (a tokenizer made from the corpus) or ``path`` (a tokenizer.json)."""

    train: TokenizerTrainSpec | None = None
    path: str | None = None  # relative to the working directory
    cls_token: str = "[CLS]"  # the special tokens the segments are framed with
    sep_token: str = "[SEP]"
    pad_token: str = "[PAD]"


@dataclass(frozen=True)
class SegmentsSpec:
    """How documents are cut into windows.

    Each segment holds up to ``max_tokens`` DOCUMENT tokens; segment ``k`` starts at token
    ``k * stride``. ``stride < max_tokens`` makes consecutive segments overlap by
    ``max_tokens - stride`` tokens; ``stride > max_tokens`` would skip tokens and is refused.
    The question (its first ``max_question_tokens`` tokens) is put in front of every
    segment: ``[CLS] question [SEP] segment [SEP]``, at most
    ``max_question_tokens + max_tokens + 3`` ids.
    """

    max_tokens: int = 128  # document tokens per segment (the window)
    stride: int = 128  # tokens between the starts of consecutive segments
    max_question_tokens: int = 32  # longer questions keep their first tokens

    @property
    def input_width(self) -> int:
        """The longest ``input_ids`` a segment can have."""
        return self.max_question_tokens + self.max_tokens + 3


@dataclass(frozen=True)
class SegmentStoreSpec:
    format: Literal["arrow"] = "arrow"


@dataclass(frozen=True)
class SegmentSpec:
    """A ``kind: segments`` spec: QA documents -> a segment store."""

    name: str
    source: QASourceSpec
    tokenizer: TokenizerSpec
    segments: SegmentsSpec = field(default_factory=SegmentsSpec)
    store: SegmentStoreSpec = field(default_factory=SegmentStoreSpec)
    description: str = ""
    license: str | None = None  # the data's license, for exports
    kind: Literal["segments"] = "segments"
    origin: str = field(default="<spec>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("origin")
        _drop_absent_license(d)
        return _jsonable(d)

    def sha256(self) -> str:
        return spec_hash(self.to_dict())


def _bool(value: Any, ctx: _Ctx, what: str) -> bool:
    if not isinstance(value, bool):
        raise ctx.fail(f"must be true or false ({what}), got {value!r}")
    return value


def _parse_qa_source(value: Any, ctx: _Ctx) -> QASourceSpec:
    d = _mapping(value, ctx, {"paths", "format", "splits"}, {"paths"})
    paths = _str_list(d["paths"], ctx.child("paths"), "file globs")
    fmt = d.get("format", "squad")
    if fmt not in ("squad", "jsonl"):
        raise ctx.child("format").fail(
            f"must be `squad` (SQuAD v1.1/v2.0 JSON files) or `jsonl` (one "
            f"{{id, question, context, answers}} per line), got {fmt!r}"
        )
    splits: list[tuple[str, str]] = []
    raw = d.get("splits")
    if raw is not None:
        sctx = ctx.child("splits")
        if not isinstance(raw, Mapping) or not raw:
            raise sctx.fail(
                "must map a split name to a file-name pattern, e.g. {train: 'train*', dev: 'dev*'}"
            )
        for k, v in raw.items():
            name = _str(k, sctx, "a split name such as train or dev")
            splits.append((name, _str(v, sctx.child(name), "a file-name pattern such as 'dev*'")))
    return QASourceSpec(paths=paths, format=fmt, splits=tuple(splits))


def _parse_tokenizer(value: Any, ctx: _Ctx) -> TokenizerSpec:
    d = _mapping(value, ctx, {"train", "path", "cls_token", "sep_token", "pad_token"})
    if ("train" in d) == ("path" in d):
        raise ctx.fail(
            "give exactly one of `train: {vocab_size: 8000}` (learn a tokenizer from the corpus) "
            "or `path: tokenizer.json` (use a saved HF tokenizer)"
        )
    specials = {
        k: _str(d[k], ctx.child(k), "a token of the tokenizer's vocabulary")
        for k in ("cls_token", "sep_token", "pad_token")
        if k in d
    }
    if "path" in d:
        return TokenizerSpec(
            path=_str(d["path"], ctx.child("path"), "a tokenizer.json path"),
            cls_token=specials.get("cls_token", "[CLS]"),
            sep_token=specials.get("sep_token", "[SEP]"),
            pad_token=specials.get("pad_token", "[PAD]"),
        )
    if specials:
        raise ctx.fail(
            f"{sorted(specials)[0]} is for a loaded tokenizer (`path`); a trained one uses "
            f"{', '.join(SPECIAL_TOKENS)}"
        )
    tctx = ctx.child("train")
    t = _mapping(
        d["train"] if d["train"] is not None else {},
        tctx,
        {"vocab_size", "min_frequency", "lowercase"},
    )
    vocab_size = _int(
        t.get("vocab_size", 8000), tctx.child("vocab_size"), 16, "the vocabulary size"
    )
    min_frequency = _int(
        t.get("min_frequency", 2), tctx.child("min_frequency"), 1, "how often a merge must be seen"
    )
    lowercase = _bool(t.get("lowercase", True), tctx.child("lowercase"), "lowercase the text")
    return TokenizerSpec(train=TokenizerTrainSpec(vocab_size, min_frequency, lowercase))


def _parse_segments(value: Any, ctx: _Ctx) -> SegmentsSpec:
    d = _mapping(value, ctx, {"max_tokens", "stride", "max_question_tokens"})
    max_tokens = _int(
        d.get("max_tokens", 128), ctx.child("max_tokens"), 1, "document tokens per segment"
    )
    stride = _int(
        d.get("stride", max_tokens), ctx.child("stride"), 1, "tokens between segment starts"
    )
    if stride > max_tokens:
        raise ctx.child("stride").fail(
            f"{stride} > max_tokens {max_tokens} would skip {stride - max_tokens} tokens between "
            f"segments; use stride <= max_tokens (equal: no overlap, smaller: overlap)"
        )
    mq = _int(
        d.get("max_question_tokens", 32),
        ctx.child("max_question_tokens"),
        1,
        "question tokens kept",
    )
    return SegmentsSpec(max_tokens=max_tokens, stride=stride, max_question_tokens=mq)


def parse_segment_spec(raw: Any, origin: str = "<spec>") -> SegmentSpec:
    """Check a ``kind: segments`` spec; errors name the key and the fix."""
    ctx = _Ctx(origin)
    allowed = {
        "name", "kind", "source", "tokenizer", "segments", "store", "description", "license",
    }  # fmt: skip
    d = _mapping(raw, ctx, allowed, {"name", "kind", "source"})
    name = _str(d["name"], ctx.child("name"), "a store name")
    if "/" in name or name.startswith("."):
        raise ctx.child("name").fail(f"{name!r} is used as a directory name: no '/' or leading '.'")
    if d["kind"] != "segments":
        raise ctx.child("kind").fail("must be `segments` here")
    tok = d.get("tokenizer", {"train": {}})
    st = _mapping(d.get("store", {}) or {}, ctx.child("store"), {"format"})
    fmt = st.get("format", "arrow")
    if fmt != "arrow":
        raise (
            ctx.child("store")
            .child("format")
            .fail(f"segment stores are written as `arrow` only, got {fmt!r}")
        )
    return SegmentSpec(
        name=name,
        source=_parse_qa_source(d["source"], ctx.child("source")),
        tokenizer=_parse_tokenizer(tok, ctx.child("tokenizer")),
        segments=_parse_segments(d.get("segments", {}) or {}, ctx.child("segments")),
        store=SegmentStoreSpec(format="arrow"),
        description=str(d.get("description", "")),
        license=parse_license(d, ctx),
        origin=origin,
    )


def load_segment_spec(path: str | Path) -> SegmentSpec:
    """Load and check a segment spec (``kind: segments``)."""
    return parse_segment_spec(read_yaml(path), origin=str(path))
