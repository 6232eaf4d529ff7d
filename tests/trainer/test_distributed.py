"""Data-parallel training under a real ``torchrun`` (2 ranks, gloo, CPU).

One 2-rank run of BC -> IQL -> CQL is the reference of the module: it must match a single
process drawing the same shards to float tolerance, keep every rank's weights equal, leave
the writing to rank 0, and be what a killed run continues to, bit for bit, after
``--resume`` and after a torchrun restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.trainer.test_checkpoint import assert_same_run, comparable_rows
from tests.trainer.test_train import tiny_config, write_config, write_store
from trainer.config import ConfigError, config_from_dict
from trainer.distributed import Distributed, state_digest
from trainer.loop import resolved_shards
from trainer.train import main

ROOT = Path(__file__).resolve().parents[2]

# trainer.train under torchrun, with two things only a test needs: every rank notes what
# it evaluates (a transition or a QA evaluation, the QA halting rules) and what it writes
# under the run directory (DDP_EVENTS/rank<R>.log), and
# DDP_KILL=STAGE:STEP:RANK SIGKILLs that rank as it draws that step's batch (on torchrun's
# first attempt only: a restarted worker trains on).
DRIVER = """
import os, signal, sys
events, out = os.environ.get("DDP_EVENTS"), os.environ.get("DDP_OUT", "")
rank = os.environ["RANK"]

def note(what):
    if events:
        with open(os.path.join(events, f"rank{rank}.log"), "a") as f:
            f.write(what + "\\n")

WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def audit(event, args):
    if event == "open" and out and str(args[0]).startswith(out):
        mode, flags = args[1], args[2] or 0
        if (mode and any(c in mode for c in "wax+")) or (flags & WRITE):
            note(f"write {os.path.relpath(str(args[0]), out)}")
    elif event in ("os.mkdir", "os.remove", "os.rename") and str(args[0]).startswith(out):
        note(f"{event} {os.path.relpath(str(args[0]), out)}")

sys.addaudithook(audit)

from trainer import evaluation
evaluate = evaluation.Evaluator.__call__
def evaluate_and_note(self, algo):
    note("evaluate")
    return evaluate(self, algo)
evaluation.Evaluator.__call__ = evaluate_and_note

from trainer.qa.runner import QAEvaluator
call, rules = QAEvaluator.__call__, QAEvaluator.halting_rules
def call_and_note(self, model, *, halting):
    note("evaluate")
    return call(self, model, halting=halting)
def rules_and_note(self, model, n_taus=19):
    note("halting_rules")
    return rules(self, model, n_taus)
QAEvaluator.__call__, QAEvaluator.halting_rules = call_and_note, rules_and_note

kill = os.environ.get("DDP_KILL")
if kill and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    stage, step, victim = map(int, kill.split(":"))
    if int(rank) == victim:
        from trainer.samplers import TransitionSampler
        sample = TransitionSampler.sample
        def sample_or_die(self):
            if self.stream == stage and self.step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return sample(self)
        TransitionSampler.sample = sample_or_die

from trainer.train import main
sys.exit(main(sys.argv[1:]))
"""


def torchrun(
    tmp: Path,
    args: list[str],
    *,
    ranks: int = 2,
    env: dict[str, str] | None = None,
    restarts: int = 0,
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node RANKS [--max-restarts N] DRIVER ARGS``."""
    driver = tmp / "driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={ranks}", f"--max-restarts={restarts}", str(driver), *args,
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def ddp_config(store: Path) -> dict[str, Any]:
    """BC 200 -> IQL 200 -> CQL 60, tiny networks in float32, a checkpoint every 20 steps
    (all kept) and a metrics row every 30 (rows and checkpoints out of phase)."""
    raw = tiny_config(store, store.parent / "unused", log_every=30)
    net = {"hidden": [16, 16], "compute_dtype": "float32", "batch_size": 32}
    critic = {**net, "critic_hidden": [16, 16]}
    raw["stages"] = [
        {"algo": "bc", "steps": 200, **net},
        {"algo": "iql", "steps": 200, "init": "bc", **critic},
        # CQL draws random actions: each rank's generators are checkpointed and restored
        {
            "algo": "cql",
            "steps": 60,
            "init": "bc",
            "lr_schedule": "cosine",
            "n_action_samples": 2,
            "penalty_dtype": "float32",
            **critic,
        },
    ]
    raw["eval"] = {"every": 100, "episodes": 1, "val_transitions": 64}
    raw["checkpoint"] = {"every": 20, "keep_last": 30}
    return raw


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The store, the config, and the reference 2-rank run with its ranks' event logs."""
    tmp = tmp_path_factory.mktemp("ddp")
    store = write_store(tmp, "pendulum")
    cfg = write_config(tmp / "ddp.yaml", ddp_config(store))
    run, events = tmp / "two-ranks", tmp / "events"
    events.mkdir()
    proc = torchrun(
        tmp, [str(cfg), f"out={run}"], env={"DDP_EVENTS": str(events), "DDP_OUT": str(run)}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "store": store, "cfg": cfg, "run": run, "events": events}


