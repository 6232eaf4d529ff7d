"""Shared helpers for the pipeline tests.

* writing trajectory JSONL (plain, ``.gz``, ``.zst``) and a spec YAML into a directory;
* building a store in-process or through the real CLI in a subprocess;
* a Hypothesis strategy for random episodes, and a plain Python reference of the
  transitions a store must hold for them (the semantics of DESIGN.md, one loop).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import yaml
import zstandard
from hypothesis import strategies as st

from pipeline.build import BuildResult, build
from pipeline.format import QUARANTINE
from pipeline.verify import verify

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

OBS_DIM = 3
N_ACTIONS = 4
STEP_PARTS = ("part-0.jsonl", "part-1.jsonl.gz", "part-2.jsonl.zst")

End = Literal["terminated", "truncated", "both", "none"]
Layout = Literal["step_per_line", "episode_per_line"]


# --------------------------------------------------------------------------- files


def dumps(obj: Any) -> bytes:
    """One compact JSON line (no newline); NaN/inf floats are written as JSON5 literals."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def write_lines(path: Path, lines: Iterable[bytes | str | Mapping[str, Any]]) -> Path:
    """Write JSONL lines, compressed by suffix (``.gz``, ``.zst``); dicts are dumped."""
    parts = []
    for line in lines:
        if isinstance(line, Mapping):
            line = dumps(line)
        elif isinstance(line, str):
            line = line.encode("utf-8")
        parts.append(line + b"\n")
    data = b"".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def read_lines(path: Path) -> list[bytes]:
    """The decoded lines of a JSONL file (any supported compression)."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        with zstandard.ZstdDecompressor().stream_reader(data) as r:
            data = r.read()
    return data.splitlines()


def step_fields(
    *,
    final_observation: bool = True,
    obs_dim: int = OBS_DIM,
    n_actions: int = N_ACTIONS,
) -> dict[str, Any]:
    """The `fields` of a spec for the records that :class:`Episode` writes."""
    fields: dict[str, Any] = {
        "observation": {"path": "obs", "shape": [obs_dim]},
        "action": {"path": "act", "type": "discrete", "n": n_actions},
        "reward": {"path": "rew"},
        "terminated": {"path": "term"},
        "truncated": {"path": "trunc"},
    }
    if final_observation:
        fields["final_observation"] = {"path": "final_obs"}
    return fields


def write_spec(
    directory: Path,
    paths: Sequence[str | Path],
    *,
    name: str = "store",
    layout: Layout = "step_per_line",
    fields: Mapping[str, Any] | None = None,
    fmt: str = "arrow",
    discount: float = 0.99,
    file_name: str | None = None,
    **extra: Any,
) -> Path:
    """Write a transition spec YAML whose globs are absolute paths; returns its path."""
    source: dict[str, Any] = {"paths": [str(p) for p in paths], "layout": layout}
    if layout == "step_per_line":
        source.update(episode_key="ep", step_key="t")
    else:
        source.update(episode_key="episode", steps_key="steps")
    spec: dict[str, Any] = {
        "name": name,
        "kind": "transitions",
        "source": source,
        "fields": dict(fields) if fields is not None else step_fields(),
        "store": {"format": fmt, "discount": discount},
        **extra,
    }
    path = directory / (file_name or f"{name}.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


# Build options that force the streaming machinery on tiny inputs: chunks of a line or
# two, step_per_line steps spilled to many buckets on disk, merged back in order a few
# rows at a time.
SPILL: dict[str, Any] = {
    "chunk_bytes": 97,
    "bucket_bytes": 64,
    "in_memory_bytes": 0,
    "merge_rows": 8,
}


def build_store(spec: Path, out: Path, **kwargs: Any) -> BuildResult:
    """Build in-process (no progress bar) and check that the store verifies."""
    kwargs.setdefault("progress", False)
    result = build(spec, out, **kwargs)
    assert verify(result.path) == []
    return result


def quarantine_records(store: Path) -> list[dict[str, Any]]:
    with (store / QUARANTINE).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_cli(
    module: str, *args: str | Path, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` in a real subprocess, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [PYTHON, "-m", module, *map(str, args)],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A user error: exit 1, exactly one `error: ...` line on stderr, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([PYTHON, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class Episode:
    """One generated episode, writable in both layouts.

    ``end`` says how the log marks its end: ``terminated`` / ``truncated`` set on the last
    step, ``both`` flags at once, or ``none`` (a log that just stops).
    """

    episode_id: str
    observations: tuple[tuple[float, ...], ...]  # (L, obs_dim)
    actions: tuple[int, ...]  # (L,)
    rewards: tuple[float, ...]  # (L,)
    end: End
    final_observation: tuple[float, ...] | None = None
    first_step: int = 0  # step_per_line: the step index of the first step (the store counts from 0)

    def __len__(self) -> int:
        return len(self.actions)

    def _flags(self, t: int) -> tuple[bool, bool]:
        last = t == len(self) - 1
        term = last and self.end in ("terminated", "both")
        trunc = last and self.end in ("truncated", "both")
        return term, trunc

    def _step(self, t: int) -> dict[str, Any]:
        term, trunc = self._flags(t)
        return {
            "obs": list(self.observations[t]),
            "act": self.actions[t],
            "rew": self.rewards[t],
            "term": term,
            "trunc": trunc,
        }

    def step_records(self) -> list[dict[str, Any]]:
        """step_per_line: one record per step; the last carries the final observation."""
        out = []
        for t in range(len(self)):
            rec = {"ep": self.episode_id, "t": self.first_step + t, **self._step(t)}
            if t == len(self) - 1 and self.final_observation is not None:
                rec["final_obs"] = list(self.final_observation)
            out.append(rec)
        return out

    def episode_record(self) -> dict[str, Any]:
        """episode_per_line: the episode as one record, final observation at top level."""
        rec: dict[str, Any] = {
            "episode": self.episode_id,
            "steps": [self._step(t) for t in range(len(self))],
        }
        if self.final_observation is not None:
            rec["final_obs"] = list(self.final_observation)
        return rec


@dataclass
class Written:
    """Where the records of a generated dataset went: file name -> records in line order."""

    directory: Path
    files: dict[str, list[dict[str, Any]]]
    layout: Layout

    @property
    def glob(self) -> str:
        return str(self.directory / "*.jsonl*")

    def first_appearance(self) -> dict[str, tuple[str, int]]:
        """Episode id -> (file, 1-based line) of its first record in (file, line) order."""
        key = "ep" if self.layout == "step_per_line" else "episode"
        out: dict[str, tuple[str, int]] = {}
        for name in sorted(self.files):
            for i, rec in enumerate(self.files[name], start=1):
                out.setdefault(rec[key], (name, i))
        return out

    def lines_of(self, episode_id: str) -> list[tuple[str, int]]:
        key = "ep" if self.layout == "step_per_line" else "episode"
        return [
            (name, i)
            for name in sorted(self.files)
            for i, rec in enumerate(self.files[name], start=1)
            if rec[key] == episode_id
        ]

    def rewrite(self) -> None:
        for name, recs in self.files.items():
            write_lines(self.directory / name, recs)

    @property
    def n_records(self) -> int:
        return sum(len(v) for v in self.files.values())


def write_episodes(
    directory: Path,
    episodes: Sequence[Episode],
    layout: Layout,
    *,
    order: Sequence[int] | None = None,
    file_of: Sequence[int] | None = None,
) -> Written:
    """Write episodes into ``directory``.

    step_per_line: all step records, permuted by ``order``, record ``k`` (in permuted
    order) going to ``STEP_PARTS[file_of[k]]`` (a plain, a .gz and a .zst file);
    episode_per_line: one line per episode in one ``.jsonl.zst`` file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict[str, Any]]]
    if layout == "step_per_line":
        records = [r for ep in episodes for r in ep.step_records()]
        perm = list(order) if order is not None else list(range(len(records)))
        assert sorted(perm) == list(range(len(records)))
        where = list(file_of) if file_of is not None else [0] * len(records)
        files = {name: [] for name in STEP_PARTS}
        for k, i in enumerate(perm):
            files[STEP_PARTS[where[k] % len(STEP_PARTS)]].append(records[i])
    else:
        files = {"episodes.jsonl.zst": [ep.episode_record() for ep in episodes]}
    written = Written(directory, files, layout)
    written.rewrite()
    return written


