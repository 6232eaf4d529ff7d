"""SFT training throughput (tokens/s) of our trainer step against TRL's ``SFTTrainer``.

    python scripts/bench_sft.py                    # ~11 min on a CPU core per side
    python scripts/bench_sft.py --quick            # smoke run, ~2 min
    python scripts/bench_sft.py --modes grouped --steps 60 --buckets 32 --threads 0

Both sides train the same model on the same episodes: a Llama of hidden 128, 2 layers, 4
heads, MLP 384 (configs/agent-sft.yaml), built by :func:`trainer.agent.model.build_model`
from the same seed, on a synthetic sequence store held in memory (2000 episodes of 200-600
tokens, vocabulary 512; label 0 on context, 1..3 on reasoning / action / other spans, as a
sequence store labels agent episodes). Ours: :class:`trainer.agent.runner.SFTStage`'s
``update`` on batches of :class:`trainer.agent.data.BucketSampler` + ``collate``, as the
training loop runs it. TRL: ``SFTTrainer.train`` on the same episodes pre-tokenized as a
``datasets.Dataset`` of ``input_ids`` and ``completion_mask`` (``completion_only_loss``: the
loss on the same tokens as ours, averaged the same way). Same batch size (16 episodes), AdamW
with the same lr, betas, weight decay and gradient clipping, constant lr, no gradient
checkpointing (TRL's default turns it on; neither side needs it here), fp32 or bf16 autocast,
with and without LoRA (r 16 on q_proj, v_proj).

Modes pair like with like:

- ``grouped``: batches of similar lengths. Ours as configured by default (``buckets: 8``,
  ``--buckets``); TRL with ``train_sampling_strategy="group_by_length"`` (transformers'
  length-grouped sampler: mega-batches of up to 50 batches sorted by length, so a little
  less padding than 8 buckets; ``--buckets 32`` matches it).
- ``random``: batches of random episodes, padded. Ours with ``buckets: 1``; TRL's defaults.
- ``packed``: no padding. Ours with ``pack: true`` (episodes first-fit into rows, attention
  kept within an episode by a block mask); TRL with ``padding_free=True`` (the batch as one
  row; transformers derives the block mask from the restarting position ids).

Each side runs in its own process (so each has its own peak RSS), warms up, then the two
take turns in rounds (``--rounds``), one at a time, so a machine shared with other work slows
both alike. A round's time covers everything between two optimizer steps: drawing and
collating the batch, forward, backward, clipping, the optimizer (and TRL's callbacks and
metrics). Tokens are real (non-pad) tokens. Columns: tokens/s of each side over its rounds
(CPU time of the process on CPU, where ``--threads`` defaults to 1; wall time on CUDA),
``ratio`` = ours / TRL (median over rounds of the ratio within a round), ``wall`` the same in
wall-clock time, ``pad%`` the share of batch cells that are padding, peak RSS of each
process, and the mean training loss of each over all its steps (the same objective: close
values say both train the same thing). Target: ``ratio >= 1.5``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, PAD, END = 512, 0, 1
LABELS = ["context", "reasoning", "action", "other"]
MODEL = {
    "architecture": "llama",
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 384,
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
BATCH, LR, BETAS, WEIGHT_DECAY, CLIP, SEED = 16, 2e-3, (0.9, 0.95), 0.01, 1.0, 0
TARGET = 1.5
MODES = ("grouped", "random", "packed")


# ----------------------------------------------------------------------------- data
def make_episodes(n: int, lo: int, hi: int, seed: int) -> Any:
    """``n`` agent-like episodes of ``lo..hi`` tokens as :class:`SequenceArrays`: a context
    prompt, then turns of (other, reasoning, other, action, other) and an env observation
    (context), cut at the episode's length."""
    from trainer.agent.data import SequenceArrays

    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    labels: list[np.ndarray] = []
    for n_tok in lengths.tolist():
        parts = [np.zeros(int(rng.integers(30, 80)), dtype=np.int8)]
        size = len(parts[0])
        while size < n_tok:
            turn = [
                (3, 2),
                (1, int(rng.integers(15, 60))),
                (3, 2),
                (2, int(rng.integers(3, 9))),
                (3, 2),
                (0, int(rng.integers(20, 60))),
            ]
            for code, k in turn:
                parts.append(np.full(k, code, dtype=np.int8))
                size += k
        labels.append(np.concatenate(parts)[:n_tok])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(2, VOCAB, size=int(offsets[-1])).astype(np.int32)
    return SequenceArrays(input_ids=ids, labels=np.concatenate(labels), offsets=offsets)


