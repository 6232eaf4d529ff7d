"""Gradient steps per second of our BC / IQL / CQL against d3rlpy's, in float32, on the same data.

    python scripts/bench_train.py                  # ~12 s per row and side, CPU (+ CUDA)
    python scripts/bench_train.py --quick --no-compile   # smoke run, ~1 s per row and side
    python scripts/bench_train.py --algos iql cql --actions continuous --steps 100 --rounds 6

One synthetic dataset per action type is generated in memory (1M transitions by default;
obs 17; 6 continuous actions in [-1, 1], or 6 discrete actions), in episodes of 1000 steps
with some early terminations. Both sides use d3rlpy's default network sizes (256 x 256
hidden, twin critics for IQL / CQL, one for discrete CQL), batch 256, one CPU thread by
default (the training configs' setting; ``--threads``), and float32 arithmetic throughout
(our ``compute_dtype`` and ``penalty_dtype`` pinned to float32, as the demo configs do;
``--bf16`` adds rows with bfloat16 hidden layers for information, on devices with bf16
units). Each of our rows runs twice: as configured by default, and ``[compile]`` with
``compile: true`` (torch.compile of the losses; the time its first steps spent compiling
is shown; ``--no-compile`` skips these rows). d3rlpy's own ``compile_graph`` works on CUDA
only, so its side runs as d3rlpy runs on a CPU. Each step includes drawing its batch: ours
from the training loop's own :class:`trainer.samplers.TransitionSampler` (one index draw,
one gather), d3rlpy's from ``sample_transition_batch`` on its replay buffer, as its
``fit`` does.

The two sides take turns in short rounds (``--rounds``), so a machine shared with other
work slows both alike. Columns: steps/s of each side over all its rounds, in CPU time
(``time.process_time``: the time the process actually ran, which time-slicing with other
processes does not inflate); ``ratio`` = ours / d3rlpy, the median over rounds of the ratio
of CPU-time rates within a round; ``wall`` the same in wall-clock time; the target and
PASS / MISS on ``ratio``. d3rlpy has no discrete IQL: that row shows ours alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.store import ActionSpace  # noqa: E402
from trainer.algos import AlgoContext, make_algorithm  # noqa: E402
from trainer.algos.base import has_fast_bf16  # noqa: E402
from trainer.samplers import DeviceTransitions, TransitionArrays, TransitionSampler  # noqa: E402

OBS_DIM, ACT_DIM, N_DISCRETE, BATCH, EPISODE_LEN = 17, 6, 6, 256, 1000
TARGETS = {"bc": 3.0, "iql": 2.5, "cql": 3.0}
FLOAT32 = {"compute_dtype": "float32"}


# ----------------------------------------------------------------------------- data
def make_dataset(n: int, discrete: bool, seed: int) -> TransitionArrays:
    """Episodes of a smooth random walk laid end to end, 30% of them really ending."""
    rng = np.random.default_rng(seed)
    n_episodes = max(n // EPISODE_LEN, 1)
    n = n_episodes * EPISODE_LEN
    # one extra row per episode for the last next_observation
    steps = rng.standard_normal((n_episodes, EPISODE_LEN + 1, OBS_DIM), dtype=np.float32) * 0.1
    walk = np.cumsum(steps, axis=1)
    if discrete:
        actions: np.ndarray = rng.integers(0, N_DISCRETE, size=n, dtype=np.int64)
    else:
        actions = np.clip(rng.normal(0.0, 0.5, size=(n, ACT_DIM)), -1.0, 1.0).astype(np.float32)
    terminated = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    last = np.arange(1, n_episodes + 1) * EPISODE_LEN - 1
    ends_early = rng.random(n_episodes) < 0.3
    terminated[last[ends_early]] = True
    truncated[last[~ends_early]] = True
    return TransitionArrays(
        observations=walk[:, :-1].reshape(n, OBS_DIM),
        actions=actions,
        rewards=rng.standard_normal(n, dtype=np.float32),
        next_observations=walk[:, 1:].reshape(n, OBS_DIM),
        terminated=terminated,
        truncated=truncated,
        return_to_go=np.zeros(n, dtype=np.float32),  # unused by these algorithms
        episode_start=np.arange(n_episodes, dtype=np.int64) * EPISODE_LEN,
        episode_length=np.full(n_episodes, EPISODE_LEN, dtype=np.int64),
    )


def make_ctx(data: TransitionArrays, discrete: bool, device: torch.device) -> AlgoContext:
    if discrete:
        space = ActionSpace("discrete", N_DISCRETE, None, None, None)
    else:
        space = ActionSpace("continuous", None, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM))
    return AlgoContext(
        obs_dim=OBS_DIM,
        action_space=space,
        obs_mean=np.asarray(data.observations).mean(axis=0),
        obs_std=np.asarray(data.observations).std(axis=0),
        discount=0.99,
        device=device,
    )


# ----------------------------------------------------------------------------- d3rlpy
D3RLPY_NAMES = {
    "bc-mse": "BC (deterministic)",
    "bc-nll": "BC (stochastic)",
    "iql": "IQL",
    "cql": "CQL",
    "discrete-bc": "DiscreteBC",
    "discrete-cql": "DiscreteCQL",
}


def d3rlpy_dataset(data: TransitionArrays) -> Any:
    import d3rlpy

    discrete = data.actions.ndim == 1
    return d3rlpy.dataset.MDPDataset(
        observations=data.observations,
        actions=data.actions,
        rewards=data.rewards,
        terminals=data.terminated.astype(np.float32),
        timeouts=data.truncated.astype(np.float32),
        action_space=d3rlpy.ActionSpace.DISCRETE if discrete else d3rlpy.ActionSpace.CONTINUOUS,
        action_size=N_DISCRETE if discrete else ACT_DIM,
    )


def d3rlpy_algo(kind: str, dataset: Any, device: torch.device) -> Any:
    """d3rlpy's algorithm with its defaults (batch 256; float32, not compiled)."""
    import d3rlpy

    configs: dict[str, Callable[[], Any]] = {
        "bc-mse": lambda: d3rlpy.algos.BCConfig(batch_size=BATCH, policy_type="deterministic"),
        "bc-nll": lambda: d3rlpy.algos.BCConfig(batch_size=BATCH, policy_type="stochastic"),
        "iql": lambda: d3rlpy.algos.IQLConfig(batch_size=BATCH),
        "cql": lambda: d3rlpy.algos.CQLConfig(batch_size=BATCH),
        "discrete-bc": lambda: d3rlpy.algos.DiscreteBCConfig(batch_size=BATCH),
        "discrete-cql": lambda: d3rlpy.algos.DiscreteCQLConfig(batch_size=BATCH),
    }
    d3_device = "cuda:0" if device.type == "cuda" else "cpu:0"
    algo = configs[kind]().create(device=d3_device)
    algo.build_with_dataset(dataset)
    return algo


