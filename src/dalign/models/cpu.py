"""What this CPU runs fast, and how much of it a workload uses.

`fast_bf16()` says whether bf16 matmuls beat fp32 here: Intel AMX (`amx_bf16`) or AVX-512 BF16 (`avx512_bf16`)
run bf16 products 2.5-5x faster than fp32 (measured on this project's machine: 2048^2 matmul ~750 vs ~210
GFLOP/s). Without them PyTorch emulates bf16 and it is *slower* than fp32, so `model.dtype: auto` only picks
bf16 where the flags are present. `DALIGN_CPU_BF16=1|0` overrides the detection (the test suite pins it to 0 so
that `auto` means fp32 on every machine).

`matmul_peaks()`, `forward_flops()` / `generation_flops()` and `mfu()` give model FLOPs utilisation: the FLOPs a
workload needs per second over the best matmul rate measured on this machine in the same process.
"""

from __future__ import annotations

import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ENV = "DALIGN_CPU_BF16"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The kernel's CPU feature flags (Linux /proc/cpuinfo); empty where that file does not exist."""
    p = Path("/proc/cpuinfo")
    if not p.exists():
        return frozenset()
    for line in p.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _torch_says_bf16() -> bool:
    """PyTorch's own probe (private helpers; absent in some builds, hence the guard)."""
    probes = (
        getattr(torch.cpu, "_is_amx_tile_supported", None),
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
    )
    return any(bool(p()) for p in probes if p is not None)


def bf16_reason() -> str:
    """Why bf16 is (not) considered fast here, in a few words (recorded in manifests and reports)."""
    forced = os.environ.get(ENV)
    if forced in ("0", "1"):
        return f"{ENV}={forced}"
    found = [f for f in BF16_FLAGS if f in cpu_flags()]
    if found:
        return "CPU flags " + ", ".join(found)
    if not cpu_flags() and _torch_says_bf16():
        return "torch CPU probe"
    return f"no {' / '.join(BF16_FLAGS)} on {platform.machine() or 'this CPU'}"


def fast_bf16() -> bool:
    """True where bf16 matmuls run natively (AMX or AVX-512 BF16), unless DALIGN_CPU_BF16 says otherwise."""
    forced = os.environ.get(ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if forced not in (None, ""):
        raise ValueError(f"{ENV}={forced!r}: use 1 (bf16 is fast here), 0 (it is not) or leave it unset")
    flags = cpu_flags()
    return any(f in flags for f in BF16_FLAGS) if flags else _torch_says_bf16()


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Best GFLOP/s of an n x n @ n x n product in `dtype` over ~`seconds` of repeats (best, not mean: the
    machine may be shared, and the peak is what the hardware can do)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up: thread pool, packing
    best, t_end = float("inf"), time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > t_end:
            break
    return 2 * n**3 / best / 1e9


def matmul_peaks(seconds: float = 1.0) -> dict[str, float]:
    """{"float32": GFLOP/s, "bfloat16": GFLOP/s}: the denominators of MFU, measured now in this process."""
    return {name: matmul_peak(getattr(torch, name), seconds=seconds) for name in ("float32", "bfloat16")}


def _linear_weights(model: nn.Module) -> tuple[int, int]:
    """(weights of every nn.Linear except the LM head, weights of the LM head); LoRA factors count as Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    return body, head.weight.numel() if head is not None else 0


def forward_flops(model: nn.Module, tokens: int, attended: int = 0, head_tokens: int | None = None) -> float:
    """FLOPs of a forward pass over `tokens` positions: 2 per linear weight and position, plus attention (2 x 2 x
    hidden per layer for each (query, key) pair; `attended` = number of pairs) and the LM head on `head_tokens`
    positions (default: all). Elementwise work (norms, activations, softmax) is not counted, as is usual for MFU."""
    cfg = model.config
    body, head = _linear_weights(model)
    attn = 4.0 * getattr(cfg, "num_hidden_layers", 0) * getattr(cfg, "hidden_size", 0) * attended
    return 2.0 * body * tokens + attn + 2.0 * head * (tokens if head_tokens is None else head_tokens)


def generation_flops(
    model: nn.Module, prompt_lens: list[int], new_tokens: list[int], prefill_lens: list[int] | None = None
) -> float:
    """Prefill of each prompt (LM head at its last position: the first new token), then one decode step per
    further new token, each attending to the prompt and the tokens before it. The last token is never fed back.
    `prefill_lens`: the prompts whose prefill actually ran, when rows share a prompt's (default: every row's)."""
    pre = prompt_lens if prefill_lens is None else prefill_lens
    steps = [max(n - 1, 0) for n in new_tokens]
    attended = sum(p * (p + 1) // 2 for p in pre) + sum(
        sum(p + i + 1 for i in range(k)) for p, k in zip(prompt_lens, steps, strict=True)
    )
    return forward_flops(model, sum(pre) + sum(steps), attended, head_tokens=len(pre) + sum(steps))


def mfu(flops: float, seconds: float, peaks: dict[str, float]) -> str:
    """'X GFLOP/s = a % of the bf16 peak, b % of the fp32 peak' for a benchmark line; the bf16 share is left out
    where bf16 is slower than fp32 (emulated: not a peak anything would run at)."""
    rate = flops / max(seconds, 1e-12) / 1e9
    names = {"bfloat16": "bf16", "float32": "fp32"}
    if peaks["bfloat16"] <= peaks["float32"]:
        names.pop("bfloat16")
    return f"{rate:.1f} GFLOP/s = " + ", ".join(
        f"{100 * rate / peaks[d]:.1f} % of the {name} peak ({peaks[d]:.0f})" for d, name in names.items()
    )


def describe() -> dict:
    """A small record of the CPU for manifests, cards and benchmark output."""
    return {
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "bf16_fast": fast_bf16(),
        "bf16_reason": bf16_reason(),
    }
