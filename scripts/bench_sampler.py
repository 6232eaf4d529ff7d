"""Sampler throughput: our one-gather sampler against a per-item DataLoader and d3rlpy.

    python scripts/bench_sampler.py              # 1M transitions, ~3 s per contender
    python scripts/bench_sampler.py --quick      # 200k transitions, short rounds (smoke test)

One synthetic dataset (>= 1M transitions, obs 17, 6 continuous actions, episodes of 1000
steps, some terminated and the rest truncated) is sampled with batch 256 by:

- ``ours``: :class:`trainer.samplers.TransitionSampler`, the data packed in one matrix on the
  device, one ``randint`` and one ``index_select`` per batch (plus, on CPU, nothing else);
- ``DataLoader``: ``torch.utils.data.DataLoader(shuffle=True, batch_size=256)`` over a
  ``Dataset`` whose ``__getitem__`` returns one transition (the common per-item style);
- ``d3rlpy``: ``ReplayBuffer.sample_transition_batch(256)`` on the same data converted to an
  ``MDPDataset`` by ``trainer.d3rlpy_adapter.to_mdp_dataset``.

and, for sequence models, ``ours-slices`` (windows of 20 steps, masked) against d3rlpy's
``sample_trajectory_batch(256, 20)``. Contenders take turns in short rounds, so a busy
machine slows them alike; the table prints batches/s and the ratio of ours to each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.store import ActionSpace  # noqa: E402
from trainer.d3rlpy_adapter import to_mdp_dataset  # noqa: E402
from trainer.samplers import (  # noqa: E402
    DeviceTransitions,
    TrajectorySliceSampler,
    TransitionArrays,
    TransitionSampler,
)

OBS_DIM, ACT_DIM, BATCH, EPISODE_LEN, SLICE = 17, 6, 256, 1000, 20
TARGET_VS_DATALOADER = 50.0


def make_arrays(n: int, seed: int = 0) -> TransitionArrays:
    """Episodes of a smooth random walk, laid end to end, with consistent next observations."""
    rng = np.random.default_rng(seed)
    n_ep = max(n // EPISODE_LEN, 1)
    n = n_ep * EPISODE_LEN
    walk = np.cumsum(
        rng.standard_normal((n_ep, EPISODE_LEN + 1, OBS_DIM), dtype=np.float32) * 0.1, axis=1
    )
    obs = np.ascontiguousarray(walk[:, :-1].reshape(n, OBS_DIM))
    nxt = np.ascontiguousarray(walk[:, 1:].reshape(n, OBS_DIM))
    actions = np.clip(rng.normal(0, 0.5, (n, ACT_DIM)), -1, 1).astype(np.float32)
    rewards = rng.standard_normal(n, dtype=np.float32)
    starts = np.arange(n_ep, dtype=np.int64) * EPISODE_LEN
    lengths = np.full(n_ep, EPISODE_LEN, dtype=np.int64)
    last = starts + EPISODE_LEN - 1
    early = rng.random(n_ep) < 0.3
    terminated = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    terminated[last[early]] = True
    truncated[last[~early]] = True
    rtg = np.zeros(n, dtype=np.float32)  # not needed for throughput
    return TransitionArrays(obs, actions, rewards, nxt, terminated, truncated, rtg, starts, lengths)


class PerItemDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """One transition per ``__getitem__``, as tensors: the per-item style."""

    def __init__(self, a: TransitionArrays) -> None:
        self.a = a

    def __len__(self) -> int:
        return self.a.n_transitions

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a = self.a
        return {
            "observations": torch.from_numpy(a.observations[i]),
            "actions": torch.from_numpy(a.actions[i]),
            "rewards": torch.tensor(a.rewards[i]),
            "next_observations": torch.from_numpy(a.next_observations[i]),
            "terminated": torch.tensor(float(a.terminated[i])),
            "truncated": torch.tensor(float(a.truncated[i])),
        }


def _loader_batches(arrays: TransitionArrays, seed: int) -> Callable[[], Any]:
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        PerItemDataset(arrays), batch_size=BATCH, shuffle=True, num_workers=0, generator=g
    )
    state = {"it": iter(loader)}

    def next_batch() -> Any:
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    return next_batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_rounds(
    contenders: dict[str, Callable[[], Any]], seconds: float, device: torch.device
) -> dict[str, float]:
    """Batches/s of each contender, in alternating rounds of ~``seconds / 5`` each."""
    counts = dict.fromkeys(contenders, 0)
    times = dict.fromkeys(contenders, 0.0)
    for fn in contenders.values():  # warm up (allocator, first iterator)
        for _ in range(3):
            fn()
    _sync(device)
    rounds = 5
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < seconds / rounds:
                for _ in range(8):
                    fn()
                n += 8
            _sync(device)
            times[name] += time.perf_counter() - t0
            counts[name] += n
    return {k: counts[k] / times[k] for k in contenders}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--transitions", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=3.0, help="time per contender")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quick", action="store_true", help="200k transitions, 0.5 s per contender")
    args = p.parse_args(argv)
    if args.quick:
        args.transitions, args.seconds = 200_000, 0.5
    torch.set_num_threads(args.threads)
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if dev == "auto" else dev)

    t0 = time.perf_counter()
    arrays = make_arrays(args.transitions)
    space = ActionSpace(
        "continuous", None, ACT_DIM, -np.ones(ACT_DIM, np.float32), np.ones(ACT_DIM, np.float32)
    )
    data = DeviceTransitions(arrays, device=device)
    t_pack = time.perf_counter() - t0
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        mdp = to_mdp_dataset(arrays, space)
    t_d3 = time.perf_counter() - t0

    ours = TransitionSampler(data, BATCH, seed=0)
    slices = TrajectorySliceSampler(data, BATCH, SLICE, seed=0)
    print(
        f"{arrays.n_transitions:,} transitions in {arrays.n_episodes} episodes, obs {OBS_DIM}, "
        f"action {ACT_DIM}, batch {BATCH}; device {device}, {args.threads} thread(s)"
    )
    print(f"setup: pack into one matrix {t_pack:.2f}s, d3rlpy MDPDataset {t_d3:.2f}s\n")

    rates = run_rounds(
        {
            "ours": ours.sample,
            "DataLoader (per item)": _loader_batches(arrays, 0),
            "d3rlpy sample_transition_batch": lambda: mdp.sample_transition_batch(BATCH),
        },
        args.seconds,
        device,
    )
    slice_rates = run_rounds(
        {
            f"ours-slices (L={SLICE})": slices.sample,
            f"d3rlpy sample_trajectory_batch (L={SLICE})": lambda: mdp.sample_trajectory_batch(
                BATCH, SLICE
            ),
        },
        args.seconds / 2,
        device,
    )

    mine = rates["ours"]
    print("| sampler | batches/s | ours / it |")
    print("|---|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {r:,.0f} | {mine / r:,.1f}x |")
    mine_s = slice_rates[f"ours-slices (L={SLICE})"]
    for name, r in slice_rates.items():
        print(f"| {name} | {r:,.0f} | {mine_s / r:,.1f}x |")
    ratio = mine / rates["DataLoader (per item)"]
    verdict = "PASS" if ratio >= TARGET_VS_DATALOADER else "MISS"
    print(
        f"\ntarget: ours >= {TARGET_VS_DATALOADER:.0f}x the per-item DataLoader: {ratio:,.0f}x {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
