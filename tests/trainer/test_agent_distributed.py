"""The language-agent ``sft`` stage data-parallel under a real ``torchrun`` (2 ranks, gloo).

One 2-rank run (gradient accumulation, unequal span weights, so the ranks' micro-batches
carry different target weights) is the reference: it must end where one process drawing
both shards (``shards=2``) ends, to float tolerance, with equal weights on both ranks, rank 0
alone evaluating and writing, and a resumed 2-rank run must repeat it bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.test_checkpoint import assert_same_run
from tests.trainer.test_distributed import DRIVER, torchrun
from trainer.agent.data import BucketSampler, ShardedBucketSampler
from trainer.config import ConfigError, config_from_dict
from trainer.distributed import state_digest
from trainer.train import main

from .test_agent_train import CONFIG, overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the shared driver, noting the agent runner's evaluations instead of the transition and QA ones
_EVAL_PATCH = DRIVER[DRIVER.index("from trainer import evaluation") : DRIVER.index("kill = ")]
AGENT_DRIVER = DRIVER.replace(
    _EVAL_PATCH,
    """from trainer.agent import runner
metrics = runner.AgentTrainer._eval_metrics
def metrics_and_note(self, algo):
    note("evaluate")
    return metrics(self, algo)
runner.AgentTrainer._eval_metrics = metrics_and_note

""",
)

# small evaluations, a checkpoint every step: what every data-parallel agent test runs with
QUICK_EVAL = [
    "eval.every=2",
    "eval.episodes=1",
    "eval.max_episode_steps=2",
    "agent.eval_turns=2",
    "agent.max_new_tokens=8",
    "agent.teacher=null",
    "checkpoint.every=1",
]
EXTRA = [
    "stages.0.steps=4",
    "stages.0.batch_size=4",
    "stages.0.grad_accumulation=2",
    "stages.0.span_weights={reasoning: 0.3, action: 2.0, other: 1.0}",
    *QUICK_EVAL,
]


@pytest.fixture(scope="module")
def ddp(agent_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("agent_ddp")
    (tmp / "driver.py").write_text(AGENT_DRIVER)
    run, events = tmp / "two-ranks", tmp / "events"
    events.mkdir()
    args = [str(CONFIG), *overrides(agent_store, run, *EXTRA)]
    proc = torchrun(tmp, args, env={"DDP_EVENTS": str(events), "DDP_OUT": str(run)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "store": agent_store, "run": run, "events": events}


def _final(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "final-sft.pt", weights_only=True)["algo_state"]


def test_two_ranks_train_what_one_process_with_two_shards_trains(
    ddp: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """4 steps of 2 micro-batches of 4 episodes (2 per rank) end where one process drawing
    both shards' episodes ends: the loss is normalised by the global target weight."""
    one = ddp["tmp"] / "one-process"
    assert main([str(CONFIG), *overrides(ddp["store"], one, *EXTRA), "shards=2"]) == 0
    capsys.readouterr()
    a, b = _final(ddp["run"]), _final(one)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    sa = json.loads((ddp["run"] / "summary.json").read_text())
    sb = json.loads((one / "summary.json").read_text())
    for key in ("tokens", "episodes_per_step", "epochs_done"):
        assert sa["stages"][0][key] == sb["stages"][0][key], key
    assert sa["data_parallel"]["ranks"] == 2 and sa["data_parallel"]["shards"] == 2
    assert sb["data_parallel"]["ranks"] == 1 and sb["data_parallel"]["shards"] == 2
    evals = {
        name: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for name, run in (("ranks", ddp["run"]), ("one", one))
    }
    ea = [r for r in evals["ranks"] if r["kind"] == "eval"]
    eb = [r for r in evals["one"] if r["kind"] == "eval"]
    assert [r["step"] for r in ea] == [r["step"] for r in eb] == [2, 4]
    for x, y in zip(ea, eb):
        assert x["eval/action_accuracy"] == pytest.approx(y["eval/action_accuracy"], abs=1e-6)


def test_every_rank_ends_with_the_same_weights_and_only_rank_0_evaluates_and_writes(
    ddp: dict[str, Path],
) -> None:
    dp = json.loads((ddp["run"] / "summary.json").read_text())["data_parallel"]
    (d0, d1) = dp["state_sha256"]["sft"]
    assert d0 == d1
    final = torch.load(ddp["run"] / "checkpoints" / "final-sft.pt", weights_only=True)
    assert len(final["ranks"]) == 2  # both ranks' generators, for an exact resume
    logs = {r: ddp["events"] / f"rank{r}.log" for r in (0, 1)}
    assert not logs[1].exists()  # no evaluation, no file opened for writing, no mkdir
    rank0 = logs[0].read_text().splitlines()
    assert rank0.count("evaluate") == 2
    written = {e.split(" ", 1)[1] for e in rank0 if e != "evaluate"}
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png"):
        assert name in written, name
    assert any(w.startswith("checkpoints") for w in written)
    assert any(w.startswith("model") for w in written)
    assert (ddp["run"] / "model" / "config.json").is_file()


