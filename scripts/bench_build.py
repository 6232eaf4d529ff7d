"""Benchmark ``pipeline.build`` against the orjson parse floor and a json.loads loop, in one run.

    python scripts/bench_build.py [--steps 1000000] [--rounds 3] [--quick] [--big-steps N]

Generates JSONL of episodes with 17-float observations and 6-float actions in both
layouts (one episode per line, one step per line), then, in each of ``--rounds`` rounds,
times every variant on the same files, interleaved (their order rotates from round to
round) so that other load on the machine hits all of them alike:

* the parse floor: ``orjson.loads`` of every line, one thread;
* the style this replaces: ``json.loads`` per line and a Python loop building one dict
  per transition (timed on a prefix of ``--loop-steps`` steps, reported as steps/s);
* ``python -m pipeline.build --workers 2`` and ``--workers 1``, each in a fresh process:
  wall time, CPU time, and peak memory (the sum of the resident sets of the build and
  its worker processes, sampled every 50 ms).

Ratios are taken within a round and their median is reported (absolute times on a
shared machine mean little). Targets: the build >= 5x faster than the json.loads loop,
and <= 2x the orjson parse floor.

It also measures whether a cheaper parse of this fixed layout (orjson per line into
preallocated NumPy arrays, no checks) beats the build's own typed polars parse and
checks (``ChunkParser.parse``), both on one thread. ``--big-steps N`` also builds N steps
to show that peak memory does not grow with the input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
OBS, ACT, EP_LEN = 17, 6, 1000
LAYOUTS = ("episode_per_line", "step_per_line")
JSON_TARGET, FLOOR_TARGET = 5.0, 2.0


# --------------------------------------------------------------------------- data


def _episodes(
    n_steps: int, seed: int = 0
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, bool]]:
    rng = np.random.default_rng(seed)
    n_eps = max(1, n_steps // EP_LEN)
    for e in range(n_eps):
        obs = rng.normal(size=(EP_LEN + 1, OBS))
        act = np.clip(rng.normal(size=(EP_LEN, ACT)), -1, 1)
        rew = rng.normal(size=EP_LEN)
        yield f"ep-{e:06d}", obs, act, rew, bool(e % 3 == 0)


def write_episode_per_line(path: Path, n_steps: int) -> None:
    with path.open("wb") as f:
        for eid, obs, act, rew, term in _episodes(n_steps):
            steps = [
                {"obs": obs[t].tolist(), "act": act[t].tolist(), "rew": float(rew[t]),
                 "terminal": bool(term and t == EP_LEN - 1), "timeout": bool(not term and t == EP_LEN - 1)}
                for t in range(EP_LEN)
            ]  # fmt: skip
            f.write(
                orjson.dumps({"episode": eid, "steps": steps, "last_obs": obs[EP_LEN].tolist()})
                + b"\n"
            )


def write_step_per_line(path: Path, n_steps: int) -> None:
    with path.open("wb") as f:
        for eid, obs, act, rew, term in _episodes(n_steps):
            lines = []
            for t in range(EP_LEN):
                rec = {"ep": eid, "t": t, "obs": obs[t].tolist(), "act": act[t].tolist(), "rew": float(rew[t]),
                       "terminal": bool(term and t == EP_LEN - 1), "timeout": bool(not term and t == EP_LEN - 1)}  # fmt: skip
                if t == EP_LEN - 1:
                    rec["last_obs"] = obs[EP_LEN].tolist()
                lines.append(orjson.dumps(rec))
            f.write(b"\n".join(lines) + b"\n")


SPEC = """
name: {name}
source: {{paths: ["{path}"], layout: {layout}, episode_key: {ek}, {sk}}}
fields:
  observation: {{path: obs, shape: [17]}}
  action: {{path: act, type: continuous, shape: [6], low: -1.0, high: 1.0}}
  reward: {{path: rew}}
  terminated: {{path: terminal}}
  truncated: {{path: timeout}}
  final_observation: {{path: last_obs}}
