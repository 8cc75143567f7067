"""Model loading, per-family adapters, chat formatting and the aligned/base pair."""

from dalign.models.chat import prompt_ids, render_prompt
from dalign.models.family import Family, family_of
from dalign.models.loading import PACKAGED, ModelSpecError, load_model, load_tokenizer, resolve_spec
from dalign.models.pair import ModelPair, load_pair

__all__ = [
    "PACKAGED",
    "Family",
    "ModelPair",
    "ModelSpecError",
    "family_of",
    "load_model",
    "load_pair",
    "load_tokenizer",
    "prompt_ids",
    "render_prompt",
    "resolve_spec",
]
