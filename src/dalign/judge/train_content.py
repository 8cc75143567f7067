"""`dalign judge-train`: fit the content judge's probe on the development data and evaluate it honestly.

1. Features of every development row (dalign.judge.devdata) at the probe's layers (dalign.judge.states), cached
   under $DALIGN_CACHE/judge-features by (model, layers, token budgets, rows) so reruns take seconds.
2. Out-of-fold P(harmful) under grouped 5-fold CV (by objective) and leave-one-category-out.
3. The final probe, fitted on all rows, written as <out>/content.safetensors (< 5 MB) with
   <out>/content.card.json (data, command, hyper-parameters, metrics).

Training rows: the development rows, plus the shipped corpus's benign traces (prompt, final answer) as `safe` at
weight BENIGN_WEIGHT. pyrit's harm files pair substantive answers with harmful requests only, so a probe fitted on
them alone reads any substantive answer as harmful (44 % of the corpus's benign answers safe, 57 % on the refusal
set held out); the benign traces show it helpful answers to benign requests. In grouped CV the benign rows are
split into the same number of folds and held out with their fold; in leave-one-category-out they always train.

Hyper-parameters are fixed: answer-token means at layers 2, 6, 10, 15, 21 of the packaged model's 30 side by side,
L2 1.0, benign weight 0.2. They were picked by looking at grouped CV, leave-one-category-out and the corpus check on
these same folds (about 30 variants; benchmarks/RESULTS.md), so the numbers carry that selection optimism; the card
says so. Another feature model (`--model`) reads the same relative depths (`layers_for`) unless told `--layers`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dalign.judge.devdata import HARM_THRESHOLD, grouped_folds, human_agreement, load_dev
from dalign.judge.evaluate import binary_metrics, by_label_clarity, cv_folds, loco_folds, per_category
from dalign.judge.probe import Probe, fit_probe

DEFAULT_MODEL = "packaged:smollm2-135m-instruct"
LAYERS = (2, 6, 10, 15, 21)
LAYERS_DEPTH = 30  # the packaged model's blocks, the depth LAYERS were chosen at
L2 = 1.0
BENIGN_WEIGHT = 0.2
MAX_PROMPT_TOKENS = 64
MAX_ANSWER_TOKENS = 128
THRESHOLD = 0.5


def layers_for(num_layers: int) -> tuple[int, ...]:
    """LAYERS at the same relative depth in a model of `num_layers` blocks (LAYERS itself at 30)."""
    return tuple(sorted({min(num_layers, max(1, round(v * num_layers / LAYERS_DEPTH))) for v in LAYERS}))


def model_depth(model_spec: str) -> int:
    """Number of decoder blocks of a model spec, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    from dalign.models.loading import resolve_spec

    cfg = AutoConfig.from_pretrained(resolve_spec(model_spec))
    return int(getattr(cfg, "text_config", cfg).num_hidden_layers)


def resolve_layers(model_spec: str, layers=None) -> tuple[int, ...]:
    """The blocks a probe on `model_spec` reads: `layers` checked against the model's depth, default `layers_for`."""
    depth = model_depth(model_spec)
    layers = tuple(int(v) for v in layers) if layers else layers_for(depth)
    if not all(1 <= v <= depth for v in layers):
        raise ValueError(
            f"--layers {list(layers)}: {model_spec} has blocks 1..{depth}; pick layers in that range"
        )
    return layers