store: {{format: arrow, discount: 0.99}}
"""


def write_spec(d: Path, name: str, data: Path, layout: str) -> Path:
    if layout == "episode_per_line":
        text = SPEC.format(name=name, path=data, layout=layout, ek="episode", sk="steps_key: steps")
    else:
        text = SPEC.format(name=name, path=data, layout=layout, ek="ep", sk="step_key: t")
    p = d / f"{name}.yaml"
    p.write_text(text)
    return p


def dataset(work: Path, layout: str, n_steps: int) -> Path:
    data = work / f"{layout}-{n_steps}.jsonl"
    if not data.exists():
        write = write_episode_per_line if layout == "episode_per_line" else write_step_per_line
        write(data, n_steps)
    return data


# --------------------------------------------------------------------------- variants


def time_orjson(path: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``orjson.loads`` of every line."""
    t0, c0 = time.perf_counter(), time.process_time()
    with path.open("rb") as f:
        for line in f:
            orjson.loads(line)
    return time.perf_counter() - t0, time.process_time() - c0


def python_loop(path: Path, layout: str, max_steps: int) -> tuple[float, int]:
    """The hand-written loader style: json.loads and one dict per transition."""
    t0 = time.perf_counter()
    out: list[dict[str, Any]] = []
    n = 0
    with path.open("r") as f:
        if layout == "episode_per_line":
            for line in f:
                ep = json.loads(line)
                steps = ep["steps"]
                for t, s in enumerate(steps):
                    nxt = steps[t + 1]["obs"] if t + 1 < len(steps) else ep["last_obs"]
                    out.append({"episode": ep["episode"], "obs": list(map(float, s["obs"])), "action": list(map(float, s["act"])),
                                "reward": float(s["rew"]), "next_obs": list(map(float, nxt)),
                                "terminal": s["terminal"], "timeout": s["timeout"]})  # fmt: skip
                n += len(steps)
                if n >= max_steps:
                    break
        else:
            by_ep: dict[str, list[dict[str, Any]]] = {}
            for line in f:
                s = json.loads(line)
                by_ep.setdefault(s["ep"], []).append(s)
                n += 1
                if n >= max_steps:
                    break
            for steps in by_ep.values():
                steps.sort(key=lambda s: s["t"])
                for t, s in enumerate(steps):
                    nxt = steps[t + 1]["obs"] if t + 1 < len(steps) else s.get("last_obs", s["obs"])
                    out.append({"episode": s["ep"], "obs": list(map(float, s["obs"])), "action": list(map(float, s["act"])),
                                "reward": float(s["rew"]), "next_obs": list(map(float, nxt)),
                                "terminal": s["terminal"], "timeout": s["timeout"]})  # fmt: skip
    return time.perf_counter() - t0, n


def _tree_memory(pid: int) -> int:
    """Bytes of memory of ``pid`` and all its descendants: the sum of their proportional
    set sizes (a page shared by k processes counts 1/k in each, so shared libraries count
    once), or of their resident sets where PSS is not available."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _pss(p)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class BuildRun:
    wall: float
    cpu: float  # the build's and its workers' user + system seconds
    mem_mib: float  # peak of the summed memory (PSS) of the build and its workers


def run_build_process(spec: Path, out: Path, *options: str) -> tuple[float, Any, float]:
    """A fresh ``python -m pipeline.build SPEC --out OUT OPTIONS`` process: its wall
    seconds, resource usage, and peak MiB of its process tree (sampled every 50 ms)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "pipeline.build", str(spec), "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, *options], cwd=ROOT)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _tree_memory(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build of {spec} ({' '.join(options)}) failed")
    return wall, usage, peak[0] / 2**20


def run_build(spec: Path, out: Path, workers: int) -> BuildRun:
    """A fresh ``python -m pipeline.build`` process, with its memory sampled."""
    wall, usage, peak = run_build_process(spec, out, "--workers", str(workers))
    return BuildRun(wall, usage.ru_utime + usage.ru_stime, peak)


# --------------------------------------------------------------------------- parse paths