# --------------------------------------------------------------------------- reference


@dataclass
class RefEpisode:
    """What the store must hold for one kept episode."""

    episode_id: str
    observation: np.ndarray  # (k, obs_dim) float32
    action: np.ndarray  # (k,) int64
    reward: np.ndarray  # (k,) float32
    next_observation: np.ndarray  # (k, obs_dim) float32
    terminated: bool
    truncated: bool
    return_to_go: np.ndarray  # (k,) float64
    dropped_last: bool
    episode_return: float  # every logged reward, a dropped last step's too
    dropped_reward: float  # the dropped last step's reward, else 0


@dataclass
class Reference:
    episodes: list[RefEpisode] = field(default_factory=list)
    unbootstrappable: list[str] = field(default_factory=list)

    @property
    def n_transitions(self) -> int:
        return sum(len(e.action) for e in self.episodes)


def reference_transitions(episodes: Sequence[Episode], gamma: float) -> Reference:
    """The store's semantics as one plain loop over episodes and steps."""
    ref = Reference()
    for ep in episodes:
        length = len(ep)
        terminated = ep.end in ("terminated", "both")
        truncated = not terminated  # truncated, or a log that just stops
        has_final = ep.final_observation is not None
        keep = length
        if truncated and not has_final:
            if length == 1:
                ref.unbootstrappable.append(ep.episode_id)
                continue
            keep = length - 1
        obs, nxt, act, rew = [], [], [], []
        for t in range(keep):
            obs.append(ep.observations[t])
            if t + 1 < length:
                nxt.append(ep.observations[t + 1])
            elif has_final:
                assert ep.final_observation is not None
                nxt.append(ep.final_observation)
            else:  # terminated without a final observation: repeated, never used
                nxt.append(ep.observations[t])
            act.append(ep.actions[t])
            rew.append(ep.rewards[t])
        # every logged reward counts, the dropped last step's too: sum over all `length`
        rtg = [0.0] * keep
        for t in range(keep):
            rtg[t] = sum(gamma ** (j - t) * ep.rewards[j] for j in range(t, length))
        ref.episodes.append(
            RefEpisode(
                episode_id=ep.episode_id,
                observation=np.asarray(obs, dtype=np.float32).reshape(keep, -1),
                action=np.asarray(act, dtype=np.int64),
                reward=np.asarray(rew, dtype=np.float32),
                next_observation=np.asarray(nxt, dtype=np.float32).reshape(keep, -1),
                terminated=terminated,
                truncated=truncated,
                return_to_go=np.asarray(rtg, dtype=np.float64),
                dropped_last=keep < length,
                episode_return=float(sum(ep.rewards)),
                dropped_reward=float(ep.rewards[-1]) if keep < length else 0.0,
            )
        )
    return ref