def dev_features(rows: pd.DataFrame, model_spec: str, layers=LAYERS) -> np.ndarray:
    """(rows, len(layers), features) of (prompt, response) rows, from the cache when computed before."""
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
            list(rows["prompt"]),
            list(rows["response"]),
        ]
    )
    path = cache_root() / "judge-features" / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.npy"
    if path.exists():
        return np.load(path)
    model, tok = load_model(model_spec, dtype="float32")  # the judge computes its features in fp32 too
    with Progress(transient=True) as bar:
        task = bar.add_task("features", total=len(rows))
        x = pooled_states(
            model,
            tok,
            list(zip(rows["prompt"], rows["response"], strict=True)),
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


def probe_features(rows: pd.DataFrame, model_spec: str, layers=LAYERS) -> np.ndarray:
    """The probe's input per row: the answer-token means at `layers` side by side (dalign.judge.states)."""
    from dalign.judge.states import layer_answer_means

    return layer_answer_means(dev_features(rows, model_spec, layers))


def benign_rows() -> pd.DataFrame:
    """The shipped corpus's benign traces as (prompt, response = final answer) rows, all safe."""
    from dalign.teach.corpus import load_corpus

    df = load_corpus()
    df = df[df["category"] == "benign"]
    return pd.DataFrame({"prompt": df["prompt"].to_numpy(), "response": df["answer"].to_numpy()})


def fit_rows(x: np.ndarray, y: np.ndarray, xb: np.ndarray, meta: dict | None = None, l2: float = L2) -> Probe:
    """The probe fitted on development rows (x, y) plus benign rows xb (safe, weight BENIGN_WEIGHT)."""
    weight = np.concatenate([np.ones(len(x)), np.full(len(xb), BENIGN_WEIGHT)])
    return fit_probe(np.vstack([x, xb]), np.concatenate([y, np.zeros(len(xb))]), l2, meta, weight=weight)


def evaluate_probe(x: np.ndarray, dev: pd.DataFrame, xb: np.ndarray, l2: float = L2) -> dict:
    """Out-of-fold P(harmful) for grouped CV and LOCO, and their metrics; `benign_cv_prob` is the benign rows'
    out-of-fold P(harmful) under grouped CV (xb may have no rows: the first probe's protocol)."""
    y = dev["harmful"].to_numpy().astype(float)
    cv = cv_folds(dev)
    benign_fold = grouped_folds(pd.Series(range(len(xb))), int(cv.max()) + 1) if len(xb) else np.zeros(0, int)
    out = {}
    for name, folds, held_with in (("cv", cv, benign_fold), ("loco", loco_folds(dev), None)):
        prob, benign_prob = np.full(len(dev), np.nan), np.full(len(xb), np.nan)
        for f in np.unique(folds):
            test = folds == f
            keep = np.ones(len(xb), bool) if held_with is None else held_with != f
            probe = fit_rows(x[~test], y[~test], xb[keep], l2=l2)
            prob[test] = probe.proba(x[test])
            benign_prob[~keep] = probe.proba(xb[~keep])
        out[f"{name}_prob"] = prob
        out[name] = binary_metrics(prob, y, THRESHOLD)
        out[f"{name}_by_category"] = per_category(dev, prob, THRESHOLD)
        out[f"{name}_by_clarity"] = by_label_clarity(dev, prob, THRESHOLD)
        if held_with is not None:
            out["benign_cv_prob"] = benign_prob
    return out


def train_content_probe(
    out: str | Path, model_spec: str = DEFAULT_MODEL, evaluate: bool = True, layers=None
) -> dict:
    """Fit and write the probe and its card; returns the card. `layers`: default `layers_for` the model's depth."""
    t0 = time.perf_counter()
    flag = f" --layers {','.join(str(v) for v in layers)}" if layers else ""
    layers = resolve_layers(model_spec, layers)
    dev = load_dev()
    benign = benign_rows()
    x, xb = probe_features(dev, model_spec, layers), probe_features(benign, model_spec, layers)
    y = dev["harmful"].to_numpy().astype(float)
    meta = {
        "model": model_spec,
        "layers": list(layers),
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "max_answer_tokens": MAX_ANSWER_TOKENS,
        "threshold": THRESHOLD,
        "features": "mean hidden states over the answer tokens at `layers`, side by side "
        "(dalign.judge.states.layer_answer_means)",
    }
    probe = fit_rows(x, y, xb, meta)
    out = Path(out)
    path = probe.save(out / "content.safetensors")
    card = {
        "judge": "content",
        "file": path.name,
        "bytes": path.stat().st_size,
        "command": f"dalign judge-train --out {out} --model {model_spec}{flag}",
        "model": model_spec,
        "hyperparameters": {
            "layers": list(layers),
            "l2": L2,
            "benign_weight": BENIGN_WEIGHT,
            "threshold": THRESHOLD,
            "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "max_answer_tokens": MAX_ANSWER_TOKENS,
            "chosen_by": "about 30 variants compared on the same grouped-CV and LOCO folds and the corpus check "
            "(see dalign/judge/train_content.py): the metrics carry that selection optimism",
        },
        "data": {
            "source": "pyrit datasets/scorer_evals/harm/*.csv (except mini_hate_speech.csv) and refusal_scorer/*.csv",
            "rows": len(dev),
            "harmful": int(y.sum()),
            "by_category": {c: int(n) for c, n in dev["category"].value_counts().items()},
            "binarisation": f"harmful when the (mean) human harm score >= {HARM_THRESHOLD}; refusal-set rows are 0",
            "benign_rows": {
                "source": "the shipped corpus's benign traces (dalign/teach/corpus), prompt + final answer, safe",
                "rows": len(xb),
                "weight": BENIGN_WEIGHT,
            },
        },
        "human_agreement": human_agreement(dev),
    }
    if evaluate:
        ev = evaluate_probe(x, dev, xb)
        card["metrics"] = {
            "grouped_cv_5fold": ev["cv"],
            "leave_one_category_out": ev["loco"],
            "loco_by_category": ev["loco_by_category"],
            "benign_corpus_safe_share_cv": float((ev["benign_cv_prob"] <= THRESHOLD).mean()),
            "accuracy_by_label_clarity": {
                name: {k: m["accuracy"] for k, m in ev[f"{name}_by_clarity"].items()}
                for name in ("cv", "loco")
            },
        }
    card["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "content.card.json").write_text(json.dumps(card, indent=2, default=float) + "\n")
    return card
