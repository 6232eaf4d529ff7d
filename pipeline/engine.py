"""Where the per-chunk work of a build runs: in this process, or in worker processes.

A build describes its work as pure functions ``fn(context, task) -> result`` (parse and
check a chunk of lines, build the transitions of a spill bucket, ...) over a stream of
tasks; an engine only decides where each call runs and hands the results back **in task
order**, so the store never depends on how many workers built it.

* ``workers=1``: every call runs in this process, on a thread that keeps one task ahead
  of the consumer (reading, parsing and writing still overlap where they release the GIL);
* ``workers=N``: a pool of N spawned processes. The context is sent once to each worker;
  at most ``2 * N`` tasks are in flight, so memory stays bounded whatever the input size.

The functions hold no state besides the context, so a task that runs again (a retried
worker, or the same task in another engine) gives the same result and writes the same
files.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, Protocol, TypeVar

from pipeline.format import BuildError
from pipeline.sources import prefetch

C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")

MAX_DEFAULT_WORKERS = 8
# thread pools of the native libraries a worker may use, sized by these variables
THREAD_VARIABLES = ("POLARS_MAX_THREADS", "OMP_NUM_THREADS")

_context: Any = None  # a worker process's context, set once when it starts


def default_workers() -> int:
    """The number of CPUs this process may use, at most ``MAX_DEFAULT_WORKERS``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def _start_worker(context: bytes, env: dict[str, str], parent: int) -> None:
    """A worker's initializer: ``env`` is set before anything imports the libraries it
    tunes (the context arrives pickled, so unpickling it is what imports them), and the
    worker exits as soon as the building process ``parent`` is gone (killed, say): a
    worker blocked on the task queue would otherwise wait forever."""
    global _context
    os.environ.update(env)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    _context = pickle.loads(context)


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _call(fn: Callable[[Any, Any], Any], task: Any) -> Any:
    return fn(_context, task)


class Engine(Protocol[C]):
    """What a build asks of an engine: its ``map`` and ``run`` of pure functions over
    tasks, results in task order (:class:`LocalEngine`, :class:`pipeline.ray_engine.RayEngine`)."""

    context: C
    workers: int  # processes (or CPUs of a cluster) the functions run on

    def run(self, fn: Callable[[C, T], R], task: T) -> R: ...

    def map(self, fn: Callable[[C, T], R], tasks: Iterable[T]) -> Iterator[tuple[T, R]]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Engine[C]: ...

    def __exit__(self, *exc: object) -> None: ...


class LocalEngine(Generic[C]):
    """Runs ``fn(context, task)`` for a build, in-process (``workers=1``) or in a pool."""

    def __init__(self, context: C, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.context = context
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def run(self, fn: Callable[[C, T], R], task: T) -> R:
        """One call, in this process."""
        return fn(self.context, task)

    def map(self, fn: Callable[[C, T], R], tasks: Iterable[T]) -> Iterator[tuple[T, R]]:
        """``(task, fn(context, task))`` for every task, in the order of ``tasks``.

        ``fn`` must be a module-level function (a worker imports it by name). ``tasks``
        is consumed on a background thread, a few tasks ahead."""
        ahead = prefetch(iter(tasks), 2)
        if self.workers == 1:
            yield from prefetch(((t, fn(self.context, t)) for t in ahead), 1)
            return
        pool = self._start()
        pending: deque[tuple[T, Future[R]]] = deque()
        try:
            for task in ahead:
                pending.append((task, pool.submit(_call, fn, task)))
                if len(pending) >= 2 * self.workers:
                    yield self._result(*pending.popleft())
            while pending:
                yield self._result(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()

    def _result(self, task: T, future: Future[R]) -> tuple[T, R]:
        try:
            return task, future.result()
        except BrokenProcessPool:
            raise BuildError(
                "a build worker process died: out of memory or killed, or the script that "
                'started the build lacks an `if __name__ == "__main__":` guard (see the '
                "error above); build again, or with --workers 1 to use this process only"
            ) from None

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: polars' thread pool does not survive a fork. The workers
            # share the CPUs: each gets its share of threads for the native libraries.
            threads = str(max(1, default_workers() // self.workers))
            env = {name: threads for name in THREAD_VARIABLES}
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(pickle.dumps(self.context), env, os.getpid()),
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LocalEngine[C]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
