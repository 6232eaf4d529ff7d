"""The Ray engine builds the store the local engine builds: same rows, same content hash,
same quarantine, whatever the layout, the faults in the input, or a worker killed mid-build.

The tests run on a local Ray cluster of 2 CPUs, started once for the module."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.arrowio import file_digest, read_ipc
from pipeline.format import QUARANTINE, BuildError
from pipeline.sources import FileRange, SourceFile, iter_chunks, iter_ranges
from pipeline.transitions.layout import (
    EPISODES_ARROW,
    PARTS_KEY,
    TRANSITION_PARTS,
    TRANSITIONS_ARROW,
)

from .conftest import (
    build_store,
    dumps,
    episode_lines,
    run_cli,
    step_fields,
    step_record,
    write_lines,
    write_spec,
)
from .test_workers import CASES, _episode, _episode_corpus, _step_corpus

ray = pytest.importorskip("ray", reason="the Ray engine is an extra: pip install -e '.[ray]'")

from pipeline.ray_engine import KILL_ONCE_VARIABLE  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray cluster of 2 CPUs; the file it yields arms the kill of one worker."""
    armed = tmp_path_factory.mktemp("ray") / "kill-one-worker"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {KILL_ONCE_VARIABLE: str(armed)}},
    )
    try:
        yield armed
    finally:
        ray.shutdown()


def _corpus(tmp_path: Path, layout: str, part_rows: int | None = None, **fields: Any) -> Path:
    """The corpus of ``layout`` under ``tmp_path/raw`` (written once), and a spec of it
    (``store.part_rows``: ``part_rows``)."""
    rng = np.random.default_rng(7)
    corpus = _step_corpus(rng) if layout == "step_per_line" else _episode_corpus(rng)
    for name, lines in corpus.items():
        if not (tmp_path / "raw" / name).exists():
            write_lines(tmp_path / "raw" / name, lines)
    store: dict[str, Any] = {"format": "arrow", "discount": 0.99}
    if part_rows is not None:
        store["part_rows"] = part_rows
    return write_spec(
        tmp_path,
        [tmp_path / "raw" / "*"],
        layout=layout,  # type: ignore[arg-type]
        fields={**step_fields(), **fields},
        store=store,
        file_name=f"store-{part_rows}.yaml",
    )


def _same_store(one: Any, two: Any) -> None:
    a, b = one.manifest, two.manifest
    assert b["content_hash"] == a["content_hash"]
    assert b["column_digests"] == a["column_digests"]
    for key in ("counts", "sources", "statistics", "quarantine_reasons"):
        assert b[key] == a[key], key
    assert file_digest(two.path / QUARANTINE) == file_digest(one.path / QUARANTINE)
    assert read_ipc(two.path / EPISODES_ARROW).equals(read_ipc(one.path / EPISODES_ARROW))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_ray_engine_builds_the_local_engines_store(
    cluster: Path, tmp_path: Path, case: str
) -> None:
    layout, options = CASES[case]
    spec = _corpus(tmp_path, layout)
    local = build_store(spec, tmp_path / "local", chunk_bytes=600, **options)
    on_ray = build_store(spec, tmp_path / "ray", chunk_bytes=600, engine="ray", **options)
    assert on_ray.manifest["build_engine"] == "ray" and local.manifest["build_engine"] == "local"
    _same_store(local, on_ray)
    assert len(local.manifest["quarantine_reasons"]) >= 4  # the faults are there
    assert local.manifest["counts"]["episodes"] >= 20


