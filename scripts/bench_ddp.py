"""Data-parallel speed: BC and IQL gradient steps/s on one process and on 2 torchrun ranks.

    python scripts/bench_ddp.py                 # the Pendulum demo store (make data), ~3 min
    python scripts/bench_ddp.py --quick         # smoke run: a few steps, one batch, one round
    python scripts/bench_ddp.py --store stores/cartpole-mixed --batches 512 --rounds 3

Both settings train the BC and IQL stages of ``configs/pendulum-bc-iql.yaml`` (128 x 128
networks, float32, Adam) at the same global batch on the same store, each as a fresh
process: ``python -m trainer.train`` (1 thread, the configs' ``num_threads``) and
``torchrun --standalone --nproc-per-node 2 -m trainer.train`` (gloo, 1 thread per rank,
each rank ``batch / 2`` rows of its own shard, the gradients all-reduced every update).
Each global batch of ``--batches`` is timed (the default 256 is the config's; 4096 shows
where the per-rank arithmetic outweighs the all-reduce), over ``--steps`` steps per stage
at batch 256 and proportionally fewer at larger batches (at least 100). Evaluation and
periodic checkpoints are out of the way; steps/s are the run's own ``steps_per_s``
(summary.json: training time only, so process start-up and the stage-end checkpoint do
not count; rank 0's under torchrun, which waits for the slower rank at every all-reduce).

The settings take turns in rounds (``--rounds``), so load from other work on a shared
machine slows both alike; each cell is the median over rounds. One process with 2 threads
is left out: on a 2-core machine that other work shares, its OpenMP threads wait on each
other and its rate swung between 10 and 340 steps/s from one run to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pendulum-bc-iql.yaml"
ALGOS = ("bc", "iql")
RANKS = (1, 2)  # one process, then 2 ranks; one thread each


def train_command(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "trainer.train"]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={ranks}", "-m", "trainer.train",
    ]  # fmt: skip


def run_setting(
    store: Path, out: Path, ranks: int, threads: int, steps: int, batch: int
) -> dict[str, float]:
    """Steps/s of each stage (by algo) of one fresh training run."""
    overrides = [
        f"store={store}",
        f"out={out}",
        f"num_threads={threads}",
        "device=cpu",
        "progress=false",
        "tensorboard=false",
        f"log_every={max(steps // 4, 1)}",
        "eval.every=0",
        "eval.episodes=0",
        "eval.val_transitions=0",
        f"checkpoint.every={steps}",
        *(f"stages.{i}.steps={steps}" for i in range(len(ALGOS))),
        *(f"stages.{i}.batch_size={batch}" for i in range(len(ALGOS))),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [*train_command(ranks), str(CONFIG), *overrides, "--overwrite"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        ours = [x for x in proc.stderr.splitlines() if x.startswith("trainer.train")]
        raise SystemExit(
            f"bench_ddp: {ranks} process(es) failed: "
            + (ours[-1] if ours else proc.stderr.strip()[-500:])
        )
    summary = json.loads((out / "summary.json").read_text())
    return {st["algo"]: float(st["steps_per_s"]) for st in summary["stages"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--store", type=Path, default=ROOT / "stores" / "pendulum-mixed")
    p.add_argument("--steps", type=int, default=1500, help="gradient steps per stage at batch 256")
    p.add_argument(
        "--batches", default="256,4096", help="global batch sizes, comma-separated (even)"
    )
    p.add_argument("--rounds", type=int, default=2, help="turns of every setting")
    p.add_argument("--quick", action="store_true", help="40 steps, the first batch, one round")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or any(b < 2 or b % 2 for b in batches):
        print(
            f"bench_ddp: --batches {args.batches}: even sizes >= 2, e.g. 256,4096", file=sys.stderr
        )
        return 2
    if args.quick:
        args.steps, args.rounds, batches = 40, 1, batches[:1]
    if not (args.store / "manifest.json").is_file():
        print(
            f"bench_ddp: {args.store} is not a built store; run `make data` first",
            file=sys.stderr,
        )
        return 2

    def steps_at(batch: int) -> int:
        return args.steps if args.quick else max(100, args.steps * 256 // batch)

    # rates[(batch, ranks)][algo]: steps/s of every round
    rates: dict[tuple[int, int], dict[str, list[float]]] = {
        (b, n): {a: [] for a in ALGOS} for b in batches for n in RANKS
    }
    with tempfile.TemporaryDirectory(prefix="bench_ddp-") as tmp:
        for r in range(args.rounds):
            for (batch, ranks), per in rates.items():
                out = Path(tmp) / f"r{r}-b{batch}-{ranks}"
                got = run_setting(args.store.resolve(), out, ranks, 1, steps_at(batch), batch)
                for algo in ALGOS:
                    per[algo].append(got[algo])
                print(
                    f"round {r + 1}/{args.rounds}, batch {batch}, {ranks} process(es): "
                    + ", ".join(f"{a} {got[a]:.0f} steps/s" for a in ALGOS),
                    file=sys.stderr,
                )

    med = {key: {a: statistics.median(v) for a, v in per.items()} for key, per in rates.items()}
    print(
        f"\n{args.store.name}: configs/pendulum-bc-iql.yaml networks, 1 thread per process, "
        f"CPU, gloo; steps per stage: "
        + ", ".join(f"{steps_at(b)} at batch {b}" for b in batches)
        + f"; median of {args.rounds} round(s)\n"
    )
    print(
        "| algo | global batch | per rank | 1 process steps/s | 2 ranks steps/s "
        "| 2 ranks / 1 process |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for algo in ALGOS:
        for b in batches:
            one, two = med[(b, 1)][algo], med[(b, 2)][algo]
            print(f"| {algo} | {b} | {b // 2} | {one:,.0f} | {two:,.0f} | {two / one:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
