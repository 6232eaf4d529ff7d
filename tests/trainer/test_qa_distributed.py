"""QA stages data-parallel under a real ``torchrun`` (2 ranks, gloo, CPU), and the gradient
arithmetic that makes the ranks' average the gradient of the union batch.

A 2-rank run of qa_supervised -> qa_hybrid must end where one process drawing the same two
shards ends (to float tolerance), keep every rank's weights and optimizer states equal,
leave evaluating and writing to rank 0, and resume on 2 ranks to the same end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.segments.store import SegmentStore
from trainer.config import ConfigError, load_config
from trainer.distributed import Distributed, state_digest
from trainer.qa.data import CurriculumSampler, QAArrays, QABatch, collate
from trainer.qa.runner import (
    HybridParams,
    HybridStage,
    QATrainer,
    SupervisedParams,
    SupervisedStage,
)
from trainer.train import main

from .test_distributed import torchrun as ddp_torchrun
from .test_qa_accumulation import grads
from .test_qa_data import arrays, build_tiny_store, store, tiny_reader  # noqa: F401
from .test_qa_train import CONFIG, overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 4 questions a step (2 a rank), the hybrid stage in 2 micro-batches a step; the trained
# weights handed on (not the best), so both runs end on what they trained.
SETTINGS = [
    "stages.1.grad_accumulation=2",
    "stages.1.grad_clip=1.0",
    "qa.restore_best=false",
    "qa.policy_holdout=0.0",  # the tiny store holds 1 question out: too few for 2 shards
]


def torchrun(
    tmp: Path, args: list[str], run: Path, events: Path
) -> subprocess.CompletedProcess[str]:
    """2 ranks of trainer.train under the shared test driver, noting into ``events``."""
    events.mkdir(exist_ok=True)
    return ddp_torchrun(tmp, args, env={"DDP_EVENTS": str(events), "DDP_OUT": str(run)})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny store and the reference 2-rank run with its ranks' event logs."""
    tmp = tmp_path_factory.mktemp("qa_ddp")
    qa_store = build_tiny_store(tmp)
    run, events = tmp / "two-ranks", tmp / "events"
    proc = torchrun(tmp, [str(CONFIG), *overrides(qa_store, run, *SETTINGS)], run, events)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "store": qa_store, "run": run, "events": events}


def _final(run: Path, stage: str) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / f"final-{stage}.pt", weights_only=True)


def _train_rows(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r["kind"] == "train"]


