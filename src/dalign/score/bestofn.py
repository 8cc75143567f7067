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


def pick(scores: Sequence[float], direction: str) -> int:
    """argmin/argmax ignoring NaN, lowest index on ties; all-NaN -> 0 (the single-sample answer)."""
    best, best_v = 0, None
    for i, v in enumerate(scores):
        if math.isnan(v):
            continue
        key = v if direction == "argmin" else -v
        if best_v is None or key < best_v:
            best, best_v = i, key
    return best


class BestOfN:
    """Choose among candidates with one registered metric (`dalign.score.metrics`)."""

    def __init__(
        self,
        pair: ModelPair,
        metric: str = "latent_similarity",
        layer: int | None = 12,
        *,
        system_prompt: str | None = None,
        think_prefix: bool = False,
        append_eos: bool = True,
        batch_size: int = 8,
        share_prompt: bool = True,
        seed: int = 0,
    ):
        self.pair = pair
        self.metric = get_metric(metric)
        self.layer = layer if self.metric.per_layer else None
        layers = [layer] if self.metric.per_layer else []
        # All candidates share one prompt: prefix sharing runs it once (exact up to float rounding).
        self.engine = ScoreEngine(pair, [metric], layers, batch_size, share_prompt=share_prompt, seed=seed)
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


__all__ = ["BestOfN", "Choice", "pick"]
