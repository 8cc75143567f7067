"""Read a run's artifacts for the report, tolerate missing ones, and keep only the rows that count (role == eval).

The report must work on an incomplete run, so every artifact is optional here: what is absent is listed in
`Inputs.missing`, and each report section says what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from dalign.rundir import RunDir

ARTIFACTS = ("samples", "judgments", "scores", "selection")
# Samples and judgments of the compared models (sample.models), read only when the run made them.
MODEL_ARTIFACTS = ("samples-base", "samples-teacher", "judgments-models")
MAKER = {
    "samples": "sample",
    "judgments": "judge",
    "scores": "score",
    "selection": "select",
    "samples-base": "run (stage sample-base)",
    "samples-teacher": "run (stage sample-teacher)",
    "judgments-models": "run (stage judge-models)",
}


def orientation(metric: str) -> str | None:
    """'min' or 'max': which end `dalign select` picks, from the metric registry (rates.direction); None for a
    metric that is not registered (the report then leaves its AUROC out and says so)."""
    from dalign.score.rates import direction

    try:
        return "min" if direction(metric) == "argmin" else "max"
    except KeyError:
        return None


LAYERED = "latent_similarity"
Filter = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass
class Inputs:
    """The run's artifacts (None where absent), eval-filtered, with the benchmark kinds and notes."""

    samples: pd.DataFrame | None
    judgments: pd.DataFrame | None
    scores: pd.DataFrame | None
    selection: pd.DataFrame | None
    kinds: dict[str, str]  # benchmark -> "safety" | "utility"
    prompts: dict[str, list[str]]  # benchmark -> eval prompt ids (the bootstrap universe), sorted
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration_rows: int = 0
    # base/teacher samples (with a `model` column) and their judgments; None when the run compares no models
    model_samples: pd.DataFrame | None = None
    model_judgments: pd.DataFrame | None = None


