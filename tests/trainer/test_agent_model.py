"""The student model factory: settings, seeded builds, the body/head split, packed masks,
LoRA, precision and the merged export, each held against the plain transformers model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer.agent.data import SequenceArrays, collate, packed_attention_mask
from trainer.agent.model import (
    LoadedModel,
    ModelError,
    ModelSettings,
    build_model,
    causal_prefix_rows,
    export_merged,
    hidden_and_head,
    make_scaler,
    parse_model_settings,
    precision_context,
    save_adapter,
)
from trainer.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, PAD, END, MAXPOS = 40, 0, 1, 64
ARCHS = ("llama", "gpt2")


def settings(arch: str = "llama", lora: Any = None, **extra: Any) -> ModelSettings:
    raw: dict[str, Any] = {
        "config": {"architecture": arch, "hidden_size": 16, "num_layers": 2, "num_heads": 2},
        **extra,
    }
    if lora is not None:
        raw["lora"] = lora
    return parse_model_settings(raw)


def build(arch: str = "llama", lora: Any = None, seed: int = 0, **extra: Any) -> LoadedModel:
    return build_model(
        settings(arch, lora, **extra),
        vocab_size=VOCAB,
        pad_id=PAD,
        end_id=END,
        max_positions=MAXPOS,
        seed=seed,
    )


def nudge_adapters(loaded: LoadedModel, seed: int = 1) -> None:
    """LoRA's B starts at zero (the adapter adds nothing); give it weights so a test that
    ignored the adapter would see other numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def batch(b: int = 3, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Right-padded rows of lengths length, length - 3, ...: ids, (B, L) mask, positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for r in range(b):
        n = length - 3 * r
        ids[r, n:] = PAD
        mask[r, n:] = 0
    pos = torch.arange(length).expand(b, length).contiguous()
    return ids, mask, pos


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (None, "model: missing"),
        ("llama", "model: must be a mapping"),
        ({}, "neither given"),
        ({"path": "x", "config": {"architecture": "llama"}}, "model.config.hidden_size: missing"),
        (
            {
                "path": "x",
                "config": {
                    "architecture": "llama",
                    "hidden_size": 16,
                    "num_layers": 1,
                    "num_heads": 2,
                },
            },
            "both given",
        ),
        ({"path": "x", "lr": 1}, "model.lr: unknown key"),
        (
            {
                "config": {
                    "architecture": "bert",
                    "hidden_size": 16,
                    "num_layers": 1,
                    "num_heads": 2,
                }
            },
            "model.config.architecture: must be one of llama, gpt2, got 'bert'",
        ),
        (
            {
                "config": {
                    "architecture": "gpt2",
                    "hidden_size": 16,
                    "num_layers": 1,
                    "num_heads": 3,
                }
            },
            "model.config.num_heads: 3 does not divide hidden_size 16",
        ),
        (
            {
                "config": {
                    "architecture": "llama",
                    "hidden_size": 6,
                    "num_layers": 1,
                    "num_heads": 2,
                }
            },
            "model.config.num_heads: head size 3 is odd",
        ),
        (
            {
                "config": {
                    "architecture": "llama",
                    "hidden_size": 16,
                    "num_layers": 0,
                    "num_heads": 2,
                }
            },
            "model.config.num_layers: must be an integer >= 1",
        ),
        (
            {
                "config": {
                    "architecture": "llama",
                    "hidden_size": 16,
                    "num_layers": 1,
                    "num_heads": 2,
                    "dropout": 1.5,
                }
            },
            "model.config.dropout: must be a number in [0, 1)",
        ),
        (
            {"path": "x", "lora": {"rank": 4}},
            "model.lora.rank: unknown key; allowed keys: r, alpha",
        ),
        ({"path": "x", "lora": {"r": 0}}, "model.lora.r: must be an integer >= 1"),
        ({"path": "x", "lora": {"target_modules": [1]}}, "model.lora.target_modules: must be"),
        ({"path": "x", "lora": "yes"}, "model.lora: must be a mapping"),
        ({"path": "x", "gradient_checkpointing": "on"}, "model.gradient_checkpointing: must be"),
        ({"path": ""}, "model.path: must be a directory name"),
    ],
)
def test_bad_settings_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        parse_model_settings(raw)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_settings_defaults():
    s = parse_model_settings(
        {
            "config": {"architecture": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 4},
            "lora": {"target_modules": "q_proj"},
        },
        where="stages.0.model",
    )
    assert s.config is not None and s.config.mlp_size == 96 and s.config.dropout == 0.0
    assert s.lora is not None and s.lora.target_modules == ("q_proj",)
    assert (s.lora.r, s.lora.alpha) == (16, 32.0)
    assert parse_model_settings({"path": "d", "lora": True}).lora is not None
    assert parse_model_settings({"path": "d", "lora": None}).lora is None
    with pytest.raises(ConfigError, match=r"^stages\.0\.model\.foo: unknown key"):
        parse_model_settings({"path": "d", "foo": 1}, where="stages.0.model")


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights_and_the_callers_rng_untouched(arch):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build(arch, seed=7)
    after = torch.rand(3)
    b = build(arch, seed=7)
    c = build(arch, seed=8)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(after, expected_next)  # building draws nothing from the global stream