def _cpu_and_wall(fn: Callable[[], Any]) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def fixed_layout_orjson(path: Path, layout: str, chunk_bytes: int) -> None:
    """The cheapest parse of this fixed layout: orjson per line into preallocated NumPy
    arrays (ids, observations, actions, rewards, flags), with none of the checks."""
    for data in _chunks(path, chunk_bytes):
        records = [orjson.loads(line) for line in data.splitlines()]
        steps = (
            [s for r in records for s in r["steps"]] if layout == "episode_per_line" else records
        )
        n = len(steps)
        obs, act = np.empty((n, OBS)), np.empty((n, ACT))
        rew, term, trunc = np.empty(n), np.empty(n, bool), np.empty(n, bool)
        obs[:] = [s["obs"] for s in steps]
        act[:] = [s["act"] for s in steps]
        rew[:] = [s["rew"] for s in steps]
        term[:] = [s["terminal"] for s in steps]
        trunc[:] = [s["timeout"] for s in steps]


def fixed_layout_orjson_checked(path: Path, layout: str, chunk_bytes: int) -> None:
    """The same, plus the checks that exact verdicts need before a record may be kept:
    every list of the declared length and of numbers only (no bool, null or string),
    finite values, actions in range, booleans for the flags, and the id a string. A chunk
    that fails would go to the reference path for its reasons (not timed here)."""
    for data in _chunks(path, chunk_bytes):
        records = [orjson.loads(line) for line in data.splitlines()]
        steps = (
            [s for r in records for s in r["steps"]] if layout == "episode_per_line" else records
        )
        ids = [r["episode" if layout == "episode_per_line" else "ep"] for r in records]
        ok = set(map(type, ids)) <= {str}
        for key, width in (("obs", OBS), ("act", ACT)):
            lists = [s[key] for s in steps]
            ok &= set(map(type, lists)) == {list} and set(map(len, lists)) == {width}
            ok &= set(map(type, itertools.chain.from_iterable(lists))) <= {float, int}
        rews = [s["rew"] for s in steps]
        ok &= set(map(type, rews)) <= {float, int}
        for key in ("terminal", "timeout"):
            ok &= set(map(type, [s[key] for s in steps])) == {bool}
        n = len(steps)
        obs, act = np.empty((n, OBS)), np.empty((n, ACT))
        obs[:] = [s["obs"] for s in steps]
        act[:] = [s["act"] for s in steps]
        rew = np.asarray(rews, dtype=np.float64)
        ok &= bool(np.isfinite(obs).all() and np.isfinite(act).all() and np.isfinite(rew).all())
        ok &= bool(((act >= -1) & (act <= 1)).all())
        term = np.asarray([s["terminal"] for s in steps], dtype=bool)
        trunc = np.asarray([s["timeout"] for s in steps], dtype=bool)
        assert ok and len(term) == len(trunc) == n


def polars_parse(spec_path: Path, chunk_bytes: int) -> None:
    """The build's own parse and checks of every chunk (``ChunkParser.parse``)."""
    sys.path.insert(0, str(ROOT))
    from data_specs.schema import load_spec
    from pipeline.transitions.chunks import BuildContext, parse_chunk
    from pipeline.transitions.parse import infer_shapes, parse_line

    spec = load_spec(spec_path)
    path = Path(spec.source.paths[0])
    with path.open("rb") as f:
        spec = infer_shapes(spec, [parse_line(f.readline())])
    ctx = BuildContext(spec, [str(path)])
    from pipeline.sources import Chunk

    for data in _chunks(path, chunk_bytes):
        parse_chunk(ctx, Chunk(data, 1))


def _chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        carry = b""
        while block := f.read(chunk_bytes):
            data = carry + block
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            yield data[:cut]
        if carry:
            yield carry


