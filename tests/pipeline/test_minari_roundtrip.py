"""Round trips through Minari: store -> Minari -> store is the same store (the same
``content_hash``), and a dataset Minari's ``DataCollector`` recorded comes back from
Minari -> store -> Minari array by array."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.interchange.minari_export import export
from pipeline.store import open_store
from tests.pipeline.conftest import (
    Episode,
    build_store,
    episode_sets,
    reference_transitions,
    step_fields,
    write_episodes,
    write_lines,
    write_spec,
)

minari = pytest.importorskip("minari", reason="the minari extra (make setup installs it)")
from tests.pipeline.minari_data import record  # noqa: E402

BACKENDS = ("arrow", "hdf5", "parquet")


def import_spec(directory: Path, dataset: Path, name: str = "back", discount: float = 0.99) -> Path:
    p = directory / f"{name}.yaml"
    doc = {
        "name": name,
        "source": {"format": "minari", "paths": [str(dataset)]},
        "store": {"discount": discount},
    }
    p.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return p


def round_trip(store: Path, work: Path, backend: str, discount: float = 0.99) -> Path:
    dataset = work / f"trip-{backend}-v0"
    export(store, dataset, file_format=backend)
    return build_store(import_spec(work, dataset, f"back-{backend}", discount), work / "s").path


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = open_store(a), open_store(b)
    for name in ("observation", "next_observation", "action", "reward", "terminated",
                 "truncated", "return_to_go", "step"):  # fmt: skip
        np.testing.assert_array_equal(sa.column(name), sb.column(name), err_msg=name)
    ea, eb = sa.episode_table().to_pydict(), sb.episode_table().to_pydict()
    for key in ("episode_id", "start", "length", "return", "dropped_reward",
                "last_step_dropped", "terminated", "truncated"):  # fmt: skip
        assert ea[key] == eb[key], key
    assert sa.manifest["column_digests"] == sb.manifest["column_digests"]
    assert sa.content_hash == sb.content_hash


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(episodes=episode_sets(), backend=st.sampled_from(BACKENDS))
def test_store_to_minari_to_store_is_the_same_store(
    tmp_path_factory: pytest.TempPathFactory, episodes: list[Episode], backend: str
) -> None:
    # every ending: terminated (with and without a final observation), both flags,
    # truncated, a log that just stops, cut off with no final observation (last step dropped)
    assume(not reference_transitions(episodes, 0.99).unbootstrappable)  # nothing quarantined
    work = tmp_path_factory.mktemp("trip")
    written = write_episodes(work / "raw", episodes, "episode_per_line")
    spec = write_spec(
        work,
        [written.glob],
        layout="episode_per_line",
        fields=step_fields(final_observation=True),
    )
    first = build_store(spec, work / "s")
    assert first.manifest["counts"]["records_quarantined"] == 0
    assert_same_store(first.path, round_trip(first.path, work, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_continuous_store_with_inexact_rewards_round_trips(tmp_path: Path, backend: str) -> None:
    def step(ep: str, t: int, **kw: Any) -> dict[str, Any]:
        return {"ep": ep, "t": t, "obs": [t / 3, -t / 7], "act": [np.sin(t), 0.1 * t - 0.5],
                "rew": 0.1 * t + 1 / 3, "term": False, "trunc": False, **kw}  # fmt: skip

    lines = [step("a", t, term=t == 4) for t in range(5)]
    lines += [step("b", t) for t in range(6)]  # cut off: its last step is dropped
    lines += [
        step("c", t, trunc=t == 2, **({"final": [9.5, 9.25]} if t == 2 else {})) for t in range(3)
    ]
    fields = {
        "observation": {"path": "obs"},
        "action": {"path": "act", "type": "continuous", "shape": [2], "low": -1.0, "high": 1.0},
        "reward": {"path": "rew"},
        "terminated": {"path": "term"},
        "truncated": {"path": "trunc"},
        "final_observation": {"path": "final"},
    }
    spec = write_spec(
        tmp_path, [write_lines(tmp_path / "log.jsonl", lines)], fields=fields, discount=0.97
    )
    first = build_store(spec, tmp_path / "s")
    assert first.manifest["counts"]["truncated_last_steps_dropped"] == 1
    back = round_trip(first.path, tmp_path, backend, discount=0.97)
    assert open_store(back).manifest["counts"]["truncated_last_steps_dropped"] == 1
    assert_same_store(first.path, back)


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_reward_columns_travel_in_the_step_infos(tmp_path: Path, backend: str) -> None:
    def step(ep: str, t: int, **kw: Any) -> dict[str, Any]:
        return {"ep": ep, "t": t, "obs": [t / 3, 1.0, -t], "act": t % 2, "rew": 0.1 * t,
                "up": np.cos(t), "cost": -t / 7, "term": False, "trunc": False, **kw}  # fmt: skip

    lines = [step("a", t, term=t == 3) for t in range(4)]
    lines += [step("b", t) for t in range(5)]  # cut off: the dropped step's named rewards too
    fields = step_fields(obs_dim=3, final_observation=False)
    fields["rewards"] = {"upright": {"path": "up"}, "cost": {"path": "cost"}}
    spec = write_spec(tmp_path, [write_lines(tmp_path / "log.jsonl", lines)], fields=fields)
    first = build_store(spec, tmp_path / "s")
    back = round_trip(first.path, tmp_path, backend)
    assert_same_store(first.path, back)
    sb = open_store(back)
    assert list(sb.reward_columns) == ["upright", "cost"]
    assert sb.episodes.dropped_named_rewards["upright"][1] == pytest.approx(np.cos(4))
    # what Minari's own reader sees: infos, N + 1 values (the reset's first, 0)
    eps = list(minari.MinariDataset(tmp_path / f"trip-{backend}-v0" / "data").iterate_episodes())
    np.testing.assert_array_equal(
        eps[0].infos["reward_upright"], np.float32([0.0, *np.cos(np.arange(4))])
    )
    np.testing.assert_array_equal(
        eps[1].infos["reward_cost"], np.float32([0.0, *(-np.arange(4) / 7)])
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_a_datacollector_dataset_comes_back_array_by_array(
    tmp_path: Path, env_id: str, backend: str
) -> None:
    source = record(tmp_path / "recorded", f"test/rec-{backend}-v0", env_id, backend="arrow",
                    episodes=4, max_episode_steps=15, seed=3)  # fmt: skip
    store = build_store(import_spec(tmp_path, source, "imported"), tmp_path / "s").path
    out = tmp_path / f"again-{backend}-v0"
    export(store, out, file_format=backend)
    original = list(minari.MinariDataset(source / "data").iterate_episodes())
    again_ds = minari.MinariDataset(out / "data")
    again = list(again_ds.iterate_episodes())
    assert len(again) == len(original) == 4
    both = 0
    for a, b in zip(original, again, strict=True):
        assert a.id == b.id
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.terminations, b.terminations)
        trunc = np.asarray(a.truncations).copy()
        if a.terminations[-1] and trunc[-1]:  # ended both ways at once: a store keeps one flag,
            trunc[-1] = False  # terminated (no bootstrap), and counts the episode
            both += 1
        np.testing.assert_array_equal(trunc, b.truncations)
        # the store holds rewards as float32: equal at that precision (exact for CartPole's)
        np.testing.assert_array_equal(np.float32(a.rewards), np.float32(b.rewards))
        if env_id == "CartPole-v1":
            np.testing.assert_array_equal(a.rewards, b.rewards)
    counts = open_store(store).manifest["counts"]
    assert counts.get("episodes_both_flags_as_terminated", 0) == both
    assert again_ds.spec.env_spec is not None and again_ds.spec.env_spec.id == env_id
    assert again_ds.spec.env_spec.max_episode_steps == 15
    assert again_ds.recover_environment().spec.id == env_id


@pytest.mark.parametrize("name", ["pendulum-mixed", "cartpole-mixed"])
def test_the_shipped_demo_stores_round_trip(
    demo_stores: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """The demo stores (Pendulum with a named reward column, CartPole with discrete actions)
    through Minari and back are the same stores."""
    first = demo_stores[name]
    assert open_store(first).manifest["counts"]["records_quarantined"] == 0
    back = round_trip(
        first, tmp_path, "arrow", discount=open_store(first).manifest["spec"]["store"]["discount"]
    )
    assert_same_store(first, back)
