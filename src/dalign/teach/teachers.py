"""Teachers turn (prompt, teacher prompt) requests into deliberative traces.

- `corpus`          the shipped traces (the embedded default teacher; it answers only its own prompts)
- `hf:<id|dir>`     a local or hub model, batched generation with the teacher prompt as the user message
- `openai:<model>`  an OpenAI-compatible chat endpoint (vLLM, llama.cpp server, `transformers serve`, ...):
                    DALIGN_OPENAI_BASE_URL and DALIGN_OPENAI_API_KEY, through dalign.models.openai_client (the `openai`
                    SDK retries transient failures with backoff), then a clear error.

`Teacher.run(requests)` yields lists of finished trace rows, batch by batch, so the stage writes each batch
before asking for the next and a failure loses nothing already generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dalign.config import ModelConfig, TeachConfig
from dalign.models.openai_client import Endpoint, describe_error, make_client
from dalign.registry import Registry
from dalign.teach.parse import THINK_CLOSE, format_trace, parse_trace

TEACHERS: Registry[type[Teacher]] = Registry("teacher")


class TeacherError(RuntimeError):
    """A teacher could not produce traces (bad spec, unreachable endpoint, ...)."""


@dataclass(frozen=True)
class TeachRequest:
    prompt_id: str
    prompt: str
    category: str  # spec categories, comma-separated
    teacher_prompt: str


def trace_row(req: TeachRequest, raw: str, teacher: str, decision: str | None = None) -> dict:
    """One traces.parquet row; malformed traces keep their raw text and get no cot/answer."""
    parsed = parse_trace(raw)
    return {
        "prompt_id": req.prompt_id,
        "prompt": req.prompt,
        "category": req.category,
        "cot": parsed.cot if not parsed.malformed else None,
        "answer": parsed.answer if not parsed.malformed else None,
        "teacher": teacher,
        "raw": raw,
        "malformed": parsed.malformed,
        "decision": decision,
    }


class Teacher:
    name: str = "teacher"

    def __init__(self, spec: str, cfg: TeachConfig, model_cfg: ModelConfig | None = None):
        self.spec = spec
        self.cfg = cfg
        self.model_cfg = model_cfg or ModelConfig()

    def run(self, requests: list[TeachRequest]) -> Iterator[list[dict]]:
        raise NotImplementedError


def _batches(items: list, size: int) -> Iterator[list]:
    size = max(1, size)
    for i in range(0, len(items), size):
        yield items[i : i + size]


@TEACHERS.register("corpus")
class CorpusTeacher(Teacher):
    """Emits the shipped traces verbatim; requests must be corpus prompts (ids from `load_corpus`)."""

    name = "corpus"

    def run(self, requests: list[TeachRequest]) -> Iterator[list[dict]]:
        from dalign.teach.corpus import load_corpus

        corpus = load_corpus().set_index("id")
        unknown = [r.prompt_id for r in requests if r.prompt_id not in corpus.index]
        if unknown:
            raise TeacherError(
                f"the corpus teacher only answers its own prompts; unknown prompt ids {unknown[:5]}. "
                f"Use teach.teacher=hf:<model> or openai:<model> for other prompts."
            )
        for batch in _batches(requests, self.cfg.batch_size * 8):
            rows = []
            for r in batch:
                rec = corpus.loc[r.prompt_id]
                rows.append(trace_row(r, format_trace(rec["cot"], rec["answer"]), "corpus", rec["decision"]))
            yield rows


@TEACHERS.register("hf")
class HFTeacher(Teacher):
    """A causal LM generating with its own chat template; left-padded batches."""

    def __init__(self, spec: str, cfg: TeachConfig, model_cfg: ModelConfig | None = None):
        super().__init__(spec, cfg, model_cfg)
        self.name = spec
        self._model = None
        self._tok = None

    def _load(self):
        if self._model is None:
            from dalign.models import load_model

            mc = self.model_cfg
            self._model, self._tok = load_model(self.spec, mc.dtype, mc.device, mc.trust_remote_code)
        return self._model, self._tok

    def generate(self, texts: list[str]) -> list[str]:
        """Raw completions (special tokens kept, so <think> tags survive) for a batch of user messages."""
        import torch

        from dalign.models import prompt_ids

        model, tok = self._load()
        ids = [prompt_ids(tok, t, None, think_prefix=False)[0] for t in texts]
        width = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        sample = self.cfg.temperature > 0
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=sample,
                temperature=self.cfg.temperature if sample else None,
                top_p=1.0 if sample else None,
                top_k=None,
                pad_token_id=pad,
            )
        stops = _stop_ids(model, tok)
        texts_out = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts_out.append(tok.decode(row[:cut], skip_special_tokens=False))
        return texts_out

    def run(self, requests: list[TeachRequest]) -> Iterator[list[dict]]:
        for batch in _batches(requests, self.cfg.batch_size):
            raws = self.generate([r.teacher_prompt for r in batch])
            yield [trace_row(r, raw, self.name) for r, raw in zip(batch, raws, strict=True)]


def _stop_ids(model, tok) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids |= {tok.eos_token_id} if tok.eos_token_id is not None else set()
    return ids


@TEACHERS.register("openai")
class OpenAITeacher(Teacher):
    """Chat completions over HTTP; `reasoning_content` (vLLM's reasoning parser) is folded back into the trace."""

    def __init__(
        self,
        spec: str,
        cfg: TeachConfig,
        model_cfg: ModelConfig | None = None,
        endpoint: Endpoint | None = None,
    ):
        super().__init__(spec, cfg, model_cfg)
        self.model = spec.partition(":")[2]
        self.name = spec
        endpoint = endpoint or Endpoint()
        try:
            self.url = endpoint.resolved_url(f"teacher {spec}")
        except ValueError as e:
            raise TeacherError(str(e)) from None
        self.client = make_client(endpoint, f"teacher {spec}")

    def complete(self, text: str) -> str:
        """One raw trace; the SDK retries transient failures, then TeacherError says what failed."""
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": text}],
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_new_tokens,
            )
        except openai.OpenAIError as e:
            raise TeacherError(
                f"teacher {self.name}: {describe_error(e, self.url)}. Traces finished so far are kept and a rerun "
                "resumes."
            ) from e
        if not reply.choices:
            raise TeacherError(
                f"teacher {self.name}: {self.url} answered without choices: {str(reply)[:300]}"
            )
        return raw_trace(reply.choices[0].message)

    def run(self, requests: list[TeachRequest]) -> Iterator[list[dict]]:
        workers = max(1, self.cfg.batch_size)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for batch in _batches(requests, workers):
                futures = [pool.submit(self.complete, r.teacher_prompt) for r in batch]
                rows, error = [], None
                for r, fut in zip(batch, futures, strict=True):
                    try:
                        rows.append(trace_row(r, fut.result(), self.name))
                    except TeacherError as e:
                        error = e
                yield rows  # keep what finished before reporting the failure
                if error is not None:
                    raise error


def raw_trace(message) -> str:
    """The trace text of a chat reply; a server-side reasoning field (vLLM `reasoning_content`) becomes <think>."""
    content = message.content or ""
    extra = message.model_extra or {}
    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
    if reasoning and THINK_CLOSE not in content:
        return format_trace(reasoning, content) if content.strip() else f"<think>\n{reasoning}"
    return content


def get_teacher(spec: str, cfg: TeachConfig, model_cfg: ModelConfig | None = None) -> Teacher:
    """`corpus`, `hf:<id|dir>` or `openai:<model>` -> a Teacher."""
    kind = spec.partition(":")[0] if ":" in spec else spec
    if kind == "openai" and not spec.partition(":")[2]:
        raise TeacherError("teacher 'openai:' needs a model name, e.g. openai:deepseek-r1-distill-qwen-7b")
    return TEACHERS.get(kind)(spec, cfg, model_cfg)
