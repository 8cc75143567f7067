"""The three targets of Table 4, all from one loaded aligned/base pair (one copy of the weights).

- base: the student with its adapter disabled (the model before deliberative alignment);
- aligned: the student with its adapter, one sampled reply;
- guarded: the aligned student behind the Best-of-N guard (`BestOfN.generate_batch`): `guard_n` candidates, the
  least base-like is the reply.

All three sample with seed `derive_seed(seed, "bestofn", 0)` for their (first) candidate, so at the same prompt
and seed the aligned reply *is* the guard's candidate 0: the comparison is single sample vs selected, as in Table 1.
The base model gets no `<think>` prefix (it was never trained with one); the aligned targets get the run's
`model.think_prefix`. Prompts longer than the context are cut from the left (`prompt_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dalign.config import RunConfig
from dalign.models.chat import prompt_ids
from dalign.models.pair import ModelPair, context_limit
from dalign.sample.sampler import derive_seed, sample_batch
from dalign.score.bestofn import BestOfN, GenerateRequest

TARGETS = ("base", "aligned", "guarded")


@dataclass(frozen=True)
class Reply:
    text: str
    chosen: int | None = None  # the guard's chosen candidate (guarded only)


class Targets:
    def __init__(self, pair: ModelPair, cfg: RunConfig):
        a = cfg.attack
        self.pair, self.cfg, self.a = pair, cfg, a
        # aligned replies are the guard's requests with n=1 and no scoring: one sampling path for both.
        if {"aligned", "guarded"} & set(a.targets):
            self.guard = BestOfN(
                pair,
                a.guard_metric,
                a.guard_layer,
                system_prompt=cfg.model.system_prompt,
                think_prefix=cfg.model.think_prefix,
            )
        limit = context_limit(cfg.model)
        self.max_prompt = None if limit is None else limit - a.target_max_new_tokens

    def _ids(self, prompt: str, think: bool) -> list[int]:
        ids, _ = prompt_ids(self.pair.tokenizer, prompt, self.cfg.model.system_prompt, think, self.max_prompt)
        return ids

    def reply(self, target: str, prompts: list[str], seeds: list[int]) -> list[Reply]:
        a, tok = self.a, self.pair.tokenizer
        if target == "base":
            with self.pair.base() as model:
                gens = sample_batch(
                    model,
                    tok,
                    [self._ids(p, False) for p in prompts],
                    [derive_seed(s, "bestofn", 0) for s in seeds],
                    temperature=a.target_temperature,
                    top_p=self.cfg.sample.top_p,
                    repetition_penalty=self.cfg.sample.repetition_penalty,
                    max_new_tokens=a.target_max_new_tokens,
                )
            return [Reply(tok.decode(g.token_ids, skip_special_tokens=True)) for g in gens]
        if target not in ("aligned", "guarded"):
            raise ValueError(f"unknown target {target!r}; targets are {', '.join(TARGETS)}")
        guarded = target == "guarded"
        think = self.cfg.model.think_prefix
        requests = [
            GenerateRequest(
                self._ids(p, think),
                n=a.guard_n if guarded else 1,
                max_new_tokens=a.target_max_new_tokens,
                temperature=a.target_temperature,
                top_p=self.cfg.sample.top_p,
                seed=s,
                score=guarded,
            )
            for p, s in zip(prompts, seeds, strict=True)
        ]
        result = self.guard.generate_batch(requests, repetition_penalty=self.cfg.sample.repetition_penalty)
        return [Reply(g.choice.text, g.choice.index if guarded else None) for g in result.items]
