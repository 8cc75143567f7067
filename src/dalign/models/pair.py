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


def load_pair(cfg: ModelConfig, adapter: str | Path | None = None) -> ModelPair:
    """Aligned model = student (+ adapter); base = adapter disabled, or `cfg.base` as a separate checkpoint."""
    adapter = adapter if adapter is not None else cfg.adapter
    model, tok = load_model(cfg.student, cfg.dtype, cfg.device, cfg.trust_remote_code)
    info = {"student": cfg.student, "adapter": str(adapter) if adapter else None, "base": cfg.base}
    if adapter:
        from peft import PeftModel
        from transformers import AutoTokenizer

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter} is not a PEFT adapter dir (no adapter_config.json)")
        check_adapter_base(adapter, cfg.student)
        if (adapter / "tokenizer_config.json").exists():
            tok = AutoTokenizer.from_pretrained(adapter)  # SFT may have added <think> tokens
            if len(tok) != model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tok), mean_resizing=False)
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()
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
