"""Nothing lost, nothing silent: one test per quarantine reason, and the fast path of
`pipeline.transitions.parse` against its slow reference on randomly mutated records."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_specs.schema import TransitionSpec, parse_transition_spec
from pipeline.build import BuildResult
from pipeline.store import TransitionStore, open_store
from pipeline.transitions.parse import ChunkParser, check_line, get_path, parse_line

from .conftest import (
    N_ACTIONS,
    SPILL,
    Layout,
    assert_one_error_line,
    build_store,
    dumps,
    episode_lines,
    quarantine_records,
    run_cli,
    step_fields,
    step_record,
    write_lines,
    write_spec,
)

# --------------------------------------------------------------------------- helpers

Line = bytes | dict[str, Any]


def build_files(
    d: Path,
    files: dict[str, list[Line]],
    *,
    layout: Layout = "step_per_line",
    fields: dict[str, Any] | None = None,
    episode_key: str | None = None,
    **options: Any,
) -> tuple[BuildResult, TransitionStore]:
    """Write the files, build them (``options`` go to the build), check the counts."""
    for name, lines in files.items():
        write_lines(d / "raw" / name, lines)
    spec = write_spec(d, [str(d / "raw" / "*")], layout=layout, fields=fields)
    if episode_key is not None:
        doc = yaml.safe_load(spec.read_text(encoding="utf-8"))
        doc["source"]["episode_key"] = episode_key
        spec.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    result = build_store(spec, d / "out", **options)
    store = open_store(result.path)
    n_lines = sum(len(v) for v in files.values())
    c = result.manifest["counts"]
    assert c["records"] == n_lines == c["records_kept"] + c["records_quarantined"]
    assert c["records_quarantined"] == len(quarantine_records(result.path))
    assert (
        sum(s["records_quarantined"] for s in result.manifest["sources"])
        == c["records_quarantined"]
    )
    return result, store


def raw_text(line: Line) -> str:
    return (dumps(line) if isinstance(line, dict) else line).decode("utf-8")


def the_record(store: TransitionStore, file: str, line: int) -> dict[str, Any]:
    found = [
        r
        for r in quarantine_records(store.path)
        if Path(r["file"]).name == file and r["line"] == line
    ]
    assert len(found) == 1, (file, line, quarantine_records(store.path))
    return found[0]


def assert_quarantined(
    store: TransitionStore, file: str, line: int, reason: str, raw: Line
) -> dict[str, Any]:
    rec = the_record(store, file, line)
    assert rec["reason"] == reason, rec
    assert rec["raw"] == raw_text(raw)
    assert rec["detail"]
    assert store.manifest["quarantine_reasons"].get(reason, 0) >= 1
    return rec


def kept_ids(store: TransitionStore) -> set[str]:
    return set(store.episodes.episode_id)


def with_bad_step(bad: dict[str, Any]) -> dict[str, list[Line]]:
    """Two good episodes and episode "bad" whose step 1 is ``bad`` (lines 4..6)."""
    lines: list[Line] = [*episode_lines("good1")]
    lines += [step_record("bad", 0), bad, step_record("bad", 2, last=True)]
    lines += episode_lines("good2")
    return {"a.jsonl": lines}


def assert_episode_rejected(store: TransitionStore, file: str, lines: list[int]) -> None:
    """The other records of a rejected episode are quarantined too (never silently lost)."""
    for ln in lines:
        rec = the_record(store, file, ln)
        assert rec["reason"] == "episode_rejected", rec
        assert rec["episode_id"] == "bad"
    assert "bad" not in kept_ids(store)


# --------------------------------------------------------------------------- record-level


def test_bad_json(tmp_path: Path) -> None:
    garbage = b'{"ep": "bad", "t": 0, "obs": [1.0, '
    lines: list[Line] = [*episode_lines("good1"), garbage, *episode_lines("good2")]
    _, store = build_files(tmp_path, {"a.jsonl": lines})
    rec = assert_quarantined(store, "a.jsonl", 4, "bad_json", garbage)
    assert rec["episode_id"] is None
    assert kept_ids(store) == {"good1", "good2"}
    assert len(store) == 6


def test_bad_utf8_keeps_the_exact_bytes(tmp_path: Path) -> None:
    bad = dumps(step_record("good1", 1)).replace(b'"ep":"good1"', b'"ep":"go\xffod1"')
    lines: list[Line] = [*episode_lines("good1"), bad, *episode_lines("good2")]
    _, store = build_files(tmp_path, {"a.jsonl": lines})
    rec = the_record(store, "a.jsonl", 4)
    assert rec["reason"] == "bad_utf8"
    assert base64.b64decode(rec["raw_base64"]) == bad
    assert rec["raw"] == bad.decode("utf-8", errors="replace")
    assert kept_ids(store) == {"good1", "good2"}


@pytest.mark.parametrize("line", [b"[1, 2, 3]", b"42", b'"a string"', b"null"])
def test_not_an_object(tmp_path: Path, line: bytes) -> None:
    lines: list[Line] = [*episode_lines("good1"), line]
    _, store = build_files(tmp_path, {"a.jsonl": lines})
    assert_quarantined(store, "a.jsonl", 4, "not_an_object", line)
    assert kept_ids(store) == {"good1"}


def drop(rec: dict[str, Any], key: str) -> dict[str, Any]:
    out = dict(rec)
    del out[key]
    return out


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param(drop(step_record("bad", 1), "rew"), "missing_field", id="no-reward"),
        pytest.param(drop(step_record("bad", 1), "obs"), "missing_field", id="no-obs"),
        pytest.param(step_record("bad", 1, act=None), "missing_field", id="null-action"),
        pytest.param(step_record("bad", 1, rew="high"), "wrong_type", id="string-reward"),
        pytest.param(step_record("bad", 1, act=1.5), "wrong_type", id="float-action"),
        pytest.param(step_record("bad", 1, term="no"), "wrong_type", id="string-flag"),
        pytest.param(step_record("bad", 1, obs={"x": 1.0}), "wrong_type", id="object-obs"),
        pytest.param(step_record("bad", 1, obs=[1.0, 2.0]), "wrong_length", id="short-obs"),
        pytest.param(
            step_record("bad", 1, obs=[1.0, 2.0, 3.0, 4.0]), "wrong_length", id="long-obs"
        ),
        pytest.param(step_record("bad", 1, act=N_ACTIONS), "action_out_of_range", id="action-n"),
        pytest.param(step_record("bad", 1, act=-1), "action_out_of_range", id="action-negative"),
    ],
)
def test_a_bad_step_rejects_its_whole_episode(
    tmp_path: Path, bad: dict[str, Any], reason: str
) -> None:
    _, store = build_files(tmp_path, with_bad_step(bad))
    rec = assert_quarantined(store, "a.jsonl", 5, reason, bad)
    assert rec["episode_id"] == "bad"
    assert_episode_rejected(store, "a.jsonl", [4, 6])
    assert kept_ids(store) == {"good1", "good2"}
    assert len(store) == 6


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("where", ["obs", "rew", "final_obs"])
def test_non_finite(tmp_path: Path, literal: str, where: str) -> None:
    if where == "obs":
        bad = f'{{"ep":"bad","t":1,"obs":[1.0,{literal},0.0],"act":0,"rew":0.0,"term":false,"trunc":false}}'
    elif where == "rew":
        bad = f'{{"ep":"bad","t":1,"obs":[1.0,2.0,0.0],"act":0,"rew":{literal},"term":false,"trunc":false}}'
    else:  # on the last step's line
        bad = f'{{"ep":"bad","t":2,"obs":[1.0,2.0,0.0],"act":0,"rew":0.0,"term":true,"trunc":false,"final_obs":[0.0,{literal},0.0]}}'
    lines: list[Line] = [*episode_lines("good1"), step_record("bad", 0)]
    if where == "final_obs":
        lines += [step_record("bad", 1), bad.encode()]
    else:
        lines += [bad.encode(), step_record("bad", 2, last=True)]
    _, store = build_files(tmp_path, {"a.jsonl": lines})
    bad_line = 6 if where == "final_obs" else 5
    rec = assert_quarantined(store, "a.jsonl", bad_line, "non_finite", bad.encode())
    assert where in rec["detail"]
    assert_episode_rejected(store, "a.jsonl", [ln for ln in (4, 5, 6) if ln != bad_line])
    assert kept_ids(store) == {"good1"}


def continuous_fields() -> dict[str, Any]:
    fields = step_fields()
    fields["action"] = {"path": "act", "type": "continuous", "shape": [2], "low": -1.0, "high": 1.0}
    return fields


def composite_fields() -> dict[str, Any]:
    fields = step_fields()
    fields["action"] = {
        "type": "discrete",
        "n": 10,
        "composite": {
            "select": "action_type",
            "value": "action_target",
            "cases": {0: {"offset": 0, "n": 4}, 1: {"offset": 4, "n": 6}},
        },
    }
    return fields


def _continuous(ep: str, t: int, act: list[float], last: bool = False) -> dict[str, Any]:
    return step_record(ep, t, last=last, act=act)


def _composite(ep: str, t: int, typ: int, target: int, last: bool = False) -> dict[str, Any]:
    rec = step_record(ep, t, last=last, action_type=typ, action_target=target)
    del rec["act"]
    return rec


@pytest.mark.parametrize(
    ("fields", "good", "bad"),
    [
        pytest.param(
            continuous_fields(),
            [_continuous("g", t, [-1.0, 1.0], t == 2) for t in range(3)],
            [_continuous("bad", 0, [0.0, 0.0]), _continuous("bad", 1, [0.5, 1.5], True)],
            id="continuous-above-high",
        ),
        pytest.param(
            continuous_fields(),
            [_continuous("g", t, [-1.0, 1.0], t == 2) for t in range(3)],
            [_continuous("bad", 0, [0.0, 0.0]), _continuous("bad", 1, [-1.01, 0.0], True)],
            id="continuous-below-low",
        ),
        pytest.param(
            composite_fields(),
            [_composite("g", t, t % 2, 3, t == 2) for t in range(3)],
            [_composite("bad", 0, 1, 5), _composite("bad", 1, 0, 4, True)],
            id="composite-move-target-4",
        ),
        pytest.param(
            composite_fields(),
            [_composite("g", t, t % 2, 3, t == 2) for t in range(3)],
            [_composite("bad", 0, 1, 5), _composite("bad", 1, 2, 0, True)],
            id="composite-unknown-action-type",
        ),
    ],
)
def test_action_out_of_range(
    tmp_path: Path,
    fields: dict[str, Any],
    good: list[dict[str, Any]],
    bad: list[dict[str, Any]],
) -> None:
    _, store = build_files(tmp_path, {"a.jsonl": [*good, *bad]}, fields=fields)
    assert_quarantined(store, "a.jsonl", 5, "action_out_of_range", bad[1])
    assert_episode_rejected(store, "a.jsonl", [4])
    assert kept_ids(store) == {"g"}


def test_composite_action_maps_to_one_index(tmp_path: Path) -> None:
    pairs = [(0, 0), (0, 3), (1, 0), (1, 5)]
    good: list[Line] = [_composite("g", t, a, b, t == 3) for t, (a, b) in enumerate(pairs)]
    _, store = build_files(tmp_path, {"a.jsonl": good}, fields=composite_fields())
    np.testing.assert_array_equal(store.actions, [0, 3, 4, 9])
    assert store.action_space.n == 10


# --------------------------------------------------------------------------- episode-level


def episode_record(eid: str, n: int = 2, **extra: Any) -> dict[str, Any]:
    steps = [drop(drop(step_record(eid, t, last=t == n - 1), "ep"), "t") for t in range(n)]
    return {"episode": eid, "steps": steps, **extra}


def test_empty_episode(tmp_path: Path) -> None:
    lines: list[Line] = [episode_record("good1"), {"episode": "bad", "steps": []}]
    lines.append(episode_record("good2"))
    _, store = build_files(tmp_path, {"a.jsonl": lines}, layout="episode_per_line")
    assert_quarantined(store, "a.jsonl", 2, "empty_episode", lines[1])
    assert kept_ids(store) == {"good1", "good2"}


def test_a_bad_step_rejects_its_episode_line(tmp_path: Path) -> None:
    bad = episode_record("bad", 3)
    bad["steps"][1]["rew"] = "x"
    lines: list[Line] = [episode_record("good1"), bad]
    _, store = build_files(tmp_path, {"a.jsonl": lines}, layout="episode_per_line")
    rec = assert_quarantined(store, "a.jsonl", 2, "wrong_type", bad)
    assert "step 1" in rec["detail"]
    assert kept_ids(store) == {"good1"}


def end_fields() -> dict[str, Any]:
    fields = step_fields()
    del fields["terminated"], fields["truncated"]
    fields["end"] = {"path": "end", "terminated": ["done", "lost"], "truncated": ["timeout"]}
    return fields


def test_unknown_end_reason(tmp_path: Path) -> None:
    lines: list[Line] = [
        episode_record("won", end="done"),
        episode_record("cut", end="timeout"),
        episode_record("bad", end="crashed"),
        episode_record("open"),  # no end reason: a log that just stops
    ]
    _, store = build_files(
        tmp_path, {"a.jsonl": lines}, layout="episode_per_line", fields=end_fields()
    )
    rec = assert_quarantined(store, "a.jsonl", 3, "unknown_end_reason", lines[2])
    assert "crashed" in rec["detail"]
    assert store.episodes.episode_id == ["won", "cut", "open"]
    np.testing.assert_array_equal(store.episodes.terminated, [True, False, False])
    np.testing.assert_array_equal(store.episodes.truncated, [False, True, True])
    # cut off with no final observation: the last transition is dropped
    np.testing.assert_array_equal(store.episodes.length, [2, 1, 1])


def test_unknown_end_reason_step_per_line(tmp_path: Path) -> None:
    good = [step_record("g", 0, end=None), step_record("g", 1, end="lost")]
    bad = [step_record("bad", 0), step_record("bad", 1, end="exploded")]
    files: dict[str, list[Line]] = {"a.jsonl": [*good, *bad]}
    for rec in [*good, *bad]:
        del rec["term"], rec["trunc"]
    _, store = build_files(tmp_path, files, fields=end_fields())
    assert_quarantined(store, "a.jsonl", 4, "unknown_end_reason", bad[1])
    assert_episode_rejected(store, "a.jsonl", [3])
    assert kept_ids(store) == {"g"}
    assert bool(store.terminated[-1])


@pytest.mark.parametrize(
    ("bad_lines", "reason"),
    [
        pytest.param([step_record("bad", 0), step_record("bad", 1), step_record("bad", 1, rew=5.0),
                      step_record("bad", 2, last=True)], "duplicate_step", id="duplicate-step"),
        pytest.param([step_record("bad", 0), step_record("bad", 1), step_record("bad", 3, last=True)],
                     "step_gap", id="step-gap"),
        pytest.param([step_record("bad", 0, term=True), step_record("bad", 1),
                      step_record("bad", 2, last=True)], "end_before_last_step", id="early-terminated"),
        pytest.param([step_record("bad", 0, trunc=True), step_record("bad", 1, last=True)],
                     "end_before_last_step", id="early-truncated"),
        pytest.param([step_record("bad", 0, final_obs=[0.0, 0.0, 0.0]), step_record("bad", 1, last=True)],
                     "end_before_last_step", id="early-final-obs"),
        pytest.param([step_record("bad", 0)], "unbootstrappable", id="one-step-no-flag"),
        pytest.param([step_record("bad", 0, trunc=True)], "unbootstrappable", id="one-step-truncated"),
    ],
)  # fmt: skip
def test_episode_level_reasons_reject_every_record(
    tmp_path: Path, bad_lines: list[dict[str, Any]], reason: str
) -> None:
    # the bad episode's records are spread over two files, before and after good ones
    files: dict[str, list[Line]] = {
        "a.jsonl": [*episode_lines("good1"), *bad_lines[::2]],
        "b.jsonl.gz": [*bad_lines[1::2], *episode_lines("good2")],
    }
    _, store = build_files(tmp_path, files)
    expected = [("a.jsonl", 4 + i) for i in range(len(bad_lines[::2]))]
    expected += [("b.jsonl.gz", 1 + i) for i in range(len(bad_lines[1::2]))]
    records = quarantine_records(store.path)
    assert sorted((Path(r["file"]).name, r["line"]) for r in records) == sorted(expected)
    for r in records:
        assert r["reason"] == reason
        assert r["episode_id"] == "bad"
        name, line = Path(r["file"]).name, r["line"]
        assert r["raw"] == raw_text(files[name][line - 1])
    assert kept_ids(store) == {"good1", "good2"}
    assert store.manifest["quarantine_reasons"] == {reason: len(bad_lines)}


def test_unbootstrappable_with_final_observation_is_kept(tmp_path: Path) -> None:
    lines: list[Line] = [step_record("one", 0, final_obs=[9.0, 9.0, 9.0])]
    _, store = build_files(tmp_path, {"a.jsonl": lines})
    assert len(store) == 1
    assert bool(store.truncated[0]) and not bool(store.terminated[0])
    np.testing.assert_array_equal(store.next_observations[0], [9.0, 9.0, 9.0])


def test_duplicate_episode(tmp_path: Path) -> None:
    first = episode_record("dup", 2)
    second = episode_record("dup", 3)
    lines: list[Line] = [first, episode_record("other"), second]
    files: dict[str, list[Line]] = {"a.jsonl": lines[:2], "b.jsonl.zst": lines[2:]}
    _, store = build_files(tmp_path, files, layout="episode_per_line")
    rec = assert_quarantined(store, "b.jsonl.zst", 1, "duplicate_episode", second)
    assert rec["episode_id"] == "dup"
    assert store.episodes.episode_id == ["dup", "other"]
    assert store.episodes.length[0] == 2  # the first one is kept


def test_duplicate_episode_names_the_kept_line(tmp_path: Path) -> None:
    lines: list[Line] = [episode_record("other"), episode_record("dup", 2)]
    files: dict[str, list[Line]] = {"a.jsonl": lines, "b.jsonl.zst": [episode_record("dup", 3)]}
    _, store = build_files(tmp_path, files, layout="episode_per_line")
    rec = the_record(store, "b.jsonl.zst", 1)
    assert rec["reason"] == "duplicate_episode"
    assert "a.jsonl:2" in rec["detail"], rec["detail"]


def cut_off(rec: dict[str, Any]) -> dict[str, Any]:
    """The episode line with no end flag and no final observation."""
    for step in rec["steps"]:
        step["term"] = step["trunc"] = False
    return rec


# one chunk for the whole file, or one chunk per line or two (across chunks)
CHUNKINGS = [pytest.param({}, id="one-chunk"), pytest.param({"chunk_bytes": 97}, id="small-chunks")]


@pytest.mark.parametrize("options", CHUNKINGS)
def test_a_rejected_copy_does_not_use_up_its_id(tmp_path: Path, options: dict[str, Any]) -> None:
    # x: one step cut off (unbootstrappable), y, then a valid x of three steps
    lines: list[Line] = [
        cut_off(episode_record("x", 1)),
        episode_record("y"),
        episode_record("x", 3),
    ]
    _, store = build_files(tmp_path, {"a.jsonl": lines}, layout="episode_per_line", **options)
    assert store.episodes.episode_id == ["y", "x"]
    np.testing.assert_array_equal(store.episodes.length, [2, 3])
    assert store.episodes.source_line.tolist() == [2, 3]
    assert [(r["line"], r["reason"]) for r in quarantine_records(store.path)] == [
        (1, "unbootstrappable")
    ]


@pytest.mark.parametrize("options", CHUNKINGS)
def test_the_first_valid_copy_is_kept_and_a_later_one_is_a_duplicate(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    lines: list[Line] = [
        cut_off(episode_record("x", 1)),  # rejected: uses nothing up
        episode_record("x", 2),  # kept
        episode_record("y"),
        episode_record("x", 3),  # valid, but x is kept already
        cut_off(episode_record("x", 1)),  # rejected for its own reason
    ]
    _, store = build_files(tmp_path, {"a.jsonl": lines}, layout="episode_per_line", **options)
    assert store.episodes.episode_id == ["x", "y"]
    assert store.episodes.source_line.tolist() == [2, 3]
    np.testing.assert_array_equal(store.episodes.length, [2, 2])
    records = quarantine_records(store.path)
    assert [(r["line"], r["reason"]) for r in records] == [
        (1, "unbootstrappable"),
        (4, "duplicate_episode"),
        (5, "unbootstrappable"),
    ]
    assert "a.jsonl:2" in records[1]["detail"] and records[1]["episode_id"] == "x"


def test_two_copies_of_a_step_per_line_episode_reject_it(tmp_path: Path) -> None:
    lines: list[Line] = [*episode_lines("x"), *episode_lines("good"), *episode_lines("x")]
    _, store = build_files(tmp_path, {"a.jsonl": lines})
    assert kept_ids(store) == {"good"}
    records = quarantine_records(store.path)
    assert [r["line"] for r in records] == [1, 2, 3, 7, 8, 9]
    assert {r["reason"] for r in records} == {"duplicate_step"}


# --------------------------------------------------------------------------- episode ids

ID_KEYS = ["ep", "meta.id"]  # a top-level and a nested key take the same path
ID_BUILDS = [pytest.param({}, id="in-memory"), pytest.param(SPILL, id="spilled")]


def with_id(rec: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``rec`` with its id (``ep``) moved to the dotted ``key``."""
    out = {k: v for k, v in rec.items() if k != "ep"}
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def steps_with_ids(key: str, ids: list[Any], name: str = "x") -> list[Line]:
    """One episode of len(ids) steps, the last terminated, each step with its own id."""
    return [with_id(r, key, i) for r, i in zip(episode_lines(name, len(ids)), ids)]


