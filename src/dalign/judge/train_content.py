"""`dalign judge-train`: fit the content judge's probe on the development data and evaluate it honestly.

1. Features of every development row (dalign.judge.devdata) at each candidate layer (dalign.judge.states),
   cached under $DALIGN_CACHE/judge-features by (model, layers, token budgets, data) so reruns take seconds.
2. Out-of-fold P(harmful) under grouped 5-fold CV (by objective) and leave-one-category-out.
3. The final probe, fitted on all rows, written as <out>/content.safetensors (< 5 MB) with
   <out>/content.card.json (data, command, hyper-parameters, metrics).

Hyper-parameters are fixed: layer 6, L2 0.1, the answer-token mean only. They were picked in one development
sweep on these same folds (layers 4-16, L2 0.01-1, answer mean vs answer ++ prompt means: CV accuracy 0.77-0.81,
answer-only at layer 6 best), so the CV numbers carry that mild selection optimism; the card says so.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dalign.judge.devdata import HARM_THRESHOLD, human_agreement, load_dev
from dalign.judge.evaluate import binary_metrics, cv_folds, loco_folds, out_of_fold, per_category
from dalign.judge.probe import Probe, fit_probe

DEFAULT_MODEL = "packaged:smollm2-135m-instruct"
LAYER = 6
L2 = 0.1
MAX_PROMPT_TOKENS = 64
MAX_ANSWER_TOKENS = 128
THRESHOLD = 0.5


def dev_features(dev: pd.DataFrame, model_spec: str, layers=(LAYER,)) -> np.ndarray:
    """(rows, len(layers), features), from the cache when this exact request was computed before."""
    from rich.progress import Progress

    from dalign.judge.states import pooled_states
    from dalign.models import load_model
    from dalign.models.loading import cache_root

    blob = json.dumps(
        [
            model_spec,
            list(layers),
            MAX_PROMPT_TOKENS,
            MAX_ANSWER_TOKENS,
            list(dev["prompt"]),
            list(dev["response"]),
        ]
    )
    path = cache_root() / "judge-features" / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.npy"
    if path.exists():
        return np.load(path)
    model, tok = load_model(model_spec, dtype="float32")  # the judge computes its features in fp32 too
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


def probe_features(dev: pd.DataFrame, model_spec: str) -> np.ndarray:
    """The probe's input per row: the answer-token mean at LAYER (dalign.judge.states.answer_mean)."""
    from dalign.judge.states import answer_mean

    return answer_mean(dev_features(dev, model_spec)[:, 0])


def evaluate_probe(x: np.ndarray, dev: pd.DataFrame) -> dict:
    """Out-of-fold P(harmful) for grouped CV and LOCO, and their metrics."""
    y = dev["harmful"].to_numpy()

    def fit(train: np.ndarray):
        probe = fit_probe(x[train], y[train], L2)
        return lambda test: probe.proba(x[test])

    cv = out_of_fold(dev, fit, cv_folds(dev))
    loco = out_of_fold(dev, fit, loco_folds(dev))
    return {
        "cv_prob": cv,
        "loco_prob": loco,
        "cv": binary_metrics(cv, y, THRESHOLD),
        "loco": binary_metrics(loco, y, THRESHOLD),
        "cv_by_category": per_category(dev, cv, THRESHOLD),
        "loco_by_category": per_category(dev, loco, THRESHOLD),
    }


def train_content_probe(out: str | Path, model_spec: str = DEFAULT_MODEL, evaluate: bool = True) -> dict:
    """Fit and write the probe and its card; returns the card."""
    t0 = time.perf_counter()
    dev = load_dev()
    x = probe_features(dev, model_spec)
    y = dev["harmful"].to_numpy()
    meta = {
        "model": model_spec,
        "layer": LAYER,
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "max_answer_tokens": MAX_ANSWER_TOKENS,
        "threshold": THRESHOLD,
        "features": "mean hidden state over the answer tokens (dalign.judge.states.answer_mean)",
    }
    probe: Probe = fit_probe(x, y, L2, meta)
    out = Path(out)
    path = probe.save(out / "content.safetensors")
    card = {
        "judge": "content",
        "file": path.name,
        "bytes": path.stat().st_size,
        "command": f"dalign judge-train --out {out} --model {model_spec}",
        "model": model_spec,
        "hyperparameters": {
            "layer": LAYER,
            "l2": L2,
            "threshold": THRESHOLD,
            "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "max_answer_tokens": MAX_ANSWER_TOKENS,
            "chosen_by": "one development sweep on the same grouped-CV folds (see dalign/judge/train_content.py)",
        },
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
            "grouped_cv_5fold": ev["cv"],
            "leave_one_category_out": ev["loco"],
            "loco_by_category": ev["loco_by_category"],
        }
    card["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "content.card.json").write_text(json.dumps(card, indent=2, default=float) + "\n")
    return card