def _events(setup: dict[str, Path], rank: int) -> list[str]:
    log = setup["events"] / f"rank{rank}.log"
    return log.read_text().splitlines() if log.exists() else []


def _modules(run: Path, stage: str) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = torch.load(run / "checkpoints" / f"final-{stage}.pt", weights_only=True)
    return ckpt["algo_state"]["modules"]


def test_two_ranks_train_what_one_process_with_two_shards_trains(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """200 BC + 200 IQL steps on 2 ranks (each its own shard, batch 16 each, gradients
    averaged) end where one process drawing both shards' 32 rows ends, to float tolerance."""
    one = setup["tmp"] / "one-process"
    assert main([str(setup["cfg"]), f"out={one}", "shards=2", "stages.2.steps=1"]) == 0
    capsys.readouterr()
    for stage in ("bc", "iql"):
        a, b = _modules(setup["run"], stage), _modules(one, stage)
        for net in ("actor", "critic", "target_critic", "value"):
            if net in a:
                for k in a[net]:
                    torch.testing.assert_close(
                        a[net][k], b[net][k], atol=2e-5, rtol=1e-4, msg=f"{stage} {net}.{k}"
                    )
    rows = {
        name: [r for r in comparable_rows(run) if r["kind"] == "train" and r["stage"] != "cql"]
        for name, run in (("ranks", setup["run"]), ("one", one))
    }
    assert [r["step"] for r in rows["ranks"]] == [r["step"] for r in rows["one"]]
    assert len(rows["ranks"]) == 14  # 7 rows per stage: 30, 60, ..., 180, 200
    for x, y in zip(rows["ranks"], rows["one"]):
        for k in ("bc_loss", "v_loss", "q_loss", "actor_loss", "adv_mean"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)

    summary = json.loads((setup["run"] / "summary.json").read_text())
    dp = summary["data_parallel"]
    assert dp["ranks"] == 2 and dp["shards"] == 2 and sum(dp["shard_transitions"]) == 300
    assert summary["split"]["train_transitions"] == 300
    assert yaml.safe_load((setup["run"] / "config.yaml").read_text())["shards"] == 2


def test_every_rank_ends_with_the_same_weights_targets_and_optimizers(
    setup: dict[str, Path],
) -> None:
    """Each stage's end compares the ranks' sha256 of the final state (weights, target
    critics, temperature, optimizer moments); summary.json lists them."""
    digests = json.loads((setup["run"] / "summary.json").read_text())["data_parallel"]
    assert set(digests["state_sha256"]) == {"bc", "iql", "cql"}
    final = torch.load(setup["run"] / "checkpoints" / "final-cql.pt", weights_only=True)
    for stage, per_rank in digests["state_sha256"].items():
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1], stage
    assert digests["state_sha256"]["cql"][0] == state_digest(final["algo_state"])
    assert len(final["ranks"]) == 2  # both ranks' generators, for an exact resume
    assert not torch.equal(final["ranks"][0]["rng"]["torch"], final["ranks"][1]["rng"]["torch"])


def test_only_rank_0_evaluates_and_writes(setup: dict[str, Path]) -> None:
    rank0, rank1 = _events(setup, 0), _events(setup, 1)
    assert rank1 == []  # no evaluation, no file opened for writing, no mkdir, no rename
    assert rank0.count("evaluate") == 5  # BC and IQL at stage steps 100 and 200, CQL at 60
    written = {e.split(" ", 1)[1] for e in rank0 if not e.startswith("evaluate")}
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png"):
        assert name in written, name
    assert any(w.startswith("tensorboard") for w in written)
    assert any(w.startswith("checkpoints") for w in written)
    rows = comparable_rows(setup["run"])
    assert len([r for r in rows if r["kind"] == "eval"]) == 5  # written once, not per rank


def test_a_killed_run_resumes_bit_for_bit_with_resume_and_after_a_torchrun_restart(
    setup: dict[str, Path],
) -> None:
    """Rank 1 SIGKILLed in the CQL stage at global step 430 (the last checkpoint is 420, the
    metrics row of 430 is past it); ``--resume`` on 2 ranks goes on from 420 under
    ``--max-restarts 1``, loses rank 1 again at 450, and torchrun's restarted workers resume
    from 440 by themselves. Every checkpoint and metrics row ends as the reference run's."""
    out = setup["tmp"] / "killed"
    args = [str(setup["cfg"]), f"out={out}"]
    proc = torchrun(setup["tmp"], args, env={"DDP_KILL": "2:30:1"})
    assert proc.returncode != 0
    assert "trainer.train: error: rank 0 lost the other ranks" in proc.stderr
    steps = sorted(int(p.name[5:-3]) for p in (out / "checkpoints").glob("step-*.pt"))
    assert steps[-1] == 420 and not (out / "checkpoints" / "final-cql.pt").exists()
    assert max(r["step"] for r in comparable_rows(out)) == 430  # a row past the checkpoint

    proc = torchrun(setup["tmp"], [*args, "--resume"], env={"DDP_KILL": "2:50:1"}, restarts=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 420)" in proc.stderr and "torchrun restart 1: resuming" in proc.stderr
    assert "step-000000440.pt (step 440)" in proc.stderr
    assert_same_run(setup["run"], out)


