"""A build is the same for any number of worker processes: the pool only decides where
the per-chunk functions run, never what the store holds."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.arrowio import file_digest
from pipeline.format import QUARANTINE
from pipeline.store import open_store

from .conftest import (
    PYTHON,
    REPO,
    Layout,
    build_store,
    dumps,
    episode_lines,
    run_cli,
    step_fields,
    step_record,
    write_lines,
    write_spec,
)

FILES = ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst")


def _episode(rng: np.random.Generator, eid: Any, n: int) -> list[dict[str, Any]]:
    """The step records of one episode with random values and a random ending."""
    end = rng.integers(0, 3)  # terminated, truncated with a final observation, just stops
    out = []
    for t in range(n):
        rec = step_record(eid, t, last=bool(end == 0 and t == n - 1))
        rec.update(obs=(rng.integers(-8, 8, 3) / 4).tolist(), rew=float(rng.integers(-4, 4)))
        out.append(rec)
    if end == 1:
        out[-1].update(trunc=True, final_obs=[0.25, 0.5, 0.75])
    return out


def _step_corpus(rng: np.random.Generator) -> dict[str, list[bytes]]:
    """step_per_line records of 40 episodes shuffled over three files, with faults."""
    records: list[dict[str, Any]] = []
    for e in range(40):
        records += _episode(rng, f"e{e}", int(rng.integers(1, 9)))
    records[5]["rew"] = "x"  # wrong type: rejects its episode, whose records are anywhere
    records[9]["obs"] = [1.0, 2.0]  # wrong length
    records += [step_record("gap", 0), step_record("gap", 2, last=True)]
    records += [step_record("dup", 0), step_record("dup", 0), step_record("dup", 1, last=True)]
    records += [step_record("7", 0), {**step_record("7", 1, last=True), "ep": 7}]  # two types
    records += episode_lines("early", 3, term=True)[:2]  # terminated, then goes on
    records[-2]["term"] = True
    lines = [dumps(r) for r in records]
    lines += [b"", b'{"ep": "e1", "t": 1e999}', b"   "]
    lines += [b"not json %d" % i for i in range(15)]  # in most chunks: their order shows
    order = rng.permutation(len(lines))
    files: dict[str, list[bytes]] = {name: [] for name in FILES}
    for k, i in enumerate(order):
        files[FILES[k % len(FILES)]].append(lines[i])
    return files


def _episode_corpus(rng: np.random.Generator) -> dict[str, list[bytes]]:
    """episode_per_line records of 60 episodes over three files, with faults and ids used
    twice (a valid second copy, and a copy rejected before the valid one)."""
    lines: list[bytes] = []
    for e in range(60):
        steps = _episode(rng, "-", int(rng.integers(1, 9)))
        rec: dict[str, Any] = {"episode": f"e{e % 50}", "steps": steps}
        for s in steps:
            s.pop("ep"), s.pop("t")
            if "final_obs" in s:
                rec["final_obs"] = s.pop("final_obs")
        if e == 7:
            rec["steps"][0]["act"] = 99  # out of range
        if e == 11:
            rec["steps"] = []
        lines.append(dumps(rec))
    lines += [b"{truncated", b"", b"[1, 2]"]
    order = rng.permutation(len(lines))
    files: dict[str, list[bytes]] = {name: [] for name in FILES}
    for k, i in enumerate(order):
        files[FILES[min(k * len(FILES) // len(order), len(FILES) - 1)]].append(lines[i])
    return files


CASES: dict[str, tuple[Layout, dict[str, Any]]] = {
    "episode_per_line": ("episode_per_line", {}),
    "step_per_line": ("step_per_line", {}),
    "step_per_line-spilled": (
        "step_per_line",
        {"bucket_bytes": 200, "in_memory_bytes": 0, "merge_rows": 5},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_or_two_workers_build_the_same_store(tmp_path: Path, case: str) -> None:
    layout, options = CASES[case]
    rng = np.random.default_rng(7)
    corpus = _step_corpus(rng) if layout == "step_per_line" else _episode_corpus(rng)
    for name, lines in corpus.items():
        write_lines(tmp_path / "raw" / name, lines)
    spec = write_spec(tmp_path, [tmp_path / "raw" / "*"], layout=layout, fields=step_fields())
    stores = {}
    for workers in (1, 2):
        result = build_store(
            spec, tmp_path / f"out-{workers}", chunk_bytes=600, workers=workers, **options
        )
        assert result.manifest["build_workers"] == workers  # the pool really ran
        stores[workers] = result
    one, two = (stores[w].manifest for w in (1, 2))
    assert two["content_hash"] == one["content_hash"]
    assert two["column_digests"] == one["column_digests"]
    assert two["counts"] == one["counts"]
    assert two["sources"] == one["sources"]
    assert two["statistics"] == one["statistics"]
    q1, q2 = (stores[w].path / QUARANTINE for w in (1, 2))
    assert file_digest(q2) == file_digest(q1)
    # the corpus exercises what it should: faults of several kinds, and kept episodes
    assert len(one["quarantine_reasons"]) >= 4, one["quarantine_reasons"]
    assert one["counts"]["episodes"] >= 20
    if "bucket_bytes" in options:
        assert (tmp_path / "out-2").exists() and one["counts"]["transitions"] > 0
    s = open_store(stores[2].path)
    assert len(s.episodes) == one["counts"]["episodes"]


def test_workers_on_the_command_line(tmp_path: Path) -> None:
    write_lines(tmp_path / "raw" / "a.jsonl", episode_lines("a") + episode_lines("b"))
    spec = write_spec(tmp_path, [tmp_path / "raw" / "a.jsonl"])
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out", "--workers", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --workers"), proc.stderr
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    # an input of one chunk is parsed in the building process: no pool to start
    assert open_store(tmp_path / "out" / "store").manifest["build_workers"] == 1


def test_small_inputs_build_in_process_by_default(tmp_path: Path) -> None:
    """Without --workers, an input under POOL_MIN_BYTES starts no pool, however small its
    chunks (starting workers would take longer than the build)."""
    write_lines(tmp_path / "raw" / "a.jsonl", episode_lines("a") + episode_lines("b"))
    spec = write_spec(tmp_path, [tmp_path / "raw" / "a.jsonl"])
    result = build_store(spec, tmp_path / "out", chunk_bytes=97)
    assert result.manifest["build_workers"] == 1


ORPHAN_SCRIPT = """
import os, time
from pipeline.engine import LocalEngine

def report_and_sleep(context, seconds):
    print(os.getpid(), flush=True)
    time.sleep(seconds)

if __name__ == "__main__":
    with LocalEngine(None, workers=2) as engine:
        for _ in engine.map(report_and_sleep, [60.0, 60.0]):
            pass
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_exit_when_the_build_is_killed(tmp_path: Path) -> None:
    """A worker blocked on its task queue would outlive a killed build; it must not."""
    script = tmp_path / "build.py"
    script.write_text(ORPHAN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([PYTHON, str(script)], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    pids: list[int] = []
    try:
        pids = [int(proc.stdout.readline()) for _ in range(2)]  # the workers are running
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
        for p in filter(_alive, pids):
            os.kill(p, signal.SIGKILL)
