"""reward.relabel: a store's rewards relabelled from its reward columns at training time.

Held against plain computations: the relabelled reward of every row from the store's own
columns, return-to-go by a loop over each episode, the batches a sampler draws, and the
summary of a real run through ``trainer.train``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.build import build
from pipeline.store import TransitionStore, open_store
from trainer.config import ConfigError, config_from_dict
from trainer.loop import load_run_data
from trainer.relabel import StoreRewards, build_relabel, relabel_arrays, returns_to_go
from trainer.samplers import TransitionArrays, TransitionSampler
from trainer.train import main

GAMMA = 0.9
# 1.0 x reward + 0.5 x upright - 2 x bonus (clipped to [-0.5, 0.5])
RELABEL: dict[str, Any] = {
    "type": "weighted_sum",
    "components": [
        {"weight": 1.0, "reward": {"column": "reward"}},
        {"weight": 0.5, "reward": {"column": "upright"}},
        {"weight": -2.0, "reward": {"column": "bonus", "post": [{"clip": [-0.5, 0.5]}]}},
    ],
}


def plain_relabel(reward: np.ndarray, upright: np.ndarray, bonus: np.ndarray) -> np.ndarray:
    """RELABEL, written out."""
    r, u, b = (np.asarray(x, dtype=np.float64) for x in (reward, upright, bonus))
    return 1.0 * r + 0.5 * u - 2.0 * np.clip(b, -0.5, 0.5)


# --------------------------------------------------------------------------- a store


def _lines(episodes: int = 8, max_steps: int = 20) -> list[dict[str, Any]]:
    """Pendulum-v1 steps with two named rewards (``upright``, ``extra.bonus``); every third
    episode is a log that just stops (no flag, no final observation): its last step is
    dropped by the store, its named rewards kept in the episodes table."""
    rng = np.random.default_rng(0)
    env = gym.make("Pendulum-v1", max_episode_steps=max_steps)
    out = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        cut = ep % 3 == 2
        for t in range(max_steps - 5 if cut else max_steps):
            act = [float(np.clip(rng.normal(0.0, 1.0), -2.0, 2.0))]
            nxt, rew, term, trunc, _ = env.step(np.array(act, np.float32))
            line = {
                "ep": f"e{ep}",
                "t": t,
                "obs": [float(x) for x in obs],
                "act": act,
                "rew": float(rew),
                "upright": float(obs[0]),
                "extra": {"bonus": float(rng.normal(0.0, 0.5))},
                "terminal": bool(term),
                "timeout": bool(trunc) and not cut,
            }
            if (term or trunc) and not cut:
                line["final_obs"] = [float(x) for x in nxt]
            out.append(line)
            obs = nxt
            if term or trunc:
                break
    env.close()
    return out


def write_store(root: Path, named: bool = True) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "steps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in _lines()))
    fields: dict[str, Any] = {
        "observation": {"path": "obs", "shape": [3]},
        "action": {"path": "act", "type": "continuous", "shape": [1], "low": -2.0, "high": 2.0},
        "reward": {"path": "rew"},
        "terminated": {"path": "terminal"},
        "truncated": {"path": "timeout"},
        "final_observation": {"path": "final_obs"},
    }
    if named:
        fields["rewards"] = {"upright": {"path": "upright"}, "bonus": {"path": "extra.bonus"}}
    spec = {
        "name": "named" if named else "plain",
        "kind": "transitions",
        "source": {
            "paths": [str(raw / "*.jsonl")],
            "layout": "step_per_line",
            "episode_key": "ep",
            "step_key": "t",
        },
        "fields": fields,
        "store": {"format": "arrow", "discount": GAMMA},
        "env": {"id": "Pendulum-v1", "max_episode_steps": 20},
        "reference_returns": {"random": -250.0, "expert": -30.0},
    }
    path = root / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return Path(build(path, root / "stores", progress=False).path)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("relabel"))


@pytest.fixture(scope="module")
def store(store_path: Path) -> TransitionStore:
    s = open_store(store_path)
    assert s.episodes.last_step_dropped.sum() >= 2  # the case this file is about
    return s


def expected_rows(store: TransitionStore) -> np.ndarray:
    cols = store.reward_columns
    return plain_relabel(store.rewards, cols["upright"], cols["bonus"])


def expected_dropped(store: TransitionStore) -> np.ndarray:
    ep = store.episodes
    d = ep.dropped_named_rewards
    value = plain_relabel(ep.dropped_reward, d["upright"], d["bonus"])
    return np.where(ep.last_step_dropped, value, 0.0)


def plain_returns_to_go(
    rewards: np.ndarray, dropped: np.ndarray, start: np.ndarray, length: np.ndarray, g: float
) -> np.ndarray:
    """One loop per episode, backwards from its dropped reward (0 if none)."""
    out = np.zeros(len(rewards))
    for s, n, d in zip(start, length, dropped):
        acc = float(d)
        for i in range(int(s + n) - 1, int(s) - 1, -1):
            acc = float(rewards[i]) + g * acc
            out[i] = acc
    return out


# --------------------------------------------------------------------------- pure parts


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0]),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_returns_to_go_matches_a_plain_loop(
    lengths: list[int], gamma: float, data: st.DataObject
) -> None:
    n, e = sum(lengths), len(lengths)
    values = st.floats(-10, 10, allow_nan=False)
    rewards = np.asarray(data.draw(st.lists(values, min_size=n, max_size=n)))
    dropped = np.asarray(data.draw(st.lists(values, min_size=e, max_size=e)))
    dropped[np.asarray(data.draw(st.lists(st.booleans(), min_size=e, max_size=e)))] = 0.0
    length = np.asarray(lengths, dtype=np.int64)
    start = np.cumsum(length) - length
    got = returns_to_go(rewards, dropped, start, length, gamma)
    want = plain_returns_to_go(rewards, dropped, start, length, gamma)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_relabelled_arrays_match_a_plain_computation(store: TransitionStore) -> None:
    arrays = TransitionArrays.from_store(store)
    out = relabel_arrays(arrays, build_relabel(RELABEL), StoreRewards.of(store), GAMMA)
    new = out.arrays
    want = expected_rows(store)
    assert new.rewards.dtype == np.float32
    np.testing.assert_allclose(new.rewards, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(new.rewards, store.rewards)  # really relabelled
    dropped = expected_dropped(store)
    assert new.episode_dropped_reward is not None
    np.testing.assert_allclose(new.episode_dropped_reward, dropped, rtol=1e-12)
    rtg = plain_returns_to_go(want, dropped, arrays.episode_start, arrays.episode_length, GAMMA)
    np.testing.assert_allclose(new.return_to_go, rtg, rtol=1e-5, atol=1e-4)
    # the episode returns (return_range normalisation) count the dropped relabelled reward
    starts = arrays.episode_start
    np.testing.assert_allclose(
        new.episode_returns(), np.add.reduceat(want, starts) + dropped, rtol=1e-5
    )
    # the untouched columns are the store's, and the store itself is unchanged
    assert new.observations is arrays.observations
    np.testing.assert_array_equal(arrays.rewards, store.rewards)
    # the summary's components: mean / std over the store's rows, weights
    comps = out.components
    assert list(comps) == ["reward/total", "reward/reward", "reward/upright", "reward/bonus"]
    assert comps["reward/total"]["mean"] == pytest.approx(want.mean())
    assert comps["reward/total"]["std"] == pytest.approx(want.std())
    bonus = np.clip(store.reward_columns["bonus"].astype(np.float64), -0.5, 0.5)
    assert comps["reward/bonus"] == pytest.approx(
        {"mean": bonus.mean(), "std": bonus.std(), "weight": -2.0}
    )


def test_ema_normalize_over_the_whole_store_is_one_batch(store: TransitionStore) -> None:
    spec = {"column": "upright", "post": [{"ema_normalize": {"decay": 0.5}}]}
    new = relabel_arrays(
        TransitionArrays.from_store(store), build_relabel(spec), StoreRewards.of(store), GAMMA
    ).arrays
    ep = store.episodes
    # the batch: every row, then the dropped last steps; standardised by its own statistics
    batch = np.concatenate(
        [
            store.reward_columns["upright"].astype(np.float64),
            ep.dropped_named_rewards["upright"][ep.last_step_dropped],
        ]
    )
    z = (batch - batch.mean()) / np.sqrt(batch.var() + 1e-8)
    np.testing.assert_allclose(new.rewards, z[: len(store)], rtol=1e-5, atol=1e-6)
    assert new.episode_dropped_reward is not None
    np.testing.assert_allclose(
        new.episode_dropped_reward[ep.last_step_dropped], z[len(store) :], rtol=1e-9
    )


# --------------------------------------------------------------------------- config and batches


def run_config(store_path: Path, out: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "store": str(store_path),
        "out": str(out),
        "seed": 0,
        "device": "cpu",
        "num_threads": 1,
        "val_fraction": 0.25,
        "log_every": 5,
        "progress": False,
        "tensorboard": False,
        "stages": [
            {"algo": "bc", "steps": 6, "batch_size": 16, "hidden": [16]},
            {
                "algo": "iql",
                "steps": 6,
                "init": "bc",
                "batch_size": 16,
                "hidden": [16],
                "critic_hidden": [16],
            },
        ],
        "eval": {"every": 0, "episodes": 1, "val_transitions": 32},
        "checkpoint": {"every": 100, "keep_last": 1},
        "reward": {"relabel": RELABEL},
    }
    cfg.update(over)
    return cfg


def test_relabelled_rewards_reach_the_training_batches(
    store_path: Path, store: TransitionStore, tmp_path: Path
) -> None:
    raw = run_config(store_path, tmp_path, reward={"relabel": RELABEL, "scale": 2.0, "shift": -1})
    data = load_run_data(config_from_dict(raw), torch.device("cpu"))
    sampler = TransitionSampler(data.train, 64, seed=3)
    packed_rows = data.arrays.rows_of(data.train_episodes)  # train matrix row -> store row
    for step in (0, 7):
        batch = sampler.batch_at(step)
        rows = packed_rows[sampler.indices(step).numpy()]
        # relabelled first, then scaled: 2 * relabelled - 1
        want = 2.0 * expected_rows(store)[rows] - 1.0
        np.testing.assert_allclose(batch.rewards.numpy(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(batch.observations.numpy(), store.observations[rows])
    # the validation batches and the d3rlpy dataset read the same relabelled arrays
    assert data.val is not None
    val_rows = data.arrays.rows_of(data.val_episodes)
    val = data.val.all_rows()
    np.testing.assert_allclose(
        val.rewards.numpy(), 2.0 * expected_rows(store)[val_rows] - 1.0, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(data.arrays.rewards, expected_rows(store), rtol=1e-6, atol=1e-6)
    # without the block, the batches hold the store's reward
    plain = load_run_data(config_from_dict({**raw, "reward": {}}), torch.device("cpu"))
    rows = packed_rows[sampler.indices(0).numpy()]
    batch = TransitionSampler(plain.train, 64, seed=3).batch_at(0)
    np.testing.assert_array_equal(batch.rewards.numpy(), store.rewards[rows])
    assert plain.relabelled is None


def test_end_to_end_iql_run_trains_on_and_records_the_relabelled_reward(
    store_path: Path, store: TransitionStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "relabel.yaml"
    cfg.write_text(yaml.safe_dump(run_config(store_path, tmp_path / "run"), sort_keys=False))
    assert main([str(cfg)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    want = expected_rows(store)
    comps = summary["reward_relabel"]
    assert comps["reward/total"]["mean"] == pytest.approx(want.mean())
    assert comps["reward/total"]["std"] == pytest.approx(want.std())
    assert comps["reward/upright"]["weight"] == 0.5
    assert [s["steps"] for s in summary["stages"]] == [6, 6]
    assert "eval/normalized_score" in summary["stages"][1]["final_eval"]  # the env's reward
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["reward"]["relabel"] == RELABEL
    # resuming with another relabelling is refused: it trains on other rewards
    other = {**RELABEL, "components": RELABEL["components"][:2]}
    capsys.readouterr()
    assert main([str(cfg), "--resume", f"reward.relabel={json.dumps(other)}"]) == 2
    assert "--resume: `reward` differs" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors


def test_a_column_the_store_lacks_is_one_line_naming_the_node_and_the_columns(
    store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {
        "type": "weighted_sum",
        "components": [
            {"weight": 1.0, "reward": {"column": "reward"}},
            {"weight": 0.1, "reward": {"column": "uprigth"}},
        ],
    }
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump(run_config(store_path, tmp_path / "run", reward={"relabel": bad}))
    )
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("trainer.train: error: reward.relabel.components[1].reward: ")
    assert "no reward column 'uprigth'" in err
    assert "its reward columns are: bonus, reward, upright" in err


def test_a_store_without_named_rewards_offers_only_reward(tmp_path: Path) -> None:
    plain = write_store(tmp_path, named=False)
    raw = run_config(plain, tmp_path / "run", reward={"relabel": {"column": "upright"}})
    with pytest.raises(
        ConfigError, match=r"^reward\.relabel: no reward column 'upright'.*: reward \("
    ):
        load_run_data(config_from_dict(raw), torch.device("cpu"))
    # {column: reward} alone is the store's reward
    raw["reward"] = {"relabel": {"column": "reward", "post": [{"scale": {"mul": 3}}]}}
    data = load_run_data(config_from_dict(raw), torch.device("cpu"))
    store = open_store(plain)
    np.testing.assert_allclose(data.arrays.rewards, 3.0 * store.rewards, rtol=1e-6)
    np.testing.assert_allclose(data.arrays.return_to_go, 3.0 * store.return_to_go, rtol=1e-4)


@pytest.mark.parametrize(
    ("relabel", "message"),
    [
        ("success", r"^reward\.relabel: leaf 'success' cannot relabel a transition store"),
        (
            {"type": "weighted_sum", "components": [{"weight": 1, "reward": {"bleu": {}}}]},
            r"^reward\.relabel\.components\[0\]\.reward: leaf 'bleu' cannot relabel",
        ),
        (
            {"type": "weighted_sum", "components": [{"weight": "x", "reward": "reward"}]},
            r"^reward\.relabel\.components\[0\]\.weight: weight must be a finite number",
        ),
        ({"type": "colum", "column": "x"}, r"^reward\.relabel: unknown leaf 'colum'"),
    ],
)
def test_bad_relabel_specs_fail_when_the_config_is_read(relabel: Any, message: str) -> None:
    raw = {"store": "s", "out": "o", "stages": [{"algo": "iql", "steps": 1}]}
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict({**raw, "reward": {"relabel": relabel}})
    assert "\n" not in str(err.value)


def test_relabel_is_for_transition_stores_and_kept_out_of_plain_resolved_configs() -> None:
    raw: dict[str, Any] = {"store": "s", "out": "o", "stages": [{"algo": "iql", "steps": 1}]}
    assert "relabel" not in config_from_dict(raw).to_dict()["reward"]
    cfg = config_from_dict({**raw, "reward": {"relabel": RELABEL}})
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(
        ConfigError, match=r"^reward\.relabel: relabels the rewards of a transition"
    ):
        config_from_dict(
            {
                **raw,
                "stages": [{"algo": "qa_supervised", "steps": 1}],
                "reward": {"relabel": RELABEL},
            }
        )