@pytest.mark.parametrize("arch", ARCHS)
def test_config_model_takes_the_stores_vocab_and_ids(arch):
    loaded = build(arch)
    cfg = loaded.base.config
    assert loaded.base.get_input_embeddings().num_embeddings == VOCAB
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (PAD, END, END)
    gen = loaded.base.generation_config
    assert (gen.pad_token_id, gen.eos_token_id) == (PAD, END)
    assert loaded.n_params == sum(p.numel() for p in loaded.model.parameters())
    assert loaded.n_trainable == loaded.n_params and not loaded.is_lora
    d = loaded.describe()
    json.dumps(d)
    assert d["model_type"] == arch and d["vocab_size"] == VOCAB and d["max_positions"] == MAXPOS
    assert d["hidden_size"] == 16 and d["num_layers"] == 2 and d["lora"] is None


def test_max_positions_shorter_than_the_store_refused():
    s = parse_model_settings(
        {
            "config": {
                "architecture": "gpt2",
                "hidden_size": 16,
                "num_layers": 1,
                "num_heads": 2,
                "max_positions": 32,
            }
        }
    )
    with pytest.raises(ModelError, match=r"max_positions: 32 is shorter .* \(64 tokens\)"):
        build_model(s, vocab_size=VOCAB, pad_id=PAD, end_id=END, max_positions=64, seed=0)


# --------------------------------------------------------------------------- body and head


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [False, True])
def test_hidden_then_head_equals_the_models_logits(arch, lora):
    loaded = build(arch, lora={} if lora else None)
    if lora:
        nudge_adapters(loaded)
    loaded.model.eval()
    fn, head = hidden_and_head(loaded)
    ids, mask, pos = batch()
    with torch.no_grad():
        ours = head(fn(ids, mask, pos))
        ref = loaded.model(input_ids=ids, attention_mask=mask).logits
        # the base model alone: the adapter must be part of what fn runs
        if lora:
            with loaded.model.disable_adapter():  # type: ignore[operator]
                plain = loaded.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert ours.shape == (*ids.shape, VOCAB)
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    if lora:
        assert (ours[real] - plain[real]).abs().max() > 1e-2


