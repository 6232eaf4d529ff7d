"""Exporting a store to Minari against recording the same episodes with Minari's DataCollector.

    python scripts/bench_minari_export.py                 # 1M steps (obs 17, act 6), 1000-step episodes
    python scripts/bench_minari_export.py --steps 20000   # a smoke test of seconds

One JSONL input (episodes of ``--episode-length`` steps, 17-float observations, 6-float
continuous actions, every third episode terminated, the others truncated with a final
observation, one in ten of those cut off with none, so the build drops its last step) is
built by ``pipeline.build`` into a store. Then, in ``--rounds`` rounds that alternate the
order of the two (a busy machine slows both alike), both write an arrow-backend Minari
dataset of the store's episodes:

* export: ``pipeline.interchange.minari_export.export``, as ``python -m pipeline.export
  STORE --to minari`` runs it: verify the store, then write each episode's file with
  whole-array operations (the time without the verification is shown too);
* DataCollector: ``minari.DataCollector`` around a gymnasium env whose ``reset`` / ``step``
  replay the store's episodes from arrays in memory (no simulator: what is timed is the
  collector's own cost), stepped with the store's actions, then ``create_dataset``.

Both datasets are read back with ``minari.MinariDataset`` and compared episode by episode
before the table is printed. The target: export >= 3x faster than recording.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_episodes import ACT, OBS, SPEC, write_episodes  # noqa: E402

from pipeline.build import build  # noqa: E402
from pipeline.interchange.minari_export import export as minari_export  # noqa: E402
from pipeline.interchange.minari_export import spaces, write_dataset  # noqa: E402
from pipeline.store import TransitionStore, open_store  # noqa: E402

TARGET = 3.0


class Replay:
    """The store's episodes in memory, in the order a gymnasium env hands them out."""

    def __init__(self, store: TransitionStore) -> None:
        ep = store.episodes
        self.start, self.length = ep.start, ep.length
        self.observations = np.asarray(store.observations)
        self.next_observations = np.asarray(store.next_observations)
        self.actions = np.asarray(store.actions)
        self.rewards = np.asarray(store.rewards, dtype=np.float64)
        self.terminated = store.terminated
        self.truncated = store.truncated
        self.spaces = spaces(store)


def replay_env(replay: Replay) -> Any:
    """A gymnasium env whose episodes are the store's: ``reset`` starts the next one,
    ``step`` returns its next row (whatever the action)."""
    import gymnasium as gym

    class ReplayEnv(gym.Env):
        def __init__(self) -> None:
            self.observation_space, self.action_space = replay.spaces
            self.episode = -1
            self.row = 0

        def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[Any, dict]:
            super().reset(seed=seed)
            self.episode += 1
            self.row = int(replay.start[self.episode])
            return replay.observations[self.row], {}

        def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
            r = self.row
            self.row += 1
            return (
                replay.next_observations[r],
                float(replay.rewards[r]),
                bool(replay.terminated[r]),
                bool(replay.truncated[r]),
                {},
            )

    return ReplayEnv()


def record(replay: Replay, work: Path, dataset_id: str) -> float:
    """Seconds to record every episode with minari.DataCollector and create the dataset."""
    import minari

    os.environ["MINARI_DATASETS_PATH"] = str(work)
    t0 = time.perf_counter()
    env = minari.DataCollector(replay_env(replay), data_format="arrow")
    for start, length in zip(replay.start.tolist(), replay.length.tolist()):
        env.reset(seed=0)
        for row in range(start, start + length):
            env.step(replay.actions[row])
    env.create_dataset(
        dataset_id, algorithm_name="replay", author="bench", author_email="-",
        code_permalink="-", description="the store's episodes, replayed",
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    env.close()
    return seconds


def same_episodes(a: Path, b: Path) -> str | None:
    """None if the two datasets hold the same episodes; else what differs."""
    import minari

    da, db = minari.MinariDataset(a / "data"), minari.MinariDataset(b / "data")
    if (da.total_episodes, da.total_steps) != (db.total_episodes, db.total_steps):
        return f"sizes differ: {da.total_episodes, da.total_steps} vs {db.total_episodes, db.total_steps}"
    for x, y in zip(da.iterate_episodes(), db.iterate_episodes()):
        for key in ("observations", "actions", "rewards", "terminations", "truncations"):
            if not np.array_equal(getattr(x, key), getattr(y, key)):
                return f"episode {x.id}: {key} differ"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=1_000_000, help="steps in the input")
    p.add_argument("--episode-length", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=1, help="timings of each method")
    p.add_argument("--work", type=Path, help="where to write the input, store and datasets")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # Minari warns about every optional metadata key
    ep_len = min(args.episode_length, args.steps)
    with tempfile.TemporaryDirectory(prefix="bench-minari-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        data = work / "steps.jsonl"
        write_episodes(data, args.steps, ep_len, cut_off_every=10)
        spec = work / "bench-minari.yaml"
        spec.write_text(SPEC.format(name="bench-minari", path=data, store_extra=""))
        store_path = build(spec, work / "stores", progress=False, force=True).path
        store = open_store(store_path)
        replay = Replay(store)
        dropped = int(store.episodes.last_step_dropped.sum())
        print(
            f"{len(store):,} steps in {store.n_episodes:,} episodes (obs {OBS}, action {ACT}, "
            f"{dropped} cut off with their last step dropped), arrow backend; input and build "
            f"{time.perf_counter() - t0:.1f}s; {args.rounds} round(s)\n"
        )
        times: dict[str, list[float]] = {"export": [], "write": [], "collector": []}
        outs = {"export": work / "export", "collector": work / "collector"}
        for r in range(args.rounds):
            for d in outs.values():
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
            order = ["export", "collector"] if r % 2 == 0 else ["collector", "export"]
            for method in order:
                if method == "export":
                    t = time.perf_counter()
                    minari_export(store_path, outs["export"] / "exported-v0")
                    times["export"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    write_dataset(store, outs["export"] / "written-v0" / "data", "w-v0", "arrow")
                    times["write"].append(time.perf_counter() - t)
                else:
                    times["collector"].append(record(replay, outs["collector"], "recorded-v0"))
        differs = same_episodes(outs["export"] / "exported-v0", outs["collector"] / "recorded-v0")
        if differs:
            print(f"error: the two datasets differ: {differs}", file=sys.stderr)
            return 1
        ratio = statistics.median(c / e for c, e in zip(times["collector"], times["export"]))
        write_ratio = statistics.median(c / w for c, w in zip(times["collector"], times["write"]))
        steps_per_s = {k: len(store) / statistics.median(v) for k, v in times.items()}
        print("| method | seconds (median) | steps/s | DataCollector / method |")
        print("|---|---:|---:|---:|")
        rows = [
            ("export (`python -m pipeline.export`: verify + write)", "export", ratio),
            ("export's write alone (store already verified)", "write", write_ratio),
            ("minari.DataCollector recording the replayed episodes", "collector", 1.0),
        ]
        for label, key, x in rows:
            print(
                f"| {label} | {statistics.median(times[key]):.2f} | "
                f"{steps_per_s[key]:,.0f} | {x:.1f}x |"
            )
        verdict = "PASS" if ratio >= TARGET else "MISS"
        print(
            f"\nboth datasets read back by minari.MinariDataset hold the same episodes\n"
            f"target: export >= {TARGET:.0f}x faster than recording: {ratio:.1f}x {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
