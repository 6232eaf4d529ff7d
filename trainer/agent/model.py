"""The student model: any causal LM of ``transformers``, from a local directory or a config.

The ``model:`` section of an sft config (:class:`ModelSettings`) is one of::

    model: {path: DIR}             # a local model directory (save_pretrained), never the hub
    model:
      config: {architecture: llama, hidden_size: 128, num_layers: 2, num_heads: 4}

with an optional ``lora: {r, alpha, dropout, target_modules}`` (adapters through ``peft``;
only they train) and ``gradient_checkpointing: true`` (activations recomputed in the
backward pass: less memory, about a third more compute).

:func:`build_model` makes the model for a store: a config model takes the store's
vocabulary and its pad / end ids and is initialised from ``seed`` alone (the same seed gives
the same weights, whatever the global random state); a directory's model must have at
least the store's vocabulary. The loss runs the transformer body and the output projection
apart (:func:`hidden_and_head`), so it can project only the positions that are trained.
:func:`export_merged` writes the student as a plain model directory (LoRA merged into a
copy) with the store's tokenizer beside it, which ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` open.

Models whose logits are ``lm_head(last hidden state)`` are supported (Llama, Mistral,
Qwen2, GPT-2 and most decoder-only models); those that rescale or cap their logits after
the head (Gemma 2's soft-capping, Cohere's logit scale) would be trained on other logits.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, build_section, need_choice, need_int
from trainer.precision import make_scaler, precision_context  # noqa: F401  (re-exported)

ARCHITECTURES = ("llama", "gpt2")
END_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"


class ModelError(ConfigError):
    """A model that cannot be built, loaded or exported; the message names the key and the fix."""


# --------------------------------------------------------------------------- settings


def _positive_int(name: str, v: Any, what: str) -> None:
    need_int(name, v, 1, what)


def _fraction(name: str, v: Any) -> None:
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0.0 <= v < 1.0:
        raise ConfigError(f"{name}: must be a number in [0, 1), got {v!r}")


@dataclass(frozen=True)
class ArchSettings:
    """``model.config``: a model trained from scratch."""

    # llama (rotary positions, SwiGLU, RMSNorm) or gpt2 (learned positions, GELU, LayerNorm).
    architecture: str
    # Width of the residual stream.
    hidden_size: int
    # Transformer blocks.
    num_layers: int
    # Attention heads (hidden_size must be a multiple of it).
    num_heads: int
    # Width of the MLP's hidden layer (null: 3 * hidden_size).
    intermediate_size: int | None = None
    # Longest sequence the model takes (null: the store's longest episode).
    max_positions: int | None = None
    # Dropout on attention (and, for gpt2, on embeddings and residuals), in [0, 1).
    dropout: float = 0.0

    def __post_init__(self) -> None:
        need_choice("architecture", self.architecture, ARCHITECTURES)
        _positive_int("hidden_size", self.hidden_size, "width of the residual stream")
        _positive_int("num_layers", self.num_layers, "transformer blocks")
        _positive_int("num_heads", self.num_heads, "attention heads")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}; "
                "pick a divisor of hidden_size"
            )
        if self.architecture == "llama" and (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"num_heads: head size {self.hidden_size // self.num_heads} is odd; rotary "
                "positions need an even head size (hidden_size / num_heads)"
            )
        if self.intermediate_size is not None:
            _positive_int("intermediate_size", self.intermediate_size, "or null for 3 * hidden")
        if self.max_positions is not None:
            _positive_int("max_positions", self.max_positions, "or null for the store's longest")
        _fraction("dropout", self.dropout)

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 3 * self.hidden_size


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: low-rank adapters (peft); the base weights stay frozen."""

    # Rank of each adapter.
    r: int = 16
    # Scale numerator: the adapter's update is multiplied by alpha / r.
    alpha: float = 32.0
    # Dropout on the adapter's input, in [0, 1).
    dropout: float = 0.05
    # Module names (or dotted name suffixes) that get adapters (null: peft's defaults for the
    # model type: q_proj, v_proj for llama, mistral, qwen2, ...; c_attn for gpt2).
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _positive_int("r", self.r, "rank of each adapter")
        if (
            not isinstance(self.alpha, int | float)
            or isinstance(self.alpha, bool)
            or self.alpha <= 0
        ):
            raise ConfigError(f"alpha: must be a number > 0, got {self.alpha!r}")
        _fraction("dropout", self.dropout)
        t = self.target_modules
        if t is not None:
            if isinstance(t, str):
                t = [t]
            if (
                not isinstance(t, list | tuple)
                or not t
                or not all(isinstance(x, str) and x for x in t)
            ):
                raise ConfigError(
                    f"target_modules: must be a list of module names such as [q_proj, v_proj], "
                    f"got {self.target_modules!r}"
                )
            object.__setattr__(self, "target_modules", tuple(t))
        object.__setattr__(self, "alpha", float(self.alpha))


