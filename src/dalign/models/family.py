"""Per-family model adapters: where the decoder blocks and the final norm live.

Behaviour that differs by architecture lives here, keyed by `config.model_type`, never by the model's name.
Chat formatting differences are left to each tokenizer's own chat template.
"""

from __future__ import annotations

from torch import nn

from dalign.registry import Registry

FAMILIES: Registry[type[Family]] = Registry("model family")


class Family:
    """Decoder-only transformer laid out as HF's Llama: `model.model.layers` and `model.model.norm`."""

    def __init__(self, model: nn.Module):
        # Unwrap PEFT: its forward hooks still run because we index the same module objects.
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model

    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def final_norm(self) -> nn.Module:
        return self.decoder().norm

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def layer_output_module(self, layer: int) -> nn.Module:
        """Module whose output is `hidden_states[layer]` (1..L) in HF's `output_hidden_states` convention.

        hidden_states[0] is the embedding output, hidden_states[l] the output of block l for l < L, and
        hidden_states[L] the *normed* output of the last block.
        """
        n = self.num_layers
        if not 1 <= layer <= n:
            raise ValueError(f"layer {layer} is out of range: valid layers are 1..{n} for this model")
        return self.final_norm() if layer == n else self.layers()[layer - 1]

    def residual_writers(self) -> list[nn.Module]:
        """The projections whose outputs are added onto the residual stream: attention out, MLP down."""
        return [m for block in self.layers() for m in (block.self_attn.o_proj, block.mlp.down_proj)]


for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"):
    FAMILIES.register(_t)(Family)


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = FAMILIES.get(model_type) if model_type in FAMILIES else Family
    return cls(model)


def cache_kwarg(model: nn.Module) -> str:
    """Name of the KV-cache argument of `forward`: 'cache' from transformers 5.2x on, 'past_key_values' before."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def generated_cache(output):
    """The KV cache returned by `generate(return_dict_in_generate=True)` under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
