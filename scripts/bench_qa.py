"""Training throughput of the QA reader: examples/s of the supervised and the hybrid stage.

    python scripts/bench_qa.py                       # configs/qa-demo.yaml on stores/qa-demo
    python scripts/bench_qa.py --steps 5 --quick     # smoke run
    python scripts/bench_qa.py --json runs/bench-qa.json

Each stage is timed on the same batches: questions drawn uniformly from the training split
with every segment of their document (no curriculum, so the mix of long and short documents
is the store's), at the config's batch size and reader sizes. A step is everything the
training loop does for it: the gather of the batch, the reader's pass over every segment,
the losses (the hybrid adds the halting episodes, GAE and the policy / value losses), the
backward pass and the optimizer steps. Inference is timed both ways on the same batches:
reading every segment (``MemoryReader.read``) and early exit
(``MemoryReader.read_early_exit``: an example leaves the batch once its halting head says
stop, at the config's ``qa.halt_threshold``), with the reader of ``--run`` (a QA run's
best checkpoint) or, without it, a fresh reader whose P(HALT) starts at the hybrid stage's
``halt_bias_init``. Stages take turns in rounds so that load from other processes hits all.

Columns: examples/s (questions), segments/s (segments read), ms per step (median over the
rounds), and the hybrid / supervised ratio; then early exit's fraction of segments read
and its time per question over reading everything. Target: time ratio <= fraction + 0.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.segments.store import open_segment_store  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.qa.data import QAArrays, collate  # noqa: E402
from trainer.qa.model import MemoryReader, ReaderConfig  # noqa: E402
from trainer.qa.runner import (  # noqa: E402
    HybridParams,
    HybridStage,
    SupervisedParams,
    SupervisedStage,
    parse_settings,
    stage_params,
)


def _reader(store: Any, settings: Any) -> MemoryReader:
    m = settings.model.to_dict()
    m["vocab_size"] = int(store.manifest["tokenizer"]["vocab_size"])
    m["max_positions"] = int(store.manifest["segments"]["max_input_width"])
    return MemoryReader(ReaderConfig(**m))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", default="configs/qa-demo.yaml", help="a QA training config")
    ap.add_argument("--store", help="override the config's store")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per stage and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (stages take turns)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="one round of 3 steps")
    ap.add_argument("--json", help="also write the table to this JSON file")
    ap.add_argument("--run", help="a QA run directory: time inference with its best reader")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 3, 1
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"store={args.store}"] if args.store else [])
    settings = parse_settings(cfg.qa)
    store = open_segment_store(cfg.store)
    arrays = QAArrays.from_store(store)
    pool = store.split_indices(settings.train_split)
    params = [stage_params(cfg, i) for i in range(len(cfg.stages))]
    sup = next((p for p in params if isinstance(p, SupervisedParams)), SupervisedParams())
    hyb = next((p for p in params if isinstance(p, HybridParams)), HybridParams())
    batch_size = cfg.stages[0].batch_size

    torch.manual_seed(args.seed)
    model = _reader(store, settings)
    model.reset_policy(hyb.halt_bias_init)
    stages: dict[str, Any] = {
        "supervised": SupervisedStage(model, sup),
        "hybrid": HybridStage(model, hyb, seed=args.seed, stream=1, answer_threshold=0.0),
    }
    reader = model
    if args.run:  # a trained reader for the inference rows (its halting policy)
        from trainer.checkpoint import load_checkpoint
        from trainer.qa.answer import AnswerError, run_checkpoint

        try:
            ckpt = load_checkpoint(run_checkpoint(Path(args.run)))
        except AnswerError as e:
            raise SystemExit(f"--run: {e}") from None
        reader = MemoryReader(ReaderConfig(**ckpt["meta"]["reader"]))  # the run's sizes
        reader.load_state_dict(ckpt["algo_state"])
    rng = np.random.default_rng(args.seed)
    n_batches = args.steps * args.rounds + 1
    batches = [rng.choice(pool, size=batch_size) for _ in range(n_batches)]

    def run_stage(name: str, idx: list[np.ndarray], step0: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        segs = 0
        for k, ex in enumerate(idx):
            if name == "inference":
                with torch.no_grad():
                    reader.eval()
                    reader.read(collate(arrays, ex))
                    reader.train()
                segs += int(arrays.n_segments[ex].sum())
            elif name == "early_exit":
                reader.eval()
                out = reader.read_early_exit(collate(arrays, ex), settings.halt_threshold, 0.0)
                reader.train()
                segs += int(out.n_read.sum())
            else:
                stages[name].update(collate(arrays, ex), step0 + k)
                segs += int(arrays.n_segments[ex].sum())
        return time.perf_counter() - t0, segs

    names = ("supervised", "hybrid", "inference", "early_exit")
    for name in names:  # warm-up
        run_stage(name, [batches[-1]], 0)
    times: dict[str, list[float]] = {n: [] for n in names}
    segs: dict[str, int] = dict.fromkeys(names, 0)
    for r in range(args.rounds):
        idx = batches[r * args.steps : (r + 1) * args.steps]
        for name in names:
            dt, s = run_stage(name, idx, r * args.steps)
            times[name].append(dt)
            segs[name] += s
    rows = []
    for name in names:
        total = sum(times[name])
        steps = args.steps * args.rounds
        rows.append(
            {
                "stage": name,
                "batch_size": batch_size,
                "examples_per_s": round(steps * batch_size / total, 2),
                "segments_per_s": round(segs[name] / total, 1),
                "ms_per_step": round(1000 * statistics.median(times[name]) / args.steps, 1),
            }
        )
    ratio = rows[1]["examples_per_s"] / rows[0]["examples_per_s"]
    print(
        f"QA training throughput: {cfg.store} ({len(pool)} train questions, "
        f"{arrays.n_segments[pool].mean():.1f} segments each), reader d={model.cfg.d_model} "
        f"x{model.cfg.n_layers}, batch {batch_size}, {args.threads} thread(s), "
        f"{args.rounds} x {args.steps} steps"
    )
    print()
    print("| stage | examples/s | segments/s | ms/step |")
    print("|---|---:|---:|---:|")
    for row in rows:
        label = {
            "inference": "inference, reading everything",
            "early_exit": "inference, early exit",
        }.get(row["stage"], row["stage"])
        print(
            f"| {label} | {row['examples_per_s']:.1f} | {row['segments_per_s']:.0f} "
            f"| {row['ms_per_step']:.0f} |"
        )
    print(f"\nhybrid / supervised: {ratio:.2f}x")
    fraction = segs["early_exit"] / max(segs["inference"], 1)
    time_ratio = sum(times["early_exit"]) / sum(times["inference"])
    ok = time_ratio <= fraction + 0.1
    print(
        f"early exit ({'the reader of ' + args.run if args.run else 'a fresh reader'}): "
        f"{fraction:.3f} of the segments read, {time_ratio:.3f} of the time per question "
        f"(target <= fraction + 0.1: {'met' if ok else 'MISSED'})"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "hybrid_over_supervised": ratio,
                    "early_exit_fraction": fraction,
                    "early_exit_time_ratio": time_ratio,
                }
            )  # fmt: skip
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