# --------------------------------------------------------------------------- strategies

# Multiples of 1/8 in [-16, 16]: exact in float32, so stored values compare with ==.
values = st.integers(-128, 128).map(lambda k: k / 8)
episode_ids = st.text(alphabet="abcxyz019-_é", min_size=1, max_size=6)


@st.composite
def episode_st(
    draw: st.DrawFn, episode_id: str, max_len: int = 8, obs_dim: int = OBS_DIM
) -> Episode:
    length = draw(st.integers(1, max_len))
    obs = st.tuples(*[values] * obs_dim)
    return Episode(
        episode_id=episode_id,
        observations=tuple(draw(st.lists(obs, min_size=length, max_size=length))),
        actions=tuple(
            draw(st.lists(st.integers(0, N_ACTIONS - 1), min_size=length, max_size=length))
        ),
        rewards=tuple(draw(st.lists(values, min_size=length, max_size=length))),
        end=draw(st.sampled_from(["terminated", "truncated", "none", "both"])),
        final_observation=draw(st.none() | obs),
        first_step=draw(st.sampled_from([0, 0, 1, 1000])),
    )


@st.composite
def episode_sets(draw: st.DrawFn, max_episodes: int = 6, max_len: int = 8) -> list[Episode]:
    """1..max_episodes episodes with distinct ids, lengths 1..max_len."""
    ids = draw(st.lists(episode_ids, min_size=1, max_size=max_episodes, unique=True))
    return [draw(episode_st(i, max_len=max_len)) for i in ids]