@pytest.mark.parametrize("options", ID_BUILDS)
@pytest.mark.parametrize("key", ID_KEYS)
def test_a_float_id_is_neither_a_string_nor_an_integer(
    tmp_path: Path, key: str, options: dict[str, Any]
) -> None:
    lines = [*steps_with_ids(key, ["3", 3.0, 3.0]), *steps_with_ids(key, ["g", "g"])]
    _, store = build_files(tmp_path, {"a.jsonl": lines}, episode_key=key, **options)
    assert kept_ids(store) == {"g"}
    records = quarantine_records(store.path)
    assert [(r["line"], r["reason"]) for r in records] == [
        (1, "unbootstrappable"),  # "3" is a one-step episode of its own, cut off
        (2, "wrong_type"),
        (3, "wrong_type"),
    ]
    assert key in records[1]["detail"] and "3.0" in records[1]["detail"]
    assert [r["episode_id"] for r in records] == ["3", None, None]


@pytest.mark.parametrize("options", ID_BUILDS)
@pytest.mark.parametrize("key", ID_KEYS)
@pytest.mark.parametrize("ids", [["3", 3, 3], [3, "3", 3], [3, 3, "3"]])
def test_a_string_and_an_integer_id_of_one_text_never_merge(
    tmp_path: Path, key: str, ids: list[Any], options: dict[str, Any]
) -> None:
    lines = [*steps_with_ids(key, ["g", "g"], "g"), *steps_with_ids(key, ids)]
    _, store = build_files(tmp_path, {"a.jsonl": lines}, episode_key=key, **options)
    assert kept_ids(store) == {"g"}
    records = quarantine_records(store.path)
    assert [(r["line"], r["reason"]) for r in records] == [
        (3, "ambiguous_episode_id"),
        (4, "ambiguous_episode_id"),
        (5, "ambiguous_episode_id"),
    ]
    assert "both as a string and as an integer" in records[0]["detail"]