# ----------------------------------------------------------------------------- workers
@dataclass
class Rounds:
    """A worker's side of the protocol: report, then wait for the next round's step count
    (0: stop). Protocol lines are JSON on the original stdout; everything else goes to stderr."""

    out: IO[str]
    cpu0: float = 0.0
    wall0: float = 0.0
    tokens0: int = 0
    cells0: int = 0

    def send(self, msg: dict[str, Any]) -> int:
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()
        line = sys.stdin.readline()
        return int(line.strip() or 0)

    def start(self, tokens: int, cells: int) -> None:
        self.tokens0, self.cells0 = tokens, cells
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def finish(self, tokens: int, cells: int, steps: int) -> dict[str, Any]:
        return {
            "steps": steps,
            "tokens": tokens - self.tokens0,
            "cells": cells - self.cells0,
            "cpu": time.process_time() - self.cpu0,
            "wall": time.perf_counter() - self.wall0,
        }


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def build(lora: bool, max_positions: int) -> Any:
    from trainer.agent.model import build_model, parse_model_settings

    raw: dict[str, Any] = {"config": dict(MODEL)}
    if lora:
        raw["lora"] = dict(LORA)
    return build_model(
        parse_model_settings(raw),
        vocab_size=VOCAB,
        pad_id=PAD,
        end_id=END,
        max_positions=max_positions,
        seed=SEED,
    )


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(args: argparse.Namespace, arrays: Any, rounds: Rounds, device: Any) -> dict[str, Any]:
    import torch

    from trainer.agent.data import BucketSampler, collate
    from trainer.agent.losses import label_weights
    from trainer.agent.runner import SFTParams, SFTStage

    loaded = build(args.lora, int(arrays.lengths.max()))
    loaded.model.to(device)
    loaded.model.train()
    buckets = args.buckets if args.mode == "grouped" else 1
    params = SFTParams(
        lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, buckets=buckets, pack=args.mode == "packed"
    )
    stage = SFTStage(
        loaded,
        params,
        label_weights(LABELS, None),
        precision=args.precision,
        device=device,
        grad_clip=CLIP,
        has_teacher=False,
    )
    total = args.warmup + args.total_steps
    sampler = BucketSampler(
        arrays.lengths,
        np.arange(arrays.n_episodes),
        BATCH,
        SEED,
        buckets=buckets,
        total_steps=total,
    )
    count = {"tokens": 0, "cells": 0}
    losses: list[torch.Tensor] = []

    def step() -> None:
        episodes = sampler.sample()
        b = collate(arrays, episodes, PAD, pack=params.pack, max_len=params.pack_max_tokens)
        count["tokens"] += b.n_tokens
        count["cells"] += b.input_ids.numel()
        losses.append(stage.update([b.to(device)])["loss"])

    for _ in range(args.warmup):
        step()
    sync(device)
    n = rounds.send({"ready": True})
    while n > 0:
        rounds.start(count["tokens"], count["cells"])
        for _ in range(n):
            step()
        sync(device)
        n = rounds.send(rounds.finish(count["tokens"], count["cells"], n))
    return {"loss": float(torch.stack(losses).mean()), "peak_rss_mb": peak_rss_mb()}