# ----------------------------------------------------------------------------- timing
Step = Callable[[], Any]


@dataclass
class Tally:
    """Steps and times of one side, per round: (steps, cpu seconds, wall seconds)."""

    rounds: list[tuple[int, float, float]] = field(default_factory=list)

    def rate(self, which: int) -> float:
        """Steps/s over all rounds; ``which`` 1 = CPU time, 2 = wall time."""
        steps = sum(r[0] for r in self.rounds)
        seconds = sum(r[which] for r in self.rounds)
        return steps / seconds if seconds > 0 else float("nan")

    def round_rates(self, which: int) -> list[float]:
        return [r[0] / max(r[which], 1e-9) for r in self.rounds]


def run_round(tally: Tally, step: Step, seconds: float, steps: int | None, sync: Step) -> None:
    """``step()`` for ``steps`` steps, or until ``seconds`` of CPU time; added to ``tally``."""
    sync()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    done = 0
    while True:
        step()
        done += 1
        if steps is not None:
            if done >= steps:
                break
        elif time.process_time() - cpu0 >= seconds:
            break
    sync()
    tally.rounds.append((done, time.process_time() - cpu0, time.perf_counter() - wall0))


@dataclass
class Row:
    algo: str
    action: str
    ours: Tally
    theirs: Tally | None
    target: float | None
    versus: str

    def ratio(self, which: int) -> float:
        """Median over rounds of ours / theirs (rounds alternate, so each pair shares the load)."""
        if self.theirs is None:
            return float("nan")
        pairs = zip(self.ours.round_rates(which), self.theirs.round_rates(which))
        return float(np.median([a / b for a, b in pairs]))

    @property
    def result(self) -> str:
        if self.theirs is None:
            return "-"
        if self.target is None:
            return "(info)"
        return "PASS" if self.ratio(1) >= self.target else "MISS"