@pytest.mark.parametrize("key", ID_KEYS)
def test_integer_ids_are_ids(tmp_path: Path, key: str) -> None:
    lines = [*steps_with_ids(key, [3, 3, 3]), *steps_with_ids(key, ["3x", "3x"])]
    zero = [dumps(r).replace(b'"@"', b"-0") for r in steps_with_ids(key, ["@", 0])]
    _, store = build_files(tmp_path, {"a.jsonl": [*lines, *zero]}, episode_key=key)
    assert store.episodes.episode_id == ["3", "3x", "0"]  # -0 is the integer 0
    np.testing.assert_array_equal(store.episodes.length, [3, 2, 2])


@pytest.mark.parametrize(
    "value",
    [
        "3.0",
        "1e2",
        "-2.5",
        "true",
        "[3]",
        '{"n":3}',
        "18446744073709551616",
        "-9223372036854775809",
    ],
)
@pytest.mark.parametrize("key", ID_KEYS)
def test_ids_that_are_not_strings_or_64_bit_integers_are_quarantined(
    tmp_path: Path, key: str, value: str
) -> None:
    bad = dumps(steps_with_ids(key, ["@"])[0]).replace(b'"@"', value.encode())
    lines: list[Line] = [*steps_with_ids(key, ["g", "g"]), bad]
    _, store = build_files(tmp_path, {"a.jsonl": lines}, episode_key=key)
    assert kept_ids(store) == {"g"}
    assert_quarantined(store, "a.jsonl", 3, "wrong_type", bad)