def _arrays(lengths: list[int], seed: int = 0) -> SequenceArrays:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(2, VOCAB, size=int(offsets[-1])).astype(np.int32)
    labels = rng.integers(0, 3, size=int(offsets[-1])).astype(np.int8)
    return SequenceArrays(ids, labels, offsets)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_attend_within_their_episode(arch, attn):
    loaded = build(arch, lora={})
    nudge_adapters(loaded)
    loaded.model.eval()
    if attn == "eager":
        loaded.base.set_attn_implementation("eager")
    fn, _ = hidden_and_head(loaded)
    arrays = _arrays([7, 11, 5, 9])
    episodes = np.array([0, 1, 2, 3])
    packed = collate(arrays, episodes, PAD, pack=True, max_len=20)
    assert packed.input_ids.shape[0] < len(episodes)  # two episodes share a row at least
    assert int(packed.segment_ids.max()) >= 2
    with torch.no_grad():
        h = fn(packed.input_ids, packed_attention_mask(packed.segment_ids), packed.position_ids)
        for e in episodes:
            one = collate(arrays, np.array([e]), PAD)
            n = int(arrays.offsets[e + 1] - arrays.offsets[e])
            alone = fn(one.input_ids, one.attention_mask, one.position_ids)[0, :n]
            # where episode e sits in the packed batch: its ids, in order
            r, c = torch.nonzero(
                (packed.segment_ids > 0) & _episode_cells(packed, arrays, e), as_tuple=True
            )
            assert len(r) == n
            torch.testing.assert_close(h[r, c], alone, rtol=1e-5, atol=1e-5)


def _episode_cells(packed: Any, arrays: SequenceArrays, e: int) -> torch.Tensor:
    """(B, L) bool: the cells of episode ``e`` in a packed batch (found by its token run)."""
    want = torch.from_numpy(arrays.input_ids[arrays.offsets[e] : arrays.offsets[e + 1]]).long()
    n = len(want)
    out = torch.zeros_like(packed.segment_ids, dtype=torch.bool)
    for r in range(packed.input_ids.shape[0]):
        for s in packed.segment_ids[r].unique().tolist():
            if s == 0:
                continue
            cells = packed.segment_ids[r] == s
            if int(cells.sum()) == n and torch.equal(packed.input_ids[r][cells], want):
                out[r] = cells
                return out
    raise AssertionError(f"episode {e} not found in the packed batch")


def test_packed_mask_actually_matters():
    """Without the block mask, the second episode of a row would see the first."""
    loaded = build("llama")
    loaded.model.eval()
    fn, _ = hidden_and_head(loaded)
    arrays = _arrays([6, 6])
    packed = collate(arrays, np.array([0, 1]), PAD, pack=True, max_len=12)
    with torch.no_grad():
        good = fn(packed.input_ids, packed_attention_mask(packed.segment_ids), packed.position_ids)
        leaky = fn(packed.input_ids, packed.attention_mask, packed.position_ids)
    assert torch.allclose(good[0, :6], leaky[0, :6], atol=1e-6)
    assert (good[0, 6:] - leaky[0, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_and_holes_keep_their_mask(arch):
    """Only right-padded rows at default positions run without a mask; others are masked."""
    loaded = build(arch)
    loaded.model.eval()
    fn, head = hidden_and_head(loaded)
    ids, right, _ = batch()
    left = right.flip(1)
    ids = torch.where(left.bool(), ids.flip(1), PAD)
    pos = (left.cumsum(1) - 1).clamp_min(0)
    hole = right.clone()
    hole[0, 4] = 0
    with torch.no_grad():
        for mask in (left, hole):
            ours = head(fn(ids, mask, pos if mask is left else None))
            want = loaded.model(
                input_ids=ids, attention_mask=mask, position_ids=pos if mask is left else None
            ).logits
            real = mask.bool()
            torch.testing.assert_close(ours[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_mask_means_causal_rows(arch):
    loaded = build(arch)
    loaded.model.eval()
    fn, _ = hidden_and_head(loaded)
    ids, mask, pos = batch()
    with torch.no_grad():
        want = fn(ids, mask, pos)
        for p in (pos, None):
            got = fn(ids, None, p)
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()])


def test_causal_prefix_rows():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0]])
    assert causal_prefix_rows(right, pos) and causal_prefix_rows(right.bool(), None)
    assert not causal_prefix_rows(right.flip(1), None)  # left padding
    assert not causal_prefix_rows(torch.tensor([[1, 0, 1, 0]]), None)  # a hole
    assert not causal_prefix_rows(right, pos + 1)  # other positions


