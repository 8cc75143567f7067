"""`dalign judge`: label every sampled candidate, written in resumable shards to judgments.parquet.

Safety rows (kind == "safety") get the configured judge (judge.judge); utility rows get their dataset's checker
(number / choice / comply). The `judge` column holds the judge's or checker's name, so two safety judges can
label the same rows side by side. Rows already in the store are skipped; verdicts are cached in
<run>/judge-cache by (judge config, prompt, response, answer).
"""

from __future__ import annotations

import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dalign.judge import get_judge
from dalign.judge.cache import JudgmentCache, judge_cached
from dalign.rundir import RunDir, fingerprint

COLUMNS = ["benchmark", "prompt_id", "candidate", "judge", "label", "score", "raw"]
SHARD_ROWS = 256  # rows per written shard: bounds the work lost to a kill


def judge_fingerprint(run: RunDir) -> dict:
    fp = fingerprint(run.config, {"judge": ["batch_size"]})
    # Judgments belong to one set of samples: re-sampling under another config must not keep old labels.
    fp["samples"] = run.stage_entry("sample").get("config_hash")
    return fp


def _key(b, p, c, j) -> tuple:
    return (str(b), str(p), int(c), str(j))


def plan(samples: pd.DataFrame, safety_judge: str) -> tuple[pd.DataFrame, list[str]]:
    """Add the `judge` column each row is labelled by; warn about utility rows without a checker."""
    warnings = []
    df = samples.copy()
    kind = df["kind"] if "kind" in df.columns else pd.Series("safety", index=df.index)
    checker = df["checker"] if "checker" in df.columns else pd.Series(None, index=df.index, dtype=object)
    df["judge"] = [safety_judge if k == "safety" else c for k, c in zip(kind, checker, strict=True)]
    missing = df["judge"].isna()
    if missing.any():
        names = sorted(df.loc[missing, "benchmark"].astype(str).unique())
        warnings.append(
            f"{int(missing.sum())} utility rows of {names} have no checker and are labelled error; "
            "give the dataset answer_field (number checker) or use a registered utility dataset"
        )
    df["judge"] = df["judge"].fillna("none")
    return df, warnings


def run_judge(run: RunDir, force: bool = False) -> dict:
    cfg = run.config
    samples = run.read("samples")
    run.begin("judge", judge_fingerprint(run), ["judgments"], force)
    store = run.store("judgments")
    done = {_key(*k) for k in store.done_keys()}
    df, warnings = plan(samples, cfg.judge.judge)
    cache = JudgmentCache(run.path / "judge-cache")
    keys = zip(df["benchmark"], df["prompt_id"], df["candidate"], df["judge"], strict=True)
    todo = df[[_key(*k) not in done for k in keys]]
    new_rows, cached = 0, 0
    bs = max(1, cfg.judge.batch_size)
    with Progress(
        TextColumn("[bold]judge[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as progress:
        for name, group in todo.groupby("judge", sort=True):
            task = progress.add_task(str(name), total=len(group))
            judge = None if name == "none" else get_judge(str(name), cfg.judge)
            pending: list[dict] = []
            for start in range(0, len(group), bs):
                chunk = group.iloc[start : start + bs]
                items = [
                    {"prompt": r.prompt, "response": r.response, "answer": _answer(r)}
                    for r in chunk.itertuples(index=False)
                ]
                if judge is None:
                    results = [
                        {"label": "error", "score": None, "raw": "no checker for this utility row"}
                    ] * len(items)
                else:
                    results, hits = judge_cached(judge, items, cache)
                    cached += hits
                for r, res in zip(chunk.itertuples(index=False), results, strict=True):
                    pending.append(
                        {
                            "benchmark": r.benchmark,
                            "prompt_id": str(r.prompt_id),
                            "candidate": int(r.candidate),
                            "judge": str(name),
                            "label": res["label"],
                            "score": res["score"],
                            "raw": res["raw"],
                        }
                    )
                if len(pending) >= SHARD_ROWS:
                    new_rows += store.write(_frame(pending))
                    pending = []
                progress.advance(task, len(chunk))
            new_rows += store.write(_frame(pending))
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
        "judge",
        rows=len(table),
        new_rows=new_rows,
        cached=cached,
        errors=errors,
        labels=by_judge,
        warnings=warnings,
    )
    return {"rows": len(table), "new": new_rows, "cached": cached, "errors": errors, "labels": by_judge}


def _answer(r) -> str | None:
    a = getattr(r, "answer", None)
    return None if a is None or (isinstance(a, float) and a != a) else str(a)


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["score"] = df["score"].astype("float64")
    return df
