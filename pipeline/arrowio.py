"""Reading and writing the files every store kind is made of: manifests and Arrow IPC."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.format import FORMAT_NAME, MANIFEST, StoreError
from pipeline.sources import file_sha256


def read_manifest(path: str | Path) -> dict[str, Any]:
    """``STORE/manifest.json`` of any kind; StoreError (with the fix) if it is not a store.

    The format version is checked by the reader of each kind (each has its own)."""
    p = Path(path) / MANIFEST
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(
            f"{path}: not a store (no {MANIFEST}); build one with `python -m pipeline.build SPEC`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{p}: manifest is not valid JSON ({e}); rebuild with --force") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{p}: not an {FORMAT_NAME} manifest")
    return manifest


def check_format_version(path: str | Path, manifest: dict[str, Any], expected: int) -> None:
    """StoreError telling how to rebuild when a store was written in another format version."""
    version = manifest.get("format_version")
    if version != expected:
        raise StoreError(
            f"{Path(path) / MANIFEST}: format_version {version} but this reader reads "
            f"{expected} for {manifest.get('kind')} stores; rebuild the store with this "
            "version (`python -m pipeline.build SPEC --force`)"
        )


def read_ipc(path: Path) -> pa.Table:
    """An Arrow IPC stream file, memory-mapped (no copy of the data)."""
    try:
        source = pa.memory_map(str(path), "r")
        return pa.ipc.open_stream(source).read_all()
    except FileNotFoundError:
        raise StoreError(
            f"{path}: missing; the store is incomplete, rebuild with --force"
        ) from None
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(
            f"{path}: unreadable Arrow IPC stream ({e}); rebuild with --force"
        ) from None


def write_arrow_table(table: pa.Table, path: Path) -> None:
    """``table`` as one record batch in an Arrow IPC stream file."""
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=max(table.num_rows, 1))


def flat(col: pa.ChunkedArray) -> pa.Array:
    """One array for a chunked column (a copy only if it has several chunks)."""
    if col.num_chunks == 1:
        return col.chunk(0)
    return pa.concat_arrays(col.chunks)


def column_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """A column as a NumPy array: fixed-size lists become (N, width), zero-copy where possible."""
    arr = flat(col)
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        values = arr.values.slice(arr.offset * width, len(arr) * width)
        return values.to_numpy(zero_copy_only=False).reshape(len(arr), width)
    if pa.types.is_boolean(arr.type):
        return arr.to_numpy(zero_copy_only=False)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return np.asarray(arr.to_pylist(), dtype=object)
    return arr.to_numpy(zero_copy_only=False)


def file_digest(path: Path) -> str:
    """sha256 of a store file's bytes (as of an input file: one function for both)."""
    return file_sha256(path)


def data_file_problems(store: Path, manifest: dict[str, Any]) -> list[str]:
    """Each data file the manifest lists: present, of its size, and of its sha256."""
    problems: list[str] = []
    for name, info in manifest.get("data_files", {}).items():
        f = store / name
        if not f.exists():
            problems.append(f"{f}: missing")
            continue
        size = f.stat().st_size
        if size != info["bytes"]:
            problems.append(
                f"{f}: {size} bytes, manifest says {info['bytes']} (truncated or replaced)"
            )
        elif file_digest(f) != info["sha256"]:
            problems.append(
                f"{f}: sha256 differs from the manifest (the file was changed or corrupted)"
            )
    return problems
