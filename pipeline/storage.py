"""Staging, atomic publishing, build keys and up-to-date checks: what every store kind shares.

A build writes into a hidden staging directory next to its target
(``OUT/.NAME.build-PID-XXXX``) and publishes it with one atomic swap, so a reader, or a
kill at any point, sees the old store or the new one and never a half-written one. What
a killed build leaves behind is cleaned by the next build of the same name
(:func:`clean_stale`). A store kind calls, in order::

    manifest = up_to_date(target, key, sources, kind=..., format_version=...)   # or None
    with staged(out, name) as staging:
        ... write data files and the manifest (write_manifest) into ``staging`` ...
        publish(staging, target)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.format import FORMAT_NAME, MANIFEST
from pipeline.sources import SourceFile, file_sha256


@dataclass
class BuildResult:
    """What ``pipeline.build`` returns for any store kind."""

    path: Path
    status: str  # "built" | "up to date"
    manifest: dict[str, Any]
    seconds: float


# --------------------------------------------------------------------------- build keys


def build_key(parts: Iterable[str], sources: list[SourceFile]) -> str:
    """sha256 over what decides a store's content: ``parts`` (format, spec hash, ...) and
    every source file's name and sha256 (``sources[i].sha256`` must be known)."""
    h = hashlib.sha256()
    h.update(FORMAT_NAME.encode())
    for part in parts:
        h.update(f"\n{part}".encode())
    h.update(b"\n")
    for s in sources:
        h.update(f"{s.display}\t{s.sha256}\n".encode())
    return h.hexdigest()


def up_to_date(
    target: Path,
    key_parts: list[str],
    sources: list[SourceFile],
    *,
    kind: str,
    format_version: int,
    spec_sha: str,
) -> dict[str, Any] | None:
    """The manifest of an existing store at ``target`` built from the same inputs, else None.

    A source whose size and mtime match the manifest's is taken at the manifest's sha256
    (``--force`` always rebuilds); any other is hashed. Sets ``sources[i].sha256``. What a
    killed build left is cleaned first, so a store that a killed publish had moved aside is
    back in place (and may well be up to date)."""
    clean_stale(target.parent, target.name)
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format_version") != format_version
        or manifest.get("kind") != kind
        or manifest.get("spec_sha256") != spec_sha
    ):
        return None
    old = {s["path"]: s for s in manifest.get("sources", [])}
    if set(old) != {s.display for s in sources}:
        return None
    for s in sources:
        o = old[s.display]
        same_stat = o.get("bytes") == s.size and o.get("mtime_ns") == s.mtime_ns
        s.sha256 = o.get("sha256") if same_stat else file_sha256(s.path)
    if build_key(key_parts, sources) != manifest.get("build_key"):
        for s in sources:
            s.sha256 = None
        return None
    if not all((target / f).exists() for f in manifest.get("data_files", {})):
        return None
    return manifest


def versions(*dists: str) -> dict[str, str]:
    """The builder's version, Python's, and those of ``dists`` that are installed."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"builder": __version__, "python": platform.python_version()}
    for dist in dists:
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


# --------------------------------------------------------------------------- staging


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(p: Path, marker: str) -> int | None:
    """``.NAME.build-PID-XXXX`` / ``.NAME.old-PID-XXXX`` -> PID."""
    try:
        return int(p.name.rsplit(marker, 1)[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def clean_stale(out: Path, name: str) -> None:
    """Remove what killed builds left: staging directories of dead processes, and the
    old store a publish had moved aside (put back if the new one never arrived)."""
    for p in out.glob(f".{name}.build-*"):
        pid = _owner_pid(p, ".build-")
        if pid is not None and (pid == os.getpid() or not _pid_alive(pid)):
            shutil.rmtree(p, ignore_errors=True)
    target = out / name
    for p in sorted(out.glob(f".{name}.old-*"), key=lambda q: q.stat().st_mtime, reverse=True):
        pid = _owner_pid(p, ".old-")
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue
        if not target.exists() and (p / MANIFEST).exists():
            os.replace(p, target)  # the publish was interrupted: restore the old store
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged(out: Path, name: str) -> Iterator[Path]:
    """A fresh staging directory for ``OUT/NAME`` (stale ones cleaned first); removed if
    the body raises, or if it returns without publishing."""
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out, name)
    staging = out / f".{name}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fsync_dir(d: Path) -> None:
    dfd = os.open(str(d), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_manifest(staging: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` last, after every data file is on disk."""
    tmp = staging / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    fsync_tree(staging)
    os.replace(tmp, staging / MANIFEST)


def rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange_flag = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange_flag)
    return bool(rc == 0)


def publish(staging: Path, target: Path) -> None:
    """Swap the finished staging directory into place; the old store (if any) goes away.

    With an existing store the two directories are exchanged in one atomic step, so a
    reader (or a kill) sees the old store or the new one, never none. Where the exchange
    is unsupported the old store is first moved aside (``.NAME.old-PID-XXXX``), which
    :func:`clean_stale` puts back if the kill came before the new one arrived."""
    if target.exists() and rename_exchange(staging, target):
        fsync_dir(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old store
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
