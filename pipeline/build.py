"""``python -m pipeline.build SPEC [--out DIR] [--force]``: inputs -> a validated store.

The spec's ``kind`` picks the builder (:mod:`pipeline.kinds`): ``transitions`` (trajectory
JSONL, :mod:`pipeline.transitions.build`) or ``segments`` (QA documents,
:mod:`pipeline.segments.build`). Every kind builds into a staging directory and publishes
atomically (:mod:`pipeline.storage`); building again from the same inputs and spec does
nothing ("up to date").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from data_specs.schema import SpecError, spec_kind
from pipeline.format import BuildError, StoreError
from pipeline.kinds import KINDS, store_kind
from pipeline.storage import BuildResult

__all__ = ["BuildResult", "build", "main", "summary_lines"]

RAY_OPTIONS = ("engine", "ray_address", "parallelism")


def build(spec_path: str | Path, out_dir: str | Path = "stores", **options: Any) -> BuildResult:
    """Build (or find up to date) the store for ``spec_path`` under ``out_dir/NAME``.

    ``options`` go to the kind's builder: ``force``, ``max_bad_fraction``, ``chunk_bytes``,
    ``progress``, ``workers`` for every kind, and the kind's own tuning knobs."""
    kind = spec_kind(spec_path, KINDS)
    if options.get("engine", "local") != "local" and kind != "transitions":
        raise BuildError(
            f"{spec_path}: --engine {options['engine']} builds transition stores; a {kind} "
            "store builds with the local engine (leave --engine out)"
        )
    if options.get("engine", "local") == "local":  # the Ray engine's options are its own
        options = {k: v for k, v in options.items() if k not in RAY_OPTIONS}
    return store_kind(kind, str(spec_path)).build(spec_path, out_dir, **options)


def summary_lines(result: BuildResult) -> list[str]:
    """What the command prints about a build."""
    kind = result.manifest.get("kind")
    return store_kind(kind, str(result.path)).summary_lines(result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.build", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("spec", help="a spec YAML in data_specs/")
    p.add_argument(
        "--out",
        default="stores",
        help="directory that receives the store OUT/NAME (default: stores)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the store is up to date")
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=None,
        help="fail if more than this fraction of records is quarantined",
    )
    p.add_argument(
        "--chunk-mb",
        type=int,
        default=16,
        help="input read per chunk, MiB (memory ~ a few times this)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that parse and check the input (default: the CPUs, at most 8, for "
        "inputs of 64 MiB or more; 1: this process only); the store is the same for any number",
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where chunks are parsed and checked: this machine (default), or Ray Data "
        "(transition stores; the store is the same)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="--engine ray: the cluster, HOST:PORT or auto (default: start a local one)",
    )
    p.add_argument(
        "--parallelism",
        type=int,
        default=None,
        help="--engine ray: build tasks at once (default: as many as the cluster's CPUs)",
    )
    p.add_argument("--quiet", action="store_true", help="no summary")
    args = p.parse_args(argv)
    if args.engine == "local" and (args.ray_address or args.parallelism is not None):
        print("error: --ray-address and --parallelism go with --engine ray", file=sys.stderr)
        return 2
    if args.engine == "ray" and args.workers is not None:
        print("error: --workers is the local engine's; with --engine ray give --parallelism",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.parallelism is not None and args.parallelism < 1:
        print("error: --parallelism must be 1 or more", file=sys.stderr)
        return 2
    ray_options = (
        {"engine": "ray", "ray_address": args.ray_address, "parallelism": args.parallelism}
        if args.engine == "ray"
        else {}
    )
    if args.max_bad_fraction is not None and not 0.0 <= args.max_bad_fraction <= 1.0:
        print("error: --max-bad-fraction must be between 0 and 1", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print("error: --workers must be 1 or more", file=sys.stderr)
        return 2
    try:
        result = build(
            args.spec,
            args.out,
            force=args.force,
            max_bad_fraction=args.max_bad_fraction,
            chunk_bytes=args.chunk_mb << 20,
            workers=args.workers,
            **ray_options,
        )
    except (SpecError, BuildError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no store was written", file=sys.stderr)
        return 130
    if not args.quiet:
        print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
