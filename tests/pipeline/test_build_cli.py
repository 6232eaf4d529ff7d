"""`python -m pipeline.build` as users run it: exit codes, messages, "up to date",
rebuilds, and atomicity under SIGKILL (real subprocesses, real files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.format import MANIFEST, StoreError
from pipeline.storage import clean_stale
from pipeline.store import open_store
from pipeline.transitions.layout import TRANSITIONS_ARROW
from pipeline.verify import verify

from .conftest import (
    DEMO_SPECS,
    PYTHON,
    REPO,
    assert_one_error_line,
    build_store,
    dead_pid,
    episode_lines,
    run_cli,
    step_fields,
    step_record,
    write_big_input,
    write_lines,
    write_spec,
)


def small_input(d: Path) -> Path:
    """Two terminated episodes in a plain and a .gz file, and a spec for them."""
    write_lines(d / "raw" / "a.jsonl", episode_lines("e1", 3))
    write_lines(d / "raw" / "b.jsonl.gz", episode_lines("e2", 2))
    return write_spec(d, [str(d / "raw" / "*.jsonl*")])


def mtimes(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*")}


# --------------------------------------------------------------------------- user errors


def test_missing_spec_file(tmp_path: Path) -> None:
    proc = run_cli("pipeline.build", tmp_path / "nope.yaml", "--out", tmp_path / "out")
    assert_one_error_line(proc, "nope.yaml", "no such spec file")
    assert not (tmp_path / "out").exists()


def test_invalid_yaml(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nsource: {paths: [a\n", encoding="utf-8")
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out")
    assert_one_error_line(proc, "bad.yaml", "not valid YAML")


def test_spec_file_not_utf8(tmp_path: Path) -> None:
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes("name: café\n".encode("latin-1"))
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out")
    assert_one_error_line(proc, "latin1.yaml")


def test_unknown_spec_key(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    spec.write_text(spec.read_text(encoding="utf-8") + "compression: lz4\n", encoding="utf-8")
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out")
    assert_one_error_line(proc, "unknown key 'compression'", "allowed keys are")


def test_glob_matching_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, [str(tmp_path / "missing" / "*.jsonl")])
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out")
    assert_one_error_line(proc, "source.paths", "matches no file")
    assert not (tmp_path / "out" / "store").exists()


def test_out_is_a_file(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    (tmp_path / "out").write_text("not a directory", encoding="utf-8")
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out")
    assert_one_error_line(proc, "out")


def test_observation_length_inferred_when_the_first_file_is_empty(tmp_path: Path) -> None:
    write_lines(tmp_path / "raw" / "a.jsonl", [])
    write_lines(tmp_path / "raw" / "b.jsonl", episode_lines("e1", 3))
    fields = {**step_fields(), "observation": {"path": "obs"}}  # no shape: inferred
    spec = write_spec(tmp_path, [str(tmp_path / "raw" / "*.jsonl")], fields=fields)
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert open_store(tmp_path / "out" / "store").obs_dim == 3


def test_observation_length_is_inferred(tmp_path: Path) -> None:
    write_lines(tmp_path / "raw" / "a.jsonl", episode_lines("e1", 3))
    fields = {**step_fields(), "observation": {"path": "obs"}}
    spec = write_spec(tmp_path, [str(tmp_path / "raw" / "*.jsonl")], fields=fields)
    store = open_store(build_store(spec, tmp_path / "out").path)
    assert store.obs_dim == 3 and store.observations.shape == (3, 3)


def test_bad_max_bad_fraction(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    proc = run_cli("pipeline.build", spec, "--out", tmp_path / "out", "--max-bad-fraction", "2")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "--max-bad-fraction" in proc.stderr


# --------------------------------------------------------------------------- rebuilds


def test_end_to_end_build_up_to_date_and_force(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    out = tmp_path / "out"
    first = run_cli("pipeline.build", spec, "--out", out)
    assert first.returncode == 0, first.stderr
    assert "built in" in first.stdout
    assert "kept 5 + quarantined 0" in first.stdout
    store = out / "store"
    assert verify(store) == []
    before = mtimes(store)
    manifest = json.loads((store / MANIFEST).read_text(encoding="utf-8"))

    second = run_cli("pipeline.build", spec, "--out", out)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout and "--force" in second.stdout
    assert mtimes(store) == before  # nothing rewritten

    forced = run_cli("pipeline.build", spec, "--out", out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "built in" in forced.stdout
    after = mtimes(store)
    assert after.keys() == before.keys()
    assert after[MANIFEST] != before[MANIFEST]
    rebuilt = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    assert rebuilt["content_hash"] == manifest["content_hash"]
    assert verify(store) == []


def test_changing_the_spec_makes_a_new_store(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    old = build_store(spec, tmp_path / "out")
    write_spec(tmp_path, [str(tmp_path / "raw" / "*.jsonl*")], discount=0.5)
    new = build_store(spec, tmp_path / "out")
    assert new.status == "built"
    assert new.manifest["spec_sha256"] != old.manifest["spec_sha256"]
    assert new.manifest["content_hash"] != old.manifest["content_hash"]  # return_to_go
    assert open_store(new.path).discount == 0.5
    assert build_store(spec, tmp_path / "out").status == "up to date"


def test_changing_an_input_file_makes_a_new_store(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    old = build_store(spec, tmp_path / "out")
    lines = episode_lines("e1", 3)
    lines[1]["rew"] = 2.0
    path = write_lines(tmp_path / "raw" / "a.jsonl", lines)
    st = path.stat()  # make sure the file looks changed even on a coarse clock
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new = build_store(spec, tmp_path / "out")
    assert new.status == "built"
    assert new.manifest["content_hash"] != old.manifest["content_hash"]
    assert open_store(new.path).rewards.sum() == pytest.approx(6.0)
    # a new file matching the glob is a change too
    write_lines(tmp_path / "raw" / "c.jsonl", episode_lines("e3", 2))
    newer = build_store(spec, tmp_path / "out")
    assert newer.status == "built"
    assert newer.manifest["counts"]["episodes"] == 3


def test_touching_an_input_without_changing_it_is_up_to_date(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    build_store(spec, tmp_path / "out")
    before = mtimes(tmp_path / "out" / "store")
    path = tmp_path / "raw" / "a.jsonl"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert build_store(spec, tmp_path / "out").status == "up to date"
    assert mtimes(tmp_path / "out" / "store") == before


# --------------------------------------------------------------------------- verify / inspect CLI


def test_verify_cli_ok_and_corrupted_byte(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    store = build_store(spec, tmp_path / "out").path
    ok = run_cli("pipeline.verify", store)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK ")
    path = store / TRANSITIONS_ARROW
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = run_cli("pipeline.verify", store)
    assert_one_error_line(proc, TRANSITIONS_ARROW, "sha256 differs")


def test_verify_cli_truncated_file(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    store = build_store(spec, tmp_path / "out").path
    path = store / TRANSITIONS_ARROW
    path.write_bytes(path.read_bytes()[:-100])
    proc = run_cli("pipeline.verify", store)
    assert_one_error_line(proc, TRANSITIONS_ARROW, "truncated")


def test_verify_cli_not_a_store(tmp_path: Path) -> None:
    proc = run_cli("pipeline.verify", tmp_path)
    assert_one_error_line(proc, "not a store")


@pytest.mark.parametrize("name", DEMO_SPECS)
def test_demo_stores_verify_and_inspect(demo_stores: dict[str, Path], name: str) -> None:
    store = demo_stores[name]
    assert verify(store) == []
    proc = run_cli("pipeline.inspect", store)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    c = m["counts"]
    assert f"episodes     {c['episodes']}" in proc.stdout
    assert f"transitions  {c['transitions']}" in proc.stdout
    assert "episode return" in proc.stdout and "episode length" in proc.stdout
    for reason in m["quarantine_reasons"]:
        assert reason in proc.stdout


def test_replay_demo_quarantines_its_bad_lines(demo_stores: dict[str, Path]) -> None:
    m = json.loads((demo_stores["replay-demo"] / MANIFEST).read_text(encoding="utf-8"))
    assert m["counts"]["records_quarantined"] == 5
    assert m["counts"]["records"] == m["counts"]["records_kept"] + 5


def test_inspect_cli_not_a_store(tmp_path: Path) -> None:
    assert_one_error_line(run_cli("pipeline.inspect", tmp_path), "not a store")


# --------------------------------------------------------------------------- atomicity


@pytest.fixture(scope="module")
def big_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~200k step lines: a build that takes a few seconds."""
    d = tmp_path_factory.mktemp("big")
    path = write_big_input(d / "raw", 200_000)
    return write_spec(d, [str(path)], name="atomic")


