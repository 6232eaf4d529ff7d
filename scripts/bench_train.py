"""Gradient steps per second of our BC / IQL / CQL against d3rlpy's, on the same data.

    python scripts/bench_train.py            # ~15 s per algorithm and side, CPU (+ CUDA if present)
    python scripts/bench_train.py --quick    # 2 s smoke run

One synthetic dataset per action type is generated in memory (>= 1M transitions; obs 17;
6 continuous actions in [-1, 1], or 6 discrete actions), in episodes of 1000 steps with
some early terminations. Both sides use d3rlpy's default network sizes (256 x 256 hidden,
twin critics for IQL / CQL, one for discrete CQL), batch 256, one CPU thread by default
(the training configs' setting; ``--threads``), and each step includes
drawing its batch: ours one index draw and one gather from the data packed in one
matrix, d3rlpy ``sample_transition_batch`` on its replay buffer. Ours and d3rlpy's take
turns in short rounds so a noisy machine slows both alike; what matters is the ratio.

Columns: steps/s of each side over the whole budget; ``ratio`` = ours / d3rlpy, the median
over rounds of the ratio within a round (robust to bursts of load from other processes);
``upd-ratio`` the same with the sampling time taken out of both sides (what the update
alone gains); the issue's target and PASS / MISS on ``ratio``.
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
from trainer.algos import CONFIGS, AlgoContext, make_algorithm  # noqa: E402
from trainer.algos.base import has_fast_bf16, resolve_dtype  # noqa: E402
from trainer.batch import TransitionBatch  # noqa: E402

OBS_DIM, ACT_DIM, N_DISCRETE, BATCH, EPISODE_LEN = 17, 6, 6, 256, 1000
TARGETS = {"bc": 3.0, "iql": 2.5, "cql": 3.0}


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Dataset:
    """Episodes laid end to end; ``next_observations[i]`` is the row after ``i`` in its episode."""

    observations: np.ndarray  # (N, 17) float32
    actions: np.ndarray  # (N, 6) float32 in [-1, 1], or (N,) int64
    rewards: np.ndarray  # (N,) float32
    next_observations: np.ndarray  # (N, 17) float32
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool


def make_dataset(n: int, discrete: bool, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    n_episodes = max(n // EPISODE_LEN, 1)
    n = n_episodes * EPISODE_LEN
    # a smooth random walk per episode, with one extra row for the last next_observation
    steps = rng.standard_normal((n_episodes, EPISODE_LEN + 1, OBS_DIM), dtype=np.float32) * 0.1
    walk = np.cumsum(steps, axis=1)
    obs = walk[:, :-1].reshape(n, OBS_DIM)
    next_obs = walk[:, 1:].reshape(n, OBS_DIM)
    if discrete:
        actions: np.ndarray = rng.integers(0, N_DISCRETE, size=n, dtype=np.int64)
    else:
        actions = np.clip(rng.normal(0.0, 0.5, size=(n, ACT_DIM)), -1.0, 1.0).astype(np.float32)
    rewards = rng.standard_normal(n, dtype=np.float32)
    terminated = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    last = np.arange(1, n_episodes + 1) * EPISODE_LEN - 1
    ends_early = rng.random(n_episodes) < 0.3  # 30% really end (no bootstrap), the rest time out
    terminated[last[ends_early]] = True
    truncated[last[~ends_early]] = True
    return Dataset(obs, actions, rewards, next_obs, terminated, truncated)


class GatherSampler:
    """The whole dataset as one (N, width) matrix on the device; a batch is one gather."""

    def __init__(self, data: Dataset, device: torch.device, seed: int) -> None:
        self.discrete = data.actions.ndim == 1
        act = data.actions.reshape(len(data.rewards), -1).astype(np.float32)
        columns = [
            data.observations,
            act,
            data.rewards[:, None],
            data.next_observations,
            data.terminated[:, None].astype(np.float32),
            data.truncated[:, None].astype(np.float32),
            np.zeros_like(data.rewards)[:, None],  # return-to-go: unused by these algorithms
        ]
        widths = [c.shape[1] for c in columns]
        self.bounds = np.cumsum([0, *widths]).tolist()
        self.matrix = torch.from_numpy(np.concatenate(columns, axis=1)).to(device)
        self.n = len(data.rewards)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def sample(self, batch_size: int) -> TransitionBatch:
        idx = torch.randint(self.n, (batch_size,), device=self.device, generator=self.generator)
        rows = self.matrix.index_select(0, idx)
        b = self.bounds
        cols = [rows[:, b[i] : b[i + 1]] for i in range(len(b) - 1)]
        actions = cols[1].squeeze(1).long() if self.discrete else cols[1]
        return TransitionBatch(
            observations=cols[0],
            actions=actions,
            rewards=cols[2].squeeze(1),
            next_observations=cols[3],
            terminated=cols[4].squeeze(1),
            truncated=cols[5].squeeze(1),
            return_to_go=cols[6].squeeze(1),
        )


def make_ctx(data: Dataset, discrete: bool, device: torch.device) -> AlgoContext:
    if discrete:
        space = ActionSpace("discrete", N_DISCRETE, None, None, None)
    else:
        space = ActionSpace("continuous", None, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM))
    return AlgoContext(
        obs_dim=OBS_DIM,
        action_space=space,
        obs_mean=data.observations.mean(axis=0),
        obs_std=data.observations.std(axis=0),
        discount=0.99,
        device=device,
    )


# ----------------------------------------------------------------------------- d3rlpy
def d3rlpy_dataset(data: Dataset) -> Any:
    import d3rlpy

    space = d3rlpy.ActionSpace.DISCRETE if data.actions.ndim == 1 else d3rlpy.ActionSpace.CONTINUOUS
    return d3rlpy.dataset.MDPDataset(
        observations=data.observations,
        actions=data.actions,
        rewards=data.rewards,
        terminals=data.terminated.astype(np.float32),
        timeouts=data.truncated.astype(np.float32),
        action_space=space,
        action_size=N_DISCRETE if data.actions.ndim == 1 else ACT_DIM,
    )


def d3rlpy_algo(kind: str, dataset: Any, device: torch.device) -> Any:
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
@dataclass
class Tally:
    steps: int = 0
    seconds: float = 0.0
    sample_seconds: float = 0.0
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (rate, update rate)

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds else float("nan")

    @property
    def update_rate(self) -> float:
        spent = self.seconds - self.sample_seconds
        return self.steps / spent if spent > 0 else float("nan")


def run_for(
    tally: Tally,
    seconds: float,
    sample: Callable[[], Any],
    update: Callable[[Any], Any],
    sync: Callable[[], None],
) -> None:
    """Steps of ``update(sample())`` for ``seconds`` of wall time, added to ``tally``."""
    sync()
    start = time.perf_counter()
    sampling = 0.0
    steps = 0
    while True:
        t0 = time.perf_counter()
        batch = sample()
        t1 = time.perf_counter()
        update(batch)
        sampling += t1 - t0
        steps += 1
        if time.perf_counter() - start >= seconds:
            break
    sync()
    elapsed = time.perf_counter() - start
    tally.steps += steps
    tally.seconds += elapsed
    tally.sample_seconds += sampling
    tally.rounds.append((steps / elapsed, steps / max(elapsed - sampling, 1e-9)))


def median_ratio(ours: Tally, theirs: Tally, which: int) -> float:
    """Median over rounds of ours / theirs; rounds alternate, so each pair shares the load."""
    return float(np.median([a[which] / b[which] for a, b in zip(ours.rounds, theirs.rounds)]))


@dataclass
class Row:
    algo: str
    action: str
    ours: Tally
    theirs: Tally | None
    target: float | None
    note: str = ""


def compare(
    label: str,
    action: str,
    ours: tuple[Callable[[], Any], Callable[[Any], Any]],
    theirs: tuple[Callable[[], Any], Callable[[Any], Any]] | None,
    target: float | None,
    seconds: float,
    rounds: int,
    sync: Callable[[], None],
    note: str = "",
) -> Row:
    mine, other = Tally(), (Tally() if theirs is not None else None)
    for side in (ours, theirs):  # warm-up: first steps allocate, fill caches, compile
        if side is not None:
            sample, update = side
            for _ in range(5):
                update(sample())
    for _ in range(rounds):
        run_for(mine, seconds / rounds, *ours, sync)
        if theirs is not None and other is not None:
            run_for(other, seconds / rounds, *theirs, sync)
    row = Row(label, action, mine, other, target, note)
    print_row(row)
    return row


HEADER = (
    f"{'algo':<26} {'actions':<10} {'ours/s':>8} {'d3rlpy/s':>9} {'ratio':>6} "
    f"{'upd-ratio':>9} {'target':>7}  result"
)


def print_row(row: Row) -> None:
    theirs = f"{row.theirs.rate:9.1f}" if row.theirs else f"{'-':>9}"
    if row.theirs:
        ratio = median_ratio(row.ours, row.theirs, 0)
        upd = median_ratio(row.ours, row.theirs, 1)
        ratio_s, upd_s = f"{ratio:6.2f}", f"{upd:9.2f}"
    else:
        ratio, ratio_s, upd_s = float("nan"), f"{'-':>6}", f"{'-':>9}"
    target = f"{row.target:6.1f}x" if row.target else f"{'-':>7}"
    if row.target and row.theirs:
        result = "PASS" if ratio >= row.target else "MISS"
    else:
        result = "-" if row.theirs is None else "(info)"
    note = f"  {row.note}" if row.note else ""
    print(
        f"{row.algo:<26} {row.action:<10} {row.ours.rate:8.1f} {theirs} {ratio_s} {upd_s} "
        f"{target}  {result}{note}",
        flush=True,
    )


# ----------------------------------------------------------------------------- main
Plan = list[tuple[str, str, dict[str, Any], str | None, float | None, str]]
Side = tuple[Callable[[], Any], Callable[[Any], Any]]


def dtype_name(value: str, device: torch.device) -> str:
    return str(resolve_dtype(value, device)).removeprefix("torch.")


def plan_for(discrete: bool, device: torch.device) -> Plan:
    """(label, our algorithm, our config, d3rlpy counterpart, target, note) per row.

    Rows with a target run our defaults; the "(info)" rows run the other matmul precision
    for comparison (bfloat16 where the default is float32 and the device has bf16 units).
    """
    bf16 = has_fast_bf16(device)

    def default_dtype(name: str, field: str = "compute_dtype") -> str:
        return dtype_name(getattr(CONFIGS[name](), field), device)

    def other(name: str, base: dict[str, Any], d3: str | None, note: str) -> Plan:
        current = default_dtype(name)
        alt = "float32" if current == "bfloat16" else "bfloat16"
        if alt == "bfloat16" and not bf16:
            return []
        label = f"{name}{' (' + base['loss'] + ')' if 'loss' in base else ''} [{alt}]"
        return [(label, name, {**base, "compute_dtype": alt}, d3, None, note)]

    def row(name: str, base: dict[str, Any], d3: str | None, note: str) -> Plan:
        label = f"{name}{' (' + base['loss'] + ')' if 'loss' in base else ''}"
        target = TARGETS[name] if d3 is not None else None
        return [(label, name, base, d3, target, f"{note} [{default_dtype(name)}]".strip())]

    if discrete:
        return [
            *row("bc", {}, "discrete-bc", "vs DiscreteBC"),
            *other("bc", {}, "discrete-bc", "vs DiscreteBC"),
            *row("iql", {}, None, "(d3rlpy has no discrete IQL)"),
            *row("cql", {}, "discrete-cql", "vs DiscreteCQL"),
            *other("cql", {}, "discrete-cql", "vs DiscreteCQL"),
        ]
    penalty = default_dtype("cql", "penalty_dtype")
    return [
        *row("bc", {"loss": "mse"}, "bc-mse", "vs BC deterministic"),
        *other("bc", {"loss": "mse"}, "bc-mse", "vs BC deterministic"),
        *row("bc", {"loss": "nll"}, "bc-nll", "vs BC stochastic"),
        *row("iql", {}, "iql", "vs IQL"),
        *other("iql", {}, "iql", "vs IQL"),
        *row("cql", {}, "cql", f"vs CQL, penalty {penalty}"),
        (
            "cql [all float32]",
            "cql",
            {"compute_dtype": "float32", "penalty_dtype": "float32"},
            "cql",
            None,
            "vs CQL",
        ),
    ]


def bench_action_type(
    device: torch.device, discrete: bool, args: argparse.Namespace, sync: Callable[[], None]
) -> list[Row]:
    action = "discrete" if discrete else "continuous"
    t0 = time.perf_counter()
    data = make_dataset(args.transitions, discrete, seed=0)
    sampler = GatherSampler(data, device, seed=0)
    ctx = make_ctx(data, discrete, device)
    d3_data = None if args.no_d3rlpy else d3rlpy_dataset(data)
    print(
        f"-- {action}: {len(data.rewards):,} transitions generated and loaded in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    print(HEADER, flush=True)

    def ours(name: str, config: dict[str, Any]) -> Side:
        torch.manual_seed(0)
        algo = make_algorithm(name, ctx, config)
        return (lambda: sampler.sample(BATCH)), algo.update

    def theirs(kind: str | None) -> Side | None:
        if d3_data is None or kind is None:
            return None
        algo = d3rlpy_algo(kind, d3_data, device)
        return (lambda: d3_data.sample_transition_batch(BATCH)), algo.update

    rows = []
    for label, name, config, kind, target, note in plan_for(discrete, device):
        if args.algos and name not in args.algos:
            continue
        rows.append(
            compare(
                label,
                action,
                ours(name, config),
                theirs(kind),
                target,
                seconds=args.seconds,
                rounds=args.rounds,
                sync=sync,
                note=note,
            )
        )
    return rows


def bench_device(device: torch.device, args: argparse.Namespace) -> list[Row]:
    print(
        f"\n== device: {describe(device)} | batch {BATCH} | hidden 256x256 | "
        f"{args.seconds:g} s each side"
    )
    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )
    rows: list[Row] = []
    for discrete in (False, True):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 s per algorithm and side (smoke run)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="wall-clock budget per side (default 15)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="alternating rounds per budget (default 10)"
    )
    parser.add_argument(
        "--transitions", type=int, default=1_000_000, help="dataset size (>= 1M for the report)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1, as the training configs use; 0 = torch's default)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--algos", nargs="*", choices=["bc", "iql", "cql"], help="only these")
    parser.add_argument("--no-d3rlpy", action="store_true", help="time ours only")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 15.0
    if args.rounds is None:
        args.rounds = 2 if args.quick else 10
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
        bench_device(device, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
