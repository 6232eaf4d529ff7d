"""``python -m pipeline.verify STORE``: check a store of any kind against its manifest.

Exit 0 and one ``OK`` line when the store holds what its manifest says and every
invariant of its kind holds; otherwise one line per problem on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.arrowio import read_manifest
from pipeline.format import StoreError
from pipeline.kinds import store_kind


def verify(path: str | Path) -> list[str]:
    """Problems found in the store (empty: it verifies). Raises StoreError if unreadable."""
    manifest = read_manifest(path)
    return store_kind(manifest.get("kind"), str(path)).verify(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.verify", description="Check a store against its manifest."
    )
    ap.add_argument("store", help="a store directory (holding manifest.json)")
    args = ap.parse_args(argv)
    try:
        problems = verify(args.store)
        if not problems:
            manifest = read_manifest(args.store)
            line = store_kind(manifest.get("kind"), args.store).ok_line(args.store, manifest)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if problems:
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
