"""``python -m pipeline.export STORE --to hf``: a store of every kind as a Hugging Face dataset.

The export is read back with ``datasets`` itself (``load_from_disk``, and ``load_dataset``
on the directory, the Parquet builder for ``--format parquet``) and held against the
store's own Arrow tables, column by column, with their types; the dataset card is read as
the hub reads it (YAML front matter). Errors go through the real command.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline.arrowio import column_to_numpy, read_ipc, read_manifest
from pipeline.interchange import hf_export
from pipeline.store import open_store
from pipeline.transitions.layout import PARTS_KEY, TRANSITIONS_ARROW
from tests.pipeline.conftest import (
    PYTHON,
    REPO,
    assert_one_error_line,
    build_store,
    run_cli,
    step_fields,
    step_record,
    write_lines,
    write_spec,
)

datasets = pytest.importorskip("datasets")


# --------------------------------------------------------------------------- stores


def _obs(ep: int, t: int) -> list[float]:
    # not exact in float16, so a narrowing cast changes the values
    return [0.1 * t + ep, -1.7 + 0.01 * t, 3.3e-3 * (ep + 1)]


def _transition_lines() -> list[dict[str, Any]]:
    """Terminated, truncated and cut-off episodes (the last loses its final step)."""
    lines = []
    for ep, (length, end) in enumerate([(3, "term"), (5, "trunc"), (4, "none"), (1, "term")]):
        for t in range(length):
            last = t == length - 1
            rec = step_record(
                f"ep{ep}",
                t,
                obs=_obs(ep, t),
                rew=0.25 * t - ep,
                bonus=0.5 * t,
                term=last and end == "term",
                trunc=last and end == "trunc",
            )
            if last and end == "trunc":
                rec["final_obs"] = _obs(ep, t + 1)
            lines.append(rec)
    return lines


@pytest.fixture(scope="module")
def transition_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same input as an arrow store, a zarr store and an arrow store in parts."""
    tmp = tmp_path_factory.mktemp("hf_transitions")
    data = write_lines(tmp / "raw" / "steps.jsonl", _transition_lines())
    fields = {**step_fields(), "rewards": {"bonus": {"path": "bonus"}}}
    stores = {}
    for variant, fmt in (("arrow", "arrow"), ("zarr", "zarr"), ("parted", "arrow")):
        spec = write_spec(tmp, [data], name=f"steps-{variant}", fields=fields, fmt=fmt)
        if variant == "parted":
            raw = yaml.safe_load(spec.read_text())
            raw["store"]["part_rows"] = 4
            spec.write_text(yaml.safe_dump(raw, sort_keys=False))
        stores[variant] = build_store(spec, tmp / "stores").path
    assert PARTS_KEY in read_manifest(stores["parted"])
    return stores


def _store_table(store: Path) -> pa.Table:
    """The arrow store's transitions as the builder wrote them."""
    m = read_manifest(store)
    if PARTS_KEY in m:
        return pa.concat_tables(read_ipc(store / p["file"]) for p in m[PARTS_KEY]["parts"])
    return read_ipc(store / TRANSITIONS_ARROW)


QA_RECORDS: dict[str, list[tuple[str, str, str, str | None]]] = {
    "train.jsonl": [
        ("t1", "The falcon lives in Marrowby near the old mill.", "Where?", "Marrowby"),
        ("t2", "A zephyr blows over the hills every morning.", "What blows?", "zephyr"),
        ("t3", "Code of the falcon is forty two and more.", "Code?", "forty two"),
        ("t4", "Nothing here at all, just words and words.", "Why?", None),
    ],
    "dev.jsonl": [
        ("d1", "The heron lives in Stillwater by the lake.", "Where?", "Stillwater"),
        ("d2", "Rain falls on the plain in the spring.", "When?", "spring"),
    ],
}


def _qa_line(eid: str, context: str, question: str, answer: str | None) -> dict[str, Any]:
    answers = [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}]
    return {"id": eid, "question": question, "context": context, "answers": answers}