@pytest.mark.parametrize("key", ["episode", "meta.id"])
def test_episode_per_line_ids_of_two_types_are_duplicates(tmp_path: Path, key: str) -> None:
    def line(value: Any, n: int) -> dict[str, Any]:
        rec = episode_record("@", n)
        del rec["episode"]
        return with_id({"ep": None, **rec}, key, value)

    lines: list[Line] = [line("3", 2), line(3, 3), line(4, 2)]
    _, store = build_files(tmp_path, {"a.jsonl": lines}, layout="episode_per_line", episode_key=key)
    assert store.episodes.episode_id == ["3", "4"]
    rec = assert_quarantined(store, "a.jsonl", 2, "duplicate_episode", lines[1])
    assert "a.jsonl:1" in rec["detail"]


def test_episode_rejected_across_files(tmp_path: Path) -> None:
    bad = step_record("bad", 2, last=True, obs=[1.0])
    files: dict[str, list[Line]] = {
        "a.jsonl": [step_record("bad", 0), *episode_lines("good1")],
        "b.jsonl.gz": [*episode_lines("good2"), step_record("bad", 1)],
        "c.jsonl.zst": [bad],
    }
    _, store = build_files(tmp_path, files)
    rec = assert_quarantined(store, "c.jsonl.zst", 1, "wrong_length", bad)
    assert rec["episode_id"] == "bad"
    for name, line in (("a.jsonl", 1), ("b.jsonl.gz", 4)):
        other = assert_quarantined(store, name, line, "episode_rejected", files[name][line - 1])
        assert "c.jsonl.zst:1" in other["detail"] and "wrong_length" in other["detail"]
    assert kept_ids(store) == {"good1", "good2"}
    # quarantine.jsonl is in (file, line) order
    keys = [(Path(r["file"]).name, r["line"]) for r in quarantine_records(store.path)]
    assert keys == sorted(keys)


