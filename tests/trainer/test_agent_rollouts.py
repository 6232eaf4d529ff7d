"""Sampled rollouts: the token sequence is the store's layout of the transcript, the written
tokens are exactly what the policy generated, and token log-probabilities equal a plain loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.sequences.store import open_sequence_store
from trainer.agent.model import build_model, hidden_and_head, parse_model_settings
from trainer.agent.rollouts import collect, to_batch, token_logprobs
from trainer.envs import make_text_env, parse_action

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def played(agent_store: Path):
    store = open_sequence_store(agent_store)
    text = store.text()
    loaded = build_model(
        parse_model_settings({"config": {"architecture": "llama", "hidden_size": 16,
                                         "num_layers": 1, "num_heads": 2}}),
        vocab_size=text.vocab_size, pad_id=text.pad_id, end_id=text.end_id,
        max_positions=4096, seed=0,
    )  # fmt: skip
    env = store.env
    torch.manual_seed(0)
    eps = collect(
        loaded.model.eval(), text, lambda: make_text_env(env["id"], **env["kwargs"]), [3, 4, 5],
        policy_role="assistant", env_role="env", action_pattern=store.span_patterns["action"],
        max_new_tokens=12, max_turns=3, device=torch.device("cpu"), temperature=1.0,
    )  # fmt: skip
    return store, text, loaded, eps


def test_the_sequence_is_the_transcript_in_the_store_layout(played) -> None:
    store, text, _, eps = played
    env = store.env
    for e in eps:
        world = make_text_env(env["id"], **env["kwargs"])
        want = f"<|prompt|>\n{world.reset(e.seed)}<|end|>\n"
        for said, obs, r in zip(e.texts, e.observations, e.env_rewards):
            # (a model's tokens need not be the tokenizer's own encoding: compare text)
            want += f"<|assistant|>\n{said}<|end|>\n<|env|>\n{obs}<|end|>\n"
            got_obs, got_r, _, _ = world.step(parse_action(said) or "")
            assert got_obs == obs and got_r == r  # the env saw the parsed action
        assert text.decode(e.ids) == want
        # written tokens: each turn's generated tokens (+ its end token when generated)
        runs: list[list[int]] = []  # each turn's written tokens are one contiguous run
        for j, (t, w) in enumerate(zip(e.ids, e.written)):
            if w:
                if j == 0 or not e.written[j - 1]:
                    runs.append([])
                runs[-1].append(t)
        said = [x for x, p in zip(e.texts, e.turn_ends) if p >= 0]
        assert len(runs) == len(said)
        for run, x in zip(runs, said):
            # at most max_new_tokens (12), the end token included when generated: a turn
            # cut short gets its end token as context, not as an action
            assert len(run) <= 12 and text.end_id not in run[:-1]
            assert text.decode([t for t in run if t != text.end_id]) == x
        for pos in e.turn_ends:
            assert pos < 0 or (e.written[pos] and not e.written[pos + 1])
        assert len(e.texts) == len(e.turn_ends) <= 3


def test_token_logprobs_equal_a_plain_loop(played) -> None:
    _, text, loaded, eps = played
    batch = to_batch(eps, [e.env_rewards for e in eps], text.pad_id)
    fwd, head = hidden_and_head(loaded)
    with torch.no_grad():
        logp, _, ent = token_logprobs(fwd, head, batch, with_entropy=True)
        for b, e in enumerate(eps):
            ids = torch.tensor(e.ids)
            logits = loaded.model(ids[None]).logits[0]
            for t in range(1, len(e.ids)):
                lp = F.log_softmax(logits[t - 1], -1)
                if e.written[t]:
                    torch.testing.assert_close(logp[b, t], lp[ids[t]], rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(
                        ent[b, t], -(lp.exp() * lp).sum(), rtol=1e-4, atol=1e-5
                    )
                else:
                    assert logp[b, t] == 0
    # turn ends carry the turn rewards in order
    for b, e in enumerate(eps):
        ends = torch.nonzero(batch.turn_end[b]).flatten().tolist()
        assert ends == [p for p in e.turn_ends if p >= 0]
        k = len(ends)
        assert batch.turn_rewards[b, :k].tolist() == pytest.approx(
            [r for p, r in zip(e.turn_ends, e.env_rewards) if p >= 0]
        )


def test_a_long_episode_is_cut_with_its_turns(played) -> None:
    _, text, _, eps = played
    e = max(eps, key=lambda x: len(x.ids))
    cut = e.turn_ends[0] + 2 if e.turn_ends[0] >= 0 else len(e.ids) - 1
    batch = to_batch([e], [e.env_rewards], text.pad_id, max_len=cut)
    assert batch.input_ids.shape[1] == cut
    assert int(batch.n_turns[0]) == sum(1 for p in e.turn_ends if 0 <= p < cut)
