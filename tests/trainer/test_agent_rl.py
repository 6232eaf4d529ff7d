"""One RL step on the text policy: the update moves the sampled tokens' log-probabilities
the way the reward says, PPO's step runs with its metrics, and the stage's state resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.sequences.store import open_sequence_store
from trainer.agent.losses import label_weights
from trainer.agent.model import build_model, parse_model_settings
from trainer.agent.rl import RLParams, RLStage, RolloutSetup, frozen_reference
from trainer.agent.rollouts import to_batch, token_logprobs
from trainer.agent.runner import SFTParams, SFTStage
from trainer.config import ConfigError
from trainer.envs import make_text_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def constant(value: float) -> dict[str, Any]:
    """A reward of ``value`` on every turn."""
    return {"success": {}, "post": [{"scale": {"mul": 0.0, "add": value}}]}


def make_stage(store_path: Path, algo: str, lora: bool = False, **over: Any) -> RLStage:
    store = open_sequence_store(store_path)
    text = store.text()
    raw: dict[str, Any] = {
        "config": {"architecture": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    }
    if lora:
        raw["lora"] = {"r": 4, "alpha": 8}
    loaded = build_model(
        parse_model_settings(raw), vocab_size=text.vocab_size, pad_id=text.pad_id,
        end_id=text.end_id, max_positions=4096, seed=0,
    )  # fmt: skip
    weights = label_weights(store.label_names, {})
    params = RLParams(**{"lr": 3e-2, "kl_coef": 0.0, "whiten_advantages": False, **over})
    sft = SFTStage(
        loaded, SFTParams(lr=params.lr), weights, precision="fp32",
        device=torch.device("cpu"), grad_clip=None, has_teacher=False,
    )  # fmt: skip
    env = store.env
    setup = RolloutSetup(
        text, lambda: make_text_env(env["id"], **env["kwargs"]), "assistant", "env",
        store.span_patterns["action"], max_new_tokens=8, max_turns=2, max_positions=4096,
    )  # fmt: skip
    return RLStage(
        algo, sft, params, setup, batch_size=2, total_steps=10, reference=frozen_reference(loaded)
    )


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_reinforce_raises_the_logprob_of_rewarded_tokens_and_lowers_punished_ones(
    agent_store: Path,
    sign: float,
) -> None:
    stage = make_stage(agent_store, "reinforce", reward=constant(sign), baseline="none")
    torch.manual_seed(0)
    eps, _ = stage.rollout(0)
    per_turn, _ = stage.turn_rewards(eps)
    assert all(r == pytest.approx(sign) for turn in per_turn for r in turn)
    batch = to_batch(eps, per_turn, stage.setup.text.pad_id)
    fwd, head = stage.sft.forward_hidden, stage.lm_head
    with torch.no_grad():
        before, _, _ = token_logprobs(fwd, head, batch)
    torch.manual_seed(0)  # the same rollouts inside update
    metrics = stage.update(0, iter(()))
    with torch.no_grad():
        after, _, _ = token_logprobs(fwd, head, batch)
    mask = batch.written
    change = float((after - before)[mask].mean())
    assert change * sign > 0, change
    assert metrics["reward/episode"] == pytest.approx(sign * sum(len(p) for p in per_turn) / 4)


def test_ppo_step_reports_its_metrics_and_the_kl_to_the_unchanged_reference(
    agent_store: Path,
) -> None:
    stage = make_stage(
        agent_store, "ppo", reward={"type": "weighted_sum", "components": [
            {"weight": 1.0, "reward": "env_return"},
            {"weight": 0.1, "reward": {"format": {"pattern": "<action>.+</action>"}}},
        ]}, kl_coef=0.05, kl_target=0.01, entropy_coef=0.01, minibatch_episodes=2,
    )  # fmt: skip
    torch.manual_seed(0)
    first = stage.update(0, iter(()))
    for key in ("reward/env_return", "reward/format", "kl", "clip_fraction", "approx_kl",
                "entropy", "value_loss", "policy_loss", "explained_variance",
                "rollout/generated_tokens_per_s"):  # fmt: skip
        assert key in first and first[key] == first[key], key  # present and not NaN
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    second = stage.update(1, iter(()))
    assert second["kl"] != pytest.approx(0.0, abs=1e-6)  # it has moved since
    assert stage.kl.value != 0.05  # the adaptive coefficient followed the KL
    state = stage.state_dict()
    again = make_stage(agent_store, "ppo", kl_coef=0.05, kl_target=0.01)
    again.load_state_dict(state)
    assert again.kl.value == stage.kl.value and again.reward_ema == stage.reward_ema
    torch.testing.assert_close(again.value_head.weight, stage.value_head.weight)


def test_lora_reference_is_the_base_with_the_adapter_off(agent_store: Path) -> None:
    stage = make_stage(agent_store, "ppo", lora=True, kl_coef=0.05, reward=constant(1.0))
    assert stage.reference is None
    torch.manual_seed(0)
    stage.update(0, iter(()))
    torch.manual_seed(1)
    eps, _ = stage.rollout(1)
    batch = to_batch(eps, [[0.0] * len(e.texts) for e in eps], stage.setup.text.pad_id)
    logp_old, logp_ref, _ = stage._scores(batch)
    assert not torch.allclose(logp_old, logp_ref)  # the adapters moved the policy ...
    with torch.no_grad(), stage.loaded.model.disable_adapter():
        plain, _, _ = token_logprobs(stage.sft.forward_hidden, stage.lm_head, batch)
    torch.testing.assert_close(logp_ref, plain)  # ... and the reference is the base


def test_bad_rl_settings_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"reward.*unknown"):
        RLParams(reward={"type": "sucess"})
    with pytest.raises(ConfigError, match="baseline"):
        RLParams(baseline="mean")
    with pytest.raises(ConfigError, match="temperature"):
        RLParams(temperature=0.0)
