"""The OpenAI chat-completions wire format: parsing a request body, building responses, errors.

Parsing never trusts the body: bytes must be UTF-8 JSON, every field has a type (strict: no "5" for 5), roles are
a closed set, and fields dalign cannot honour (tools, logprobs, stop sequences, ...) are refused rather than ignored.
The `model` field is only compared with the served name: nothing in a request is ever loaded or opened.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Accepted only at these "off" values; anything else would be silently wrong, so it is a 400.
UNSUPPORTED = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "stop": (None, [], ""),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "prediction": (None,),
}


class ServeError(Exception):
    """An answer other than 200, in OpenAI's error shape: {"error": {message, type, param, code}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
        500: "server_error",
    }

    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class BonOptions(_Strict):
    n: int | None = Field(None, description="Candidates to sample and choose among.")
    layer: int | None = Field(None, description="Layer of a per-layer metric.")
    return_candidates: bool = Field(False, description="Return every candidate with its score.")
    score: bool = Field(True, description="False: sample only and return candidate 0 (a measuring baseline).")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore")  # e.g. `name` on user messages
    role: str
    content: str | list[TextPart]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model_config = ConfigDict(
        strict=True, extra="ignore"
    )  # clients send harmless extras (user, metadata, ...)
    model: str | None = None
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    bon: BonOptions = Field(default_factory=BonOptions)


def parse_body(raw: bytes) -> tuple[ChatRequest, list[dict]]:
    """Bytes -> (request, messages as {role, content} with roles normalised). Raises ServeError(400)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServeError(
            400, f"request body is not UTF-8 (byte {e.start}); send UTF-8 JSON", "invalid_encoding"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ServeError(
            400,
            f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            "invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise ServeError(
            400, f"request body must be a JSON object, got {type(data).__name__}", "invalid_json"
        )
    for name, allowed in UNSUPPORTED.items():
        if name in data and data[name] not in allowed:
            raise ServeError(
                400, f"`{name}` is not supported by dalign serve; leave it out", "unsupported_parameter", name
            )
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise ServeError(400, f"{param}: {err['msg']}", "invalid_parameter", param) from None
    if not req.messages:
        raise ServeError(
            400, "messages is empty: send at least one user message", "invalid_parameter", "messages"
        )
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise ServeError(
                400,
                f"messages.{i}.role {m.role!r} is not supported; use one of {sorted(ROLES)}",
                "invalid_parameter",
                f"messages.{i}.role",
            )
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates written as \ud800 escapes
            raise ServeError(
                400,
                f"messages.{i}.content holds an unpaired surrogate (invalid Unicode)",
                "invalid_encoding",
                f"messages.{i}.content",
            ) from None
        messages.append({"role": ROLES[m.role], "content": content})
    if messages[-1]["role"] != "user":
        raise ServeError(
            400,
            "the last message must be the user's (the guard answers the user)",
            "invalid_parameter",
            f"messages.{len(messages) - 1}.role",
        )
    return req, messages


def completion(cid: str, model: str, returned: list[dict], usage: dict, bon: dict) -> dict:
    """A chat.completion object: `returned` holds {text, finish_reason} in choice order."""
    choices = [
        {
            "index": k,
            "message": {"role": "assistant", "content": c["text"]},
            "finish_reason": c["finish_reason"],
            "logprobs": None,
        }
        for k, c in enumerate(returned)
    ]
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
        "bon": bon,
    }


def sse_events(body: dict, include_usage: bool) -> list[str]:
    """The same answer as chat.completion.chunk events (role, content, finish), bon on the last chunk, [DONE]."""
    head = {
        "id": body["id"],
        "object": "chat.completion.chunk",
        "created": body["created"],
        "model": body["model"],
    }
    events = []

    def chunk(choices: list[dict], **extra: Any) -> None:
        events.append("data: " + json.dumps({**head, "choices": choices, **extra}) + "\n\n")

    for c in body["choices"]:
        k = c["index"]
        chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        chunk([{"index": k, "delta": {"content": c["message"]["content"]}, "finish_reason": None}])
        chunk([{"index": k, "delta": {}, "finish_reason": c["finish_reason"]}])
    chunk([], bon=body["bon"], **({"usage": body["usage"]} if include_usage else {}))
    events.append("data: [DONE]\n\n")
    return events


__all__ = ["ChatRequest", "ServeError", "completion", "parse_body", "sse_events"]