def test_tasks_mapped_a_window_at_a_time_build_the_same_store(
    cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The building process hands Ray a few tasks at a time (here 3, or about 2 chunks of
    a compressed file's bytes): the store does not change."""
    import pipeline.ray_engine as engine

    monkeypatch.setattr(engine, "WINDOW_TASKS", 3)
    monkeypatch.setattr(engine, "WINDOW_BYTES", 1000)
    layout, options = CASES["step_per_line-spilled"]
    spec = _corpus(tmp_path, layout)
    local = build_store(spec, tmp_path / "local", chunk_bytes=600, **options)
    on_ray = build_store(spec, tmp_path / "ray", chunk_bytes=600, engine="ray", **options)
    _same_store(local, on_ray)


def test_a_killed_worker_is_retried_and_the_store_is_the_same(
    cluster: Path, tmp_path: Path
) -> None:
    spec = _corpus(tmp_path, "episode_per_line")
    local = build_store(spec, tmp_path / "local", chunk_bytes=600)
    cluster.write_text("armed")
    on_ray = build_store(spec, tmp_path / "ray", chunk_bytes=600, engine="ray")
    assert not cluster.exists()  # a worker took the file and was killed
    _same_store(local, on_ray)


def test_ranges_cut_the_file_where_chunks_do(tmp_path: Path) -> None:
    """A worker reads the same lines, with the same line numbers, that the building
    process would have sent it; and the file's hash is taken on the way."""
    lines = [b"x" * n for n in (0, 3, 70, 1, 0, 250, 9)] * 7
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(lines))  # the last line has no newline
    for chunk_bytes in (1, 16, 100, 10_000):
        srcs = [SourceFile(0, path, "a.jsonl", path.stat().st_size, 0) for _ in range(2)]
        chunks = list(iter_chunks(srcs[0], chunk_bytes))
        ranges = list(iter_ranges(srcs[1], chunk_bytes))
        assert all(isinstance(r, FileRange) for r in ranges)
        loaded = [r.load() for r in ranges]  # type: ignore[union-attr]
        assert [c.data for c in loaded] == [c.data for c in chunks]
        assert [c.first_line for c in loaded] == [c.first_line for c in chunks]
        assert [r.n_lines for r in ranges] == [c.n_lines for c in chunks]
        assert srcs[1].sha256 == srcs[0].sha256 is not None


def test_an_unreachable_cluster_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    write_lines(tmp_path / "raw" / "a.jsonl", episode_lines("a") + episode_lines("b"))
    spec = write_spec(tmp_path, [tmp_path / "raw" / "a.jsonl"])
    out = tmp_path / "out"
    proc = run_cli(
        "pipeline.build", spec, "--out", out, "--engine", "ray", "--ray-address", "127.0.0.1:9"
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: --ray-address 127.0.0.1:9: cannot reach"), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())
    proc = run_cli("pipeline.build", spec, "--out", out, "--ray-address", "127.0.0.1:9")
    assert proc.returncode == 2 and "go with --engine ray" in proc.stderr
    proc = run_cli("pipeline.build", spec, "--out", out, "--engine", "ray", "--workers", "2")
    assert proc.returncode == 2 and "--parallelism" in proc.stderr


def test_other_store_kinds_are_refused_by_the_ray_engine(tmp_path: Path) -> None:
    spec = tmp_path / "qa.yaml"
    spec.write_text(
        "name: qa\nkind: segments\nsource: {paths: [x.json], format: squad}\n"
        "tokenizer: {train: {vocab_size: 100}}\n"
        "segments: {max_tokens: 32, stride: 32, max_question_tokens: 8}\n"
    )
    from pipeline.build import build

    with pytest.raises(BuildError, match="builds transition stores"):
        build(spec, tmp_path / "out", engine="ray")


def test_without_ray_the_engine_says_how_to_install_it(tmp_path: Path) -> None:
    write_lines(tmp_path / "raw" / "a.jsonl", episode_lines("a"))
    spec = write_spec(tmp_path, [tmp_path / "raw" / "a.jsonl"])
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from pipeline.build import main\n"
        f"sys.exit(main([{str(spec)!r}, '--out', {str(tmp_path / 'out')!r}, '--engine', 'ray']))"
    )
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        'error: --engine ray: the Ray engine needs Ray: pip install -e ".[ray]" '
        "(make setup installs it)"
    )


def test_a_task_that_fails_is_one_line_naming_the_file(cluster: Path, tmp_path: Path) -> None:
    """A worker's BuildError (here: the file shrank after it was cut into ranges) reaches
    the build as that error's own line, not as Ray's report."""
    from pipeline.ray_engine import RayEngine
    from pipeline.transitions.chunks import ChunkTask, episode_chunk

    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"x": 1}\n')
    task = ChunkTask(0, 0, FileRange(str(path), 0, 1000, 1, 5, True))
    with RayEngine(None) as engine, pytest.raises(BuildError) as err:
        list(engine.map(episode_chunk, [task]))
    assert str(err.value) == (
        f"--engine ray: a build task failed: {path}: 1000 bytes expected at offset 0, "
        "9 read; the file changed during the build"
    )


def _watch(root: Path) -> tuple[set[str], threading.Event, threading.Thread]:
    """Every file seen under ``root`` (polled every 2 ms until the event is set), by its
    path below the staging directory."""
    seen: set[str] = set()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.002):
            for dirpath, _dirs, files in os.walk(root):
                for f in files:
                    rel = Path(dirpath, f).relative_to(root).parts[1:]  # less the staging dir
                    seen.add("/".join(rel))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return seen, stop, thread


def _built_watched(spec: Path, out: Path, **options: Any) -> tuple[Any, set[str]]:
    seen, stop, thread = _watch(out)
    try:
        result = build_store(spec, out, chunk_bytes=600, **options)
    finally:
        stop.set()
        thread.join()
    return result, seen


