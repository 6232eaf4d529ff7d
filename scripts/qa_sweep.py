"""F1 against the fraction of segments read: the learned halting policy across lambda (the
price of reading a segment), beside the simple rules, over seeds.

    python scripts/qa_sweep.py                                   # configs/qa-demo.yaml, seed 0
    python scripts/qa_sweep.py --seeds 0,1,2 --lambdas 0.005,0.01,0.02,0.05
    python scripts/qa_sweep.py --lambdas 0,0.01,0.03 --init runs/qa-demo/checkpoints/final-supervised.pt
    python scripts/qa_sweep.py --out runs/qa-sweep stages.1.steps=200    # + config overrides

For each seed, one supervised reader is the starting point of every lambda: ``--init`` names
its checkpoint (one seed only), or the config's ``qa_supervised`` stage is trained once into
``OUT/s<seed>/supervised`` (reused by later sweeps into the same OUT). Then, for each lambda,
the config's ``qa_hybrid`` stage is trained from it with ``segment_cost = lambda`` into
``OUT/s<seed>/lambda-<value>`` (a finished run from the same checkpoint bytes and config is
reused unless ``--overwrite``); its evaluation on the dev split is read from its
``summary.json``, with the same reader under the simple halting rules (``halting_rules``):
read the first k segments, and halt once the best answer margin passes tau; and the learned
policy with its halting threshold swept (a run trained before a rule existed has its rules
worked out again from its final checkpoint, once).

Writes ``OUT/qa-sweep.png`` (F1 against fraction read: the learned policy's points, the two
rules' points, each family's Pareto front, the read-everything F1 and the "30% fewer
segments" line) and ``OUT/sweep.json``, and prints the tables in Markdown with, per seed,
whether the learned front dominates each rule's front.
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
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    if any("segment_cost" in st and not st.get("halting_rules") for st in summary["stages"]):
        log(f"{out} has no halting_rules (an older run); training it again")
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


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats: fewer segments read and F1 at least as high (sorted
    by fraction read)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def dominated(point: tuple[float, float], front: list[tuple[float, float]], tol: float) -> bool:
    """Whether some point of ``front`` reads no more and scores no less (F1 within ``tol``)."""
    return any(x <= point[0] + 1e-9 and y >= point[1] - tol for x, y in front)


RULES = ("first_k", "margin", "learned_threshold")
RULES_FILE = "halting-rules.json"  # rules worked out again for a run whose summary lacks some


def halting_rules(run: Path, summary: dict[str, Any], log: Any) -> dict[str, Any]:
    """The hybrid stage's ``halting_rules`` of a finished run. A run trained before a rule
    existed has them worked out again from its final checkpoint (the reader its summary
    evaluated), once: they are kept in ``RULES_FILE`` beside it, under that checkpoint's
    digest."""
    rules = next(st["halting_rules"] for st in summary["stages"] if st.get("halting_rules"))
    if all(k in rules for k in RULES):
        return dict(rules)
    from trainer.qa.answer import Reader, run_checkpoint

    digest = file_digest(run_checkpoint(run, "final"))
    cache = run / RULES_FILE
    if cache.is_file():
        kept = json.loads(cache.read_text(encoding="utf-8"))
        if kept.get("checkpoint_sha256") == digest:
            return dict(kept["halting_rules"])
    log(f"{run}: working out the halting rules again from its final checkpoint")
    import torch

    from trainer.qa.data import QAArrays
    from trainer.qa.runner import QAEvaluator

    reader = Reader(run, "final")
    s, store = reader.settings, reader.store
    examples = store.split_indices(s.eval_split)[: s.eval_max_examples]
    ev = QAEvaluator(store, QAArrays.from_store(store), examples, s, torch.device("cpu"))
    rules = ev.halting_rules(reader.model)
    cache.write_text(
        json.dumps({"checkpoint_sha256": digest, "halting_rules": rules}, indent=1) + "\n",
        encoding="utf-8",
    )
    return dict(rules)


def rule_points(rules: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    return {k: [(r["fraction_read"], r["f1"]) for r in rules[k]] for k in RULES}


def plot(
    rows: list[dict[str, Any]],
    rules: dict[str, list[tuple[float, float]]],
    read_all: float,
    path: Path,
    title: str,
) -> None:
    """F1 against fraction read: every family's points and its Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    families = [
        ("learned policy (λ sweep)", [(r["fraction_read"], r["f1"]) for r in rows], "C0", "o"),
        ("first k segments", rules["first_k"], "C1", "s"),
        ("margin > τ", rules["margin"], "C2", "^"),
        ("learned policy, halt threshold swept", rules["learned_threshold"], "C4", "."),
    ]
    for ax, zoom in zip(axes, (False, True)):
        for label, pts, color, marker in families:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=color,
                       marker=marker, alpha=0.45)  # fmt: skip
            front = pareto(pts)
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color,
                    lw=1.4, label=f"{label}: Pareto front")  # fmt: skip
        ax.axhline(read_all, color="C3", lw=0.8, ls=":", label=f"read everything ({read_all:.1f})")
        ax.axvline(0.7, color="grey", ls="--", lw=0.8, label="30% fewer segments")
        ax.set_xlabel("fraction of segments read (mean over questions)")
        ax.set_ylabel("F1 (dev)")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_xlim(0.3, 1.02)
            ax.set_ylim(read_all - 12, read_all + 4)
            ax.set_title("zoom", fontsize=10)
        else:
            ax.set_xlim(0, 1.02)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None


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
    ap.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds (default 0)")
    ap.add_argument(
        "--init", help="a supervised checkpoint (one seed; default: train one per seed)"
    )
    ap.add_argument("--tol", type=float, default=0.0, help="F1 slack of the dominance check")
    ap.add_argument("--overwrite", action="store_true", help="retrain finished lambda runs")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    if args.init and len(args.seeds) > 1:
        print("qa_sweep: error: --init gives one supervised start: use one seed", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    rules: dict[int, dict[str, list[tuple[float, float]]]] = {}
    read_all: dict[int, float] = {}
    try:
        base = _raw_config(args.config, args.overrides)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            raw = {**base, "seed": seed}
            sdir = out / f"s{seed}"
            init = Path(args.init) if args.init else train_supervised(raw, sdir / "supervised", log)
            init_digest = file_digest(init)
            rules[seed] = {k: [] for k in RULES}
            for lam in args.lambdas:
                log(f"seed {seed}, lambda {lam:g} ...")
                run = sdir / f"lambda-{lam:g}"
                s = train_hybrid(raw, init, init_digest, lam, run, args.overwrite, log)
                h, b = s["hybrid"], s["baseline"]
                read_all.setdefault(seed, b["f1"])
                for k, pts in rule_points(halting_rules(run, s, log)).items():
                    rules[seed][k] += pts
                rows.append({
                    "seed": seed, "lambda": lam, "f1": h["f1"], "exact_match": h["exact_match"],
                    "fraction_read": h["fraction_read"], "segments_read": h["segments_read"],
                    "read_everything_f1": h["read_everything_f1"], "run": str(run),
                })  # fmt: skip
    except (ConfigError, OSError) as e:
        print(f"qa_sweep: error: {e}", file=sys.stderr)
        return 2
    union = {k: [p for r in rules.values() for p in r[k]] for k in RULES}
    mean_read_all = sum(read_all.values()) / len(read_all)
    plot(rows, union, mean_read_all, out / "qa-sweep.png",
         f"QA reader: F1 vs segments read ({args.config}, seeds {args.seeds})")  # fmt: skip
    verdicts = []
    for seed in args.seeds:
        points = [(r["fraction_read"], r["f1"]) for r in rows if r["seed"] == seed]
        learned = pareto(points)
        swept = pareto(points + rules[seed]["learned_threshold"])
        for k in ("first_k", "margin"):
            front = [p for p in pareto(rules[seed][k]) if p[0] < 1.0 - 1e-9]  # not read-all
            verdicts.append({
                "seed": seed, "rule": k, "front": front,
                "not_dominated": [p for p in front if not dominated(p, learned, args.tol)],
                "not_dominated_swept": [p for p in front if not dominated(p, swept, args.tol)],
            })  # fmt: skip
    (out / "sweep.json").write_text(
        json.dumps(
            {"read_everything_f1": read_all, "rows": rows, "rules": rules, "verdicts": verdicts},
            indent=2,
        )
        + "\n"  # fmt: skip
    )
    print("| seed | λ | F1 | EM | fraction read | segments read | ΔF1 vs read-everything |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['lambda']:g} | {r['f1']:.2f} | {r['exact_match']:.2f} | "
            f"{r['fraction_read']:.3f} | {r['segments_read']:.1f} | "
            f"{r['f1'] - read_all[r['seed']]:+.2f} |"
        )
    print(
        "\n| seed | rule | rule's front points | not dominated by the learned λ front "
        "| not dominated with the learned policy's threshold swept too |"
    )
    print("|---:|---|---:|---|---|")
    for v in verdicts:
        miss = [
            ", ".join(f"({x:.2f}, {y:.1f})" for x, y in v[key]) or "none"
            for key in ("not_dominated", "not_dominated_swept")
        ]
        print(f"| {v['seed']} | {v['rule']} | {len(v['front'])} | {miss[0]} | {miss[1]} |")
    for key, what in (("not_dominated", "λ"), ("not_dominated_swept", "λ and threshold")):
        ok = all(not v[key] for v in verdicts)
        print(
            f"the learned front ({what}) dominates both rules on every seed: "
            f"{'yes' if ok else 'NO'}"
        )
    print(f"{out / 'qa-sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
