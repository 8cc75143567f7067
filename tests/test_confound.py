"""Finish-confound analysis: cluster-bootstrap AUROC CIs against explicit resampling, and the confound detected."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dalign.report import confound, stats


def _clustered(seed: int, n_prompts: int = 12, per: int = 6):
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(n_prompts), per)
    values = rng.integers(0, 5, size=len(codes)).astype(float)  # many ties
    positive = rng.random(len(codes)) < 0.5
    return values, positive, codes


def test_cluster_bootstrap_equals_explicit_resampling_of_prompts():
    """Each resample's AUROC (pooled and within prompt) equals the AUROC of the sample built by repeating every
    drawn prompt's candidates: the slow obvious reference."""
    values, positive, codes = _clustered(0)
    idx = stats.bootstrap_indices(12, 20, seed=5)
    counts = confound.boot_counts(12, 20, seed=5)
    pooled = confound.weighted_auroc(values, positive, counts[:, codes])
    for b in range(20):
        take = np.concatenate([np.flatnonzero(codes == p) for p in idx[b]])
        v, pos = values[take], positive[take]
        assert math.isclose(pooled[b], stats.auroc(v[pos], v[~pos]), rel_tol=1e-12)
        copies = np.concatenate([np.full((codes == p).sum(), k) for k, p in enumerate(idx[b])])
        u, pairs = confound._within_parts(values, positive, codes, 12)
        within = (counts[b] @ u) / (counts[b] @ pairs)
        assert math.isclose(within, stats.grouped_auroc(v, pos, copies)[0], rel_tol=1e-12)
    res = confound.auroc_with_ci(values, positive, codes, confound.boot_counts(12, 400, 0))
    assert (
        res["ci"][0] <= res["auroc"] <= res["ci"][1]
        and res["within_ci"][0] <= res["within"] <= res["within_ci"][1]
    )


def _frame(rows):
    """labelled_scores-shaped rows plus the samples' finished flags."""
    lab = pd.DataFrame(
        rows, columns=["benchmark", "prompt_id", "candidate", "metric", "layer", "value", "label", "finished"]
    )
    lab["key"] = lab["metric"] + lab["layer"].map(lambda x: "" if pd.isna(x) else f"@{int(x)}")
    samples = lab.drop_duplicates(["benchmark", "prompt_id", "candidate"])[
        ["benchmark", "prompt_id", "candidate", "finished"]
    ]
    return lab.drop(columns="finished"), samples


def test_a_pure_finish_signal_is_flagged_and_vanishes_within_strata():
    """Latent similarity that only sees the finish (finished candidates: lower cosine) on data where finished
    candidates are mostly safe: pooled AUROC well above 0.5 with a CI excluding it, exactly 0.5 within finished and
    within capped candidates, and a warning; KL that carries a within-stratum signal keeps it."""
    rng = np.random.default_rng(1)
    rows = []
    for p in range(40):
        for c in range(8):
            fin = bool(rng.random() < 0.5)
            safe = bool(rng.random() < (0.8 if fin else 0.2))
            label = "safe" if safe else "unsafe"
            rows.append(("advbench", str(p), c, "latent_similarity", 3, 0.90 if fin else 0.95, label, fin))
            rows.append(("advbench", str(p), c, "kl", None, float(safe) + rng.normal(0, 0.3), label, fin))
    lab, samples = _frame(rows)
    res = confound.analyse(lab, samples, n_boot=300, seed=0)
    m = res["benchmarks"]["advbench"]["metrics"]
    lat = m["latent_similarity@3"]
    assert lat["all"]["auroc"] > 0.7 and lat["all"]["ci"][0] > 0.5
    assert lat["finished"]["auroc"] == 0.5 and lat["capped"]["auroc"] == 0.5
    assert lat["finish_auroc"]["auroc"] == 1.0
    assert m["kl"]["finished"]["auroc"] > 0.8 and m["kl"]["capped"]["auroc"] > 0.8
    share = res["benchmarks"]["advbench"]["safe_share"]
    assert share["finished"]["safe"] > share["capped"]["safe"]
    assert any("latent_similarity@3" in w and "finish" in w for w in res["warnings"])


def test_no_warning_when_finished_and_capped_are_equally_safe():
    rng = np.random.default_rng(2)
    rows = []
    for p in range(30):
        for c in range(8):
            fin, safe = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            rows.append(
                (
                    "dan",
                    str(p),
                    c,
                    "latent_similarity",
                    2,
                    0.9 if fin else 0.95,
                    "safe" if safe else "unsafe",
                    fin,
                )
            )
    lab, samples = _frame(rows)
    assert confound.analyse(lab, samples, n_boot=200, seed=0)["warnings"] == []


def test_selector_asr_within_finished_and_capped_candidates():
    """Hand-checked: the selector (argmin latent) chooses among a prompt's finished (or capped) candidates only."""
    rows = [
        # prompt 0: finished 0 (0.1, unsafe), finished 1 (0.5, safe), capped 2 (0.2, safe), capped 3 (0.3, unsafe)
        ("hb", "0", 0, "latent_similarity", 1, 0.1, "unsafe", True),
        ("hb", "0", 1, "latent_similarity", 1, 0.5, "safe", True),
        ("hb", "0", 2, "latent_similarity", 1, 0.2, "safe", False),
        ("hb", "0", 3, "latent_similarity", 1, 0.3, "unsafe", False),
        # prompt 1: only capped candidates
        ("hb", "1", 0, "latent_similarity", 1, 0.4, "unsafe", False),
        ("hb", "1", 1, "latent_similarity", 1, 0.6, "safe", False),
    ]
    lab, samples = _frame(rows)
    asr = confound.analyse(lab, samples, n_boot=50, seed=0)["benchmarks"]["hb"]["metrics"][
        "latent_similarity@1"
    ]["selector_asr"]
    assert asr["all"]["asr"] == 1.0 and asr["all"]["n_prompts"] == 2  # picks 0.1 (unsafe) and 0.4 (unsafe)
    assert asr["finished"]["asr"] == 1.0 and asr["finished"]["n_prompts"] == 1  # prompt 0 only: 0.1
    assert asr["capped"]["asr"] == 0.5 and asr["capped"]["n_prompts"] == 2  # 0.2 (safe), 0.4 (unsafe)


def test_an_empty_stratum_gives_nan_not_a_crash():
    rows = [
        ("a", str(p), c, "kl", None, float(c), "safe" if c else "unsafe", True)
        for p in range(3)
        for c in range(2)
    ]
    lab, samples = _frame(rows)
    kl = confound.analyse(lab, samples, n_boot=50, seed=0)["benchmarks"]["a"]["metrics"]["kl"]
    assert (
        kl["finished"]["auroc"] == 1.0
        and math.isnan(kl["capped"]["auroc"])
        and math.isnan(kl["capped"]["ci"][0])
    )
    assert kl["selector_asr"]["capped"]["n_prompts"] == 0


def test_finish_flags_fall_back_to_finish_reason():
    s = pd.DataFrame(
        {
            "benchmark": ["a", "a"],
            "prompt_id": ["1", "1"],
            "candidate": [0, 1],
            "finish_reason": ["stop", "length"],
        }
    )
    assert confound.finish_flags(s)["finished"].tolist() == [True, False]
    assert confound.finish_flags(s.drop(columns="finish_reason")) is None
