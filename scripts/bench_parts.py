"""A transition store in parts against the same store in one file: random batch gathers.

    python scripts/bench_parts.py              # ~1M transitions (obs 17, act 6), 16 parts
    python scripts/bench_parts.py --quick      # 20k transitions, 4 parts (a smoke test of seconds)

One JSONL input (episodes of 1000 steps, 17-float observations, 6-float actions) is built
by ``pipeline.build`` twice: as one file, and with ``store.part_rows`` = ceil(N / parts)
(so the parts cut episodes anywhere); both must have the same content hash. Then, in
``--rounds`` rounds that alternate between the two stores (a busy machine slows both
alike), it times:

* the trainer's gather path: ``open_store``, ``TransitionArrays.from_store``, then
  ``DeviceTransitions`` over a 90% training split (the training rows gathered from the
  store's columns: across the parts' memory-mapped views for the parted store), then
  ``--batches`` batches of 256 from ``TransitionSampler`` (one ``index_select`` each on the
  packed matrix);
* the store's columns alone: ``--batches`` gathers of 256 random rows of the 7 columns a
  batch holds, straight from ``TransitionArrays.from_store`` (``PartedColumn[rows]``
  against ``ndarray[rows]``), for code that samples a store without packing it.

It prints a Markdown table of the median times and the median per-round ratio
parted / single; the target is <= 1.5x on the trainer's path.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_episodes import ACT, OBS, SPEC, write_episodes  # noqa: E402

from pipeline.build import build  # noqa: E402
from pipeline.store import PartedColumn, open_store  # noqa: E402
from trainer.samplers import (  # noqa: E402
    DeviceTransitions,
    TransitionArrays,
    TransitionSampler,
    split_episodes,
)

BATCH = 256
TARGET = 1.5


def build_store(work: Path, data: Path, name: str, part_rows: int | None) -> Path:
    spec = work / f"{name}.yaml"
    parts = "" if part_rows is None else f", part_rows: {part_rows}"
    spec.write_text(SPEC.format(name=name, path=data, store_extra=parts))
    return build(spec, work / "stores", progress=False).path


def trainer_path(store: Path, batches: int) -> tuple[float, float]:
    """Seconds to open the store and pack its training split; seconds for the batches."""
    t0 = time.perf_counter()
    arrays = TransitionArrays.from_store(open_store(store))
    train, _ = split_episodes(arrays.n_episodes, 0.1, seed=0)
    data = DeviceTransitions(arrays, train)
    t1 = time.perf_counter()
    sampler = TransitionSampler(data, BATCH, seed=0)
    for _ in range(batches):
        sampler.sample()
    return t1 - t0, time.perf_counter() - t1


def column_gathers(store: Path, rows: np.ndarray) -> float:
    """Seconds for ``rows`` (batches, B) gathers of the 7 batch columns from the store."""
    a = TransitionArrays.from_store(open_store(store))
    columns = [
        a.observations, a.actions, a.rewards, a.next_observations, a.terminated, a.truncated,
        a.return_to_go,
    ]  # fmt: skip
    for c in columns:  # touch every page once: the first round is not a cold read
        np.asarray(c).sum()
    t0 = time.perf_counter()
    for batch in rows:
        for c in columns:
            c[batch]
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--transitions", type=int, default=1_000_000)
    p.add_argument("--parts", type=int, default=16)
    p.add_argument("--batches", type=int, default=2000, help="batches of 256 per timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, help="where to write the input and the stores (kept)")
    p.add_argument("--quick", action="store_true", help="20k transitions, 4 parts, 200 batches")
    args = p.parse_args(argv)
    ep_len = 1000
    if args.quick:
        args.transitions, args.parts, args.batches, args.rounds, ep_len = 20_000, 4, 200, 2, 200
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-parts-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        data = work / "steps.jsonl"
        write_episodes(data, args.transitions, ep_len)
        n = max(1, args.transitions // ep_len) * ep_len
        part_rows = math.ceil(n / args.parts)
        stores = {
            "single file": build_store(work, data, "single", None),
            f"{args.parts} parts": build_store(work, data, "parted", part_rows),
        }
        single, parted = (open_store(s) for s in stores.values())
        if single.content_hash != parted.content_hash:
            print("error: the two stores differ (content hash)", file=sys.stderr)
            return 1
        assert isinstance(parted.observations, PartedColumn)
        print(
            f"{len(single):,} transitions (obs {OBS}, action {ACT}), one file and "
            f"{len(parted.observations.parts)} parts of {part_rows:,} rows, content "
            f"{single.content_hash[:12]} for both; inputs and builds {time.perf_counter() - t0:.1f}s; "
            f"batch {BATCH}, {args.batches} batches, {args.rounds} rounds, 1 torch thread\n"
        )
        del single, parted
        rows = np.random.default_rng(1).integers(0, n, size=(args.batches, BATCH))
        times: dict[str, dict[str, list[float]]] = {
            k: {s: [] for s in stores} for k in ("pack", "batches", "trainer", "columns")
        }
        for store in stores.values():  # warm up: page cache, allocator
            trainer_path(store, 10)
        for r in range(args.rounds):
            order = list(stores.items()) if r % 2 == 0 else list(stores.items())[::-1]
            for name, store in order:
                pack, batches = trainer_path(store, args.batches)
                times["pack"][name].append(pack)
                times["batches"][name].append(batches)
                times["trainer"][name].append(pack + batches)
                times["columns"][name].append(column_gathers(store, rows))
    one, many = stores
    labels = {
        "pack": "open + pack the training split (DeviceTransitions)",
        "batches": f"{args.batches} sampler batches from the packed matrix",
        "trainer": "trainer's gather path (the two above)",
        "columns": f"{args.batches} gathers of {BATCH} random rows x 7 columns from the store",
    }
    print(f"| path | {one} (s) | {many} (s) | {many} / {one} |")
    print("|---|---:|---:|---:|")
    ratios = {}
    for key, label in labels.items():
        a, b = times[key][one], times[key][many]
        ratios[key] = statistics.median(y / x for x, y in zip(a, b))
        print(
            f"| {label} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | "
            f"{ratios[key]:.2f}x |"
        )
    verdict = "PASS" if ratios["trainer"] <= TARGET else "MISS"
    print(
        f"\ntarget: parted / single <= {TARGET}x on the trainer's gather path: "
        f"{ratios['trainer']:.2f}x {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