def compare(
    ours: Step,
    theirs: Step | None,
    args: argparse.Namespace,
    sync: Step,
) -> tuple[Tally, Tally | None, float]:
    """Both sides' tallies, and the wall time of our warm-up (which includes compiling)."""
    mine, other = Tally(), (Tally() if theirs is not None else None)
    warmup = 0.0
    for side in (ours, theirs):  # warm-up: first steps allocate, fill caches, compile
        if side is not None:
            start = time.perf_counter()
            for _ in range(args.warmup):
                side()
            sync()
            warmup = warmup or time.perf_counter() - start
    for _ in range(args.rounds):
        run_round(mine, ours, args.seconds / args.rounds, args.steps, sync)
        if theirs is not None and other is not None:
            run_round(other, theirs, args.seconds / args.rounds, args.steps, sync)
    return mine, other, warmup


def fmt(value: float, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if np.isnan(value) else f"{value:{width}{spec}}"


HEADER = (
    f"{'algo':<20} {'actions':<10} {'ours/s':>8} {'d3rlpy/s':>9} {'ratio':>6} {'wall':>6} "
    f"{'target':>7}  result  versus"
)


def row_line(row: Row) -> str:
    theirs = row.theirs.rate(1) if row.theirs else float("nan")
    target = f"{row.target:6.1f}x" if row.target else f"{'-':>7}"
    return (
        f"{row.algo:<20} {row.action:<10} {fmt(row.ours.rate(1), '.1f', 8)} "
        f"{fmt(theirs, '.1f', 9)} {fmt(row.ratio(1), '.2f', 6)} {fmt(row.ratio(2), '.2f', 6)} "
        f"{target}  {row.result:<6}  {row.versus}"
    )


def markdown(rows: list[Row]) -> str:
    lines = [
        "| algo | actions | ours steps/s | d3rlpy steps/s | ours / d3rlpy | (wall clock) | target "
        "| result | versus |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        theirs = f"{r.theirs.rate(1):.1f}" if r.theirs else "-"
        ratio = f"{r.ratio(1):.2f}x" if r.theirs else "-"
        wall = f"{r.ratio(2):.2f}x" if r.theirs else "-"
        target = f">= {r.target:g}x" if r.target else "-"
        lines.append(
            f"| {r.algo} | {r.action} | {r.ours.rate(1):.1f} | {theirs} | {ratio} | {wall} | "
            f"{target} | {r.result} | {r.versus} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Case:
    label: str
    name: str  # our algorithm
    config: dict[str, Any]
    d3rlpy: str | None  # key of D3RLPY_NAMES, None = no counterpart
    target: float | None  # None: an information row


def plan_for(discrete: bool, device: torch.device, bf16: bool, compile: bool) -> list[Case]:
    """Target rows run float32, as configured by default and (``compile``) with
    ``compile: true``; ``bf16`` adds bfloat16 rows (information only)."""
    f32_cql = {**FLOAT32, "penalty_dtype": "float32"}
    if discrete:
        cases = [
            Case("bc", "bc", FLOAT32, "discrete-bc", TARGETS["bc"]),
            Case("iql", "iql", FLOAT32, None, None),
            Case("cql", "cql", FLOAT32, "discrete-cql", TARGETS["cql"]),
        ]
    else:
        cases = [
            Case("bc (mse)", "bc", {**FLOAT32, "loss": "mse"}, "bc-mse", TARGETS["bc"]),
            Case("bc (nll)", "bc", {**FLOAT32, "loss": "nll"}, "bc-nll", TARGETS["bc"]),
            Case("iql", "iql", FLOAT32, "iql", TARGETS["iql"]),
            Case("cql", "cql", f32_cql, "cql", TARGETS["cql"]),
        ]
    if compile:
        cases = [
            row
            for c in cases
            for row in (
                c,
                Case(
                    f"{c.label} [compile]",
                    c.name,
                    {**c.config, "compile": True},
                    c.d3rlpy,
                    c.target,
                ),
            )
        ]
    if bf16 and has_fast_bf16(device):
        low = {"compute_dtype": "bfloat16"}
        extra = [
            Case(f"{c.label} [bf16]", c.name, {**c.config, **low}, c.d3rlpy, None)
            for c in cases
            if c.d3rlpy is not None and not c.config.get("compile")
        ]
        if not discrete:  # CQL's sampled-action penalty too
            extra[-1] = Case("cql [bf16]", "cql", {**low, "penalty_dtype": "bfloat16"}, "cql", None)
        cases += extra
    return cases


def ours_step(algo: Any, sampler: TransitionSampler) -> Step:
    return lambda: algo.update(sampler.sample())


def d3rlpy_step(algo: Any, dataset: Any) -> Step:
    return lambda: algo.update(dataset.sample_transition_batch(BATCH))


def bench_action_type(
    device: torch.device, discrete: bool, args: argparse.Namespace, sync: Step
) -> list[Row]:
    action = "discrete" if discrete else "continuous"
    cases = [
        c
        for c in plan_for(discrete, device, args.bf16, not args.no_compile)
        if c.name in args.algos
    ]
    if not cases:
        return []
    t0 = time.perf_counter()
    data = make_dataset(args.transitions, discrete, seed=0)
    sampler = TransitionSampler(DeviceTransitions(data, device=device), BATCH, seed=0)
    ctx = make_ctx(data, discrete, device)
    d3_data = None if args.no_d3rlpy else d3rlpy_dataset(data)
    print(
        f"-- {action}: {data.n_transitions:,} transitions generated and loaded in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    print(HEADER, flush=True)

    rows = []
    for case in cases:
        torch.manual_seed(0)
        ours = ours_step(make_algorithm(case.name, ctx, dict(case.config)), sampler)
        theirs = None
        if d3_data is not None and case.d3rlpy is not None:
            theirs = d3rlpy_step(d3rlpy_algo(case.d3rlpy, d3_data, device), d3_data)
        versus = f"vs {D3RLPY_NAMES[case.d3rlpy]}" if case.d3rlpy else "d3rlpy has no discrete IQL"
        mine, other, warmup = compare(ours, theirs, args, sync)
        if case.config.get("compile"):
            versus += f"; compiled in {warmup:.0f} s"
        row = Row(case.label, action, mine, other, case.target if theirs else None, versus)
        print(row_line(row), flush=True)
        rows.append(row)
    return rows


def bench_device(device: torch.device, args: argparse.Namespace) -> list[Row]:
    budget = f"{args.steps} steps" if args.steps else f"{args.seconds:g} s CPU time"
    print(
        f"\n== device: {describe(device)} | batch {BATCH} | hidden 256x256 | float32 | "
        f"{budget} per side in {args.rounds} alternating rounds",
        flush=True,
    )
    sync: Step = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )
    rows: list[Row] = []
    for discrete in (False, True):
        if args.actions in ("both", "discrete" if discrete else "continuous"):
            rows += bench_action_type(device, discrete, args, sync)
    return rows


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, torch {torch.__version__})"


def quiet_d3rlpy() -> None:
    """d3rlpy logs every dataset and build at INFO through structlog; keep the table readable."""
    warnings.filterwarnings("ignore")
    try:
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    except ImportError:
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 s per side in 2 rounds, 100k rows")
    parser.add_argument(
        "--seconds", type=float, default=None, help="CPU time per side and row (default 12)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per round and side instead of --seconds"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="alternating rounds per row (default 8)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per side first")
    parser.add_argument(
        "--transitions", type=int, default=None, help="dataset size (default 1M; --quick 100k)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1, as the training configs use; 0 = torch's default)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--algos", nargs="*", choices=["bc", "iql", "cql"], default=["bc", "iql", "cql"]
    )
    parser.add_argument(
        "--actions", choices=["both", "continuous", "discrete"], default="both", help="which rows"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="add bfloat16 rows (devices with bf16 units only)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the rows with compile: true"
    )
    parser.add_argument("--no-d3rlpy", action="store_true", help="time ours only")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 12.0
    if args.rounds is None:
        args.rounds = 2 if args.quick else 8
    if args.transitions is None:
        args.transitions = 100_000 if args.quick else 1_000_000
    for name in ("seconds", "rounds", "transitions", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be > 0, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.no_d3rlpy:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # gym's deprecation banner
                import d3rlpy  # noqa: F401
        except ImportError:
            print(
                "d3rlpy is not installed (pip install -e '.[d3rlpy]'); use --no-d3rlpy",
                file=sys.stderr,
            )
            return 2
    quiet_d3rlpy()

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available", file=sys.stderr)
            return 2
        devices.append(torch.device("cuda"))
    print(f"bench_train: {args.transitions:,} transitions per dataset, batch {BATCH}")
    for device in devices:
        rows = bench_device(device, args)
        if rows:
            print(f"\n{describe(device)}, float32, ours / d3rlpy in steps/s (CPU time):")
            print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
