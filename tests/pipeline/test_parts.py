"""Transition stores in parts (spec ``store.part_rows``): the spec key, the layout of the
parts, a content hash that does not depend on them, the reader that presents them as one
table (:class:`PartedColumn` held against plain NumPy indexing of the concatenated
column), other readers of the part files, and verify on damaged parts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from data_specs.schema import AUTO_PART_ROWS, SpecError, StoreSpec, parse_transition_spec
from pipeline.arrowio import file_digest, write_arrow_table
from pipeline.format import MANIFEST, QUARANTINE, StoreError
from pipeline.inspect import describe
from pipeline.store import PartedColumn, TransitionStore, open_store
from pipeline.transitions.layout import PARTS_KEY, TRANSITION_PARTS, TRANSITIONS_ARROW, part_file
from pipeline.transitions.verify import column_digests
from pipeline.transitions.writer import combine_digests, episodes_digest
from pipeline.verify import verify

from .conftest import (
    SPILL,
    Episode,
    Layout,
    assert_one_error_line,
    build_store,
    episode_sets,
    run_cli,
    write_episodes,
    write_lines,
    write_spec,
)
from .test_reward_columns import base_spec, with_rewards, write_case, write_with_named
from .test_store_reader import address, mapped_ranges

NUMERIC = ("observations", "actions", "rewards", "next_observations", "return_to_go", "steps")
COLUMNS = (*NUMERIC, "terminated", "truncated", "episode_id")


def parted_spec(directory: Path, paths: list[Any], part_rows: Any, **kw: Any) -> Path:
    return write_spec(
        directory,
        paths,
        store={"format": "arrow", "discount": 0.99, "part_rows": part_rows},
        **kw,
    )


def assert_same_table(one: TransitionStore, parted: TransitionStore) -> None:
    """Every column, the episodes and the content hash of two stores of the same input."""
    assert parted.content_hash == one.content_hash
    assert parted.manifest["column_digests"] == one.manifest["column_digests"]
    assert len(parted) == len(one)
    for name in COLUMNS:
        a, b = getattr(one, name), getattr(parted, name)
        assert b.shape == a.shape and b.dtype == a.dtype, name
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=name)
    for name, col in one.reward_columns.items():
        np.testing.assert_array_equal(np.asarray(parted.reward_columns[name]), col)
    assert parted.episode_table().equals(one.episode_table())


def assert_parts_layout(store: TransitionStore, part_rows: int) -> None:
    """The manifest's parts: every part_rows rows, each file ONE record batch with the
    schema of transitions.arrow, digests in data_files, no transitions.arrow."""
    m = store.manifest
    n = len(store)
    assert m[PARTS_KEY]["part_rows"] == part_rows
    parts = m[PARTS_KEY]["parts"]
    sizes = [min(part_rows, n - a) for a in range(0, n, part_rows)]
    assert [p["rows"] for p in parts] == sizes
    assert [p["file"] for p in parts] == [part_file(k) for k in range(len(sizes))]
    assert sorted(f.name for f in (store.path / TRANSITION_PARTS).iterdir()) == [
        Path(p["file"]).name for p in parts
    ]
    assert not (store.path / TRANSITIONS_ARROW).exists()
    assert TRANSITIONS_ARROW not in m["data_files"]
    schemas = set()
    for p in parts:
        path = store.path / p["file"]
        assert m["data_files"][p["file"]]["sha256"] == file_digest(path)
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            batches = list(reader)
        assert len(batches) == 1 and batches[0].num_rows == p["rows"]
        schemas.add(reader.schema)
    assert len(schemas) == 1
    np.testing.assert_array_equal(store.part_starts, np.cumsum([0, *sizes]))


# --------------------------------------------------------------------------- spec


def spec_with(**store: Any) -> dict[str, Any]:
    return {**base_spec(), "store": {"format": "arrow", **store}}


@pytest.mark.parametrize(
    ("store", "needles"),
    [
        ({"part_rows": 0}, ["store.part_rows", "integer >= 1", "`auto`", "got 0"]),
        ({"part_rows": -3}, ["store.part_rows", "got -3"]),
        ({"part_rows": 2.5}, ["store.part_rows", "got 2.5"]),
        ({"part_rows": True}, ["store.part_rows", "got True"]),
        ({"part_rows": "big"}, ["store.part_rows", "got 'big'"]),
        ({"part_rows": 10, "format": "zarr"}, ["store.part_rows", "arrow` only", "'zarr'"]),
        ({"part_rows": "auto", "format": "zarr"}, ["store.part_rows", "arrow` only"]),
    ],
)
def test_bad_part_rows_are_one_line_errors(store: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(SpecError) as e:
        parse_transition_spec(spec_with(**store), "s.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("s.yaml: store.part_rows: ")
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_part_rows_default_leaves_the_spec_and_its_hash_as_they_were() -> None:
    plain = parse_transition_spec(spec_with())
    assert plain.store.part_rows is None
    assert "part_rows" not in plain.to_dict()["store"]  # so every existing spec hash holds
    parted = parse_transition_spec(spec_with(part_rows=100))
    assert parted.to_dict()["store"]["part_rows"] == 100
    assert parted.sha256() != plain.sha256()  # a parted store is another store of the spec
    assert parse_transition_spec(spec_with(part_rows="auto")).store.part_rows == "auto"


def test_rows_per_part() -> None:
    assert StoreSpec().rows_per_part(10**9) is None  # the default: one file, any size
    assert StoreSpec(part_rows=7).rows_per_part(3) == 7
    auto = StoreSpec(part_rows="auto")
    assert auto.rows_per_part(AUTO_PART_ROWS) is None
    assert auto.rows_per_part(AUTO_PART_ROWS + 1) == AUTO_PART_ROWS


def test_build_cli_refuses_bad_part_rows(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "a.jsonl", [])
    spec = parted_spec(tmp_path, [raw], 0)
    assert_one_error_line(run_cli("pipeline.build", spec, "--out", tmp_path), "store.part_rows")


# --------------------------------------------------------------------------- build


# lengths 1..9, every end: part_rows 4 cuts some episodes in three parts
EPISODES = [
    Episode(
        f"ep{i}",
        tuple((float(i), float(t), t / 8) for t in range(n)),
        tuple((i + t) % 4 for t in range(n)),
        tuple((t - i) / 4 for t in range(n)),
        end,  # type: ignore[arg-type]
        (9.0, 9.0, float(i)) if i % 2 else None,
    )
    for i, (n, end) in enumerate(
        zip([9, 1, 6, 2, 7, 5, 3, 8], ["terminated", "truncated", "none", "both"] * 2)
    )
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, TransitionStore]:
    """One input built as one file, and in parts of 1, 4 (shorter than most episodes, not
    a divisor of the rows), 10, exactly the rows, and more than the rows."""
    d = tmp_path_factory.mktemp("parts")
    written = write_with_named(write_episodes(d / "raw", EPISODES, "episode_per_line"))
    fields = with_rewards()
    kw: dict[str, Any] = {"layout": "episode_per_line", "fields": fields}
    one = open_store(build_store(write_spec(d, [written.glob], name="one", **kw), d / "out").path)
    n = len(one)
    assert n % 4 and n % 10
    out: dict[Any, TransitionStore] = {None: one}
    for rows in (1, 4, 10, n, n + 5):
        spec = parted_spec(d, [written.glob], rows, name=f"p{rows}", **kw)
        out[rows] = open_store(build_store(spec, d / "out").path)  # verifies too
    return out


@pytest.mark.parametrize("rows", [1, 4, 10, "n", "n+5"])
def test_parts_hold_the_same_table_and_content_hash(
    stores: dict[Any, TransitionStore], rows: Any
) -> None:
    one = stores[None]
    n = len(one)
    part_rows = {"n": n, "n+5": n + 5}.get(rows, rows)
    parted = stores[part_rows]
    assert_parts_layout(parted, part_rows)
    assert_same_table(one, parted)
    assert PARTS_KEY not in one.manifest and one.part_starts is None
    if part_rows == 4:  # episode 0's rows 0..8 run over parts 0, 1 and 2
        assert one.episodes.length[0] == 9
        starts = parted.part_starts
        assert starts is not None
        np.testing.assert_array_equal(np.searchsorted(starts, [0, 8], side="right") - 1, [0, 2])


def test_a_parted_column_is_made_of_views_of_the_mapped_parts(
    stores: dict[Any, TransitionStore],
) -> None:
    parted = stores[4]
    for name in NUMERIC:
        col = getattr(parted, name)
        assert isinstance(col, PartedColumn), name
        for k, view in enumerate(col.parts):
            assert not view.flags.writeable and view.flags.c_contiguous
            ranges = mapped_ranges(parted.path / part_file(k))
            lo = address(view)
            assert any(s <= lo and lo + view.nbytes <= e for s, e, _ in ranges), (name, k)
    assert isinstance(parted.reward_columns["shaped"], PartedColumn)
    assert isinstance(parted.terminated, np.ndarray)  # bits unpacked: one array, as one file's
    # a store of one part hands out plain arrays: that part's buffers
    single = stores[len(stores[None]) + 5]
    assert isinstance(single.observations, np.ndarray)
    assert not single.observations.flags.writeable


def test_as_tensors_and_slices_of_a_parted_store(stores: dict[Any, TransitionStore]) -> None:
    one, parted = stores[None], stores[4]
    a, b = one.as_tensors(), parted.as_tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert bool((a[k] == b[k]).all()), k
    for start, stop in ((0, 3), (3, 9), (2, 30), (0, len(one))):
        for name in ("observation", "action", "reward", "terminated", "reward_bonus"):
            np.testing.assert_array_equal(
                parted.column_slice(name, start, stop), one.column_slice(name, start, stop)
            )
        assert parted.episode_id_slice(start, stop).equals(one.episode_id_slice(start, stop))


def test_inspect_reads_a_parted_store(stores: dict[Any, TransitionStore]) -> None:
    one, parted = describe(stores[None].path).splitlines(), describe(stores[4].path).splitlines()
    n = len(stores[None])
    assert parted[5] == f"  in {-(-n // 4)} parts of up to 4 rows (transitions/part-NNNNN.arrow)"
    assert one[2:] == parted[2:5] + parted[6:]  # the rest but the path and name lines
    proc = run_cli("pipeline.verify", stores[4].path)
    assert proc.returncode == 0 and proc.stdout.startswith("OK "), proc.stderr


@given(
    episodes=episode_sets(max_episodes=5, max_len=7),
    layout=st.sampled_from(["step_per_line", "episode_per_line"]),
    part_rows=st.integers(1, 12),
    spill=st.booleans(),
    data=st.data(),
)
@settings(max_examples=10, deadline=None)
def test_any_part_rows_gives_the_same_store(
    tmp_path_factory: pytest.TempPathFactory,
    episodes: list[Episode],
    layout: Layout,
    part_rows: int,
    spill: bool,
    data: st.DataObject,
) -> None:
    episodes = [*episodes, dataclasses.replace(episodes[0], episode_id="kept", end="terminated")]
    d = tmp_path_factory.mktemp("parts-any")
    written = write_case(d / "raw", episodes, layout, data)
    sizes = SPILL if spill and layout == "step_per_line" else {}
    kw: dict[str, Any] = {"layout": layout, "fields": with_rewards()}
    one = open_store(
        build_store(write_spec(d, [written.glob], name="one", **kw), d / "out", **sizes).path
    )
    spec = parted_spec(d, [written.glob], part_rows, name="parted", **kw)
    parted = open_store(build_store(spec, d / "out", **sizes).path)
    assert_parts_layout(parted, part_rows)
    assert_same_table(one, parted)


def test_auto_writes_parts_only_above_the_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data_specs.schema as schema

    written = write_episodes(tmp_path / "raw", EPISODES, "episode_per_line")
    kw: dict[str, Any] = {"layout": "episode_per_line"}
    small = build_store(parted_spec(tmp_path, [written.glob], "auto", name="a", **kw), tmp_path)
    assert PARTS_KEY not in small.manifest and (small.path / TRANSITIONS_ARROW).exists()
    monkeypatch.setattr(schema, "AUTO_PART_ROWS", 8)  # the store has more rows than that
    big = build_store(parted_spec(tmp_path, [written.glob], "auto", name="b", **kw), tmp_path)
    assert_parts_layout(open_store(big.path), 8)
    assert big.manifest["content_hash"] == small.manifest["content_hash"]


# --------------------------------------------------------------------------- PartedColumn


@st.composite
def parted_columns(draw: st.DrawFn) -> tuple[PartedColumn, np.ndarray]:
    """A PartedColumn of random part sizes (empty parts too) and its concatenation."""
    sizes = draw(st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda s: sum(s)))
    width = draw(st.sampled_from([None, 1, 3]))
    dtype = draw(st.sampled_from([np.float32, np.int64, np.int32]))
    whole = np.arange(sum(sizes) * (width or 1), dtype=dtype).reshape(
        (sum(sizes),) if width is None else (sum(sizes), width)
    )
    whole = whole * 3 + 1  # no value equals its row
    cuts = np.cumsum([0, *sizes])
    parts = [whole[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    return PartedColumn(parts), whole


@given(col=parted_columns(), data=st.data())
@settings(max_examples=300, deadline=None)
def test_parted_gather_matches_indexing_the_concatenated_column(
    col: tuple[PartedColumn, np.ndarray], data: st.DataObject
) -> None:
    parted, whole = col
    n = len(whole)
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=12))
    rows = data.draw(hnp.arrays(np.int64, shape, elements=st.integers(-n, n - 1)))
    if data.draw(st.booleans()):
        rows = np.sort(rows, axis=None)  # rows in part order: gathered in place
    got = parted[rows]
    assert got.dtype == whole.dtype and got.shape == whole[rows].shape
    np.testing.assert_array_equal(got, whole[rows])
    # and against one plain loop, row by row
    flat = rows.reshape(-1)
    loop = np.array([whole[int(r)] for r in flat]).reshape(whole[rows].shape)
    np.testing.assert_array_equal(got, loop)
    mask = data.draw(hnp.arrays(np.bool_, n))
    np.testing.assert_array_equal(parted[mask], whole[mask])
    start, stop = sorted(data.draw(st.tuples(st.integers(-n - 2, n + 2), st.integers(-n, n + 2))))
    step = data.draw(st.sampled_from([None, 1, 2, -1, 3]))
    np.testing.assert_array_equal(parted[start:stop:step], whole[start:stop:step])
    i = data.draw(st.integers(-n, n - 1))
    np.testing.assert_array_equal(parted[i], whole[i])
    if whole.ndim == 2:
        np.testing.assert_array_equal(parted[rows, 0], whole[rows, 0])
        np.testing.assert_array_equal(parted[i, -1], whole[i, -1])
        np.testing.assert_array_equal(parted[start:stop, 1:], whole[start:stop, 1:])


def test_parted_column_as_an_array() -> None:
    whole = np.arange(24, dtype=np.float32).reshape(8, 3)
    col = PartedColumn([whole[:3], whole[3:3], whole[3:7], whole[7:]])
    assert (len(col), col.shape, col.ndim, col.dtype, col.size) == (8, (8, 3), 2, whole.dtype, 24)
    assert col.nbytes == whole.nbytes
    np.testing.assert_array_equal(np.asarray(col), whole)
    np.testing.assert_array_equal(col.astype(np.float64), whole.astype(np.float64))
    assert col.astype(np.float64).dtype == np.float64
    assert col.max() == whole.max() and col.min() == whole.min()
    assert col.tolist() == whole.tolist()
    np.testing.assert_array_equal(np.stack(list(col)), whole)
    assert np.shares_memory(col[3:6], whole)  # within one part: a view
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(col, copy=False)
    for bad in (8, -9, np.array([0, 8]), np.array([-9])):
        with pytest.raises(IndexError, match="out of bounds"):
            col[bad]
        with pytest.raises(IndexError):
            whole[bad]  # as NumPy says
    with pytest.raises(IndexError, match="integer"):
        col[np.array([0.5])]
    with pytest.raises(IndexError, match="boolean index"):
        col[np.ones(3, dtype=bool)]
    with pytest.raises(ValueError, match="same dtype and shape"):
        PartedColumn([whole, whole[:, :2]])
    assert col[np.array([], dtype=np.int64)].shape == (0, 3)
    assert col[[]].shape == (0, 3)


# --------------------------------------------------------------------------- other readers


def test_pyarrow_polars_and_datasets_read_the_parts(stores: dict[Any, TransitionStore]) -> None:
    import datasets
    import polars as pl

    one, parted = stores[None], stores[4]
    paths = sorted((parted.path / TRANSITION_PARTS).glob("*.arrow"))
    assert [str(p.relative_to(parted.path)) for p in paths] == [
        q["file"] for q in parted.manifest[PARTS_KEY]["parts"]
    ]  # the files sort in row order
    whole = pa.ipc.open_stream((one.path / TRANSITIONS_ARROW).read_bytes()).read_all()
    tables = [pa.ipc.open_stream(p.read_bytes()).read_all() for p in paths]
    assert pa.concat_tables(tables).equals(whole)

    # polars: each part with read_ipc_stream (scan_ipc reads the IPC *file* format only)
    frame = pl.concat([pl.read_ipc_stream(p) for p in paths])
    assert frame.equals(pl.read_ipc_stream(one.path / TRANSITIONS_ARROW))
    # ... or lazily, over parts converted to the file format
    converted = []
    for p, t in zip(paths, tables):
        out = p.parent.parent.parent / f"ipc-file-{p.name}"
        with pa.OSFile(str(out), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
            w.write_table(t)
        converted.append(out)
    lazy = pl.scan_ipc(converted).select("episode_id", "reward").collect()
    assert lazy.equals(frame.select("episode_id", "reward"))

    # datasets: Dataset.from_file per part (it reads the stream format), then concatenated
    ds = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in paths])
    assert ds.num_rows == len(one)
    assert ds["episode_id"][:] == list(one.episode_id)
    np.testing.assert_array_equal(np.asarray(ds["observation"][:], np.float32), one.observations)
    np.testing.assert_array_equal(
        np.asarray(ds["reward_shaped"][:], np.float32), one.reward_columns["shaped"]
    )


# --------------------------------------------------------------------------- verify


def make_parted(d: Path, part_rows: int = 4) -> Path:
    written = write_episodes(d / "raw", EPISODES, "episode_per_line")
    spec = parted_spec(d, [written.glob], part_rows, layout="episode_per_line")
    return build_store(spec, d / "out").path


def read_part(store: Path, k: int) -> pa.Table:
    return pa.ipc.open_stream((store / part_file(k)).read_bytes()).read_all()


def rewrite_part(store: Path, k: int, table: pa.Table) -> None:
    """Replace part ``k`` and make every checksum of the manifest agree with it, so that
    only the checks of the parts themselves and of the rows can tell."""
    write_arrow_table(table.combine_chunks(), store / part_file(k))
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    path = store / part_file(k)
    m["data_files"][part_file(k)] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    try:
        reopened = TransitionStore(store)
    except StoreError:
        return  # the store does not open: its digests cannot be recomputed
    digests = column_digests(reopened)
    m["column_digests"] = digests
    episodes = pa.ipc.open_stream((store / "episodes.arrow").read_bytes()).read_all()
    m["content_hash"] = combine_digests(
        digests, episodes_digest(episodes), file_digest(store / QUARANTINE)
    )
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")


def one_problem(store: Path, *needles: str) -> str:
    problems = verify(store)
    assert len(problems) == 1, problems
    for needle in needles:
        assert needle in problems[0], (needle, problems[0])
    assert_one_error_line(run_cli("pipeline.verify", store), *needles)
    return problems[0]


def test_a_truncated_part_is_named(tmp_path: Path) -> None:
    store = make_parted(tmp_path)
    path = store / part_file(2)
    path.write_bytes(path.read_bytes()[:-100])
    one_problem(store, part_file(2), "truncated")


def test_a_missing_part_is_named(tmp_path: Path) -> None:
    store = make_parted(tmp_path)
    (store / part_file(3)).unlink()
    one_problem(store, part_file(3), "missing")
    with pytest.raises(StoreError, match="part-00003.arrow: missing"):
        open_store(store)


def test_a_flipped_byte_in_a_part_is_named(tmp_path: Path) -> None:
    store = make_parted(tmp_path)
    path = store / part_file(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    one_problem(store, part_file(1), "sha256 differs")


def test_a_part_the_manifest_does_not_list_is_named(tmp_path: Path) -> None:
    store = make_parted(tmp_path)
    stray = store / TRANSITION_PARTS / "part-00099.arrow"
    stray.write_bytes((store / part_file(0)).read_bytes())
    one_problem(store, "part-00099.arrow", "does not list")


def test_a_part_of_other_rows_is_named(tmp_path: Path) -> None:
    store = make_parted(tmp_path)
    rewrite_part(store, 2, read_part(store, 2).slice(0, 3))  # 3 rows, the manifest says 4
    one_problem(store, part_file(2), "3 rows, manifest says 4")
    with pytest.raises(StoreError, match=r"part-00002.arrow: 3 rows, manifest says 4"):
        open_store(store)


def test_a_part_of_another_schema_is_named(tmp_path: Path) -> None:
    store = make_parted(tmp_path)
    t = read_part(store, 1)
    i = t.schema.get_field_index("reward")
    rewrite_part(store, 1, t.set_column(i, "reward", t.column("reward").cast(pa.float64())))
    one_problem(store, part_file(1), "schema is not the store's: reward: double, expected float")


def test_a_part_of_two_batches_is_named(tmp_path: Path) -> None:
    store = make_parted(tmp_path)
    t = read_part(store, 0)
    path = store / part_file(0)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        w.write_table(t, max_chunksize=2)
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    m["data_files"][part_file(0)] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    one_problem(store, part_file(0), "2 record batches")


@pytest.mark.parametrize("check_rows", [3, 4, 1 << 20])
def test_rows_are_checked_across_the_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check_rows: int
) -> None:
    """Episode 0 (9 rows) runs over parts 0, 1 and 2: a next_observation on the last row of
    part 0 that is not the first observation of part 1 is found, with checks passing over
    the parts' boundaries in any alignment; so is a step at a part's first row."""
    import pipeline.transitions.verify as transitions_verify

    monkeypatch.setattr(transitions_verify, "CHECK_ROWS", check_rows)
    store = make_parted(tmp_path)
    assert verify(store) == []
    t = read_part(store, 0)
    values = t.column("next_observation").to_pylist()
    values[3] = [0.0, 0.0, 0.0]
    i = t.schema.get_field_index("next_observation")
    rewrite_part(
        store, 0, t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))
    )
    one_problem(store, "next_observation differs", "first row 3 in episode 'ep0'")

    store = make_parted(tmp_path / "b")
    t = read_part(store, 1)
    i = t.schema.get_field_index("step")
    rewrite_part(store, 1, t.set_column(i, "step", pa.array([0, 5, 6, 7], pa.int32())))
    one_problem(store, "step: not 0..length-1", "first row 4")


def test_a_manifest_whose_parts_do_not_add_up(tmp_path: Path) -> None:
    store = make_parted(tmp_path)
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    m[PARTS_KEY]["parts"][0]["rows"] = 5
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    problems = verify(store)
    assert any(part_file(0) in p and "manifest says 5 rows" in p for p in problems), problems
    assert any("add up to" in p for p in problems), problems
    # a part over part_rows, the total unchanged
    m[PARTS_KEY]["parts"][0]["rows"] = 4
    m[PARTS_KEY]["parts"][1]["rows"] = 5
    m[PARTS_KEY]["parts"][-1]["rows"] -= 1
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    problems = verify(store)
    assert any(part_file(1) in p and "a part holds 1 to part_rows (4)" in p for p in problems)
    # a manifest whose parts are not a list of {file, rows}: one line, no traceback
    m[PARTS_KEY]["parts"] = ["transitions/part-00000.arrow"]
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")
    one_problem(store, "transition_parts needs part_rows >= 1 and a list of parts")
    with pytest.raises(StoreError, match="transition_parts lists no parts"):
        open_store(store)
    assert_one_error_line(run_cli("pipeline.inspect", store), "transition_parts")


def recut_parts(store: Path, sizes: list[int]) -> None:
    """Write the store's rows again as parts of ``sizes`` rows, with a manifest to match
    (as a Ray build cuts them: where its tasks end)."""
    m = json.loads((store / MANIFEST).read_text(encoding="utf-8"))
    whole = pa.concat_tables([read_part(store, k) for k in range(len(m[PARTS_KEY]["parts"]))])
    assert sum(sizes) == whole.num_rows
    for f in (store / TRANSITION_PARTS).iterdir():
        del m["data_files"][f"{TRANSITION_PARTS}/{f.name}"]
        f.unlink()
    parts, start = [], 0
    for k, n in enumerate(sizes):
        path = store / part_file(k)
        write_arrow_table(whole.slice(start, n).combine_chunks(), path)
        m["data_files"][part_file(k)] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
        parts.append({"file": part_file(k), "rows": n})
        start += n
    m[PARTS_KEY]["parts"] = parts
    (store / MANIFEST).write_text(json.dumps(m), encoding="utf-8")


def test_parts_of_unequal_rows_anywhere_are_a_store(tmp_path: Path) -> None:
    """Parts of 1 to part_rows rows, short ones before the last, read and verify as the
    store cut every part_rows; a gather across them is the plain loop's."""
    store = make_parted(tmp_path)
    even = TransitionStore(store)
    n = len(even)
    sizes: list[int] = []
    for k in range(n):  # 1, 4, 2, 3, 1, 4, ... then what is left
        take = min((1, 4, 2, 3)[k % 4], n - sum(sizes))
        if take == 0:
            break
        sizes.append(take)
    assert len(set(sizes)) >= 3 and sizes[-1] >= 1
    recut_parts(store, sizes)
    assert verify(store) == []
    uneven = TransitionStore(store)
    np.testing.assert_array_equal(uneven.part_starts, np.cumsum([0, *sizes]))
    assert_same_table(even, uneven)
    rows = np.random.default_rng(0).integers(0, n, 64)
    for name in NUMERIC:
        col = getattr(uneven, name)
        assert isinstance(col, PartedColumn) and len(col.parts) == len(sizes)
        loop = np.array([np.asarray(col)[int(r)] for r in rows])
        np.testing.assert_array_equal(col[rows], loop, err_msg=name)
    recut_parts(store, [sizes[0] + sizes[1], *sizes[2:]])  # a first part of 5 rows
    assert any(part_file(0) in p and "1 to part_rows (4)" in p for p in verify(store))
