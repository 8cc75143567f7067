"""Batched N-candidate sampling where every sequence has its own seed.

`model.generate(do_sample=True)` draws all rows from one global RNG, so a candidate's text depends on which other
rows shared its batch. We instead sample each row by inverse CDF with one uniform number from that row's own
`torch.Generator`. Each row's draw depends only on its own seed and step: a rerun, a different batch size or a
different bucketing gives the same text. (One uniform per row and step, not one per vocabulary entry as
Gumbel-max would need, keeps the cost at that of plain sampling.)

The decode loop is our own rather than `generate`'s, for speed on CPU: the KV cache is reserved once and written
in place (`kvcache.py`), rows with the same prompt (a prompt's N candidates) run its prefill once and copy its KV
cache out, the prompt's logits are computed at its last position only, and a row that produced its
stop token stops drawing at once; finished rows leave the batch and the KV cache together once a quarter of the
batch has finished (`COMPACT_AT`), so they cost little while the others run on. With capture a row finishes one
step later, after its last token was fed. Per step it does what greedy `generate` does: repetition penalty (HF's
rule), the model's `suppress_tokens`, then the draw. Batch rows never mix, so none of this changes a row's text.

Optionally the aligned model's hidden state of the final token is captured while generating (forward hooks), so
latent-similarity scoring later needs only the base model's pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dalign.models.family import cache_kwarg, family_of, generated_cache
from dalign.sample.kvcache import reserved_cache

# Finished rows stay in the batch (fed padding, outputs ignored) until at most this share of it is still
# generating; then the batch and its KV cache are compacted. Compacting copies the cache, so doing it at every
# finished row would cost more than the few dead rows' compute.
COMPACT_AT = 0.75


def derive_seed(base: int, *parts: object) -> int:
    """A 63-bit seed for one (benchmark, prompt, candidate), stable across runs and machines."""
    blob = "\x1f".join(str(p) for p in (base, *parts)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


class RowSeededSampling:
    """Temperature, top-p, then an exact per-row draw from each row's own generator."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def draw(self, scores: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """One token per row of `scores` [B, V]; `rows[b]` names the generator (original batch row) of row b."""
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = (cum - sorted_scores.softmax(-1)) >= self.top_p  # keep the token that crosses top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        cdf = scores.softmax(-1).cumsum(-1)
        u = torch.cat([torch.rand(1, generator=self.generators[r]) for r in rows]).to(scores.device)
        # side="right": the first index whose cdf exceeds u*total, so the chosen token has probability > 0.
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
        return token.clamp_max(cdf.shape[-1] - 1).squeeze(1)


