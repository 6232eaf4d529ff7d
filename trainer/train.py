"""``python -m trainer.train CONFIG [key=value ...] [--resume] [--init-from CKPT]``.

Trains the stages of a config on a built store and leaves a run directory::

    RUN/config.yaml      the resolved config (with the store's content hash)
    RUN/metrics.jsonl    one JSON object per line: train rows and eval rows
    RUN/tensorboard/     the same metrics as TensorBoard events
    RUN/checkpoints/     step-*.pt (last k), best-<stage>.pt, final-<stage>.pt
    RUN/curves.png       learning curves
    RUN/summary.json     per stage: final and best evaluation, steps, wall time, steps/s

Examples::

    python -m trainer.train configs/pendulum-bc-iql.yaml
    python -m trainer.train configs/pendulum-bc-iql.yaml seed=3 out=runs/p-s3 stages.1.steps=1000
    python -m trainer.train configs/pendulum-bc-iql.yaml --resume          # after a crash / kill
    python -m trainer.train configs/x.yaml --init-from runs/bc/checkpoints/final-bc.pt

Data-parallel on N processes (BC, IQL, CQL, qa_supervised, qa_hybrid and sft;
trainer/distributed.py)::

    torchrun --standalone --nproc-per-node 2 -m trainer.train configs/pendulum-bc-iql.yaml
    torchrun --standalone --nproc-per-node 2 -m trainer.train configs/pendulum-bc-iql.yaml --resume
    torchrun --standalone --nproc-per-node 2 --max-restarts 3 -m trainer.train CONFIG

Each rank trains on its own shards of the training episodes, a stage's ``batch_size``
being the global batch; rank 0 writes the run directory. After a torchrun restart
(``--max-restarts``) the workers resume from the run's last checkpoint by themselves.

A user error (missing store, unknown key, bad override, unusable checkpoint) exits with
code 2 and one line on stderr (from rank 0 under torchrun).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trainer.config import ConfigError, load_config

EXIT_USER_ERROR = 2
EXIT_LOST_RANK = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block)."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USER_ERROR, f"trainer.train: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m trainer.train",
        description="Train BC / IQL / CQL (native or d3rlpy) on a transition store, the "
        "QA reader (qa_supervised, qa_hybrid) on a segment store, or a student language "
        "model (sft) on a sequence store.",
    )
    p.add_argument("config", help="a training config (YAML), e.g. configs/pendulum-bc-iql.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override any dotted key: seed=3 out=runs/x stages.1.steps=1000 eval.episodes=5",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in `out` from its latest checkpoint"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start again in an `out` that already holds a run"
    )
    p.add_argument(
        "--init-from",
        metavar="CKPT",
        help="a checkpoint of another run: the first stage's actor starts from its weights",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from trainer.distributed import launch_env

    launch = launch_env()
    # Under torchrun, rank 0 speaks for the job (every rank meets the same user errors).
    say = (lambda msg: None) if launch is not None and launch.rank != 0 else _stderr
    try:
        return _run(args, launch, say)
    except KeyboardInterrupt:
        say("trainer.train: interrupted")
        return EXIT_INTERRUPTED


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _run(args: argparse.Namespace, launch: Any, say: Any) -> int:
    from pipeline.format import StoreError
    from trainer.checkpoint import CheckpointError
    from trainer.distributed import Distributed, LostRank, PeerFailed, RankError
    from trainer.evaluation import EvalError

    user_errors: tuple[type[BaseException], ...] = (
        ConfigError,
        StoreError,
        CheckpointError,
        EvalError,
        RankError,
    )
    dist: Distributed | None = None
    try:
        overrides = list(args.overrides)
        if args.init_from:
            overrides.append(f"init_from={json.dumps(args.init_from)}")
        cfg = load_config(args.config, overrides)
        if args.resume and args.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pick one")
        resume, overwrite = args.resume, args.overwrite
        if launch is not None and launch.restart_count > 0:
            # torchrun restarted the workers after a failure: go on from the last checkpoint
            say(f"trainer.train: torchrun restart {launch.restart_count}: resuming {cfg.out}")
            resume, overwrite = True, False

        from trainer.agent import wants_agent_runner
        from trainer.loop import Interrupted, RunError, Trainer
        from trainer.qa import wants_qa_runner

        runner: Any = Trainer
        if wants_qa_runner(cfg):
            from trainer.qa.runner import QATrainer

            runner = QATrainer
        elif wants_agent_runner(cfg):
            from trainer.agent.runner import AgentTrainer

            runner = AgentTrainer
        extra: dict[str, Any] = {}
        if launch is not None:  # every runner trains data-parallel under torchrun
            dist = extra["dist"] = Distributed.start(launch, cfg.resolved_device())
        try:
            summary = runner(cfg, resume=resume, overwrite=overwrite, **extra).run()
        except Interrupted as e:
            say(f"trainer.train: {e}")
            return EXIT_INTERRUPTED
        except RunError as e:
            raise ConfigError(str(e)) from None
    except PeerFailed:  # another rank failed; rank 0 reports it
        return EXIT_USER_ERROR
    except user_errors as e:
        _error(e, launch, dist, say)
        return EXIT_USER_ERROR
    except OSError as e:  # the run directory cannot be written: disk full, permissions, ...
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}", launch, dist, say)
        return EXIT_USER_ERROR
    except LostRank as e:  # another rank died (killed, out of memory, ...)
        _stderr(
            f"trainer.train: error: rank {launch.rank if launch else 0} lost the other ranks "
            f"({e}); `torchrun --max-restarts N` resumes from the last checkpoint"
        )
        return EXIT_LOST_RANK
    finally:
        if dist is not None:
            dist.close()
    if dist is None or dist.is_main:
        _print_summary(summary)
    return 0


def _error(e: BaseException | str, launch: Any, dist: Any, say: Any) -> None:
    """One line on stderr: from rank 0 for what every rank meets (any error before the
    ranks connect, or agreed on after); other ranks name themselves."""
    if dist is not None and dist.enabled and launch.rank != 0:
        _stderr(f"trainer.train: error: rank {launch.rank}: {e}")
    else:
        say(f"trainer.train: error: {e}")


def _fmt(ev: dict[str, Any] | None, key: str | None) -> str:
    if not ev:
        return "-"
    for k in (key, "eval/normalized_score", "eval/return_mean"):
        if k and isinstance(ev.get(k), int | float):
            return f"{k.split('/')[-1]} {ev[k]:.2f} @ {ev['step']}"
    vals = [f"{k} {v:.4g}" for k, v in ev.items() if k.startswith("val/") and isinstance(v, float)]
    return ", ".join(vals[:2]) or "-"


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"run {summary['run']}: {summary['total_steps']} steps in {summary['wall_time_s']:.1f}s")
    width = max(len(st["name"]) for st in summary["stages"])
    for st in summary["stages"]:
        sps = st["steps_per_s"]
        print(
            f"  {st['name']:<{width}} {st['steps']:>7} steps  "
            f"{(f'{sps:.0f}' if sps else '-'):>6} steps/s  "
            f"final {_fmt(st['final_eval'], summary['metric'])}  "
            f"best {_fmt(st['best_eval'], summary['metric'])}"
            + ("  (early stop)" if st["stopped_early"] else "")
        )


if __name__ == "__main__":
    sys.exit(main())
