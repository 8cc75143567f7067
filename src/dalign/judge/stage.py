"""`dalign judge`: label every sampled candidate, written in resumable shards to judgments.parquet.

Safety rows (kind == "safety") get every judge of judge.judges, one judgments row per (candidate, judge); utility
rows get their dataset's checker (number / choice / comply). The `judge` column holds the judge's or checker's
name; the first of judge.judges is the primary judge that selection and calibration read.

Unfinished candidates: `unfinished` is true when generation hit the token budget (no stop token) or the reasoning
never closed (no final answer). judge.unfinished decides their safety label: `as_is` judges the text (the final
answer when there is one, else the reasoning), `unsafe` / `error` label them so without asking the judge.
Utility rows are always checked as is (an unfinished answer is usually just wrong).

Rows already in the store are skipped; verdicts are cached in <run>/judge-cache by (judge config, prompt,
response, answer).
"""

from __future__ import annotations

import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from dalign.judge import get_judge, reasoning_closed, result
from dalign.judge.cache import JudgmentCache, judge_cached
from dalign.progress import Progress
from dalign.rundir import RunDir

COLUMNS = ["benchmark", "prompt_id", "candidate", "judge", "label", "score", "raw", "unfinished"]
SHARD_ROWS = 256  # rows per written shard: bounds the work lost to a kill


def retry_errors(store) -> int:
    """Drop `error` verdicts of real judges (a failed call is not a verdict) so this run asks again; rows with no
    checker ("none") would only fail again and stay."""
    table = store.read()
    if table.empty:
        return 0
    retry = (table["label"] == "error") & (table["judge"] != "none")
    if retry.any():
        store.replace(table[~retry])
    return int(retry.sum())


def candidate_status(samples: pd.DataFrame, think_prefix: bool) -> pd.DataFrame:
    """`finished` / `reasoning_closed` per candidate: the sample stage's columns, derived for older runs."""
    df = samples.copy()
    if "finished" not in df.columns:
        df["finished"] = df["finish_reason"].astype(str) == "stop"
    if "reasoning_closed" not in df.columns:
        df["reasoning_closed"] = [reasoning_closed(r, think_prefix) for r in df["response"]]
    df["unfinished"] = ~(df["finished"].astype(bool) & df["reasoning_closed"].astype(bool))
    return df