@dataclass(frozen=True)
class ModelSettings:
    """The ``model`` section of an sft config: exactly one of ``path`` and ``config``."""

    # A local model directory (config.json and weights, as save_pretrained writes them).
    path: str | None = None
    # A model trained from scratch.
    config: ArchSettings | None = None
    # Low-rank adapters instead of training every weight (null: full fine-tuning).
    lora: LoraSettings | None = None
    # Recompute activations in the backward pass (less memory, more compute).
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        example = (
            "path: DIR (a local model directory) or config: {architecture: llama, "
            "hidden_size: 128, num_layers: 2, num_heads: 4}"
        )
        if (self.path is None) == (self.config is None):
            which = "both" if self.path is not None else "neither"
            raise ConfigError(f"path, config: {which} given; give exactly one: {example}")
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ConfigError(f"path: must be a directory name, got {self.path!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(
                f"gradient_checkpointing: must be true or false, got {self.gradient_checkpointing!r}"
            )


def parse_model_settings(raw: dict[str, Any] | None, where: str = "model") -> ModelSettings:
    """The checked :class:`ModelSettings` of a config's ``model`` mapping; a ConfigError
    naming ``where.KEY`` and the fix otherwise."""
    if raw is None:
        raise ConfigError(
            f"{where}: missing; sft stages need {where}.path: DIR (a local model directory) or "
            f"{where}.config: {{architecture: llama, hidden_size: 128, num_layers: 2, num_heads: 4}}"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping (path: or config:), got {raw!r}")
    raw = dict(raw)
    if "config" in raw and raw["config"] is not None:
        if not isinstance(raw["config"], dict):
            raise ConfigError(
                f"{where}.config: must be a mapping such as {{architecture: llama, "
                f"hidden_size: 128, num_layers: 2, num_heads: 4}}, got {raw['config']!r}"
            )
        raw["config"] = build_section(ArchSettings, raw["config"], f"{where}.config")
    lora = raw.get("lora")
    if lora is True:
        raw["lora"] = LoraSettings()
    elif lora is False:
        raw["lora"] = None
    elif lora is not None:
        if not isinstance(lora, dict):
            raise ConfigError(
                f"{where}.lora: must be a mapping such as {{r: 16, alpha: 32}}, true or null, "
                f"got {lora!r}"
            )
        raw["lora"] = build_section(LoraSettings, lora, f"{where}.lora")
    settings: ModelSettings = build_section(ModelSettings, raw, where)
    return settings


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class LoadedModel:
    """A built model and what the trainer needs to know about it."""

    # What trains: a transformers PreTrainedModel, or a peft PeftModel around it with LoRA.
    model: torch.nn.Module
    # The transformers model itself (with the adapters injected under LoRA).
    base: Any
    # True when only LoRA adapters train.
    is_lora: bool
    # Every parameter (adapters included).
    n_params: int
    # Parameters that require gradients.
    n_trainable: int
    # The settings it was built from.
    settings: ModelSettings
    # Where it came from: {"source": "config"} or {"source": "path", "path": DIR}.
    origin: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (summary.json's ``model``)."""
        cfg = self.base.config
        lora = self.settings.lora
        return {
            **self.origin,
            "model_type": str(cfg.model_type),
            "class": type(self.base).__name__,
            "hidden_size": _cfg_get(cfg, "hidden_size", "n_embd"),
            "num_layers": _cfg_get(cfg, "num_hidden_layers", "n_layer"),
            "num_heads": _cfg_get(cfg, "num_attention_heads", "n_head"),
            "vocab_size": _vocab_rows(self.base),
            "max_positions": _cfg_get(cfg, "max_position_embeddings", "n_positions"),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "n_params": self.n_params,
            "n_trainable": self.n_trainable,
            "lora": None
            if lora is None
            else {
                "r": lora.r,
                "alpha": lora.alpha,
                "dropout": lora.dropout,
                "target_modules": sorted(_lora_targets(self.model)),
            },
            "gradient_checkpointing": self.settings.gradient_checkpointing,
        }


def _vocab_rows(model: Any) -> int:
    """Rows of the model's input embedding (the ids it can read)."""
    return int(model.get_input_embeddings().weight.shape[0])


def _cfg_get(cfg: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int):
            return v
    return None


def _lora_targets(model: Any) -> set[str]:
    cfg = getattr(model, "peft_config", {}).get("default")
    return set(getattr(cfg, "target_modules", None) or ())


def _from_config(
    arch: ArchSettings, *, vocab_size: int, pad_id: int, end_id: int, max_positions: int
) -> Any:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    n_pos = arch.max_positions or max_positions
    if n_pos < max_positions:
        raise ModelError(
            f"model.config.max_positions: {n_pos} is shorter than the store's longest episode "
            f"({max_positions} tokens); raise it or leave it out"
        )
    # The store's sequences start with no BOS token; its end token doubles as one (as
    # GPT-2's <|endoftext|> does), so no id of another vocabulary leaks in.
    ids: dict[str, Any] = {"pad_token_id": pad_id, "eos_token_id": end_id, "bos_token_id": end_id}
    cfg: Any
    if arch.architecture == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=arch.hidden_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            num_key_value_heads=arch.num_heads,
            intermediate_size=arch.mlp_size,
            max_position_embeddings=n_pos,
            attention_dropout=arch.dropout,
            tie_word_embeddings=False,
            **ids,
        )
    else:
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=arch.hidden_size,
            n_layer=arch.num_layers,
            n_head=arch.num_heads,
            n_inner=arch.mlp_size,
            n_positions=n_pos,
            attn_pdrop=arch.dropout,
            embd_pdrop=arch.dropout,
            resid_pdrop=arch.dropout,
            **ids,
        )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _from_path(path: str, *, vocab_size: int, max_positions: int) -> Any:
    from transformers import AutoModelForCausalLM

    d = Path(path)
    if not (d / "config.json").is_file():
        why = "does not exist" if not d.exists() else "has no config.json"
        raise ModelError(
            f"model.path: {path} {why}; give a local model directory as save_pretrained "
            "writes it (config.json and weights)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(d), local_files_only=True, dtype=torch.float32
        )
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"model.path: {path} does not load as a causal LM ({first}); give a directory "
            "written by save_pretrained of a model AutoModelForCausalLM knows"
        ) from None
    rows = _vocab_rows(model)
    if rows < vocab_size:
        raise ModelError(
            f"model.path: {path} has a vocabulary of {rows} tokens, the store's has "
            f"{vocab_size}; build the store with this model's tokenizer or use a larger model"
        )
    n_pos = _cfg_get(model.config, "max_position_embeddings", "n_positions")
    if n_pos is not None and n_pos < max_positions:
        raise ModelError(
            f"model.path: {path} takes at most {n_pos} positions, the store's longest episode "
            f"has {max_positions} tokens; build the store with a smaller max_tokens"
        )
    return model


