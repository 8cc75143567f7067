"""`sample.backend: openai`: candidates from an OpenAI-compatible server (vLLM, SGLang, llama.cpp, transformers serve).

- One `/v1/completions` request per candidate, with that candidate's own `seed` (the same derived seed the HF backend
  uses), so a rerun asks only for missing candidates and gets the same text where the server honours seeds. `n` is
  not used: vLLM and SGLang derive the N sub-seeds of an `n` request from one seed, so a resumed candidate would
  differ; `transformers serve` and llama.cpp ignore `n` anyway.
- The prompt is dalign's own chat formatting (same system prompt and `<think>` prefix as the HF backend), sent as
  text, or as token ids with `prompt_token_ids` (vLLM, SGLang), so the server cannot tokenise it differently.
- Generated token ids come from the server with `server_token_ids` (vLLM/SGLang: `logprobs` +
  `return_tokens_as_token_ids`, tokens arrive as "token_id:N"), else by re-tokenising the returned text plus the
  stop token; `token_ids_source` says which (`server` is exact, `retokenized` may differ from what was generated).
- Scoring stays exact either way: `dalign score` runs the HF adapter pair on these ids.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from dalign.models.openai_client import Endpoint, describe_error, make_client
from dalign.models.pair import pair_tokenizer
from dalign.rundir import ARTIFACT_KEYS, RunDir, adapter_dir
from dalign.sample.stage import sample_row

# Server finish reasons -> dalign's (stop: a stop token or string ended it; length: the budget did).
FINISH = {"stop": "stop", "eos": "stop", "length": "length"}
TOKEN_ID_PREFIX = "token_id:"


class ServerTokenIdsError(ValueError):
    pass


def server_token_ids(tokens: list[str] | None) -> list[int]:
    """Ids from vLLM/SGLang logprobs tokens in the `token_id:N` form (return_tokens_as_token_ids)."""
    if not tokens or not all(t.startswith(TOKEN_ID_PREFIX) for t in tokens):
        sample = (tokens or [None])[0]
        raise ServerTokenIdsError(
            f"sample.openai.server_token_ids is on, but the server's logprobs tokens are not 'token_id:N' "
            f"(first: {sample!r}); it does not offer token ids: set sample.openai.server_token_ids=false"
        )
    return [int(t[len(TOKEN_ID_PREFIX) :]) for t in tokens]


class OpenAISampleWorker:
    """Sends one chunk of work items as concurrent requests; commits the answered ones as one shard."""

    artifact = "samples"
    keys = tuple(ARTIFACT_KEYS[artifact])

    def __init__(self, run: RunDir):
        self.cfg = run.config.sample
        self.think_prefix = run.config.model.think_prefix
        oc = self.cfg.openai
        if not oc.model:
            raise ValueError(
                "sample.backend=openai needs sample.openai.model: the name the server serves "
                "(vLLM with --lora-modules aligned=<adapter>: aligned)"
            )
        self._connect(run, oc.base_url, "sample.backend=openai")
        self.tok = pair_tokenizer(run.config.model, adapter_dir(run))
        self.warned = False

    def _connect(self, run: RunDir, base_url: str | None, what: str) -> None:
        """Client, request pool and output store, with sample.openai's key, timeout, retries and concurrency."""
        oc = self.cfg.openai
        endpoint = Endpoint(base_url, oc.api_key_env, oc.timeout_s, oc.max_retries)
        self.url = endpoint.resolved_url(what)
        self.client = make_client(endpoint, what)
        self.store = run.store(self.artifact)
        self.pool = ThreadPoolExecutor(oc.max_concurrency)

    def _request(self, item) -> dict:
        sc, oc = self.cfg, self.cfg.openai
        ids = [int(t) for t in item.prompt_token_ids]
        extra = dict(oc.extra_body)
        if sc.repetition_penalty != 1.0:
            extra["repetition_penalty"] = sc.repetition_penalty  # vLLM/SGLang sampling extension
        kwargs = {}
        if oc.server_token_ids:
            kwargs["logprobs"] = 1
            extra["return_tokens_as_token_ids"] = True
        resp = self.client.completions.create(
            model=oc.model,
            prompt=ids if oc.prompt_token_ids else self.tok.decode(ids, skip_special_tokens=False),
            max_tokens=int(item.max_new_tokens),
            temperature=sc.temperature,
            top_p=sc.top_p,
            seed=int(item.seed),
            extra_body=extra or None,
            **kwargs,
        )
        choice = resp.choices[0]
        finish = FINISH.get(choice.finish_reason or "", choice.finish_reason or "unknown")
        if oc.server_token_ids:
            token_ids, source = server_token_ids(getattr(choice.logprobs, "tokens", None)), "server"
        else:
            # The text lacks the stop token (decoded without special tokens): put it back, as HF sampling keeps it.
            token_ids = self.tok.encode(choice.text, add_special_tokens=False)
            token_ids += [self.tok.eos_token_id] if finish == "stop" else []
            source = "retokenized"
        usage = getattr(resp, "usage", None)
        if usage is not None and usage.prompt_tokens != len(ids) and not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.url} counted {usage.prompt_tokens} prompt tokens where dalign sent {len(ids)}: the server "
                "re-tokenised the prompt differently (e.g. an added BOS); scores use dalign's ids. With vLLM or "
                "SGLang set sample.openai.prompt_token_ids=true",
                stacklevel=2,
            )
        return sample_row(
            item, token_ids, finish, choice.text, think_prefix=self.think_prefix, token_ids_source=source
        )

    def __call__(self, chunk: pd.DataFrame) -> dict:
        futures = [self.pool.submit(self._request, item) for item in chunk.itertuples(index=False)]
        rows, failure = [], None
        for fut in futures:
            try:
                rows.append(fut.result())
            except ServerTokenIdsError:
                raise
            except Exception as e:  # keep the answered candidates, then say what failed
                failure = failure or e
        written = self.store.write(rows)
        if failure is not None:
            raise RuntimeError(
                f"{describe_error(failure, self.url)} ({len(chunk) - len(rows)} of {len(chunk)} candidates in "
                f"this batch failed; {written} answered ones are kept and a rerun asks only for the rest)"
            ) from failure
        return {"rows": written, "tokens": sum(r["n_tokens"] or 0 for r in rows)}