@st.composite
def placements(draw: st.DrawFn, n_records: int) -> tuple[list[int], list[int]]:
    """A shuffle of ``n_records`` step lines and, for each, which of STEP_PARTS it goes to."""
    order = draw(st.permutations(range(n_records)))
    file_of = draw(
        st.lists(st.integers(0, len(STEP_PARTS) - 1), min_size=n_records, max_size=n_records)
    )
    return list(order), file_of


def n_step_records(episodes: Sequence[Episode]) -> int:
    return sum(len(e) for e in episodes)


def step_record(ep: str, t: int, *, last: bool = False, **override: Any) -> dict[str, Any]:
    """A valid step_per_line record for :func:`step_fields` (override or add fields)."""
    rec: dict[str, Any] = {
        "ep": ep,
        "t": t,
        "obs": [float(t), 0.5, -1.0],
        "act": t % N_ACTIONS,
        "rew": 1.0,
        "term": last,
        "trunc": False,
    }
    rec.update(override)
    return rec


def episode_lines(ep: str, length: int = 3, **last_override: Any) -> list[dict[str, Any]]:
    """The step records of one terminated episode, in order."""
    out = [step_record(ep, t, last=t == length - 1) for t in range(length)]
    out[-1].update(last_override)
    return out


def write_big_input(directory: Path, n_steps: int, episode_length: int = 100) -> Path:
    """One plain JSONL file of ``n_steps`` step lines (terminated episodes); returns it."""
    rng = np.random.default_rng(0)
    obs = rng.integers(-1000, 1000, size=(n_steps, OBS_DIM)) / 8
    t = np.arange(n_steps) % episode_length
    ep = np.arange(n_steps) // episode_length
    lines = [
        f'{{"ep":"e{ep[i]}","t":{t[i]},"obs":[{o[0]},{o[1]},{o[2]}],"act":{i % N_ACTIONS},'
        f'"rew":{o[0]},"term":{"true" if t[i] == episode_length - 1 else "false"},"trunc":false}}\n'
        for i, o in enumerate(obs.tolist())
    ]
    path = directory / "big.jsonl"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- demo data

DEMO_SPECS = ("cartpole-mixed", "pendulum-mixed", "pendulum-mixed-zarr", "replay-demo")


@pytest.fixture(scope="session")
def demo_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped demo specs, built by the real CLI from freshly generated demo data.

    The specs' globs are relative (``data/raw/...``), so everything runs in a scratch
    working directory; the result maps each spec name to its store.
    """
    cwd = tmp_path_factory.mktemp("demo")
    gen = subprocess.run(
        [
            PYTHON,
            str(REPO / "scripts" / "make_demo_data.py"),
            "--out",
            "data/raw",
            "--scale",
            "0.1",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert gen.returncode == 0, gen.stderr
    stores = {}
    for name in DEMO_SPECS:
        proc = run_cli(
            "pipeline.build", REPO / "data_specs" / f"{name}.yaml", "--out", "stores", cwd=cwd
        )
        assert proc.returncode == 0, proc.stderr
        assert "built in" in proc.stdout
        stores[name] = cwd / "stores" / name
    return stores
