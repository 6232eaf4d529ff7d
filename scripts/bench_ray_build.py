"""Benchmark the Ray engine of ``pipeline.build`` against the local engine, in one run.

    python scripts/bench_ray_build.py [--steps 1000000] [--rounds 2] [--part-rows 262144]
                                      [--quick]

Generates JSONL of episodes with 17-float observations and 6-float actions in both
layouts (as ``bench_build.py`` does), then, in each round, builds each layout, as one
file and in parts of ``--part-rows`` rows (``store.part_rows``: on Ray the workers write
the parts, the building process reads them back to hash them), with
``--engine local`` (its default number of workers) and ``--engine ray`` (a local Ray
cluster of this machine's CPUs, started by the build), each in a fresh process,
alternating which goes first. Reported per layout: wall time, peak memory (the summed PSS
of the build and every process under it: Ray's own processes and workers included), their
ratios Ray / local (medians over rounds), and whether the two stores have the same
``content_hash``. On a small machine this is Ray's overhead: starting a cluster, moving
tasks and results through its object store, and workers that share the same cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_build import LAYOUTS, dataset, run_build_process, write_spec  # noqa: E402


def run(spec: Path, out: Path, engine: str) -> tuple[float, float, str]:
    """Wall seconds, peak MiB (the build's process tree), content hash of one build."""
    wall, _, peak = run_build_process(spec, out, "--engine", engine)
    (store,) = [p for p in out.iterdir() if p.is_dir()]
    manifest = json.loads((store / "manifest.json").read_text())
    return wall, peak, str(manifest["content_hash"])


Row = tuple[str, dict[str, float], dict[str, float], bool]


def measure(spec: Path, work: Path, name: str, rounds: int) -> Row:
    """Median wall seconds and peak MiB of each engine over ``rounds``, alternating which
    goes first; whether every build gave the same content hash."""
    got: dict[str, list[tuple[float, float, str]]] = {"local": [], "ray": []}
    for r in range(rounds):
        order = ("local", "ray") if r % 2 == 0 else ("ray", "local")
        for engine in order:
            got[engine].append(run(spec, work / f"out-{engine}", engine))
    wall = {e: statistics.median(x[0] for x in v) for e, v in got.items()}
    mem = {e: statistics.median(x[1] for x in v) for e, v in got.items()}
    hashes = {x[2] for v in got.values() for x in v}
    return name, wall, mem, len(hashes) == 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--part-rows", type=int, default=1 << 18, help="rows per part of the parted builds"
    )
    ap.add_argument("--quick", action="store_true", help="20k steps, one round, parts of 4,096")
    ap.add_argument("--work", default=None, help="where the inputs go (default: a temp dir)")
    args = ap.parse_args(argv)
    steps, rounds = (20_000, 1) if args.quick else (args.steps, args.rounds)
    if args.quick:
        args.part_rows = 4096
    try:
        import ray  # noqa: F401
    except ImportError:
        print('bench_ray_build: skipped: Ray is not installed (pip install -e ".[ray]")')
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        for layout in LAYOUTS:
            data = dataset(work, layout, steps)
            for part_rows in (None, args.part_rows):
                spec = write_spec(work, f"bench-{layout}", data, layout)
                name = layout
                if part_rows is not None:
                    text = spec.read_text().replace(
                        "store: {format: arrow,", f"store: {{part_rows: {part_rows}, format: arrow,"
                    )
                    assert f"part_rows: {part_rows}" in text
                    spec.write_text(text)
                    name = f"{layout}, parts of {part_rows:,}"
                rows.append(measure(spec, work, name, rounds))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{steps:,} steps, obs 17, act 6; medians of {rounds} round(s)\n")
    print("| store | local s | Ray s | Ray / local time | local peak MiB | Ray peak MiB "
          "| Ray / local memory | same content_hash |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for layout, wall, mem, same in rows:
        print(
            f"| {layout} | {wall['local']:.1f} | {wall['ray']:.1f} | "
            f"{wall['ray'] / wall['local']:.2f}x | {mem['local']:.0f} | {mem['ray']:.0f} | "
            f"{mem['ray'] / mem['local']:.2f}x | {'yes' if same else 'NO'} |"
        )
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