def trl_tokenizer(tmp: Path) -> Any:
    """A word-level tokenizer of VOCAB tokens (t0 = pad, t1 = end): TRL wants one for its pad id."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    path = tmp / "tokenizer.json"
    tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="t0", eos_token="t1")


def run_trl(args: argparse.Namespace, arrays: Any, rounds: Rounds, device: Any) -> dict[str, Any]:
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    datasets.disable_progress_bars()
    off = arrays.offsets
    data = datasets.Dataset.from_dict(
        {
            "input_ids": [
                arrays.input_ids[off[i] : off[i + 1]].tolist() for i in range(len(off) - 1)
            ],
            "completion_mask": [
                (arrays.labels[off[i] : off[i + 1]] > 0).astype(np.int8).tolist()
                for i in range(len(off) - 1)
            ],
        }
    )
    count = {"cells": 0}

    class CountingCollator(DataCollatorForLanguageModeling):
        """TRL's own collator (what it builds by default), counting the cells it pads to."""

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            out = super().torch_call(examples)
            count["cells"] += int(out["input_ids"].numel())
            return out

    packed = args.mode == "packed"
    total = args.warmup + args.total_steps
    tmp = Path(tempfile.mkdtemp(prefix="bench_sft_trl_"))  # removed by the worker at exit
    config = SFTConfig(
        output_dir=str(tmp / "out"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=CLIP,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=total,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
        bf16=args.precision == "bf16",
        fp16=False,
        use_cpu=device.type == "cpu",
        gradient_checkpointing=False,
        completion_only_loss=True,
        max_length=None if packed else int(arrays.lengths.max()),
        padding_free=packed,
        train_sampling_strategy="group_by_length" if args.mode == "grouped" else "random",
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )
    loaded = build(args.lora, int(arrays.lengths.max()))
    tokenizer = trl_tokenizer(tmp)
    collator = None if packed else CountingCollator(pad_token_id=PAD)
    progress: dict[str, int] = {"n": 0, "left": 0}
    warmup = args.warmup

    class RoundCallback(TrainerCallback):
        """Reports a round every ``n`` optimizer steps after the warm-up; stops on 0."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            tokens = int(trainer_ref[0]._total_train_tokens)  # TRL's count of real tokens
            cells = tokens if packed else count["cells"]
            step = state.global_step
            if step == warmup:
                sync(device)
                progress["n"] = progress["left"] = rounds.send({"ready": True})
                rounds.start(tokens, cells)
            elif step > warmup and progress["left"] > 0:
                progress["left"] -= 1
                if progress["left"] == 0:
                    sync(device)
                    done = rounds.finish(tokens, cells, progress["n"])
                    progress["n"] = progress["left"] = rounds.send(done)
                    rounds.start(tokens, cells)
            if step >= warmup and progress["left"] == 0:
                control.should_training_stop = True
            return control

    trainer_ref: list[Any] = []
    trainer = SFTTrainer(
        model=loaded.model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[RoundCallback()],
    )
    trainer_ref.append(trainer)
    out = trainer.train()
    return {"loss": float(out.training_loss), "peak_rss_mb": peak_rss_mb()}


def worker(args: argparse.Namespace) -> int:
    """One side of one row, driven by the parent over stdin / stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries' prints go to stderr
    warnings.filterwarnings("ignore")
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    arrays = make_episodes(args.episodes, args.min_len, args.max_len, seed=SEED)
    rounds = Rounds(proto)
    run = run_ours if args.worker == "ours" else run_trl
    before = set(Path(tempfile.gettempdir()).glob("bench_sft_trl_*"))
    try:
        final = run(args, arrays, rounds, device)
    finally:
        for d in set(Path(tempfile.gettempdir()).glob("bench_sft_trl_*")) - before:
            shutil.rmtree(d, ignore_errors=True)
    proto.write(json.dumps({"final": final}) + "\n")
    proto.flush()
    return 0


# ----------------------------------------------------------------------------- the parent
@dataclass
class Side:
    """One worker process and its rounds: (steps, tokens, cells, cpu s, wall s)."""

    name: str
    proc: subprocess.Popen[str]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.name} worker exited (rc {self.proc.returncode}); see stderr")
        return dict(json.loads(line))

    def command(self, steps: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()

    def rate(self, key: str) -> float:
        tokens = sum(r["tokens"] for r in self.rounds)
        return tokens / max(sum(r[key] for r in self.rounds), 1e-9)

    def round_rates(self, key: str) -> list[float]:
        return [r["tokens"] / max(r[key], 1e-9) for r in self.rounds]

    @property
    def pad(self) -> float:
        cells = sum(r["cells"] for r in self.rounds)
        return 1.0 - sum(r["tokens"] for r in self.rounds) / max(cells, 1)


@dataclass
class Row:
    mode: str
    precision: str
    lora: bool
    ours: Side
    trl: Side
    timer: str  # "cpu" or "wall"

    def ratio(self, key: str) -> float:
        pairs = zip(self.ours.round_rates(key), self.trl.round_rates(key))
        return float(np.median([a / b for a, b in pairs]))


def spawn(side: str, mode: str, precision: str, lora: bool, args: argparse.Namespace) -> Side:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--mode",
        mode,
        "--precision",
        precision,
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--rounds",
        str(args.rounds),
        "--buckets",
        str(args.buckets),
        "--episodes",
        str(args.episodes),
        "--min-len",
        str(args.min_len),
        "--max-len",
        str(args.max_len),
    ] + (["--lora"] if lora else [])
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None if args.verbose else subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )
    return Side(side, proc)


