"""What makes LoRA training fast on a CPU (issue 14), measured on SmolLM2-135M, micro-batch 4 x ~270 tokens:

- the frozen base is loaded in bf16 when the trainer autocasts (`frozen_dtype`): autocast otherwise re-casts every
  fp32 weight at every forward; the trained LoRA factors stay fp32 master weights (PEFT's autocast_adapter_dtype);
- PEFT's cast of each LoRA input to the fp32 factor dtype is switched off under autocast: it copied every
  activation to fp32 only for autocast to copy it back to bf16;
- eager attention: at these lengths SDPA's CPU flash-attention backward took 2x the time of the eager matmuls;
- LoRA dropout masks from 16-bit random integers (`MaskDropout`): `nn.Dropout`'s bernoulli_ was a third of a
  bf16 step (210 masks of up to 1.6M entries each); numpy's generator and integer ops cut a mask's cost 3x more;
- TRL's fused LM head (`head_tiles`) in cache-sized tiles, on the completion positions only, with leaner folds
  and a bf16 backward (forward + backward on 1,100 positions: 1.07 -> 0.39 s).
`benchmarks/cpu_speed.py` measures the whole against the stock path (`fast_kernels=False`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import numpy as np
import torch

# Drop an entry when its uniform 16-bit draw is below round(p * 2**16): p is exact to 1/65536.
_LEVELS = 1 << 16


class MaskDropout(torch.nn.Module):
    """Inverted dropout with the mask drawn as 16-bit integers from numpy's SFC64, seeded per call from torch's
    generator.

    Same law as `nn.Dropout` up to p rounded to a multiple of 1/65536, seeded by `torch.manual_seed` like it, and
    ~3x cheaper on CPU. Why: torch's generator and its bool casts were the cost (a 1.7M-entry bf16 mask: randint
    2.1 ms, bool to bf16 2.0 ms; SFC64 draws the same bits in 0.95 ms and integer clamps build the mask in 0.4 ms)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.cut = round(p * _LEVELS) - _LEVELS // 2  # threshold on the signed int16 view
        self.scale = 1.0 / (1.0 - round(p * _LEVELS) / _LEVELS)

    def mask(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The {0, scale} mask: an entry is dropped when its uniform int16 draw is below `cut`."""
        n = shape.numel()
        seed = int(torch.randint(2**63 - 1, (1,)).item())
        words = np.random.SFC64(seed).random_raw((n + 3) // 4)
        draws = torch.from_numpy(words).view(torch.int16)[:n].view(shape)
        keep = draws.clamp_(self.cut - 1, self.cut).sub_(self.cut - 1)  # 1 where kept, 0 where dropped
        if dtype.itemsize == 2:  # the 16-bit pattern of `scale` where kept, without a float cast
            return keep.mul_(torch.tensor(self.scale, dtype=dtype).view(torch.int16)).view(dtype)
        return keep.to(dtype).mul_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * self.mask(x.shape, x.dtype).to(x.device)

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


def _scaled_logits(tile: torch.Tensor, logit_scale: float, inv_t: float) -> torch.Tensor:
    """A logits tile in fp32, times the head's logit scale and 1 / temperature. An fp32 tile is scaled in place:
    both folds overwrite or drop it afterwards."""
    z = tile.float()
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z


def _forward_fold(tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum, max_before_target,
                  target_logit, vocab_start, n_cols, logit_scale, softcap, inv_t, HAS_SOFTCAP, HAS_ENTROPY,
                  HAS_LOG_SUM_SQ_PROBS, HAS_MEAN_LOGITS, HAS_IS_TOP1, BLOCK_SIZE, stock=None):  # fmt: skip
    """TRL's `_forward_tile` (fold a logits tile into the online-logsumexp statistics) in 6 passes over the tile
    instead of ~12: one `max` gives both the running maximum and the top-1 test. `max_before_target` then holds
    the tile maximum where the tile's first argmax precedes the target and -inf elsewhere: not TRL's prefix maximum,
    but `is_top1 = target >= max & target > max_before_target` comes out the same. Softcapping and the optional
    outputs SFT does not ask for keep `stock`."""
    if HAS_SOFTCAP or HAS_LOG_SUM_SQ_PROBS or HAS_MEAN_LOGITS:
        return stock(**{k: v for k, v in locals().items() if k != "stock"})
    z = _scaled_logits(tile, logit_scale, inv_t)
    local = targets - vocab_start
    tile_max, first = z.max(-1)  # ties: the first index, as argmax
    if HAS_IS_TOP1:
        before = torch.where(first < local, tile_max, -math.inf)
        torch.maximum(max_before_target, before, out=max_before_target)
    new_m = torch.maximum(running_max, tile_max)
    rescale = torch.exp(running_max - new_m)
    e = (z - new_m.unsqueeze(-1)).exp_()
    sum_exp.mul_(rescale).add_(e.sum(-1))
    if HAS_ENTROPY:
        x_sum_exp.mul_(rescale).add_(torch.linalg.vecdot(e, z))
    running_max.copy_(new_m)
    in_tile = (local >= 0) & (local < n_cols)
    target_z = z.gather(-1, local.clamp(0, n_cols - 1).unsqueeze(-1)).squeeze(-1)
    target_logit.copy_(torch.where(in_tile, target_z, target_logit))


def _backward_fold(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols,
                   logit_scale, softcap, inv_t, HAS_SOFTCAP, HAS_LOGPROB_GRAD, HAS_ENTROPY_GRAD, BLOCK_SIZE,
                   stock=None):  # fmt: skip
    """TRL's `_backward_tile` (a logits tile becomes d loss / d logits, in place) in ~6 passes instead of ~15:
    dz = p * (-g_lp - g_ent * (log p + H)), plus g_lp at the target; softcapping keeps `stock`."""
    if HAS_SOFTCAP:
        return stock(**{k: v for k, v in locals().items() if k != "stock"})
    log_p = _scaled_logits(tile, logit_scale, inv_t).sub_(log_z.unsqueeze(-1))
    p = torch.exp(log_p)
    if HAS_ENTROPY_GRAD:
        factor = log_p.add_(entropy.unsqueeze(-1)).mul_(-grad_entropy.unsqueeze(-1))
        if HAS_LOGPROB_GRAD:
            factor.sub_(grad_logprobs.unsqueeze(-1))
        grad = p.mul_(factor)
    else:
        grad = p.mul_(-grad_logprobs.unsqueeze(-1) if HAS_LOGPROB_GRAD else 0.0)
    if HAS_LOGPROB_GRAD:  # d log p_target / dz_target = 1 - p_target: the 1
        local = targets - vocab_start
        rows = ((local >= 0) & (local < n_cols)).nonzero().squeeze(-1)
        grad[rows, local[rows]] += grad_logprobs[rows]
    if inv_t * logit_scale != 1.0:
        grad.mul_(inv_t * logit_scale)
    tile.copy_(grad)


def _tiled_head_backward(stock, ctx, grad_logprobs, grad_entropy, *rest):
    """The backward of TRL's fused head on CPU: each token tile's logit gradients fill one [tokens, vocabulary] buffer
    and one matmul over the whole vocabulary gives the hidden-state gradient. TRL's own backward accumulates one
    product per vocabulary tile into an fp32 buffer, and on CPU that runs in fp32 (`_addmm_fp32` upcasts both sides:
    the head's costliest call, 0.24 of 1.07 s). oneDNN's bf16 matmul accumulates in fp32 and rounds once, as TRL's
    final cast does: the same numbers up to summation order. Inputs of another dtype than the compute dtype (fp32
    hidden states under bf16 autocast) and other devices keep `stock` (which also gathers a ZeRO-3 sharded head)."""
    import trl.kernels.chunked_logprob as kernel

    hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
    dtype = ctx.compute_dtype
    if hidden.device.type != "cpu" or hidden.dtype != dtype:
        return stock(ctx, grad_logprobs, grad_entropy, *rest)
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    grad_lp = grad_logprobs.float().contiguous() if grad_logprobs is not None else None
    grad_ent = grad_entropy.float().contiguous() if grad_entropy is not None else None
    w = weight.to(dtype)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32) if need_bias else None
    for t0 in range(0, n_tokens, HEAD_TOKENS):
        rows = slice(t0, min(t0 + HEAD_TOKENS, n_tokens))
        h = hidden[rows]
        grads = torch.empty((h.shape[0], vocab), dtype=dtype)
        for v0 in range(0, vocab, HEAD_VOCAB):
            cols = slice(v0, min(v0 + HEAD_VOCAB, vocab))
            tile = grads[:, cols]
            torch.mm(h, w[cols].t(), out=tile)
            if bias is not None:
                tile.add_(bias[cols].to(dtype))
            kernel._backward_tile(  # the logits tile becomes its gradient in place (`_backward_fold` here)
                tile,
                tile.stride(0),
                targets[rows],
                log_z[rows],
                entropy[rows],
                grad_lp[rows] if grad_lp is not None else log_z,
                grad_ent[rows] if grad_ent is not None else log_z,
                v0,
                tile.shape[1],
                HAS_LOGPROB_GRAD=grad_lp is not None,
                HAS_ENTROPY_GRAD=grad_ent is not None,
                BLOCK_SIZE=kernel._BLOCK_SIZE,
                **ctx.kernel_args,
            )
        if need_hidden:
            torch.mm(grads, w, out=grad_hidden[rows])
        if need_weight:  # fp32 across token tiles, as TRL
            grad_weight.addmm_(grads.t().float(), h.float())
        if need_bias:
            grad_bias += grads.sum(0, dtype=torch.float32)
    grad_weight = grad_weight.to(weight.dtype) if need_weight else None
    grad_bias = grad_bias.to(bias.dtype) if need_bias else None
    return (grad_hidden, grad_weight, grad_bias) + (None,) * 6


@contextlib.contextmanager
def head_tiles(model: torch.nn.Module) -> Iterator[None]:
    """While training `model` on CPU: TRL's fused LM head (`fused_lm_head=True`, log-probs without the [N, V]
    logits) runs in `HEAD_TOKENS x HEAD_VOCAB` tiles, projects only the positions that have a label, as TRL does
    on GPUs (it scores every position elsewhere to keep tile shapes fixed for compilers; eager CPU has none), and
    takes its backward from `_tiled_head_backward`. The same numbers up to summation order. TRL's settings are
    restored on exit; a GPU model, or a TRL without these settings, is left alone."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as tu

    fn = kernel.ChunkedLogProbFunction
    names = [(kernel, "TOKEN_CHUNK_SIZE"), (tu, "_CHUNKED_LOGPROB_CHUNK_SIZE"), (tu, "_use_triton")]
    names += [(fn, "backward"), (kernel, "_forward_tile"), (kernel, "_backward_tile")]
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not on_cpu or not all(hasattr(mod, name) for mod, name in names):
        yield
        return
    saved = [vars(mod)[name] for mod, name in names]  # the class's raw staticmethod, restored as it was
    on_gpu = saved[2]
    new = [HEAD_TOKENS, HEAD_VOCAB, lambda device: device.type == "cpu" or on_gpu(device)]
    new += [staticmethod(functools.partial(_tiled_head_backward, saved[3].__func__))]
    new += [
        functools.partial(_forward_fold, stock=saved[4]),
        functools.partial(_backward_fold, stock=saved[5]),
    ]
    try:
        for (mod, name), value in zip(names, new, strict=True):
            setattr(mod, name, value)
        yield
    finally:
        for (mod, name), value in zip(names, saved, strict=True):
            setattr(mod, name, value)
