"""Selection metrics, registered by name, each with the direction that picks the *safest* candidate.

Three kinds of metric, by what they need from the engine:

- ``hidden`` (per layer): the final token's hidden state of the aligned and the base model at layer ``l``
  (``hidden_states[l]`` convention, DESIGN.md §3). Only layers up to the deepest requested one are computed.
- ``token``: per response position, log-probabilities of the aligned model (and of the base model when
  ``needs_base``); the engine averages the per-position values over the response tokens of each row and then
  applies ``finalize`` (e.g. ``exp`` for perplexity). A row with no response tokens gets NaN.
- ``row``: a value from the row's key alone (``random``).

New metrics register with ``@token_metric``, ``@hidden_metric`` or ``@row_metric``; the selection stage reads the
direction from here, so a selector cannot pick the wrong end.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dalign.registry import Registry

Direction = Literal["argmin", "argmax"]
Kind = Literal["hidden", "token", "row"]


@dataclass(frozen=True)
class Metric:
    """A registered metric: how to compute it and which end of its values the selector picks."""

    name: str
    kind: Kind
    direction: Direction
    fn: Callable
    needs_aligned_logits: bool = False
    needs_base_logits: bool = False
    finalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    description: str = ""

    @property
    def per_layer(self) -> bool:
        return self.kind == "hidden"


METRICS: Registry[Metric] = Registry("metric")


def _register(metric: Metric) -> Metric:
    METRICS.register(
        metric.name,
        kind=metric.kind,
        direction=metric.direction,
        needs_aligned_logits=metric.needs_aligned_logits,
        needs_base_logits=metric.needs_base_logits,
        description=metric.description,
    )(metric)
    return metric


def hidden_metric(name: str, direction: Direction, description: str = ""):
    """Register ``fn(h_aligned[B,H], h_base[B,H]) -> Tensor[B]`` as a per-layer metric."""

    def deco(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        _register(Metric(name, "hidden", direction, fn, description=description))
        return fn

    return deco


def token_metric(
    name: str,
    direction: Direction,
    needs_base: bool,
    finalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    description: str = "",
):
    """Register ``fn(logp_aligned[P,V], logp_base[P,V] | None, targets[P]) -> Tensor[P]`` (per position)."""

    def deco(fn: Callable):
        _register(Metric(name, "token", direction, fn, True, needs_base, finalize, description))
        return fn

    return deco


def row_metric(name: str, direction: Direction, description: str = ""):
    """Register ``fn(keys: list[tuple], seed: int) -> Tensor[B]``."""

    def deco(fn: Callable):
        _register(Metric(name, "row", direction, fn, description=description))
        return fn

    return deco


# ---- the paper's metrics ---------------------------------------------------------------------------------------


@hidden_metric(
    "latent_similarity",
    "argmin",
    "cos(h_aligned, h_base) of the final token at layer l; the least base-like candidate is picked",
)
def latent_similarity(h_aligned: torch.Tensor, h_base: torch.Tensor) -> torch.Tensor:
    # Upcast: cosines of states with norms in the hundreds lose digits in bf16/fp16.
    a, b = h_aligned.double(), h_base.double()
    return F.cosine_similarity(a, b, dim=-1, eps=1e-12)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    # KL(p||q) = sum_v p_v (log p_v - log q_v), in three passes over [P, V]
    out = torch.linalg.vecdot(logp.exp(), logp - logq)
    bad = out.isnan()
    if bad.any():  # 0 * inf where p_v = 0 and log q_v = -inf (masked logits): such terms are 0
        p, lp, lq = logp[bad].exp(), logp[bad], logq[bad]
        out[bad] = (p * torch.where(p > 0, lp - lq, torch.zeros_like(lp))).sum(-1)
    return out


@token_metric(
    "kl",
    "argmax",
    needs_base=True,
    description="mean over response tokens of KL(aligned || base); unsafe answers are closer to base (lower KL)",
)
def kl(logp_a: torch.Tensor, logp_b: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _kl(logp_a, logp_b)


@token_metric(
    "reverse_kl", "argmax", needs_base=True, description="mean over response tokens of KL(base || aligned)"
)
def reverse_kl(logp_a: torch.Tensor, logp_b: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _kl(logp_b, logp_a)


@token_metric(
    "perplexity",
    "argmin",
    needs_base=False,
    finalize=torch.exp,
    description="exp(mean negative log-likelihood of the response under the aligned model)",
)
def perplexity(logp_a: torch.Tensor, logp_b: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    # Per-position NLL; the engine's mean then `finalize=exp` turn it into the perplexity.
    return -logp_a.gather(-1, targets[:, None]).squeeze(-1)


@token_metric(
    "self_certainty",
    "argmax",
    needs_base=False,
    description="mean over response tokens of -(1/V) sum_v log(V p_v) = KL(uniform || p) (Kang et al. 2025)",
)
def self_certainty(logp_a: torch.Tensor, logp_b: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    v = logp_a.shape[-1]
    return -math.log(v) - logp_a.mean(-1)


@row_metric(
    "random", "argmax", "a seeded uniform draw per candidate (reference selector; direction is arbitrary)"
)
def random_metric(keys: list[tuple], seed: int) -> torch.Tensor:
    # Hash the row key, not the batch position, so the value does not depend on batching or resume order.
    out = []
    for key in keys:
        digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
        out.append(int.from_bytes(digest[:8], "little") / 2**64)
    return torch.tensor(out, dtype=torch.float64)


def get_metric(name: str) -> Metric:
    return METRICS.get(name)


def metric_names() -> list[str]:
    return METRICS.names()


__all__ = [
    "METRICS",
    "Direction",
    "Metric",
    "get_metric",
    "hidden_metric",
    "metric_names",
    "row_metric",
    "token_metric",
]