def test_two_ranks_train_what_one_process_with_two_shards_trains(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Both stages on 2 ranks (2 questions each a step, gradients averaged) end with the
    weights and Adam moments of one process drawing both shards, to float tolerance."""
    one = setup["tmp"] / "one-process"
    assert main([str(CONFIG), *overrides(setup["store"], one, *SETTINGS, "shards=2")]) == 0
    capsys.readouterr()
    for stage in ("supervised", "hybrid"):
        a, b = _final(setup["run"], stage), _final(one, stage)
        assert a["algo_state"].keys() == b["algo_state"].keys()
        for k, v in a["algo_state"].items():
            torch.testing.assert_close(v, b["algo_state"][k], atol=2e-5, rtol=1e-4, msg=k)
        for name, opt in a["optimizers"].items():
            for i, st in opt["state"].items():
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(
                        st[key], b["optimizers"][name]["state"][i][key], atol=1e-6, rtol=1e-3
                    )
    ranks, single = _train_rows(setup["run"]), _train_rows(one)
    assert [r["step"] for r in ranks] == [r["step"] for r in single] == list(range(1, 9))
    for x, y in zip(ranks, single):
        for k in ("loss/span", "loss/policy", "loss/value", "episode/return", "grad_norm/qa"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    dp = json.loads((setup["run"] / "summary.json").read_text())["data_parallel"]
    assert dp["ranks"] == 2 and dp["shards"] == 2
    assert json.loads((one / "summary.json").read_text())["data_parallel"]["ranks"] == 1


def test_every_rank_ends_each_stage_with_the_same_weights_and_optimizers(
    setup: dict[str, Path],
) -> None:
    digests = json.loads((setup["run"] / "summary.json").read_text())["data_parallel"]
    assert set(digests["state_sha256"]) == {"supervised", "hybrid"}
    for stage, per_rank in digests["state_sha256"].items():
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1], stage
        final = _final(setup["run"], stage)
        want = {"model": final["algo_state"], "optimizers": final["optimizers"]}
        assert per_rank[0] == state_digest(want), stage
        assert len(final["ranks"]) == 2  # both ranks' generators, for an exact resume


def test_only_rank_0_evaluates_and_writes(setup: dict[str, Path]) -> None:
    log = {r: setup["events"] / f"rank{r}.log" for r in (0, 1)}
    assert not log[1].exists()  # no evaluation, no file opened for writing, no mkdir
    rank0 = log[0].read_text().splitlines()
    # the baseline of the hybrid stage, then each stage at stage steps 2 and 4
    assert rank0.count("evaluate") == 5 and rank0.count("halting_rules") == 1
    written = {e.split(" ", 1)[1] for e in rank0 if " " in e}
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png"):
        assert name in written, name
    assert any(w.startswith("checkpoints") for w in written)
    rows = [json.loads(x) for x in (setup["run"] / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["kind"] == "eval"]) == 4  # written once, not per rank
    assert len([r for r in rows if r["kind"] == "baseline"]) == 1
    summary = json.loads((setup["run"] / "summary.json").read_text())
    assert summary["stages"][1]["halting_rules"]["first_k"]


def test_a_two_rank_run_resumes_on_two_ranks_to_the_same_end(setup: dict[str, Path]) -> None:
    """The reference run cut back to its checkpoint of step 6 (mid-hybrid) goes on with
    ``--resume`` on 2 ranks and ends with the same weights, bit for bit."""
    out = setup["tmp"] / "resumed"
    shutil.copytree(setup["run"], out)
    for f in (out / "checkpoints").glob("*.pt"):
        if f.name.endswith("-hybrid.pt") or (f.name.startswith("step-") and int(f.name[5:-3]) > 6):
            f.unlink()
    args = [str(CONFIG), *overrides(setup["store"], out, *SETTINGS), "--resume"]
    proc = torchrun(setup["tmp"], args, out, setup["tmp"] / "events-resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 6)" in proc.stderr
    a, b = _final(setup["run"], "hybrid"), _final(out, "hybrid")
    assert state_digest(a["algo_state"]) == state_digest(b["algo_state"])
    assert state_digest(a["optimizers"]) == state_digest(b["optimizers"])


def test_a_batch_the_ranks_cannot_split_is_refused_in_one_line(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    cfg = load_config(CONFIG, overrides(setup["store"], tmp_path / "run", "stages.0.batch_size=3"))
    with pytest.raises(ConfigError) as e:
        QATrainer(cfg, dist=Distributed(0, 2)).run()
    assert str(e.value) == (
        "stages.0.batch_size: 3 is the global batch, split evenly over the 2 ranks; "
        "make it a multiple of 2"
    )
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- arithmetic


class _Ranks(Distributed):
    """Rank ``rank`` of 2 as the stages see it, without a process group: the segment count
    all-reduce answers with the ranks' true mean; the gradient average is left to the test."""

    def __init__(self, rank: int, segments: list[int]) -> None:
        super().__init__(rank, len(segments))
        self.enabled = True
        self.segments = segments

    def mean_and_any(self, values: dict[str, float], flag: bool) -> tuple[dict[str, float], bool]:
        assert values["segments"] == self.segments[self.rank]
        return {"segments": sum(self.segments) / self.world_size}, flag

    def average_gradients(self, params: Any) -> None:
        pass


def _two_ranks_vs_one(make_stage: Any, shards: list[QABatch], micro: list[list[int]]) -> None:
    """Each rank's gradient of its own micro-batches (ids ``micro[r]``), averaged, equals
    the gradient of one process over every micro-batch."""
    per_rank = []
    counts = [sum(int(shards[i].segment_mask.sum()) for i in ids) for ids in micro]
    for r, ids in enumerate(micro):
        stage = make_stage(_Ranks(r, counts))  # the same start: make_stage seeds
        stage.update([shards[i] for i in ids], 0, ids)
        per_rank.append(grads(stage.model))
    one = make_stage(None)
    order = [i for ids in micro for i in ids]
    one.update([shards[i] for i in order], 0, order)
    want = grads(one.model)
    moved = 0
    for k, g in want.items():
        avg = (per_rank[0][k] + per_rank[1][k]) / 2
        torch.testing.assert_close(avg, g, rtol=1e-4, atol=1e-6, msg=k)
        moved += int(bool(g.abs().sum() > 0))
    assert moved > 0


def _batches(arrays: QAArrays) -> list[QABatch]:  # noqa: F811
    # unequal segment counts: a per-rank mean of the span loss would weigh them wrongly
    return [collate(arrays, np.arange(0, 3)), collate(arrays, np.arange(3, 12))]


def test_the_ranks_average_is_the_supervised_gradient_of_the_union_batch(
    store: SegmentStore,  # noqa: F811
    arrays: QAArrays,  # noqa: F811
) -> None:
    batches = _batches(arrays)
    assert int(batches[0].segment_mask.sum()) != int(batches[1].segment_mask.sum())

    def make(dist: Distributed | None) -> SupervisedStage:
        torch.manual_seed(0)
        return SupervisedStage(tiny_reader(store), SupervisedParams(lr=0.0), dist=dist)

    _two_ranks_vs_one(make, batches, [[0], [1]])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_ranks_average_is_the_hybrid_gradient_of_all_micro_batches(
    store: SegmentStore,  # noqa: F811
    arrays: QAArrays,  # noqa: F811
    accumulation: int,
) -> None:
    """The span loss weighs every segment of both ranks alike (its weight uses the global
    segment count), each micro-batch's policy and value losses 1 / all micro-batches."""
    base = _batches(arrays)
    more = [collate(arrays, np.arange(12, 14)), collate(arrays, np.arange(14, 20))]
    shards = base if accumulation == 1 else [base[0], base[1], more[0], more[1]]
    micro = [[0], [1]] if accumulation == 1 else [[0, 2], [1, 3]]

    def make(dist: Distributed | None) -> HybridStage:
        torch.manual_seed(0)
        p = HybridParams(qa_lr=0.0, policy_lr=0.0, grad_accumulation=accumulation)
        return HybridStage(tiny_reader(store), p, seed=0, stream=1, answer_threshold=0.0, dist=dist)

    _two_ranks_vs_one(make, shards, micro)


def test_shards_deal_the_questions_and_one_process_draws_the_ranks_union(
    arrays: QAArrays,  # noqa: F811
) -> None:
    pool = np.arange(arrays.n_examples)
    kw = {"stream": 1, "total_steps": 10, "start_segments": 2, "full_at": 0.5}
    whole = CurriculumSampler(arrays.n_segments, pool, 8, 3, shards=4, **kw)
    ranks = [
        CurriculumSampler(
            arrays.n_segments, pool, 8, 3, shards=4, local=range(2 * r, 2 * r + 2), **kw
        )
        for r in (0, 1)
    ]
    for step in range(10):
        union = np.concatenate([s.indices(step) for s in ranks])
        np.testing.assert_array_equal(whole.indices(step), union)
        lim = whole.limit(step)
        shortest = [int(arrays.n_segments[whole.pool[r::4]].min()) for r in range(4)]
        for r, part in enumerate(whole.shard_indices(step)):
            assert len(part) == 2 and set(part) <= set(whole.pool[r::4])
            assert arrays.n_segments[part].max() <= max(lim, shortest[r])
    one = CurriculumSampler(arrays.n_segments, pool, 8, 3, **kw)
    assert not all(np.array_equal(one.indices(s), whole.indices(s)) for s in range(10))
    with pytest.raises(ValueError, match="not divisible by the 3 shards"):
        CurriculumSampler(arrays.n_segments, pool, 8, 3, shards=3, **kw)
