"""`dalign judge-train`: fit the content judge's probe on the development data and evaluate it honestly.

1. Features of every development row (dalign.judge.devdata) at each candidate layer (dalign.judge.states),
   cached under $DALIGN_CACHE/judge-features by (model, layers, token budgets, data) so reruns take seconds.
2. Hyper-parameters (layer, L2 strength) are chosen by grouped CV *inside* each training split (nested), so the
   reported grouped-CV and leave-one-category-out numbers never saw their test rows, not even for tuning.
3. The final probe: hyper-parameters chosen by grouped CV on all rows, fitted on all rows; written as
   <out>/content.safetensors (< 5 MB) with <out>/content.card.json (data, command, hyper-parameters, metrics).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dalign.judge.devdata import HARM_THRESHOLD, human_agreement, load_dev
from dalign.judge.evaluate import binary_metrics, cv_folds, loco_folds, out_of_fold, per_category
from dalign.judge.probe import Probe, fit_probe

DEFAULT_MODEL = "packaged:smollm2-135m-instruct"
LAYERS = (8, 12, 16)  # of SmolLM2's 30: early, the paper's default 12, middle
L2 = (0.01, 0.1, 1.0)
MAX_PROMPT_TOKENS = 64
MAX_ANSWER_TOKENS = 128
INNER_FOLDS = 3
THRESHOLD = 0.5


def dev_features(dev: pd.DataFrame, model_spec: str, layers=LAYERS, model=None, tok=None) -> np.ndarray:
    """(rows, len(layers), features), from the cache when this exact request was computed before."""
    from rich.progress import Progress

    from dalign.judge.states import pooled_states
    from dalign.models.loading import cache_root

    blob = json.dumps(
        [model_spec, list(layers), MAX_PROMPT_TOKENS, MAX_ANSWER_TOKENS, list(dev["prompt"]), list(dev["response"])]
    )
    path = cache_root() / "judge-features" / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.npy"
    if path.exists():
        return np.load(path)
    if model is None:
        from dalign.models import load_model

        model, tok = load_model(model_spec)
    with Progress(transient=True) as bar:
        task = bar.add_task("features", total=len(dev))
        x = pooled_states(
            model,
            tok,
            list(zip(dev["prompt"], dev["response"], strict=True)),
            list(layers),
            max_prompt_tokens=MAX_PROMPT_TOKENS,
            max_answer_tokens=MAX_ANSWER_TOKENS,
            progress=lambda n: bar.advance(task, n),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, x)
    tmp.replace(path)
    return x


def choose(x: np.ndarray, y: np.ndarray, groups: pd.Series, layers, l2s, folds: int = INNER_FOLDS) -> tuple:
    """(layer index, l2) with the best grouped-CV accuracy on these rows (ties: the earlier grid point)."""
    inner = cv_folds(pd.DataFrame({"prompt": groups.to_numpy()}), folds, seed=1)
    best, best_acc = (0, l2s[0]), -1.0
    for (k, _), l2 in itertools.product(enumerate(layers), l2s):
        prob = np.full(len(y), np.nan)
        for f in np.unique(inner):
            tr, te = inner != f, inner == f
            prob[te] = fit_probe(x[tr, k], y[tr], l2).proba(x[te, k])
        acc = float(((prob > THRESHOLD) == y).mean())
        if acc > best_acc:
            best, best_acc = (k, l2), acc
    return best


def nested_fitter(x: np.ndarray, dev: pd.DataFrame, layers, l2s):
    """A Fitter (dalign.judge.evaluate) that tunes on its training rows only."""
    y = dev["harmful"].to_numpy()

    def fit(train: np.ndarray):
        k, l2 = choose(x[train], y[train], dev["prompt"].iloc[train], layers, l2s)
        probe = fit_probe(x[train, k], y[train], l2)
        return lambda test: probe.proba(x[test, k])

    return fit


def evaluate_probe(x: np.ndarray, dev: pd.DataFrame, layers=LAYERS, l2s=L2) -> dict:
    """Out-of-fold P(harmful) for grouped CV and LOCO, and their metrics."""
    fit = nested_fitter(x, dev, layers, l2s)
    gold = dev["harmful"].to_numpy()
    cv = out_of_fold(dev, fit, cv_folds(dev))
    loco = out_of_fold(dev, fit, loco_folds(dev))
    return {
        "cv_prob": cv,
        "loco_prob": loco,
        "cv": binary_metrics(cv, gold, THRESHOLD),
        "loco": binary_metrics(loco, gold, THRESHOLD),
        "cv_by_category": per_category(dev, cv, THRESHOLD),
        "loco_by_category": per_category(dev, loco, THRESHOLD),
    }


def train_content_probe(out: str | Path, model_spec: str = DEFAULT_MODEL, evaluate: bool = True) -> dict:
    """Fit and write the probe and its card; returns the card."""
    t0 = time.perf_counter()
    dev = load_dev()
    x = dev_features(dev, model_spec)
    y = dev["harmful"].to_numpy()
    k, l2 = choose(x, y, dev["prompt"], LAYERS, L2, folds=5)
    meta = {
        "model": model_spec,
        "layer": LAYERS[k],
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "max_answer_tokens": MAX_ANSWER_TOKENS,
        "threshold": THRESHOLD,
        "features": "mean over answer tokens ++ mean over prompt tokens (dalign.judge.states)",
    }
    probe: Probe = fit_probe(x[:, k], y, l2, meta)
    out = Path(out)
    path = probe.save(out / "content.safetensors")
    card = {
        "judge": "content",
        "file": path.name,
        "bytes": path.stat().st_size,
        "command": f"dalign judge-train --out {out} --model {model_spec}",
        "model": model_spec,
        "hyperparameters": {"layer": LAYERS[k], "l2": l2, "grid": {"layers": list(LAYERS), "l2": list(L2)}},
        "data": {
            "source": "pyrit datasets/scorer_evals/harm/*.csv (except mini_hate_speech.csv) and refusal_scorer/*.csv",
            "rows": len(dev),
            "harmful": int(y.sum()),
            "by_category": {c: int(n) for c, n in dev["category"].value_counts().items()},
            "binarisation": f"harmful when the (mean) human harm score >= {HARM_THRESHOLD}; refusal-set rows are 0",
        },
        "human_agreement": human_agreement(dev),
    }
    if evaluate:
        ev = evaluate_probe(x, dev)
        card["metrics"] = {
            "protocol": "nested: layer and l2 tuned by 3-fold grouped CV inside each training split",
            "grouped_cv_5fold": ev["cv"],
            "leave_one_category_out": ev["loco"],
            "loco_by_category": ev["loco_by_category"],
        }
    card["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "content.card.json").write_text(json.dumps(card, indent=2, default=float) + "\n")
    return card
