"""``python -m trainer.compare RUN_DIR... [--out PNG]``: scores across runs and seeds.

Runs are grouped by their resolved config with the seed (and ``out`` and other settings
that do not change what is trained) left out; each group's seeds give a mean ± std. The
table (Markdown, ready for a README) has one row per group and stage: the number of seeds,
the final evaluation (the stage's last) and the best evaluation (the stage's best), in
normalized score when the store has reference returns, else in return. The PNG draws each
group's evaluation curve against the step, mean ± std over seeds, with the behaviour
policy's score as a dashed line when the store knows it.

    python -m trainer.compare runs/pendulum-bc-iql-s* runs/pendulum-bc-cql-s* --out runs/compare.png
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import yaml_load
from trainer.logging import read_metrics

# Keys that do not change what a run trains: ignored when grouping runs.
_NOT_GROUPING = {
    "seed",
    "out",
    "progress",
    "num_threads",
    "tensorboard",
    "device",
    "store_hash",
    "init_from",
    "log_every",
    "checkpoint",
}
EXIT_USER_ERROR = 2


class CompareError(Exception):
    """A run directory that cannot be compared; the message says why."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def stages(self) -> list[str]:
        return [str(s.get("name") or s["algo"]) for s in self.config.get("stages", [])]


@dataclass
class Group:
    key: str
    runs: list[Run] = field(default_factory=list)
    label: str = ""


def load_run(path: str | Path) -> Run:
    p = Path(path)
    cfg_path, metrics = p / "config.yaml", p / "metrics.jsonl"
    if not cfg_path.is_file() or not metrics.is_file():
        raise CompareError(f"{p}: not a run directory (needs config.yaml and metrics.jsonl)")
    try:
        config = yaml_load(cfg_path.read_text(encoding="utf-8")) or {}
    except Exception as e:  # yaml raises several error types
        raise CompareError(f"{cfg_path}: unreadable ({e})") from None
    summary_path = p / "summary.json"
    summary = (
        json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    )
    return Run(p, config, read_metrics(metrics), summary)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def _store_name(run: Run) -> str:
    return Path(str(run.config.get("store", "?"))).name


def _behaviour(run: Run, key: str) -> float | None:
    ref = (run.summary or {}).get("reference_returns") or {}
    value = ref.get("behaviour_normalized_score" if key == "eval/normalized_score" else "behaviour")
    return None if value is None else float(value)


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups of runs whose configs agree on everything but the seed and bookkeeping.

    A group's label is its store and stages, plus the settings that tell it apart from the
    other groups with the same store and stages.
    """
    groups: dict[str, Group] = {}
    flats: dict[str, dict[str, Any]] = {}
    for run in runs:
        cfg = {k: v for k, v in run.config.items() if k not in _NOT_GROUPING}
        key = json.dumps(cfg, sort_keys=True, default=str)
        groups.setdefault(key, Group(key)).runs.append(run)
        flats[key] = _flat(cfg)
    base = {
        k: f"{_store_name(g.runs[0])}: {' -> '.join(g.runs[0].stages)}" for k, g in groups.items()
    }
    for key, g in groups.items():
        peers = [k for k in groups if base[k] == base[key]]
        varying = sorted(
            {
                name
                for k in peers
                for name in flats[k]
                if len({json.dumps(flats[p].get(name)) for p in peers}) > 1
            }
        )
        extra = ", ".join(f"{name}={flats[key].get(name)}" for name in varying[:3])
        if len(varying) > 3:
            extra += ", ..."
        g.label = f"{base[key]} [{extra}]" if extra else base[key]
    return list(groups.values())


def score_key(runs: list[Run]) -> str:
    for key in ("eval/normalized_score", "eval/return_mean"):
        if any(key in r for run in runs for r in run.rows):
            return key
    raise CompareError(
        "no evaluation rows with eval/normalized_score or eval/return_mean in these runs"
    )


def stage_scores(run: Run, stage: str, key: str) -> tuple[float | None, float | None]:
    """(final, best) of ``key`` over the stage's evaluation rows."""
    vals = [
        r[key]
        for r in run.rows
        if r.get("kind") == "eval"
        and r.get("stage") == stage
        and isinstance(r.get(key), int | float)
    ]
    if not vals:
        return None, None
    return float(vals[-1]), float(max(vals))


def _ms(vals: list[float]) -> str:
    if not vals:
        return "-"
    a = np.asarray(vals)
    return f"{a.mean():.1f} ± {a.std():.1f}" if len(a) > 1 else f"{a[0]:.1f}"


def table(groups: list[Group], key: str) -> list[str]:
    """The comparison as Markdown lines."""
    unit = "normalized score" if key == "eval/normalized_score" else "return"
    lines = [
        f"| run | stage | seeds | final {unit} | best {unit} |",
        "|---|---|---:|---:|---:|",
    ]
    behaviour: dict[str, float] = {}
    for g in groups:
        stages = g.runs[0].stages
        for stage in stages:
            finals, bests = [], []
            for run in g.runs:
                f, b = stage_scores(run, stage, key)
                if f is not None and b is not None:
                    finals.append(f)
                    bests.append(b)
            lines.append(f"| {g.label} | {stage} | {len(finals)} | {_ms(finals)} | {_ms(bests)} |")
        for run in g.runs:
            value = _behaviour(run, key)
            if value is not None:
                behaviour[_store_name(run)] = value
    for store, value in behaviour.items():
        lines.append(f"| {store}: behaviour (dataset average) | - | - | {value:.1f} | - |")
    return lines


def plot(groups: list[Group], key: str, path: str | Path) -> Path:
    """One PNG: each group's evaluation curve, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    behaviour: dict[str, float] = {}
    for g in groups:
        per_step: dict[int, list[float]] = {}
        for run in g.runs:
            for r in run.rows:
                if r.get("kind") == "eval" and isinstance(r.get(key), int | float):
                    per_step.setdefault(int(r["step"]), []).append(float(r[key]))
            value = _behaviour(run, key)
            if value is not None:
                behaviour[_store_name(run)] = value
        if not per_step:
            continue
        steps = sorted(per_step)
        mean = np.array([np.mean(per_step[s]) for s in steps])
        std = np.array([np.std(per_step[s]) for s in steps])
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{g.label} (n={len(g.runs)})")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
        starts = [int(r["step"]) for r in g.runs[0].rows if r.get("kind") == "stage_start"][1:]
        for s in starts:
            ax.axvline(s, color=line.get_color(), lw=0.7, ls=":")
    for store, value in behaviour.items():
        ax.axhline(value, color="grey", ls="--", lw=1, label=f"{store}: behaviour (dataset)")
    ax.set_xlabel("gradient step")
    ax.set_ylabel(key)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(EXIT_USER_ERROR, f"trainer.compare: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(
        prog="python -m trainer.compare", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of trainer.train")
    p.add_argument(
        "--out", default="compare.png", help="where to write the curves (default: compare.png)"
    )
    p.add_argument(
        "--metric",
        default=None,
        help="evaluation metric (default: eval/normalized_score, else eval/return_mean)",
    )
    args = p.parse_args(argv)
    try:
        runs = [load_run(r) for r in args.runs]
        key = args.metric or score_key(runs)
        groups = group_runs(runs)
        lines = table(groups, key)
        png = plot(groups, key, args.out)
    except CompareError as e:
        print(f"trainer.compare: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print("\n".join(lines))
    print(f"\ncurves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
