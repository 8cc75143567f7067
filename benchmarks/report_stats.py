"""Speed of the report's statistics against naive baselines, and the report on a paper-sized synthetic run.

1. AUROC: rank-sum formula vs a brute-force count of every (safe, unsafe) pair (numpy, chunked).
2. Bootstrap CIs: one shared (paired) index matrix for all selectors vs a per-selector loop of resamples.
3. `run_report` on synthetic artifacts the size of the paper's evaluation (DAN 1,405 + WildJailbreak 2,000 +
   StrongREJECT 313 prompts, GSM8K 1,319 + MMLU 966, N = 8, 30 latent layers + 4 metrics), against the time
   to merely read those artifacts.

Usage: .venv/bin/python benchmarks/report_stats.py [--quick]
Last stdout line: JSON with auroc_speedup, bootstrap_speedup, report_seconds, read_seconds, report_over_read,
score_rows, and the equality checks.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dalign.config import load_config
from dalign.report import stats
from dalign.report.stage import run_report
from dalign.rundir import RunDir

BENCHES = [("dan", "safety", 1405), ("wildjailbreak", "safety", 2000), ("strongreject", "safety", 313)]
BENCHES += [("gsm8k", "utility", 1319), ("mmlu", "utility", 966)]
N, LAYERS = 8, list(range(1, 31))


def brute_auroc(pos: np.ndarray, neg: np.ndarray, chunk: int = 500) -> float:
    wins = 0.0
    for i in range(0, len(pos), chunk):
        p = pos[i : i + chunk, None]
        wins += float((p > neg[None, :]).sum()) + 0.5 * float((p == neg[None, :]).sum())
    return wins / (len(pos) * len(neg))


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_auroc(n: int) -> dict:
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(0.3, 1, n), 2)  # rounded: ties must be handled
    neg = np.round(rng.normal(0.0, 1, n), 2)
    t_rank, a = timed(lambda: stats.auroc(pos, neg))
    t_brute, b = timed(lambda: brute_auroc(pos, neg), repeat=1)
    print(
        f"AUROC n={n}+{n}: rank {t_rank * 1e3:.1f} ms, brute force {t_brute * 1e3:.0f} ms, x{t_brute / t_rank:.0f}"
    )
    return {"auroc_speedup": t_brute / t_rank, "auroc_equal": abs(a - b) < 1e-12}


def naive_cis(labels: list[pd.Series], n_boot: int, seed: int) -> list[tuple[float, float]]:
    """Baseline: for each selector, draw resamples one at a time and recount with pandas."""
    out = []
    for lab in labels:
        rng = np.random.default_rng(seed)
        vals = []
        for _ in range(n_boot):
            s = lab.iloc[rng.integers(0, len(lab), len(lab))]
            valid = s.isin(["safe", "unsafe"]).sum()
            vals.append((s == "unsafe").sum() / valid if valid else np.nan)
        out.append(stats.percentile_ci(np.array(vals)))
    return out


def bench_bootstrap(n_prompts: int, n_sel: int, n_boot: int) -> dict:
    rng = np.random.default_rng(1)
    labels = [
        pd.Series(rng.choice(["safe", "unsafe", "error"], n_prompts, p=[0.6, 0.38, 0.02]))
        for _ in range(n_sel)
    ]

    def fast():
        idx = stats.bootstrap_indices(n_prompts, n_boot, seed=7)
        return [stats.rate(lab, "safety", idx)[0].ci for lab in labels]

    t_fast, a = timed(fast)
    t_naive, b = timed(lambda: naive_cis(labels, n_boot, 7), repeat=1)
    same = all(np.allclose(x, y) for x, y in zip(a, b, strict=True))
    print(
        f"bootstrap {n_sel} selectors x {n_prompts} prompts x {n_boot} resamples: shared matrix "
        f"{t_fast:.2f} s, loop {t_naive:.2f} s, x{t_naive / t_fast:.0f} (same CIs: {same})"
    )
    return {"bootstrap_speedup": t_naive / t_fast, "bootstrap_same_ci": bool(same)}


def synthetic_run(path: Path, scale: float) -> tuple[RunDir, int]:
    cfg = load_config(overrides={"name": path.name, "runs_dir": str(path.parent), "sample": {"n": N}})
    run = RunDir.for_config(cfg)
    rng = np.random.default_rng(2)
    samples, judg, scores, sel = [], [], [], []
    for bench, kind, size in BENCHES:
        n_p = max(10, int(size * scale))
        pid = np.repeat([f"{bench}-{i}" for i in range(n_p)], N)
        cand = np.tile(np.arange(N), n_p)
        bad = rng.random(n_p * N) < 0.35
        good_bad = ("correct", "wrong") if kind == "utility" else ("safe", "unsafe")
        label = np.where(bad, good_bad[1], good_bad[0])
        base = {"benchmark": bench, "prompt_id": pid, "candidate": cand}
        samples.append(
            pd.DataFrame({**base, "n_tokens": rng.integers(20, 512, n_p * N), "role": "eval", "kind": kind})
        )
        judg.append(pd.DataFrame({**base, "judge": "refusal", "label": label}))
        for layer in LAYERS:
            v = rng.normal(0.9 + 0.002 * layer * bad, 0.05)
            scores.append(pd.DataFrame({**base, "metric": "latent_similarity", "layer": layer, "value": v}))
        for m in ("kl", "perplexity", "self_certainty", "random"):
            scores.append(
                pd.DataFrame({**base, "metric": m, "layer": pd.NA, "value": rng.normal(size=n_p * N)})
            )
        ids = [f"{bench}-{i}" for i in range(n_p)]
        for s in ["single", "kl", "perplexity", "self_certainty", "random", "majority", "oracle-any-safe"]:
            sel.append(
                pd.DataFrame({"benchmark": bench, "selector": s, "prompt_id": ids, "chosen_candidate": 0})
            )
        for layer in [*LAYERS, "calibrated", "oracle"]:
            chosen = rng.integers(0, N, n_p)
            sel.append(
                pd.DataFrame(
                    {
                        "benchmark": bench,
                        "selector": f"latent_similarity@{layer}",
                        "prompt_id": ids,
                        "chosen_candidate": chosen,
                    }
                )
            )
    sc = pd.concat(scores, ignore_index=True).astype({"layer": "Int64"})
    run.store("samples").write(pd.concat(samples, ignore_index=True))
    run.store("judgments").write(pd.concat(judg, ignore_index=True))
    run.store("scores").write(sc)
    run.store("selection").write(pd.concat(sel, ignore_index=True))
    return run, len(sc)


def bench_report(scale: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run, n_scores = synthetic_run(Path(tmp) / "paper", scale)
        t_read, _ = timed(
            lambda: [run.read(a) for a in ("samples", "judgments", "scores", "selection")], repeat=1
        )
        t0 = time.perf_counter()
        summary = run_report(run)
        t_rep = time.perf_counter() - t0
        res = json.loads((run.path / "results.json").read_text())
        ok = len(res["safety"]) == 3 and len(res["utility"]) == 2 and summary["figures"] == 7
    print(
        f"report on {n_scores:,} score rows: {t_rep:.1f} s (reading the artifacts alone {t_read:.1f} s, "
        f"x{t_rep / t_read:.1f}); complete: {ok}"
    )
    return {
        "report_seconds": t_rep,
        "read_seconds": t_read,
        "report_over_read": t_rep / t_read,
        "score_rows": n_scores,
        "report_complete": ok,
    }


def main() -> None:
    quick = "--quick" in sys.argv
    out = {}
    out |= bench_auroc(2000 if quick else 5000)
    out |= bench_bootstrap(500 if quick else 2000, 12, 200 if quick else 1000)
    out |= bench_report(0.1 if quick else 1.0)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}))


if __name__ == "__main__":
    main()
