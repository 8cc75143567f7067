"""A linear probe: standardised features -> logistic regression, fitted in fp64, saved as safetensors.

The file holds four tensors (mean, scale, weight, bias) and, in the safetensors metadata, a JSON `meta` object
with what is needed to compute the features again (model spec, layer, token budgets) and the decision threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Probe:
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    meta: dict = field(default_factory=dict)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias

    def proba(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(np.asarray(x, dtype=np.float64))))

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "weight": self.weight.astype(np.float32),
            "bias": np.array([self.bias], dtype=np.float32),
        }
        save_file(tensors, str(path), metadata={"meta": json.dumps(self.meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"probe file {path} does not exist; train one with `dalign judge-train`")
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            t = {k: f.get_tensor(k).astype(np.float64) for k in ("mean", "scale", "weight", "bias")}
        return cls(t["mean"], t["scale"], t["weight"], float(t["bias"][0]), meta)


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    l2: float,
    meta: dict | None = None,
    iters: int = 50,
    weight: np.ndarray | None = None,
) -> Probe:
    """L2-regularised logistic regression on standardised features (weighted mean loss + l2/2 * |w|^2; the bias is
    not penalised), solved by Newton's method in fp64: exact, and a second per fit at a thousand features.
    `weight` (one per row, default 1) scales a row's loss and its share of the standardisation: an integer weight
    k fits as k copies of the row."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w_row = np.ones(len(x)) if weight is None else np.asarray(weight, dtype=np.float64)
    w_row = w_row / w_row.mean()
    mean = np.average(x, axis=0, weights=w_row)
    scale = np.sqrt(np.average((x - mean) ** 2, axis=0, weights=w_row)) + 1e-6
    a = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    reg = np.full(a.shape[1], float(l2))
    reg[-1] = 1e-8  # keeps the system definite when the data are separable, without shrinking the bias
    w = np.zeros(a.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a @ w)))
        grad = a.T @ (w_row * (p - y)) / len(y) + reg * w
        hess = (a.T * (w_row * p * (1 - p))) @ a / len(y) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return Probe(mean, scale, w[:-1], float(w[-1]), dict(meta or {}))
