"""Attacker and LLM-judge models behind one interface: a local HF model or an OpenAI-compatible endpoint.

    chat = load_chat("packaged:smollm2-135m-instruct", model_cfg)      # or "hf:<dir>", "openai:<model>"
    chat.complete([messages, ...], seeds, temperature=1.0, top_p=0.9, max_new_tokens=500, prefill="{...")

Local models sample with dalign's per-row seeded sampler, so a reply depends only on its own seed (resumed runs
repeat it exactly) and can be given a `prefill`: the start of the assistant's turn, which the reply continues
(returned with the prefill in front). Endpoints get the chat messages as they are (no prefill: chat APIs do not
continue a half-written turn) and the seed as the request's `seed`.
"""

from __future__ import annotations

from collections.abc import Sequence

from dalign.config import ModelConfig
from dalign.models.chat import render_messages
from dalign.models.openai_client import Endpoint, describe_error, make_client

Messages = list[dict]


class LocalChat:
    def __init__(self, spec: str, model_cfg: ModelConfig):
        from dalign.models.loading import load_model

        self.name = spec
        self.model, self.tokenizer = load_model(
            spec, model_cfg.dtype, model_cfg.device, model_cfg.trust_remote_code
        )

    def complete(
        self,
        conversations: Sequence[Messages],
        seeds: Sequence[int],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        prefill: str | Sequence[str] = "",
    ) -> list[str]:
        from dalign.sample.sampler import sample_batch

        tok = self.tokenizer
        prefills = [prefill] * len(conversations) if isinstance(prefill, str) else list(prefill)
        texts = [render_messages(tok, list(c)) + p for c, p in zip(conversations, prefills, strict=True)]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        gens = sample_batch(
            self.model,
            tok,
            ids,
            list(seeds),
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
        )
        return [
            p + tok.decode(g.token_ids, skip_special_tokens=True) for p, g in zip(prefills, gens, strict=True)
        ]


class EndpointChat:
    def __init__(self, model: str, base_url: str | None, what: str):
        self.name = f"openai:{model}"
        self.model = model
        self.endpoint = Endpoint(base_url=base_url)
        self.url = self.endpoint.resolved_url(what)
        self.client = make_client(self.endpoint, what)

    def complete(
        self,
        conversations: Sequence[Messages],
        seeds: Sequence[int],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        prefill: str | Sequence[str] = "",
    ) -> list[str]:
        out = []
        for messages, seed in zip(conversations, seeds, strict=True):
            try:
                r = self.client.chat.completions.create(
                    model=self.model,
                    messages=list(messages),
                    temperature=temperature,
                    top_p=top_p,
                    max_tokens=max_new_tokens,
                    seed=seed % 2**31,  # some servers take a 32-bit seed only
                )
            except Exception as e:  # the SDK has retried already; stop with a message, not a traceback
                raise RuntimeError(f"{self.name}: {describe_error(e, self.url)}") from e
            out.append((r.choices[0].message.content or "") if r.choices else "")
        return out


def load_chat(spec: str, model_cfg: ModelConfig, base_url: str | None = None, what: str = "the model"):
    """A chat model for a spec: openai:<model> (an endpoint), else any local spec `load_model` takes."""
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        if not rest:
            raise ValueError(f"{what}: {spec!r} names no model; write openai:<model name on the server>")
        return EndpointChat(rest, base_url, what)
    return LocalChat(spec, model_cfg)