def _read(run: RunDir, name: str, missing: list[str], notes: list[str]) -> pd.DataFrame | None:
    if not run.has(name):
        missing.append(f"{name}: {run.store(name).path} not found (made by `dalign {MAKER[name]}`)")
        return None
    try:
        df = run.read(name)
    except Exception as e:  # a corrupt shard must not take the whole report down
        missing.append(
            f"{name}: unreadable ({type(e).__name__}: {e}); rerun `dalign {MAKER[name]}` with --force"
        )
        return None
    if df.empty:
        missing.append(f"{name}: {run.store(name).path} holds no rows")
        return None
    for col in ("benchmark", "prompt_id"):
        if col in df.columns:
            df[col] = df[col].astype(str)
    for col in ("candidate", "chosen_candidate"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    if "layer" in df.columns:
        df["layer"] = pd.to_numeric(df["layer"], errors="coerce").astype("Int64")
    need = {
        "samples-base": ["benchmark", "prompt_id", "candidate", "model"],
        "samples-teacher": ["benchmark", "prompt_id", "candidate", "model"],
        "judgments-models": ["model", "benchmark", "prompt_id", "candidate", "judge", "label"],
        "samples": ["benchmark", "prompt_id", "candidate"],
        "judgments": ["benchmark", "prompt_id", "candidate", "judge", "label"],
        "scores": ["benchmark", "prompt_id", "candidate", "metric", "value"],
        "selection": ["benchmark", "selector", "prompt_id", "chosen_candidate"],
    }[name]
    lacking = [c for c in need if c not in df.columns]
    if lacking:
        missing.append(
            f"{name}: lacks column(s) {lacking} (found {list(df.columns)}); rerun `dalign {MAKER[name]}`"
        )
        return None
    if name == "scores" and "layer" not in df.columns:
        df["layer"] = pd.array([pd.NA] * len(df), dtype="Int64")
    return df


def _eval_filter(run: RunDir, samples: pd.DataFrame | None, notes: list[str]) -> tuple[Filter, int]:
    """A function keeping only eval rows of any artifact, and the number of calibration prompts seen."""
    if samples is not None and "role" in samples.columns:
        keys = samples[["benchmark", "prompt_id", "role"]].drop_duplicates(["benchmark", "prompt_id"])
        calib = int((keys["role"] != "eval").sum())
        keys = keys.loc[keys["role"] == "eval", ["benchmark", "prompt_id"]]
        return (lambda df: df.merge(keys, on=["benchmark", "prompt_id"], how="inner")), calib
    calib_names = {d.label for d in run.config.sample.datasets if d.role == "calibration"}
    if calib_names:
        notes.append(
            "samples carry no `role` column: calibration benchmarks were recognised by name from config.yaml "
            f"({', '.join(sorted(calib_names))})"
        )
        return (lambda df: df[~df["benchmark"].isin(calib_names)].reset_index(drop=True)), 0
    notes.append("samples (or their `role` column) are missing: every row is counted as an eval row")
    return (lambda df: df), 0


def _kinds(
    samples: pd.DataFrame | None, judgments: pd.DataFrame | None, benches: list[str]
) -> dict[str, str]:
    kinds: dict[str, str] = {}
    if samples is not None and "kind" in samples.columns:
        for b, k in samples.groupby("benchmark")["kind"].first().items():
            kinds[str(b)] = str(k)
    if judgments is not None:
        utility_labels = judgments["label"].isin(["correct", "wrong"])
        for b, is_u in utility_labels.groupby(judgments["benchmark"]).any().items():
            kinds.setdefault(str(b), "utility" if is_u else "safety")
    return {b: kinds.get(b, "safety") for b in benches}


def load_inputs(run: RunDir) -> Inputs:
    """Read the four artifacts, drop calibration rows, and fix each benchmark's prompt universe."""
    missing: list[str] = []
    notes: list[str] = []
    arts = {name: _read(run, name, missing, notes) for name in ARTIFACTS}
    keep, calib = _eval_filter(run, arts["samples"], notes)
    for name in ARTIFACTS:
        if arts[name] is not None:
            arts[name] = keep(arts[name])
    compared = {n: _read(run, n, missing, notes) for n in MODEL_ARTIFACTS if run.has(n)}
    compared = {n: keep(df) for n, df in compared.items() if df is not None}
    model_samples = [compared[n] for n in ("samples-base", "samples-teacher") if n in compared]
    samples = arts["samples"]
    # The prompt universe per benchmark: the eval samples when present, else whatever was judged.
    source = samples if samples is not None else arts["judgments"]
    prompts: dict[str, list[str]] = {}
    if source is not None:
        for b, ids in source.groupby("benchmark")["prompt_id"].unique().items():
            prompts[str(b)] = sorted(map(str, ids))
    kinds = _kinds(samples, arts["judgments"], sorted(prompts))
    return Inputs(
        samples=samples,
        judgments=arts["judgments"],
        scores=arts["scores"],
        selection=arts["selection"],
        kinds=kinds,
        prompts=prompts,
        missing=missing,
        notes=notes,
        calibration_rows=calib,
        model_samples=pd.concat(model_samples, ignore_index=True) if model_samples else None,
        model_judgments=compared.get("judgments-models"),
    )


def primary_judge(judgments: pd.DataFrame, benchmark: str, preferred: str) -> str | None:
    """The judge whose labels the tables use: the configured one when it labelled this benchmark, else the
    judge with the most rows there (ties broken by name, so the choice is stable)."""
    rows = judgments[judgments["benchmark"] == benchmark]
    if rows.empty:
        return None
    judges = set(rows["judge"].astype(str))
    if preferred in judges:
        return preferred
    counts = rows["judge"].astype(str).value_counts()
    return sorted(counts.index, key=lambda j: (-counts[j], j))[0]


def candidate_labels(judgments: pd.DataFrame, benchmark: str, judge: str) -> pd.DataFrame:
    """prompt_id, candidate, label for one benchmark under one judge (duplicates keep the last row)."""
    rows = judgments[(judgments["benchmark"] == benchmark) & (judgments["judge"].astype(str) == judge)]
    rows = rows.drop_duplicates(["prompt_id", "candidate"], keep="last")
    return rows[["prompt_id", "candidate", "label"]].reset_index(drop=True)