def test_integer_episode_ids_reject_across_records(tmp_path: Path) -> None:
    lines: list[Line] = [
        step_record(7, 0),  # type: ignore[arg-type]
        step_record(7, 1),  # type: ignore[arg-type]
        step_record(7, 2, last=True, rew=None),  # type: ignore[arg-type]
        *episode_lines("good"),
    ]
    _, store = build_files(tmp_path, {"a.jsonl": lines})
    assert {r["reason"] for r in quarantine_records(store.path)} == {
        "missing_field",
        "episode_rejected",
    }
    assert kept_ids(store) == {"good"}


def test_float_episode_ids_reject_across_records(tmp_path: Path) -> None:
    lines: list[Line] = [
        step_record(3.0, 0),  # type: ignore[arg-type]
        step_record(3.0, 1),  # type: ignore[arg-type]
        step_record(3.0, 2, last=True, rew=None),  # type: ignore[arg-type]
        *episode_lines("good"),
    ]
    _, store = build_files(tmp_path, {"a.jsonl": lines})
    assert kept_ids(store) == {"good"}


def test_blank_lines_are_not_records(tmp_path: Path) -> None:
    lines: list[Line] = [*episode_lines("good1"), b"", b"   ", *episode_lines("good2")]
    result, store = build_files(tmp_path, {"a.jsonl": lines[:3] + lines[5:]})
    write_lines(tmp_path / "raw" / "a.jsonl", lines)
    rebuilt = build_store(result.path.parent.parent / "store.yaml", tmp_path / "out")
    c = rebuilt.manifest["counts"]
    assert c["records"] == 6 == c["records_kept"]
    assert rebuilt.manifest["sources"][0]["blank_lines"] == 2
    assert len(open_store(rebuilt.path)) == len(store)