def parse_paths_in_one_thread(
    spec: Path, data: Path, layout: str
) -> dict[str, tuple[float, float]]:
    """(CPU, wall) seconds of both parse paths on one thread (POLARS_MAX_THREADS=1)."""
    code = (
        "import sys, json, time; sys.path.insert(0, {root!r}); sys.argv = ['x']\n"
        "import bench_build as b\n"
        "from pathlib import Path\n"
        "out = {{}}\n"
        "out['polars'] = b._cpu_and_wall(lambda: b.polars_parse(Path({spec!r}), 16 << 20))\n"
        "out['orjson'] = b._cpu_and_wall(lambda: b.fixed_layout_orjson(Path({data!r}), {layout!r}, 16 << 20))\n"
        "out['checked'] = b._cpu_and_wall(lambda: b.fixed_layout_orjson_checked(Path({data!r}), {layout!r}, 16 << 20))\n"
        "print(json.dumps(out))\n"
    ).format(root=str(ROOT / "scripts"), spec=str(spec), data=str(data), layout=layout)
    env = dict(os.environ, POLARS_MAX_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return {k: tuple(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


# --------------------------------------------------------------------------- rounds


@dataclass
class Round:
    orjson: float
    orjson_cpu: float
    loop_rate: float  # json.loads loop, steps/s
    builds: dict[int, BuildRun] = field(default_factory=dict)  # workers -> run


def one_round(
    r: int, layout: str, data: Path, spec: Path, work: Path, loop_steps: int, steps: int
) -> Round:
    variants: list[tuple[str, Callable[[], Any]]] = [
        ("orjson", lambda: time_orjson(data)),
        ("loop", lambda: python_loop(data, layout, loop_steps)),
        ("w2", lambda: run_build(spec, work / "stores", 2)),
        ("w1", lambda: run_build(spec, work / "stores", 1)),
    ]
    k = r % len(variants)
    got = {name: fn() for name, fn in variants[k:] + variants[:k]}
    t_loop, n_loop = got["loop"]
    (wall, cpu) = got["orjson"]
    rnd = Round(wall, cpu, n_loop / t_loop, {2: got["w2"], 1: got["w1"]})
    load = os.getloadavg()[0]
    w2, w1 = rnd.builds[2], rnd.builds[1]
    print(
        f"  round {r + 1} {layout:<17} orjson {rnd.orjson:6.2f}s  json loop {steps / rnd.loop_rate:7.2f}s"
        f"  build w2 {w2.wall:6.2f}s (cpu {w2.cpu:5.1f}s)  w1 {w1.wall:6.2f}s (cpu {w1.cpu:5.1f}s)"
        f"  load {load:.1f}",
        flush=True,
    )
    return rnd


def _med(xs: list[float]) -> str:
    m = statistics.median(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} ({min(xs):.2f}-{max(xs):.2f})"


def report(results: dict[str, list[Round]], steps: int, parse: dict[str, dict[str, Any]]) -> None:
    n_rounds = len(next(iter(results.values())))
    print()
    print(
        f"pipeline.build, {steps:,} steps (obs {OBS}, action {ACT}, episodes of {EP_LEN}), "
        f"{os.cpu_count()} CPUs; median over {n_rounds} interleaved rounds (min-max)"
    )
    hdr = (
        f"{'layout':<17}{'variant':<27}{'wall s':>7}{'CPU s':>7}{'x json loop':>21}"
        f"{'/ orjson floor':>21}{'CPU / orjson CPU':>21}{'peak MiB':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    verdicts: list[tuple[str, str, float, str, bool]] = []
    for layout, rounds in results.items():
        floor = [r.orjson for r in rounds]
        floor_cpu = [r.orjson_cpu for r in rounds]
        loop = [steps / r.loop_rate for r in rounds]
        fast = _med([a / b for a, b in zip(loop, floor)])
        print(f"{layout:<17}{'json.loads loop':<27}{statistics.median(loop):>7.2f}{'':>7}{'1.00':>21}{fast:>21}")  # fmt: skip
        print(f"{'':<17}{'orjson parse floor':<27}{statistics.median(floor):>7.2f}"
              f"{statistics.median(floor_cpu):>7.2f}{fast:>21}{'1.00':>21}{'1.00':>21}")  # fmt: skip
        for w in (2, 1):
            runs = [r.builds[w] for r in rounds]
            wall = [b.wall for b in runs]
            speed = [a / b.wall for a, b in zip(loop, runs)]
            over = [b.wall / f for b, f in zip(runs, floor)]
            over_cpu = [b.cpu / f for b, f in zip(runs, floor_cpu)]
            mem = max(b.mem_mib for b in runs)
            cpu = statistics.median(b.cpu for b in runs)
            name = f"pipeline.build --workers {w}"
            print(f"{'':<17}{name:<27}{statistics.median(wall):>7.2f}{cpu:>7.2f}{_med(speed):>21}"
                  f"{_med(over):>21}{_med(over_cpu):>21}{mem:>10,.0f}")  # fmt: skip
            s, o = statistics.median(speed), statistics.median(over)
            verdicts.append((layout, f"workers {w}: x json loop", s, f">= {JSON_TARGET:g}", s >= JSON_TARGET))  # fmt: skip
            verdicts.append((layout, f"workers {w}: / orjson floor", o, f"<= {FLOOR_TARGET:g}", o <= FLOOR_TARGET))  # fmt: skip
        p = parse.get(layout)
        if p:
            pc = p["polars"][0]
            print(f"{'':<17}parse paths, one thread, CPU s: the build's polars parse + checks {pc:.2f}; "
                  f"orjson to NumPy {p['orjson'][0]:.2f} ({p['orjson'][0] / pc:.2f}x), "
                  f"with the checks exact verdicts need {p['checked'][0]:.2f} ({p['checked'][0] / pc:.2f}x)")  # fmt: skip
    print("(peak MiB: the summed proportional set size of the build and its workers)")
    if steps < 1_000_000:
        print(
            "(under 1M steps the start-up of the build process dominates: the targets are for 1M)"
        )
    print()
    print(f"{'layout':<17}{'target (wall time)':<30}{'measured':>10}{'target':>10}  verdict")
    for layout, name, value, target, ok in verdicts:
        print(f"{layout:<17}{name:<30}{value:>10.2f}{target:>10}  {'PASS' if ok else 'MISS'}")


def big_rss(work: Path, big_steps: int, small: dict[str, float]) -> None:
    print()
    for layout in LAYOUTS:
        data = dataset(work, layout, big_steps)
        spec = write_spec(work, f"bench-big-{layout}", data, layout)
        run = run_build(spec, work / "stores", 2)
        data.unlink()
        ratio = run.mem_mib / small[layout]
        print(
            f"{layout}: peak memory {run.mem_mib:,.0f} MiB at {big_steps:,} steps, "
            f"{ratio:.2f}x that at the small size ({'PASS' if ratio <= 1.5 else 'MISS'} <= 1.5x)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument(
        "--loop-steps", type=int, default=200_000, help="prefix timed for the json.loads loop"
    )
    ap.add_argument("--big-steps", type=int, default=0, help="also build this many (memory)")
    ap.add_argument("--quick", action="store_true", help="100k steps, 1 round: a smoke run")
    ap.add_argument("--dir", default=None, help="work directory, keeps the data (default: temp)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds, args.loop_steps = 100_000, 1, 50_000
        args.big_steps = min(args.big_steps, 300_000)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = (args.steps // EP_LEN) * EP_LEN
    try:
        files = {
            layout: (data := dataset(work, layout, args.steps), write_spec(work, f"bench-{layout}", data, layout))
            for layout in LAYOUTS
        }  # fmt: skip
        results: dict[str, list[Round]] = {layout: [] for layout in LAYOUTS}
        for r in range(args.rounds):
            for layout, (data, spec) in files.items():
                results[layout].append(
                    one_round(r, layout, data, spec, work, args.loop_steps, steps)
                )
        parse = {
            layout: parse_paths_in_one_thread(spec, data, layout)
            for layout, (data, spec) in files.items()
        }
        report(results, steps, parse)
        if args.big_steps:
            small = {k: max(r.builds[2].mem_mib for r in v) for k, v in results.items()}
            big_rss(work, args.big_steps, small)
    finally:
        shutil.rmtree(work / "stores", ignore_errors=True)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
