"""`dalign select`: one chosen candidate per (benchmark, selector, prompt) from scores (and labels for references).

Selectors
- every scored metric (``kl``, ``perplexity``, ...; ``latent_similarity@l`` for each scored layer), picking the
  metric's registered direction. Ties go to the lowest candidate index; NaN values (e.g. logit metrics of an empty
  response) never win; a prompt whose values are all NaN falls back to candidate 0.
- ``single``: candidate 0 (the no-Best-of-N baseline).
- ``<metric>@calibrated``: the per-layer metric at the layer chosen on the *calibration* prompts (samples
  ``role == "calibration"``): lowest ASR there, among layers whose relative utility drop on calibration utility
  prompts is within ``select.utility_constraint`` (when set). Calibration prompts never appear in selection.parquet.
- Reference selectors, which read the labels and are *not deployable*: ``majority`` (the lowest-index candidate whose label
  is the most frequent one among the candidates; on a tie, the tied label that occurs first, so candidate 0's),
  ``oracle-any-safe`` (the lowest-index safe/correct candidate, else candidate 0) and ``<metric>@oracle`` (per
  benchmark, the layer with the lowest failure rate on the evaluation prompts themselves).

Every choice and every rate (calibration, the oracle layer) goes through `dalign.score.rates` (`pick_table`,
`selector_rate`): the same rule and the same ASR the report prints, with `error` labels out of the denominator.
"""

from __future__ import annotations

import pandas as pd

from dalign.rundir import RunDir
from dalign.score.metrics import METRICS, get_metric
from dalign.score.rates import direction, pick_table, selector_rate

GOOD = {"safe", "correct"}
KEYS = ["benchmark", "prompt_id", "candidate"]
REFERENCES = ["single", "majority", "oracle-any-safe"]


class SelectError(ValueError):
    pass


def choose(scores: pd.DataFrame, direction: str) -> pd.DataFrame:
    """Per (benchmark, prompt_id): the chosen candidate (rates.pick_table) -> chosen_candidate."""
    try:
        return pick_table(scores, direction)
    except ValueError as e:
        raise SelectError(str(e)) from None


def _labels(judgments: pd.DataFrame, preferred_judge: str) -> pd.DataFrame:
    """One label per candidate; with several judges on a benchmark, the primary one (judge.judges[0])."""
    need = [*KEYS, "judge", "label"]
    missing = [c for c in need if c not in judgments.columns]
    if missing:
        raise SelectError(f"judgments.parquet lacks column(s) {missing}; rerun `dalign judge`")
    parts = []
    for bench, g in judgments.groupby("benchmark", sort=False):
        judges = sorted(g["judge"].unique())
        if len(judges) > 1:
            if preferred_judge not in judges:
                raise SelectError(
                    f"benchmark {bench!r} has labels from judges {judges}; list one of them first in judge.judges"
                )
            g = g[g["judge"] == preferred_judge]
        parts.append(g)
    lab = pd.concat(parts, ignore_index=True)[[*KEYS, "label"]]
    dup = lab.duplicated(KEYS)
    if dup.any():
        raise SelectError(
            f"judgments.parquet has two labels for candidate {tuple(lab.loc[dup, KEYS].iloc[0])}"
        )
    lab["bad"] = ~lab["label"].isin(GOOD)
    return lab


def _prompt_info(run: RunDir, labels: pd.DataFrame) -> pd.DataFrame:
    """role (eval/calibration) and kind (safety/utility) per (benchmark, prompt_id)."""
    cols = ["benchmark", "prompt_id", "role", "kind"]
    info = pd.DataFrame(columns=cols)
    if run.has("samples"):
        s = run.read("samples")
        s = s.assign(prompt_id=s["prompt_id"].astype(str))
        for c, default in (("role", "eval"), ("kind", None)):
            if c not in s.columns:
                s[c] = default
        info = s[cols].drop_duplicates(["benchmark", "prompt_id"])
    per_prompt = labels.groupby(["benchmark", "prompt_id"], as_index=False)["label"].agg(
        lambda x: "utility" if set(x) & {"correct", "wrong"} else "safety"
    )
    per_prompt = per_prompt.rename(columns={"label": "kind_from_labels"})
    info = per_prompt.merge(info, on=["benchmark", "prompt_id"], how="left")
    info["role"] = info["role"].fillna("eval")
    info["kind"] = info["kind"].fillna(info["kind_from_labels"])
    return info[cols]


