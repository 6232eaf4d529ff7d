"""Student training through ``trainer.train``: the run directory, exact resume, gradient
accumulation equal to one big batch, the merged export, and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.sequences.store import open_sequence_store
from trainer.agent.data import SequenceArrays, collate
from trainer.agent.losses import label_weights
from trainer.agent.model import build_model, parse_model_settings
from trainer.agent.runner import AgentTrainer, SFTParams, SFTStage
from trainer.config import load_config
from trainer.train import main

from .test_checkpoint import KILL_DRIVER, assert_same_run, finish

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "agent-sft.yaml"
TINY = [
    "model.config.hidden_size=32",
    "model.config.num_layers=1",
    "model.config.num_heads=2",
    "model.config.intermediate_size=64",
    "stages.0.steps=6",
    "stages.0.batch_size=4",
    "stages.0.lr_schedule.warmup_steps=2",
    "agent.eval_max_episodes=8",
    "agent.max_new_tokens=40",
    "eval.every=3",
    "eval.episodes=2",
    "eval.max_episode_steps=3",
    "checkpoint.every=2",
    "checkpoint.keep_last=20",
    "log_every=1",
    "tensorboard=false",
    "progress=false",
    "num_threads=1",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def overrides(store: Path, out: Path, *extra: str) -> list[str]:
    return [f"store={store}", f"out={out}", *TINY, *extra]


def rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def test_cli_trains_evaluates_online_and_exports_a_model_directory(
    agent_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", str(CONFIG), *overrides(agent_store, out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    evals = [r for r in rows(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        for key in (
            "eval/action_accuracy", "eval/span_loss/reasoning", "eval/span_loss/action",
            "eval/token_accuracy/other", "eval/success_rate", "eval/return_mean",
            "eval/teacher_success_rate",
        ):  # fmt: skip
            assert key in r, key
        assert r["eval/online_episodes"] == 2 and r["eval/teacher_success_rate"] == 1.0
    train = [r for r in rows(out) if r["kind"] == "train"]
    assert {"loss/reasoning", "loss/action", "loss/other", "tokens_per_s", "peak_rss_mb"} <= set(
        train[-1]
    )
    summary = json.loads((out / "summary.json").read_text())
    s = summary["stages"][0]
    assert s["steps"] == 6 and s["tokens"] > 0 and s["tokens_per_s"] > 0
    assert summary["labels"] == ["context", "reasoning", "action", "other"]
    assert summary["split"]["train_episodes"] + summary["split"]["eval_episodes"] <= 80
    # the exported student opens with transformers alone and continues a prompt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    store = open_sequence_store(agent_store)
    ids, _ = store.episode(0)
    assert tok.decode(ids[:20].tolist()) == store.text().decode(ids[:20].tolist())
    with torch.no_grad():
        got = model(torch.as_tensor(ids[None, :50], dtype=torch.long)).logits
    ck = torch.load(out / "checkpoints" / "final-sft.pt", weights_only=True)
    assert any(k.endswith("embed_tokens.weight") for k in ck["algo_state"])
    assert got.shape == (1, 50, store.text().vocab_size)


def test_sigkill_then_resume_is_bit_for_bit_the_uninterrupted_run(
    agent_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    argv = [str(CONFIG), *overrides(agent_store, killed, "eval.episodes=0")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DRIVER, "3", *argv],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    AgentTrainer(
        load_config(CONFIG, overrides(agent_store, full, "eval.episodes=0")), log=lambda m: None
    ).run()
    code, err = finish(proc)
    assert code == -9, err
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert_same_run(full, killed)


def _episode_loss_reference(
    model: Any, arrays: SequenceArrays, episodes: np.ndarray, weights: torch.Tensor
) -> torch.Tensor:
    """The weighted mean CE over every target of ``episodes``, one episode at a time."""
    num = torch.zeros(())
    den = torch.zeros(())
    for e in episodes.tolist():
        a, b = int(arrays.offsets[e]), int(arrays.offsets[e + 1])
        ids = torch.as_tensor(arrays.input_ids[a:b], dtype=torch.long)
        lab = torch.as_tensor(arrays.labels[a:b], dtype=torch.long)
        logits = model(ids[None]).logits[0]
        for t in range(1, len(ids)):
            w = weights[lab[t]]
            if w > 0:
                num = num + w * F.cross_entropy(logits[t - 1], ids[t])
                den = den + w
    return num / den


@pytest.mark.parametrize("pack", [False, True])
def test_accumulated_micro_batches_give_the_gradient_of_one_plain_loop(
    agent_store: Path, pack: bool
) -> None:
    store = open_sequence_store(agent_store)
    arrays = SequenceArrays.from_store(store)
    text = store.text()
    settings = parse_model_settings(
        {"config": {"architecture": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2}}
    )
    loaded = build_model(
        settings, vocab_size=text.vocab_size, pad_id=text.pad_id, end_id=text.end_id,
        max_positions=2048, seed=0,
    )  # fmt: skip
    weights = label_weights(store.label_names, {"reasoning": 0.3, "action": 2.0})
    stage = SFTStage(
        loaded, SFTParams(lr=0.0), weights, precision="fp32", device=torch.device("cpu"),
        grad_clip=None, has_teacher=False,
    )  # fmt: skip
    episodes = np.array([0, 5, 9, 17, 30, 41])
    batches = [
        collate(arrays, episodes[:2], text.pad_id, pack=pack, max_len=2048),
        collate(arrays, episodes[2:], text.pad_id, pack=pack, max_len=2048),
    ]
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    captured: list[list[torch.Tensor]] = []
    real_step = stage.optimizers["model"].step

    def capture(*a: Any, **k: Any) -> Any:
        captured.append([p.grad.detach().clone() for p in params])  # type: ignore[union-attr]
        return real_step(*a, **k)

    stage.optimizers["model"].step = capture  # type: ignore[method-assign]
    stage.update(batches)
    loaded.model.zero_grad()
    ref = _episode_loss_reference(loaded.model, arrays, episodes, weights)
    want = torch.autograd.grad(ref, params)
    for g, w in zip(captured[0], want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-6)


def test_user_errors_are_one_line(agent_store: Path, tmp_path: Path, capsys: Any) -> None:
    base = overrides(agent_store, tmp_path / "r")
    # a user error of trainer.train: one line, exit code 2 (as every user error of the CLI)
    assert main([str(CONFIG), *base, "model.lora={r: 4, target_modules: [nope_proj]}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope_proj" in err
    base = overrides(agent_store, tmp_path / "r2")
    assert main([str(CONFIG), *base, "model={path: /nonexistent/model}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/nonexistent/model" in err


def test_lora_bf16_keeps_only_the_adapters_in_checkpoints_and_exports_merged(
    agent_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    cfg = load_config(
        CONFIG,
        overrides(
            agent_store, out, "precision=bf16", "eval.episodes=0", "stages.0.steps=4",
            "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        ),
    )  # fmt: skip
    summary = AgentTrainer(cfg, log=lambda m: None).run()
    assert summary["model"]["lora"] is not None and summary["precision"] == "bf16"
    assert 0 < summary["model"]["n_trainable"] < summary["model"]["n_params"]
    state = torch.load(out / "checkpoints" / "final-sft.pt", weights_only=True)["algo_state"]
    assert state and all("lora_" in k for k in state), sorted(state)[:3]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # the merged weights differ from a fresh base: the adapters were trained and merged
    loaded = build_model(
        parse_model_settings(cfg.model), vocab_size=merged.config.vocab_size,
        pad_id=0, end_id=1, max_positions=1024, seed=cfg.seed,
    )  # fmt: skip
    base_q = loaded.base.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base_q)
    torch.testing.assert_close(
        merged.model.layers[0].mlp.up_proj.weight, loaded.base.model.layers[0].mlp.up_proj.weight
    )


@pytest.mark.parametrize("config", ["agent-sft-ppo.yaml", "agent-sft-reinforce.yaml"])
def test_sft_then_rl_stage_through_the_cli_and_resume(
    agent_store: Path, tmp_path: Path, config: str
) -> None:
    rl = "ppo" if "ppo" in config else "reinforce"
    extra = [
        "stages.1.steps=4", "stages.1.batch_size=2", "stages.1.group_size=2",
        "stages.1.max_new_tokens=16", "stages.1.max_turns=2", "stages.1.sft_batch_size=2",
        "stages.1.minibatch_episodes=2", "stages.0.steps=4", "eval.every=2",
        "eval.episodes=2", "eval.max_episode_steps=2", "agent.max_new_tokens=16",
        "checkpoint.every=2",
    ]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    cfg_path = ROOT / "configs" / config
    AgentTrainer(
        load_config(cfg_path, overrides(agent_store, full, *extra)), log=lambda m: None
    ).run()
    train = [r for r in rows(full) if r["kind"] == "train" and r["stage"] == rl]
    assert [r["step"] for r in train] == [5, 6, 7, 8]
    for key in ("reward/success", "reward/format", "reward/length", "kl", "kl_coef",
                "sft_weight", "rollout/success_rate", "policy_loss"):  # fmt: skip
        assert key in train[-1], key
    assert train[0]["sft_weight"] == 0.5 and train[-1]["sft_weight"] < 0.5
    state = torch.load(full / "checkpoints" / f"final-{rl}.pt", weights_only=True)
    assert set(state["loop"]["rl"]) == {"value_head", "kl", "reward", "reward_ema"}
    # killed in the RL stage, resumed: the same run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [str(cfg_path), *overrides(agent_store, cut, *extra)]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DRIVER, "7", *argv],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    code, err = finish(proc)
    assert code == -9, err
    assert main([*argv, "--resume"]) == 0
    assert_same_run(full, cut)


def test_a_nan_reward_stops_the_stage_naming_the_step_and_the_component(
    agent_store: Path, tmp_path: Path
) -> None:
    from trainer.loop import RunError

    extra = [
        "stages.0.steps=2", "stages.1.steps=3", "stages.1.batch_size=1", "stages.1.group_size=2",
        "stages.1.max_new_tokens=8", "stages.1.max_turns=1", "eval.episodes=1",
        "eval.max_episode_steps=1", "agent.max_new_tokens=8", "checkpoint.every=1",
        "stages.1.reward={python: 'tests.trainer.rewards_helper:always_nan'}",
    ]  # fmt: skip
    out = tmp_path / "nan"
    cfg = load_config(ROOT / "configs" / "agent-sft-ppo.yaml", overrides(agent_store, out, *extra))
    with pytest.raises(
        RunError, match=r"stages\.1 \(ppo\) step 3 .*: the reward: reward/always_nan"
    ):
        AgentTrainer(cfg, log=lambda m: None).run()
    # the checkpoints written are those of the good steps
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*.pt"))
    assert steps[-1] == "step-000000002.pt"
