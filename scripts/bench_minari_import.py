"""Importing a Minari dataset into a store against reading it with Minari.

    python scripts/bench_minari_import.py                 # 1M steps (obs 17, act 6), arrow backend
    python scripts/bench_minari_import.py --steps 20000   # a smoke test of seconds

The dataset: the episodes of ``scripts/bench_minari_export.py`` (1000-step episodes, every
third terminated, the others truncated, some cut off), built into a store and exported to an
arrow-backend Minari dataset (not timed). Then, in ``--rounds`` rounds that alternate the
order (a busy machine slows all alike):

* import: ``python -m pipeline.build`` of ``source: {format: minari}``, everything it does:
  hash the dataset's files, read and check every episode, build the transitions, write the
  store with its digests and statistics;
* import's reading alone: the reader the import runs (every episode's arrays checked and
  laid out as step rows), without building or writing;
* minari: ``minari.MinariDataset`` + ``iterate_episodes``, each episode's observations,
  actions, rewards, terminations and truncations taken as NumPy arrays;
* reopen: what every later use of the imported store costs (the import happens once):
  ``open_store`` and every column as a NumPy array.

The store is checked against Minari's episodes before the table is printed. The target:
import >= 3x faster than iterating the dataset with Minari.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_episodes import ACT, OBS, SPEC, write_episodes  # noqa: E402

from data_specs.schema import load_spec  # noqa: E402
from pipeline.build import build  # noqa: E402
from pipeline.interchange import minari_import  # noqa: E402
from pipeline.interchange.minari_export import export  # noqa: E402
from pipeline.store import open_store  # noqa: E402

TARGET = 3.0
COLUMNS = ("observation", "action", "reward", "next_observation", "terminated", "truncated")


def minari_iterate(data: Path) -> int:
    """Minari's own reading of every episode into NumPy arrays; the steps read."""
    import minari

    steps = 0
    for ep in minari.MinariDataset(data).iterate_episodes():
        arrays = (ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations)
        obs, act, *_ = (np.asarray(a) for a in arrays)
        steps += len(act)
    return steps


def read_only(spec_path: Path) -> int:
    """The import's reader alone: every episode read, checked and laid out as step rows."""
    spec = load_spec(spec_path)
    datasets = minari_import.resolve_datasets(spec.source.paths)
    spec = minari_import.resolve_spec(spec, datasets)
    steps = 0
    for task in minari_import.plan_tasks(datasets, spec, 16 << 20):
        rows, rejected, _ = minari_import.read_task(task)
        assert not rejected, rejected[0]
        assert rows.fobs_present is not None
        # an episode exported without its dropped last step has that step back, to drop again
        given_back = int((rows.t == 0).sum() - rows.fobs_present.sum())
        steps += len(rows) - given_back
    return steps


def reopen(store: Path) -> int:
    s = open_store(store)
    return sum(np.asarray(s.column(c)).shape[0] for c in COLUMNS) // len(COLUMNS)


def check(store: Path, data: Path) -> str | None:
    """Where the imported store and Minari's reading of the dataset differ (None: nowhere)."""
    import minari

    s = open_store(store)
    starts = s.episodes.start
    obs, nxt, act = s.column("observation"), s.column("next_observation"), s.column("action")
    for k, ep in enumerate(minari.MinariDataset(data).iterate_episodes()):
        a, n = int(starts[k]), len(ep.actions)
        if not np.array_equal(obs[a : a + n], ep.observations[:-1]):
            return f"episode {k}: observations"
        if not np.array_equal(nxt[a + n - 1], ep.observations[-1]):
            return f"episode {k}: final observation"
        if not np.array_equal(act[a : a + n], ep.actions):
            return f"episode {k}: actions"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=1_000_000, help="steps in the dataset")
    p.add_argument("--episode-length", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="timings of each method")
    p.add_argument("--work", type=Path, help="where to write the input, stores and dataset")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # Minari warns about optional metadata keys
    ep_len = min(args.episode_length, args.steps)
    with tempfile.TemporaryDirectory(prefix="bench-minari-import-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_episodes(work / "steps.jsonl", args.steps, ep_len, cut_off_every=10)
        spec = work / "bench-minari.yaml"
        spec.write_text(SPEC.format(name="bench-minari", path=work / "steps.jsonl", store_extra=""))
        source = build(spec, work / "stores", progress=False, force=True).path
        dataset = work / "bench-v0"
        export(source, dataset, force=True)
        imp = work / "imported.yaml"
        imp.write_text(f"name: imported\nsource: {{format: minari, paths: ['{dataset}']}}\n")
        data = dataset / "data"
        n_steps = minari_iterate(data)  # also warms both readers' imports and the page cache
        store = build(imp, work / "stores", progress=False, force=True).path
        print(
            f"{n_steps:,} steps in {open_store(store).n_episodes:,} episodes (obs {OBS}, "
            f"action {ACT}), Minari arrow backend, "
            f"{sum(f.stat().st_size for f in data.rglob('*') if f.is_file()) / 1e6:.0f} MB; "
            f"set-up {time.perf_counter() - t0:.1f}s; {args.rounds} round(s)\n"
        )
        methods = {
            "import": lambda: len(
                open_store(build(imp, work / "stores", progress=False, force=True).path)
            ),
            "read": lambda: read_only(imp),
            "minari": lambda: minari_iterate(data),
            "reopen": lambda: reopen(store),
        }
        times: dict[str, list[float]] = {k: [] for k in methods}
        for r in range(args.rounds):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for name in order:
                t = time.perf_counter()
                got = methods[name]()
                times[name].append(time.perf_counter() - t)
                if got != n_steps:
                    print(f"error: {name} read {got} steps, not {n_steps}", file=sys.stderr)
                    return 1
        differs = check(store, data)
        if differs:
            print(f"error: the store and Minari's episodes differ: {differs}", file=sys.stderr)
            return 1
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {
            k: statistics.median(m / x for m, x in zip(times["minari"], v))
            for k, v in times.items()
        }
        print("| method | seconds (median) | steps/s | minari iterate / method |")
        print("|---|---:|---:|---:|")
        rows = [
            ("import (`pipeline.build`: hash, read, check, build, write)", "import"),
            ("import's reading alone (episodes checked, as step rows)", "read"),
            ("minari.MinariDataset + iterate_episodes into NumPy", "minari"),
            ("reopen the imported store, every column as NumPy", "reopen"),
        ]
        for label, key in rows:
            print(f"| {label} | {med[key]:.3f} | {n_steps / med[key]:,.0f} | {ratio[key]:.2f}x |")
        verdict = "PASS" if ratio["import"] >= TARGET else "MISS"
        print(
            "\nthe imported store holds Minari's episodes (observations, final observations, "
            f"actions)\ntarget: import >= {TARGET:.0f}x faster than iterating with Minari: "
            f"{ratio['import']:.2f}x {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
