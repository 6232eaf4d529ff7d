"""Data-parallel training under ``torchrun``: the process group and what the ranks share.

``torchrun --standalone --nproc-per-node N -m trainer.train CONFIG`` starts N copies of the
trainer; :func:`launch_env` reads what torchrun told each one (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``TORCHELASTIC_RESTART_COUNT``) and :meth:`Distributed.start` joins the
process group (gloo on CPU, NCCL on CUDA with ``cuda:LOCAL_RANK``). A plain
``python -m trainer.train`` has no such variables and runs as :meth:`Distributed.single`,
whose every method is a no-op, so one code path serves both.

Why an all-reduce of the gradients and not a ``DistributedDataParallel`` wrapper: IQL steps
three networks after one backward pass of their summed losses, CQL steps up to five
optimizers after separate backward passes (one of them through the critic with its
parameters detached), and the algorithms call modules' methods (``log_prob``, ``sample``,
``q_of``) that a DDP wrapper's ``forward`` does not see. Averaging the gradients of each
optimizer's parameters right after ``backward`` and before clipping and the step
(:meth:`Distributed.average_gradients`, hooked into :func:`trainer.stepping.backward_and_step`)
is what DDP computes, in one flat all-reduce per update, without touching the algorithms.

What stays identical on every rank: the weights and the optimizers' state (same start,
broadcast from rank 0 at each stage's start, then the same averaged gradients), so target
networks, Polyak averages, temperatures and multipliers too; evaluation results (rank 0
evaluates and broadcasts them, so early stopping and reduce-on-plateau decide alike); the
stop-on-signal flag (agreed on at each metrics row). Each rank draws its own random numbers
(rank 0 the stream a single process would draw), and a checkpoint holds every rank's
generators and not-yet-logged metrics, so a run resumed on as many ranks goes on exactly.
Only rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells a worker about its place in the job."""

    rank: int  # this process among all of the job's
    world_size: int  # processes of the job
    local_rank: int  # this process among the node's (its CUDA device index)
    restart_count: int = 0  # torchrun's restarts of the workers so far (--max-restarts)
    master_addr: str | None = None  # torchrun's key-value store (MASTER_ADDR, MASTER_PORT)
    master_port: int | None = None


def launch_env(env: dict[str, str] | None = None) -> LaunchEnv | None:
    """The torchrun launch this process is part of, or None for a plain ``python -m``."""
    env = dict(os.environ) if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None,
        )
    except ValueError:
        return None


def _attempt_store(launch: LaunchEnv, timeout: timedelta) -> Any:
    """torchrun's key-value store (as ``init_method="env://"`` opens it), seen under a prefix
    of the restart attempt. torchrun keeps one store across restarts: without the prefix, a
    restarted rank can read the address a rank of the failed attempt published there, and
    gloo then waits to connect to a dead process."""
    import torch.distributed as dist

    if launch.master_addr is None or launch.master_port is None:
        raise RuntimeError("torchrun set RANK and WORLD_SIZE but not MASTER_ADDR / MASTER_PORT")
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        launch.master_addr,
        launch.master_port,
        launch.world_size,
        is_master=not agent_hosts and launch.rank == 0,
        timeout=timeout,
        multi_tenant=not agent_hosts,
    )
    return dist.PrefixStore(f"trainer.train/attempt_{launch.restart_count}", store)


class LostRank(Exception):
    """A collective failed: another rank died (killed, out of memory) or hung up."""


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    """A failed collective (gloo and NCCL raise RuntimeError) as :class:`LostRank`."""
    try:
        yield
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LostRank(first[:300]) from e


class PeerFailed(Exception):
    """Another rank hit an error that rank 0 reports; this rank stops without a word."""


class RankError(Exception):
    """Rank 0's report of another rank's error (the message names the rank)."""