def repetition_penalty_(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule on every id in `seen` (prompt, padding and generated ids): negative logits times the penalty,
    positive ones divided by it."""
    picked = scores.gather(1, seen)
    return scores.scatter_(1, seen, torch.where(picked < 0, picked * penalty, picked / penalty))


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
    max_new_tokens: int | Sequence[int] = 256,
    capture_layers: tuple[int, ...] | list[int] = (),
    share_prompt: bool = True,
) -> list[Generation]:
    """Generate one continuation per (prompt ids, seed). Prompts are left-padded into one batch.

    `share_prompt`: rows with identical prompt ids run the prompt once and get copies of its KV cache and last
    logits (the same values up to float rounding; N times less prefill for N candidates of a prompt).

    `max_new_tokens` may differ per row: a row leaves the batch at its own budget, and since every row draws
    from its own seeded stream, its tokens are the first `budget` of what a larger budget would give."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or min(budgets, default=1) < 1:
        raise ValueError(f"max_new_tokens must be >= 1 per prompt, got {max_new_tokens}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _left_pad(prompts, pad_id, device)
    stops = torch.tensor(stop_ids(model, tokenizer), device=device)
    suppress = list(getattr(model.generation_config, "suppress_tokens", None) or [])
    sampler = RowSeededSampling(seeds, temperature, top_p) if temperature > 0 else None

    last: dict[int, torch.Tensor] = {}  # layer -> [B, H] state of the token fed by the latest call
    hooks = []
    if capture_layers:
        fam = family_of(model)
        for layer in capture_layers:

            def hook(_mod, _inp, out, layer=layer):
                h = out[0] if isinstance(out, tuple) else out
                last[layer] = h[:, -1, :].float().cpu()

            hooks.append(fam.layer_output_module(layer).register_forward_hook(hook))

    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    reasons = ["length"] * n
    hidden: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
    rows = list(range(n))  # original index of each batch row
    alive = torch.ones(n, dtype=torch.bool, device=device)  # batch rows still generating
    budget = torch.tensor(budgets, device=device)  # of the batch rows
    seen = ids  # every id each batch row has so far (the repetition penalty reads them)
    ckw = cache_kwarg(model)
    cache = reserved_cache(model, family_of(model).num_layers, ids.shape[1] + max(budgets) + 1)
    slot: dict[tuple, int] = {}
    group = [slot.setdefault(tuple(p), len(slot)) for p in prompts]  # each row's distinct prompt
    shared = share_prompt and len(slot) < n
    # the rows that run the prefill: each distinct prompt's first row
    lead = [group.index(j) for j in range(len(slot))] if shared else list(range(n))
    try:
        out = model(
            input_ids=ids[lead],
            attention_mask=mask[lead],
            position_ids=_positions(mask[lead]),
            use_cache=True,
            # The last position's logits only: all of them are [batch, length, vocab] (GBs for long prompts). As an
            # index tensor, not the int 1: the int slices a strided view, which bf16 CPU matmul copies the head for.
            logits_to_keep=torch.tensor([ids.shape[1] - 1], device=device),
            **({ckw: cache} if cache is not None else {}),
        )
        cache, logits = generated_cache(out), out.logits[:, -1]
        if shared:  # one cache row and logits row per candidate, copied from its prompt's
            prompt_of = torch.tensor(group, device=device)
            cache.batch_select_indices(prompt_of)
            logits = logits[prompt_of]
        for step in range(max(budgets, default=0)):
            live = alive.nonzero().flatten()
            partial = len(live) < len(rows)
            scores = logits[live].float() if partial else logits.float()
            if repetition_penalty != 1.0:
                scores = repetition_penalty_(scores, seen[live] if partial else seen, repetition_penalty)
            if suppress:
                scores[:, suppress] = float("-inf")
            live_rows = [rows[b] for b in live.tolist()]
            drawn = sampler.draw(scores, live_rows) if sampler else scores.argmax(-1)
            stopped = torch.isin(drawn, stops)
            for r, t, s in zip(live_rows, drawn.tolist(), stopped.tolist(), strict=True):
                tokens[r].append(t)
                if s:
                    reasons[r] = "stop"
            ended = live[stopped | (step + 1 >= budget[live])]
            tok = drawn if not partial else torch.full_like(budget, pad_id).index_put_((live,), drawn)
            if capture_layers:  # feed the token first: its state is the row's final-token state
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                out = _step(model, tok, mask, cache, ckw)
                for b in ended.tolist():
                    hidden[rows[b]] = {layer: last[layer][b].numpy() for layer in capture_layers}
            alive[ended] = False
            if not alive.any():
                break
            logits = out.logits[:, -1] if capture_layers else None
            if alive.sum() <= COMPACT_AT * len(rows):  # finished rows leave the batch and their KV cache
                keep = alive.nonzero().flatten()
                rows = [rows[b] for b in keep.tolist()]
                cache.batch_select_indices(keep)
                mask, tok, budget, seen, alive = mask[keep], tok[keep], budget[keep], seen[keep], alive[keep]
                logits = logits[keep] if logits is not None else None
            seen = torch.cat([seen, tok[:, None]], dim=1)
            if not capture_layers:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                logits = _step(model, tok, mask, cache, ckw).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()
    return [Generation(tokens[i], reasons[i], hidden[i]) for i in range(n)]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _step(model, tok: torch.Tensor, mask: torch.Tensor, cache, ckw: str):
    """Feed one token per row on the KV cache; `mask` already covers it."""
    pos = mask.long().sum(-1, keepdim=True) - 1
    return model(
        input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{ckw: cache}
    )