def test_last_line_without_newline_and_crlf(tmp_path: Path) -> None:
    lines = [dumps(r) for r in [*episode_lines("good1"), *episode_lines("good2")]]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_bytes(b"\r\n".join(lines))  # no final newline
    spec = write_spec(tmp_path, [str(tmp_path / "raw" / "*")])
    store = open_store(build_store(spec, tmp_path / "out").path)
    assert store.manifest["counts"]["records_kept"] == 6
    assert kept_ids(store) == {"good1", "good2"}


# --------------------------------------------------------------------------- threshold


def test_max_bad_fraction_fails_the_build(tmp_path: Path) -> None:
    lines: list[Line] = [*episode_lines("good"), b"not json", b"[]"]
    write_lines(tmp_path / "raw" / "a.jsonl", lines)
    spec = write_spec(tmp_path, [str(tmp_path / "raw" / "*")])
    out = tmp_path / "out"
    proc = run_cli("pipeline.build", spec, "--out", out, "--max-bad-fraction", "0.2")
    assert_one_error_line(proc, "2 of 5 records quarantined", "--max-bad-fraction 0.2")
    assert not (out / "store").exists()
    assert not list(out.glob(".store.build-*"))
    # under the threshold it builds
    proc = run_cli("pipeline.build", spec, "--out", out, "--max-bad-fraction", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert (out / "store" / "manifest.json").exists()


# --------------------------------------------------------------------------- fast vs slow

SPEC_VARIANTS: dict[str, dict[str, Any]] = {
    "steps-discrete": {
        "layout": "step_per_line",
        "fields": step_fields(),
    },
    "episodes-continuous-dict-obs": {
        "layout": "episode_per_line",
        "fields": {
            "observation": {"path": "obs", "keys": ["x", {"v": 2}]},
            "action": {"path": "act", "type": "continuous", "shape": [2], "low": -1, "high": 1},
            "reward": {"path": "rew"},
            "end": {"path": "end", "terminated": ["done"], "truncated": ["timeout"]},
            "final_observation": {"path": "final_obs"},
        },
    },
    "steps-nested-id": {
        "layout": "step_per_line",
        "episode_key": "meta.id",
        "fields": step_fields(),
    },
    "steps-named-rewards": {  # fields.rewards: two more numbers per step, one nested
        "layout": "step_per_line",
        "fields": {**step_fields(), "rewards": {"shaped": {"path": "info.shaped"}, "b": "bonus"}},
    },
    "steps-composite-nested": {
        "layout": "step_per_line",
        "fields": {
            "observation": {"path": "state.vec", "shape": [2]},
            "action": composite_fields()["action"],
            "reward": {"path": "r"},
            "terminated": {"path": "done"},
        },
    },
}


def variant_spec(name: str) -> TransitionSpec:
    v = SPEC_VARIANTS[name]
    source: dict[str, Any] = {"paths": ["unused"], "layout": v["layout"]}
    if v["layout"] == "step_per_line":
        source.update(episode_key=v.get("episode_key", "ep"), step_key="t")
    else:
        source.update(episode_key="episode", steps_key="steps")
    return parse_transition_spec({"name": name, "source": source, "fields": v["fields"]})


num = st.integers(-20, 20).map(lambda k: k / 4)
unit = st.integers(-4, 4).map(lambda k: k / 4)


@st.composite
def valid_record(draw: st.DrawFn, variant: str) -> dict[str, Any]:
    ep: Any = draw(st.sampled_from(["a", "b", "c", 3, "3", -7]))
    if variant in ("steps-discrete", "steps-nested-id", "steps-named-rewards"):
        rec = step_record(ep, draw(st.integers(0, 5)))
        rec.update(
            obs=draw(st.lists(num, min_size=3, max_size=3)),
            act=draw(st.integers(0, N_ACTIONS - 1)),
            rew=draw(num),
            term=draw(st.booleans()),
        )
        if draw(st.booleans()):
            rec["final_obs"] = draw(st.lists(num, min_size=3, max_size=3))
        if variant == "steps-named-rewards":
            rec.update(info={"shaped": draw(num)}, bonus=draw(num))
        return with_id(rec, "meta.id", ep) if variant == "steps-nested-id" else rec
    if variant == "episodes-continuous-dict-obs":
        n = draw(st.integers(1, 3))
        steps = [
            {
                "obs": {"x": draw(num), "v": draw(st.lists(num, min_size=2, max_size=2))},
                "act": draw(st.lists(unit, min_size=2, max_size=2)),
                "rew": draw(num),
            }
            for _ in range(n)
        ]
        rec = {"episode": ep, "steps": steps}
        if draw(st.booleans()):
            rec["end"] = draw(st.sampled_from(["done", "timeout"]))
        if draw(st.booleans()):
            rec["final_obs"] = {"x": draw(num), "v": draw(st.lists(num, min_size=2, max_size=2))}
        return rec
    typ = draw(st.integers(0, 1))
    return {
        "ep": ep,
        "t": draw(st.integers(0, 5)),
        "state": {"vec": draw(st.lists(num, min_size=2, max_size=2))},
        "action_type": typ,
        "action_target": draw(st.integers(0, 3 if typ == 0 else 5)),
        "r": draw(num),
        "done": draw(st.booleans()),
    }


def paths_of(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    items: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    for k, v in items:
        out.append((*prefix, k))
        out += paths_of(v, (*prefix, k))
    return out


_NONFINITE = "@@NONFINITE@@"
WRONG_VALUES: list[Any] = ["x", "1.5", True, False, 1.5, 0, -1, 7, 10**20, [], [1.0, 2.0], {}]
WRONG_VALUES.append({"k": 1})
NONFINITE_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]


@st.composite
def mutated_line(draw: st.DrawFn, variant: str) -> bytes:
    """A record with (maybe) one mutation: JSON-level or byte-level."""
    rec = draw(valid_record(variant))
    op = draw(
        st.sampled_from(
            ["none", "drop", "null", "replace", "non_finite", "resize", "truncate", "bad_utf8",
             "not_object", "action_range"]
        )
    )  # fmt: skip
    literal = draw(st.sampled_from(NONFINITE_LITERALS))
    if op in ("drop", "null", "replace", "non_finite", "resize"):
        paths = paths_of(rec)
        path = draw(st.sampled_from(paths))
        parent = rec
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if op == "drop":
            del parent[key]
        elif op == "null":
            parent[key] = None
        elif op == "replace":
            parent[key] = copy.deepcopy(draw(st.sampled_from(WRONG_VALUES)))
        elif op == "non_finite":
            parent[key] = _NONFINITE
        elif isinstance(parent[key], list):  # resize a list
            if parent[key] and draw(st.booleans()):
                parent[key].pop()
            else:
                parent[key].append(0.0)
    elif op == "action_range":
        target = rec["steps"][0] if "steps" in rec else rec
        if "act" in target and isinstance(target["act"], list):
            target["act"][draw(st.integers(0, 1))] = draw(st.sampled_from([1.25, -1.5, 3.0]))
        elif "act" in target:
            target["act"] = draw(st.sampled_from([N_ACTIONS, -1, 100]))
        else:
            target["action_target"] = draw(st.sampled_from([6, 4, -1]))
    raw = dumps(rec).replace(json.dumps(_NONFINITE).encode(), literal.encode())
    if op == "truncate":
        raw = raw[: draw(st.integers(1, len(raw) - 1))]
    elif op == "bad_utf8":
        pos = draw(st.integers(0, len(raw)))
        raw = raw[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[pos:]
    elif op == "not_object":
        raw = draw(st.sampled_from([b"null", b"[1, 2]", b"3", b'"s"', b"true"]))
    return raw


def decisions(
    spec: TransitionSpec, lines: list[bytes]
) -> tuple[list[str | None], list[str | None]]:
    """Per line: None if kept, else the reason; by the chunk parser, and by check_line.

    Also asserts that the chunk parser reads each kept line's episode id as the
    reference does: the same text and the same JSON type (string or integer)."""
    parser = ChunkParser(spec)
    data = b"\n".join(lines) + b"\n"
    steps, rejected = parser.parse(data, np.arange(1, len(lines) + 1), lambda i: lines[i])
    fast: list[str | None] = [None] * len(lines)
    for r in rejected:
        assert fast[r.line - 1] is None, "a line rejected twice"
        fast[r.line - 1] = r.reason
    slow: list[str | None] = []
    for raw in lines:
        err = check_line(parser.validator, raw)
        slow.append(None if err is None else err.reason)
    fast_ids = dict(
        zip(steps.line.tolist(), zip(steps.episode_id.to_list(), steps.id_int.tolist()))
    )
    for line, (f, s) in enumerate(zip(fast, slow), start=1):
        if f is None and s is None:
            value = get_path(parse_line(lines[line - 1]), spec.source.episode_key)
            assert fast_ids[line] == (str(value), isinstance(value, int)), lines[line - 1]
    return fast, slow


@given(
    variant=st.sampled_from(sorted(SPEC_VARIANTS)),
    data=st.data(),
)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_path_agrees_with_slow_path(variant: str, data: st.DataObject) -> None:
    spec = variant_spec(variant)
    # one valid record first: a chunk with no step at all is a known crash, tested below
    lines = [dumps(data.draw(valid_record(variant), label="valid"))]
    lines += data.draw(st.lists(mutated_line(variant), min_size=1, max_size=8), label="lines")
    fast, slow = decisions(spec, lines)
    assert [f is None for f in fast] == [s is None for s in slow], list(zip(lines, fast, slow))
    assert fast == slow


@pytest.mark.parametrize(
    "episode_id",
    [
        pytest.param('{"x":1}'),
        pytest.param("NaN"),
        pytest.param("Infinity"),
        '"a"',
        "7",
    ],
)
def test_odd_episode_ids_get_the_same_decision(episode_id: str) -> None:
    spec = variant_spec("steps-discrete")
    bad = dumps(step_record("@", 0)).replace(b'"@"', episode_id.encode())
    fast, slow = decisions(spec, [dumps(step_record("a", 0)), bad])
    assert fast == slow


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bonus", None),
        ("bonus", "x"),
        ("bonus", _NONFINITE),
        ("bonus", [1.0]),
        ("info", None),
        ("info", {}),
        ("info", 2.0),
        ("info", {"shaped": True}),
        ("info", {"shaped": _NONFINITE}),
    ],
)
def test_named_rewards_get_the_same_decision(field: str, value: Any) -> None:
    spec = variant_spec("steps-named-rewards")
    good = {**step_record("a", 0), "info": {"shaped": 0.5}, "bonus": -1.0}
    bad = {**step_record("b", 0), "info": {"shaped": 0.5}, "bonus": -1.0, field: value}
    if value is None:
        del bad[field]
    raw = dumps(bad).replace(json.dumps(_NONFINITE).encode(), b"NaN")
    fast, slow = decisions(spec, [dumps(good), raw])
    assert fast == slow
    assert fast[0] is None and fast[1] in ("missing_field", "wrong_type", "non_finite"), fast


def test_repeated_key_gets_the_same_decision() -> None:
    spec = variant_spec("steps-discrete")
    good = dumps(step_record("a", 0))
    repeated = good.replace(b'"rew":1.0', b'"rew":"x","rew":1.0')
    fast, slow = decisions(spec, [good, repeated])
    assert fast == slow


@pytest.mark.parametrize(
    "only",
    [
        pytest.param(b"not json", id="bad-json"),
        pytest.param(b'{"episode":"e","steps":[]}', id="empty"),
    ],
)
def test_a_file_of_only_bad_episode_lines_is_quarantined(tmp_path: Path, only: bytes) -> None:
    write_lines(tmp_path / "raw" / "a.jsonl", [episode_record("good")])
    write_lines(tmp_path / "raw" / "b.jsonl", [only])
    spec = write_spec(tmp_path, [str(tmp_path / "raw" / "*")], layout="episode_per_line")
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    store = open_store(tmp_path / "out" / "store")
    assert [Path(r["file"]).name for r in store.quarantine()] == ["b.jsonl"]
    assert kept_ids(store) == {"good"}
