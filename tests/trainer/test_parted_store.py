"""A store written in parts (``store.part_rows``) trains exactly as the same store in one
file: the arrays the samplers pack, the d3rlpy dataset, a relabelling, and a BC run's
losses and weights, all equal to those of the one-file store of the same input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline.build import build
from pipeline.store import PartedColumn, open_store
from trainer.config import config_from_dict
from trainer.d3rlpy_adapter import mdp_arrays
from trainer.loop import Trainer
from trainer.relabel import StoreRewards, build_relabel, relabel_arrays
from trainer.samplers import (
    DeviceTransitions,
    TrajectorySliceSampler,
    TransitionArrays,
    TransitionSampler,
    split_episodes,
)

from .test_relabel import GAMMA, RELABEL, write_store
from .test_train import CLOCK_KEYS, SMALL, assert_same_state, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PART_ROWS = 7  # fewer rows than any episode, and no divisor of the store's rows


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same Pendulum logs (with named rewards) as one file and in parts."""
    root = tmp_path_factory.mktemp("parted-train")
    one = write_store(root)
    spec = yaml.safe_load((root / "named.yaml").read_text())
    spec["name"] = "named-parted"
    spec["store"]["part_rows"] = PART_ROWS
    path = root / "named-parted.yaml"
    path.write_text(yaml.safe_dump(spec))
    parted = Path(build(path, root / "stores", progress=False).path)
    a, b = open_store(one), open_store(parted)
    assert isinstance(b.observations, PartedColumn) and len(b.observations.parts) > 10
    assert len(b) % PART_ROWS and b.episodes.length.min() > PART_ROWS
    assert b.content_hash == a.content_hash
    return one, parted


def test_arrays_samplers_d3rlpy_and_relabel_see_one_table(stores: tuple[Path, Path]) -> None:
    a_store, b_store = (open_store(p) for p in stores)
    a, b = TransitionArrays.from_store(a_store), TransitionArrays.from_store(b_store)
    assert isinstance(b.actions, PartedColumn) and isinstance(a.actions, np.ndarray)
    np.testing.assert_array_equal(b.episode_returns(), a.episode_returns())
    train, val = split_episodes(a.n_episodes, 0.25, seed=1)
    for episodes in (None, train, val):  # the whole store (np.asarray), or a gather of rows
        da, db = DeviceTransitions(a, episodes), DeviceTransitions(b, episodes)
        assert torch.equal(da.matrix, db.matrix)
        sa, sb = TransitionSampler(da, 32, seed=5), TransitionSampler(db, 32, seed=5)
        for step in (0, 3):
            assert torch.equal(sa.batch_at(step).observations, sb.batch_at(step).observations)
        ta, tb = TrajectorySliceSampler(da, 8, 5, seed=2), TrajectorySliceSampler(db, 8, 5, seed=2)
        assert torch.equal(ta.batch_at(1).actions, tb.batch_at(1).actions)
    for episodes in (None, val):
        ma, mb = mdp_arrays(a, episodes), mdp_arrays(b, episodes)
        assert ma.keys() == mb.keys()
        for k in ma:
            np.testing.assert_array_equal(mb[k], ma[k], err_msg=k)
    node = build_relabel(RELABEL)
    ra = relabel_arrays(a, node, StoreRewards.of(a_store), GAMMA)
    rb = relabel_arrays(b, build_relabel(RELABEL), StoreRewards.of(b_store), GAMMA)
    np.testing.assert_array_equal(rb.arrays.rewards, ra.arrays.rewards)
    np.testing.assert_array_equal(rb.arrays.return_to_go, ra.arrays.return_to_go)
    assert rb.components == ra.components


def _rows(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [{k: v for k, v in r.items() if k not in CLOCK_KEYS} for r in rows]


@pytest.mark.parametrize(
    "over",
    [
        {},  # a validation split: the samplers gather the training rows from the parts
        {"val_fraction": 0.0, "reward": {"relabel": RELABEL}},  # the whole store, relabelled
    ],
    ids=["split", "whole-relabelled"],
)
def test_bc_on_a_parted_store_gives_the_same_losses(
    stores: tuple[Path, Path], tmp_path: Path, over: dict[str, Any]
) -> None:
    runs = []
    for store, name in zip(stores, ("one", "parted")):
        raw = tiny_config(store, tmp_path / name, **over)
        raw["stages"] = [{"algo": "bc", "steps": 30, "batch_size": 32, **SMALL}]
        raw["eval"] = {"every": 10, "episodes": 0, "val_transitions": 64}
        Trainer(config_from_dict(raw)).run()
        runs.append(tmp_path / name)
    one, parted = (_rows(r) for r in runs)
    train = [r for r in one if r["kind"] == "train"]
    assert [r["step"] for r in train] == [10, 20, 30]
    assert all(np.isfinite(r["bc_loss"]) for r in train)
    assert parted == one  # every loss and metric, bit for bit
    a, b = (torch.load(r / "checkpoints" / "final-bc.pt", weights_only=True) for r in runs)
    assert_same_state(a["algo_state"], b["algo_state"])