def test_bool_padding_mask_works_like_the_long_one():
    loaded = build("gpt2")
    loaded.model.eval()
    fn, _ = hidden_and_head(loaded)
    ids, mask, pos = batch()
    with torch.no_grad():
        a = fn(ids, mask, pos)
        b = fn(ids, mask.bool(), pos)
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real])


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    grads = []
    for gc in (False, True):
        loaded = build(arch, gradient_checkpointing=gc)
        assert loaded.base.is_activation_checkpointing == gc
        loaded.model.train()
        fn, head = hidden_and_head(loaded)
        ids, mask, pos = batch()
        head(fn(ids, mask, pos)).float().logsumexp(-1)[mask.bool()].mean().backward()
        grads.append({n: p.grad for n, p in loaded.model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_only_the_adapters(arch):
    loaded = build(arch, lora={"r": 4})
    names = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    targets = ("q_proj", "v_proj") if arch == "llama" else ("c_attn",)
    assert all(any(t in n for t in targets) for n in names)
    assert all(any(t in n for n in names) for t in targets)
    assert loaded.is_lora and loaded.n_trainable == sum(
        p.numel() for p in loaded.model.parameters() if p.requires_grad
    )
    assert loaded.n_trainable < loaded.n_params
    # one backward: gradients reach the adapters and nothing else
    fn, head = hidden_and_head(loaded)
    ids, mask, pos = batch()
    head(fn(ids, mask, pos)).logsumexp(-1)[mask.bool()].mean().backward()
    for n, p in loaded.model.named_parameters():
        assert (p.grad is not None) == (n in names), n
    assert loaded.describe()["lora"]["target_modules"] == (
        ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    )


def test_lora_targets_that_match_nothing_are_named():
    with pytest.raises(ModelError) as e:
        build("llama", lora={"target_modules": ["q_proj", "qkv"]})
    msg = str(e.value)
    assert "model.lora.target_modules: 'qkv' matches no module" in msg
    assert "q_proj" in msg and "gate_proj" in msg and "\n" not in msg


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_reloads_with_the_lora_models_logits(arch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = build(arch, lora={})
    nudge_adapters(loaded)
    loaded.model.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        before = loaded.model(input_ids=ids, attention_mask=mask).logits
    out = export_merged(loaded, tmp_path / "model")
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        merged = plain(input_ids=ids, attention_mask=mask).logits
        after = loaded.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(merged[real], before[real], rtol=1e-4, atol=1e-4)
    # the training model still carries its adapters, unmerged
    assert isinstance(loaded.model, PeftModel)
    assert any("lora_B" in n for n, _ in loaded.model.named_parameters())
    torch.testing.assert_close(after, before)
    assert plain.generation_config.eos_token_id == END


def test_save_adapter(tmp_path):
    loaded = build("llama", lora={"r": 2})
    out = save_adapter(loaded, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    with pytest.raises(ModelError, match="model.lora: not set"):
        save_adapter(build("llama"), tmp_path / "none")


# --------------------------------------------------------------------------- from a directory


def _saved(tmp_path: Path, arch: str = "llama") -> tuple[LoadedModel, Path]:
    loaded = build(arch, seed=3)
    return loaded, export_merged(loaded, tmp_path / f"saved-{arch}")


@pytest.mark.parametrize("arch", ARCHS)
def test_path_loads_a_saved_directory(arch, tmp_path):
    src, d = _saved(tmp_path, arch)
    loaded = build_model(
        parse_model_settings({"path": str(d), "lora": {}}),
        vocab_size=VOCAB - 5,  # a smaller store vocabulary is fine
        pad_id=PAD,
        end_id=END,
        max_positions=MAXPOS,
        seed=0,
    )
    assert loaded.describe()["source"] == "path" and loaded.is_lora
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    loaded.model.eval()
    src.model.eval()
    fn, head = hidden_and_head(loaded)
    ids, mask, pos = batch()
    with torch.no_grad():
        got = head(fn(ids, mask, pos))
        want = src.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_path_vocabulary_too_small_is_refused(tmp_path):
    _, d = _saved(tmp_path)
    with pytest.raises(ModelError) as e:
        build_model(
            parse_model_settings({"path": str(d)}),
            vocab_size=VOCAB + 10,
            pad_id=PAD,
            end_id=END,
            max_positions=MAXPOS,
            seed=0,
        )
    msg = str(e.value)
    assert f"vocabulary of {VOCAB} tokens" in msg and f"has {VOCAB + 10}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("what", ["missing", "empty", "broken"])
def test_not_a_model_directory(what, tmp_path):
    d = tmp_path / "nope"
    if what != "missing":
        d.mkdir()
    if what == "broken":
        (d / "config.json").write_text('{"model_type": "llama"}')  # no weights
    needle = {"missing": "does not exist", "empty": "has no config.json", "broken": "does not load"}
    with pytest.raises(ModelError) as e:
        build_model(
            parse_model_settings({"path": str(d)}),
            vocab_size=VOCAB,
            pad_id=PAD,
            end_id=END,
            max_positions=MAXPOS,
            seed=0,
        )
    assert str(e.value).startswith(f"model.path: {d} {needle[what]}")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- precision


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="precision: fp16 needs CUDA.*use bf16 on CPU"):
        precision_context("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision: must be one of"):
        precision_context("fp8", "cpu")
    assert make_scaler("fp16", "cpu") is None
    assert make_scaler("bf16", "cpu") is None


def test_bf16_autocast_runs_and_fp32_does_not_cast():
    loaded = build("llama")
    fn, head = hidden_and_head(loaded)
    ids, mask, pos = batch()
    with precision_context("bf16", torch.device("cpu")):
        logits = head(fn(ids, mask, pos))
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1)[mask.bool()].mean().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in loaded.model.parameters()
    )
    with precision_context("fp32", "cpu"):
        assert head(fn(ids, mask, pos)).dtype == torch.float32


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|pad|>": 0, "<|end|>": 1, "<|prompt|>": 2, "[UNK]": 3}
    for i, w in enumerate(["go", "left", "right", "up", "down", "wall"]):
        vocab[w] = 4 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|pad|>", "<|end|>", "<|prompt|>"])
    d = tmp_path / "tokenizer"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]"}))
    return d