@pytest.fixture(scope="module")
def segment_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QA store with a train and a dev split, several segments per question."""
    tmp = tmp_path_factory.mktemp("hf_segments")
    for name, recs in QA_RECORDS.items():
        write_lines(tmp / "raw" / name, [_qa_line(*r) for r in recs])
    spec = {
        "name": "qa",
        "kind": "segments",
        "source": {
            "paths": [str(tmp / "raw" / "*.jsonl")],
            "format": "jsonl",
            "splits": {"train": "train*", "dev": "dev*"},
        },
        "tokenizer": {"train": {"vocab_size": 300, "min_frequency": 1}},
        "segments": {"max_tokens": 6, "stride": 4, "max_question_tokens": 4},
        "store": {"format": "arrow"},
    }
    path = tmp / "qa.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return build_store(path, tmp / "stores").path


@pytest.fixture(scope="module")
def sequence_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agent store: episodes of policy and environment turns."""
    tmp = tmp_path_factory.mktemp("hf_sequences")
    episodes = [
        {
            "id": f"e{i}",
            "task": f"Go to cell {i}.",
            "success": i % 2 == 0,
            "turns": [
                {"role": "assistant", "content": f"<think>at {i}</think><action>go {i}</action>",
                 "reward": 0.5 * i},
                {"role": "env", "content": f"you are at {i + 1}", "reward": 0.0},
                {"role": "assistant", "content": "<action>stop</action>", "reward": 1.0},
            ][: 1 + i % 3],
        }
        for i in range(5)
    ]  # fmt: skip
    write_lines(tmp / "raw" / "eps.jsonl", episodes)
    spec = {
        "name": "agent",
        "kind": "sequences",
        "source": {
            "paths": [str(tmp / "raw" / "eps.jsonl")],
            "layout": "episode_per_line",
            "episode_key": "id",
        },
        "fields": {
            "prompt": {"path": "task"},
            "role": {"path": "role"},
            "policy_roles": ["assistant"],
            "content": {"path": "content"},
            "spans": {
                "reasoning": {"pattern": "<think>(.*?)</think>"},
                "action": {"pattern": "<action>(.*?)</action>"},
            },
            "reward": {"path": "reward"},
            "outcome": {"path": "success"},
        },
        "tokenizer": {"train": {"vocab_size": 300}},
        "sequences": {"max_tokens": 512},
    }
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return build_store(path, tmp / "stores").path


# --------------------------------------------------------------------------- helpers