class Distributed:
    """The ranks of a data-parallel run; for one process (:meth:`single`) a no-op."""

    def __init__(
        self, rank: int = 0, world_size: int = 1, *, device: torch.device | None = None
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")  # where collectives' tensors live
        self.enabled = False

    @classmethod
    def single(cls) -> Distributed:
        return cls()

    @classmethod
    def start(cls, launch: LaunchEnv, device: str, timeout_s: float = 1800.0) -> Distributed:
        """Join the process group of ``launch``; ``device`` is the config's resolved device
        (``cuda``: this rank's ``cuda:LOCAL_RANK`` and NCCL, else gloo)."""
        import torch.distributed as dist

        if device.startswith("cuda"):
            dev = torch.device("cuda", launch.local_rank)
            torch.cuda.set_device(dev)
            backend = "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend,
            store=_attempt_store(launch, timeout),
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
            device_id=dev if backend == "nccl" else None,
        )
        out = cls(launch.rank, launch.world_size, device=dev)
        out.enabled = True
        return out

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.enabled = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that evaluates and writes the run directory."""
        return self.rank == 0

    # ------------------------------------------------------------------ gradients
    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace every parameter's gradient by its mean over the ranks: one flat
        all-reduce per (device, dtype) (a parameter without a gradient has none on any rank:
        the ranks run the same code)."""
        if not self.enabled or self.world_size == 1:
            return
        import torch.distributed as dist

        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            with _collective():
                dist.all_reduce(flat)
            flat.div_(self.world_size)
            for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(avg.view_as(g))

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (on its own device); one all-reduce."""
        if not self.enabled or self.world_size == 1:
            return tensor
        import torch.distributed as dist

        with _collective():
            dist.all_reduce(tensor)
        return tensor

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` (weights, buffers) in place with rank 0's."""
        if not self.enabled or self.world_size == 1 or not tensors:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in tensors:
                with _collective():
                    dist.broadcast(t.data, src=0)

    # ------------------------------------------------------------------ metrics
    def mean_and_any(self, values: dict[str, float], flag: bool) -> tuple[dict[str, float], bool]:
        """``values`` averaged over the ranks (each rank holds the same keys), and whether
        ``flag`` is set on any rank; one all-reduce."""
        if not self.enabled:
            return values, flag
        import torch.distributed as dist

        vec = torch.tensor([*values.values(), float(flag)], dtype=torch.float64)
        vec = vec.to(self.device)
        with _collective():
            dist.all_reduce(vec)
        out = vec.cpu().tolist()
        means = {k: v / self.world_size for k, v in zip(values, out[:-1])}
        return means, out[-1] > 0

    # ------------------------------------------------------------------ objects
    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        with _collective():
            dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box: list[Any] = [obj if self.is_main else None]
        with _collective():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ errors
    def agree(self, error: BaseException | None) -> None:
        """Every rank learns whether any failed: rank 0 raises its own error or a
        :class:`RankError` naming the first rank that failed; the others raise
        :class:`PeerFailed` (or their own error, for one process)."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        reports = self.gather(None if error is None else str(error))
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if not failed:
            return
        if not self.is_main:
            raise PeerFailed(failed[0][1])
        if error is not None:
            raise error
        rank, msg = failed[0]
        raise RankError(f"rank {rank}: {msg}")

    @contextlib.contextmanager
    def agreed(self, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
        """Run the block on every rank and :meth:`agree` on its ``errors``: all ranks go on,
        or all stop, with one report from rank 0. Collectives inside the block must run on
        every rank or on none."""
        caught: BaseException | None = None
        try:
            yield
        except errors as e:
            caught = e
        self.agree(caught)

    def on_main(self, fn: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T:
        """``fn()`` on rank 0 only; its result (or its error, as :meth:`agree` reports it)
        on every rank."""
        if not self.enabled:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except errors as e:
                error = e
        self.agree(error)
        return self.broadcast(result)

    # ------------------------------------------------------------------ checks
    def same_state(self, state: Any, what: str) -> list[str]:
        """Every rank's sha256 of ``state`` (tensors by their bytes, through nested dicts
        and lists); a RuntimeError naming the ranks when they differ."""
        digest = state_digest(state)
        digests = self.gather(digest)
        if len(set(digests)) > 1:
            odd = [r for r, d in enumerate(digests) if d != digests[0]]
            raise RuntimeError(
                f"{what}: the weights of rank(s) {odd} differ from rank 0's; the ranks went "
                "out of step (a bug: please report it with the config)"
            )
        return digests


def state_digest(state: Any) -> str:
    """A sha256 of nested dicts / lists of tensors and plain values, keys in sorted order."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(str(k).encode() + b":")
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, list | tuple):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(state)
    return h.hexdigest()
