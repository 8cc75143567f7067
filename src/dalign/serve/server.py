"""`dalign serve`: load the aligned/base pair once, build the guard, refuse unsafe binds, run uvicorn."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from dalign.config import RunConfig, ServeConfig
from dalign.serve.app import Guard, create_app


class BindRefused(ValueError):
    pass


def api_keys(cfg: ServeConfig) -> list[str]:
    """Keys from the config plus the comma-separated environment variable; blanks dropped."""
    extra = os.environ.get(cfg.api_keys_env, "").split(",")
    return [k.strip() for k in [*cfg.api_keys, *extra] if k.strip()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname: it may resolve to anything
        return False


def check_bind(host: str, keys: list[str]) -> None:
    if not keys and not is_loopback(host):
        raise BindRefused(
            f"refusing to bind {host} without API keys: anyone who can reach it could use the model. Set keys "
            f"(DALIGN_SERVE_API_KEYS=key1,key2, serve.api_keys or --api-key), or bind 127.0.0.1 behind a gateway"
        )


def build_guard(cfg: RunConfig, adapter: str | Path | None = None) -> Guard:
    from dalign.models.pair import load_pair
    from dalign.score.bestofn import BestOfN

    sc = cfg.serve
    pair = load_pair(cfg.model, adapter)
    bon = BestOfN(
        pair,
        sc.metric,
        sc.layer,
        system_prompt=cfg.model.system_prompt,
        think_prefix=cfg.model.think_prefix,
        batch_size=sc.score_batch_size,
        share_prompt=True,
    )
    context = cfg.model.max_context or getattr(pair.model.config, "max_position_embeddings", None)
    return Guard(bon, sc, context)


def run_server(cfg: RunConfig, adapter: str | Path | None = None) -> None:
    """Blocks until SIGINT/SIGTERM; running requests get `serve.shutdown_timeout_s` to finish."""
    import uvicorn

    sc = cfg.serve
    keys = api_keys(sc)
    check_bind(sc.host, keys)
    app = create_app(build_guard(cfg, adapter), keys)
    uvicorn.run(
        app,
        host=sc.host,
        port=sc.port,
        timeout_graceful_shutdown=sc.shutdown_timeout_s,
        access_log=False,
        log_level="info",
    )


__all__ = ["BindRefused", "api_keys", "build_guard", "check_bind", "is_loopback", "run_server"]
