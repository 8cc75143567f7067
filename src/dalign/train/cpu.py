"""What makes LoRA training fast on a CPU (issue 14), measured on SmolLM2-135M, micro-batch 4 x ~270 tokens:

- the frozen base is loaded in bf16 when the trainer autocasts (`frozen_dtype`): autocast otherwise re-casts every
  fp32 weight at every forward; the trained LoRA factors stay fp32 master weights (PEFT's autocast_adapter_dtype);
- PEFT's cast of each LoRA input to the fp32 factor dtype is switched off under autocast: it copied every
  activation to fp32 only for autocast to copy it back to bf16;
- eager attention: at these lengths SDPA's CPU flash-attention backward took 2x the time of the eager matmuls;
- LoRA dropout masks from 16-bit random integers (`MaskDropout`): `nn.Dropout`'s bernoulli_ was a third of a
  bf16 step (210 masks of up to 1.6M entries each);
- TRL's fused LM head (`head_tiles`) in cache-sized tiles and on the completion positions only.
`benchmarks/cpu_speed.py` measures the whole against the stock path (`fast_kernels=False`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Drop an entry when its uniform 16-bit draw is below round(p * 2**16): p is exact to 1/65536.
_LEVELS = 1 << 16


class MaskDropout(torch.nn.Module):
    """Inverted dropout with the mask drawn as 16-bit integers, four per 64-bit draw of torch's generator.

    Same law as `nn.Dropout` up to p rounded to a multiple of 1/65536, seeded by `torch.manual_seed` like it, and
    ~3x cheaper on CPU, where torch's generator is the cost."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.cut = round(p * _LEVELS) - _LEVELS // 2  # threshold on the signed int16 view
        self.scale = 1.0 / (1.0 - round(p * _LEVELS) / _LEVELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = words.view(torch.int16)[:n].view(x.shape) >= self.cut
        return x * keep.to(x.dtype).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def frozen_dtype(flags: dict[str, bool]) -> str:
    """dtype to load the frozen base in, given the Trainer's mixed-precision flags (`precision_flags`)."""
    return "bfloat16" if flags["bf16"] else "float16" if flags["fp16"] else "float32"


def speed_up(model: torch.nn.Module, autocast: bool) -> None:
    """Apply the CPU kernels above to a PEFT model in place (on CPU only; a GPU keeps the stock kernels)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if next(model.parameters()).device.type != "cpu":
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation("eager")
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if autocast:
            module.cast_input_dtype_enabled = False
        drops = getattr(module, "lora_dropout", None)
        for name, drop in (drops or {}).items():
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                drops[name] = MaskDropout(drop.p)


# TRL's defaults are sized for GPUs: [4096 tokens, 32768 vocabulary] tiles of fp32 statistics stream through memory on
# a CPU. [128, 4096] tiles stay in cache: the head's forward + backward on 1,100 tokens x 49,152 entries ran 2.36x
# faster (bf16, SmolLM2's head; benchmarks/RESULTS.md, cpu_speed).
HEAD_TOKENS, HEAD_VOCAB = 128, 4096


@contextlib.contextmanager
def head_tiles(model: torch.nn.Module) -> Iterator[None]:
    """While training `model` on CPU: TRL's fused LM head (`fused_lm_head=True`, log-probs without the [N, V]
    logits) runs in `HEAD_TOKENS x HEAD_VOCAB` tiles and projects only the positions that have a label, as TRL does
    on GPUs (it scores every position elsewhere to keep tile shapes fixed for compilers; eager CPU has none). The
    same numbers up to summation order. TRL's module settings are restored on exit; a GPU model, or a TRL without
    these settings, is left alone."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as tu

    names = [(kernel, "TOKEN_CHUNK_SIZE"), (tu, "_CHUNKED_LOGPROB_CHUNK_SIZE"), (tu, "_use_triton")]
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not on_cpu or not all(hasattr(mod, name) for mod, name in names):
        yield
        return
    saved = [getattr(mod, name) for mod, name in names]
    on_gpu = saved[2]
    new = [HEAD_TOKENS, HEAD_VOCAB, lambda device: device.type == "cpu" or on_gpu(device)]
    try:
        for (mod, name), value in zip(names, new, strict=True):
            setattr(mod, name, value)
        yield
    finally:
        for (mod, name), value in zip(names, saved, strict=True):
            setattr(mod, name, value)
