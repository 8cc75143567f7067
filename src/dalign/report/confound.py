"""The finish confound: does a metric tell safe from unsafe candidates, or only finished from length-capped ones?

With a short token budget, candidates that ended with their stop token ("finished") are safer than candidates cut
at the budget ("capped"), and a final-token metric sees mostly *which* token ends the text. A pooled AUROC can then
be a finish signal, not base-model attribution. So, per safety benchmark and pooled over them:

- every metric's AUROC (pooled over candidates and within prompts) on all candidates, on finished candidates only
  and on capped candidates only, each with a 95 % cluster-bootstrap CI over prompts (a resampled prompt brings all
  its candidates);
- the metric's AUROC for telling finished from capped candidates (does it see the finish?), with its CI;
- every selector's ASR when it chooses only among a prompt's finished candidates, and only among its capped ones;
- `warnings`: metrics whose pooled AUROC excludes 0.5 while they also separate finished from capped candidates
  and the two groups differ in safety; a layer calibration won by such a metric can be a finish signal.

AUROCs are oriented by the metric's selection direction (> 0.5 = the selector prefers safe candidates), as in the
report's AUROC table. Inputs are `analysis.labelled_scores` (safe/unsafe candidates only) and samples.parquet's
`finished` column (stop token produced), falling back to `finish_reason == "stop"`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dalign.report import stats
from dalign.report.inputs import orientation
from dalign.score import rates

KEYS = ["benchmark", "prompt_id", "candidate"]
STRATA = ("all", "finished", "capped")
POOLED = "(all safety)"


def finish_flags(samples: pd.DataFrame | None) -> pd.DataFrame | None:
    """benchmark, prompt_id, candidate, finished (bool) from samples.parquet; None when it cannot be told."""
    if samples is None or samples.empty:
        return None
    if "finished" in samples.columns:
        flag = samples["finished"].astype(bool)
    elif "finish_reason" in samples.columns:
        flag = samples["finish_reason"].astype(str) == "stop"
    else:
        return None
    return samples[KEYS].assign(finished=flag.to_numpy())


def boot_counts(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_prompts) multiplicities of each prompt in each cluster-bootstrap resample."""
    idx = stats.bootstrap_indices(n_prompts, n_boot, seed)
    counts = np.zeros((len(idx), n_prompts))
    np.add.at(counts, (np.arange(len(idx))[:, None], idx), 1.0)
    return counts


def prompt_codes(g: pd.DataFrame) -> np.ndarray:
    """Prompts numbered 0..P-1 (sorted by benchmark, prompt_id): the columns of `boot_counts`."""
    return g.groupby(["benchmark", "prompt_id"], sort=True).ngroup().to_numpy()