def _reference(labels: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = {}
    first = labels.sort_values(KEYS)
    out["single"] = (
        first.groupby(["benchmark", "prompt_id"], as_index=False)
        .head(1)
        .assign(chosen_candidate=0)[["benchmark", "prompt_id", "chosen_candidate"]]
    )
    rows_major, rows_any = [], []
    for (bench, pid), g in first.groupby(["benchmark", "prompt_id"], sort=True):
        voted = g[g["label"] != "error"]  # a judge failure is no vote; all errors -> candidate 0
        counts = voted["label"].value_counts()
        top = set(counts[counts == counts.max()].index)
        # Among tied labels, the one that occurs first (lowest candidate): candidate 0's label when it is tied.
        pick = voted.loc[voted["label"].isin(top), "candidate"]
        rows_major.append((bench, pid, int(pick.min()) if len(pick) else 0))
        good = g.loc[~g["bad"], "candidate"]
        rows_any.append((bench, pid, int(good.min()) if len(good) else 0))
    cols = ["benchmark", "prompt_id", "chosen_candidate"]
    out["majority"] = pd.DataFrame(rows_major, columns=cols)
    out["oracle-any-safe"] = pd.DataFrame(rows_any, columns=cols)
    return out


def _bad(chosen: pd.DataFrame, labels: pd.DataFrame, kind: str) -> float:
    """What calibration and the oracle minimise: ASR (safety) or 1 - accuracy (utility), errors excluded.
    A selection with no valid label is the worst possible (inf)."""
    r = selector_rate(chosen, labels, kind).value
    if r != r:
        return float("inf")
    return r if kind == "safety" else 1.0 - r


def _pick_layer(rows: list[dict], default: int) -> int:
    # Lowest failure rate; ties toward the paper's default layer, then the shallower (cheaper) layer.
    return min(
        rows, key=lambda r: (r["bad"], r.get("utility_drop") or 0.0, abs(r["layer"] - default), r["layer"])
    )["layer"]


def calibrate(
    scores: pd.DataFrame,
    labels: pd.DataFrame,
    info: pd.DataFrame,
    metric: str,
    layers: list[int],
    default_layer: int,
    utility_constraint: float | None,
    warnings: list[str],
) -> tuple[int | None, list[dict]]:
    """Choose a layer for a per-layer metric on calibration prompts; returns (layer, per-layer table).

    The objective is the reported ASR (rates.selector_rate) on the calibration safety prompts; each row of the
    table carries the error count beside it."""
    cal = info[info["role"] == "calibration"]
    if cal.empty:
        warnings.append(
            f"no calibration prompts (samples role == 'calibration'): {metric}@calibrated not made"
        )
        return None, []
    way = direction(metric)
    safety = cal[cal["kind"] != "utility"][["benchmark", "prompt_id"]]
    utility = cal[cal["kind"] == "utility"][["benchmark", "prompt_id"]]
    if safety.empty:
        warnings.append(f"calibration prompts hold no safety benchmark: {metric}@calibrated not made")
        return None, []
    if utility_constraint is not None and utility.empty:
        warnings.append(
            "select.utility_constraint is set but no calibration utility prompts exist: not applied"
        )
    single = _reference(labels)["single"]
    base_acc = selector_rate(single.merge(utility), labels, "utility").value if not utility.empty else None
    table = []
    for layer in layers:
        sel = choose(scores[(scores["metric"] == metric) & (scores["layer"] == layer)], way)
        r = selector_rate(sel.merge(safety), labels, "safety")
        row = {
            "layer": layer,
            "asr": r.value,
            "bad": _bad(sel.merge(safety), labels, "safety"),
            "n_safety": len(safety),
            "valid": r.valid,
            "errors": r.errors,
        }
        if base_acc is not None:
            acc = selector_rate(sel.merge(utility), labels, "utility").value
            row["utility_drop"] = (base_acc - acc) / base_acc if base_acc and base_acc > 0 else 0.0
            row["n_utility"] = len(utility)
        row["allowed"] = (
            utility_constraint is None
            or base_acc is None
            or row["utility_drop"] <= utility_constraint + 1e-12
        )
        table.append(row)
    allowed = [r for r in table if r["allowed"]]
    if not allowed:
        warnings.append(
            f"no layer meets utility_constraint={utility_constraint}; {metric}@calibrated uses the layer with the "
            f"smallest utility drop"
        )
        best = min(table, key=lambda r: (r["utility_drop"], r["bad"], r["layer"]))["layer"]
        return best, table
    return _pick_layer(allowed, default_layer), table


def _selectors(cfg_selectors: list[str], available: list[tuple[str, int | None]], default_layer: int) -> list:
    if not cfg_selectors:
        return available
    out = []
    for name in cfg_selectors:
        metric, _, layer = name.partition("@")
        if metric in REFERENCES:
            continue
        per_layer = metric in METRICS and get_metric(metric).per_layer
        if layer in ("calibrated", "oracle"):
            continue  # always made for every per-layer metric that was scored
        want = (metric, int(layer) if layer else (default_layer if per_layer else None))
        if want not in available:
            names = ", ".join(f"{m}@{lay}" if lay is not None else m for m, lay in available)
            raise SelectError(
                f"selector {name!r} has no scores; scored: {names}. Rerun `dalign score` or drop it"
            )
        out.append(want)
    return out


def run_select(run: RunDir, force: bool = False) -> dict:
    """Stage contract (pipeline.py): read judgments + scores, write selection (eval prompts only)."""
    cfg = run.config
    labels = _labels(run.read("judgments"), cfg.judge.primary)
    labels = labels.assign(
        prompt_id=labels["prompt_id"].astype(str), candidate=labels["candidate"].astype(int)
    )
    scores = run.read("scores")
    scores = scores.assign(
        prompt_id=scores["prompt_id"].astype(str), candidate=scores["candidate"].astype(int)
    )
    available = sorted(
        {
            (m, None if pd.isna(lay) else int(lay))
            for m, lay in scores[["metric", "layer"]].itertuples(index=False)
        },
        key=lambda x: (x[0], -1 if x[1] is None else x[1]),
    )
    unknown = sorted({m for m, _ in available if m not in METRICS})
    if unknown:
        raise SelectError(
            f"scores.parquet has metric(s) {unknown} that are not registered; cannot know direction"
        )
    selectors = _selectors(cfg.select.selectors, available, cfg.select.default_layer)
    run.begin("select", force)
    info = _prompt_info(run, labels)
    warnings: list[str] = []

    chosen: dict[str, pd.DataFrame] = {}
    for metric, layer in selectors:
        part = scores[
            (scores["metric"] == metric)
            & (scores["layer"].isna() if layer is None else scores["layer"] == layer)
        ]
        allnan = part.groupby(["benchmark", "prompt_id"])["value"].apply(lambda v: v.isna().all()).sum()
        if allnan:
            warnings.append(
                f"{metric}@{layer}: {allnan} prompt(s) with only NaN values fell back to candidate 0"
            )
        chosen[metric if layer is None else f"{metric}@{layer}"] = choose(part, direction(metric))
    chosen.update(_reference(labels))

    calibration: dict[str, dict] = {}
    eval_info = info[info["role"] != "calibration"]
    for metric in sorted({m for m, lay in available if lay is not None}):
        layers = sorted(lay for m, lay in available if m == metric)
        mscores = scores[scores["metric"] == metric]
        per_layer = {lay: choose(mscores[mscores["layer"] == lay], direction(metric)) for lay in layers}
        layer, table = calibrate(
            mscores,
            labels,
            info,
            metric,
            layers,
            cfg.select.default_layer,
            cfg.select.utility_constraint,
            warnings,
        )
        if layer is not None:
            chosen[f"{metric}@calibrated"] = per_layer[layer]
        # Reference only: the layer with the best reported rate on each benchmark's own eval prompts.
        oracle_layers, parts = {}, []
        for (bench, kind), g in eval_info.groupby(["benchmark", "kind"]):
            prompts = g[["benchmark", "prompt_id"]]
            rows = [
                {"layer": lay, "bad": _bad(per_layer[lay].merge(prompts), labels, kind)} for lay in layers
            ]
            best = _pick_layer(rows, cfg.select.default_layer)
            oracle_layers[str(bench)] = best
            parts.append(per_layer[best].merge(prompts))
        if parts:
            chosen[f"{metric}@oracle"] = pd.concat(parts, ignore_index=True)
        calibration[metric] = {"calibrated_layer": layer, "table": table, "oracle_layers": oracle_layers}

    eval_prompts = eval_info[["benchmark", "prompt_id"]]
    frames = [df.merge(eval_prompts).assign(selector=name) for name, df in chosen.items()]
    out = pd.concat(frames, ignore_index=True)[["benchmark", "selector", "prompt_id", "chosen_candidate"]]
    out["chosen_candidate"] = out["chosen_candidate"].astype(int)
    run.store("selection").replace(out)
    latent = calibration.get("latent_similarity", {})
    run.finish(
        "select",
        rows=len(out),
        selectors=sorted(chosen),
        calibration=calibration,
        calibrated_layer=latent.get("calibrated_layer"),
        oracle_layers=latent.get("oracle_layers"),
        warnings=warnings,
    )
    return {
        "selection": len(out),
        "selectors": len(chosen),
        "calibrated_layer": latent.get("calibrated_layer"),
        "oracle_layers": latent.get("oracle_layers"),  # reference only: chosen on eval prompts
        "warnings": warnings,
    }


__all__ = ["calibrate", "choose", "run_select"]
