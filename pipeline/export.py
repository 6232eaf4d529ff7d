"""``python -m pipeline.export STORE --to minari|d3rlpy|hf --out DIR``: a store in another tool's format.

- ``minari``: a Minari dataset directory that ``minari.load_dataset`` opens
  (:mod:`pipeline.interchange.minari_export`);
- ``d3rlpy``: an HDF5 file that ``d3rlpy.dataset.ReplayBuffer.load`` opens, timeouts kept
  apart from terminals (:mod:`pipeline.interchange.d3rlpy_export`);
- ``hf``: a Hugging Face ``datasets`` directory (``load_from_disk``), one split per store
  split, with a dataset card; ``--format parquet`` writes Parquet shards for a hub
  (:mod:`pipeline.interchange.hf_export`). Every store kind exports to ``hf``.

The store is verified first: an export never hands on data the store would not stand by.
Each exporter is imported only when asked for, and its optional dependency with it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Protocol, cast

from pipeline.format import BuildError, StoreError

# --to name -> module whose ``export(store, out, **options)`` writes that format
EXPORTERS: dict[str, str] = {
    "minari": "pipeline.interchange.minari_export",
    "d3rlpy": "pipeline.interchange.d3rlpy_export",
    "hf": "pipeline.interchange.hf_export",
}


class Exporter(Protocol):
    def export(self, store: Path, out: Path, **options: Any) -> list[str]:
        """Write ``store`` to ``out``; the lines the command prints about it."""
        ...


def exporter(name: str) -> Exporter:
    if name not in EXPORTERS:
        raise StoreError(f"--to {name}: expected one of {', '.join(EXPORTERS)}")
    return cast(Exporter, importlib.import_module(EXPORTERS[name]))


def export(store: str | Path, to: str, out: str | Path, **options: Any) -> list[str]:
    """Export ``store`` to format ``to`` under ``out``; the lines to print."""
    return exporter(to).export(Path(store), Path(out), **options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.export", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    ap.add_argument("store", help="a built store (any kind for --to hf; transitions otherwise)")
    ap.add_argument("--to", required=True, choices=sorted(EXPORTERS), help="the target format")
    ap.add_argument("--out", required=True, help="where the export is written")
    ap.add_argument(
        "--format",
        dest="file_format",
        default=None,
        help="--to hf: arrow (save_to_disk, the default) or parquet (shards for a hub); "
        "--to minari: the storage backend, arrow (default), hdf5 or parquet",
    )
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    options: dict[str, Any] = {"force": args.force}
    if args.file_format is not None:
        options["file_format"] = args.file_format
    try:
        for line in export(args.store, args.to, args.out, **options):
            print(line)
    except (StoreError, BuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
