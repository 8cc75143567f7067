"""Turn a run's artifacts into the numbers of the report (the content of results.json).

Sections: Table 1 (rates per benchmark and selector, relative drops, CIs, error counts), Figure 5 (head-room),
Figure 6 (AUROC of each metric for safe vs unsafe candidates), the layer ablation, judge agreement and
response lengths. Each section is computed only when its inputs exist; otherwise it is skipped with a note.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable

import numpy as np
import pandas as pd

from dalign.report import confound, stats
from dalign.report.inputs import LAYERED, Inputs, candidate_labels, orientation, primary_judge

# Table 1 row order; selectors not listed follow alphabetically, per-layer latent selectors go to the ablation.
FIRST = ["single", "random", "perplexity", "self_certainty", "kl", "reverse_kl"]
LAST = [f"{LAYERED}@calibrated", f"{LAYERED}@oracle", "majority", "oracle-any-safe", "oracle-any-correct"]


def is_oracle(selector: str) -> bool:
    """Selectors that look at test-set labels (oracles, majority vote over labels): references, not deployable."""
    return "oracle" in selector or selector == "majority"


def layer_of(selector: str) -> int | None:
    metric, _, rest = selector.partition("@")
    return int(rest) if metric == LAYERED and rest.lstrip("-").isdigit() else None


def table1_order(selectors: list[str], default_layer: int) -> list[str]:
    default = f"{LAYERED}@{default_layer}"
    head = [s for s in [*FIRST, default] if s in selectors]
    tail = [s for s in LAST if s in selectors]
    rest = sorted(s for s in selectors if s not in head and s not in tail and layer_of(s) is None)
    return head + rest + tail


def _seed(base: int, benchmark: str) -> int:
    # A per-benchmark seed, stable across runs and independent of which other benchmarks exist.
    return (base * 1_000_003 + zlib.crc32(benchmark.encode())) % (2**32)


def _selections(inp: Inputs, bench: str, notes: list[str]) -> dict[str, pd.Series]:
    """selector -> chosen candidate per prompt_id, from selection.parquet, with derived fallbacks."""
    out: dict[str, pd.Series] = {}
    if inp.selection is not None:
        rows = inp.selection[inp.selection["benchmark"] == bench].drop_duplicates(
            ["selector", "prompt_id"], keep="last"
        )
        for sel, g in rows.groupby("selector"):
            out[str(sel)] = g.set_index("prompt_id")["chosen_candidate"]
    elif inp.scores is not None:  # the report never re-selects: the choices are select's alone
        notes.append(f"{bench}: selection.parquet is absent (run `dalign select`); only `single` is reported")
    if "single" not in out:
        # DESIGN.md §3: the single-sample baseline is the first candidate.
        if inp.selection is not None:
            notes.append(f"{bench}: selection.parquet has no `single` selector; candidate 0 was used")
        out["single"] = pd.Series(
            0, index=pd.Index(inp.prompts.get(bench, []), name="prompt_id"), dtype="Int64"
        )
    return out


class LabelLookup:
    """Labels of one benchmark as a (prompt × candidate) matrix, so any selector's labels are one fancy index."""

    def __init__(self, labels: pd.DataFrame, prompts: list[str]):
        self.prompts = prompts
        self.pos = pd.Index(prompts)
        n_cand = int(labels["candidate"].max()) + 1 if len(labels) else 1
        self.matrix = np.full((len(prompts), max(n_cand, 1)), None, dtype=object)
        row = self.pos.get_indexer(labels["prompt_id"])
        cand = labels["candidate"].to_numpy(dtype="int64", na_value=-1)
        ok = (row >= 0) & (cand >= 0)
        self.matrix[row[ok], cand[ok]] = labels["label"].to_numpy(dtype=object)[ok]

    def chosen(self, chosen: pd.Series) -> pd.Series:
        """The label of each prompt's chosen candidate, over the full prompt universe (None = missing)."""
        c = chosen[~chosen.index.duplicated(keep="last")].reindex(self.prompts)
        c = pd.to_numeric(c, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        ok = np.isfinite(c) & (c >= 0) & (c < self.matrix.shape[1])
        out = np.full(len(self.prompts), None, dtype=object)
        rows = np.flatnonzero(ok)
        out[rows] = self.matrix[rows, c[ok].astype(np.int64)]
        return pd.Series(out, index=self.prompts, dtype=object)


def unfinished_flags(judgments: pd.DataFrame, bench: str) -> pd.DataFrame:
    """prompt_id, candidate, label = the candidate's `unfinished` flag (judge stage); empty for older runs."""
    if "unfinished" not in judgments.columns:
        return pd.DataFrame(columns=["prompt_id", "candidate", "label"])
    rows = judgments[judgments["benchmark"] == bench].drop_duplicates(["prompt_id", "candidate"], keep="last")
    return (
        rows[["prompt_id", "candidate"]]
        .assign(label=rows["unfinished"].astype(object))
        .reset_index(drop=True)
    )


def unfinished_share(flags: pd.Series) -> float:
    """Share of chosen candidates that are unfinished, over those with a known flag (NaN when none is known)."""
    known = flags.dropna()
    return float(known.astype(bool).mean()) if len(known) else math.nan


def rates_for_benchmark(
    inp: Inputs, bench: str, judge: str, n_boot: int, seed: int, notes: list[str]
) -> dict:
    """Rates of every selector on one benchmark, with paired-bootstrap CIs and drops relative to `single`, and
    the share of the chosen candidates that are unfinished."""
    kind = inp.kinds[bench]
    prompts = inp.prompts[bench]
    lookup = LabelLookup(candidate_labels(inp.judgments, bench, judge), prompts)
    unfinished = LabelLookup(unfinished_flags(inp.judgments, bench), prompts)
    sels = _selections(inp, bench, notes)
    idx = stats.bootstrap_indices(len(prompts), n_boot, _seed(seed, bench))
    ref, ref_boot = stats.rate(lookup.chosen(sels["single"]), kind, idx)
    out: dict[str, dict] = {}
    for sel, chosen in sels.items():
        r, boots = (ref, ref_boot) if sel == "single" else stats.rate(lookup.chosen(chosen), kind, idx)
        drop, why = stats.relative_drop(ref.value, r.value)
        d = r.as_dict()
        d.update(
            relative_drop=drop,
            relative_drop_ci=list(stats.relative_drop_boot(ref_boot, boots))
            if sel != "single"
            else [0.0, 0.0],
            drop_note=why,
            oracle=is_oracle(sel),
            layer=layer_of(sel),
            unfinished_share=unfinished_share(unfinished.chosen(chosen)),
        )
        out[sel] = d
    return out


def judge_rates(inp: Inputs, primary: dict[str, str], n_boot: int, seed: int, notes: list[str]) -> dict:
    """ASR of every selector under every judge that labelled a safety benchmark: {bench: {judge: rates}}.

    The candidates are the ones selection chose with the primary judge; only the judge reading them changes."""
    out: dict[str, dict] = {}
    for bench, kind in inp.kinds.items():
        if kind != "safety" or bench not in primary:
            continue
        judges = sorted(set(inp.judgments.loc[inp.judgments["benchmark"] == bench, "judge"].astype(str)))
        order = [primary[bench]] + [j for j in judges if j != primary[bench]]
        if len(order) > 1:
            out[bench] = {j: rates_for_benchmark(inp, bench, j, n_boot, seed, notes) for j in order}
    return out


def headroom_for_benchmark(inp: Inputs, bench: str, judge: str) -> dict:
    return stats.headroom(candidate_labels(inp.judgments, bench, judge)).as_dict()


def labelled_scores(inp: Inputs, judges: dict[str, str]) -> pd.DataFrame:
    """Scores of eval safety candidates joined with their safe/unsafe label (error rows dropped), plus `key`."""
    cols = ["benchmark", "prompt_id", "candidate", "metric", "layer", "value", "label", "key"]
    if inp.scores is None or inp.judgments is None:
        return pd.DataFrame(columns=cols)
    frames = []
    for bench, kind in inp.kinds.items():
        if kind != "safety" or bench not in judges:
            continue
        lab = candidate_labels(inp.judgments, bench, judges[bench]).assign(benchmark=bench)
        frames.append(lab[lab["label"].isin(["safe", "unsafe"])])
    if not frames:
        return pd.DataFrame(columns=cols)
    lab = pd.concat(frames, ignore_index=True)
    df = inp.scores.merge(lab, on=["benchmark", "prompt_id", "candidate"], how="inner")
    df["value"] = df["value"].astype(float)
    df = df[np.isfinite(df["value"])].reset_index(drop=True)
    key = df["metric"].astype(str)
    has = df["layer"].notna()
    key[has] = key[has] + "@" + df.loc[has, "layer"].astype("int64").astype(str)
    df["key"] = key
    return df[cols]


def auroc_table(df: pd.DataFrame, n_boot: int = 0, seed: int = 0) -> dict[str, dict[str, dict]]:
    """AUROC per safety benchmark (and pooled as '(all safety)') and metric key, oriented so > 0.5 = prefers safe,
    with 95 % cluster-bootstrap CIs over prompts (`n_boot` resamples; the same as the finish-confound table's).

    `df` is `labelled_scores(...)`."""
    if df.empty:
        return {}
    out: dict[str, dict[str, dict]] = {}
    groups = [(b, df[df["benchmark"] == b]) for b in sorted(df["benchmark"].unique())]
    if len(groups) > 1:
        groups.append(("(all safety)", df))
    for bench, g in groups:
        g = g.reset_index(drop=True)
        codes = confound.prompt_codes(g)
        counts = confound.boot_counts(int(codes.max()) + 1, n_boot, seed)
        for (metric, layer), m in g.groupby(["metric", "layer"], dropna=False):
            way = orientation(str(metric))
            known = way is not None
            way = way or "min"
            v = stats.oriented(m["value"].astype(float).to_numpy(), way)
            safe = (m["label"] == "safe").to_numpy()
            prompt = m.groupby(["benchmark", "prompt_id"], sort=False).ngroup().to_numpy()
            within, pairs = stats.grouped_auroc(v, safe, prompt)
            cis = confound.auroc_with_ci(v, safe, codes[m.index.to_numpy()], counts)
            key = f"{metric}@{int(layer)}" if not pd.isna(layer) else str(metric)
            out.setdefault(bench, {})[key] = {
                "metric": str(metric),
                "layer": None if pd.isna(layer) else int(layer),
                "direction": way,
                "direction_known": known,
                "auroc": stats.auroc(v[safe], v[~safe]),
                "auroc_ci": cis["ci"],
                "within_prompt_auroc": within,
                "within_prompt_ci": cis["within_ci"],
                "within_prompt_pairs": pairs,
                "n_safe": int(safe.sum()),
                "n_unsafe": int((~safe).sum()),
            }
    return out


def layer_ablation(rates: dict) -> dict[str, dict]:
    """Rate of latent-similarity selection at every layer `dalign select` wrote (selection.parquet)."""
    return {
        str(lay): {**r, "source": "selection"}
        for s, r in sorted(rates.items(), key=lambda kv: layer_of(kv[0]) or 0)
        if (lay := layer_of(s)) is not None
    }


def judge_agreement(inp: Inputs) -> list[dict]:
    """Cohen's kappa for every pair of judges on the rows both labelled (rows with an `error` label left out)."""
    if inp.judgments is None:
        return []
    j = inp.judgments.drop_duplicates(["benchmark", "prompt_id", "candidate", "judge"], keep="last")
    judges = sorted(j["judge"].astype(str).unique())
    out = []
    for a, b in itertools.combinations(judges, 2):
        ja = j[j["judge"] == a][["benchmark", "prompt_id", "candidate", "label"]]
        jb = j[j["judge"] == b][["benchmark", "prompt_id", "candidate", "label"]]
        both = ja.merge(jb, on=["benchmark", "prompt_id", "candidate"], suffixes=("_a", "_b"))
        if both.empty:
            continue
        ok = both[(both["label_a"] != "error") & (both["label_b"] != "error")]
        out.append(
            {
                "judges": [a, b],
                "benchmarks": sorted(both["benchmark"].unique().tolist()),
                "n": len(ok),
                "n_error_excluded": len(both) - len(ok),
                "agreement": float((ok["label_a"] == ok["label_b"]).mean()) if len(ok) else math.nan,
                "kappa": stats.cohen_kappa(ok["label_a"].tolist(), ok["label_b"].tolist()),
            }
        )
    return out


def guard_selector(rates: dict, default_layer: int) -> str | None:
    """The Best-of-N guard's selector in Table 1: latent similarity at the calibrated layer, else the default."""
    for sel in (f"{LAYERED}@calibrated", f"{LAYERED}@{default_layer}"):
        if sel in rates:
            return sel
    return None


def models_table(inp: Inputs, res: dict, default_layer: int, n_boot: int, seed: int) -> dict:
    """The alignment gap: per eval benchmark, the single-sample rate (candidate 0, same prompts and seeds) of
    teacher, base and aligned student, and the aligned student behind the guard, each under the benchmark's
    primary judge, with bootstrap CIs over prompts and the mean response length."""
    if inp.model_samples is None or inp.model_judgments is None or inp.judgments is None:
        return {}
    out: dict[str, dict] = {}
    for kind in ("safety", "utility"):
        for bench, block in res[kind].items():
            judge, prompts = block["judge"], inp.prompts[bench]
            idx = stats.bootstrap_indices(len(prompts), n_boot, _seed(seed, bench))
            models: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
            for m in ("teacher", "base"):
                js = inp.model_judgments[inp.model_judgments["model"].astype(str) == m]
                ss = inp.model_samples[inp.model_samples["model"].astype(str) == m]
                if len(js[js["benchmark"] == bench]):
                    models[m] = (js, ss)
            models["aligned"] = (inp.judgments, inp.samples)
            rows = {}
            for m, (js, ss) in models.items():
                labels = LabelLookup(candidate_labels(js, bench, judge), prompts)
                first = pd.Series(0, index=pd.Index(prompts, name="prompt_id"), dtype="Int64")
                r, _ = stats.rate(labels.chosen(first), kind, idx)
                tokens = ss.loc[ss["benchmark"] == bench, "n_tokens"] if ss is not None else pd.Series()
                rows[m] = {**r.as_dict(), "mean_tokens": float(tokens.mean()) if len(tokens) else math.nan}
            guard = guard_selector(block["selectors"], default_layer)
            if guard is not None:
                g = block["selectors"][guard]
                rows["aligned + guard"] = {**g, "selector": guard, "mean_tokens": math.nan}
            out[bench] = {"kind": kind, "judge": judge, "models": rows}
    return out


def all_samples(inp: Inputs) -> pd.DataFrame | None:
    """The aligned samples, plus base/teacher samples (with a `model` column) when the run made them."""
    if inp.samples is None or inp.model_samples is None:
        return inp.samples
    return pd.concat([inp.samples.assign(model="aligned"), inp.model_samples], ignore_index=True)


def lengths(inp: Inputs) -> dict:
    """Response length per benchmark and model (aligned, and base/teacher when the run sampled them)."""
    s = all_samples(inp)
    if s is None:
        return {"note": "samples are missing", "rows": []}
    if "n_tokens" in s.columns:
        n = pd.to_numeric(s["n_tokens"], errors="coerce")
    elif "token_ids" in s.columns:
        n = s["token_ids"].map(lambda t: len(t) if t is not None else np.nan)
    else:
        return {"note": "samples hold neither n_tokens nor token_ids", "rows": []}
    df = pd.DataFrame({"benchmark": s["benchmark"], "n": n.astype(float)})
    df["model"] = s["model"].astype(str) if "model" in s.columns else "aligned"
    df["truncated"] = (s["finish_reason"] == "length") if "finish_reason" in s.columns else np.nan
    note = None
    if "model" not in s.columns or s["model"].nunique() < 2:
        note = (
            "only the aligned model was sampled, so there is no length comparison across models (add base to "
            "sample.models); lengths of the aligned responses are shown"
        )
    rows = []
    for (bench, model), g in df.groupby(["benchmark", "model"]):
        rows.append(
            {
                "benchmark": bench,
                "model": model,
                "n": len(g),
                "mean_tokens": float(g["n"].mean()),
                "median_tokens": float(g["n"].median()),
                "truncated_share": float(g["truncated"].astype(float).mean()),
            }
        )
    return {"note": note, "rows": rows, "compare": note is None}


def compute(
    inp: Inputs,
    preferred_judge: str,
    n_boot: int,
    seed: int,
    default_layer: int,
    step: Callable[[str], None] = lambda _: None,
) -> tuple[dict, pd.DataFrame]:
    """All report numbers (NaN stays NaN; results.json writes it as null) and the labelled scores behind the
    AUROC table (for the density figure). `step(what)` reports progress."""
    notes = list(inp.notes)
    res: dict = {"safety": {}, "utility": {}, "figure5": {}, "ablation": {}, "judges": {}, "notes": notes}
    if inp.judgments is None:
        notes.append("judgments are missing: no rates, head-room, AUROC or ablation can be computed")
    for bench in sorted(inp.prompts):
        if inp.judgments is None:
            break
        step(f"rates of {bench}")
        judge = primary_judge(inp.judgments, bench, preferred_judge)
        if judge is None:
            notes.append(f"{bench}: no judgments for its eval prompts; left out of the tables")
            continue
        res["judges"][bench] = judge
        labels = set(candidate_labels(inp.judgments, bench, judge)["label"].astype(str))
        odd = sorted(labels - {"safe", "unsafe", "correct", "wrong", "error"})
        if odd:
            notes.append(
                f"{bench}: judge {judge!r} wrote label(s) {odd}, counted as missing (expected safe|unsafe|error)"
            )
        kind = inp.kinds[bench]
        rates = rates_for_benchmark(inp, bench, judge, n_boot, seed, notes)
        res[kind][bench] = {
            "kind": kind,
            "judge": judge,
            "n_prompts": len(inp.prompts[bench]),
            "order": table1_order(list(rates), default_layer),
            "selectors": rates,
        }
        res["ablation"][bench] = layer_ablation(rates)
        if kind == "safety":
            res["figure5"][bench] = headroom_for_benchmark(inp, bench, judge)
    step("AUROC per metric and layer")
    labelled = labelled_scores(inp, res["judges"])
    res["auroc"] = auroc_table(labelled, n_boot, seed)
    step("finish confound")
    res["finish_confound"] = confound.analyse(labelled, inp.samples, n_boot, seed)
    res["agreement"] = judge_agreement(inp)
    if inp.judgments is not None:
        step("rates per judge")
        res["per_judge"] = judge_rates(inp, res["judges"], n_boot, seed, notes)
    res["lengths"] = lengths(inp)
    res["models"] = models_table(inp, res, default_layer, n_boot, seed)
    return res, labelled
