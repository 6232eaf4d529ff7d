"""``python -m pipeline.export STORE --to d3rlpy``: the HDF5 file d3rlpy's ``ReplayBuffer.load``
opens, checked transition by transition against the training adapter's in-memory dataset
(``trainer.d3rlpy_adapter.to_mdp_dataset``) and against a plain loop over the store's rows;
its layout against d3rlpy's own ``dump``; the user errors, in-process and through the CLI.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from pipeline.format import StoreError
from pipeline.interchange import d3rlpy_export
from pipeline.store import TransitionStore, open_store
from trainer.d3rlpy_adapter import import_d3rlpy, to_mdp_dataset
from trainer.samplers import TransitionArrays

from .conftest import (
    PYTHON,
    REPO,
    assert_one_error_line,
    build_store,
    run_cli,
    write_lines,
    write_spec,
)

d3rlpy = import_d3rlpy()

OBS_DIM = 3
ACT_DIM = 2
N_ACTIONS = 5

# (episode id, steps, end flags on the last step, final observation given)
# "stops": neither flag (a log that just stops: truncated); "both": both flags (terminated).
# Truncated / stopped without a final observation: the store drops the last step.
CASES: tuple[tuple[str, int, str, bool], ...] = (
    ("term-final", 4, "terminated", True),
    ("trunc-final", 5, "truncated", True),
    ("term-nofinal", 3, "terminated", False),
    ("cut-nofinal", 4, "truncated", False),
    ("stops-final", 3, "stops", True),
    ("stops-nofinal", 3, "stops", False),
    ("both", 2, "both", False),
    ("one-step-term", 1, "terminated", False),
    ("one-step-trunc", 1, "truncated", True),
    ("two-step-cut", 2, "truncated", False),
    ("one-step-cut", 1, "truncated", False),  # no transition at all: quarantined
)


def records(discrete: bool, seed: int = 0, integral_actions: bool = False) -> list[dict[str, Any]]:
    """step_per_line records of CASES; values are multiples of 1/16, exact in float32."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []

    def vec(k: int) -> list[float]:
        return (rng.integers(-64, 64, size=k) / 16).tolist()

    for ep, length, end, final in CASES:
        for t in range(length):
            last = t == length - 1
            if discrete:
                act: Any = int(rng.integers(0, N_ACTIONS))
            elif integral_actions:
                act = rng.integers(-2, 3, size=ACT_DIM).astype(float).tolist()
            else:  # never whole numbers: d3rlpy would take them for discrete actions
                act = ((rng.integers(-32, 32, size=ACT_DIM) + 0.5) / 16).tolist()
            rec: dict[str, Any] = {
                "ep": ep,
                "t": t,
                "obs": vec(OBS_DIM),
                "act": act,
                "rew": float(rng.integers(-64, 64) / 16),
                "term": last and end in ("terminated", "both"),
                "trunc": last and end in ("truncated", "both"),
            }
            if last and final:
                rec["final_obs"] = vec(OBS_DIM)
            out.append(rec)
    if discrete:  # every action index occurs, so that d3rlpy infers action_size = n
        out[0]["act"], out[1]["act"] = N_ACTIONS - 1, 0
    return out


def make_store(
    tmp: Path,
    discrete: bool,
    layout: str = "arrow",
    *,
    integral_actions: bool = False,
    lines: list[dict[str, Any]] | None = None,
) -> Path:
    """A transition store of CASES: layout ``arrow`` (one file), ``parts`` (3 rows a part,
    so that episodes straddle parts) or ``zarr``."""
    write_lines(
        tmp / "raw" / "steps.jsonl", lines or records(discrete, integral_actions=integral_actions)
    )
    action: dict[str, Any] = (
        {"path": "act", "type": "discrete", "n": N_ACTIONS}
        if discrete
        else {"path": "act", "type": "continuous", "shape": [ACT_DIM], "low": -4.0, "high": 4.0}
    )
    fields = {
        "observation": {"path": "obs", "shape": [OBS_DIM]},
        "action": action,
        "reward": {"path": "rew"},
        "terminated": {"path": "term"},
        "truncated": {"path": "trunc"},
        "final_observation": {"path": "final_obs"},
    }
    store: dict[str, Any] = {"format": "zarr" if layout == "zarr" else "arrow", "discount": 0.9}
    if layout == "parts":
        store["part_rows"] = 3
    spec = write_spec(tmp, [tmp / "raw" / "*.jsonl"], name="s", fields=fields, store=store)
    return build_store(spec, tmp / "stores").path