def plan(samples: pd.DataFrame, safety_judges: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per (candidate, judge that labels it); warn about utility rows without a checker."""
    warnings = []
    df = samples.copy()
    kind = df["kind"] if "kind" in df.columns else pd.Series("safety", index=df.index)
    checker = df["checker"] if "checker" in df.columns else pd.Series(None, index=df.index, dtype=object)
    df["judge"] = [list(safety_judges) if k == "safety" else [c] for k, c in zip(kind, checker, strict=True)]
    df = df.explode("judge", ignore_index=True)
    missing = df["judge"].isna()
    if missing.any():
        names = sorted(df.loc[missing, "benchmark"].astype(str).unique())
        warnings.append(
            f"{int(missing.sum())} utility rows of {names} have no checker and are labelled error; "
            "give the dataset answer_field (number checker) or use a registered utility dataset"
        )
    df["judge"] = df["judge"].fillna("none")
    return df, warnings


def _unfinished_result(treatment: str) -> dict | None:
    """The fixed label of an unfinished safety candidate, or None to judge its text as is."""
    if treatment == "as_is":
        return None
    why = "unfinished (no stop token or reasoning not closed)"
    return result(treatment, None, f"{why}: labelled {treatment} by judge.unfinished={treatment}")


def run_judge(run: RunDir, force: bool = False) -> dict:
    samples = run.read("samples")
    run.begin("judge", force)
    return _judge(run, "judge", candidate_status(samples, run.config.model.think_prefix), "judgments")


def run_judge_models(run: RunDir, force: bool = False) -> dict:
    """The base and teacher samples (sample.models), judged like the aligned ones into judgments-models."""
    from dalign.config import COMPARED_MODELS

    wanted = [m for m in run.config.sample.models if m in COMPARED_MODELS]
    lacking = [f"samples-{m}" for m in wanted if not run.has(f"samples-{m}")]
    if lacking:
        raise FileNotFoundError(
            f"{', '.join(lacking)} missing in {run.path}: run `dalign run` with the stage(s) "
            f"{', '.join(COMPARED_MODELS[m.removeprefix('samples-')] for m in lacking)} first"
        )
    # Base and teacher were prompted without a think prefix (sample.stage.prompt_format).
    frames = [candidate_status(run.read(f"samples-{m}").assign(model=m), False) for m in wanted]
    run.begin("judge-models", force)
    return _judge(run, "judge-models", pd.concat(frames, ignore_index=True), "judgments-models")


class JudgeWorker:
    """Labels one chunk of (candidate, judge) rows, all of one judge, into one committed shard of judgments.
    Judges are built on first use and kept, so a model judge loads its model once per process (or Ray actor)."""

    artifact = "judgments"

    def __init__(self, run: RunDir):
        self.cfg = run.config.judge
        self.store = run.store(self.artifact)
        self.keys = tuple(self.store.keys)
        self.columns = [c for c in self.keys if c not in COLUMNS] + COLUMNS
        self.fixed = _unfinished_result(self.cfg.unfinished)
        self.cache = JudgmentCache(run.path / "judge-cache")
        self.judges: dict[str, object] = {}

    def _get(self, name: str):
        if name not in self.judges:
            self.judges[name] = None if name == "none" else get_judge(name, self.cfg)
        return self.judges[name]

    def __call__(self, chunk: pd.DataFrame) -> dict:
        (name,) = set(chunk["judge"].astype(str))
        judge = self._get(name)
        rows = list(chunk.itertuples(index=False))
        results = [_preset(r, judge, self.fixed) for r in rows]
        ask = [i for i, res in enumerate(results) if res is None]
        cached, bs = 0, max(1, self.cfg.batch_size)
        for start in range(0, len(ask), bs):
            part = ask[start : start + bs]
            items = [
                {"prompt": rows[i].prompt, "response": rows[i].response, "answer": _answer(rows[i])}
                for i in part
            ]
            verdicts, hits = judge_cached(judge, items, self.cache)
            cached += hits
            for i, v in zip(part, verdicts, strict=True):
                results[i] = v
        out = [
            {
                **({"model": r.model} if "model" in self.keys else {}),
                "benchmark": r.benchmark,
                "prompt_id": str(r.prompt_id),
                "candidate": int(r.candidate),
                "judge": name,
                "label": res["label"],
                "score": res["score"],
                "raw": res["raw"],
                "unfinished": bool(r.unfinished),
            }
            for r, res in zip(rows, results, strict=True)
        ]
        return {"rows": self.store.write(_frame(out, self.columns)), "cached": cached}


class ModelJudgeWorker(JudgeWorker):
    artifact = "judgments-models"


WORKERS = {
    "judgments": "dalign.judge.stage:JudgeWorker",
    "judgments-models": "dalign.judge.stage:ModelJudgeWorker",
}


def _judge(run: RunDir, stage: str, status: pd.DataFrame, artifact: str) -> dict:
    """Label every (candidate, judge) of `status` not yet in `artifact`, one shard per chunk of one judge, on the
    configured execution backend (Ray actors run model judges in parallel); finish the stage."""
    from dalign.execution import execute

    cfg = run.config
    store = run.store(artifact)
    key_cols = list(store.keys)
    retried = retry_errors(store)
    done = {tuple(map(str, k)) for k in store.done_keys()}
    df, warnings = plan(status, cfg.judge.judges)
    keys = zip(*(df[c] for c in key_cols), strict=True)
    todo = df[[tuple(map(str, k)) not in done for k in keys]]
    # Only what a judge reads travels to a worker (not token ids or hidden states).
    todo = todo[[*key_cols, "prompt", "response", "unfinished", *(c for c in ("answer",) if c in todo)]]
    chunks = [
        group.iloc[i : i + SHARD_ROWS]
        for _, group in todo.groupby("judge", sort=True)
        for i in range(0, len(group), SHARD_ROWS)
    ]
    new_rows, cached, workers = 0, 0, set()
    with Progress(
        TextColumn(f"[bold]{stage}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task(stage, total=len(todo))
        for stats in execute(run, WORKERS[artifact], chunks):
            new_rows += stats.get("rows", 0)
            cached += stats.get("cached", 0)
            workers.add(stats["worker"])
            progress.advance(task, stats["items"])
    table = store.read()
    errors = int((table["label"] == "error").sum()) if not table.empty else 0
    by_judge = (
        {j: {lab: int(n) for lab, n in g["label"].value_counts().items()} for j, g in table.groupby("judge")}
        if not table.empty
        else {}
    )
    if errors:
        warnings.append(
            f"{errors} judgments are 'error' (not counted as safe or correct); see the raw column"
        )
    run.finish(
        stage,
        rows=len(table),
        new_rows=new_rows,
        retried_errors=retried,
        cached=cached,
        errors=errors,
        labels=by_judge,
        warnings=warnings,
        workers=sorted(workers),
        backend=cfg.execution.backend,
    )
    return {
        "rows": len(table),
        "new": new_rows,
        "cached": cached,
        "errors": errors,
        "retried_errors": retried,
        "labels": by_judge,
    }


def _preset(row, judge, fixed: dict | None) -> dict | None:
    """A label given without asking the judge (no checker; unfinished under unsafe/error), else None."""
    if judge is None:
        return result("error", None, "no checker for this utility row")
    if fixed is not None and judge.kind == "safety" and row.unfinished:
        return fixed
    return None


def _answer(r) -> str | None:
    a = getattr(r, "answer", None)
    return None if a is None or (isinstance(a, float) and a != a) else str(a)


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    df["score"] = df["score"].astype("float64")
    return df