def test_one_process_resumes_a_two_rank_checkpoint_with_the_runs_shards(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The reference run cut back to its checkpoint of step 420 goes on in one process
    with shards=2 (refused without: the batches would change)."""
    import shutil

    out = setup["tmp"] / "one-process-resume"
    shutil.copytree(setup["run"], out)
    for f in (out / "checkpoints").glob("*.pt"):
        if f.name.endswith("-cql.pt") or (f.name.startswith("step-") and int(f.name[5:-3]) > 420):
            f.unlink()
    args = [str(setup["cfg"]), f"out={out}", "--resume"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "`shards` differs" in err and "pass shards=N to resume an N-rank run" in err
    assert main([*args, "shards=2"]) == 0
    assert "resuming" in capsys.readouterr().err
    final = torch.load(out / "checkpoints" / "final-cql.pt", weights_only=True)
    assert final["step"] == 460 and "ranks" not in final
    for stage in ("bc", "iql"):  # untouched
        assert state_digest(_modules(out, stage)) == state_digest(_modules(setup["run"], stage))


def test_more_ranks_than_training_episodes_is_one_line_from_rank_0(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    store = write_store(tmp_path, "pendulum", episodes=1)
    raw = tiny_config(store, tmp_path / "run", val_fraction=0.0)
    raw["stages"] = [{"algo": "bc", "steps": 5, "batch_size": 8, "hidden": [8]}]
    cfg = write_config(tmp_path / "c.yaml", raw)
    proc = torchrun(setup["tmp"], [str(cfg)])
    assert proc.returncode != 0
    ours = [x for x in proc.stderr.splitlines() if x.startswith("trainer.train:")]
    assert ours == [
        f"trainer.train: error: {store}: 1 training episode(s) cannot be shared by 2 ranks: "
        "every shard needs an episode (start fewer ranks, or lower val_fraction)"
    ], proc.stderr[-3000:]
    assert "Traceback" not in "\n".join(ours)
    assert not (tmp_path / "run").exists()  # nothing written


def test_batch_sizes_split_evenly_over_ranks_and_shards(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path / "store", tmp_path / "run")
    raw["stages"][1]["batch_size"] = 33
    cfg = config_from_dict(raw)
    with pytest.raises(ConfigError, match=r"stages.1.batch_size: 33 is the global batch, split "
                       r"evenly over the 2 ranks; make it a multiple of 2"):  # fmt: skip
        resolved_shards(cfg, Distributed(0, 2))
    assert resolved_shards(cfg, Distributed(0, 1)) == 1
    with pytest.raises(ConfigError, match=r"over shards=2; make it a multiple of 2"):
        config_from_dict({**raw, "shards": 2})
    raw["stages"][0]["batch_size"] = raw["stages"][1]["batch_size"] = 48
    with pytest.raises(ConfigError, match=r"shards: 3 shards cannot be shared evenly by 2"):
        resolved_shards(config_from_dict({**raw, "shards": 3}), Distributed(0, 2))
    assert resolved_shards(config_from_dict({**raw, "shards": 4}), Distributed(1, 2)) == 4


def test_d3rlpy_stages_refuse_several_ranks(tmp_path: Path) -> None:
    from trainer.loop import RunError, Trainer

    raw = tiny_config(tmp_path / "store", tmp_path / "run")
    raw["stages"][1] = {"algo": "d3rlpy.IQL", "steps": 2}
    trainer = Trainer(config_from_dict(raw), dist=Distributed(0, 2))
    with pytest.raises(RunError, match=r"stages.1.algo: d3rlpy.IQL trains on one process"):
        trainer._check_data_parallel()


def test_the_launch_is_read_from_torchruns_variables() -> None:
    from trainer.distributed import LaunchEnv, launch_env

    assert launch_env({}) is None  # python -m trainer.train
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert launch_env(env) == LaunchEnv(rank=3, world_size=4, local_rank=1, restart_count=2)
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1"}) == LaunchEnv(0, 1, 0, 0)


def test_bench_ddp_quick_prints_the_table(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_ddp
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert bench_ddp.main(["--store", str(setup["store"]), "--quick", "--batches", "32"]) == 0
    out = capsys.readouterr().out
    table = [x for x in out.splitlines() if x.startswith("|")]
    assert table[0] == (
        "| algo | global batch | per rank | 1 process steps/s | 2 ranks steps/s "
        "| 2 ranks / 1 process |"
    )
    for row, algo in zip(table[2:], ("bc", "iql"), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == [algo, "32", "16"]
        one, two = (float(c.replace(",", "")) for c in cells[3:5])
        assert one > 0 and two > 0
        assert cells[5].endswith("x")
        assert float(cells[5][:-1]) == pytest.approx(two / one, rel=0.05, abs=0.01)
    assert bench_ddp.main(["--store", str(setup["tmp"] / "nostore"), "--quick"]) == 2
    assert bench_ddp.main(["--store", str(setup["store"]), "--batches", "33"]) == 2
