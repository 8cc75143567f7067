"""One way to reach an OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, `transformers serve`, dalign serve).

Everything in dalign that talks to a server (teachers, LLM judges, the `openai` sampling backend, PAIR attackers)
gets its client here, so retries, timeouts and the environment variables are defined once. The `openai` SDK
retries connection errors, 408/409/429 and 5xx with exponential backoff; other 4xx fail at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

BASE_URL_ENV = "DALIGN_OPENAI_BASE_URL"
API_KEY_ENV = "DALIGN_OPENAI_API_KEY"


@dataclass(frozen=True)
class Endpoint:
    """Where a server is and how to talk to it; `base_url` None means the DALIGN_OPENAI_BASE_URL variable."""

    base_url: str | None = None
    api_key_env: str = API_KEY_ENV
    timeout_s: float = 600.0
    max_retries: int = 4

    def resolved_url(self, what: str = "this endpoint") -> str:
        url = self.base_url or os.environ.get(BASE_URL_ENV, "")
        if not url:
            raise ValueError(
                f"{what} needs an OpenAI-compatible endpoint: set {BASE_URL_ENV} (e.g. http://127.0.0.1:8000/v1 "
                f"for a vLLM server) or the config's base_url, and, if the server wants one, {self.api_key_env}"
            )
        return url.rstrip("/")


def make_client(endpoint: Endpoint | None = None, what: str = "this endpoint"):
    """An `openai.OpenAI` client for the endpoint (sync; thread-safe, so one client serves a thread pool)."""
    import openai

    endpoint = endpoint or Endpoint()
    # Local servers accept any key; the SDK insists on a non-empty one.
    key = os.environ.get(endpoint.api_key_env) or "EMPTY"
    return openai.OpenAI(
        base_url=endpoint.resolved_url(what),
        api_key=key,
        timeout=endpoint.timeout_s,
        max_retries=endpoint.max_retries,
    )


def describe_error(e: Exception, url: str) -> str:
    """A one-line, user-facing reason for a failed request (names the server and what to check)."""
    import openai

    if isinstance(e, openai.APIConnectionError):
        return f"cannot reach {url} ({e.__class__.__name__}); is the server up and the base URL right?"
    if isinstance(e, openai.APIStatusError):
        # The SDK's message is only "Error code: N" when the server's reason is not in OpenAI's error format
        # (e.g. FastAPI's {"detail": ...}, which transformers serve sends); the reason is in the body.
        body = e.body if isinstance(e.body, dict) else {}
        reason = body.get("message") or body.get("detail")
        message = f"{e.message}: {reason}" if reason and str(reason) not in e.message else e.message
        return f"{url} answered HTTP {e.status_code}: {str(message)[:300]}"
    return f"request to {url} failed: {e.__class__.__name__}: {e}"
