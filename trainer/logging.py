"""Run outputs: ``metrics.jsonl``, TensorBoard events, a progress bar and ``curves.png``.

``metrics.jsonl`` holds one JSON object per line. Every row has ``step`` (global gradient
step), ``stage`` (the stage's name), ``algo`` and ``kind`` (``train`` or ``eval``); train
rows carry the mean of each training metric over the last ``log_every`` steps, eval rows
``eval/return_mean``, ``eval/return_std``, ``eval/normalized_score`` (online, when the
store has an env) and ``val/...`` (offline metrics on the validation episodes).

On resume the file is cut back to the byte offset saved in the checkpoint, so a resumed
run's metrics read exactly like an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsWriter:
    """Appends metric rows to ``metrics.jsonl`` and, optionally, TensorBoard."""

    def __init__(
        self, run_dir: Path, *, resume_offset: int | None, tensorboard: bool, purge_step: int | None
    ) -> None:
        self.path = run_dir / METRICS_FILE
        if resume_offset is None:
            self.path.write_bytes(b"")
        else:
            with open(self.path, "ab") as f:
                f.truncate(resume_offset)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: _clean(v) for k, v in row.items()}
        self._file.write(json.dumps(clean).encode("utf-8") + b"\n")
        if self._tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k in ("step", "stage", "algo", "kind") or not isinstance(v, int | float):
                    continue
                tag = k if "/" in k else f"train/{k}"
                self._tb.add_scalar(tag, v, step)

    def offset(self) -> int:
        """Bytes written so far (flushed): what a checkpoint records for resume."""
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullWriter:
    """A :class:`MetricsWriter` that writes nothing: the other ranks' of a data-parallel run
    (rank 0 writes the run's metrics)."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class Progress:
    """A tqdm bar over the run's total steps, with the latest metrics; silent when off."""

    def __init__(self, total: int, initial: int, enabled: bool | str) -> None:
        on = sys.stderr.isatty() if enabled == "auto" else bool(enabled)
        self._bar: Any = None
        if on:
            import shutil

            from tqdm import tqdm

            # Some pseudo-terminals report 0 columns, which makes tqdm print nothing.
            width = shutil.get_terminal_size((120, 20)).columns or 120
            self._bar = tqdm(total=total, initial=initial, ncols=width, unit="step")
        self._at = initial
        self._postfix: dict[str, str] = {}

    def update(self, step: int, metrics: dict[str, Any] | None = None, stage: str = "") -> None:
        if self._bar is None:
            return
        if stage:
            self._bar.set_description(stage)
        if metrics:
            for k, v in metrics.items():
                if isinstance(v, float) and k not in ("step", "time"):
                    short = k.split("/")[-1] if k.startswith(("train/",)) else k
                    self._postfix[short] = f"{v:.4g}"
            self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(step - self._at)
        self._at = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------- curves

EVAL_KEYS = ("eval/normalized_score", "eval/return_mean")


def eval_key(rows: Iterable[dict[str, Any]]) -> str | None:
    """The headline evaluation metric present in ``rows``: normalized score, else return."""
    rows = list(rows)
    for key in EVAL_KEYS:
        if any(r.get(key) is not None for r in rows):
            return key
    return None


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One PNG: the evaluation curve (mean ± std band), offline validation metrics, and
    every training metric, against the global step, with stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    panels: list[tuple[str, list[dict[str, Any]], list[str]]] = []
    key = eval_key(evals)
    if key:
        panels.append((key, evals, [key]))
    val_keys = sorted({k for r in evals for k in r if k.startswith("val/")})
    for k in val_keys:
        panels.append((k, evals, [k]))
    skip = {"step", "stage", "algo", "kind", "time", "lr", "steps_per_s"}
    train_keys = sorted(
        {k for r in train for k, v in r.items() if k not in skip and isinstance(v, int | float)}
    )
    for k in train_keys:
        panels.append((k, train, [k]))
    if not panels:
        panels.append(("(no metrics)", [], []))

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    boundaries = stage_starts(rows)
    for ax, (name, data, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in data if isinstance(r.get(k), int | float)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if data is evals else None, ms=3, lw=1.2)
            if k == "eval/return_mean" or k == "eval/normalized_score":
                sk = "eval/return_std" if k == "eval/return_mean" else "eval/normalized_score_std"
                sd = [r.get(sk) for r in data if isinstance(r.get(k), int | float)]
                if all(isinstance(s, int | float) for s in sd):
                    lo = [y - s for y, s in zip(ys, sd)]
                    hi = [y + s for y, s in zip(ys, sd)]
                    ax.fill_between(xs, lo, hi, alpha=0.2)
        mark_panel(ax, name, boundaries)
    return save_panels(fig, axes, len(panels), title, path)


def mark_panel(ax: Any, name: str, boundaries: list[tuple[int, str]]) -> None:
    """A curve panel's title, step axis, and a dashed line at each stage boundary."""
    for step, stage in boundaries:
        ax.axvline(step, color="grey", lw=0.8, ls="--")
        ax.text(step, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)


def save_panels(
    fig: Any,
    axes: Any,
    used: int,
    title: str,
    path: str | Path,
    rect: tuple[float, float, float, float] | None = None,
) -> Path:
    """Blank the unused panels, add the title, write the PNG and close the figure."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    if rect is None:
        fig.tight_layout()
    else:
        fig.tight_layout(rect=rect)
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def stage_starts(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(global step, stage name) of every stage start after the first."""
    starts = [(int(r["step"]), str(r["stage"])) for r in rows if r.get("kind") == "stage_start"]
    return starts[1:]