class OpenAITeacherSampleWorker(OpenAISampleWorker):
    """The teacher behind an OpenAI-compatible chat endpoint (teach.teacher = openai:<model>, at the teach stage's
    DALIGN_OPENAI_BASE_URL): one chat request per candidate with its own seed, so the server applies the teacher's
    own chat template, as local teachers get theirs. No teacher tokenizer is local, so no token ids are recorded
    (`token_ids_source` none) and `n_tokens` is the server's completion token count: the teacher is judged and
    its lengths compared, never scored."""

    artifact = "samples-teacher"
    keys = tuple(ARTIFACT_KEYS[artifact])

    def __init__(self, run: RunDir):
        self.cfg = run.config.sample
        self.spec = run.config.teach.teacher
        self.model = self.spec.partition(":")[2]
        self._connect(run, None, f"sampling the teacher {self.spec}")  # the teach stage's server

    def _request(self, item) -> dict:
        from dalign.teach.teachers import raw_trace

        sc = self.cfg
        resp = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": item.prompt}],
            max_tokens=int(item.max_new_tokens),
            temperature=sc.temperature,
            top_p=sc.top_p,
            seed=int(item.seed),
            extra_body=dict(sc.openai.extra_body) or None,
        )
        if not resp.choices:
            raise ValueError(f"{self.url} answered without choices: {str(resp)[:300]}")
        choice = resp.choices[0]
        finish = FINISH.get(choice.finish_reason or "", choice.finish_reason or "unknown")
        # a server-side reasoning field (vLLM's reasoning parser) is folded back in, as the teach stage does
        row = sample_row(
            item, [], finish, raw_trace(choice.message), think_prefix=False, token_ids_source="none"
        )
        usage = getattr(resp, "usage", None)
        row["n_tokens"] = (
            int(usage.completion_tokens) if usage and usage.completion_tokens is not None else None
        )
        row["model"] = "teacher"
        return row


__all__ = ["OpenAISampleWorker", "OpenAITeacherSampleWorker", "server_token_ids"]