def load(path: Path) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        return d3rlpy.dataset.ReplayBuffer.load(str(path), d3rlpy.dataset.InfiniteBuffer())


def picked(buffer: Any) -> list[Any]:
    """Every transition of a d3rlpy buffer, in buffer order, by d3rlpy's own picker."""
    return [buffer.transition_picker(*buffer.buffer[k]) for k in range(buffer.transition_count)]


def reference(store: TransitionStore) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What d3rlpy must hold, by a plain loop over the store's rows: each row's transition
    (a terminal one has d3rlpy's zero next observation), and each episode's rows (one more
    after a truncated episode: its final observation, reward 0, the last action again)."""
    obs = np.asarray(store.observations)
    act = np.asarray(store.actions)
    rew = np.asarray(store.rewards)
    nxt = np.asarray(store.next_observations)
    term, trunc = store.terminated, store.truncated
    transitions: list[dict[str, Any]] = []
    episodes: list[dict[str, Any]] = []
    rows: list[int] = []
    for i in range(len(rew)):
        a = np.array([act[i]]) if act.ndim == 1 else act[i]
        transitions.append(
            {
                "observation": obs[i],
                "action": a,
                "reward": np.array([rew[i]], dtype=np.float32),
                "next_observation": np.zeros(OBS_DIM, np.float32) if term[i] else nxt[i],
                "terminal": np.float64(1.0 if term[i] else 0.0),
            }
        )
        rows.append(i)
        if term[i] or trunc[i]:
            o = [obs[j] for j in rows]
            acts = [np.array([act[j]]) if act.ndim == 1 else act[j] for j in rows]
            r = [[rew[j]] for j in rows]
            if trunc[i]:
                o.append(nxt[i])
                acts.append(acts[-1])
                r.append([0.0])
            episodes.append(
                {
                    "observations": np.array(o, dtype=np.float32),
                    "actions": np.array(acts),
                    "rewards": np.array(r, dtype=np.float32),
                    "terminated": bool(term[i]),
                }
            )
            rows = []
    return transitions, episodes


def assert_transitions(got: list[Any], want: list[dict[str, Any]], who: str) -> None:
    assert len(got) == len(want), (who, len(got), len(want))
    for k, (g, w) in enumerate(zip(got, want)):
        for name, value in w.items():
            np.testing.assert_array_equal(getattr(g, name), value, err_msg=f"{who} {k} {name}")
        assert np.asarray(g.action).dtype == np.asarray(w["action"]).dtype, (who, k)


def assert_episodes(got: Any, want: list[dict[str, Any]], who: str) -> None:
    assert len(got) == len(want), (who, len(got), len(want))
    for k, (g, w) in enumerate(zip(got, want)):
        assert bool(g.terminated) is w["terminated"], (who, k)
        for name in ("observations", "actions", "rewards"):
            value = getattr(g, name)
            np.testing.assert_array_equal(value, w[name], err_msg=f"{who} episode {k} {name}")
            assert value.dtype == w[name].dtype, (who, k, name, value.dtype, w[name].dtype)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    ("discrete", "layout"),
    [(True, "arrow"), (False, "arrow"), (False, "parts"), (True, "zarr")],
)
def test_loaded_file_holds_the_adapters_transitions(
    tmp_path: Path, discrete: bool, layout: str
) -> None:
    path = make_store(tmp_path, discrete, layout)
    store = open_store(path)
    out = tmp_path / "export" / "d.h5"
    lines = d3rlpy_export.export(path, out)
    assert lines[0].startswith(f"wrote {out}: {len(CASES) - 1} episodes")  # one unbootstrappable
    assert not any(line.startswith("note:") for line in lines), lines

    want_transitions, want_episodes = reference(store)
    # the store itself, as the cases say: a truncated episode without a final observation
    # lost its last step; the other episodes kept every step
    lengths = dict(zip(store.episodes.episode_id, store.episodes.length.tolist()))
    assert "one-step-trunc" in lengths and "one-step-cut" not in lengths
    for ep, length, end, final in CASES:
        if ep in lengths:
            dropped = end in ("truncated", "stops") and not final
            assert lengths[ep] == length - dropped, ep
    ends = [(e["terminated"]) for e in want_episodes]
    assert ends == store.episodes.terminated.tolist()
    assert sum(ends) == 4 and len(ends) - sum(ends) == 6  # terminals and timeouts apart

    loaded = load(out)
    with contextlib.redirect_stdout(io.StringIO()):
        adapter = to_mdp_dataset(TransitionArrays.from_store(store), store.action_space)
    for who, buffer in (("loaded", loaded), ("adapter", adapter)):
        assert buffer.transition_count == store.n_transitions, who
        assert_transitions(picked(buffer), want_transitions, who)
        assert_episodes(buffer.episodes, want_episodes, who)
    # the last transition of each truncated episode bootstraps from the store's final
    # next_observation; a terminated one is terminal
    last_rows = store.episodes.start + store.episodes.length - 1
    nxt = np.asarray(store.next_observations)
    for e, episode in enumerate(loaded.episodes):
        t = loaded.transition_picker(episode, episode.transition_count - 1)
        if store.episodes.truncated[e]:
            assert t.terminal == 0.0
            np.testing.assert_array_equal(t.next_observation, nxt[last_rows[e]])
        else:
            assert t.terminal == 1.0 and store.episodes.terminated[e]
    info, want_info = loaded.dataset_info, adapter.dataset_info
    assert info.action_space == want_info.action_space
    assert info.action_space == (
        d3rlpy.ActionSpace.DISCRETE if discrete else d3rlpy.ActionSpace.CONTINUOUS
    )
    assert info.action_size == want_info.action_size == (N_ACTIONS if discrete else ACT_DIM)
    assert info.observation_signature == want_info.observation_signature
    assert info.action_signature == want_info.action_signature
    assert info.reward_signature == want_info.reward_signature


def h5_contents(path: Path) -> dict[str, tuple[str, tuple[int, ...], Any]]:
    """Each dataset of an HDF5 file: (dtype kind, shape, value), strings decoded."""
    out: dict[str, tuple[str, tuple[int, ...], Any]] = {}
    with h5py.File(path, "r") as h5:
        for name, ds in h5.items():
            value = ds[()]
            if h5py.check_string_dtype(ds.dtype) is not None:
                kind = "str"
                value = (
                    [v.decode() for v in value] if isinstance(value, np.ndarray) else value.decode()
                )
            else:
                kind = ds.dtype.str
            out[name] = (kind, ds.shape, value)
    return out


@pytest.mark.parametrize("discrete", [True, False])
def test_layout_is_what_d3rlpys_own_dump_writes(tmp_path: Path, discrete: bool) -> None:
    """The exported file, dataset by dataset (name, dtype, shape, value), is the file d3rlpy's
    ``ReplayBuffer.dump`` writes for the adapter's dataset of the same store."""
    assert d3rlpy_export.DATASET_VERSION == d3rlpy.dataset.io.DATASET_VERSION
    path = make_store(tmp_path, discrete, "parts" if discrete else "arrow")
    store = open_store(path)
    d3rlpy_export.export(path, tmp_path / "ours.h5")
    with contextlib.redirect_stdout(io.StringIO()):
        adapter = to_mdp_dataset(TransitionArrays.from_store(store), store.action_space)
    with (tmp_path / "theirs.h5").open("w+b") as f:
        adapter.dump(f)
    ours, theirs = h5_contents(tmp_path / "ours.h5"), h5_contents(tmp_path / "theirs.h5")
    assert sorted(ours) == sorted(theirs)
    for name, (kind, shape, value) in theirs.items():
        assert ours[name][:2] == (kind, shape), (name, ours[name][:2], (kind, shape))
        np.testing.assert_array_equal(ours[name][2], value, err_msg=name)
    with h5py.File(tmp_path / "ours.h5", "r") as h5:
        assert h5.attrs["offrl_store_content_hash"] == store.content_hash
        assert h5.attrs["offrl_action_size"] == (N_ACTIONS if discrete else ACT_DIM)


# --------------------------------------------------------------------------- action space


def test_notes_where_d3rlpy_would_infer_the_action_space_wrong(tmp_path: Path) -> None:
    # continuous actions that are all whole numbers: d3rlpy's load takes them for discrete
    path = make_store(tmp_path / "c", False, integral_actions=True)
    out = tmp_path / "c.h5"
    lines = d3rlpy_export.export(path, out)
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "action_space=d3rlpy.ActionSpace.CONTINUOUS" in notes[0]
    assert load(out).dataset_info.action_space == d3rlpy.ActionSpace.DISCRETE
    with contextlib.redirect_stdout(io.StringIO()):  # the load the note gives
        buffer = d3rlpy.dataset.ReplayBuffer(
            d3rlpy.dataset.InfiniteBuffer(),
            episodes=d3rlpy.dataset.load(d3rlpy.dataset.Episode, str(out)),
            action_space=d3rlpy.ActionSpace.CONTINUOUS,
            action_size=ACT_DIM,
        )
    assert buffer.dataset_info.action_space == d3rlpy.ActionSpace.CONTINUOUS
    assert buffer.transition_count == open_store(path).n_transitions

    # a discrete space whose largest index never occurs: d3rlpy infers a smaller size
    lines_d = records(True)
    for rec in lines_d:
        rec["act"] = min(rec["act"], N_ACTIONS - 2)
    path = make_store(tmp_path / "d", True, lines=lines_d)
    notes = [x for x in d3rlpy_export.export(path, tmp_path / "d.h5") if x.startswith("note:")]
    assert len(notes) == 1 and f"action_size={N_ACTIONS})" in notes[0], notes
    assert load(tmp_path / "d.h5").dataset_info.action_size == N_ACTIONS - 1


# --------------------------------------------------------------------------- errors


def segment_store(tmp: Path) -> Path:
    """A tiny QA segment store."""
    from pipeline.build import build

    context = "the code of a falcon is zephyr and it lives in marrowby"
    write_lines(
        tmp / "qa" / "q.jsonl",
        [
            {
                "id": "q1",
                "question": "what is the code",
                "context": context,
                "answers": [{"text": "zephyr", "answer_start": context.index("zephyr")}],
            }
        ],
    )
    spec = tmp / "qa.yaml"
    spec.write_text(
        "name: qa\nkind: segments\n"
        f"source: {{paths: ['{tmp / 'qa' / '*.jsonl'}'], format: jsonl}}\n"
        "tokenizer: {train: {vocab_size: 200, min_frequency: 1}}\n"
        "segments: {max_tokens: 16, stride: 12, max_question_tokens: 6}\n"
        "store: {format: arrow}\n",
        encoding="utf-8",
    )
    return build(spec, tmp / "stores", progress=False).path


def test_user_errors_are_one_line_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_store(tmp_path, True)
    out = tmp_path / "d.h5"

    seg = segment_store(tmp_path / "seg")
    with pytest.raises(StoreError, match="a segments store; --to d3rlpy exports transition"):
        d3rlpy_export.export(seg, out)
    with pytest.raises(StoreError, match="not a store"):
        d3rlpy_export.export(tmp_path / "nowhere", out)
    assert not out.exists()

    # a store that does not verify (one byte of its data changed) is not exported
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(path), str(broken)], check=True)
    data = bytearray((broken / "transitions.arrow").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "transitions.arrow").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not verify, so it is not exported"):
        d3rlpy_export.export(broken, out)
    assert not out.exists()

    d3rlpy_export.export(path, out)
    before = out.read_bytes()
    with pytest.raises(StoreError, match="exists; pass --force"):
        d3rlpy_export.export(path, out)
    out.write_bytes(b"not hdf5")
    d3rlpy_export.export(path, out, force=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")) == []
    with pytest.raises(StoreError, match="a directory"):
        d3rlpy_export.export(path, tmp_path, force=True)
    with pytest.raises(StoreError, match="takes no --format"):
        d3rlpy_export.export(path, tmp_path / "e.h5", file_format="parquet")

    monkeypatch.setitem(sys.modules, "h5py", None)  # h5py not installed
    with pytest.raises(StoreError, match=r'pip install -e "\.\[d3rlpy\]"'):
        d3rlpy_export.export(path, tmp_path / "f.h5")


def test_cli_exit_codes_and_one_error_line(tmp_path: Path) -> None:
    path = make_store(tmp_path, False)
    out = tmp_path / "out" / "d.h5"
    proc = run_cli("pipeline.export", path, "--to", "d3rlpy", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: ") and "Traceback" not in proc.stderr
    assert load(out).transition_count == open_store(path).n_transitions

    assert_one_error_line(
        run_cli("pipeline.export", path, "--to", "d3rlpy", "--out", out), "exists", "--force"
    )
    proc = run_cli("pipeline.export", path, "--to", "d3rlpy", "--out", out, "--force")
    assert proc.returncode == 0, proc.stderr
    seg = segment_store(tmp_path / "seg")
    assert_one_error_line(
        run_cli("pipeline.export", seg, "--to", "d3rlpy", "--out", tmp_path / "s.h5"),
        "segments store",
        "--to hf",
    )


def test_importing_the_exporter_imports_neither_h5py_nor_d3rlpy() -> None:
    code = (
        "import sys, pipeline.export, pipeline.interchange.d3rlpy_export; "
        "print(sorted(m for m in ('h5py', 'd3rlpy', 'torch') if m in sys.modules))"
    )
    proc = subprocess.run(
        [PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout
