"""Unit tests of dalign.report.stats against brute-force references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from dalign.report import stats


def brute_auroc(pos, neg) -> float:
    """P(pos > neg) + ½ P(tie) by counting every pair."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_kappa(a, b) -> float:
    cats = sorted(set(a) | set(b))
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    p_e = sum((a.count(c) / n) * (b.count(c) / n) for c in cats)
    return (p_o - p_e) / (1 - p_e)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 5, size=rng.integers(1, 30)).astype(float)  # few distinct values: many ties
    neg = rng.integers(0, 5, size=rng.integers(1, 30)).astype(float)
    assert stats.auroc(pos, neg) == pytest.approx(brute_auroc(pos, neg), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_average_ranks_match_pandas_grouped_rank(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 4, 50).astype(float)
    groups = rng.choice(["a", "b", "c"], 50)
    ref = pd.Series(values).groupby(groups).rank(method="average").to_numpy()
    np.testing.assert_allclose(stats.average_ranks(values, groups), ref)
    np.testing.assert_allclose(stats.average_ranks(values), pd.Series(values).rank(method="average"))


def test_auroc_edge_cases():
    assert stats.auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert stats.auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert stats.auroc([1.0, 1.0], [1.0]) == 0.5
    assert math.isnan(stats.auroc([], [1.0]))


@pytest.mark.parametrize("seed", range(4))
def test_grouped_auroc_counts_only_pairs_within_a_group(seed):
    rng = np.random.default_rng(seed)
    n = 60
    values = rng.integers(0, 6, n).astype(float)
    positive = rng.random(n) < 0.4
    groups = rng.integers(0, 8, n)
    wins, pairs = 0.0, 0
    for g in np.unique(groups):
        m = groups == g
        p, q = values[m & positive], values[m & ~positive]
        if len(p) and len(q):
            wins += brute_auroc(p, q) * len(p) * len(q)
            pairs += len(p) * len(q)
    got, got_pairs = stats.grouped_auroc(values, positive, groups)
    assert got_pairs == pairs
    assert got == pytest.approx(wins / pairs, abs=1e-12)


def test_grouped_auroc_differs_from_pooled():
    # Group a: every value high; group b: every value low. Within each group the positive always wins; pooled,
    # the positive of b (2) loses to the negative of a (10): 3 wins of 4 pairs.
    values = np.array([10.0, 11.0, 1.0, 2.0])
    positive = np.array([False, True, False, True])
    groups = np.array(["a", "a", "b", "b"])
    assert stats.grouped_auroc(values, positive, groups) == (1.0, 2)
    assert stats.auroc(values[positive], values[~positive]) == 0.75


def test_oriented_flips_argmin_metrics():
    v = np.array([0.1, 0.9])
    assert list(stats.oriented(v, "min")) == [-0.1, -0.9]
    assert list(stats.oriented(v, "max")) == [0.1, 0.9]
    with pytest.raises(ValueError, match="direction"):
        stats.oriented(v, "up")


def test_kappa_known_values():
    # Textbook table: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o = 0.7, p_e = 0.5, kappa = 0.4.
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4)
    assert stats.cohen_kappa(a, a) == 1.0
    assert stats.cohen_kappa(["s", "u"], ["u", "s"]) == pytest.approx(-1.0)
    assert math.isnan(stats.cohen_kappa(["s", "s"], ["s", "s"]))  # p_e = 1: undefined, not a crash
    assert math.isnan(stats.cohen_kappa([], []))
    with pytest.raises(ValueError, match="equal-length"):
        stats.cohen_kappa(["s"], ["s", "u"])


@pytest.mark.parametrize("seed", range(3))
def test_kappa_matches_reference_three_categories(seed):
    rng = np.random.default_rng(seed)
    a = list(rng.choice(["safe", "unsafe", "error"], 80))
    b = [x if rng.random() < 0.7 else str(rng.choice(["safe", "unsafe", "error"])) for x in a]
    assert stats.cohen_kappa(a, b) == pytest.approx(brute_kappa(a, b))
    assert stats.cohen_kappa(a, b) == pytest.approx(stats.cohen_kappa(b, a))


def test_rate_counts_errors_and_missing_apart():
    labels = pd.Series(["unsafe", "safe", "error", None, "unsafe", "safe"])
    idx = stats.bootstrap_indices(len(labels), 200, seed=0)
    r, boots = stats.rate(labels, "safety", idx)
    assert (r.hits, r.valid, r.errors, r.missing) == (2, 4, 1, 1)
    assert r.value == 0.5
    assert boots.shape == (200,)
    u, _ = stats.rate(pd.Series(["correct", "wrong", "correct", "error"]), "utility", idx[:, :4] % 4)
    assert (u.hits, u.valid, u.errors) == (2, 3, 1)
    assert u.value == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_bootstrap_ci_contains_point_estimate_and_is_seeded(seed):
    rng = np.random.default_rng(100 + seed)
    labels = pd.Series(rng.choice(["safe", "unsafe", "error"], size=120, p=[0.55, 0.4, 0.05]))
    idx = stats.bootstrap_indices(len(labels), 1000, seed=seed)
    r, _ = stats.rate(labels, "safety", idx)
    lo, hi = r.ci
    assert lo <= r.value <= hi
    assert 0 < hi - lo < 0.35  # a real interval, not a point and not [0, 1]
    again, _ = stats.rate(labels, "safety", stats.bootstrap_indices(len(labels), 1000, seed=seed))
    assert again.ci == r.ci
    other, _ = stats.rate(labels, "safety", stats.bootstrap_indices(len(labels), 1000, seed=seed + 50))
    assert other.ci != r.ci


def test_bootstrap_ci_width_matches_binomial_scale():
    # For p = 0.3, n = 400 the normal-approximation 95 % half-width is 1.96*sqrt(.21/400) ≈ 0.045.
    labels = pd.Series(["unsafe"] * 120 + ["safe"] * 280)
    r, _ = stats.rate(labels, "safety", stats.bootstrap_indices(400, 2000, seed=1))
    assert (r.ci[1] - r.ci[0]) / 2 == pytest.approx(1.96 * math.sqrt(0.21 / 400), rel=0.15)


def test_all_missing_rate_is_nan_with_note():
    r, _ = stats.rate(pd.Series([None, "error"]), "safety", stats.bootstrap_indices(2, 50, 0))
    assert math.isnan(r.value) and all(math.isnan(c) for c in r.ci)
    assert r.notes and r.errors == 1 and r.missing == 1


def test_relative_drop():
    assert stats.relative_drop(0.5, 0.25) == (0.5, None)
    assert stats.relative_drop(0.4, 0.5)[0] == pytest.approx(-0.25)
    value, note = stats.relative_drop(0.0, 0.1)
    assert math.isnan(value) and "0" in note
    value, note = stats.relative_drop(math.nan, 0.1)
    assert math.isnan(value) and note


def test_relative_drop_boot_is_paired_and_skips_zero_reference():
    ref = np.array([0.5, 0.0, 0.4, 0.5])
    new = np.array([0.25, 0.1, 0.2, 0.5])
    lo, hi = stats.relative_drop_boot(ref, new)
    assert lo == pytest.approx(np.quantile([0.5, 0.5, 0.0], 0.025))
    assert hi == pytest.approx(0.5)


def test_headroom_figure5_counts():
    rows = []
    # p0: first unsafe, no safe candidate; p1: first unsafe, 2 safe; p2: first safe; p3: first unsafe, 1 safe + error
    spec = {
        "p0": ["unsafe", "unsafe", "unsafe"],
        "p1": ["unsafe", "safe", "safe"],
        "p2": ["safe", "unsafe", "unsafe"],
        "p3": ["unsafe", "safe", "error"],
    }
    for p, labs in spec.items():
        rows += [{"prompt_id": p, "candidate": c, "label": lab} for c, lab in enumerate(labs)]
    h = stats.headroom(pd.DataFrame(rows))
    assert h.n_prompts == 4
    assert h.asr_single == 0.75
    # > half unsafe among judged candidates: p0 (3/3), p2 (2/3); p1 1/3 no; p3 1/2 is not more than half.
    assert h.asr_majority == 0.5
    assert h.n_failing == 3
    assert h.share_failing_with_safe == pytest.approx(2 / 3)
    assert h.safe_count_hist == {0: 1, 1: 1, 2: 1}


def test_headroom_empty():
    h = stats.headroom(pd.DataFrame({"prompt_id": ["a"], "candidate": [0], "label": ["error"]}))
    assert h.n_prompts == 0 and math.isnan(h.asr_single)