def front_matter(out: Path) -> dict[str, Any]:
    text = (out / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def assert_same_table(got: pa.Table, want: pa.Table) -> None:
    """Column by column: the same names, Arrow types and values."""
    assert got.column_names == want.column_names
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        g, w = got.column(name).combine_chunks(), want.column(name).combine_chunks()
        assert g.type == w.type, (name, g.type, w.type)
        assert g.equals(w), name


def table_of(ds: Any) -> pa.Table:
    """A ``datasets.Dataset``'s rows as one Arrow table (its schema metadata dropped)."""
    return ds.data.table.replace_schema_metadata(None)


def load_dir(out: Path, cache: Path, name: str | None = None) -> Any:
    """``datasets.load_dataset`` on an export directory, locally, into ``cache``."""
    return datasets.load_dataset(str(out), name, cache_dir=str(cache))


def export(store: Path, out: Path, **options: Any) -> list[str]:
    return hf_export.export(store, out, **options)


# --------------------------------------------------------------------------- transitions


@pytest.mark.parametrize("variant", ["arrow", "zarr", "parted"])
def test_transitions_load_from_disk_equal_to_the_store(
    transition_stores: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    store = transition_stores[variant]
    out = tmp_path / "hf"
    lines = export(store, out)
    assert str(out) in lines[0]
    manifest = read_manifest(store)
    n = manifest["counts"]["transitions"]

    dd = datasets.load_from_disk(str(out))
    assert isinstance(dd, datasets.DatasetDict)
    assert list(dd) == ["train"]
    ds = dd["train"]
    assert ds.num_rows == n
    # the arrow store's table, the same for the zarr store (same input, same content hash)
    want = _store_table(transition_stores["arrow"])
    assert_same_table(table_of(ds), want)
    assert manifest["content_hash"] == read_manifest(transition_stores["arrow"])["content_hash"]

    # precise features: fixed-size float32 vectors, int64 actions, bools
    f = ds.features
    obs_dim = manifest["observation_space"]["dim"]
    for col in ("observation", "next_observation"):
        assert f[col].length == obs_dim
        assert f[col].feature.dtype == "float32"
    assert f["action"].dtype == "int64"
    assert f["terminated"].dtype == f["truncated"].dtype == "bool"
    assert f["reward"].dtype == f["return_to_go"].dtype == f["reward_bonus"].dtype == "float32"
    assert f["step"].dtype == "int32"
    assert f["episode_id"].dtype == "string"

    # array by array, as NumPy: the store's reader against the dataset's
    s = open_store(store)
    got_table = table_of(ds)
    for col, arr in (
        ("observation", s.observations),
        ("next_observation", s.next_observations),
        ("action", s.actions),
        ("reward", s.rewards),
        ("return_to_go", s.return_to_go),
        ("terminated", s.terminated),
        ("truncated", s.truncated),
        ("step", s.steps),
        ("reward_bonus", s.reward_columns["bonus"]),
    ):
        got = column_to_numpy(got_table.column(col))
        want_arr = np.asarray(arr)
        assert got.dtype == want_arr.dtype, col
        assert np.array_equal(got, want_arr), col
    assert list(ds["episode_id"]) == list(s.episode_id)

    # the episodes, a second config in its folder
    episodes = datasets.load_from_disk(str(out / "episodes"))
    assert list(episodes) == ["train"]
    assert_same_table(table_of(episodes["train"]), s.episode_table())


def test_card_names_hash_sources_license_and_sizes(
    transition_stores: dict[str, Path], tmp_path: Path
) -> None:
    store = transition_stores["arrow"]
    out = tmp_path / "hf"
    export(store, out)
    manifest = read_manifest(store)
    text = (out / "README.md").read_text(encoding="utf-8")
    meta = front_matter(out)

    assert meta["license"] == "other"  # the spec declares none ...
    assert "declares no license" in text  # ... and the card says so
    assert "reinforcement-learning" in meta["task_categories"]
    assert manifest["content_hash"] in text
    for src in manifest["sources"]:
        assert src["sha256"] in text
    assert "builder " + manifest["versions"]["builder"] in text
    assert "```yaml\nname: steps-arrow\n" in text  # the spec, as written
    infos = {i["config_name"]: i for i in meta["dataset_info"]}
    split = infos["transitions"]["splits"][0]
    assert (split["name"], split["num_examples"]) == ("train", manifest["counts"]["transitions"])
    feats = {f["name"]: f for f in infos["transitions"]["features"]}
    assert feats["observation"] == {"name": "observation", "list": "float32", "length": 3}
    configs = {c["config_name"]: c for c in meta["configs"]}
    assert configs["transitions"]["default"] is True
    # the counts and per-feature statistics of the manifest
    assert f"| transitions | {manifest['counts']['transitions']} |" in text
    assert f"| records_quarantined | {manifest['counts']['records_quarantined']} |" in text
    obs = manifest["statistics"]["observation"]
    label = manifest["observation_space"]["labels"][0]
    assert f"| {label} | {obs['mean'][0]:.6g} | {obs['std'][0]:.6g} |" in text


def test_card_takes_the_license_of_a_spec_that_has_one(
    transition_stores: dict[str, Path],
) -> None:
    store = transition_stores["arrow"]
    manifest = read_manifest(store)
    manifest["spec"] = {**manifest["spec"], "license": "cc-by-4.0"}
    built = hf_export.EXPORTS["transitions"](store, manifest)
    files = {c.name: [{"split": "train", "path": "x"}] for c in built.configs}
    text = hf_export.card_text(manifest, built, files, "arrow", None)
    assert yaml.safe_load(text.split("\n---\n", 1)[0][4:])["license"] == "cc-by-4.0"
    assert "declares no license" not in text


# --------------------------------------------------------------------------- parquet


def test_parquet_shards_load_dataset_gives_the_same_rows(
    transition_stores: dict[str, Path], tmp_path: Path
) -> None:
    store = transition_stores["arrow"]
    out = tmp_path / "hf"
    export(store, out, file_format="parquet", shard_bytes=300)
    shards = sorted(p.name for p in (out / "data").iterdir())
    n = len(shards)
    assert n > 1, shards  # several shards of a bounded size
    assert shards == [f"train-{k:05d}-of-{n:05d}.parquet" for k in range(n)]
    assert not (out / "dataset_dict.json").exists()
    meta = front_matter(out)
    configs = {c["config_name"]: c for c in meta["configs"]}
    assert configs["transitions"]["data_files"] == [
        {"split": "train", "path": "data/train-*.parquet"}
    ]

    dd = load_dir(out, tmp_path / "cache")
    assert list(dd) == ["train"]
    want = _store_table(store)
    assert_same_table(table_of(dd["train"]), want)
    assert dd["train"].features == datasets.Features.from_arrow_schema(want.schema)

    episodes = load_dir(out, tmp_path / "cache", "episodes")
    assert_same_table(table_of(episodes["train"]), open_store(store).episode_table())


def test_arrow_export_also_opens_with_load_dataset(
    transition_stores: dict[str, Path], tmp_path: Path
) -> None:
    store = transition_stores["arrow"]
    out = tmp_path / "hf"
    export(store, out)
    dd = load_dir(out, tmp_path / "cache")
    assert_same_table(table_of(dd["train"]), _store_table(store))


@pytest.mark.parametrize(
    ("rows", "nbytes", "cap"),
    [(0, 0, 10), (1, 50, 10), (10, 100, 30), (10, 100, 35), (7, 70, 1000), (5, 99, 1)],
)
def test_shards_tile_the_rows_each_under_the_cap(rows: int, nbytes: int, cap: int) -> None:
    ranges = hf_export.shard_ranges(rows, nbytes, cap)
    assert sum(n for _, n in ranges) == rows
    assert [s for s, _ in ranges] == [sum(n for _, n in ranges[:k]) for k in range(len(ranges))]
    assert len({n for _, n in ranges[:-1]}) <= 1  # equal shards, the last may be shorter
    if rows:
        assert all(n > 0 for _, n in ranges)
        per_row = nbytes / rows
        assert all(n * per_row <= cap or n == 1 for _, n in ranges)


# --------------------------------------------------------------------------- other kinds


@pytest.mark.parametrize("file_format", ["arrow", "parquet"])
def test_segment_store_exports_its_splits(
    segment_store: Path, tmp_path: Path, file_format: str
) -> None:
    out = tmp_path / "hf"
    export(segment_store, out, file_format=file_format)
    manifest = read_manifest(segment_store)
    counts = manifest["counts"]
    examples = read_ipc(segment_store / "examples.arrow")
    segments = read_ipc(segment_store / "segments.arrow")
    split_of_example = np.asarray(examples.column("split").to_pylist())
    split_of_segment = split_of_example[segments.column("example_index").to_numpy()]

    def load(name: str | None) -> Any:
        if file_format == "arrow":
            return datasets.load_from_disk(str(out / name) if name else str(out))
        return load_dir(out, tmp_path / "cache", name)

    seg = load(None)
    ex = load("examples")
    docs = load("documents")
    assert list(seg) == list(ex) == ["train", "dev"]  # the spec's order
    assert {s: ex[s].num_rows for s in ex} == counts["examples_per_split"]
    assert sum(seg[s].num_rows for s in seg) == counts["segments"]
    for s in ("train", "dev"):
        assert_same_table(table_of(seg[s]), segments.filter(pa.array(split_of_segment == s)))
        assert_same_table(table_of(ex[s]), examples.filter(pa.array(split_of_example == s)))
    assert list(docs) == ["train"]
    assert docs["train"].num_rows == counts["documents"]
    assert_same_table(table_of(docs["train"]), read_ipc(segment_store / "documents.arrow"))
    tok = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert tok == (segment_store / "tokenizer.json").read_bytes()

    meta = front_matter(out)
    infos = {i["config_name"]: i for i in meta["dataset_info"]}
    assert {s["name"]: s["num_examples"] for s in infos["examples"]["splits"]} == counts[
        "examples_per_split"
    ]
    assert meta["task_categories"] == ["question-answering"]


@pytest.mark.parametrize("file_format", ["arrow", "parquet"])
def test_sequence_store_exports_its_table(
    sequence_store: Path, tmp_path: Path, file_format: str
) -> None:
    out = tmp_path / "hf"
    export(sequence_store, out, file_format=file_format)
    counts = read_manifest(sequence_store)["counts"]
    if file_format == "arrow":
        seq = datasets.load_from_disk(str(out))
        turns = datasets.load_from_disk(str(out / "turns"))
    else:
        seq = load_dir(out, tmp_path / "cache")
        turns = load_dir(out, tmp_path / "cache", "turns")
    assert list(seq) == list(turns) == ["train"]
    assert seq["train"].num_rows == counts["episodes"]
    assert turns["train"].num_rows == counts["turns"]
    assert_same_table(table_of(seq["train"]), read_ipc(sequence_store / "sequences.arrow"))
    assert_same_table(table_of(turns["train"]), read_ipc(sequence_store / "turns.arrow"))
    assert seq["train"].features["labels"].feature.dtype == "int8"
    for f in (sequence_store / "tokenizer").iterdir():
        assert (out / "tokenizer" / f.name).read_bytes() == f.read_bytes()


# --------------------------------------------------------------------------- errors


def test_cli_errors_are_one_line(transition_stores: dict[str, Path], tmp_path: Path) -> None:
    store = transition_stores["arrow"]
    out = tmp_path / "hf"

    export(store, out)
    card = (out / "README.md").read_bytes()

    # an existing --out without --force
    proc = run_cli("pipeline.export", store, "--to", "hf", "--out", out)
    assert_one_error_line(proc, str(out), "--force")
    # an unknown --format
    proc = run_cli(
        "pipeline.export", store, "--to", "hf", "--out", tmp_path / "x", "--format", "csv"
    )
    assert_one_error_line(proc, "--format csv", "parquet")
    # --force replaces an earlier export, but never another directory
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    proc = run_cli("pipeline.export", store, "--to", "hf", "--out", other, "--force")
    assert_one_error_line(proc, str(other), "not an earlier hf export")
    assert (other / "notes.txt").read_text() == "keep me"
    # a store that does not verify
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    with (broken / "quarantine.jsonl").open("a") as f:
        f.write(json.dumps({"file": "x", "line": 1}) + "\n")
    proc = run_cli("pipeline.export", broken, "--to", "hf", "--out", out, "--force")
    assert_one_error_line(proc, str(broken), "does not verify")
    assert (out / "README.md").read_bytes() == card  # the earlier export is untouched
    # not a store
    proc = run_cli("pipeline.export", tmp_path / "nowhere", "--to", "hf", "--out", tmp_path / "y")
    assert_one_error_line(proc, "not a store")
    assert not (tmp_path / "y").exists()

    # --force over an earlier export replaces it; no staging folder is left behind
    (out / "stale.txt").write_text("from before")
    proc = run_cli(
        "pipeline.export", store, "--to", "hf", "--out", out, "--force", "--format", "parquet"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "load_dataset" in proc.stdout
    assert (out / "data").is_dir()
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_without_datasets_says_which_extra_installs_it(
    transition_stores: dict[str, Path], tmp_path: Path
) -> None:
    import subprocess

    code = (
        "import runpy, sys; sys.modules['datasets'] = None; "
        "sys.argv = ['pipeline.export', *sys.argv[1:]]; "
        "runpy.run_module('pipeline.export', run_name='__main__')"
    )
    proc = subprocess.run(
        [
            PYTHON,
            "-c",
            code,
            str(transition_stores["arrow"]),
            "--to",
            "hf",
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert_one_error_line(proc, "datasets", ".[hf]")
    assert not (tmp_path / "o").exists()


def test_split_names_datasets_cannot_hold_are_refused() -> None:
    t = pa.table({"x": [1]})
    bad = hf_export.Export("segments", [hf_export.Config("segments", "", {"dev-2": t}, {})], [])
    with pytest.raises(hf_export.StoreError, match="dev-2"):
        hf_export._check_names(bad, Path("s"))
    clash = hf_export.Export(
        "segments",
        [
            hf_export.Config("segments", "", {"examples": t}, {}),
            hf_export.Config("examples", "", {"train": t}, {}),
        ],
        [],
    )
    with pytest.raises(hf_export.StoreError, match="examples"):
        hf_export._check_names(clash, Path("s"))
    assert re.match(hf_export._SPLIT_RE, "train")
