"""Honest evaluation protocols on the development data: grouped k-fold CV and leave-one-category-out.

Grouped CV: every objective (prompt) is in exactly one test fold, so no request is seen in training and test.
Leave-one-category-out (LOCO): each harm category is the test set once, trained on all the others.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dalign.judge.devdata import HARM_THRESHOLD, grouped_folds


def binary_metrics(prob: np.ndarray, gold: np.ndarray, threshold: float = 0.5) -> dict:
    """accuracy, precision/recall of 'harmful', AUROC of the probability (NaN where undefined), n."""
    prob, gold = np.asarray(prob, dtype=float), np.asarray(gold, dtype=bool)
    pred = prob > threshold
    tp, fp, fn = int((pred & gold).sum()), int((pred & ~gold).sum()), int((~pred & gold).sum())
    return {
        "accuracy": float((pred == gold).mean()) if len(gold) else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "auroc": auroc(prob, gold),
        "n": int(len(gold)),
    }


def auroc(score: np.ndarray, gold: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties count one half (Mann-Whitney U)."""
    score, gold = np.asarray(score, dtype=float), np.asarray(gold, dtype=bool)
    pos, neg = int(gold.sum()), int((~gold).sum())
    if not pos or not neg:
        return float("nan")
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return float((ranks[gold].sum() - pos * (pos + 1) / 2) / (pos * neg))


def cv_folds(dev: pd.DataFrame, k: int = 5, seed: int = 0) -> np.ndarray:
    return grouped_folds(dev["prompt"], k, seed)


def loco_folds(dev: pd.DataFrame) -> np.ndarray:
    return pd.factorize(dev["category"])[0]


def per_category(dev: pd.DataFrame, prob: np.ndarray, threshold: float = 0.5) -> dict[str, dict]:
    return {
        str(c): binary_metrics(prob[idx], dev["harmful"].to_numpy()[idx], threshold)
        for c, idx in dev.groupby("category").indices.items()
    }


def by_label_clarity(dev: pd.DataFrame, prob: np.ndarray, threshold: float = 0.5) -> dict[str, dict]:
    """Metrics on rows grouped by how firm their gold label is, to tell judge error from label noise:
    `near`: the gold harm score lies within half a scale step (0.125) of HARM_THRESHOLD (a single 0.5, or a
    three-rater mean of 0.42-0.58); `clear`: all other rows; `unanimous` / `split`: three-rater rows whose
    binarised raters all agree / do not."""
    near = ((dev["harm"] - HARM_THRESHOLD).abs() <= 0.125).to_numpy()
    votes = dev["raters"].map(lambda r: sum(v >= HARM_THRESHOLD for v in r)).to_numpy()
    raters = dev["raters"].map(len).to_numpy()
    multi = raters >= 3
    unanimous = multi & ((votes == 0) | (votes == raters))
    gold = dev["harmful"].to_numpy()
    strata = {"clear": ~near, "near": near, "unanimous": unanimous, "split": multi & ~unanimous}
    return {k: binary_metrics(np.asarray(prob)[m], gold[m], threshold) for k, m in strata.items()}
