"""QA training through ``trainer.train``: the run directory, exact resume, init-from, early
stopping with best-model restore, and one-line user errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.segments.store import open_segment_store
from trainer.checkpoint import load_checkpoint
from trainer.config import ConfigError, load_config
from trainer.loop import Interrupted
from trainer.qa import runner, wants_qa_runner
from trainer.qa.runner import HybridStage, QATrainer, holdout_mask
from trainer.train import main

from .test_checkpoint import assert_same_run, finish, start_killed_training, train_here
from .test_qa_data import build_tiny_store
from .test_train import CLOCK_KEYS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "qa-demo.yaml"
TINY = [
    "qa.model.d_model=16",
    "qa.model.n_layers=1",
    "qa.model.n_heads=2",
    "qa.model.ffn_dim=32",
    "qa.model.memory_dim=8",
    "qa.model.head_hidden=8",
    "stages.0.batch_size=4",
    "stages.1.batch_size=4",
    "stages.0.steps=4",
    "stages.1.steps=4",
    "stages.1.eval_every=null",  # the demo config's hybrid schedule; the tests use eval.every
    "stages.1.value_warmup_steps=1",  # the demo's 20 would leave the policy untrained here
    "eval.every=2",
    "checkpoint.every=2",
    "checkpoint.keep_last=20",
    "log_every=1",
    "tensorboard=false",
    "progress=false",
    "num_threads=1",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_store(tmp_path_factory.mktemp("qa_train_store"))


def overrides(store: Path, out: Path, *extra: str) -> list[str]:
    return [f"store={store}", f"out={out}", *TINY, *extra]


def rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def test_cli_trains_both_stages_and_writes_the_run_directory(
    tiny_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", str(CONFIG), *overrides(tiny_store, out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "supervised" in proc.stdout and "hybrid" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    ckpts = {p.name for p in (out / "checkpoints").iterdir()}
    assert {"final-supervised.pt", "final-hybrid.pt", "best-supervised.pt"} <= ckpts
    evals = [r for r in rows(out) if r["kind"] == "eval"]
    assert {r["stage"] for r in evals} == {"supervised", "hybrid"}
    for r in evals:
        for key in ("eval/f1", "eval/exact_match", "eval/fraction_read", "step", "algo"):
            assert key in r, key
        assert 0 <= r["eval/f1"] <= 100 and 0 < r["eval/fraction_read"] <= 1
    sup = [r for r in evals if r["stage"] == "supervised"]
    assert all(r["eval/fraction_read"] == 1.0 for r in sup)  # reads everything
    assert any(r["kind"] == "baseline" for r in rows(out))
    hybrid_train = [r for r in rows(out) if r["kind"] == "train" and r["stage"] == "hybrid"]
    assert [r["policy/entropy_coef"] > 0 for r in hybrid_train] == [False, True, True, True]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["supervised", "hybrid"]
    for s in summary["stages"]:
        assert s["steps"] == 4 and s["final_eval"] is not None and s["examples_per_s"] > 0
        assert set(s["read_everything"]) == {"f1", "exact_match"}
    assert summary["baseline"]["fraction_read"] == 1.0
    assert {"f1", "exact_match"} <= set(summary["baseline"])
    assert summary["hybrid"]["segment_cost"] == 0.01
    assert "f1_delta" in summary["hybrid_vs_baseline"]
    cfg = (out / "config.yaml").read_text()
    assert "qa_hybrid" in cfg and summary["store_hash"] in cfg
    ck = load_checkpoint(out / "checkpoints" / "final-hybrid.pt")
    assert ck["meta"]["kind"] == "qa" and bool(ck["algo_state"]["policy_trained"])


def _state(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / name)["algo_state"]


def _comparable(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in CLOCK_KEYS} for r in rows(run)]


def test_resume_after_a_signal_ends_with_the_same_weights_and_metrics(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ("stages.1.steps=6",)
    whole = tmp_path / "whole"
    QATrainer(load_config(CONFIG, overrides(tiny_store, whole, *extra)), log=lambda m: None).run()

    cut = tmp_path / "cut"
    real = HybridStage.update

    def update_then_signal(self: HybridStage, batch: Any, step: int) -> dict[str, Any]:
        out = real(self, batch, step)
        if step == 2:  # hybrid stage step 3: a SIGTERM between two checkpoints
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(HybridStage, "update", update_then_signal)
    with pytest.raises(Interrupted):
        QATrainer(load_config(CONFIG, overrides(tiny_store, cut, *extra)), log=lambda m: None).run()
    monkeypatch.setattr(HybridStage, "update", real)
    QATrainer(
        load_config(CONFIG, overrides(tiny_store, cut, *extra)), resume=True, log=lambda m: None
    ).run()

    a, b = _state(whole, "final-hybrid.pt"), _state(cut, "final-hybrid.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _comparable(whole) == _comparable(cut)
    sa = json.loads((whole / "summary.json").read_text())
    sb = json.loads((cut / "summary.json").read_text())
    assert sa["hybrid"] == sb["hybrid"] and sa["baseline"] == sb["baseline"]


def test_init_from_a_qa_checkpoint_starts_a_hybrid_only_run(
    tiny_store: Path, tmp_path: Path
) -> None:
    first = tmp_path / "first"
    QATrainer(load_config(CONFIG, overrides(tiny_store, first)), log=lambda m: None).run()
    ckpt = first / "checkpoints" / "final-supervised.pt"
    out = tmp_path / "sweep"
    cfg = load_config(
        CONFIG,
        overrides(
            tiny_store,
            out,
            "stages=[{algo: qa_hybrid, name: hybrid, steps: 2, batch_size: 4, segment_cost: 0.05}]",
            f"init_from={ckpt}",
        ),
    )
    summary = QATrainer(cfg, log=lambda m: None).run()
    base = _state(first, "final-supervised.pt")
    baseline_row = next(r for r in rows(out) if r["kind"] == "baseline")
    sup_final = json.loads((first / "summary.json").read_text())["stages"][0]
    handed = sup_final["best_eval"] if sup_final["handed_on"] == "best" else sup_final["final_eval"]
    # the baseline is the supervised model, reading everything
    assert baseline_row["baseline/f1"] == pytest.approx(handed["eval/f1"])
    assert summary["hybrid"]["segment_cost"] == 0.05
    assert "encoder.layers.0.linear1.weight" in base


def test_a_hybrid_stage_ended_in_its_value_warm_up_leaves_the_halting_head_untrained(
    tiny_store: Path, tmp_path: Path
) -> None:
    """The halting head gets no gradient in the value warm-up: a hybrid stage that ends
    there hands on ``policy_trained`` false, so the next hybrid stage starts a fresh one."""
    out = tmp_path / "warm"
    stages = (
        "[{algo: qa_supervised, name: supervised, steps: 1, batch_size: 4},"
        " {algo: qa_hybrid, name: warm, init: supervised, steps: 2, batch_size: 4,"
        "  value_warmup_steps: 5},"
        " {algo: qa_hybrid, name: hybrid, init: warm, steps: 1, batch_size: 4,"
        "  value_warmup_steps: 5, halt_bias_init: 3.0}]"
    )
    cfg = load_config(
        CONFIG, overrides(tiny_store, out, f"stages={stages}", "qa.eval_max_examples=4")
    )
    QATrainer(cfg, log=lambda m: None).run()
    warm, hybrid = _state(out, "final-warm.pt"), _state(out, "final-hybrid.pt")
    assert not bool(warm["policy_trained"]) and not bool(hybrid["policy_trained"])
    last = max(int(k.split(".")[1]) for k in hybrid if k.startswith("halt_head."))
    bias = f"halt_head.{last}.bias"
    assert torch.equal(warm[bias], torch.full_like(warm[bias], -2.0))  # the first reset's
    # the third stage reset the head with its own init, and warm-up kept it there
    assert torch.equal(hybrid[bias], torch.full_like(hybrid[bias], 3.0))


def test_early_stopping_stops_and_hands_on_the_best_weights(
    tiny_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "es"
    cfg = load_config(
        CONFIG,
        overrides(
            tiny_store,
            out,
            "stages.0.steps=10",
            "stages.0.eval_every=1",  # the stage's own schedule (eval.every=2 elsewhere)
            "early_stopping.metric=eval/full_segments_read",  # constant: the first eval stays best
            "early_stopping.mode=min",
            "early_stopping.patience=2",
        ),
    )
    summary = QATrainer(cfg, log=lambda m: None).run()
    sup = summary["stages"][0]
    assert sup["stopped_early"] and sup["steps"] == 3
    assert sup["best_eval"]["stage_step"] == 1 and sup["handed_on"] == "best"
    evals = [r for r in rows(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals if r["stage"] == "supervised"] == [1, 2, 3]
    assert [r["step"] for r in evals if r["stage"] == "hybrid"] == [5, 7]
    best, final = _state(out, "best-supervised.pt"), _state(out, "final-supervised.pt")
    for k in best:
        assert torch.equal(best[k], final[k]), k


def test_holdout_is_stable_per_document_and_near_its_fraction() -> None:
    ids = [f"doc-{i}" for i in range(4000)]
    held = holdout_mask(ids, 0.25)
    assert 0.22 < held.mean() < 0.28
    assert np.array_equal(held, holdout_mask(list(ids), 0.25))  # a function of the ids
    assert not holdout_mask(ids, 0.0).any()
    assert (held <= holdout_mask(ids, 0.5)).all()  # a larger fraction holds out a superset
    twice = holdout_mask([*ids[:10], *ids[:10]], 0.5)
    assert np.array_equal(twice[:10], twice[10:])


def test_hybrid_stages_read_the_held_out_documents_and_supervised_ones_the_rest(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pools: dict[int, np.ndarray] = {}
    real = runner.CurriculumSampler

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, n_segments: Any, pool: Any, *a: Any, stream: int, **kw: Any) -> None:
            pools[stream] = np.asarray(pool)
            super().__init__(n_segments, pool, *a, stream=stream, **kw)

    monkeypatch.setattr(runner, "CurriculumSampler", Recording)
    out = tmp_path / "held"
    cfg = load_config(CONFIG, overrides(tiny_store, out, "qa.policy_holdout=0.4"))
    summary = QATrainer(cfg, log=lambda m: None).run()
    store = open_segment_store(tiny_store)
    train = store.split_indices("train")
    sup, hyb = pools[0], pools[1]
    assert len(sup) and len(hyb) and not set(sup.tolist()) & set(hyb.tolist())
    assert sorted([*sup.tolist(), *hyb.tolist()]) == sorted(train.tolist())
    docs = store.examples.doc_id
    assert not {docs[e] for e in sup} & {docs[e] for e in hyb}  # whole documents
    assert summary["split"]["train_examples"] == {"qa_supervised": len(sup), "qa_hybrid": len(hyb)}


# --------------------------------------------------------------------------- user errors


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_user_errors_are_one_line(
    tiny_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = [str(CONFIG), *overrides(tiny_store, tmp_path / "e")]
    assert "segment store" in _err(capsys, [*base, "stages.0.algo=bc", "stages.1.algo=bc"])
    assert "stages.1.algo" in _err(capsys, [*base, "stages.1.algo=iql"])
    assert "stages.1.advantage" in _err(capsys, [*base, "stages.1.advantage=ppo"])
    assert "qa.model.n_heads" in _err(capsys, [*base, "qa.model.n_heads=3"])
    assert "qa.eval_split" in _err(capsys, [*base, "qa.eval_split=test"])
    assert "qa.policy_holdout" in _err(capsys, [*base, "qa.policy_holdout=1"])
    assert "qa.policy_holdout" in _err(capsys, [*base, "qa.policy_holdout=0.001"])  # none held
    from pipeline.build import build

    monkeypatch.chdir(ROOT)  # the golden spec's paths are relative to the repository
    transitions = build("tests/data/golden/golden.yaml", tmp_path / "s", progress=False).path
    err = _err(capsys, [str(CONFIG), *overrides(transitions, tmp_path / "t")])
    assert "not segments" in err and "qa_supervised" in err


def test_dispatch_and_config_checks(tiny_store: Path, tmp_path: Path) -> None:
    cfg = load_config(CONFIG, overrides(tiny_store, tmp_path / "x"))
    assert cfg.is_qa and wants_qa_runner(cfg)
    with pytest.raises(ConfigError, match="qa: must be a mapping"):
        load_config(CONFIG, [*overrides(tiny_store, tmp_path / "x"), "qa=3"])
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


def test_sigkill_mid_hybrid_then_resume_is_bit_for_bit_the_uninterrupted_run(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real process killed with SIGKILL (no handler runs) inside the hybrid stage, between
    two checkpoints, resumes (here) to the same bits as a run never interrupted (here,
    meanwhile)."""
    # rows at hybrid stage steps 3, 6, 8; checkpoints every 2 stage steps
    extra = ["stages.1.steps=8", "log_every=3", "eval.every=4", "qa.eval_max_examples=8"]

    def argv(out: Path, *flags: str) -> list[str]:
        return [str(CONFIG), *overrides(tiny_store, out, *extra), *flags]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    # killed after the row of hybrid stage step 6 (global 10), before its checkpoint
    victim = start_killed_training(argv(cut), kill_at=10)
    train_here(argv(whole), capsys)
    code, err = finish(victim)
    assert code == -signal.SIGKILL, err
    steps = sorted(int(p.name[5:-3]) for p in (cut / "checkpoints").glob("step-*.pt"))
    assert steps[-1] == 8 and not (cut / "summary.json").exists()
    assert "step-000000008.pt" in train_here(argv(cut, "--resume"), capsys)
    assert_same_run(whole, cut)