def test_export_writes_a_tokenizer_autotokenizer_opens(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = build("llama")
    out = export_merged(loaded, tmp_path / "model", tokenizer_dir=_tokenizer_dir(tmp_path))
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.eos_token == "<|end|>" and tok.eos_token_id == END
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == PAD
    assert tok.unk_token == "[UNK]"
    ids = tok("go left<|end|>", add_special_tokens=False)["input_ids"]
    assert ids == [4, 5, 1]
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.vocab_size == VOCAB
    with pytest.raises(ModelError, match="tokenizer_dir: .* has no tokenizer.json"):
        export_merged(loaded, tmp_path / "m2", tokenizer_dir=tmp_path)
    assert not (tmp_path / "m2").exists()  # refused before anything is written


def test_one_sft_step_moves_only_the_adapters():
    """The factory plugs into the trainer's step: an SFT update with LoRA changes adapters."""
    from trainer.agent.losses import label_weights
    from trainer.agent.runner import SFTParams, SFTStage

    loaded = build("llama", lora={"r": 4})
    nudge_adapters(loaded)  # with B = 0, A gets no gradient on the first step
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    stage = SFTStage(
        loaded,
        SFTParams(lr=1e-2),
        label_weights(["context", "reasoning", "action"], None),
        precision="fp32",
        device=torch.device("cpu"),
        grad_clip=1.0,
        has_teacher=False,
    )
    arrays = _arrays([9, 14, 6, 11], seed=2)
    b = collate(arrays, np.array([0, 1, 2, 3]), PAD, pack=True, max_len=25)
    m = stage.update([b])
    assert torch.isfinite(m["loss"])
    for n, p in loaded.model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == ("lora_" in n), n
