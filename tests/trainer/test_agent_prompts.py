"""RL against the store's turns (no environment) and text overlap on held-out turns: the
contexts are the stored episodes' prefixes, the targets the stored turns, generation in a
batch equals a plain per-turn loop, and an RL stage with ``rollouts: store`` trains on them.
Also ``sft_every``: the plain SFT steps alternating with RL steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from pipeline.sequences.store import open_sequence_store
from trainer.agent.losses import label_weights, sad_loss
from trainer.agent.model import build_model, parse_model_settings
from trainer.agent.prompts import StorePrompts, collect_prompts, text_overlap
from trainer.agent.rl import RLParams, RLStage, RolloutSetup, frozen_reference
from trainer.agent.runner import AgentTrainer, SFTParams, SFTStage
from trainer.config import ConfigError, load_config
from trainer.qa.metrics import exact_match, f1
from trainer.rewards import build_reward

from .test_agent_train import ROOT, overrides, rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(store: Any, seed: int = 0) -> Any:
    text = store.text()
    raw = {"config": {"architecture": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2}}
    return build_model(
        parse_model_settings(raw), vocab_size=text.vocab_size, pad_id=text.pad_id,
        end_id=text.end_id, max_positions=4096, seed=seed,
    )  # fmt: skip


def prompts_of(store: Any, episodes: np.ndarray) -> StorePrompts:
    header = len(store.text().header_ids("assistant"))
    return StorePrompts.from_store(store, episodes, "assistant", header)


def plain_turns(store: Any, episodes: list[int]) -> list[tuple[list[int], str]]:
    """(context, target text) of every policy turn, read off the labels: a turn's text starts
    at its first trained token; the target is what the policy wrote before its end token."""
    text = store.text()
    out = []
    for e in episodes:
        o = int(store.offsets[e])
        ids = [int(t) for t in store.input_ids[o : int(store.offsets[e + 1])]]
        labels = [int(x) for x in store.labels[o : int(store.offsets[e + 1])]]
        i = 0
        while i < len(ids):
            if labels[i] > 0:
                j = i
                while j < len(ids) and labels[j] > 0:
                    j += 1
                written = ids[i:j]
                assert written[-1] == text.end_id
                out.append((ids[:i], text.decode(written[:-1])))
                i = j
            else:
                i += 1
    return out


def test_prompts_are_the_stored_prefixes_of_every_policy_turn(agent_store: Path) -> None:
    store = open_sequence_store(agent_store)
    episodes = [3, 7, 11, 40]
    prompts = prompts_of(store, np.array(episodes))
    expect = plain_turns(store, episodes)
    assert len(prompts) == len(expect)
    for row, (ctx, target) in zip(prompts.rows.tolist(), expect):
        assert prompts.context(row) == ctx
        assert prompts.target(row) == target
    rng = np.random.default_rng(0)
    assert set(prompts.sample(rng, 50)) <= set(prompts.rows.tolist())
    assert prompts.spread(5) == prompts.spread(5) and len(set(prompts.spread(5))) == 5


def test_batched_turns_equal_a_plain_per_turn_loop(agent_store: Path) -> None:
    store = open_sequence_store(agent_store)
    text = store.text()
    loaded = tiny_model(store, seed=3)
    model = loaded.model.eval()
    episodes = [0, 5]
    prompts = prompts_of(store, np.array(episodes))
    rows_ = prompts.rows.tolist()
    eps = collect_prompts(
        model, text, prompts, rows_, max_new_tokens=6, device=torch.device("cpu"),
        temperature=0.0, batch_size=3,
    )  # fmt: skip
    plain = plain_turns(store, episodes)
    said = []
    for (ctx, target), e in zip(plain, eps):
        out = model.generate(
            input_ids=torch.tensor([ctx]), attention_mask=torch.ones(1, len(ctx), dtype=torch.long),
            max_new_tokens=6, do_sample=False, eos_token_id=text.end_id, pad_token_id=text.pad_id,
        )  # fmt: skip
        gen = out[0, len(ctx) :].tolist()
        gen = gen[: gen.index(text.end_id)] if text.end_id in gen else gen
        assert e.texts == [text.decode(gen)]
        assert e.targets == [target]
        assert e.ids == ctx + gen + [text.end_id]  # the end token: written, or appended
        said.append(text.decode(gen))
    metrics = text_overlap(
        model, text, prompts, rows_, max_new_tokens=6, device=torch.device("cpu"), batch_size=4
    )
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    targets = [t for _, t in plain]
    assert metrics["eval/turns_scored"] == len(plain)
    assert metrics["eval/turn_exact_match"] == pytest.approx(
        np.mean([exact_match(s, t) for s, t in zip(said, targets)])
    )
    assert metrics["eval/turn_token_f1"] == pytest.approx(
        np.mean([f1(s, t) for s, t in zip(said, targets)])
    )
    assert metrics["eval/turn_rouge_l"] == pytest.approx(
        np.mean([scorer.score(t, s)["rougeL"].fmeasure for s, t in zip(said, targets)])
    )


def store_stage(store_path: Path, algo: str = "reinforce", **over: Any) -> RLStage:
    store = open_sequence_store(store_path)
    text = store.text()
    loaded = tiny_model(store)
    params = RLParams(**{"lr": 3e-2, "kl_coef": 0.0, "rollouts": "store", **over})
    sft = SFTStage(
        loaded, SFTParams(lr=params.lr), label_weights(store.label_names, {}), precision="fp32",
        device=torch.device("cpu"), grad_clip=None, has_teacher=False,
        optimizer=params_optimizer(over),
    )  # fmt: skip
    setup = RolloutSetup(
        text, None, "assistant", "env", "", max_new_tokens=8, max_turns=1,
        max_positions=4096, mode="store",
        prompts=prompts_of(store, np.arange(len(store.offsets) - 1)),
    )  # fmt: skip
    return RLStage(
        algo, sft, params, setup, batch_size=3, total_steps=10, reference=frozen_reference(loaded)
    )


def params_optimizer(over: dict[str, Any]) -> Any:
    from trainer.optim import OptimizerSpec

    return OptimizerSpec("sgd") if over.get("sft_every") else None


def test_store_rollouts_are_scored_against_the_stored_turn(agent_store: Path) -> None:
    stage = store_stage(agent_store, reward="rouge_l", group_size=2)
    assert stage.prompt_rows(4) == stage.prompt_rows(4)
    assert stage.prompt_rows(4) != stage.prompt_rows(5)
    rows_ = stage.prompt_rows(0)
    assert rows_[0::2] == rows_[1::2]  # each turn group_size times in a row
    torch.manual_seed(0)
    eps, _ = stage.rollout(0)
    assert [e.seed for e in eps] == rows_
    per_turn, logs = stage.turn_rewards(eps)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    prompts = stage.setup.prompts
    assert prompts is not None
    expect = [scorer.score(prompts.target(r), e.texts[0])["rougeL"].fmeasure for r, e in
              zip(rows_, eps)]  # fmt: skip
    assert [t[0] for t in per_turn] == pytest.approx(expect)
    assert logs["reward/rouge_l"] == pytest.approx(np.mean(expect))
    torch.manual_seed(0)
    metrics = stage.update(0, iter(()))
    assert "rollout/success_rate" not in metrics  # no environment, no success
    assert metrics["reward/episode"] == pytest.approx(np.mean(expect))
    # a python leaf sees the context the turn answers, as the store holds it
    text = stage.setup.text
    stage.reward = build_reward({"python": "tests.trainer.rewards_helper:prompt_chars"})
    per_turn, _ = stage.turn_rewards(eps)
    assert [t[0] for t in per_turn] == [float(len(text.decode(prompts.context(r)))) for r in rows_]


def test_reward_leaves_must_fit_where_the_rollouts_come_from(agent_store: Path) -> None:
    reward = {"type": "weighted_sum", "components": [{"weight": 1.0, "reward": "success"}]}
    with pytest.raises(ConfigError, match=r"reward\.components\[0\]\.reward: leaf 'success'"):
        store_stage(agent_store, reward=reward)
    from .test_agent_rl import make_stage

    with pytest.raises(ConfigError, match=r"^reward: leaf 'rouge_l' .*rollouts: store"):
        make_stage(agent_store, "reinforce", reward="rouge_l")
    with pytest.raises(ConfigError, match="rollouts"):
        RLParams(rollouts="replay")
    with pytest.raises(ConfigError, match="sft_every_end: needs sft_every"):
        RLParams(sft_every_end=4)


def test_sft_every_spreads_sft_steps_at_the_interpolated_interval() -> None:
    stage = object.__new__(RLStage)
    stage.total_steps = 40
    stage.p = RLParams(sft_every=3)
    assert [s for s in range(12) if stage.sft_step_due(s)] == [2, 5, 8, 11]
    stage.p = RLParams(sft_every=2, sft_every_end=8)
    due = [s for s in range(40) if stage.sft_step_due(s)]
    # a plain loop: one SFT step each time the steps since the last one reach the interval
    # of the moment (2 at the start, 8 at the end)
    expect, credit = [], 0.0
    for s in range(40):
        credit += 1.0 / (2 + 6 * s / 40)
        if credit >= 1.0 - 1e-9:
            expect.append(s)
            credit -= 1.0
    assert due == expect
    gaps = np.diff(due)
    assert gaps[0] == 2 and gaps[-1] >= 6 and all(np.diff(gaps) >= -1)  # sparser, steadily
    stage.p = RLParams()
    assert not any(stage.sft_step_due(s) for s in range(20))


def test_an_sft_step_is_one_plain_step_of_the_sad_loss(agent_store: Path) -> None:
    """With a constant reward (zero advantage) and no KL, the RL update moves nothing: the
    step's only change is the SFT step, equal to SGD on the SAD loss of the batch."""
    from trainer.agent.data import SequenceArrays, collate

    store = open_sequence_store(agent_store)
    arrays = SequenceArrays.from_store(store)
    batch = collate(arrays, [1, 2, 3], int(store.text().pad_id))
    reward = {"format": {"pattern": ".*"}}
    stage = store_stage(agent_store, reward=reward, sft_every=1, group_size=2, lr=0.5)
    before = {k: v.detach().clone() for k, v in stage.loaded.model.named_parameters()}
    ref = store_stage(agent_store, reward=reward, sft_every=1, group_size=2, lr=0.5)
    loss, _ = sad_loss(ref.sft.hidden(batch), ref.lm_head, batch, ref.weights)
    params = dict(ref.loaded.model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    torch.manual_seed(0)
    metrics = stage.update(0, iter([batch]))
    assert metrics["sft_step_loss"] == pytest.approx(float(loss.detach()))
    after = dict(stage.loaded.model.named_parameters())
    moved = 0
    for name, g in zip(params, grads):
        expect = before[name] - 0.5 * (g if g is not None else 0.0)
        torch.testing.assert_close(after[name].detach(), expect, rtol=1e-5, atol=1e-6)
        moved += int(g is not None and bool(g.abs().sum() > 0))
    assert moved > 0


def test_store_rollouts_through_the_trainer(agent_store: Path, tmp_path: Path) -> None:
    extra = [
        "stages.0.steps=2", "stages.1.steps=2", "stages.1.batch_size=2", "stages.1.group_size=2",
        "stages.1.max_new_tokens=12", "stages.1.rollouts=store", "stages.1.sft_every=1",
        "stages.1.reward={type: weighted_sum, components: [{weight: 1.0, reward: rouge_l}, "
        "{weight: 0.5, reward: token_f1}]}",
        "eval.every=0", "eval.episodes=1", "eval.max_episode_steps=1", "agent.max_new_tokens=12",
        "agent.eval_turns=6",
    ]  # fmt: skip
    out = tmp_path / "store"
    cfg = load_config(
        ROOT / "configs" / "agent-sft-reinforce.yaml", overrides(agent_store, out, *extra)
    )
    AgentTrainer(cfg, log=lambda m: None).run()
    got = rows(out)
    train = [r for r in got if r["kind"] == "train" and r["stage"] == "reinforce"]
    assert len(train) == 2
    for key in ("reward/rouge_l", "reward/token_f1", "sft_step_loss", "kl", "lr", "lr/value"):
        assert key in train[-1], key
    evals = [r for r in got if r["kind"] == "eval" and r["stage"] == "reinforce"]
    assert [r["step"] for r in evals] == [2, 4]  # at the stage's start, and its end
    assert all(r["eval/turns_scored"] == 6 for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    rl = summary["stages"][1]
    assert rl["first_eval"]["stage_step"] == 0 and rl["final_eval"]["stage_step"] == 2


@pytest.mark.parametrize("mode", ["store", "env"])
def test_shared_prefix_packing_scores_like_separate_rows(agent_store: Path, mode: str) -> None:
    """A prompt sampled group_size times: packing the shared prefix once gives each row's
    log-probabilities, entropies and gradients as scoring the rows one by one does."""
    from trainer.agent.rollouts import shared_prefix, to_batch, token_logprobs

    if mode == "store":
        stage = store_stage(agent_store, reward="rouge_l", group_size=3)
    else:
        from .test_agent_rl import make_stage

        stage = make_stage(agent_store, "reinforce", reward="success", group_size=3)
    torch.manual_seed(0)
    eps, _ = stage.rollout(0)
    batch = to_batch(eps, [[0.0] * len(e.texts) for e in eps], stage.setup.text.pad_id)
    packed = shared_prefix(batch, 3, min_saving=0.0)
    assert packed is not None
    real = batch.attention_mask.bool()
    n_packed = int(torch.unique(packed.index[real]).numel())  # fewer tokens than the rows hold
    assert packed.input_ids.shape[0] == batch.input_ids.shape[0] // 3
    assert n_packed < int(real.sum())
    fwd, head = stage.sft.forward_hidden, stage.lm_head
    params = [p for p in stage.loaded.model.parameters() if p.requires_grad]
    logp_p, hid_p, ent_p = token_logprobs(fwd, head, batch, with_entropy=True, packed=packed)
    grads_p = torch.autograd.grad(logp_p.sum(), params, allow_unused=True)
    for b in range(batch.input_ids.shape[0]):  # a plain loop: each row alone, unpadded
        n = int(batch.attention_mask[b].sum())
        ids = batch.input_ids[b : b + 1, :n]
        h = fwd(ids, None, None)[0]
        w = torch.nonzero(batch.written[b, :n]).squeeze(1)
        lp = torch.log_softmax(head(h[w - 1]).float(), -1)
        torch.testing.assert_close(
            logp_p[b, w], lp.gather(1, ids[0, w][:, None]).squeeze(1), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(ent_p[b, w], -(lp.exp() * lp).sum(-1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hid_p[b, :n], h, rtol=1e-4, atol=1e-5)
    logp_u, _, _ = token_logprobs(fwd, head, batch)
    grads_u = torch.autograd.grad(logp_u.sum(), params, allow_unused=True)
    for gp, gu in zip(grads_p, grads_u):
        if gu is not None:
            torch.testing.assert_close(gp, gu, rtol=1e-3, atol=1e-5)
    # rows that do not share their start are not packed together
    mixed = batch.rows(torch.tensor([0, 3, 1, 4, 2, 5]))
    other = shared_prefix(mixed, 3, min_saving=0.0)
    assert other is not None  # (they share the store's common start, no more)
    assert int(torch.unique(other.index[mixed.attention_mask.bool()]).numel()) > n_packed
    assert shared_prefix(batch, 3, min_saving=0.99) is None  # not worth a packed layout


def test_a_bf16_rl_step_runs_under_autocast(agent_store: Path) -> None:
    stage = store_stage(agent_store, reward="rouge_l", group_size=2)
    store = open_sequence_store(agent_store)
    bf16 = SFTStage(
        stage.loaded, SFTParams(lr=1e-3), label_weights(store.label_names, {}), precision="bf16",
        device=torch.device("cpu"), grad_clip=1.0, has_teacher=False,
    )  # fmt: skip
    stage = RLStage(
        "ppo", bf16, stage.p, stage.setup, batch_size=2, total_steps=4,
        reference=frozen_reference(stage.loaded),
    )  # fmt: skip
    seen = []
    real = torch.nn.Linear.forward

    def spy(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        out = real(self, x)
        seen.append(out.dtype)
        return out

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Linear, "forward", spy)
        m = stage.update(0, iter(()))
    assert torch.bfloat16 in seen  # the policy ran in bf16
    assert all(np.isfinite(m[k]) for k in ("policy_loss", "value_loss", "kl", "approx_kl"))
