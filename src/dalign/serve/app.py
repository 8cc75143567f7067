"""The FastAPI app: a thin HTTP layer over `BestOfN.generate_batch`, through the dynamic batcher.

Per request: authenticate, read at most `max_body_bytes`, parse and check (protocol.py), format the conversation
with the tokenizer's chat template, check the limits, queue, wait (watching for a client disconnect), and answer
with the chosen candidate as choices[0] plus a `bon` object. Every refusal is an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dalign.config import ServeConfig
from dalign.models.chat import render_messages
from dalign.score.bestofn import BatchResult, BestOfN, Generated, GenerateRequest, pick
from dalign.serve.batcher import Batcher, Job, QueueFull, ShuttingDown
from dalign.serve.metrics import Metrics
from dalign.serve.protocol import ChatRequest, ServeError, completion, parse_body, sse_events

DISCONNECT_POLL_S = 0.1
log = logging.getLogger("dalign.serve")


def authorized(header: str | None, keys: Sequence[str]) -> bool:
    """`Authorization: Bearer <key>` against every key in constant time (no early exit on a match either)."""
    scheme, _, token = (header or "").partition(" ")
    given = token.strip().encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return scheme.lower() == "bearer" and ok


def rank(scores: Sequence[float], direction: str) -> list[int]:
    """Candidates best first: `pick` applied to what is left (so rank[0] is always the guard's choice)."""
    left, order = list(range(len(scores))), []
    while left:
        order.append(left.pop(pick([scores[i] for i in left], direction)))
    return order


class Guard:
    """The model side the app needs: formatting, request limits, and the batched call."""

    def __init__(self, bon: BestOfN, cfg: ServeConfig, context: int | None):
        self.bon, self.cfg, self.context = bon, cfg, context
        self.num_layers = bon.pair.family.num_layers

    def plan(self, req: ChatRequest, messages: list[dict]) -> tuple[GenerateRequest, int]:
        """The request as a GenerateRequest after every limit check; also returns the prompt's token count."""
        cfg, bon = self.cfg, self.bon
        if req.model is not None and req.model != cfg.model_name:
            raise ServeError(
                404,
                f"model {req.model!r} is not served here; this server serves {cfg.model_name!r}",
                "model_not_found",
                "model",
            )
        if len(messages) > cfg.max_messages:
            raise ServeError(
                400,
                f"{len(messages)} messages; at most {cfg.max_messages} per request",
                "too_many_messages",
                "messages",
            )
        given = [v for v in (req.max_completion_tokens, req.max_tokens) if v is not None]
        max_tokens = given[0] if given else cfg.max_tokens
        if not 1 <= max_tokens <= cfg.max_tokens_limit:
            raise ServeError(
                400,
                f"max_tokens must be in 1..{cfg.max_tokens_limit}, got {max_tokens}",
                "invalid_parameter",
                "max_tokens",
            )
        n = req.bon.n if req.bon.n is not None else cfg.n
        if not 1 <= n <= cfg.max_candidates:
            raise ServeError(
                400, f"bon.n must be in 1..{cfg.max_candidates}, got {n}", "invalid_parameter", "bon.n"
            )
        if not 1 <= req.n <= n:
            raise ServeError(
                400,
                f"n (returned choices) must be in 1..{n} (the candidates), got {req.n}",
                "invalid_parameter",
                "n",
            )
        temperature = cfg.temperature if req.temperature is None else req.temperature
        if not 0 <= temperature <= 2:
            raise ServeError(
                400, f"temperature must be in [0, 2], got {temperature}", "invalid_parameter", "temperature"
            )
        top_p = cfg.top_p if req.top_p is None else req.top_p
        if not 0 < top_p <= 1:
            raise ServeError(400, f"top_p must be in (0, 1], got {top_p}", "invalid_parameter", "top_p")
        layer = req.bon.layer
        if layer is not None:
            if not bon.metric.per_layer:
                raise ServeError(
                    400,
                    f"metric {bon.metric.name} has no layers; leave bon.layer out",
                    "invalid_parameter",
                    "bon.layer",
                )
            if not 1 <= layer <= self.num_layers:
                raise ServeError(
                    400,
                    f"bon.layer must be in 1..{self.num_layers}, got {layer}",
                    "invalid_parameter",
                    "bon.layer",
                )
        if bon.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": bon.system_prompt}, *messages]
        tok = bon.pair.tokenizer
        try:
            text = render_messages(tok, messages, bon.think_prefix)
        except Exception as e:  # the template's own rule, e.g. roles must alternate
            raise ServeError(
                400, f"the model's chat template refused these messages: {e}", "invalid_parameter", "messages"
            ) from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise ServeError(
                400,
                f"the conversation is {len(ids)} tokens and max_tokens {max_tokens}, but the "
                f"model's context is {self.context}; shorten the messages or lower max_tokens",
                "context_length_exceeded",
                "messages",
            )
        cost = n * (len(ids) + max_tokens)
        if cost > cfg.max_request_tokens:
            raise ServeError(
                400,
                f"{n} candidates x ({len(ids)} prompt + {max_tokens} new) tokens = {cost} exceeds "
                f"this server's per-request budget of {cfg.max_request_tokens}; lower bon.n, "
                f"max_tokens or the conversation",
                "request_too_large",
                "messages",
            )
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return GenerateRequest(ids, n, max_tokens, temperature, top_p, seed, layer, req.bon.score), len(ids)

    def answer(
        self,
        req: ChatRequest,
        gen: GenerateRequest,
        prompt_tokens: int,
        item: Generated,
        job: Job,
        arrived: float,
    ) -> dict:
        choice = item.choice
        order = rank(choice.scores, choice.direction) if item.scored else list(range(gen.n))
        returned = order[: req.n]
        lengths = [len(t) for t in item.token_ids]
        scores = [None if s != s else s for s in choice.scores]  # NaN -> null (JSON has no NaN)
        queue_s = (job.started or arrived) - job.enqueued
        bon = {
            "metric": choice.metric,
            "direction": choice.direction,
            "layer": choice.layer,
            "n": gen.n,
            "chosen": choice.index,
            "scored": item.scored,
            "scores": scores,
            "returned": returned,
            "seed": gen.seed,
            "generated_tokens": sum(lengths),
            "batch": {"requests": job.batch[0], "candidates": job.batch[1]},
            "timings_ms": {
                "queue": 1000 * queue_s,
                "sample": 1000 * job.sample_s,
                "score": 1000 * job.score_s,
                "total": 1000 * (time.perf_counter() - arrived),
            },
        }
        if req.bon.return_candidates:
            bon["candidates"] = [
                {
                    "index": i,
                    "text": choice.candidates[i],
                    "score": scores[i],
                    "finish_reason": item.finish_reasons[i],
                    "token_ids": item.token_ids[i],
                }
                for i in range(gen.n)
            ]
        completion_tokens = sum(lengths[i] for i in returned)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        texts = [{"text": choice.candidates[i], "finish_reason": item.finish_reasons[i]} for i in returned]
        return completion(f"chatcmpl-{secrets.token_hex(12)}", self.cfg.model_name, texts, usage, bon)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body is {declared} bytes; the limit is {limit}", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    guard: Guard,
    keys: Sequence[str] = (),
    run_batch: Callable[[Sequence[GenerateRequest]], BatchResult] | None = None,
) -> FastAPI:
    """The app; `run_batch` defaults to the guard's `BestOfN.generate_batch` (tests may wrap it to hold a batch)."""
    cfg = guard.cfg
    metrics = Metrics()
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(
            run_batch or guard.bon.generate_batch,
            cfg.max_batch,
            cfg.max_wait_ms / 1000,
            cfg.max_queue,
            metrics,
        )
        yield
        # Uvicorn has stopped accepting and let open requests finish; finish anything still queued, then stop.
        await asyncio.to_thread(app.state.batcher.close, cfg.shutdown_timeout_s)

    app = FastAPI(title="dalign serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics

    def fail(e: ServeError) -> JSONResponse:
        metrics.inc("dalign_serve_errors_total", code=e.code)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return fail(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return fail(
            ServeError(e.status_code, msg, "not_found" if e.status_code == 404 else "invalid_request")
        )

    def check_key(request: Request) -> None:
        if keys and not authorized(request.headers.get("authorization"), keys):
            raise ServeError(
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": app.state.batcher.depth}

    @app.get("/metrics")
    async def prometheus(request: Request):
        check_key(request)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        bon = guard.bon
        card = {
            "id": cfg.model_name,
            "object": "model",
            "created": started,
            "owned_by": "dalign",
            "bon": {"metric": bon.metric.name, "layer": bon.layer, "n": cfg.n},
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            response = await _chat(request, arrived)
        except ServeError as e:
            response = fail(e)
        except Exception as e:  # a bug, not the client's fault: say so, log it, keep serving
            log.exception("chat completion failed")
            response = fail(ServeError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
        metrics.inc("dalign_serve_requests_total", status=str(response.status_code))
        metrics.observe("dalign_serve_request_seconds", time.perf_counter() - arrived)
        return response

    async def _chat(request: Request, arrived: float) -> Response:
        check_key(request)
        req, messages = parse_body(await _read_body(request, cfg.max_body_bytes))
        gen, prompt_tokens = guard.plan(req, messages)
        batcher: Batcher = app.state.batcher
        try:
            job = batcher.submit(gen)
        except QueueFull as e:
            raise ServeError(
                429,
                f"the server is busy ({cfg.max_queue} requests queued); retry later",
                "queue_full",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None
        except ShuttingDown:
            raise ServeError(503, "the server is shutting down", "shutting_down") from None
        while not job.future.done():
            await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_S)
            if not job.future.done() and await request.is_disconnected():
                batcher.cancel(job)
                metrics.inc("dalign_serve_disconnects_total")
                return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        try:
            item = job.future.result()
        except Exception as e:
            raise ServeError(500, f"generation failed: {type(e).__name__}: {e}", "server_error") from None
        body = guard.answer(req, gen, prompt_tokens, item, job, arrived)
        metrics.inc("dalign_serve_candidates_total", gen.n)
        metrics.inc("dalign_serve_generated_tokens_total", body["bon"]["generated_tokens"])
        for stage in ("queue", "sample", "score"):
            metrics.observe(
                "dalign_serve_stage_seconds", body["bon"]["timings_ms"][stage] / 1000, stage=stage
            )
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(iter(sse_events(body, include_usage)), media_type="text/event-stream")
        return JSONResponse(body)

    return app


__all__ = ["Guard", "authorized", "create_app", "rank"]