def test_a_two_rank_run_resumes_on_two_ranks_bit_for_bit(ddp: dict[str, Path]) -> None:
    """The reference run cut back to its checkpoint of step 2 goes on under torchrun to the
    same checkpoints and metrics."""
    out = ddp["tmp"] / "resumed"
    shutil.copytree(ddp["run"], out)
    for f in (out / "checkpoints").glob("*.pt"):
        if f.name.startswith("final-") or (f.name.startswith("step-") and int(f.name[5:-3]) > 2):
            f.unlink()
    for name in ("summary.json", "curves.png"):
        (out / name).unlink()
    shutil.rmtree(out / "model")
    args = [str(CONFIG), *overrides(ddp["store"], out, *EXTRA), "--resume"]
    proc = torchrun(ddp["tmp"], args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 2)" in proc.stderr
    assert_same_run(ddp["run"], out)
    assert state_digest(_final(out)) == state_digest(_final(ddp["run"]))


def test_sharded_sampler_one_process_draws_the_union_of_the_ranks() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=60)
    pool = np.flatnonzero(rng.random(60) < 0.9)
    kw = {"stream": 0, "buckets": 3, "total_steps": 10, "start_tokens": 40, "full_at": 0.5}
    whole = ShardedBucketSampler(lengths, pool, 8, 7, shards=2, local=range(2), **kw)
    ranks = [ShardedBucketSampler(lengths, pool, 8, 7, shards=2, local=range(r, r + 1), **kw)
             for r in (0, 1)]  # fmt: skip
    for _ in range(10):
        union = whole.sample()
        parts = [s.sample() for s in ranks]
        assert len(parts[0]) == len(parts[1]) == 4
        np.testing.assert_array_equal(union, np.concatenate(parts))
        np.testing.assert_array_equal(whole.last_all, union)
        assert set(parts[0]).isdisjoint(parts[1])  # shards are disjoint runs of episodes
    plain = BucketSampler(lengths, pool, 8, 7, **kw)
    assert plain.shard == (0, 1)
    with pytest.raises(ValueError, match="not divisible by the 2 shards"):
        ShardedBucketSampler(lengths, pool, 5, 7, shards=2, local=range(1), **kw)


def test_shards_config_for_sequence_stores(tmp_path: Path) -> None:
    base = {"store": "s", "out": "o"}
    sft = {"algo": "sft", "steps": 1, "batch_size": 4}
    assert config_from_dict({**base, "shards": 2, "stages": [sft]}).shards == 2
    with pytest.raises(ConfigError, match=r"stages.0.batch_size: 5 is the global batch"):
        config_from_dict({**base, "shards": 2, "stages": [{**sft, "batch_size": 5}]})
    ppo = {**sft, "algo": "ppo"}  # the RL stages split their prompts over the shards too
    assert config_from_dict({**base, "shards": 2, "stages": [sft, ppo]}).shards == 2


def test_lora_bf16_on_two_ranks_ends_with_equal_adapters(ddp: dict[str, Path]) -> None:
    """Under LoRA and bf16 autocast the ranks broadcast, average and step the adapters
    alike: the stage's end finds their digests equal, and only the adapters are saved."""
    out = ddp["tmp"] / "lora-bf16"
    extra = [*EXTRA, "stages.0.steps=2", "eval.episodes=0", "precision=bf16",
             "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"]  # fmt: skip
    proc = torchrun(ddp["tmp"], [str(CONFIG), *overrides(ddp["store"], out, *extra)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    dp = json.loads((out / "summary.json").read_text())["data_parallel"]
    (d0, d1) = dp["state_sha256"]["sft"]
    assert d0 == d1
    state = _final(out)
    assert state and all("lora_" in k for k in state)


def test_a_batch_the_ranks_cannot_split_is_one_line_from_rank_0(ddp: dict[str, Path]) -> None:
    out = ddp["tmp"] / "odd-batch"
    args = [str(CONFIG), *overrides(ddp["store"], out, *EXTRA, "stages.0.batch_size=5")]
    proc = torchrun(ddp["tmp"], args)
    assert proc.returncode != 0  # the ranks exit with 2, torchrun with 1
    ours = [x for x in proc.stderr.splitlines() if x.startswith("trainer.train:")]
    assert ours == [
        "trainer.train: error: stages.0.batch_size: 5 is the global batch, split evenly over "
        "the 2 ranks; make it a multiple of 2"
    ], proc.stderr[-3000:]
    assert not out.exists()  # nothing written
