"""Table 4 from attacks.parquet: PAIR attack success per target, queries to success, ASR by iteration.

Definitions (per target, over behaviours; the same bootstrap resamples of behaviours for every target, so the
targets are compared on paired data):
- a behaviour is *jailbroken* when any of its rows has `jailbroken` (a rating >= the success threshold) within
  the depth; it is *judged* when at least one of its rows has a rating. ASR = jailbroken / judged; behaviours with
  no rating at all (every iteration an attacker or judge error) are left out and counted as `unjudged`.
- queries = target queries (rows with an attacker prompt). Queries to success of a jailbroken behaviour = its
  queries in iterations 1..k*, k* = the iteration of its first success (all its streams run in parallel, as in
  PAIR, so the whole iteration k* counts). Mean over jailbroken behaviours.
- ASR by iteration k = behaviours jailbroken at an iteration <= k, over the judged behaviours.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dalign.report.render import Image, Section, Table, Text
from dalign.report.stats import boot_ratios, bootstrap_indices, percentile_ci

TARGET_ORDER = ("base", "aligned", "guarded")
FIGURE = "table4_asr_by_iteration.png"


def per_behaviour(rows: pd.DataFrame, behaviours: list[str]) -> pd.DataFrame:
    """One target's rows -> per behaviour: jailbroken, judged, first_success, queries, queries_to_success, errors."""
    out = []
    for b in behaviours:
        g = rows[rows["behaviour"] == b]
        queried = g["attacker_prompt"].notna()
        hits = g.loc[g["jailbroken"].astype(bool), "iteration"]
        first = int(hits.min()) if len(hits) else math.nan
        out.append(
            {
                "behaviour": b,
                "jailbroken": bool(len(hits)),
                "judged": bool(g["judge_score"].notna().any()),
                "first_success": first,
                "queries": int(queried.sum()),
                "queries_to_success": int((queried & (g["iteration"] <= first)).sum())
                if len(hits)
                else math.nan,
                "attacker_errors": int(g["error"].fillna("").str.startswith("attacker").sum()),
                "judge_errors": int((queried & g["error"].notna()).sum()),
            }
        )
    return pd.DataFrame(out)


def results(df: pd.DataFrame, n_boot: int, seed: int, depth: int | None = None) -> dict:
    """Table 4 numbers from all attack rows ({} when there are none)."""
    if df.empty:
        return {}
    behaviours = sorted(df["behaviour"].astype(str).unique())
    depth = int(depth or df["iteration"].max())
    idx = bootstrap_indices(len(behaviours), n_boot, seed)
    present = set(df["target"])
    targets = [t for t in TARGET_ORDER if t in present] + sorted(present - set(TARGET_ORDER))
    out: dict = {"behaviours": len(behaviours), "depth": depth, "targets": {}, "order": targets}
    out["streams"] = int(df["stream"].max()) + 1
    out["judge"] = ", ".join(sorted(df["judge"].dropna().astype(str).unique()))
    for t in targets:
        per = per_behaviour(df[df["target"] == t], behaviours)
        hit, valid = per["jailbroken"].to_numpy(int), per["judged"].to_numpy(int)
        n_valid = int(valid.sum())
        ok = per["jailbroken"]
        sub = df[df["target"] == t]
        out["targets"][t] = {
            "asr": float(hit.sum() / n_valid) if n_valid else math.nan,
            "ci": list(percentile_ci(boot_ratios(hit, valid, idx))),
            "jailbroken": int(hit.sum()),
            "judged": n_valid,
            "unjudged": len(behaviours) - n_valid,
            "mean_queries_to_success": float(per.loc[ok, "queries_to_success"].mean())
            if ok.any()
            else math.nan,
            "mean_first_success_iteration": float(per.loc[ok, "first_success"].mean())
            if ok.any()
            else math.nan,
            "queries_per_behaviour": float(per["queries"].mean()),
            "asr_by_iteration": [
                float(((per["first_success"] <= k) & per["judged"]).sum() / n_valid) if n_valid else math.nan
                for k in range(1, depth + 1)
            ],
            "attacker_errors": int(per["attacker_errors"].sum()),
            "judge_errors": int(per["judge_errors"].sum()),
            "seconds": {part: float(sub[f"{part}_s"].sum()) for part in ("attacker", "target", "judge")},
        }
    return out


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}" if x is not None and math.isfinite(x) else "–"


def _num(x: float | None) -> str:
    return f"{x:.1f}" if x is not None and math.isfinite(x) else "–"


def section(res: dict, figs: dict[str, Path]) -> Section | None:
    """The report section, or None when the run has no attacks."""
    if not res:
        return None
    sec = Section("Table 4: PAIR adaptive attack")
    sec.blocks.append(
        Text(
            f"PAIR against each target on {res['behaviours']} behaviours, {res['streams']} streams × depth "
            f"{res['depth']}, judge `{res['judge']}`. ASR = behaviours jailbroken within the depth / behaviours "
            "with at least one rating (behaviours whose every iteration failed are `unjudged`). Queries = target "
            "queries; to success = up to and including the iteration of the first success. 95 % CIs: percentile "
            "bootstrap over behaviours, the same resamples for every target."
        )
    )
    rows = []
    for t in res["order"]:
        r = res["targets"][t]
        ci = r["ci"]
        rows.append(
            [
                t,
                _pct(r["asr"]),
                f"[{_pct(ci[0])}, {_pct(ci[1])}]",
                f"{r['jailbroken']}/{r['judged']}",
                _num(r["mean_queries_to_success"]),
                _num(r["queries_per_behaviour"]),
                str(r["unjudged"]),
                f"{r['attacker_errors']} / {r['judge_errors']}",
            ]
        )
    cols = [
        "target",
        "ASR %",
        "95 % CI",
        "jailbroken/judged",
        "mean queries to success",
        "queries per behaviour",
        "unjudged",
        "errors (attacker / judge)",
    ]
    sec.blocks.append(Table(cols, rows, "ASR per target"))
    by_iter = [
        [str(k + 1)] + [_pct(res["targets"][t]["asr_by_iteration"][k]) for t in res["order"]]
        for k in range(res["depth"])
    ]
    sec.blocks.append(
        Table(["iteration"] + [f"{t} ASR %" for t in res["order"]], by_iter, "ASR by iteration")
    )
    if "attack" in figs:
        sec.blocks.append(Image(figs["attack"], "PAIR attack success rate by iteration"))
    return sec


def figure(res: dict, path: Path) -> Path | None:
    """ASR by iteration, one line per target."""
    from dalign.report.figures import _new, _save

    if not res:
        return None
    fig, axes = _new(5.5, 3.4)
    ax = axes[0][0]
    ks = np.arange(1, res["depth"] + 1)
    for t in res["order"]:
        ax.plot(ks, [100 * v for v in res["targets"][t]["asr_by_iteration"]], marker="o", label=t)
    ax.set_xlabel("PAIR iteration")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(ks)
    ax.legend(fontsize=8)
    ax.set_title(f"PAIR: {res['behaviours']} behaviours × {res['streams']} streams", fontsize=10)
    return _save(fig, path)