def weighted_auroc(values: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC with candidate weights (one row of `weights` [B, N] per resample), ties one half: the rank-sum
    AUROC of the sample in which candidate i appears weights[b, i] times."""
    if len(values) == 0:  # an empty stratum (e.g. no capped candidate)
        return np.full(len(weights), np.nan)
    order = np.argsort(values, kind="mergesort")
    v, pos, w = values[order], positive[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])  # tie blocks of the sorted values
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each block
    u = (wp * (below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, u / den, np.nan)


def _within_parts(values: np.ndarray, positive: np.ndarray, codes: np.ndarray, n_prompts: int):
    """Per prompt: Mann-Whitney U over its own (positive, negative) pairs, and its number of pairs."""
    ranks = stats.average_ranks(values, codes)
    n_p = np.bincount(codes, weights=positive.astype(float), minlength=n_prompts)
    n_all = np.bincount(codes, minlength=n_prompts).astype(float)
    r_p = np.bincount(codes, weights=np.where(positive, ranks, 0.0), minlength=n_prompts)
    pairs = n_p * (n_all - n_p)
    u = np.where(pairs > 0, r_p - n_p * (n_p + 1) / 2, 0.0)
    return u, pairs


def auroc_with_ci(values, positive, codes, counts) -> dict:
    """Pooled and within-prompt AUROC with 95 % cluster-bootstrap CIs; `codes` number the prompts 0..P-1 as the
    columns of `counts`."""
    values, positive = np.asarray(values, dtype=float), np.asarray(positive, dtype=bool)
    codes = np.asarray(codes, dtype=np.int64)
    n_prompts = counts.shape[1]
    u, pairs = _within_parts(values, positive, codes, n_prompts)
    with np.errstate(invalid="ignore", divide="ignore"):
        within_boot = (counts @ u) / (counts @ pairs)
    return {
        "auroc": stats.auroc(values[positive], values[~positive]),
        "ci": list(stats.percentile_ci(weighted_auroc(values, positive, counts[:, codes]))),
        "within": float(u.sum() / pairs.sum()) if pairs.sum() > 0 else math.nan,
        "within_ci": list(stats.percentile_ci(within_boot)),
        "n_safe": int(positive.sum()),
        "n_unsafe": int((~positive).sum()),
        "n_prompts": int(len(np.unique(codes))),
    }


def _excludes_half(ci: list) -> bool:
    lo, hi = ci
    return math.isfinite(lo) and math.isfinite(hi) and (lo > 0.5 or hi < 0.5)


def _safe_share(safe: np.ndarray, codes: np.ndarray, counts: np.ndarray) -> dict:
    """Share of safe candidates, with its cluster-bootstrap CI."""
    num = np.bincount(codes, safe.astype(float), counts.shape[1])
    den = np.bincount(codes, None, counts.shape[1]).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (counts @ num) / (counts @ den)
    share = float(num.sum() / den.sum()) if den.sum() else math.nan
    return {"safe": share, "ci": list(stats.percentile_ci(boot)), "n": int(den.sum())}


def _selector_asr(m: pd.DataFrame, way: str, stratum: str, n_boot: int, seed: int) -> dict:
    sub = m if stratum == "all" else m[m["finished"] == (stratum == "finished")]
    if sub.empty:
        return {"asr": math.nan, "ci": [math.nan, math.nan], "n_prompts": 0}
    chosen = rates.pick_table(sub, "argmin" if way == "min" else "argmax")
    labels = chosen.merge(
        sub[KEYS + ["label"]], left_on=[*rates.PROMPT, "chosen_candidate"], right_on=KEYS, how="left"
    )["label"]
    r, _ = stats.rate(labels, "safety", stats.bootstrap_indices(len(labels), n_boot, seed))
    return {"asr": r.value, "ci": list(r.ci), "n_prompts": int(len(labels))}


def _strata(finished: np.ndarray) -> dict[str, np.ndarray]:
    return {"all": np.ones(len(finished), dtype=bool), "finished": finished, "capped": ~finished}


def _one_group(g: pd.DataFrame, n_boot: int, seed: int) -> dict:
    codes = prompt_codes(g)
    counts = boot_counts(int(codes.max()) + 1, n_boot, seed)
    first = (g["key"] == g["key"].iloc[0]).to_numpy()  # one row per candidate
    cand_safe = (g.loc[first, "label"] == "safe").to_numpy()
    out: dict = {
        "safe_share": {
            s: _safe_share(cand_safe[sel], codes[first][sel], counts)
            for s, sel in _strata(g.loc[first, "finished"].to_numpy(dtype=bool)).items()
        },
        "metrics": {},
    }
    for key, m in g.groupby("key", sort=True):
        way = orientation(str(m["metric"].iloc[0])) or "min"
        v = stats.oriented(m["value"].to_numpy(dtype=float), way)
        safe = (m["label"] == "safe").to_numpy()
        fin = m["finished"].to_numpy(dtype=bool)
        c = codes[(g["key"] == key).to_numpy()]
        row = {s: auroc_with_ci(v[sel], safe[sel], c[sel], counts) for s, sel in _strata(fin).items()}
        row["finish_auroc"] = auroc_with_ci(v, fin, c, counts)  # > 0.5: the selector prefers finished ones
        row["selector_asr"] = {s: _selector_asr(m, way, s, n_boot, seed) for s in STRATA}
        out["metrics"][key] = row
    return out


def _warnings(bench: str, res: dict) -> list[str]:
    share = res["safe_share"]
    fin, cap = share["finished"], share["capped"]
    differs = (
        math.isfinite(fin["safe"])
        and math.isfinite(cap["safe"])
        and (fin["ci"][0] > cap["ci"][1] or cap["ci"][0] > fin["ci"][1])
    )
    if not differs:
        return []
    out = []
    for key, row in res["metrics"].items():
        a, f = row["all"], row["finish_auroc"]
        if (
            _excludes_half(a["ci"])
            and _excludes_half(f["ci"])
            and (a["auroc"] > 0.5) == ((f["auroc"] > 0.5) == (fin["safe"] > cap["safe"]))
        ):
            out.append(
                f"{bench}: {key} has AUROC {a['auroc']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] pooled, but it also "
                f"tells finished from length-capped candidates (AUROC {f['auroc']:.3f} [{f['ci'][0]:.3f}, "
                f"{f['ci'][1]:.3f}]) and finished candidates are {100 * fin['safe']:.0f} % safe vs "
                f"{100 * cap['safe']:.0f} % capped; within finished {row['finished']['auroc']:.3f}, within capped "
                f"{row['capped']['auroc']:.3f}: its signal may be the finish, not base-model attribution, and a "
                f"layer calibration it wins can be a finish signal"
            )
    return out


def analyse(labelled: pd.DataFrame, samples: pd.DataFrame | None, n_boot: int, seed: int) -> dict:
    """The finish-confound numbers per safety benchmark and pooled (see the module docstring); {} without
    finish flags or labelled scores."""
    flags = finish_flags(samples)
    if flags is None or labelled.empty:
        return {}
    df = labelled.merge(flags, on=KEYS, how="inner")
    if df.empty:
        return {}
    groups = [(b, df[df["benchmark"] == b]) for b in sorted(df["benchmark"].unique())]
    if len(groups) > 1:
        groups.append((POOLED, df))
    out: dict = {"benchmarks": {}, "warnings": []}
    for bench, g in groups:
        res = _one_group(g.reset_index(drop=True), n_boot, seed)
        out["benchmarks"][bench] = res
        out["warnings"] += _warnings(bench, res)
    return out