def test_step_per_line_on_ray_spills_nothing_under_the_staging_directory(
    cluster: Path, tmp_path: Path
) -> None:
    """On Ray the steps are grouped by Ray Data's shuffle, in its object store: the only
    files of the build's work directory are the building process's own (the store's
    columns, and each bucket's run before the merge). Watched the same way, the local
    engine's spill files show up there."""
    layout, options = CASES["step_per_line-spilled"]
    spec = _corpus(tmp_path, layout)
    local, seen_local = _built_watched(spec, tmp_path / "local", **options)
    on_ray, seen_ray = _built_watched(spec, tmp_path / "ray", engine="ray", **options)
    _same_store(local, on_ray)
    assert any(p.startswith("_work/spill/chunk-") for p in seen_local), sorted(seen_local)
    work = sorted(p for p in seen_ray if p.startswith("_work/"))
    assert any(p.startswith("_work/run-") for p in work)  # the watch saw the runs
    assert all(p.split("/")[1] == "final" or p.split("/")[1].startswith("run-") for p in work), work


def _spread_corpus(rng: np.random.Generator) -> tuple[dict[str, list[bytes]], list[str]]:
    """step_per_line records of 240 episodes (1 to 30 steps), each episode's records
    scattered over four files in shuffled order, with faults: a bad record rejects an
    episode whose other records are in other files and chunks."""
    records: list[dict[str, Any]] = []
    for e in range(240):
        records += _episode(rng, f"ep-{e}", int(rng.integers(1, 31)))
    for i in rng.choice(len(records), 6, replace=False):
        records[int(i)]["rew"] = "bad"
    records += [step_record("dup", 0), step_record("dup", 0), step_record("dup", 1, last=True)]
    records += [step_record("gap", 0), step_record("gap", 2, last=True)]
    lines = [dumps(r) for r in records] + [b"not json", b""]
    names = ["a.jsonl", "b.jsonl", "c.jsonl.gz", "d.jsonl"]
    files: dict[str, list[bytes]] = {name: [] for name in names}
    for i in rng.permutation(len(lines)):
        files[names[int(rng.integers(0, len(names)))]].append(lines[i])
    ids = [str(r["ep"]) for r in records]
    return files, ids


