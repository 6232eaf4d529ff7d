"""F1 against the fraction of segments read, across lambda (the price of reading a segment).

    python scripts/qa_sweep.py                                   # configs/qa-demo.yaml
    python scripts/qa_sweep.py --lambdas 0,0.01,0.03 --init runs/qa-demo/checkpoints/final-supervised.pt
    python scripts/qa_sweep.py --out runs/qa-sweep stages.1.steps=200    # + config overrides

One supervised reader is the starting point of every point of the sweep: ``--init`` names
its checkpoint, or the config's ``qa_supervised`` stage is trained once into
``OUT/supervised`` (and reused by later sweeps into the same OUT). Then, for each lambda,
the config's ``qa_hybrid`` stage is trained from it with ``segment_cost = lambda`` into
``OUT/lambda-<value>`` (a finished run from the same checkpoint bytes and config is
reused unless ``--overwrite``), and its evaluation on the dev split is read from its ``summary.json``.

Writes ``OUT/qa-sweep.png`` (F1 against fraction read, one point per lambda, the
read-everything baseline at 1.0, the "F1 within 2 points" band and the "30% fewer
segments" line) and ``OUT/sweep.json``, and prints the table in Markdown.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import (  # noqa: E402
    ConfigError,
    apply_overrides,
    config_from_dict,
    yaml_load,
)
from trainer.qa.runner import QATrainer  # noqa: E402


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 0,0.01,0.02, got {text!r}"
        ) from None


def _raw_config(path: str, overrides: list[str]) -> dict[str, Any]:
    raw = yaml_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a mapping")
    return apply_overrides(raw, overrides)


def _stage(raw: dict[str, Any], algo: str) -> dict[str, Any]:
    for st in raw.get("stages") or []:
        if isinstance(st, dict) and st.get("algo") == algo:
            return copy.deepcopy(st)
    raise ConfigError(f"the config has no {algo} stage")


KEY_FILE = "sweep-key.txt"  # what a finished run in a sweep was trained from


def _config_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def supervised_config(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    """The config of the supervised-only run into ``out``."""
    r = copy.deepcopy(raw)
    sup = _stage(r, "qa_supervised")
    sup["name"] = "supervised"
    r.update(stages=[sup], out=str(out))
    return r


def _finished(out: Path, key: str, log: Any) -> bool:
    """Whether ``out`` holds a finished run that was trained under ``key``."""
    if not (out / "summary.json").is_file():
        return False
    key_file = out / KEY_FILE
    if key_file.is_file() and key_file.read_text(encoding="utf-8").strip() == key:
        log(f"reusing {out}")
        return True
    log(f"{out} was trained from another checkpoint or config; training it again")
    return False


def _train(config: dict[str, Any], key: str, log: Any) -> dict[str, Any]:
    """Train ``config`` into its ``out`` (from scratch) and record ``key`` there."""
    result = QATrainer(config_from_dict(config), overwrite=True, log=log).run()
    (Path(config["out"]) / KEY_FILE).write_text(key + "\n", encoding="utf-8")
    return result


def train_supervised(raw: dict[str, Any], out: Path, log: Any) -> Path:
    """The supervised stage alone into ``out``; its final checkpoint (reused when a finished
    run there has the same config)."""
    ckpt = out / "checkpoints" / "final-supervised.pt"
    r = supervised_config(raw, out)
    key = _config_key(r)
    if not (ckpt.is_file() and _finished(out, key, log)):
        _train(r, key, log)
    return ckpt


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_hybrid(
    raw: dict[str, Any],
    init: Path,
    init_digest: str,
    lam: float,
    out: Path,
    overwrite: bool,
    log: Any,
) -> dict[str, Any]:
    """One hybrid run from ``init`` (whose bytes hash to ``init_digest``) with
    ``segment_cost = lam``; its summary. A finished run in ``out`` is reused when it was
    trained from the same checkpoint bytes and the same config; otherwise it is trained
    again."""
    r = copy.deepcopy(raw)
    hyb = _stage(r, "qa_hybrid")
    hyb.pop("init", None)
    hyb.update(name="hybrid", segment_cost=lam)
    r.update(stages=[hyb], out=str(out), init_from=str(init))
    key = hashlib.sha256((init_digest + _config_key(r)).encode()).hexdigest()
    if not overwrite and _finished(out, key, log):
        return dict(json.loads((out / "summary.json").read_text(encoding="utf-8")))
    return _train(r, key, log)


def _groups(rows: list[dict[str, Any]]) -> list[tuple[float, float, list[float]]]:
    """Points that land on the same (fraction read, F1), with their lambdas."""
    out: list[tuple[float, float, list[float]]] = []
    for r in rows:
        for x, y, lams in out:
            if abs(x - r["fraction_read"]) < 0.01 and abs(y - r["f1"]) < 0.3:
                lams.append(r["lambda"])
                break
        else:
            out.append((r["fraction_read"], r["f1"], [r["lambda"]]))
    return out


def plot(rows: list[dict[str, Any]], baseline: dict[str, Any], path: Path, title: str) -> None:
    """F1 against fraction read: the whole range, and a zoom on the region of the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bf = baseline["f1"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, zoom in zip(axes, (False, True)):
        pts = sorted(rows, key=lambda r: r["fraction_read"])
        ax.plot(
            [r["fraction_read"] for r in pts],
            [r["f1"] for r in pts],
            "o-",
            color="C0",
            lw=0.8,
            label="hybrid reader (halting)",
        )
        for x, y, lams in _groups(rows):
            label = "λ=" + ", ".join(f"{v:g}" for v in sorted(lams))
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
        ax.plot([1.0], [bf], "*", ms=13, color="C3", label=f"read everything (F1 {bf:.1f})")
        ax.axhspan(bf - 2, bf + 2, color="C3", alpha=0.1, label="within 2 F1 points")
        ax.axvline(0.7, color="grey", ls="--", lw=0.8, label="30% fewer segments")
        ax.set_xlabel("fraction of segments read (mean over questions)")
        ax.set_ylabel("F1 (dev)")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_xlim(0.4, 1.05)
            ax.set_ylim(bf - 10, bf + 4)
            ax.set_title("zoom on the target region", fontsize=10)
        else:
            ax.set_xlim(0, 1.05)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    ap.add_argument("--config", default="configs/qa-demo.yaml")
    ap.add_argument("--out", default="runs/qa-sweep")
    ap.add_argument(
        "--lambdas",
        type=_floats,
        default=[0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2],
        help="comma-separated segment costs (default 0,0.005,0.01,0.02,0.05,0.1,0.2)",
    )
    ap.add_argument(
        "--init", help="a supervised checkpoint (default: train one into OUT/supervised)"
    )
    ap.add_argument("--overwrite", action="store_true", help="retrain finished lambda runs")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    try:
        raw = _raw_config(args.config, args.overrides)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        init = Path(args.init) if args.init else train_supervised(raw, out / "supervised", log)
        rows, baseline = [], None
        init_digest = file_digest(init)
        for lam in args.lambdas:
            log(f"lambda {lam:g} ...")
            s = train_hybrid(
                raw, init, init_digest, lam, out / f"lambda-{lam:g}", args.overwrite, log
            )
            h, b = s["hybrid"], s["baseline"]
            baseline = baseline or b
            rows.append(
                {
                    "lambda": lam,
                    "f1": h["f1"],
                    "exact_match": h["exact_match"],
                    "fraction_read": h["fraction_read"],
                    "fraction_read_total": h["fraction_read_total"],
                    "segments_read": h["segments_read"],
                    "no_answer_accuracy": h["no_answer_accuracy"],
                    "read_everything_f1": h["read_everything_f1"],
                    "run": str(out / f"lambda-{lam:g}"),
                }
            )
    except (ConfigError, OSError) as e:
        print(f"qa_sweep: error: {e}", file=sys.stderr)
        return 2
    assert baseline is not None
    plot(rows, baseline, out / "qa-sweep.png", f"QA reader: F1 vs segments read ({args.config})")
    (out / "sweep.json").write_text(
        json.dumps({"baseline": baseline, "init": str(init), "rows": rows}, indent=2) + "\n"
    )
    print(
        f"read everything: F1 {baseline['f1']:.2f}  EM {baseline['exact_match']:.2f}  "
        f"({baseline['segments_read']:.1f} segments per question)\n"
    )
    print("| λ | F1 | EM | fraction read | segments read | ΔF1 vs read-everything |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['lambda']:g} | {r['f1']:.2f} | {r['exact_match']:.2f} | "
            f"{r['fraction_read']:.3f} | {r['segments_read']:.1f} | "
            f"{r['f1'] - baseline['f1']:+.2f} |"
        )
    print(f"\n{out / 'qa-sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
