"""``python -m pipeline.export STORE --to hf --out DIR [--format arrow|parquet]``: a store of
any kind as a Hugging Face ``datasets`` directory, with a dataset card.

Every table of the store becomes one *config* (a ``DatasetDict``), split by the store's
splits; a table with no notion of split is one split ``train``. The first config is the
store's main table and lies at ``DIR`` itself, the others in subdirectories of their name:

    kind         DIR itself (the default config)       other configs, in DIR/NAME
    transitions  transitions: train (every row)        episodes: train
    segments     segments: one split per store split   examples: the same splits;
                 (the split of the row's example)      documents: train (every context)
    sequences    sequences: train                      turns: train

``--format arrow`` (the default) writes each config with ``DatasetDict.save_to_disk``:
``datasets.load_from_disk(DIR)`` opens the default config, ``load_from_disk(DIR / NAME)``
another. ``--format parquet`` writes Parquet shards in the hub's layout,
``data/<split>-00000-of-0000N.parquet`` for the default config and
``<name>/<split>-...parquet`` for the others, each shard at most ``shard_bytes`` of Arrow
data. In both formats ``DIR/README.md`` is a dataset card whose ``configs`` point at the
files, so ``datasets.load_dataset(str(DIR))`` (and ``load_dataset(str(DIR), NAME)``) open
them too, locally. A segment or sequence store's tokenizer is copied to ``DIR/tokenizer/``.

Every column keeps the store's Arrow type and values (the tables are handed to ``datasets``
as they are memory-mapped from the store, never through Python rows): ``observation`` is
``List(Value("float32"), length=obs_dim)`` (a fixed-size list), a discrete action
``int64``, flags ``bool``. A segment row keeps ``example_index`` and an example
``segment_row`` / ``doc_index``: rows of the store's tables, not of a split; join on
``example_id`` and ``doc_id`` within an export.

The store is verified first and refused if it does not verify. The export is written
beside ``DIR`` and renamed into place, so a failed one leaves nothing behind; an existing
``DIR`` is replaced only with ``force``, and only when it is empty or an earlier export
(its card says so): never another directory.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from pipeline.arrowio import read_ipc, read_manifest
from pipeline.format import SPEC_COPY, StoreError
from pipeline.interchange.common import check_verifies

INSTALL_HINT = 'pip install -e ".[hf]"'
FORMATS = ("arrow", "parquet")
DEFAULT_SHARD_BYTES = 256 << 20  # Arrow bytes per Parquet shard (the hub's are ~500 MB)
PARQUET_DIR = "data"  # the default config's Parquet shards (hub layout)
TOKENIZER_DIR = "tokenizer"
CARD = "README.md"
# A line of the card by which --force knows an earlier export it may replace.
MARKER = "<!-- offrl-store hf export: python -m pipeline.export -->"
# datasets' rule for split names (datasets.splits._split_re)
_SPLIT_RE = r"^\w+(\.\w+)*$"


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Config:
    """One table of the store as one config of the export."""

    name: str
    what: str  # one line for the card: what a row is
    splits: dict[str, pa.Table]  # split name -> rows, in the card's order
    meanings: dict[str, str]  # column -> meaning (docs/FORMAT.md)


@dataclass(frozen=True)
class Export:
    """What a store exports: its configs (the first is the default) and the rest."""

    kind: str
    configs: list[Config]
    task_categories: list[str]
    tokenizer: list[tuple[Path, str]] = field(default_factory=list)  # (store file, DIR path)


TRANSITION_MEANINGS = {
    "episode_id": "episode id, as in the source (an integer id in decimal)",
    "step": "0-based step within the episode",
    "observation": "s_t, flattened in the spec's declared order (labels below)",
    "action": "a_t: a discrete index, or a continuous vector",
    "reward": "r_t",
    "next_observation": "s_{t+1}; never from another episode",
    "terminated": "true only on the last row of an episode that really ended: do not bootstrap",
    "truncated": "true only on the last row of an episode that was cut off: bootstrap from s_{t+1}",
    "return_to_go": "sum_k gamma^k r_{t+k} over every logged reward to the episode's end "
    "(a dropped last step's included), gamma = spec store.discount",
}
EPISODE_MEANINGS = {
    "episode_id": "unique in the store",
    "start": "first row of the episode in the transitions (episodes tile the rows in order)",
    "length": "transitions of the episode (>= 1)",
    "return": "undiscounted sum of every logged reward: the rows' rewards plus dropped_reward",
    "dropped_reward": "reward of a last step dropped as unbootstrappable, 0 when none was",
    "last_step_dropped": "that step was dropped (only ever on a truncated episode)",
    "terminated": "as on the episode's last row",
    "truncated": "as on the episode's last row",
    "source_file": "the file of the episode's first record (see Provenance)",
    "source_line": "1-based line of that record",
}
EXAMPLE_MEANINGS = {
    "example_id": "as in the source (numbers become their decimal text)",
    "doc_id": "the document: first 16 hex digits of sha256(context); join with documents",
    "doc_index": "the document's row in the store's documents table",
    "split": "the example's split (spec source.splits; default train)",
    "title": 'SQuAD article title / JSONL title ("" if none)',
    "question": "as in the source",
    "answers": "every answer text given (the first one is the span's)",
    "answer_starts": "their character starts in the context",
    "is_impossible": "unanswerable",
    "n_segments": "segments of the document = rows of this example in segments",
    "n_doc_tokens": "tokens of the document",
    "n_question_tokens": "Q, question tokens after truncation to max_question_tokens",
    "global_start": "the answer's first token in the document, or -1",
    "global_end": "the answer's last token in the document (inclusive), or -1",
    "answer_segment": "first segment holding the whole answer, or -1",
    "segment_row": "first row of this example in the store's segments table",
}
SEGMENT_MEANINGS = {
    "example_id": "the example (join with examples)",
    "example_index": "the example's row in the store's examples table",
    "segment_index": "k, 0-based within the example",
    "input_ids": "[CLS] question [SEP] segment [SEP] (ids of tokenizer/tokenizer.json)",
    "n_question_tokens": "Q",
    "context_start": "Q + 2: position in input_ids of the segment's first document token",
    "n_segment_tokens": "L, document tokens in this segment",
    "token_offset": "k*stride: the segment's first document token (global offset)",
    "local_start": "the answer's start in input_ids, or -1 when this segment lacks it",
    "local_end": "the answer's end in input_ids (inclusive), or -1",
    "global_start": "the example's answer span in the document, or -1",
    "global_end": "the example's answer end in the document (inclusive), or -1",
}
DOCUMENT_MEANINGS = {
    "doc_id": "first 16 hex digits of sha256(context)",
    "context": "the text",
    "n_tokens": "document tokens",
    "token_ids": "the document's tokens (no special tokens)",
    "token_start": "each token's first character in context",
    "token_end": "each token's character end in context (exclusive)",
}
SEQUENCE_MEANINGS = {
    "episode_id": "the source's id",
    "input_ids": "the episode's tokens (ids of tokenizer/)",
    "labels": "one label code per token (names below): 0 context, never trained on",
    "turn_index": "the turn of each token, -1 on the prompt",
    "rewards": "one per kept turn (NaN without fields.reward)",
    "outcome": "fields.outcome as a number (true = 1), NaN without it",
    "length": "tokens",
    "n_turns": "turns kept",
    "truncated": "cut at a turn boundary (sequences.truncate: turn)",
    "teacher_ids": "with fields.teacher: the teacher's top-k ids at each token (-1 where none)",
    "teacher_logprobs": "with fields.teacher: their log-probabilities (0 where none)",
}
TURN_MEANINGS = {
    "episode": "the episode's row in sequences",
    "turn": "position in the episode",
    "role": "the turn's role",
    "policy": "a policy turn (one the model learns to write)",
    "token_start": "its first token within the episode",
    "token_end": "one past its last token within the episode",
    "reward": "the turn's reward, NaN without fields.reward",
    "content": "the turn's text as in the source",
}


def _arrow_column(values: np.ndarray) -> pa.Array:
    """An Arrow column of a zarr store's array, typed as the arrow store's."""
    if values.ndim == 2:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    if values.dtype.kind in "OUT":
        return pa.array(values.astype(object), pa.string())
    return pa.array(values)


def _transition_export(path: Path, manifest: dict[str, Any]) -> Export:
    from pipeline.store import open_store
    from pipeline.transitions.layout import PARTS_KEY, TRANSITIONS_ARROW

    store = open_store(path)
    if store.format == "arrow" and PARTS_KEY in manifest:
        parts = manifest[PARTS_KEY]["parts"]
        table = pa.concat_tables([read_ipc(path / p["file"]) for p in parts])
    elif store.format == "arrow":
        table = read_ipc(path / TRANSITIONS_ARROW)
    else:
        names = [*TRANSITION_MEANINGS, *store.reward_column_names.values()]
        table = pa.table({n: _arrow_column(np.asarray(store.column(n))) for n in names})
    meanings = dict(TRANSITION_MEANINGS)
    for name, entry in manifest.get("reward_columns", {}).items():
        meanings[entry["column"]] = f"named reward {name} (spec fields.rewards.{name})"
    ep_meanings = dict(EPISODE_MEANINGS)
    for name, entry in manifest.get("reward_columns", {}).items():
        ep_meanings[f"dropped_{entry['column']}"] = f"named reward {name} of a dropped last step"
    return Export(
        kind="transitions",
        configs=[
            Config("transitions", "one row per transition", {"train": table}, meanings),
            Config(
                "episodes", "one row per episode", {"train": store.episode_table()}, ep_meanings
            ),
        ],
        task_categories=["reinforcement-learning"],
    )


def _segment_export(path: Path, manifest: dict[str, Any]) -> Export:
    from pipeline.segments.layout import (
        DOCUMENTS_ARROW,
        EXAMPLES_ARROW,
        SEGMENTS_ARROW,
        TOKENIZER_JSON,
    )
    from pipeline.segments.store import open_segment_store

    store = open_segment_store(path)
    examples = store.table(EXAMPLES_ARROW)
    segments = store.table(SEGMENTS_ARROW)
    # the spec's splits in its order (train, dev, ...), then any other the examples hold
    declared = (manifest.get("spec") or {}).get("source", {}).get("splits") or []
    held = sorted(pc.unique(examples.column("split")).to_pylist())
    names = [str(entry[0]) for entry in declared if str(entry[0]) in held]
    names += [s for s in held if s not in names]
    segment_split = pc.take(examples.column("split"), segments.column("example_index"))
    by_example = {s: examples.filter(pc.equal(examples.column("split"), s)) for s in names}
    by_segment = {s: segments.filter(pc.equal(segment_split, s)) for s in names}
    return Export(
        kind="segments",
        configs=[
            Config("segments", "one row per question x segment", by_segment, SEGMENT_MEANINGS),
            Config("examples", "one row per question", by_example, EXAMPLE_MEANINGS),
            Config(
                "documents",
                "one row per distinct context, whatever the split of its questions",
                {"train": store.table(DOCUMENTS_ARROW)},
                DOCUMENT_MEANINGS,
            ),
        ],
        task_categories=["question-answering"],
        tokenizer=[(path / TOKENIZER_JSON, f"{TOKENIZER_DIR}/{Path(TOKENIZER_JSON).name}")],
    )


def _sequence_export(path: Path, manifest: dict[str, Any]) -> Export:
    from pipeline.sequences.layout import TOKENIZER_DIR as STORE_TOKENIZER_DIR
    from pipeline.sequences.store import open_sequence_store, store_tables

    tables = store_tables(open_sequence_store(path))
    tok = path / STORE_TOKENIZER_DIR
    files = sorted(p for p in tok.rglob("*") if p.is_file()) if tok.is_dir() else []
    return Export(
        kind="sequences",
        configs=[
            Config(
                "sequences",
                "one row per episode",
                {"train": tables["sequences"]},
                SEQUENCE_MEANINGS,
            ),
            Config("turns", "one row per turn", {"train": tables["turns"]}, TURN_MEANINGS),
        ],
        task_categories=["text-generation", "reinforcement-learning"],
        tokenizer=[(p, f"{TOKENIZER_DIR}/{p.relative_to(tok).as_posix()}") for p in files],
    )


EXPORTS: dict[str, Callable[[Path, dict[str, Any]], Export]] = {
    "transitions": _transition_export,
    "segments": _segment_export,
    "sequences": _sequence_export,
}


# --------------------------------------------------------------------------- layout


def config_directory(export: Export, index: int) -> str:
    """Where config ``index`` lies under DIR in the arrow format ("" for DIR itself)."""
    return "" if index == 0 else export.configs[index].name


def parquet_directory(export: Export, index: int) -> str:
    """Where the Parquet shards of config ``index`` lie under DIR."""
    return PARQUET_DIR if index == 0 else export.configs[index].name


def shard_ranges(num_rows: int, nbytes: int, shard_bytes: int) -> list[tuple[int, int]]:
    """(start, rows) of each shard: consecutive, of equal rows (the last may have fewer),
    each of at most ``shard_bytes`` of the table's ``nbytes`` unless one row is larger."""
    if num_rows == 0:
        return [(0, 0)]
    most = max(1, shard_bytes * num_rows // max(nbytes, 1))  # rows that fit in a shard
    n = math.ceil(num_rows / most)
    per = math.ceil(num_rows / n)
    return [(k * per, min(per, num_rows - k * per)) for k in range(n)]


def _check_names(export: Export, store: Path) -> None:
    import re

    reserved = {c.name for c in export.configs[1:]} | {TOKENIZER_DIR, PARQUET_DIR}
    for config in export.configs:
        for split in config.splits:
            if not re.match(_SPLIT_RE, split):
                raise StoreError(
                    f"{store}: split {split!r} is not a datasets split name (letters, digits, "
                    "_ and .); rename it in the spec's source.splits and rebuild"
                )
            if config is export.configs[0] and split in reserved:
                raise StoreError(
                    f"{store}: split {split!r} has the name of a folder of the export "
                    f"({', '.join(sorted(reserved))}); rename it in the spec's source.splits"
                )


def _features(table: pa.Table) -> Any:
    from datasets import Features

    return Features.from_arrow_schema(table.schema)


def _write_arrow(export: Export, staging: Path, info: Callable[[Config], Any]) -> dict[str, list]:
    """save_to_disk every config; the card's data_files of each."""
    from datasets import Dataset, DatasetDict
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    files: dict[str, list] = {}
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # the command prints its own lines
    try:
        for i, config in enumerate(export.configs):
            where = config_directory(export, i)
            dd = DatasetDict({s: Dataset(t, info=info(config)) for s, t in config.splits.items()})
            dd.save_to_disk(str(staging / where) if where else str(staging))
    finally:
        if not quiet:
            enable_progress_bars()
    for i, config in enumerate(export.configs):
        where = config_directory(export, i)
        prefix = f"{where}/" if where else ""
        files[config.name] = [
            {"split": s, "path": f"{prefix}{s}/data-*.arrow"} for s in config.splits
        ]
    return files


def _write_parquet(export: Export, staging: Path, shard_bytes: int) -> dict[str, list]:
    """Parquet shards of every split of every config; the card's data_files of each."""
    import pyarrow.parquet as pq

    files: dict[str, list] = {}
    for i, config in enumerate(export.configs):
        where = parquet_directory(export, i)
        (staging / where).mkdir(parents=True, exist_ok=True)
        for split, table in config.splits.items():
            # the features ride along in the schema, as datasets itself writes them
            table = table.replace_schema_metadata(_features(table).arrow_schema.metadata)
            ranges = shard_ranges(table.num_rows, table.nbytes, shard_bytes)
            for k, (start, length) in enumerate(ranges):
                name = f"{split}-{k:05d}-of-{len(ranges):05d}.parquet"
                pq.write_table(table.slice(start, length), staging / where / name)
        files[config.name] = [{"split": s, "path": f"{where}/{s}-*.parquet"} for s in config.splits]
    return files


# --------------------------------------------------------------------------- card


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return str(x)


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return _fmt(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def _statistics_lines(manifest: dict[str, Any]) -> list[str]:
    """The manifest's statistics: one table of the scalar distributions (a row each), a
    table per vector feature (a row per component, named by the observation labels), and
    the plain numbers as a list."""
    flat: list[tuple[str, Any]] = []
    for name, s in (manifest.get("statistics") or {}).items():
        if isinstance(s, dict) and s and all(isinstance(v, dict) for v in s.values()):
            flat += [(f"{name}.{sub}", v) for sub, v in s.items()]  # reward_columns.NAME
        else:
            flat.append((name, s))
    scalars = [
        (n, s)
        for n, s in flat
        if isinstance(s, dict) and not any(isinstance(v, list) for v in s.values())
    ]
    keys = list(dict.fromkeys(k for _, s in scalars for k in s))
    lines: list[str] = []
    if scalars:
        lines += [
            "",
            *_md_table(
                ["statistic", *keys], [[n, *(s.get(k, "") for k in keys)] for n, s in scalars]
            ),
        ]
    lines += [f"- {n}: {_fmt(s)}" for n, s in flat if not isinstance(s, dict)]
    labels = {"observation": (manifest.get("observation_space") or {}).get("labels")}
    for n, s in flat:
        if isinstance(s, dict) and any(isinstance(v, list) for v in s.values()):
            cols = [k for k, v in s.items() if isinstance(v, list)]
            width = len(s[cols[0]])
            names = labels.get(n) or [f"{n}[{j}]" for j in range(width)]
            lines += ["", f"`{n}` (count {s.get('count', '?')}):", ""]
            rows = [[names[j], *(s[c][j] for c in cols)] for j in range(width)]
            lines += _md_table(["feature", *cols], rows)
    return lines


def card_text(
    manifest: dict[str, Any],
    export: Export,
    data_files: dict[str, list],
    file_format: str,
    spec_text: str | None,
) -> str:
    """``README.md``: the YAML front matter the hub and ``load_dataset`` read, then the card."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    spec = manifest.get("spec") or {}
    license_ = spec.get("license")
    name = str(manifest.get("name", "store"))
    configs = []
    infos = {}
    for i, config in enumerate(export.configs):
        entry: dict[str, Any] = {"config_name": config.name, "data_files": data_files[config.name]}
        if i == 0:
            entry["default"] = True
        configs.append(entry)
        splits = SplitDict()
        for s, t in config.splits.items():
            splits.add(SplitInfo(name=s, num_bytes=t.nbytes, num_examples=t.num_rows))
        first = next(iter(config.splits.values()))
        infos[config.name] = DatasetInfo(features=_features(first), splits=splits)
    data = DatasetCardData(
        license=license_ if isinstance(license_, str) and license_ else "other",
        pretty_name=name,
        task_categories=export.task_categories,
        tags=["offrl-store", export.kind],
        configs=configs,
    )
    DatasetInfosDict(infos).to_dataset_card_data(data)
    front = data.to_yaml()

    lines = [f"# {name}", ""]
    if spec.get("description"):
        lines += [str(spec["description"]).strip(), ""]
    lines += [
        f"A `{export.kind}` store of the offrl-store format (format_version "
        f"{manifest.get('format_version')}), exported by `python -m pipeline.export "
        f"--to hf --format {file_format}`. Its content hash is `{manifest.get('content_hash')}`.",
        "",
        "## Loading",
        "",
        "```python",
    ]
    if file_format == "arrow":
        lines.append("from datasets import load_from_disk")
        lines.append(f"{export.configs[0].name} = load_from_disk(DIR)  # the default config")
        for c in export.configs[1:]:
            lines.append(f'{c.name} = load_from_disk(f"{{DIR}}/{c.name}")')
    lines.append("from datasets import load_dataset")
    lines.append(f"{export.configs[0].name} = load_dataset(DIR)  # the default config")
    for c in export.configs[1:]:
        lines.append(f'{c.name} = load_dataset(DIR, "{c.name}")')
    lines += ["```", ""]
    if export.tokenizer:
        lines += [
            f"The token ids are those of the store's tokenizer, copied to `{TOKENIZER_DIR}/`.",
            "",
        ]
    lines += ["## Configs and splits", ""]
    rows = []
    for i, c in enumerate(export.configs):
        where = (
            config_directory(export, i) if file_format == "arrow" else parquet_directory(export, i)
        )
        for s, t in c.splits.items():
            rows.append(
                [c.name + (" (default)" if i == 0 else ""), c.what, s, t.num_rows, where or "."]
            )
    lines += _md_table(["config", "rows", "split", "examples", "folder"], rows)
    if export.kind == "segments":
        lines += [
            "",
            "Segments and examples are split by the example's `split`; `example_index`, "
            "`segment_row` and `doc_index` are rows of the store's whole tables, not of a "
            "split: join on `example_id` and `doc_id`.",
        ]
    lines += ["", "## Features"]
    for c in export.configs:
        first = next(iter(c.splits.values()))
        feats = _features(first)
        lines += ["", f"`{c.name}`:", ""]
        lines += _md_table(
            ["column", "type", "meaning"],
            [[f"`{k}`", f"`{v!r}`", c.meanings.get(k, "")] for k, v in feats.items()],
        )
    if export.kind == "sequences" and manifest.get("labels"):
        lines += [
            "",
            "Label codes: "
            + ", ".join(f"{i} = {n}" for i, n in enumerate(manifest["labels"]))
            + ".",
        ]
    if export.kind == "transitions":
        lines += ["", f"Observation space: `{manifest.get('observation_space')}`."]
        lines += [f"Action space: `{manifest.get('action_space')}`."]
    lines += ["", "## Counts", ""]
    counts = manifest.get("counts") or {}
    lines += _md_table(["count", "value"], [[k, v] for k, v in counts.items()])
    reasons = manifest.get("quarantine_reasons") or {}
    if reasons:
        lines += [
            "",
            "Quarantined records by reason (kept in the store's quarantine.jsonl, not exported):",
            "",
        ]
        lines += _md_table(["reason", "records"], [[k, v] for k, v in reasons.items()])
    lines += ["", "## Statistics", "", "From the store's manifest, over the whole store."]
    lines += _statistics_lines(manifest)
    lines += ["", "## Provenance", "", f"- content_hash: `{manifest.get('content_hash')}`"]
    for key in ("spec_sha256", "resolved_spec_sha256", "build_key"):
        if key in manifest:
            lines.append(f"- {key}: `{manifest[key]}`")
    versions = manifest.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines += ["", "Source files:", ""]
    lines += _md_table(
        ["path", "sha256", "bytes", "records", "kept", "quarantined"],
        [
            [
                f"`{s.get('path')}`",
                f"`{s.get('sha256')}`",
                s.get("bytes", ""),
                s.get("records", ""),
                s.get("records_kept", ""),
                s.get("records_quarantined", ""),
            ]
            for s in manifest.get("sources") or []
        ],
    )
    lines += ["", "The spec it was built from:", "", "```yaml"]
    text = spec_text if spec_text is not None else yaml.safe_dump(spec, sort_keys=False)
    lines += [text.rstrip("\n"), "```", "", "## License", ""]
    if isinstance(license_, str) and license_:
        lines.append(f"`{license_}`, as the spec declares.")
    else:
        lines.append(
            "Unknown: the spec declares no license, so the card says `other`. The data's "
            "terms are those of the source files above; check them before sharing."
        )
    lines += ["", MARKER, ""]
    return f"---\n{front}\n---\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- export


def _check_out(store: Path, out: Path, force: bool) -> None:
    s, o = store.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise StoreError(f"--out {out}: must be outside the store {store} (and not hold it)")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise StoreError(f"--out {out}: exists; pass --force to replace it, or choose another")
    earlier = out.is_dir() and (
        not any(out.iterdir())
        or ((out / CARD).is_file() and MARKER in (out / CARD).read_text(errors="replace"))
    )
    if not earlier:
        raise StoreError(
            f"--out {out}: exists and is not an earlier hf export (no {CARD} written by "
            "pipeline.export); --force replaces only those: remove it yourself or choose another"
        )


def export(
    store: Path,
    out: Path,
    *,
    force: bool = False,
    file_format: str = "arrow",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write ``store`` (any kind) to ``out`` as a Hugging Face dataset; the lines to print."""
    store, out = Path(store), Path(out)
    if file_format not in FORMATS:
        raise StoreError(
            f"--format {file_format}: --to hf writes {' or '.join(FORMATS)} (default arrow)"
        )
    manifest = read_manifest(store)
    kind = manifest.get("kind")
    if kind not in EXPORTS:
        raise StoreError(f"{store}: a {kind!r} store; --to hf exports {', '.join(EXPORTS)}")
    _check_out(store, out, force)
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise StoreError(f"--to hf needs the `datasets` package: {INSTALL_HINT}") from None
    check_verifies(store)
    built = EXPORTS[kind](store, manifest)
    _check_names(built, store)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        spec = manifest.get("spec") or {}
        license_ = spec.get("license") if isinstance(spec.get("license"), str) else None

        def info(config: Config) -> Any:
            from datasets import DatasetInfo

            return DatasetInfo(
                description=f"{manifest.get('name')}: {config.name} ({config.what})",
                license=license_ or "other",
                features=_features(next(iter(config.splits.values()))),
            )

        if file_format == "arrow":
            files = _write_arrow(built, staging, info)
        else:
            files = _write_parquet(built, staging, shard_bytes)
        for src, rel in built.tokenizer:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staging / rel)
        spec_copy = store / SPEC_COPY
        spec_text = spec_copy.read_text(encoding="utf-8") if spec_copy.is_file() else None
        (staging / CARD).write_text(
            card_text(manifest, built, files, file_format, spec_text), encoding="utf-8"
        )
        if out.exists() or out.is_symlink():
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out)
            else:
                out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    split_counts = ", ".join(f"{s} {t.num_rows}" for s, t in built.configs[0].splits.items())
    lines = [
        f"exported {store} ({kind}) to {out} as a Hugging Face dataset ({file_format}): "
        f"{built.configs[0].name} {split_counts}",
    ]
    others = [c.name for c in built.configs[1:]]
    if file_format == "arrow":
        lines.append(
            f"open it with datasets.load_from_disk({str(out)!r})"
            + (f"; also {', '.join(others)} in subfolders" if others else "")
        )
    else:
        lines.append(
            f"open it with datasets.load_dataset({str(out)!r})"
            + (f"; configs also {', '.join(others)}" if others else "")
        )
    return lines
