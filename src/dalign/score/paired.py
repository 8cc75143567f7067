"""Paired bf16 passes: the base and the aligned side of a LoRA pair in one batch, sharing their rounding.

Latent similarity and KL compare the aligned model with the base, and the two differ only by the adapter's effect:
in early layers ~1e-4 of the state. Two separate bf16 passes round each side's matmul inputs and outputs on their
own, to 2^-9 of the whole activation, so the rounding noise is as large as the difference being measured and Best-of-N
choices between close candidates flip. Here every linear layer of the decoder gets the batch [base rows; aligned
rows] in fp32 and computes

    base:     W bf16(x_b)
    aligned:  W bf16(x_b) + W bf16(x_a - x_b) + LoRA(x_a)

in one matmul of the same size as the two passes'. Both sides carry the base's rounding; their difference is
rounded to 2^-9 of itself. Attention, norms, activations and the residual stream run in fp32. The LM head is paired
the same way for KL (`engine._lm_head`). Used by `ScoreEngine` when the pair is a bf16/fp16 model with an unmerged plain LoRA adapter
and no adapter on the LM head; otherwise the engine runs the two passes apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dalign.models.family import family_of
from dalign.models.pair import ModelPair


def low_dtype(model: nn.Module) -> torch.dtype | None:
    """The model's bf16/fp16 weight dtype, or None for fp32/fp64 models (those run exactly, unpaired)."""
    d = next(model.parameters()).dtype
    return d if d in (torch.bfloat16, torch.float16) else None


def _linears(decoder: nn.Module) -> list[nn.Module]:
    """The decoder's linear layers, each once: PEFT's LoRA wrappers rather than the `nn.Linear`s inside them."""
    wrappers = [m for m in decoder.modules() if hasattr(m, "base_layer")]
    wrapped = {id(sub) for w in wrappers for sub in w.modules() if sub is not w}
    return [
        m
        for m in decoder.modules()
        if (hasattr(m, "base_layer") and isinstance(m.base_layer, nn.Linear))
        or (isinstance(m, nn.Linear) and id(m) not in wrapped)
    ]


def supported(pair: ModelPair) -> bool:
    """Whether this pair can run paired: low-precision weights, the base being the adapter-disabled model, and
    every adapted module a plain unmerged LoRA on a linear layer (no DoRA or other variants), the LM head not
    adapted."""
    if pair.base_model is not None or not pair.has_adapter or low_dtype(pair.model) is None:
        return False
    fam = family_of(pair.model)
    if hasattr(fam.model.get_output_embeddings(), "base_layer"):
        return False
    for m in fam.decoder().modules():
        if not hasattr(m, "base_layer"):
            continue
        if (
            not isinstance(m.base_layer, nn.Linear)
            or getattr(m, "merged", False)
            or getattr(m, "lora_variant", {})
        ):
            return False
    return True


class _Split:
    """[x_b; x_a] fp32 -> [bf16(x_b); bf16(x_a - x_b)], and bf16(x_a) for the LoRA factors, once per input tensor:
    q, k and v read one normed state, gate and up another (decoders make new tensors between reads)."""

    def __init__(self, low: torch.dtype):
        self.low = low
        self.src: torch.Tensor | None = None
        self.both: torch.Tensor | None = None
        self.xa: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.src:
            n = x.shape[0] // 2
            both = torch.empty(x.shape, dtype=self.low, device=x.device)
            both[:n] = x[:n]
            torch.sub(x[n:], x[:n], out=both[n:])  # computed in x's dtype, rounded once on the way out
            self.src, self.both, self.xa = x, both, None
        return self.both

    def aligned(self) -> torch.Tensor:
        if self.xa is None:
            self.xa = self.src[self.src.shape[0] // 2 :].to(self.low)
        return self.xa


def _paired_forward(module: nn.Module, split: _Split, rows: int) -> Callable:
    lin = module.base_layer if hasattr(module, "base_layer") else module
    adapters = [a for a in module.active_adapters if a in module.lora_A] if hasattr(module, "lora_A") else []

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.shape[0] != rows:  # e.g. a mixture-of-experts layer routing tokens: the pairing would be wrong
            raise RuntimeError(
                f"paired scoring: {type(lin).__name__} got {x.shape[0]} rows for a batch of {rows}; this "
                f"architecture cannot run paired, score with model.dtype: float32"
            )
        y = F.linear(split(x.float()), lin.weight).float()  # [W bf16(x_b); W bf16(x_a - x_b)]
        n = rows // 2
        y[n:] += y[:n]
        if lin.bias is not None:
            y += lin.bias
        for a in adapters:
            lora = module.lora_B[a](module.lora_A[a](module.lora_dropout[a](split.aligned())))
            y[n:].add_(lora, alpha=module.scaling[a])
        return y

    return forward


@contextlib.contextmanager
def paired_linears(model: nn.Module, rows: int) -> Iterator[None]:
    """Within the block, the decoder's linear layers compute the paired products for batches of `rows` rows
    ([base; aligned]). The caller keeps the residual stream fp32 (`engine._capture` upcasts the embedding)."""
    fam = family_of(model)
    split = _Split(low_dtype(fam.model))
    mods = _linears(fam.decoder())
    for m in mods:
        m.forward = _paired_forward(m, split, rows)  # instance attribute: shadows the class's forward
    try:
        yield
    finally:
        for m in mods:
            del m.forward