@pytest.mark.slow
def test_sweep_and_bench_scripts_run_on_a_tiny_store(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_qa
        import qa_sweep
    finally:
        sys.path.pop(0)
    out = tmp_path / "sweep"
    tiny = [t for t in TINY if not t.startswith("checkpoint.keep_last")]
    argv = ["--out", str(out), "--lambdas", "0,0.2", "--seeds", "0,1", "--quiet",
            f"store={tiny_store}", *tiny]  # fmt: skip
    assert qa_sweep.main(argv) == 0
    table = capsys.readouterr().out
    assert "| 1 | 0.2 |" in table and (out / "qa-sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 0 | first_k |" in table and "| 1 | margin |" in table
    assert "dominates both rules on every seed:" in table
    sweep = json.loads((out / "sweep.json").read_text())
    assert [(r["seed"], r["lambda"]) for r in sweep["rows"]] == [
        (0, 0.0),
        (0, 0.2),
        (1, 0.0),
        (1, 0.2),
    ]
    assert {v["rule"] for v in sweep["verdicts"]} == {"first_k", "margin"}
    assert len(sweep["rules"]["0"]["first_k"]) >= 2  # one point per k, per lambda run
    assert len(sweep["rules"]["1"]["learned_threshold"]) >= 2
    assert all("not_dominated_swept" in v for v in sweep["verdicts"])

    # a run trained before a rule existed: its rules are worked out again from its checkpoint
    run = out / "s1" / "lambda-0.2"
    summary = json.loads((run / "summary.json").read_text())
    rules = next(st["halting_rules"] for st in summary["stages"] if st.get("halting_rules"))
    del rules["learned_threshold"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert qa_sweep.main(argv) == 0
    kept = json.loads((run / qa_sweep.RULES_FILE).read_text())["halting_rules"]

    def numbers(x: object) -> list[float]:
        if isinstance(x, dict):
            return [v for k in sorted(x) for v in numbers(x[k])]
        if isinstance(x, list):
            return [v for item in x for v in numbers(item)]
        return [float(x)] if isinstance(x, (int, float)) else []  # not the run paths

    assert numbers(kept["margin"]) == pytest.approx(numbers(rules["margin"]))
    assert numbers(json.loads((out / "sweep.json").read_text())) == pytest.approx(numbers(sweep))
    capsys.readouterr()

    def stamps() -> dict[str, int]:
        return {
            f"{s.name}/{d.name}": (d / "summary.json").stat().st_mtime_ns
            for s in out.iterdir() if s.is_dir() for d in s.iterdir() if d.is_dir()
        }  # fmt: skip

    first = stamps()
    assert qa_sweep.main(argv) == 0  # the same sweep again: every run is reused
    assert stamps() == first
    assert qa_sweep.main([*argv, "stages.1.entropy_coef=0.02"]) == 0  # the hybrid stage changed
    again = stamps()
    assert again["s0/supervised"] == first["s0/supervised"]
    assert again["s0/lambda-0"] != first["s0/lambda-0"]
    assert again["s1/lambda-0.2"] != first["s1/lambda-0.2"]
    capsys.readouterr()
    assert bench_qa.main(["--store", str(tiny_store), "--quick"]) == 0
    text = capsys.readouterr().out
    assert "| supervised |" in text and "| inference, early exit |" in text
    assert (
        bench_qa.main(
            ["--store", str(tiny_store), "--quick", "--run", str(out / "s0" / "lambda-0.2")]
        )
        == 0
    )
    assert "early exit (the reader of" in capsys.readouterr().out


def test_keys_a_qa_run_would_ignore_are_refused_by_name(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [str(CONFIG), *overrides(tiny_store, tmp_path / "k")]
    for key, value in [("val_fraction", "0.2"), ("reward.scale", "2"), ("eval.episodes", "5"),
                       ("eval.deterministic", "false"), ("model", "{path: x}"),
                       ("agent", "{eval_turns: 3}")]:  # fmt: skip
        err = _err(capsys, [*base, f"{key}={value}"])
        assert err.startswith(f"trainer.train: error: {key}: a QA run does not use it"), err
    # presets set evaluation keys for every kind of run: a QA run takes only what it reads
    cfg = load_config(CONFIG, [*overrides(tiny_store, tmp_path / "p"), "preset=research"])
    assert cfg.eval.episodes == 10 and cfg.agent is None
    runner.refuse_unused_keys(cfg)


def test_accumulated_bf16_run_through_the_cli(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "acc"
    argv = [*overrides(tiny_store, out), "stages.0.grad_accumulation=2",
            "stages.1.grad_accumulation=3", "precision=bf16", "stages.0.token_dropout=0.1"]  # fmt: skip
    assert main([str(CONFIG), *argv]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16"
    train = [r for r in rows(out) if r["kind"] == "train"]
    assert all(np.isfinite(r["loss/span"]) for r in train)
    ckpt = load_checkpoint(out / "checkpoints" / "final-hybrid.pt")
    extra = ckpt["loop"]["qa"]
    # questions drawn: batch_size x micro-batches x steps, per stage
    assert [e["examples"] for e in extra] == [4 * 2 * 4, 4 * 3 * 4]


def test_pareto_fronts_and_dominance() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import qa_sweep
    finally:
        sys.path.pop(0)
    pts = [(0.5, 60.0), (0.3, 50.0), (0.4, 49.0), (0.7, 60.0), (1.0, 70.0), (0.9, 65.0)]
    assert qa_sweep.pareto(pts) == [(0.3, 50.0), (0.5, 60.0), (0.9, 65.0), (1.0, 70.0)]
    front = qa_sweep.pareto(pts)
    assert qa_sweep.dominated((0.6, 55.0), front, 0.0)  # (0.5, 60) reads less, scores more
    assert not qa_sweep.dominated((0.45, 55.0), front, 0.0)
    assert qa_sweep.dominated((0.45, 50.5), front, 1.0)  # (0.3, 50) within the slack
    assert not qa_sweep.dominated((0.2, 10.0), front, 0.0)  # nothing reads that little
