"""Batched N-candidate sampling where every sequence has its own seed.

`model.generate(do_sample=True)` draws all rows from one global RNG, so a candidate's text depends on which other
rows shared its batch. We instead run generate in greedy mode behind a logits processor that samples each row by
inverse CDF with one uniform number from that row's own `torch.Generator`, and leaves only the sampled token
finite, so greedy's argmax takes it. Each row's draw depends only on its own seed and step: a rerun, a different
batch size or a different bucketing gives the same text. (One uniform per row and step, not one per vocabulary
entry as Gumbel-max would need, keeps the cost at that of plain sampling.)

Optionally the aligned model's hidden state of the final token is captured while generating (forward hooks), so
latent-similarity scoring later needs only the base model's pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from dalign.models.family import cache_kwarg, family_of, generated_cache


def derive_seed(base: int, *parts: object) -> int:
    """A 63-bit seed for one (benchmark, prompt, candidate), stable across runs and machines."""
    blob = "\x1f".join(str(p) for p in (base, *parts)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


class RowSeededSampling(LogitsProcessor):
    """Temperature, top-p, then an exact per-row sample; the returned scores are -inf except at that token."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = (cum - sorted_scores.softmax(-1)) >= self.top_p  # keep the token that crosses top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        cdf = scores.softmax(-1).cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(scores.device)
        # side="right": the first index whose cdf exceeds u*total, so the chosen token has probability > 0.
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_max(
            cdf.shape[-1] - 1
        )
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, including the stop token when one was produced
    finish_reason: str  # "stop" or "length"
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> final-token state (float32)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def stop_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@torch.inference_mode()
def sample_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    seeds: list[int],
    *,
    temperature: float = 0.7,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    max_new_tokens: int = 256,
    capture_layers: tuple[int, ...] | list[int] = (),
) -> list[Generation]:
    """Generate one continuation per (prompt ids, seed). Prompts are left-padded into one batch."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _left_pad(prompts, pad_id, device)
    stops = stop_ids(model, tokenizer)

    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in capture_layers}
    hooks = []
    if capture_layers:
        fam = family_of(model)
        for layer in capture_layers:

            def hook(_mod, _inp, out, layer=layer):
                h = out[0] if isinstance(out, tuple) else out
                captured[layer].append(h[:, -1, :].float().cpu())

            hooks.append(fam.layer_output_module(layer).register_forward_hook(hook))

    processors = LogitsProcessorList()
    if temperature > 0:
        processors.append(RowSeededSampling(seeds, temperature, top_p))
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_new_tokens,
            logits_processor=processors,
            eos_token_id=stops,
            pad_token_id=pad_id,
            return_dict_in_generate=True,
        )
        gen = out.sequences[:, ids.shape[1] :].cpu()
        lengths, reasons = [], []
        for row in gen.tolist():
            k = next((j + 1 for j, t in enumerate(row) if t in stops), None)
            lengths.append(k if k is not None else len(row))
            reasons.append("stop" if k is not None else "length")
        if capture_layers and max(lengths) == gen.shape[1]:
            # The last sampled token was never fed back; one more step computes its hidden state.
            full_mask = torch.cat([mask, torch.ones_like(gen, device=device)], dim=1)
            position_ids = full_mask.long().cumsum(-1)[:, -1:] - 1
            model(
                input_ids=gen[:, -1:].to(device),
                attention_mask=full_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_kwarg(model): generated_cache(out)},
            )
    finally:
        for h in hooks:
            h.remove()

    results = []
    for i, (k, reason) in enumerate(zip(lengths, reasons, strict=True)):
        # Forward call j (0 = prefill) fed token j-1 of the response, so the k-th token's state is from call k.
        hidden = {layer: captured[layer][k][i].numpy() for layer in capture_layers}
        results.append(Generation(gen[i, :k].tolist(), reason, hidden))
    return results