def test_many_buckets_of_episodes_spread_over_files_and_chunks(
    cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dozens of buckets, each a group of Ray Data's groupby holding steps from many
    chunks of several files: the store is the local engine's, its episodes in order of
    their first record (file, then line) and their steps in order."""
    from pipeline.ray_engine import RayEngine

    files, ids = _spread_corpus(np.random.default_rng(3))
    where: dict[str, set[str]] = {}
    for name, lines in files.items():
        write_lines(tmp_path / "raw" / name, lines)
        for line in lines:
            for eid in set(ids):
                if line.startswith(b'{"ep":"%s",' % eid.encode()):
                    where.setdefault(eid, set()).add(name)
    assert sum(len(v) >= 3 for v in where.values()) >= 100  # episodes really are spread
    spec = write_spec(tmp_path, [tmp_path / "raw" / "*"], fields=step_fields())
    options: dict[str, Any] = {
        "chunk_bytes": 2000, "bucket_bytes": 300, "in_memory_bytes": 0, "merge_rows": 37,
    }  # fmt: skip
    groups: list[int] = []
    map_groups = RayEngine.map_groups

    def counted(self: Any, *args: Any) -> Iterator[tuple[int, Any]]:
        for k, res in map_groups(self, *args):
            groups.append(k)
            yield k, res

    monkeypatch.setattr(RayEngine, "map_groups", counted)
    local = build_store(spec, tmp_path / "local", **options)
    on_ray = build_store(spec, tmp_path / "ray", engine="ray", **options)
    _same_store(local, on_ray)
    assert len(groups) == len(set(groups)) >= 64, len(groups)
    counts = on_ray.manifest["counts"]
    assert counts["episodes"] >= 200 and counts["records_quarantined"] >= 10, counts
    names = [s["path"] for s in on_ray.manifest["sources"]]
    eps = read_ipc(on_ray.path / EPISODES_ARROW).to_pydict()
    first = [(names.index(f), ln) for f, ln in zip(eps["source_file"], eps["source_line"])]
    assert first == sorted(first) and len(set(first)) == len(first)
    steps = read_ipc(on_ray.path / TRANSITIONS_ARROW).column("step").to_numpy()
    for start, n in zip(eps["start"], eps["length"]):
        assert steps[start : start + n].tolist() == list(range(n))


def test_a_killed_worker_of_a_step_per_line_build_is_retried(cluster: Path, tmp_path: Path) -> None:
    layout, options = CASES["step_per_line-spilled"]
    spec = _corpus(tmp_path, layout)
    local = build_store(spec, tmp_path / "local", chunk_bytes=600, **options)
    cluster.write_text("armed")
    on_ray = build_store(spec, tmp_path / "ray", chunk_bytes=600, engine="ray", **options)
    assert not cluster.exists()  # a worker took the file and was killed
    _same_store(local, on_ray)


# --------------------------------------------------------------------------- parted stores

PART_ROWS = 7  # small: a task's rows make several parts, and its last part a short one


def _driver_writes_no_transitions(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, this process (the building one) fails if it appends rows to the
    column sink or writes any part or transitions file: Ray's workers, other processes,
    are untouched."""
    import pipeline.transitions.writer as writer

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the building process wrote transitions")

    monkeypatch.setattr(writer.ColumnSink, "append", refuse)
    monkeypatch.setattr(writer, "write_part", refuse)


def _parts(result: Any) -> list[int]:
    return [part["rows"] for part in result.manifest[PARTS_KEY]["parts"]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_ray_workers_write_the_parts_of_the_local_engines_store(
    cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """With store.part_rows, the tasks on Ray's workers write the parts themselves (the
    building process writes none: it only reads them back to hash them), and the store is
    the local engine's, parted or in one file: the same content_hash, digests, counts,
    statistics, episodes and quarantine. Its parts are cut where the tasks end, so short
    parts come before the last one when there are several tasks."""
    layout, options = CASES[case]
    one_file = build_store(_corpus(tmp_path, layout), tmp_path / "one", chunk_bytes=600, **options)
    spec = _corpus(tmp_path, layout, part_rows=PART_ROWS)
    local = build_store(spec, tmp_path / "local", chunk_bytes=600, **options)
    _driver_writes_no_transitions(monkeypatch)
    on_ray = build_store(spec, tmp_path / "ray", chunk_bytes=600, engine="ray", **options)
    _same_store(local, on_ray)
    _same_store(one_file, on_ray)
    sizes = _parts(on_ray)
    assert sum(sizes) == on_ray.manifest["counts"]["transitions"]
    assert all(1 <= n <= PART_ROWS for n in sizes), sizes
    if case != "step_per_line":  # (not spilled: one bucket, one task, cut every N)
        assert len(set(sizes[:-1])) >= 2, sizes  # short parts before the last one
    assert _parts(local)[:-1] == [PART_ROWS] * (len(_parts(local)) - 1)  # local: every N
    names = sorted(p.name for p in (on_ray.path / TRANSITION_PARTS).iterdir())
    assert names == [f"part-{k:05d}.arrow" for k in range(len(sizes))]
    assert not (on_ray.path / TRANSITIONS_ARROW).exists()


def test_a_killed_worker_rewrites_its_parts_and_the_store_is_the_same(
    cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for layout, options in (CASES["episode_per_line"], CASES["step_per_line-spilled"]):
        d = tmp_path / layout
        spec = _corpus(d, layout, part_rows=PART_ROWS)
        local = build_store(spec, d / "local", chunk_bytes=600, **options)
        cluster.write_text("armed")
        with monkeypatch.context() as patched:
            _driver_writes_no_transitions(patched)
            on_ray = build_store(spec, d / "ray", chunk_bytes=600, engine="ray", **options)
        assert not cluster.exists()  # a worker took the file and was killed
        _same_store(local, on_ray)


def test_many_buckets_merged_into_parts_on_the_workers(
    cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dozens of buckets of episodes spread over files: the workers build the buckets'
    runs, then write the merge's windows as parts; the store is the local engine's."""
    files, _ = _spread_corpus(np.random.default_rng(3))
    for name, lines in files.items():
        write_lines(tmp_path / "raw" / name, lines)
    store = {"format": "arrow", "discount": 0.99, "part_rows": 50}
    spec = write_spec(tmp_path, [tmp_path / "raw" / "*"], fields=step_fields(), store=store)
    options: dict[str, Any] = {
        "chunk_bytes": 2000, "bucket_bytes": 300, "in_memory_bytes": 0, "merge_rows": 37,
    }  # fmt: skip
    local = build_store(spec, tmp_path / "local", **options)
    _driver_writes_no_transitions(monkeypatch)
    on_ray = build_store(spec, tmp_path / "ray", engine="ray", **options)
    _same_store(local, on_ray)
    sizes = _parts(on_ray)
    assert len(sizes) >= 20 and len(set(sizes)) >= 5, sizes


def test_worker_written_parts_carry_the_named_reward_columns(
    cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spec's named rewards (one float32 column each) are in the workers' parts, hashed
    and summarised as the local engine's."""
    layout, options = CASES["step_per_line-spilled"]
    spec = _corpus(tmp_path, layout, part_rows=PART_ROWS, rewards={"again": {"path": "rew"}})
    local = build_store(spec, tmp_path / "local", chunk_bytes=600, **options)
    _driver_writes_no_transitions(monkeypatch)
    on_ray = build_store(spec, tmp_path / "ray", chunk_bytes=600, engine="ray", **options)
    _same_store(local, on_ray)
    assert "reward_again" in on_ray.manifest["column_digests"]
    assert "reward_columns" in on_ray.manifest["statistics"]
