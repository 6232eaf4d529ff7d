"""The Ray engine builds the store the local engine builds: same rows, same content hash,
same quarantine, whatever the layout, the faults in the input, or a worker killed mid-build.

The tests run on a local Ray cluster of 2 CPUs, started once for the module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.arrowio import file_digest
from pipeline.format import QUARANTINE, BuildError
from pipeline.sources import FileRange, SourceFile, iter_chunks, iter_ranges

from .conftest import build_store, episode_lines, run_cli, step_fields, write_lines, write_spec
from .test_workers import CASES, _episode_corpus, _step_corpus

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


def _corpus(tmp_path: Path, layout: str) -> Path:
    rng = np.random.default_rng(7)
    corpus = _step_corpus(rng) if layout == "step_per_line" else _episode_corpus(rng)
    for name, lines in corpus.items():
        write_lines(tmp_path / "raw" / name, lines)
    return write_spec(tmp_path, [tmp_path / "raw" / "*"], layout=layout, fields=step_fields())  # type: ignore[arg-type]


def _same_store(one: Any, two: Any) -> None:
    a, b = one.manifest, two.manifest
    assert b["content_hash"] == a["content_hash"]
    assert b["column_digests"] == a["column_digests"]
    for key in ("counts", "sources", "statistics", "quarantine_reasons"):
        assert b[key] == a[key], key
    assert file_digest(two.path / QUARANTINE) == file_digest(one.path / QUARANTINE)


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
