"""The spec schema: shipped specs load, and a bad spec fails with a message that names the
key and says how to fix it (never another exception)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from data_specs.schema import SpecError, load_spec, parse_transition_spec, spec_hash, spec_kind

from .conftest import REPO, step_fields

SHIPPED = sorted((REPO / "data_specs").glob("*.yaml"))


def valid() -> dict[str, Any]:
    return {
        "name": "s",
        "kind": "transitions",
        "source": {"paths": ["data/*.jsonl"], "layout": "step_per_line", "episode_key": "ep", "step_key": "t"},
        "fields": step_fields(),
        "store": {"format": "arrow", "discount": 0.99},
    }  # fmt: skip


def with_(path: str, value: Any) -> dict[str, Any]:
    """A valid spec with the value at a dotted path replaced (``...`` deletes the key)."""
    spec = valid()
    node = spec
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return spec


COMPOSITE = {
    "type": "discrete",
    "n": 10,
    "composite": {
        "select": "action_type",
        "value": "action_target",
        "cases": {0: {"offset": 0, "n": 4}, 1: {"offset": 4, "n": 6}},
    },
}


def composite_with(cases: dict[Any, Any], n: int = 10) -> dict[str, Any]:
    action = copy.deepcopy(COMPOSITE)
    action["n"] = n
    action["composite"]["cases"] = cases  # type: ignore[index]
    return with_("fields.action", action)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_specs_load(path: Path) -> None:
    if spec_kind(path) != "transitions":
        pytest.skip("a segments spec")
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.sha256() == load_spec(path).sha256()
    assert spec.to_dict()["name"] == spec.name


def test_valid_spec_resolves_defaults() -> None:
    spec = parse_transition_spec(with_("store", ...))
    assert spec.store.format == "arrow" and spec.store.discount == 0.99
    assert spec.fields.observation.dim == 3
    assert spec.fields.action.n == 4
    composite = parse_transition_spec(with_("fields.action", COMPOSITE)).fields.action
    assert composite.composite is not None
    assert dict(composite.composite.cases)[1].offset == 4


def test_spec_hash_changes_with_a_value() -> None:
    a = parse_transition_spec(valid())
    b = parse_transition_spec(with_("store.discount", 0.98))
    assert a.sha256() == parse_transition_spec(valid()).sha256()
    assert a.sha256() != b.sha256()


BAD: list[tuple[str, dict[str, Any], list[str]]] = [
    ("missing fields", with_("fields", ...), ["missing required key 'fields'"]),
    ("missing reward", with_("fields.reward", ...), ["fields: missing required key 'reward'"]),
    ("missing action type", with_("fields.action.type", ...), ["fields.action", "'type'"]),
    ("missing step_key", with_("source.step_key", ...), ["source", "needs `step_key`"]),
    ("unknown key", with_("fields.observation.sahpe", [3]), ["fields.observation", "unknown key 'sahpe'", "allowed keys are", "shape"]),
    ("unknown top key", with_("compression", "lz4"), ["unknown key 'compression'"]),
    ("discount type", with_("store.discount", "high"), ["store.discount", "must be a number", "discount factor"]),
    ("discount range", with_("store.discount", 1.5), ["store.discount", "must be in [0, 1]"]),
    ("n zero", with_("fields.action.n", 0), ["fields.action.n", "integer >= 1", "number of discrete actions", "got 0"]),
    ("n bool", with_("fields.action.n", True), ["fields.action.n", "integer >= 1"]),
    ("paths type", with_("source.paths", 3), ["source.paths", "non-empty list of file globs"]),
    ("shape type", with_("fields.observation.shape", [2, 2]), ["fields.observation.shape", "one-element list such as [3]"]),
    ("layout", with_("source.layout", "rows"), ["source.layout", "`step_per_line` or `episode_per_line`", "'rows'"]),
    ("format", with_("store.format", "parquet"), ["store.format", "`arrow` or `zarr`"]),
    ("action type", with_("fields.action.type", "multi"), ["fields.action.type", "`discrete` or `continuous`"]),
    ("steps_key in step layout", with_("source.steps_key", "steps"), ["`steps_key` is for layout episode_per_line", "use `step_key`"]),
    ("name slash", with_("name", "a/b"), ["name", "no '/'"]),
    ("empty path", with_("fields.reward", {"path": "a..b"}), ["fields.reward.path", "empty part between dots"]),
    ("composite overlap", composite_with({0: {"offset": 0, "n": 4}, 1: {"offset": 3, "n": 6}}), ["fields.action.composite.cases", "same index", "disjoint offsets"]),
    ("composite beyond n", composite_with({0: {"offset": 0, "n": 4}, 1: {"offset": 4, "n": 6}}, n=8), ["fields.action.composite.cases.1", "beyond action n=8"]),
    ("composite key", composite_with({"move": {"offset": 0, "n": 4}}), ["fields.action.composite.cases.move", "must be integers"]),
    ("low above high", with_("fields.action", {"path": "a", "type": "continuous", "shape": [2], "low": [0.0, 1.0], "high": [1.0, 1.0]}), ["fields.action", "dimension 1", "low (1.0) must be below high (1.0)"]),
    ("bounds length", with_("fields.action", {"path": "a", "type": "continuous", "shape": [2], "low": [0.0], "high": 1.0}), ["fields.action.low", "has 1 values", "2 dimensions"]),
    ("discrete with bounds", with_("fields.action", {"path": "a", "type": "discrete", "n": 2, "high": 1}), ["fields.action", "discrete actions take `n`"]),
    ("end and flags", with_("fields.end", {"path": "end"}), ["fields", "either per step", "not both"]),
    ("end reason twice", with_("fields", {**step_fields(), "terminated": ..., "truncated": ..., "end": {"path": "e", "terminated": ["x"], "truncated": ["x"]}}), ["fields.end", "'x'", "both terminated and truncated"]),
    ("obs keys twice", with_("fields.observation", {"path": "o", "keys": ["a", "a"]}), ["fields.observation.keys", "lists a key twice"]),
    ("obs key size", with_("fields.observation", {"path": "o", "keys": [{"hp": 0}]}), ["fields.observation.keys.0.hp", "integer >= 1"]),
    ("not a mapping", with_("source", ["a"]), ["source", "must be a mapping"]),
]  # fmt: skip


def _strip_ellipsis(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip_ellipsis(v) for k, v in d.items() if v is not ...}
    return d


@pytest.mark.parametrize(("case", "raw", "needles"), BAD, ids=[b[0] for b in BAD])
def test_errors_name_the_key_and_the_fix(
    case: str, raw: dict[str, Any], needles: list[str]
) -> None:
    with pytest.raises(SpecError) as err:
        parse_transition_spec(_strip_ellipsis(raw), origin="data_specs/x.yaml")
    message = str(err.value)
    assert message.startswith("data_specs/x.yaml: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    assert "\n" not in message


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_("fields.action.n", 0)), encoding="utf-8")
    with pytest.raises(SpecError, match=r"bad\.yaml: fields\.action\.n: must be an integer"):
        load_spec(path)
    path.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"bad\.yaml:2: not valid YAML"):
        load_spec(path)
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    path.write_text("- a list\n", encoding="utf-8")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(path)


# --------------------------------------------------------------------------- fuzz

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 12) | st.floats(-2, 2) | st.text(max_size=4),
    # string keys only: a mapping with unknown int AND str keys is a known crash, below
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


def _nodes(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append((*prefix, k))
            out += _nodes(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.append((*prefix, i))
            out += _nodes(v, (*prefix, i))
    return out


BASES = [valid(), with_("fields.action", COMPOSITE), with_("fields", {**step_fields(), "action": {"path": "a", "type": "continuous", "shape": [2], "low": -1, "high": 1}})]  # fmt: skip


@given(base=st.sampled_from(BASES), data=st.data())
@settings(max_examples=300, deadline=None)
def test_any_spec_either_parses_or_raises_spec_error(
    base: dict[str, Any], data: st.DataObject
) -> None:
    spec = copy.deepcopy(base)
    nodes = _nodes(spec)
    path = data.draw(st.sampled_from(nodes), label="path")
    node = spec
    for k in path[:-1]:
        node = node[k]
    if data.draw(st.booleans(), label="delete"):
        del node[path[-1]]
    else:
        node[path[-1]] = data.draw(yaml_values, label="value")
    try:
        parse_transition_spec(spec, origin="x.yaml")
    except SpecError as e:
        assert str(e).startswith("x.yaml: ")


def test_unknown_keys_of_mixed_types() -> None:
    with pytest.raises(SpecError, match="fields.action: unknown key"):
        parse_transition_spec(with_("fields.action", {"type": "discrete", "n": 2, 0: 1, "x": 2}))


def test_a_license_is_declared_and_a_spec_without_one_hashes_as_before() -> None:
    plain = parse_transition_spec(valid())
    assert plain.license is None and "license" not in plain.to_dict()
    # the hash of the spec as every store before `license` was built from it
    assert plain.sha256() == spec_hash({k: v for k, v in plain.to_dict().items() if k != "license"})
    licensed = parse_transition_spec({**valid(), "license": "cc-by-4.0"})
    assert licensed.license == "cc-by-4.0" and licensed.to_dict()["license"] == "cc-by-4.0"
    assert licensed.sha256() != plain.sha256()
    with pytest.raises(SpecError, match="license"):
        parse_transition_spec({**valid(), "license": ["mit"]})


def test_a_minari_source_takes_no_fields_and_no_log_keys() -> None:
    minari = {"name": "m", "source": {"format": "minari", "paths": ["d-v0"]}}
    spec = parse_transition_spec(minari)
    assert spec.source.format == "minari" and spec.to_dict()["source"]["format"] == "minari"
    assert "format" not in parse_transition_spec(valid()).to_dict()["source"]
    for bad, needle in [
        ({**minari, "fields": step_fields()}, "remove `fields`"),
        ({**minari, "source": {**minari["source"], "layout": "step_per_line"}}, "source.layout"),
        ({**minari, "source": {**minari["source"], "format": "csv"}}, "source.format"),
        (with_("source.observation_keys", ["a"]), "observation_keys"),
    ]:
        with pytest.raises(SpecError, match=needle.replace(".", r"\.").replace("`", ".")):
            parse_transition_spec(bad)
