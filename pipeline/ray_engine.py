"""The Ray Data engine of a build: the same per-chunk functions, run on a Ray cluster.

:class:`RayEngine` offers what :class:`pipeline.engine.LocalEngine` offers (``map``,
``run``, ``close``, a ``context``), so a build runs its pure functions
``fn(context, task)`` (:mod:`pipeline.transitions.chunks`) unchanged: each task becomes a
row of a Ray dataset, ``map_batches`` calls the function on a worker, and the results
come back to the building process **in task order** (Ray Data's ``preserve_order``),
where they are written exactly as the local engine's are. The store is therefore the same
for either engine: same rows, same ``content_hash``, same quarantine.

Inputs are not shipped through the object store: a task names a line-aligned byte range
of its file (:class:`pipeline.sources.FileRange`), and the worker reads those bytes
itself. The building process still reads every file once, to hash it for the manifest and
to number its lines (quarantine records keep their ``file:line``). A compressed input
cannot be split by byte range; its chunks are decoded here and sent as bytes.

``step_per_line`` steps are grouped into episodes by Ray Data itself
(:meth:`RayEngine.map_rows`, then :meth:`RayEngine.map_groups`): each task returns its
chunk's step rows with a bucket column (a hash of the episode id) and they stay in the
object store (spilled to disk as Ray spills); only each chunk's small info (counts,
rejected lines) comes back to the building process, in task order. Then a ``groupby`` on
the bucket shuffles the rows, and each group's episodes are built on a worker by the
function the local engine runs for a bucket; the building process writes each group's
transitions as a run and merges the runs in first-appearance order, as the local engine
does. Workers read only their input ranges and never need the building process's disk:
nothing of a build passes through files on a shared filesystem.

With ``store.part_rows: N`` (JSONL inputs), the tasks write the store's transitions
themselves: each task that builds transitions writes them as parts of at most N rows under
the staging directory (:meth:`pipeline.transitions.chunks.BuildContext.write_parts`) and
returns only their episodes, statistics and counts; the building process renames the parts
in task order and reads them back to hash them (:mod:`pipeline.transitions.build`). Those
builds need the staging directory on a filesystem the workers mount at the same path.

A worker that dies (killed, out of memory) has its task retried by Ray; the functions
are pure (a ``step_per_line`` task returns the same rows again; a task that writes parts
writes the same bytes under the same names, each file whole or not at all), so the store
is the same.

Ray is an extra: ``pip install -e ".[ray]"`` (``make setup`` installs it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import signal
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.format import BuildError
from pipeline.sources import prefetch

C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")
I = TypeVar("I")  # noqa: E741 - what a map_rows task tells the build besides its rows
A = TypeVar("A")

INSTALL_HINT = 'the Ray engine needs Ray: pip install -e ".[ray]" (make setup installs it)'
CONNECT_TIMEOUT_S = 5.0  # how long --ray-address gets to answer before the build gives up
# Names a file: the first task to find it there deletes it and kills its own worker (one
# kill per file made): how a test shows that Ray retries a killed worker's task and that
# the store does not change. Set it in the cluster's environment.
KILL_ONCE_VARIABLE = "PIPELINE_RAY_KILL_ONCE"

# Tasks mapped by one Ray dataset: at most this many, or this many bytes of pickled tasks
# (a 16 MiB chunk a task: a window is ~4 GB of input). The tasks after it are listed on a
# thread meanwhile, PREFETCH_TASKS ahead (the input scan overlaps the workers' parse).
WINDOW_TASKS = 256
WINDOW_BYTES = 512 << 20
PREFETCH_TASKS = 64

# map_rows: each task's info rides on one row of its own (key -1, the other columns null),
# pickled with the task's index in this column (null on the data rows)
INFO_COLUMN = "_task_info"
RESULT_COLUMN = "_result"  # map_groups: one row per group, its pickled result

_contexts: dict[str, Any] = {}  # a worker's unpickled build contexts, by digest


def import_ray() -> Any:
    """The ``ray`` module, or a one-line BuildError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate extra of ray
    except ImportError:
        raise BuildError(f"--engine ray: {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast, in one line, when ``address`` (HOST:PORT or ray://HOST:PORT) does not
    answer: ``ray.init`` would otherwise retry for a minute and print tracebacks."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise BuildError(f"--ray-address {address}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise BuildError(
            f"--ray-address {address}: cannot reach a Ray cluster there ({e.strerror or e})"
        ) from None


def connect(address: str | None = None, *, quiet: bool = True) -> bool:
    """Join the Ray cluster at ``address``, or start a local one when ``address`` is None
    and this process is not already connected. True when this call started Ray (the
    engine then shuts it down when it closes)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is not None:
        _check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=not quiet,
            logging_level="ERROR" if quiet else "INFO",
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a new local cluster"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BuildError(f"--engine ray: cannot connect to {where}: {first}") from None
    return True


def _context(blob: bytes) -> Any:
    key = hashlib.sha256(blob).hexdigest()
    if key not in _contexts:  # once per worker process (the context builds its parser once)
        _contexts.clear()
        _contexts[key] = pickle.loads(blob)
    return _contexts[key]


def _kill_once() -> None:
    armed = os.environ.get(KILL_ONCE_VARIABLE)
    if not armed:
        return
    try:
        os.remove(armed)  # only one task succeeds
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _run_batch(batch: dict[str, Any], fn: Callable[[Any, Any], Any], context: bytes) -> dict:
    """A ``map_batches`` function: ``fn(context, task)`` for each task of the batch (a
    task's byte range is read by ``fn``, :func:`pipeline.sources.as_chunk`)."""
    _kill_once()
    ctx = _context(context)
    results = [pickle.dumps(fn(ctx, pickle.loads(bytes(t))), protocol=5) for t in batch["task"]]
    return {"index": batch["index"], "result": results}


def _rows_batch(
    batch: dict[str, Any], fn: Callable[[Any, Any], Any], context: bytes, key: str
) -> pa.Table:
    """A ``map_batches`` function: for each task of the batch, the rows of
    ``fn(context, task) -> (rows, info)``, then one row holding ``(task index, info)``."""
    _kill_once()
    ctx = _context(context)
    tables = []
    for index, blob in zip(batch["index"], batch["task"]):
        rows, info = fn(ctx, pickle.loads(bytes(blob)))
        rows = rows.append_column(INFO_COLUMN, pa.nulls(rows.num_rows, pa.large_binary()))
        info_blob = pickle.dumps((int(index), info), protocol=5)
        info_row = [
            pa.array([info_blob], pa.large_binary())
            if f.name == INFO_COLUMN
            else pa.array([-1], f.type)
            if f.name == key
            else pa.nulls(1, f.type)
            for f in rows.schema
        ]
        tables += [rows, pa.Table.from_arrays(info_row, schema=rows.schema)]
    return pa.concat_tables(tables)


def _info_rows(rows: pa.Table, key: str) -> pa.Table:
    """A ``map_batches`` function: the info rows of a block (:func:`_rows_batch`)."""
    return rows.filter(pc.less(rows.column(key), 0)).select([INFO_COLUMN])


def _group_batch(
    rows: pa.Table,
    fn: Callable[[Any, pa.Table, Any], Any],
    context: bytes,
    key: str,
    args: Mapping[int, Any],
) -> pa.Table:
    """A ``map_groups`` function: ``fn(context, rows, args[k])`` for the rows of key ``k``
    (every row of that key, from every task); the info rows' group (key -1) is skipped."""
    _kill_once()
    k = rows.column(key)[0].as_py()
    if k < 0:
        return pa.table(
            {key: pa.array([], pa.int64()), RESULT_COLUMN: pa.array([], pa.large_binary())}
        )
    result = fn(_context(context), rows.drop_columns([INFO_COLUMN]), args[k])
    blob = pickle.dumps(result, protocol=5)
    return pa.table(
        {key: pa.array([k], pa.int64()), RESULT_COLUMN: pa.array([blob], pa.large_binary())}
    )


@dataclass
class KeyedRows:
    """Rows that :meth:`RayEngine.map_rows` left in the cluster's object store (one
    materialized Ray dataset per window of tasks), for :meth:`RayEngine.map_groups`."""

    key: str  # the int64 column to group them by (values >= 0)
    datasets: list[Any] = field(default_factory=list)


@contextmanager
def _task_errors() -> Iterator[None]:
    """A failed Ray task as one BuildError line (a BuildError's message names the file)."""
    ray = import_ray()
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # failures: BuildError, below
    try:
        yield
    except ray.exceptions.RayError as e:
        raise BuildError(f"--engine ray: a build task failed: {_first_line(e)}") from None


class RayEngine(Generic[C]):
    """Runs ``fn(context, task)`` for a build on Ray Data, results in task order."""

    def __init__(
        self, context: C, address: str | None = None, parallelism: int | None = None
    ) -> None:
        if parallelism is not None and parallelism < 1:
            raise BuildError(f"--parallelism {parallelism}: give 1 or more concurrent tasks")
        self.context = context
        self.parallelism = parallelism
        self._started = connect(address)
        self._blob = pickle.dumps(context)
        ray = import_ray()
        self.workers = int(ray.cluster_resources().get("CPU", 1))

    def run(self, fn: Callable[[C, T], R], task: T) -> R:
        """One call, in this process."""
        return fn(self.context, task)

    def map(self, fn: Callable[[C, T], R], tasks: Iterable[T]) -> Iterator[tuple[T, R]]:
        """``(task, fn(context, task))`` for every task, in the order of ``tasks``.

        Tasks are taken a window at a time (``WINDOW_TASKS`` tasks, or ``WINDOW_BYTES`` of
        pickled tasks: a compressed input's chunks carry their bytes), and one Ray dataset
        maps each window, one task per batch; so the building process never holds more
        than a window of tasks (and ``PREFETCH_TASKS`` listed ahead), whatever the input's
        size."""
        for listed, blobs in _windows(tasks):
            yield from self._map_window(fn, listed, blobs)

    def _map_window(
        self, fn: Callable[[C, T], R], listed: list[T], blobs: list[bytes]
    ) -> Iterator[tuple[T, R]]:
        ds = _tasks_dataset(blobs).map_batches(
            _run_batch,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"fn": fn, "context": self._blob},
            concurrency=self.parallelism,
            num_cpus=1,
        )
        pending: dict[int, R] = {}
        expected = 0
        with _task_errors():
            for row in ds.iter_rows():
                pending[int(row["index"])] = pickle.loads(row["result"])
                while expected in pending:  # in order whatever the engine does
                    yield listed[expected], pending.pop(expected)
                    expected += 1
        _check_all(len(listed), expected)

    def map_rows(
        self, fn: Callable[[C, T], tuple[pa.Table, I]], tasks: Iterable[T], into: KeyedRows
    ) -> Iterator[tuple[T, I]]:
        """``(task, info)`` for every task, in the order of ``tasks``, where
        ``fn(context, task)`` returns ``(rows, info)``: the rows (an Arrow table with an
        int64 column ``into.key`` of values >= 0) stay in the object store, in ``into``,
        for :meth:`map_groups`; only the infos come back here.

        A window of tasks (as :meth:`map`) is mapped and materialized whole, then its infos
        are read back (a pass over its blocks that keeps only the info rows)."""
        for listed, blobs in _windows(tasks):
            ds = _tasks_dataset(blobs).map_batches(
                _rows_batch,
                batch_size=1,
                batch_format="numpy",
                fn_kwargs={"fn": fn, "context": self._blob, "key": into.key},
                concurrency=self.parallelism,
                num_cpus=1,
            )
            infos: dict[int, I] = {}
            with _task_errors():
                done = ds.materialize()
                found = done.map_batches(
                    _info_rows, batch_size=None, batch_format="pyarrow", fn_kwargs={"key": into.key}
                )
                for row in found.iter_rows():
                    index, info = pickle.loads(row[INFO_COLUMN])
                    infos[index] = info
            _check_all(len(listed), len(infos))
            into.datasets.append(done)
            for i, task in enumerate(listed):
                yield task, infos[i]

    def map_groups(
        self,
        rows: KeyedRows,
        fn: Callable[[C, pa.Table, A], R],
        args: Mapping[int, A],
        partitions: int,
    ) -> Iterator[tuple[int, R]]:
        """``(k, fn(context, the rows of key k, args[k]))`` for every key ``k`` of ``rows``,
        as the groups finish (in no particular order): Ray Data's ``groupby`` on the key
        (a shuffle through the object store into ``partitions`` partitions), then
        ``map_groups``, each group on one worker with every row of its key, from every
        task, in no particular order. The rows are released afterwards."""
        if not rows.datasets:
            return
        first, *rest = rows.datasets
        ds = first.union(*rest) if rest else first
        grouped = ds.groupby(rows.key, num_partitions=partitions).map_groups(
            _group_batch,
            batch_format="pyarrow",
            fn_kwargs={"fn": fn, "context": self._blob, "key": rows.key, "args": args},
            concurrency=self.parallelism,
            num_cpus=1,
        )
        with _task_errors():
            for row in grouped.iter_rows():
                yield int(row[rows.key]), pickle.loads(row[RESULT_COLUMN])
        rows.datasets.clear()

    def close(self) -> None:
        if self._started:
            import_ray().shutdown()
            self._started = False

    def __enter__(self) -> RayEngine[C]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _windows(tasks: Iterable[T]) -> Iterator[tuple[list[T], list[bytes]]]:
    """The tasks a window at a time, each with its pickled form (listed ahead on a thread)."""
    it = prefetch(iter(tasks), PREFETCH_TASKS)
    while True:
        listed: list[T] = []
        blobs: list[bytes] = []
        size = 0
        for task in it:
            listed.append(task)
            blobs.append(pickle.dumps(task, protocol=5))
            size += len(blobs[-1])
            if len(listed) >= WINDOW_TASKS or size >= WINDOW_BYTES:
                break
        if not listed:
            return
        yield listed, blobs


def _tasks_dataset(blobs: list[bytes]) -> Any:
    """A Ray dataset of one row, and one block, per pickled task."""
    ray = import_ray()
    dctx = ray.data.DataContext.get_current()
    dctx.execution_options.preserve_order = True
    dctx.enable_progress_bars = False
    rows = [{"index": i, "task": blob} for i, blob in enumerate(blobs)]
    return ray.data.from_items(rows, override_num_blocks=len(rows))


def _check_all(tasks: int, returned: int) -> None:
    if returned != tasks:
        raise BuildError(
            f"--engine ray: {tasks - returned} of {tasks} build tasks returned nothing"
        )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


_RAISED = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


def _first_line(e: BaseException) -> str:
    """What a failed task raised, in one line: the last exception line of Ray's report (a
    BuildError's message names the file and the fix), else its first line."""
    text = _ANSI.sub("", "\n".join(str(x) for x in (e, getattr(e, "cause", None)) if x))
    raised = [m for m in map(_RAISED.match, text.splitlines()) if m]
    for m in reversed(raised):
        if m.group(1) == "BuildError":
            return m.group(2).strip()
    if raised:
        return f"{raised[-1].group(1)}: {raised[-1].group(2).strip()}"
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "ray::")):
            return line
    return type(e).__name__