def bench_row(mode: str, precision: str, lora: bool, args: argparse.Namespace) -> Row:
    ours = spawn("ours", mode, precision, lora, args)
    ready_ours = ours.read()  # one at a time: their warm-ups do not overlap either
    trl = spawn("trl", mode, precision, lora, args)
    ready_trl = trl.read()
    assert ready_ours.get("ready") and ready_trl.get("ready")
    per_round = max(1, args.steps // args.rounds)
    # ABBA order: the side that goes second in one round goes first in the next
    for r in range(args.rounds):
        for side in (ours, trl) if r % 2 == 0 else (trl, ours):
            side.command(per_round)
            side.rounds.append(side.read())
    for side in (ours, trl):
        side.command(0)
        side.final = side.read()["final"]
        side.proc.wait()
    timer = "wall" if args.device == "cuda" else "cpu"
    return Row(mode, precision, lora, ours, trl, timer)


def table(rows: list[Row]) -> str:
    timer = rows[0].timer if rows else "cpu"
    lines = [
        f"| mode | precision | lora | ours tok/s | TRL tok/s | ratio ({timer}) | ratio (wall) "
        "| pad% ours / TRL | peak RSS MiB ours / TRL | mean loss ours / TRL | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r.ratio(r.timer)
        verdict = "PASS" if ratio >= TARGET else "MISS"
        lines.append(
            f"| {r.mode} | {r.precision} | {'yes' if r.lora else 'no'} "
            f"| {r.ours.rate(r.timer):,.0f} | {r.trl.rate(r.timer):,.0f} | {ratio:.2f}x "
            f"| {r.ratio('wall'):.2f}x | {100 * r.ours.pad:.1f} / {100 * r.trl.pad:.1f} "
            f"| {r.ours.final['peak_rss_mb']:,.0f} / {r.trl.final['peak_rss_mb']:,.0f} "
            f"| {r.ours.final['loss']:.3f} / {r.trl.final['loss']:.3f} "
            f"| {verdict} (>= {TARGET:g}x) |"
        )
    return "\n".join(lines)


def plan(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(mode, precision, lora) rows: every precision x LoRA for the first mode, and the
    full-weight rows for the others (``--all`` for every combination)."""
    out = []
    for i, mode in enumerate(args.modes):
        for precision in args.precisions:
            for lora in (False, True):
                if lora and i > 0 and not args.all:
                    continue
                out.append((mode, precision, lora))
    return out


def describe_device(args: argparse.Namespace) -> str:
    import torch

    if args.device == "cuda":
        return f"CUDA {torch.cuda.get_device_name(0)}"
    import platform

    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {threads} torch thread(s)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 200 short episodes, 4 steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side and row (30)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per row (3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (5)")
    p.add_argument("--episodes", type=int, default=None, help="episodes in the data set (2000)")
    p.add_argument("--min-len", type=int, default=None, help="shortest episode (200 tokens)")
    p.add_argument("--max-len", type=int, default=None, help="longest episode (600 tokens)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--all", action="store_true", help="LoRA rows in every mode, not the first only")
    p.add_argument(
        "--buckets",
        type=int,
        default=8,
        help="our sampler's buckets in grouped mode (config default 8)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per side (default 1: CPU time then measures the work; 0 = torch's default)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    # internal: one side of one row
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, default="grouped", help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.buckets <= 0:
        p.error("--buckets must be > 0")
    defaults = {"steps": (30, 4), "rounds": (3, 2), "warmup": (5, 2), "episodes": (2000, 200)}
    defaults |= {"min_len": (200, 60), "max_len": (600, 160)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.min_len > args.max_len:
        p.error("--min-len must be <= --max-len")
    args.rounds = min(args.rounds, args.steps)
    args.total_steps = max(1, args.steps // args.rounds) * args.rounds
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available", file=sys.stderr)
            return 2
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    print(
        f"bench_sft: {args.episodes} episodes of {args.min_len}-{args.max_len} tokens, vocab "
        f"{VOCAB}, batch {BATCH}, llama {MODEL['hidden_size']}x{MODEL['num_layers']}; "
        f"{args.warmup} warm-up + {args.total_steps} timed steps per side in {args.rounds} "
        f"rounds; our grouped batches from {args.buckets} buckets; {describe_device(args)}",
        flush=True,
    )
    rows: list[Row] = []
    for mode, precision, lora in plan(args):
        start = time.perf_counter()
        row = bench_row(mode, precision, lora, args)
        rows.append(row)
        print(
            f"  {mode:<8} {precision:<5} lora={'yes' if lora else 'no ':<3} "
            f"ours {row.ours.rate(row.timer):9,.0f} tok/s  TRL {row.trl.rate(row.timer):9,.0f} "
            f"tok/s  ratio {row.ratio(row.timer):.2f}x  ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    print(f"\nours / TRL SFTTrainer, real tokens per second ({rows[0].timer} time):")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
