"""``python -m pipeline.inspect STORE``: what a store of any kind holds, at a glance.

Counts, spaces, per-feature statistics, distributions, where the data came from, and why
records were quarantined (with one example each); the kind decides what is shown. Given a
Minari dataset directory, it says what an import of it would read (spaces, backend,
episodes, steps), without building.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.arrowio import read_manifest
from pipeline.format import BuildError, StoreError
from pipeline.kinds import store_kind


def describe(path: str | Path) -> str:
    from pipeline.interchange import minari_import

    if minari_import.is_dataset(path):  # what an import would read, without building
        try:
            return minari_import.describe(path)
        except BuildError as e:
            raise StoreError(str(e)) from None
    manifest = read_manifest(path)
    return store_kind(manifest.get("kind"), str(path)).describe(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.inspect", description="Describe a store.")
    ap.add_argument("store", help="a store, or a Minari dataset directory")
    args = ap.parse_args(argv)
    try:
        print(describe(args.store))
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
