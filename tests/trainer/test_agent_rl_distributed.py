"""The ``reinforce`` and ``ppo`` stages data-parallel under a real ``torchrun`` (2 ranks, gloo).

One 2-rank run of sft -> reinforce -> ppo (an adaptive KL coefficient, an EMA-normalised
reward, an entropy bonus, a fading SFT anchor and plain SFT steps, two minibatches per PPO
epoch) is the reference. Each rank plays its half of a step's seeds, each group sampled by
a generator of (seed, step, global group index), so one process with ``shards=2`` plays
the same episodes and must end where the ranks end, to float tolerance; the ranks' weights,
optimizers, value heads, KL coefficients and reward normalisers are equal, rank 0 alone
evaluates and writes, and a resumed 2-rank run repeats the reference bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.trainer.test_agent_distributed import AGENT_DRIVER, QUICK_EVAL
from tests.trainer.test_agent_train import ROOT, overrides
from tests.trainer.test_checkpoint import assert_same_run
from tests.trainer.test_distributed import torchrun
from trainer.agent.rl import RLStage
from trainer.distributed import state_digest
from trainer.rewards import RewardError, RewardInput, build_reward
from trainer.train import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXTRA = [
    "stages.0.steps=2",
    "stages.1.steps=3",
    "stages.1.batch_size=2",
    "stages.1.group_size=2",
    "stages.1.max_new_tokens=8",
    "stages.1.max_turns=2",
    "stages.1.sft_batch_size=2",
    "stages.1.sft_every=2",
    "stages.1.entropy_coef=0.01",
    "stages.1.entropy_decay=0.9",
    "stages.1.kl_horizon=10",
    "stages.1.kl_target=1.2e-4",
    "stages.1.lr=1e-3",
    "stages.2.steps=2",
    "stages.2.batch_size=4",
    "stages.2.group_size=2",
    "stages.2.minibatch_episodes=4",
    "stages.2.max_new_tokens=8",
    "stages.2.max_turns=2",
    "stages.2.sft_batch_size=2",
    "stages.2.kl_horizon=10",
    "stages.2.lr=1e-3",
    *QUICK_EVAL,
]


def _config(tmp: Path) -> Path:
    """agent-sft-reinforce.yaml with agent-sft-ppo.yaml's ppo stage after its reinforce."""
    raw = yaml.safe_load((ROOT / "configs" / "agent-sft-reinforce.yaml").read_text())
    ppo = yaml.safe_load((ROOT / "configs" / "agent-sft-ppo.yaml").read_text())["stages"][1]
    raw["stages"].append({**ppo, "init": "reinforce"})
    path = tmp / "sft-reinforce-ppo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def ddp(agent_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("agent_rl_ddp")
    (tmp / "driver.py").write_text(AGENT_DRIVER)
    run, events = tmp / "two-ranks", tmp / "events"
    events.mkdir()
    config = _config(tmp)
    args = [str(config), *overrides(agent_store, run, *EXTRA)]
    proc = torchrun(tmp, args, env={"DDP_EVENTS": str(events), "DDP_OUT": str(run)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "store": agent_store, "run": run, "events": events, "config": config}


def _final(run: Path, stage: str) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / f"final-{stage}.pt", weights_only=True)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal to float tolerance. Adam steps a weight whose gradient is ~0 by about lr
    whatever its sign, so a rounding-level difference of such a gradient (summed in
    another order over the ranks) moves that one weight by up to ~lr; a handful of them may
    differ by more (less than one step), every other weight by rounding only."""
    d = (a - b).abs()
    assert d.max() < 5e-4, (what, float(d.max()))
    assert int((d > 2e-5).sum()) <= max(2, d.numel() // 1000), (what, int((d > 2e-5).sum()))


def _rows(run: Path, kind: str, stage: str) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r["kind"] == kind and r.get("stage") == stage]


def test_two_ranks_train_the_rl_stages_as_one_process_with_two_shards(
    ddp: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    one = ddp["tmp"] / "one-process"
    assert main([str(ddp["config"]), *overrides(ddp["store"], one, *EXTRA), "shards=2"]) == 0
    capsys.readouterr()
    for stage in ("reinforce", "ppo"):
        a, b = _final(ddp["run"], stage), _final(one, stage)
        assert set(a["algo_state"]) == set(b["algo_state"])
        for k in a["algo_state"]:
            _close(a["algo_state"][k], b["algo_state"][k], k)
        ra, rb = a["loop"]["rl"], b["loop"]["rl"]
        for k in ra["value_head"]:
            torch.testing.assert_close(
                ra["value_head"][k], rb["value_head"][k], atol=2e-5, rtol=1e-4
            )
        # (the reinforce stage's KL target is set near its KL, where the coefficient's
        # update is most sensitive: the float noise of the KL shows at 1e-4)
        assert ra["kl"]["value"] == pytest.approx(rb["kl"]["value"], rel=1e-3)
        assert ra["kl"]["value"] != 0.05  # the coefficient adapted
        assert ra["reward_ema"] == pytest.approx(rb["reward_ema"], rel=1e-5, abs=1e-6)
        ((path, ema),) = ra["reward"].items()
        assert ema["count"] == rb["reward"][path]["count"] == _final(one, stage)["loop"]["rl"][
            "reward"][path]["count"]  # fmt: skip
        assert ema["mean"] == pytest.approx(rb["reward"][path]["mean"], rel=1e-5, abs=1e-6)
        assert ema["var"] == pytest.approx(rb["reward"][path]["var"], rel=1e-5, abs=1e-6)
        # the same episodes were played: the global batch's metrics agree
        ta, tb = _rows(ddp["run"], "train", stage), _rows(one, "train", stage)
        assert [r["step"] for r in ta] == [r["step"] for r in tb]
        for x, y in zip(ta, tb):
            for key in ("reward/episode", "kl_coef", "rollout/generated_tokens"):
                assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-6), key
    sa = json.loads((ddp["run"] / "summary.json").read_text())
    sb = json.loads((one / "summary.json").read_text())
    for i in (1, 2):
        for key in ("tokens", "episodes_per_step"):
            assert sa["stages"][i][key] == sb["stages"][i][key], key


def test_every_rank_ends_each_rl_stage_in_the_same_state_and_only_rank_0_writes(
    ddp: dict[str, Any],
) -> None:
    dp = json.loads((ddp["run"] / "summary.json").read_text())["data_parallel"]
    assert dp["ranks"] == 2 and dp["shards"] == 2
    for stage in ("sft", "reinforce", "ppo"):
        (d0, d1) = dp["state_sha256"][stage]
        assert d0 == d1, stage
    final = _final(ddp["run"], "ppo")
    assert len(final["ranks"]) == 2  # both ranks' generators, for an exact resume
    logs = {r: ddp["events"] / f"rank{r}.log" for r in (0, 1)}
    assert not logs[1].exists()  # no evaluation, no file opened for writing, no mkdir
    rank0 = logs[0].read_text().splitlines()
    # every evaluation logged, the RL stages' at their start included, by rank 0 alone
    rows = [json.loads(x) for x in (ddp["run"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {r["stage"] for r in evals} == {"sft", "reinforce", "ppo"}
    assert rank0.count("evaluate") == len(evals)
    written = {e.split(" ", 1)[1] for e in rank0 if e != "evaluate"}
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert name in written, name


def test_a_two_rank_rl_run_resumes_on_two_ranks_bit_for_bit(ddp: dict[str, Any]) -> None:
    """Cut back to the checkpoint of the reinforce stage's step 1 (global step 3)."""
    out = ddp["tmp"] / "resumed"
    shutil.copytree(ddp["run"], out)
    for f in (out / "checkpoints").glob("*.pt"):
        keep = (
            f.name.startswith("best-")
            or f.name == "final-sft.pt"
            or (f.name.startswith("step-") and int(f.name[5:-3]) <= 3)
        )
        if not keep:
            f.unlink()
    for name in ("summary.json", "curves.png"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    args = [str(ddp["config"]), *overrides(ddp["store"], out, *EXTRA), "--resume"]
    proc = torchrun(ddp["tmp"], args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 3)" in proc.stderr
    assert_same_run(ddp["run"], out)
    for stage in ("reinforce", "ppo"):
        assert state_digest(_final(out, stage)["algo_state"]) == state_digest(
            _final(ddp["run"], stage)["algo_state"]
        )
        assert state_digest(_final(out, stage)["loop"]["rl"]) == state_digest(
            _final(ddp["run"], stage)["loop"]["rl"]
        )


def test_a_minibatch_the_shards_cannot_split_is_refused_in_one_line(
    ddp: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = ddp["tmp"] / "odd-minibatch"
    args = [str(ddp["config"]), *overrides(ddp["store"], out, *EXTRA)]
    assert main([*args, "shards=2", "stages.2.minibatch_episodes=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "trainer.train: error: stages.2.minibatch_episodes: 2 episodes per minibatch are "
        "whole groups of 2 split evenly over shards=2; make it a multiple of 4"
    ]
    assert main([*args, "shards=2", "stages.1.batch_size=3"]) == 2
    assert "stages.1.batch_size: 3 is the global batch" in capsys.readouterr().err


class _OtherRank:
    """A reduce for one rank of two whose other rank holds ``other``: adds what the other
    rank would add to each of the EMA's two sums (count and sum, then squared deviations)."""

    def __init__(self, other: np.ndarray) -> None:
        self.other, self.mean = other, 0.0

    def __call__(self, v: np.ndarray) -> np.ndarray:
        if len(v) == 2:
            out = v + np.array([self.other.size, self.other.sum()])
            self.mean = out[1] / out[0] if out[0] else 0.0
            return out
        return v + np.array([((self.other - self.mean) ** 2).sum()])


def test_the_reward_normaliser_updates_from_the_global_batch_and_defers_errors() -> None:
    spec = {"success": {}, "post": [{"clip": [-1, 2]}, {"ema_normalize": {"decay": 0.5}}]}
    union, rank0 = build_reward(spec, "reward"), build_reward(spec, "reward")
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(size=6)
        got = union([RewardInput(text="", success=float(v)) for v in x])
        rank0.share_statistics(_OtherRank(np.clip(x[3:], -1, 2)))
        part = rank0([RewardInput(text="", success=float(v)) for v in x[:3]])
        np.testing.assert_allclose(part, got[:3], rtol=1e-12, atol=1e-12)
        (sa,), (sb,) = union.state_dict().values(), rank0.state_dict().values()
        assert sa["count"] == sb["count"]
        assert sa["mean"] == pytest.approx(sb["mean"], abs=1e-12)
        assert sa["var"] == pytest.approx(sb["var"], abs=1e-12)
    # a NaN on this rank: the evaluation still reaches the EMA's sums (the other rank waits
    # there), then raises the first error
    calls: list[int] = []
    rank0.share_statistics(lambda v: (calls.append(len(v)), v)[1])
    with pytest.raises(RewardError, match=r"reward/success produced NaN for sample 1"):
        rank0([RewardInput(text="", success=s) for s in (1.0, float("nan"))])
    assert calls == [2, 1]


def _shards_of(n_shards: int, local: range, algo: str = "ppo") -> Any:
    """The attributes of an RLStage that its prompt draw and its minibatches read."""
    from types import SimpleNamespace

    p = SimpleNamespace(seed_base=5, group_size=2, ppo_epochs=2, minibatch_episodes=4)
    self = SimpleNamespace(
        p=p, algo=algo, n_shards=n_shards, local_shards=local, per_shard=8 // n_shards,
        setup=SimpleNamespace(seed=3, prompts=SimpleNamespace(rows=np.arange(100, 137))),
    )  # fmt: skip
    self._seed = lambda *key: RLStage._seed(self, *key)  # type: ignore[arg-type]
    return self


def test_one_process_draws_the_store_turns_and_ppo_minibatches_of_two_ranks() -> None:
    """One process with shards=2 draws the union of the ranks' turns, and steps on the union
    of their minibatches (whole groups, half of each from each shard)."""
    whole = _shards_of(2, range(2))
    ranks = [_shards_of(2, range(r, r + 1)) for r in (0, 1)]
    for step in range(3):
        union = RLStage.shard_prompt_rows(whole, step)  # type: ignore[arg-type]
        parts = [RLStage.shard_prompt_rows(r, step) for r in ranks]  # type: ignore[arg-type]
        assert union == parts[0] + parts[1] and len(union) == 8
        assert max(parts[0]) < 119 <= min(parts[1])  # each shard draws its own turns
        mbs = list(RLStage._minibatches(whole, 16, step))  # type: ignore[arg-type]
        per_rank = [list(RLStage._minibatches(r, 8, step)) for r in ranks]  # type: ignore[arg-type]
        assert len(mbs) == 2 * 4  # 2 epochs of 16 episodes in minibatches of 4
        for mb, a, b in zip(mbs, *per_rank):
            assert mb.tolist() == a.tolist() + (b + 8).tolist()
            assert a.reshape(-1, 2)[:, 0].remainder(2).eq(0).all()  # whole groups
        epoch = torch.cat(mbs[:4]).sort().values
        assert epoch.tolist() == list(range(16))  # every episode once an epoch
