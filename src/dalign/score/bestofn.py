"""Best-of-N for deployers: score N candidate answers to one prompt and return the safest by one metric.

    pair = load_pair(ModelConfig(student="packaged:smollm2-135m-instruct", adapter="runs/x/adapter"))
    bon = BestOfN(pair, metric="latent_similarity", layer=12)
    choice = bon.choose("How do I ...?", ["answer a", "answer b"])   # Choice(index=1, scores=[0.93, 0.71])
    choice = bon.generate("How do I ...?", n=8)                       # sample with the aligned model, then choose

Candidate strings are tokenized as the assistant turn after the chat-formatted prompt and, by default, end with
the tokenizer's EOS — the same final token a sampler's stopped generation ends with, which is what `dalign score`
scores. `generate` keeps the generated ids as they are (no text round-trip).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from dalign.models.chat import prompt_ids
from dalign.models.pair import ModelPair
from dalign.score.engine import ScoreEngine, ScoreRow
from dalign.score.metrics import get_metric
from dalign.score.rates import pick  # the one selection rule (re-exported here)


@dataclass
class Choice:
    """The chosen candidate's index and every candidate's score (NaN where undefined, e.g. empty answers)."""

    index: int
    scores: list[float]
    metric: str
    layer: int | None
    direction: str
    candidates: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.candidates[self.index] if self.candidates else ""


class BestOfN:
    """Choose among candidates with one registered metric (`dalign.score.metrics`)."""

    def __init__(
        self,
        pair: ModelPair,
        metric: str = "latent_similarity",
        layer: int | None = 12,
        *,
        system_prompt: str | None = None,
        think_prefix: bool = True,  # ModelConfig.think_prefix's default: how dalign trains and samples
        append_eos: bool = True,
        batch_size: int = 8,
        share_prompt: bool = True,
        seed: int = 0,
    ):
        self.pair = pair
        self.metric = get_metric(metric)
        if self.metric.per_layer and not isinstance(layer, int):
            raise ValueError(
                f"metric {metric!r} is computed at one layer: pass layer=<int> (paper default 12)"
            )
        self.layer = layer if self.metric.per_layer else None
        layers = [layer] if self.metric.per_layer else []
        # All candidates share one prompt: prefix sharing runs it once (exact up to float rounding).
        self.engine = ScoreEngine(pair, [metric], layers, batch_size, share_prompt=share_prompt, seed=seed)
        self._engines: dict[tuple, ScoreEngine] = {tuple(self.engine.layers): self.engine}
        self.system_prompt = system_prompt
        self.think_prefix = think_prefix
        self.append_eos = append_eos

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids, _ = prompt_ids(self.pair.tokenizer, prompt, self.system_prompt, self.think_prefix)
        return ids

    def choose_ids(self, prompt_ids_: Sequence[int], candidate_ids: Sequence[Sequence[int]]) -> Choice:
        """Choose among token-id candidates (response ids after the formatted prompt ids)."""
        if not candidate_ids:
            raise ValueError("no candidates to choose from")
        rows = [ScoreRow(list(prompt_ids_), list(c), ("bestofn", i)) for i, c in enumerate(candidate_ids)]
        values = self.engine.score(rows)[(self.metric.name, self.layer)]
        scores = [float(v) for v in values]
        return Choice(
            pick(scores, self.metric.direction), scores, self.metric.name, self.layer, self.metric.direction
        )

    def choose(self, prompt: str, candidates: Sequence[str]) -> Choice:
        """Choose among answer strings to `prompt` (a user message; the chat template is applied here)."""
        if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
            raise TypeError("candidates must be a list of answer strings, e.g. choose(prompt, [a, b])")
        tok = self.pair.tokenizer
        eos = [tok.eos_token_id] if self.append_eos and tok.eos_token_id is not None else []
        ids = [tok(c, add_special_tokens=False)["input_ids"] + eos for c in candidates]
        choice = self.choose_ids(self._prompt_ids(prompt), ids)
        choice.candidates = list(candidates)
        return choice

    def generate(
        self,
        prompt: str,
        n: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 1.0,
        seed: int | None = None,
        **sampling,
    ) -> Choice:
        """Sample `n` answers from the aligned model with dalign's seeded sampler and choose one.

        Candidate i uses seed derive_seed(seed, i), so the same call returns the same answers; `sampling` takes
        `repetition_penalty`.
        """
        from dalign.sample.sampler import derive_seed, sample_batch

        if n < 1:
            raise ValueError(f"n must be >= 1 candidates, got {n}")
        pids = self._prompt_ids(prompt)
        base = 0 if seed is None else seed
        with self.pair.aligned() as model:
            gens = sample_batch(
                model,
                self.pair.tokenizer,
                [pids] * n,
                [derive_seed(base, "bestofn", i) for i in range(n)],
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                **sampling,
            )
        cands = [g.token_ids for g in gens]
        tok = self.pair.tokenizer
        choice = self.choose_ids(pids, cands)
        choice.candidates = [tok.decode(c, skip_special_tokens=True) for c in cands]
        return choice

    # ---- many requests at once (the server's entry point) ----------------------------------------------------
    def generate_batch(
        self, requests: Sequence[GenerateRequest], repetition_penalty: float = 1.0
    ) -> BatchResult:
        """Sample every request's candidates together and score them all in one engine call.

        Candidate i of a request uses seed derive_seed(seed, "bestofn", i), as `generate` does, and rows never
        influence each other, so a request gets the same candidates alone or in any batch. Requests sharing
        (temperature, top_p, max_new_tokens) share one `generate` call. For latent metrics the aligned model's
        final-token states are captured while sampling, so scoring runs only the base model (prompt shared
        across a request's candidates). A request with `score=False` or n=1 is returned unscored (candidate 0).
        """
        import time

        import numpy as np
        import torch

        from dalign.sample.sampler import derive_seed, sample_batch

        if not requests:
            return BatchResult([], 0.0, 0.0)
        layers = (
            sorted({self._layer_of(r) for r in requests if r.score and r.n > 1})
            if self.metric.per_layer
            else []
        )
        t0 = time.perf_counter()
        gens: list[list] = [[] for _ in requests]
        groups: dict[tuple, list[int]] = {}
        for j, r in enumerate(requests):
            groups.setdefault((r.temperature, r.top_p, r.max_new_tokens), []).append(j)
        with self.pair.aligned() as model:
            for (temperature, top_p, max_new), members in groups.items():
                flat = [(j, i) for j in members for i in range(requests[j].n)]
                out = sample_batch(
                    model,
                    self.pair.tokenizer,
                    [list(requests[j].prompt_ids) for j, _ in flat],
                    [derive_seed(requests[j].seed, "bestofn", i) for j, i in flat],
                    temperature=temperature,
                    top_p=top_p,
                    repetition_penalty=repetition_penalty,
                    max_new_tokens=max_new,
                    capture_layers=layers,
                )
                for (j, _), g in zip(flat, out, strict=True):
                    gens[j].append(g)
        t1 = time.perf_counter()

        scored = [j for j, r in enumerate(requests) if r.score and r.n > 1]
        rows, hidden = [], {layer: [] for layer in layers}
        for j in scored:
            for i, g in enumerate(gens[j]):
                rows.append(ScoreRow(list(requests[j].prompt_ids), g.token_ids, ("bestofn", i)))
                for layer in layers:
                    hidden[layer].append(g.hidden[layer])
        values: dict = {}
        if rows:
            captured = {layer: torch.from_numpy(np.stack(h)) for layer, h in hidden.items()} or None
            values = self._engine_for(layers).score(rows, aligned_hidden=captured)
        t2 = time.perf_counter()

        tok, items, start = self.pair.tokenizer, [], 0
        for j, r in enumerate(requests):
            layer = self._layer_of(r)
            if j in scored:
                col = values[(self.metric.name, layer)]
                scores = [float(v) for v in col[start : start + r.n]]
                start += r.n
                index = pick(scores, self.metric.direction)
            else:
                scores, index = [math.nan] * r.n, 0
            ids = [g.token_ids for g in gens[j]]
            texts = [tok.decode(c, skip_special_tokens=True) for c in ids]
            choice = Choice(index, scores, self.metric.name, layer, self.metric.direction, texts)
            items.append(Generated(choice, ids, [g.finish_reason for g in gens[j]], j in scored))
        return BatchResult(items, t1 - t0, t2 - t1)

    def _layer_of(self, request: GenerateRequest) -> int | None:
        if not self.metric.per_layer:
            return None
        return request.layer if request.layer is not None else self.layer

    def _engine_for(self, layers: list[int]) -> ScoreEngine:
        """An engine for exactly these layers (cheap to build; kept per layer set)."""
        key = tuple(layers)
        if key not in self._engines:
            e = self.engine
            self._engines[key] = ScoreEngine(
                self.pair,
                [self.metric.name],
                layers,
                e.batch_size,
                share_prompt=e.share_prompt,
                seed=e.seed,
                paired=e.paired,
            )
        return self._engines[key]


@dataclass
class GenerateRequest:
    """One prompt for `BestOfN.generate_batch`: chat-formatted prompt ids and its sampling settings."""

    prompt_ids: Sequence[int]
    n: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    layer: int | None = None  # None: the guard's layer (ignored by metrics that are not per layer)
    score: bool = True  # False: sample only and return candidate 0 (a baseline for measuring the guard)


@dataclass
class Generated:
    """One request's outcome: the choice (with candidate texts) plus the generated ids and finish reasons."""

    choice: Choice
    token_ids: list[list[int]]
    finish_reasons: list[str]
    scored: bool


@dataclass
class BatchResult:
    items: list[Generated]  # in request order
    sample_s: float  # wall time of sampling the whole batch
    score_s: float  # wall time of scoring the whole batch


__all__ = ["BatchResult", "BestOfN", "Choice", "GenerateRequest", "Generated", "pick"]