def _check_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """A ModelError for a target name that matches no module (peft matches a name or a
    dotted suffix of one)."""
    names = [n for n, _ in model.named_modules() if n]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            from transformers.pytorch_utils import Conv1D

            linear = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear | Conv1D)
                }
            )
            raise ModelError(
                f"model.lora.target_modules: {t!r} matches no module of the model; its linear "
                f"layers are named {', '.join(linear[:12])}"
            )


def _default_targets(model: Any) -> tuple[str, ...]:
    """peft's LoRA targets for the model's type; a ModelError when it has none."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    model_type = str(getattr(model.config, "model_type", ""))
    targets = known.get(model_type)
    if not targets:
        raise ModelError(
            f"model.lora.target_modules: no default for model type {model_type!r}; name the "
            "modules to adapt, e.g. [q_proj, v_proj]"
        )
    return tuple(targets)


def _add_lora(model: Any, lora: LoraSettings) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora.target_modules or _default_targets(model)
    _check_targets(model, targets)
    conv1d = any(
        isinstance(m, Conv1D)
        for n, m in model.named_modules()
        if any(n == t or n.endswith("." + t) for t in targets)
    )
    cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int, used as a number
        lora_dropout=lora.dropout,
        target_modules=list(targets),
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight transposed
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        return get_peft_model(model, cfg)


def build_model(
    settings: ModelSettings,
    *,
    vocab_size: int,
    pad_id: int,
    end_id: int,
    max_positions: int,
    seed: int,
) -> LoadedModel:
    """The model of ``settings`` for a store of ``vocab_size`` tokens whose longest episode
    has ``max_positions`` tokens, in float32 and training mode.

    A config model is initialised from ``seed`` inside a forked random state (the same seed
    gives the same weights; the caller's random streams are left as they were). The pad and
    end ids go into its config and generation config (a directory's model keeps its config;
    its generation config takes them, so generation stops at the store's end token).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if settings.config is not None:
            base = _from_config(
                settings.config,
                vocab_size=vocab_size,
                pad_id=pad_id,
                end_id=end_id,
                max_positions=max_positions,
            )
            origin: dict[str, Any] = {
                "source": "config",
                "architecture": settings.config.architecture,
            }
        else:
            assert settings.path is not None
            base = _from_path(settings.path, vocab_size=vocab_size, max_positions=max_positions)
            origin = {"source": "path", "path": str(settings.path)}
        gen = base.generation_config
        gen.pad_token_id, gen.eos_token_id = pad_id, end_id
        model = base
        if settings.lora is not None:
            model = _add_lora(base, settings.lora)
    if settings.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers before activation_checkpointing_enable
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    params = list(model.parameters())
    return LoadedModel(
        model=model,
        base=base,
        is_lora=settings.lora is not None,
        n_params=sum(p.numel() for p in params),
        n_trainable=sum(p.numel() for p in params if p.requires_grad),
        settings=settings,
        origin=origin,
    )


# --------------------------------------------------------------------------- running


HiddenFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def causal_prefix_rows(attention_mask: torch.Tensor, position_ids: torch.Tensor | None) -> bool:
    """True when every row of a (B, L) padding mask is its real tokens first, at positions
    0, 1, 2, ... (or no positions given), then padding: causal attention alone then keeps
    each real token from the padding, and the positions are the default ones (one small
    check; a sync on CUDA)."""
    real = attention_mask.bool()
    ok = (real[:, 1:] <= real[:, :-1]).all()
    if position_ids is not None:
        cols = torch.arange(real.shape[1], device=real.device)
        ok = ok & ((position_ids == cols) | ~real).all()
    return bool(ok)


def hidden_and_head(loaded: LoadedModel) -> tuple[HiddenFn, torch.nn.Module]:
    """``(fn, lm_head)``: ``fn(input_ids, attention_mask, position_ids)`` runs the transformer
    body (LoRA adapters included) and returns the (B, L, H) last hidden states; ``lm_head``
    maps them to logits, so ``lm_head(fn(...))`` equals the model's logits.

    ``attention_mask`` is a (B, L) padding mask (1 real, 0 pad) or a (B, 1, L, L) bool mask
    (True: may attend) for packed rows; the latter goes to the attention as it is (made
    additive for the eager attention, which adds its mask to the scores). A right-padded
    (B, L) batch at default positions (:func:`causal_prefix_rows`, as ``collate`` lays out
    unpacked rows) runs as plain causal attention, with no mask: the real tokens' states
    are the same, and the attention kernel skips the blocks above the diagonal instead of
    masking them (about 7% of an fp32 step, 15% of a bf16 one, of the benchmark's model on
    CPU). Other (B, L) masks (left padding, holes) go to the model as they are.
    ``attention_mask=None`` says the rows are right-padded (or not padded) without the check
    (no host sync on CUDA); ``position_ids=None``: positions 0, 1, 2, ... in every row.
    """
    base = loaded.base
    body = base.base_model
    head = base.get_output_embeddings()
    if body is base or head is None:
        raise ModelError(
            f"model: {type(base).__name__} has no separate transformer body and output head; "
            "use a causal LM such as LlamaForCausalLM or GPT2LMHeadModel"
        )
    eager = getattr(base.config, "_attn_implementation", "sdpa") == "eager"

    def forward(
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        mask, pos = attention_mask, position_ids
        if mask is None:  # the caller knows the rows are right-padded (or not padded)
            mask = torch.ones_like(input_ids)
        elif mask.ndim == 4 and mask.dtype == torch.bool and eager:
            low = torch.finfo(torch.float32).min
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, low)
        elif mask.ndim == 2 and causal_prefix_rows(mask, pos):
            # all ones: transformers then skips building a mask (is_causal attention), and
            # models that warn about padding without a mask stay quiet
            mask, pos = torch.ones_like(mask), None
        out = body(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    return forward, head


# --------------------------------------------------------------------------- export


def _save_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    """The store's tokenizers-library tokenizer as a transformers tokenizer in ``out``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    src = Path(tokenizer_dir)
    file = src / "tokenizer.json"
    special: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = src / name
        if p.is_file():
            data = json.loads(p.read_text(encoding="utf-8"))
            for k, v in data.items():
                if k.endswith("_token") and isinstance(v, str):
                    special.setdefault(k, v)
    vocab = Tokenizer.from_file(str(file)).get_vocab()
    if END_TOKEN in vocab:
        special["eos_token"] = END_TOKEN
    if PAD_TOKEN in vocab:
        special["pad_token"] = PAD_TOKEN
    tok = PreTrainedTokenizerFast(tokenizer_file=str(file), **special)
    tok.save_pretrained(str(out))


def export_merged(
    loaded: LoadedModel, out_dir: str | Path, tokenizer_dir: str | Path | None = None
) -> Path:
    """Write ``out_dir`` as a plain model directory (safetensors weights, config, generation
    config; the tokenizer too with ``tokenizer_dir``). LoRA adapters are merged into a copy;
    the training model keeps its adapters. Returns ``out_dir``."""
    if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ModelError(
            f"tokenizer_dir: {tokenizer_dir} has no tokenizer.json; give the store's tokenizer "
            "directory"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if loaded.is_lora:
        merged = copy.deepcopy(loaded.model).merge_and_unload()  # type: ignore[operator]
    else:
        merged = loaded.base
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one model directory: no bar in the run's output
    merged.save_pretrained(str(out), safe_serialization=True)
    if not (out / "generation_config.json").is_file():
        merged.generation_config.save_pretrained(str(out))
    if tokenizer_dir is not None:
        _save_tokenizer(Path(tokenizer_dir), out)
    return out


def save_adapter(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Write the LoRA adapter alone (peft's ``adapter_config.json`` and
    ``adapter_model.safetensors``) to ``out_dir``."""
    if not loaded.is_lora:
        raise ModelError(
            "model.lora: not set, so there is no adapter to save; export_merged instead"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(str(out))  # type: ignore[operator]
    return out