def start_build(spec: Path, out: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [PYTHON, "-m", "pipeline.build", str(spec), "--out", str(out), "--quiet", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_once_staging_appears(proc: subprocess.Popen[bytes], out: Path, name: str) -> Path:
    """Poll for the build's staging directory, SIGKILL the build, return the directory."""
    deadline = time.monotonic() + 120
    while True:
        staging = list(out.glob(f".{name}.build-*"))
        if staging:
            break
        assert proc.poll() is None, "the build ended before its staging directory was seen"
        assert time.monotonic() < deadline, "no staging directory appeared"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    return staging[0]


def test_killed_build_leaves_no_store(tmp_path: Path, big_spec: Path) -> None:
    out = tmp_path / "out"
    proc = start_build(big_spec, out)
    staging = kill_once_staging_appears(proc, out, "atomic")
    assert not (out / "atomic").exists()
    assert staging.exists()  # the leftover is hidden (a dot name) ...
    with pytest.raises(StoreError):  # ... and does not pass for a store
        verify(staging)
    assert_one_error_line(run_cli("pipeline.verify", out / "atomic"), "not a store")
    # the next build succeeds and removes the stale staging directory
    result = build_store(big_spec, out)
    assert result.status == "built"
    assert len(open_store(result.path)) == 200_000
    assert not staging.exists()
    assert sorted(p.name for p in out.iterdir()) == ["atomic"]


def test_killed_rebuild_keeps_the_old_store(tmp_path: Path, big_spec: Path) -> None:
    out = tmp_path / "out"
    old = build_store(big_spec, out)
    before = mtimes(old.path)
    proc = start_build(big_spec, out, "--force")
    kill_once_staging_appears(proc, out, "atomic")
    assert mtimes(old.path) == before
    assert verify(old.path) == []
    assert open_store(old.path).content_hash == old.manifest["content_hash"]


# Code run before `pipeline.build.main` in a subprocess: it SIGKILLs the build at one point
# of `pipeline.storage.publish`, the atomic swap of the finished staging directory.
KILL = "import os, signal\nfrom pathlib import Path\nimport pipeline.storage as storage\n"
KILL_POINTS = {
    # renameat2(RENAME_EXCHANGE): killed just before / just after the exchange (before the
    # old store, now in the staging directory, is removed); exit 3 if it is unsupported here
    "before-exchange": KILL
    + (
        "def exchange(a, b):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "storage.rename_exchange = exchange\n"
    ),
    "after-exchange": KILL
    + (
        "real = storage.rename_exchange\n"
        "def exchange(a, b):\n"
        "    if not real(a, b):\n"
        "        os._exit(3)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "storage.rename_exchange = exchange\n"
    ),
    # no exchange: the old store is moved aside, killed before the new one is moved in
    "between-renames": KILL
    + (
        "storage.rename_exchange = lambda a, b: False\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        "    if '.old-' in Path(dst).name:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
    ),
}


def build_killed_at(
    point: str, spec: Path, out: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    code = (
        KILL_POINTS[point] + "from pipeline.build import main\nmain(__import__('sys').argv[1:])\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [PYTHON, "-c", code, str(spec), "--out", str(out), "--quiet", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("point", "survivor"),
    [("before-exchange", "old"), ("after-exchange", "new"), ("between-renames", "old")],
)
def test_rebuild_killed_while_publishing_keeps_a_store(
    tmp_path: Path, point: str, survivor: str
) -> None:
    spec = small_input(tmp_path)
    out = tmp_path / "out"
    old = build_store(spec, out).manifest["content_hash"]
    write_lines(tmp_path / "raw" / "a.jsonl", episode_lines("e1", 4))  # new content
    proc = build_killed_at(point, spec, out)
    if proc.returncode == 3:
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported on this file system")
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # killed inside the swap
    leftovers = sorted(p.name.split("-")[0] for p in out.glob(".store.*"))
    if point == "between-renames":
        # the one moment with no store: the old one is aside, the new one not yet in place
        assert not (out / "store").exists()
        assert leftovers == [".store.build", ".store.old"]
    else:
        assert verify(out / "store") == []  # the swap is atomic: always a whole store
        assert leftovers == [".store.build"]
    clean_stale(out, "store")  # what the next build does first
    assert sorted(p.name for p in out.iterdir()) == ["store"]
    assert verify(out / "store") == []
    content = open_store(out / "store").content_hash
    assert (content == old) == (survivor == "old")
    again = build_store(spec, out)
    assert again.status == ("built" if survivor == "old" else "up to date")
    assert again.manifest["content_hash"] != old


def test_the_next_build_restores_a_store_moved_aside_by_a_killed_publish(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    out = tmp_path / "out"
    old = build_store(spec, out).manifest["content_hash"]
    assert build_killed_at("between-renames", spec, out, "--force").returncode == -signal.SIGKILL
    assert not (out / "store").exists()
    # same inputs: the restored old store is up to date
    again = build_store(spec, out)
    assert again.status == "up to date" and again.manifest["content_hash"] == old
    assert sorted(p.name for p in out.iterdir()) == ["store"]


def test_stale_staging_of_a_dead_build_is_removed(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    out = tmp_path / "out"
    stale = out / f".store.build-{dead_pid()}-0badc0de"
    (stale / "_work").mkdir(parents=True)
    (stale / "_work" / "junk.bin").write_bytes(b"x" * 100)
    build_store(spec, out)
    assert not stale.exists()


def test_staging_of_a_live_build_is_left_alone(tmp_path: Path) -> None:
    spec = small_input(tmp_path)
    out = tmp_path / "out"
    other = out / f".store.build-{os.getppid()}-0badc0de"  # pytest's parent: alive
    other.mkdir(parents=True)
    build_store(spec, out)
    assert other.exists()


def test_stale_staging_is_removed_for_a_hyphenated_name(tmp_path: Path) -> None:
    write_lines(tmp_path / "raw" / "a.jsonl", [step_record("e", 0, last=True)])
    spec = write_spec(tmp_path, [str(tmp_path / "raw" / "*")], name="my-store")
    out = tmp_path / "out"
    stale = out / f".my-store.build-{dead_pid()}-0badc0de"
    stale.mkdir(parents=True)
    build_store(spec, out)
    assert not stale.exists()
