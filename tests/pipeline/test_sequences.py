"""Sequence stores (``kind: sequences``): spec, layout properties, quarantine, verify, CLI.

The properties are checked against the source episodes, not against the builder's own
pieces: the text the tokens of each turn decode to, the text of its trained tokens (what
the policy writes: its content and the end-of-turn token), and each span's text from the
spec's regex run on the source turn.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_specs.schema import SpecError
from data_specs.sequences import parse_sequence_spec
from pipeline.build import build
from pipeline.format import BuildError
from pipeline.sequences.store import open_sequence_store
from pipeline.sequences.verify import check_invariants, runs
from pipeline.verify import verify

REPO = Path(__file__).resolve().parents[2]
THINK = r"<think>(.*?)</think>"
ACTION = r"<action>(.*?)</action>"


def spec_dict(paths: list[str], **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "seq",
        "kind": "sequences",
        "source": {"paths": paths, "layout": "episode_per_line", "episode_key": "id"},
        "fields": {
            "prompt": {"path": "task"},
            "role": {"path": "role"},
            "policy_roles": ["assistant"],
            "content": {"path": "content"},
            "spans": {"reasoning": {"pattern": THINK}, "action": {"pattern": ACTION}},
            "reward": {"path": "reward"},
            "outcome": {"path": "success"},
        },
        "tokenizer": {"train": {"vocab_size": 400}},
        "sequences": {"max_tokens": 4096},
    }
    for k, v in over.items():
        d[k] = v
    return d


def write(tmp: Path, episodes: list[Any], raw_lines: list[bytes] = (), **over: Any) -> Path:  # type: ignore[assignment]
    data = tmp / "eps.jsonl"
    with data.open("wb") as f:
        for ep in episodes:
            f.write(json.dumps(ep, ensure_ascii=False).encode("utf-8") + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    spec = tmp / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(spec_dict([str(data)], **over), allow_unicode=True, sort_keys=False)
    )
    return spec


def turn(content: str, role: str = "assistant", reward: float = 0.0) -> dict[str, Any]:
    return {"role": role, "content": content, "reward": reward}


def ep(i: Any, turns: list[dict[str, Any]], task: str = "Walk.") -> dict[str, Any]:
    return {"id": i, "task": task, "turns": turns, "success": True}


# --------------------------------------------------------------------------- properties

TEXT = st.text(
    alphabet=st.sampled_from(list("abc xyz,.;:!?0123456789\n\té€ü日本-_()[]{}'\"")), max_size=24
)


@st.composite
def episodes(draw: Any) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(1, 6))):
        turns = []
        for _ in range(draw(st.integers(1, 4))):
            parts = []
            for _ in range(draw(st.integers(1, 3))):  # one or more spans, text around them
                kind = draw(st.sampled_from(["think", "action"]))
                body = draw(TEXT.filter(lambda s: "<" not in s))
                parts.append(draw(TEXT) + f"<{kind}>{body}</{kind}>")
            content = "".join(parts) + draw(TEXT)
            if not re.search(THINK, content, re.S) and not re.search(ACTION, content, re.S):
                content += "<action>x</action>"
            if all(
                not m.group(1) for rx in (THINK, ACTION) for m in re.finditer(rx, content, re.S)
            ):
                content += "<action>x</action>"
            turns.append(turn(content, reward=draw(st.floats(-1, 1))))
            if draw(st.booleans()):
                turns.append(turn(draw(TEXT), role=draw(st.sampled_from(["env", "tool"]))))
        out.append(ep(f"e{i}", turns, task=draw(TEXT)))
    return out


def _check_store(store: Any, eps: list[dict[str, Any]]) -> None:
    text = store.text()
    names = store.label_names
    assert names == ["context", "reasoning", "action", "other"]
    assert store.n_episodes == len(eps)
    assert np.array_equal(np.diff(store.offsets), store.lengths)
    t = store.turns
    for i, e in enumerate(eps):
        ids, labels = store.episode(i)
        a = store.offsets[i]
        # the whole episode decodes to the plain template around the source text
        want = f"<|prompt|>\n{e['task']}<|end|>\n" + "".join(
            f"<|{u['role']}|>\n{u['content']}<|end|>\n" for u in e["turns"]
        )
        assert text.decode(ids.tolist()) == want
        rows = np.flatnonzero(t.episode == i)
        assert len(rows) == len(e["turns"])
        # the prompt is context
        first = int(t.token_start[rows[0]])
        assert not labels[:first].any()
        for r, u in zip(rows, e["turns"]):
            s, f = int(t.token_start[r]), int(t.token_end[r])
            assert np.all(store.turn_index[a + s : a + f] == t.turn[r])
            lab, tid = labels[s:f], ids[s:f]
            assert text.decode(tid.tolist()) == f"<|{u['role']}|>\n{u['content']}<|end|>\n"
            if u["role"] != "assistant":
                assert not lab.any(), "labels never mark another role's turn"
                continue
            # trained tokens are exactly what the policy writes; the header is context
            assert text.decode(tid[lab > 0].tolist()) == u["content"] + "<|end|>"
            for code, rx in ((1, THINK), (2, ACTION)):
                want_spans = [m.group(1) for m in re.finditer(rx, u["content"], re.S) if m.group(1)]
                got = [text.decode(tid[x:y].tolist()) for x, y in runs(lab, code)]
                assert got == want_spans
            assert t.reward[r] == pytest.approx(u["reward"], abs=1e-6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(eps=episodes())
def test_layout_decodes_back_to_the_source_arrow_equals_zarr(eps: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        spec = write(tmp, eps)
        res = build(spec, tmp / "stores", force=True)
        store = open_sequence_store(res.path)
        _check_store(store, eps)
        assert verify(res.path) == []
        zspec = write(tmp, eps, name="seqz", store={"format": "zarr"})
        zres = build(zspec, tmp / "stores", force=True)
        z = open_sequence_store(zres.path)
        assert z.format == "zarr" and z.content_hash == store.content_hash
        for name in ("input_ids", "labels", "turn_index", "lengths", "offsets", "n_turns"):
            assert np.array_equal(getattr(z, name), getattr(store, name)), name
        assert np.array_equal(z.outcome, store.outcome, equal_nan=True)
        assert z.episode_ids == store.episode_ids
        assert z.turns.content == store.turns.content and z.turns.role == store.turns.role
        assert np.array_equal(z.turns.token_start, store.turns.token_start)
        assert verify(zres.path) == []


# --------------------------------------------------------------------------- quarantine

GOOD = "<think>go</think>\n<action>up</action>"


def test_every_bad_episode_is_quarantined_with_its_reason_and_counts_add_up(tmp_path: Path) -> None:
    eps = [
        ep("ok1", [turn(GOOD), turn("seen", "env")]),
        ep("ok1", [turn(GOOD)]),  # duplicate_id
        ep("nospan", [turn("I just talk")]),  # no_span
        ep("empty", []),  # empty_episode
        ep("onlyenv", [turn("hi", "env")]),  # empty_episode: no policy turn
        {"id": "notask", "turns": [turn(GOOD)]},  # missing_field
        ep("badrole", [{"role": 3, "content": GOOD, "reward": 0}]),  # wrong_type
        ep("long", [turn(GOOD + " word" * 400)]),  # too_long
        ep("ok2", [turn(GOOD), turn("fine", "env"), turn(GOOD)]),
    ]
    raw = [b"{not json", b'{"id": "u", "task": "\xff\xfe", "turns": []}', b"[1, 2]"]
    spec = write(tmp_path, eps, raw, sequences={"max_tokens": 300})
    res = build(spec, tmp_path / "stores", force=True)
    m = res.manifest
    assert m["quarantine_reasons"] == {
        "bad_json": 1, "bad_utf8": 1, "duplicate_id": 1, "empty_episode": 2, "missing_field": 1,
        "no_span": 1, "not_an_object": 1, "too_long": 1, "wrong_type": 1,
    }  # fmt: skip
    c = m["counts"]
    assert c["records"] == 12 == c["records_kept"] + c["records_quarantined"]
    assert c["records_kept"] == 2 and m["sources"][0]["records_quarantined"] == 10
    store = open_sequence_store(res.path)
    assert store.episode_ids == ["ok1", "ok2"]
    lines = [json.loads(x) for x in (res.path / "quarantine.jsonl").read_text().splitlines()]
    assert [x["line"] for x in lines] == sorted(x["line"] for x in lines)
    assert {x["reason"] for x in lines} == set(m["quarantine_reasons"])
    assert verify(res.path) == []


def test_overlapping_and_required_spans(tmp_path: Path) -> None:
    spans = {
        "reasoning": {"pattern": THINK},
        "action": {"pattern": ACTION, "required": True},
        "target": {"pattern": r"go (\w+)"},
    }
    eps = [
        ep("overlap", [turn("<think>go left</think><action>left</action>")]),
        ep("noaction", [turn("<think>hm</think>")]),
        ep("ok", [turn("<think>hm</think><action>up</action> go there")]),
    ]
    fields = spec_dict([])["fields"] | {"spans": spans}
    res = build(write(tmp_path, eps, fields=fields), tmp_path / "s", force=True)
    assert res.manifest["quarantine_reasons"] == {"missing_span": 1, "overlapping_spans": 1}
    assert res.manifest["labels"] == ["context", "reasoning", "action", "target", "other"]


def test_truncate_turn_cuts_after_the_last_whole_turn_that_fits(tmp_path: Path) -> None:
    turns = [turn(GOOD + " pad" * 20), turn("obs " * 20, "env")] * 6
    eps = [ep("a", turns), ep("b", [turn(GOOD + " pad" * 300)])]
    res = build(
        write(tmp_path, eps, sequences={"max_tokens": 200, "truncate": "turn"}), tmp_path / "s"
    )
    store = open_sequence_store(res.path)
    assert store.episode_ids == ["a"] and bool(store.truncated[0])
    assert res.manifest["quarantine_reasons"] == {"too_long": 1}
    n = int(store.n_turns[0])
    assert 0 < n < len(turns) and store.lengths[0] <= 200
    # the kept turns are whole, and one more would not have fitted
    t = store.turns
    assert int(t.token_end[n - 1]) == store.lengths[0]
    per_turn = int(t.token_end[1] - t.token_start[0])  # a policy turn plus an env turn
    assert store.lengths[0] + per_turn // 2 > 200 or n % 2 == 1
    assert verify(res.path) == []


def test_spec_errors_name_the_key_and_the_fix() -> None:
    bad = spec_dict(["x"])
    bad["fields"]["spans"]["action"] = {"pattern": "<action>.*?</action>"}
    with pytest.raises(SpecError, match=r"fields\.spans\.action\.pattern: .* 0 capture groups"):
        parse_sequence_spec(bad, "s.yaml")
    bad = spec_dict(["x"], sequences={"max_tokens": 100, "trunc": "turn"})
    with pytest.raises(SpecError, match=r"sequences: unknown key 'trunc'; allowed keys are"):
        parse_sequence_spec(bad, "s.yaml")
    bad = spec_dict(["x"])
    bad["fields"]["spans"]["other"] = {"pattern": "(x)"}
    with pytest.raises(SpecError, match="reserved label name"):
        parse_sequence_spec(bad, "s.yaml")


# --------------------------------------------------------------------------- contract


def test_up_to_date_deterministic_and_verify_catches_broken_rules(tmp_path: Path) -> None:
    eps = [ep(f"e{i}", [turn(GOOD), turn(f"at {i}", "env"), turn(GOOD)]) for i in range(20)]
    spec = write(tmp_path, eps)
    first = build(spec, tmp_path / "a")
    again = build(spec, tmp_path / "a")
    assert again.status == "up to date"
    other = build(spec, tmp_path / "b")
    assert other.manifest["content_hash"] == first.manifest["content_hash"]
    store = open_sequence_store(first.path)
    # the token columns are views of the memory-mapped file, not copies (offsets: N + 1)
    for arr in (store.input_ids, store.labels, store.turn_index):
        assert not arr.flags.owndata and not arr.flags.writeable
    assert check_invariants(store) == []
    labels = store.labels.copy()
    labels[0] = 2  # the prompt trained
    store._cols["labels"] = labels
    assert any("prompt is trained" in p for p in check_invariants(store))
    store = open_sequence_store(first.path)
    ti = store.turn_index.copy()
    ti[int(store.offsets[1]) - 1] = 0  # a token given to the wrong turn
    store._cols["turn_index"] = ti
    assert any("do not tile" in p for p in check_invariants(store))
    store = open_sequence_store(first.path)
    ids = store.input_ids.copy()
    t = store.turns
    act = np.flatnonzero(store.labels == 2)[0]
    ids[act] = (ids[act] + 1) % store.text().vocab_size  # an action token changed
    store._cols["input_ids"] = ids
    assert any("action decodes to" in p for p in check_invariants(store))
    assert len(t) == 60


def test_pretrained_directory_with_a_chat_template(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from pipeline.sequences.text import train_bpe

    tok: Tokenizer = train_bpe(["hello world " * 5], [], 300, 1)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
    )
    model_dir = tmp_path / "model"
    hf.save_pretrained(model_dir)
    eps = [ep("a", [turn(GOOD), turn("moved", "env"), turn("<action>down</action>")])]
    tokenizer = {"pretrained": str(model_dir), "chat_roles": {"env": "user"}}
    res = build(write(tmp_path, eps, tokenizer=tokenizer), tmp_path / "s")
    store = open_sequence_store(res.path)
    text = store.text()
    ids, labels = store.episode(0)
    want = hf.apply_chat_template(
        [{"role": "user", "content": "Walk."}, {"role": "assistant", "content": GOOD},
         {"role": "user", "content": "moved"},
         {"role": "assistant", "content": "<action>down</action>"}],
        tokenize=False,
    )  # fmt: skip
    assert text.decode(ids.tolist()) == want
    assert text.decode(ids[labels > 0].tolist()) == (
        GOOD + "<|im_end|>" + "<action>down</action><|im_end|>"
    )
    assert text.end_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert res.manifest["tokenizer"]["template"]["kind"] == "chat"
    assert verify(res.path) == []


def test_cli_build_verify_inspect(tmp_path: Path) -> None:
    eps = [ep(f"e{i}", [turn(GOOD), turn("obs", "env")]) for i in range(5)]
    spec = write(tmp_path, eps)
    run = [sys.executable, "-m"]
    out = subprocess.run(
        [*run, "pipeline.build", str(spec), "--out", str(tmp_path / "s")],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout  # fmt: skip
    assert "episodes" in out and "reasoning" in out
    store = tmp_path / "s" / "seq"
    # another process, the same store: the tokenizer's training is deterministic
    here = build(spec, tmp_path / "here")
    assert (
        here.manifest["content_hash"]
        == json.loads((store / "manifest.json").read_text())["content_hash"]
    )
    ok = subprocess.run(
        [*run, "pipeline.verify", str(store)], capture_output=True, text=True, cwd=REPO
    )
    assert ok.returncode == 0 and ok.stdout.startswith("OK")
    shown = subprocess.run(
        [*run, "pipeline.inspect", str(store)], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    assert "tokens per label" in shown and "turns per episode" in shown
    assert "episode length (tokens)" in shown


def test_a_spec_with_nothing_kept_fails_with_the_reasons(tmp_path: Path) -> None:
    spec = write(tmp_path, [ep("a", [turn("no spans here")])])
    with pytest.raises(BuildError, match="no episode could be kept.*no_span"):
        build(spec, tmp_path / "s")
