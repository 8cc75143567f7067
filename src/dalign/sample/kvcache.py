"""A KV cache written in place into buffers reserved for the whole generation.

transformers' `DynamicCache` grows by `torch.cat`, so every decode step copies the whole cache of every layer: at
batch 128 and ~1,300 tokens of context that is ~4 GB of copies a step for SmolLM2-135M in bf16, more than the step's
matmuls. Here each layer owns [batch, heads, capacity, dim] buffers; a step writes its one new position and
attention reads a view of the filled part. Values are the same as DynamicCache's, position for position.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class ReservedLayer(DynamicLayer):
    """One layer's keys and values in reserved buffers; `keys`/`values` are views of the filled positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, _ = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, key_states.shape[-1]))
        self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # more than reserved: grow once, geometrically, rather than fail
            self.capacity = max(end, 2 * self.capacity)
            grow = self.capacity - self._k.shape[-2]
            self._k, self._v = (
                torch.cat([t, t.new_empty((*t.shape[:2], grow, t.shape[-1]))], 2) for t in (self._k, self._v)
            )
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) the batch rows `indices`; only the filled positions are copied."""
        if self.is_initialized:
            self._k, self._v = (self._select(t, indices) for t in (self._k, self._v))
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def _select(self, t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = t.new_empty((len(indices), *t.shape[1:]))
        out[:, :, : self.length] = t[:, :, : self.length].index_select(0, indices)
        return out

    def reset(self) -> None:
        self.length = 0
        self.is_initialized = False
        self.keys = self.values = None


def full_attention_only(config) -> bool:
    """True when every layer attends to the whole context (no sliding window): what ReservedLayer implements."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return not getattr(text, "sliding_window", None)


def reserved_cache(model, num_layers: int, capacity: int) -> Cache | None:
    """A cache of `num_layers` ReservedLayers, or None (the model's own DynamicCache) for sliding-window models."""
    if not full_attention_only(model.config):
        return None
    return Cache(layers=[ReservedLayer(capacity) for _ in range(num_layers)])
