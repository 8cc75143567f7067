"""The aligned/base model pair that latent-space attribution compares.

With a LoRA adapter the base is the *same module with the adapter disabled*: one copy of the weights in memory.
With two full checkpoints both are loaded and their tokenizers must agree.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from dalign.config import ModelConfig
from dalign.models.family import Family, family_of
from dalign.models.loading import load_model, load_tokenizer, pick_device


class AdapterMismatch(ValueError):
    pass


class TokenizerMismatch(ValueError):
    pass


@dataclass
class ModelPair:
    model: nn.Module  # the aligned model (a PeftModel when `has_adapter`)
    tokenizer: object
    base_model: nn.Module | None = (
        None  # a separate base checkpoint, or None when the base is adapter-disabled
    )
    info: dict = field(default_factory=dict)

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @property
    def has_base(self) -> bool:
        return self.has_adapter or self.base_model is not None

    @property
    def family(self) -> Family:
        return family_of(self.model)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def aligned(self) -> Iterator[nn.Module]:
        yield self.model

    @contextlib.contextmanager
    def base(self) -> Iterator[nn.Module]:
        if self.base_model is not None:
            yield self.base_model
        elif self.has_adapter:
            with self.model.disable_adapter():
                yield self.model
        else:
            raise ValueError(
                "this pair has no base model: give an adapter (model.adapter) or a base checkpoint (model.base)"
            )


def adapter_card(adapter_dir: str | Path) -> dict:
    p = Path(adapter_dir) / "card.json"
    return json.loads(p.read_text()) if p.exists() else {}


def check_adapter_base(adapter_dir: str | Path, student: str) -> None:
    """An adapter records the model spec it was trained on; refuse to put it on another model."""
    card = adapter_card(adapter_dir)
    trained_on = card.get("base_model")
    if trained_on and trained_on != student:
        raise AdapterMismatch(
            f"adapter {adapter_dir} was trained on {trained_on!r} but the student is {student!r}; "
            f"set model.student: {trained_on} or use an adapter trained on {student}"
        )


def pair_tokenizer(cfg: ModelConfig, adapter: str | Path | None = None):
    """The tokenizer `load_pair` gives the pair (the adapter's when it saved one), without loading weights."""
    adapter = adapter if adapter is not None else cfg.adapter
    if adapter and (Path(adapter) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(adapter)  # SFT may have added <think> tokens
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return load_tokenizer(cfg.student, cfg.trust_remote_code)


def context_limit(cfg: ModelConfig) -> int | None:
    """model.max_context, else the student's max_position_embeddings (read from its config, no weights)."""
    if cfg.max_context:
        return cfg.max_context
    from transformers import AutoConfig

    from dalign.models.loading import resolve_spec

    conf = AutoConfig.from_pretrained(resolve_spec(cfg.student), trust_remote_code=cfg.trust_remote_code)
    return getattr(conf, "max_position_embeddings", None)


def model_depth(cfg: ModelConfig) -> int:
    """The student's number of transformer blocks (from its config, no weights): layers 1..depth can be scored."""
    from transformers import AutoConfig

    from dalign.models.loading import resolve_spec

    conf = AutoConfig.from_pretrained(resolve_spec(cfg.student), trust_remote_code=cfg.trust_remote_code)
    conf = getattr(conf, "text_config", None) or conf
    return int(conf.num_hidden_layers)


def check_adapter_dir(adapter: Path) -> None:
    """A clear error for an adapter dir that PEFT would fail on with a traceback (empty config, cut weights)."""
    from safetensors import SafetensorError, safe_open

    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterMismatch(f"{adapter} is not a PEFT adapter dir (no adapter_config.json)")
    try:
        conf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterMismatch(
            f"{cfg_file} is not valid JSON ({e}); retrain the adapter (`dalign sft --force`)"
        ) from None
    if not isinstance(conf, dict) or "peft_type" not in conf:
        raise AdapterMismatch(
            f"{cfg_file} has no 'peft_type': it is not a PEFT adapter config; retrain it (`dalign sft --force`) "
            "or point model.adapter at a PEFT adapter dir"
        )
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterMismatch(
            f"{adapter} holds no adapter_model.safetensors (only safetensors adapters load)"
        )
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                f.get_slice(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterMismatch(
            f"{weights} cannot be read ({e}): the file is truncated or damaged; retrain (`dalign sft --force`)"
        ) from None


def load_pair(cfg: ModelConfig, adapter: str | Path | None = None) -> ModelPair:
    """Aligned model = student (+ adapter); base = adapter disabled, or `cfg.base` as a separate checkpoint."""
    adapter = adapter if adapter is not None else cfg.adapter
    model, tok = load_model(cfg.student, cfg.dtype, cfg.device, cfg.trust_remote_code)
    info = {"student": cfg.student, "adapter": str(adapter) if adapter else None, "base": cfg.base}
    if adapter:
        from peft import PeftModel

        adapter = Path(adapter)
        check_adapter_dir(adapter)
        check_adapter_base(adapter, cfg.student)
        if (adapter / "tokenizer_config.json").exists():
            tok = pair_tokenizer(cfg, adapter)
            if len(tok) != model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tok), mean_resizing=False)
        # Inference only: LoRA factors in the model's dtype (PEFT would keep bf16 models' in fp32 and cast every
        # activation up for them; the scorer's autocast rounds them to bf16 for the matmul either way).
        model = PeftModel.from_pretrained(
            model, adapter, is_trainable=False, autocast_adapter_dtype=False
        ).eval()
        model.to(pick_device(cfg.device))
        info["adapter_card"] = adapter_card(adapter)
    base = None
    if cfg.base:
        base, base_tok = load_model(cfg.base, cfg.dtype, cfg.device, cfg.trust_remote_code)
        check_same_tokenizer(tok, base_tok, cfg.student, cfg.base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return ModelPair(model=model, tokenizer=tok, base_model=base, info=info)


def check_same_tokenizer(a, b, name_a: str = "aligned", name_b: str = "base") -> None:
    if a.get_vocab() != b.get_vocab():
        only_a = len(set(a.get_vocab()) - set(b.get_vocab()))
        only_b = len(set(b.get_vocab()) - set(a.get_vocab()))
        raise TokenizerMismatch(
            f"tokenizers of {name_a} and {name_b} differ ({only_a} tokens only in {name_a}, {only_b} only in "
            f"{name_b}); latent similarity needs the same token ids in both models"
        )


__all__ = ["ModelPair", "load_pair", "load_tokenizer", "check_same_tokenizer", "AdapterMismatch"]
