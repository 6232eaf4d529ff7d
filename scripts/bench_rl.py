"""RL after SFT: our ``reinforce`` stage against TRL's ``RLOOTrainer``, same prompts, model,
reward and generated tokens; generated tokens/s and held-out quality.

    python scripts/bench_rl.py                              # ~15 min on one CPU core
    python scripts/bench_rl.py --quick                      # smoke run, ~3 min
    python scripts/bench_rl.py --sft runs/agent-sft-reinforce/checkpoints/final-sft.pt

Both sides start from the same SFT student of the demo's mixed-teacher store
(``stores/agent-mixed``; ``--sft`` a checkpoint of an ``sft`` stage, else a short SFT run is
trained first, ``--sft-steps``), and fine-tune it on the same single-turn task: a policy
turn of the store's training split is the prompt (its episode up to the turn's header, as
:class:`trainer.agent.prompts.StorePrompts` lays it out), the student writes the turn, and
the reward is ROUGE-L (rouge-score) against the store's text of that turn. Step k of both
sides uses the same ``--prompts`` turns (drawn as our stage draws them), each sampled
``--group`` times (temperature 1, ``--max-new-tokens``), a leave-one-out baseline (RLOO),
a KL penalty of ``--kl`` to the SFT weights in the reward, whitened advantages, AdamW with
the same lr, betas (0.9, 0.95) and gradient clipping, one gradient step per batch.

- Ours: ``python -m trainer.train`` on a config with one ``reinforce`` stage,
  ``rollouts: store``, ``--init-from`` the SFT checkpoint (the real training loop).
- TRL: ``RLOOTrainer.train`` with ``num_generations = --group``, a batch of ``--prompts x
  --group`` completions per step, ``steps_per_generation = 1``, ``num_iterations = 1``,
  ``beta = --kl``, ``normalize_advantages``; its prompts are our token ids exactly (its
  ``_tokenize_prompts`` is given them, so neither side re-tokenises text).

Columns per side and seed: generated tokens, training time (the steps; setup, evaluation
and saving excluded on both), generated tokens per second of training, and the held-out
turns' exact match, token F1 and ROUGE-L (greedy, ``--eval-turns`` turns of the held-out
split, :func:`trainer.agent.prompts.text_overlap`) before and after. ``ratio`` = ours / TRL
tokens/s, median over seeds. Targets: ratio >= 1.5; our held-out ROUGE-L within TRL's seed
spread and not below the SFT start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = {
    "config": {
        "architecture": "llama", "hidden_size": 128, "num_layers": 2, "num_heads": 4,
        "intermediate_size": 384,
    }
}  # fmt: skip
SEED_BASE = 5_000_000  # trainer.agent.rl.RLParams.seed_base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="stores/agent-mixed")
    ap.add_argument("--sft", default=None, help="an sft stage's checkpoint (else trained here)")
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-turns", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="a directory for the runs (default: temp)")
    ap.add_argument("--quick", action="store_true", help="6 steps, 1 seed, a 60-step SFT")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.sft_steps, args.eval_turns = 6, [0], 60, 64
    return args


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(config: Path, *extra: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "trainer.train", str(config), "--overwrite", *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def base_config(args: argparse.Namespace, out: Path, seed: int) -> dict[str, Any]:
    return {
        "store": str(Path(args.store).resolve()),
        "out": str(out),
        "seed": seed,
        "device": "cpu",
        "precision": "fp32",
        "num_threads": args.threads,
        "model": MODEL,
        "agent": {
            "eval_fraction": 0.1, "eval_max_episodes": 16, "max_new_tokens": args.max_new_tokens,
            "teacher": None, "eval_turns": 0, "export_merged": True,
        },
        "eval": {"every": 0, "episodes": 0},
        "checkpoint": {"every": 100000, "keep_last": 1},
        "log_every": 10,
        "tensorboard": False,
        "progress": False,
    }  # fmt: skip


def sft_checkpoint(args: argparse.Namespace, work: Path) -> Path:
    if args.sft is not None:
        return Path(args.sft)
    out = work / "sft"
    cfg = base_config(args, out, 0)
    cfg["stages"] = [{
        "algo": "sft", "name": "sft", "steps": args.sft_steps, "batch_size": 16, "lr": 2e-3,
        "weight_decay": 0.01, "grad_clip": 1.0,
        "lr_schedule": {"kind": "cosine", "warmup_steps": 50, "final_fraction": 0.05},
        "span_weights": {"reasoning": 0.5, "action": 1.0, "other": 1.0},
    }]  # fmt: skip
    print(f"training the SFT start ({args.sft_steps} steps) ...", flush=True)
    train(write_config(work / "sft.yaml", cfg))
    return out / "checkpoints" / "final-sft.pt"


def export_sft(ckpt: Path, store: Any, out: Path) -> Path:
    """The SFT checkpoint as a plain model directory (TRL's start)."""
    from trainer.agent.model import build_model, export_merged, parse_model_settings
    from trainer.agent.runner import AgentTrainer
    from trainer.checkpoint import load_checkpoint

    text = store.text()
    loaded = build_model(
        parse_model_settings(MODEL), vocab_size=text.vocab_size, pad_id=text.pad_id,
        end_id=text.end_id, max_positions=int(store.manifest["sequences"]["max_tokens"]), seed=0,
    )  # fmt: skip
    AgentTrainer._load_state(loaded, dict(load_checkpoint(ckpt)["algo_state"]), "--sft")
    return export_merged(loaded, out, tokenizer_dir=store.tokenizer_dir)


def splits(store: Any) -> tuple[Any, Any]:
    """(training prompts, held-out prompts), as the trainer splits the store."""
    from trainer.agent.data import split_episodes
    from trainer.agent.prompts import StorePrompts

    held = split_episodes(list(store.episode_ids), 0.1, 0)
    header = len(store.text().header_ids("assistant"))
    train_p = StorePrompts.from_store(store, np.flatnonzero(~held), "assistant", header)
    eval_p = StorePrompts.from_store(store, np.flatnonzero(held), "assistant", header)
    return train_p, eval_p


def score(model_dir_or_model: Any, store: Any, eval_p: Any, n: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.agent.prompts import text_overlap

    model = model_dir_or_model
    if isinstance(model, str | Path):
        model = AutoModelForCausalLM.from_pretrained(str(model))
    return text_overlap(
        model, store.text(), eval_p, eval_p.spread(n), max_new_tokens=96,
        device=torch.device("cpu"), batch_size=32,
        max_context=int(store.manifest["sequences"]["max_tokens"]),
    )  # fmt: skip


def run_ours(args: argparse.Namespace, ckpt: Path, work: Path, seed: int) -> dict[str, Any]:
    out = work / f"ours-s{seed}"
    cfg = base_config(args, out, seed)
    cfg["stages"] = [{
        "algo": "reinforce", "name": "reinforce", "rollouts": "store", "steps": args.steps,
        "batch_size": args.prompts, "group_size": args.group, "lr": args.lr, "grad_clip": 1.0,
        "temperature": 1.0, "max_new_tokens": args.max_new_tokens, "baseline": "loo",
        "kl_coef": args.kl, "sft_weight": 0.0, "eval_at_start": False, "reward": "rouge_l",
    }]  # fmt: skip
    train(write_config(work / f"ours-s{seed}.yaml", cfg), "--init-from", str(ckpt))
    summary = json.loads((out / "summary.json").read_text())
    st = summary["stages"][0]
    return {"tokens": st["tokens"], "seconds": st["train_time_s"], "model": out / "model"}


def run_trl(
    args: argparse.Namespace, sft_dir: Path, store: Any, train_p: Any, work: Path, seed: int
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from rouge_score import rouge_scorer
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    torch.set_num_threads(args.threads)
    text = store.text()
    limit = int(store.manifest["sequences"]["max_tokens"]) - args.max_new_tokens
    rows: list[int] = []
    for step in range(args.steps):  # the turns our stage draws at each step
        rng = np.random.default_rng([SEED_BASE, seed, step])
        rows += train_p.sample(rng, args.prompts)
    ids_of: dict[str, list[int]] = {}
    prompts, targets = [], []
    for r in rows:
        ids = train_p.context(r)[-limit:]
        key = text.decode(ids)
        ids_of[key] = ids
        prompts.append(key)
        targets.append(train_p.target(r))
    data = Dataset.from_dict({"prompt": prompts, "target": targets})
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    counts = {"tokens": 0}

    def rouge_l(prompts: list[str], completions: list[str], target: list[str],
                completion_ids: list[list[int]], **kw: Any) -> list[float | None]:  # fmt: skip
        counts["tokens"] += sum(len(c) for c in completion_ids)
        return [float(scorer.score(t, c)["rougeL"].fmeasure) for c, t in zip(completions, target)]

    class Exact(RLOOTrainer):  # our token ids, not a re-tokenisation of their text
        def _tokenize_prompts(self, prompts: list) -> Any:
            return [ids_of[p] for p in prompts], None, {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            self.seconds = time.perf_counter() - self.t0

    tok = AutoTokenizer.from_pretrained(str(sft_dir))
    tok.eos_token = "<|end|>"
    cfg = RLOOConfig(
        output_dir=str(work / f"trl-s{seed}"), per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, steps_per_generation=1, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        beta=args.kl, num_iterations=1, normalize_advantages=True,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        shuffle_dataset=False, seed=seed, logging_steps=10, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, fp16=False, disable_dropout=True,
        gradient_checkpointing=False, dataloader_num_workers=0,
    )  # fmt: skip
    clock = Clock()
    trainer = Exact(
        model=str(sft_dir), reward_funcs=rouge_l, args=cfg, train_dataset=data,
        processing_class=tok, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    return {"tokens": counts["tokens"], "seconds": clock.seconds, "model": trainer.model}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from pipeline.sequences.store import open_sequence_store

    store = open_sequence_store(args.store)
    train_p, eval_p = splits(store)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = sft_checkpoint(args, work)
        sft_dir = export_sft(ckpt, store, work / "sft-model")
        start = score(sft_dir, store, eval_p, args.eval_turns)
        results: list[dict[str, Any]] = []
        for seed in args.seeds:
            for side in ("ours", "trl"):
                print(f"{side} seed {seed} ...", flush=True)
                if side == "ours":
                    r = run_ours(args, ckpt, work, seed)
                else:
                    r = run_trl(args, sft_dir, store, train_p, work, seed)
                r.update(side=side, seed=seed, **score(r.pop("model"), store, eval_p,
                                                       args.eval_turns))  # fmt: skip
                r["tok_s"] = r["tokens"] / r["seconds"]
                results.append(r)
    print()
    print(
        f"RL after SFT, {args.steps} steps of {args.prompts} prompts x {args.group} samples, "
        f"<= {args.max_new_tokens} new tokens, reward rouge_l, {args.threads} thread(s); "
        f"held-out: {int(start['eval/turns_scored'])} turns"
    )
    head = f"{'side':<6}{'seed':>5}{'gen tokens':>12}{'train s':>9}{'gen tok/s':>11}"
    head += f"{'exact':>8}{'tok F1':>8}{'ROUGE-L':>9}"
    print(head)
    print(
        f"{'SFT':<6}{'-':>5}{'-':>12}{'-':>9}{'-':>11}{start['eval/turn_exact_match']:>8.3f}"
        f"{start['eval/turn_token_f1']:>8.3f}{start['eval/turn_rouge_l']:>9.4f}"
    )
    for r in results:
        print(
            f"{r['side']:<6}{r['seed']:>5}{r['tokens']:>12,}{r['seconds']:>9.1f}"
            f"{r['tok_s']:>11,.0f}{r['eval/turn_exact_match']:>8.3f}"
            f"{r['eval/turn_token_f1']:>8.3f}{r['eval/turn_rouge_l']:>9.4f}"
        )
    ratios = []
    for seed in args.seeds:
        o = next(r for r in results if r["side"] == "ours" and r["seed"] == seed)
        t = next(r for r in results if r["side"] == "trl" and r["seed"] == seed)
        ratios.append(o["tok_s"] / t["tok_s"])
    rl = {s: [r["eval/turn_rouge_l"] for r in results if r["side"] == s] for s in ("ours", "trl")}
    ratio = statistics.median(ratios)
    print(
        f"\ngenerated tokens/s, ours / TRL: {ratio:.2f}x (per seed "
        f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= 1.5: "
        f"{'met' if ratio >= 1.5 else 'MISSED'})"
    )
    print(
        f"held-out ROUGE-L: SFT {start['eval/turn_rouge_l']:.4f}, ours "
        f"{min(rl['ours']):.4f}-{max(rl['ours']):.4f}, TRL {min(rl['trl']):.4f}-"
        f"{max(rl['trl']):.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
