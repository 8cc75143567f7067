"""Stages `teach` (prompts -> traces.parquet) and `filter` (traces -> filtered.parquet, judged and kept/rejected).

Both write shards keyed by prompt_id and skip ids already done, so an interrupted run (a dead endpoint, Ctrl-C)
resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd

from dalign.config import RunConfig
from dalign.progress import Progress
from dalign.rundir import RunDir, file_hash
from dalign.teach.corpus import corpus_hash, load_corpus
from dalign.teach.parse import parse_trace
from dalign.teach.spec import (
    DEFAULT_SPEC,
    DEFAULT_TEMPLATE,
    Spec,
    load_spec,
    render_teacher_prompt,
    resolve_categories,
)
from dalign.teach.teachers import TeachRequest, get_teacher

# Judges that only detect refusals: on a benign request their "unsafe" means "answered", which is what we want.
REFUSAL_JUDGES = {"refusal"}
STAR41K = "UCSC-VLAA/STAR-41K"


class PromptFileError(ValueError):
    pass


def load_prompts(source: str, limit: int | None = None) -> pd.DataFrame:
    """Prompts for a teacher: a CSV/JSONL file or hf:<dataset id> -> prompt_id, prompt, category (raw labels)."""
    if source.startswith("hf:"):
        import datasets

        name = source[3:]
        ds = datasets.load_dataset(name, split="train")
        df = ds.to_pandas()
        prefix = "star" if name == STAR41K else Path(name).name
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise PromptFileError(f"prompt file {path} does not exist (teach.prompts)")
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path)
        elif path.suffix.lower() in (".jsonl", ".json"):
            df = pd.read_json(path, lines=path.suffix.lower() == ".jsonl")
        else:
            raise PromptFileError(f"prompt file {path}: use .csv or .jsonl (got {path.suffix!r})")
        prefix = "p"
    text_col = next((c for c in ("prompt", "question", "instruction") if c in df.columns), None)
    if text_col is None:
        raise PromptFileError(
            f"{source}: no prompt column (looked for prompt, question, instruction); columns are {list(df.columns)}"
        )
    id_col = next((c for c in ("prompt_id", "id") if c in df.columns), None)
    ids = df[id_col].astype(str) if id_col else pd.Series([f"{prefix}-{i:06d}" for i in range(len(df))])
    out = pd.DataFrame(
        {
            "prompt_id": ids.to_numpy(),
            "prompt": df[text_col].astype(str).to_numpy(),
            "category": df["category"].to_numpy() if "category" in df.columns else None,
        }
    )
    empty = out["prompt"].str.strip() == ""
    if empty.any():
        raise PromptFileError(f"{source}: empty prompt in data row {int(empty.to_numpy().argmax()) + 1}")
    if out["prompt_id"].duplicated().any():
        raise PromptFileError(
            f"{source}: duplicate prompt id {out.loc[out['prompt_id'].duplicated(), 'prompt_id'].iloc[0]!r}"
        )
    return out.head(limit) if limit is not None else out


def build_requests(
    spec: Spec, prompts: pd.DataFrame, render: bool = True
) -> tuple[list[TeachRequest], list[str]]:
    """Resolve categories and render teacher prompts; returns (requests, warnings)."""
    requests, defaulted = [], []
    for row in prompts.itertuples(index=False):
        try:
            cats, used_default = resolve_categories(spec, row.category)
        except ValueError as e:
            raise type(e)(f"prompt {row.prompt_id!r}: {e}") from None
        if used_default:
            defaulted.append(row.prompt_id)
        text = render_teacher_prompt(spec, row.prompt, cats) if render else ""
        requests.append(TeachRequest(row.prompt_id, row.prompt, ",".join(cats), text))
    warnings = []
    if defaulted:
        sec = spec.section(spec.default_category)
        warnings.append(
            f"{len(defaulted)} prompt(s) have no category (e.g. {defaulted[:3]}); they get the spec's default "
            f"category {spec.default_category!r} (policy section {sec.number})"
        )
    return requests, warnings


def _teach_inputs(cfg: RunConfig, spec: Spec) -> tuple[pd.DataFrame, list[str]]:
    if cfg.teach.teacher == "corpus":
        corpus = load_corpus(spec=spec)
        df = corpus.rename(columns={"id": "prompt_id"})[["prompt_id", "prompt", "category"]]
        notes = []
        if cfg.teach.prompts:
            notes.append(
                f"teach.prompts={cfg.teach.prompts!r} ignored: the corpus teacher answers its own prompts"
            )
        return (df.head(cfg.teach.limit) if cfg.teach.limit is not None else df), notes
    if not cfg.teach.prompts:
        raise PromptFileError(
            f"teacher {cfg.teach.teacher!r} needs prompts: set teach.prompts to a CSV/JSONL file or hf:{STAR41K}"
        )
    return load_prompts(cfg.teach.prompts, cfg.teach.limit), []


def teach_files(run: RunDir) -> dict:
    """Identity of the files behind the traces (pipeline.PIPELINE["teach"].extra): the config only names them."""
    cfg = run.config
    spec_path = Path(cfg.teach.spec) if cfg.teach.spec else DEFAULT_SPEC
    out = {"spec_hash": file_hash(spec_path), "template_hash": file_hash(DEFAULT_TEMPLATE)}
    if cfg.teach.teacher == "corpus":
        out["corpus_hash"] = corpus_hash(load_corpus(spec=load_spec(spec_path)))
    return out


def run_teach(run: RunDir, force: bool = False) -> dict:
    """prompts (+categories) -> traces.parquet (prompt_id, prompt, category, cot, answer, teacher, raw, malformed)."""
    cfg = run.config
    spec_path = Path(cfg.teach.spec) if cfg.teach.spec else DEFAULT_SPEC
    spec = load_spec(spec_path)
    prompts, warnings = _teach_inputs(cfg, spec)
    run.begin("teach", force)
    store = run.store("traces")
    done = {k[0] for k in store.done_keys()}
    todo = prompts[~prompts["prompt_id"].isin(done)]
    requests, more = build_requests(spec, todo, render=cfg.teach.teacher != "corpus")
    warnings += more
    new, workers = 0, set()
    with Progress(transient=True) as bar:
        task = bar.add_task(f"teach ({cfg.teach.teacher})", total=len(requests))
        if cfg.teach.teacher == "corpus":  # no model: copying the shipped traces needs no workers
            teacher = get_teacher(cfg.teach.teacher, cfg.teach, cfg.model)
            for rows in teacher.run(requests):
                new += store.write(rows)
                bar.advance(task, len(rows))
        else:  # a model teacher on the execution backend (Ray actors each load it once)
            from dalign.execution import execute

            work = pd.DataFrame([asdict(r) for r in requests])
            size = max(1, cfg.teach.batch_size)
            chunks = [work.iloc[i : i + size] for i in range(0, len(work), size)]
            for stats in execute(run, "dalign.teach.stage:TeachWorker", chunks):
                new += stats["rows"]
                workers.add(stats["worker"])
                bar.advance(task, stats["items"])
    traces = store.read()
    malformed = int(traces["malformed"].sum()) if len(traces) else 0
    if malformed:
        warnings.append(f"{malformed} malformed trace(s) (no final answer): recorded, kept out of training")
    run.finish(
        "teach", rows=len(traces), new=new, malformed=malformed, warnings=warnings, workers=sorted(workers)
    )
    return {"traces": len(traces), "new": new, "malformed": malformed, "teacher": cfg.teach.teacher}


class TeachWorker:
    """A model teacher loaded once per process (or Ray actor); one chunk of requests -> one shard of traces.
    Each chunk seeds torch from its first prompt id, so sampled traces do not depend on which worker ran it."""

    artifact = "traces"
    keys = ("prompt_id",)

    def __init__(self, run: RunDir):
        cfg = run.config
        self.teacher = get_teacher(cfg.teach.teacher, cfg.teach, cfg.model)
        self.store = run.store(self.artifact)

    def __call__(self, chunk: pd.DataFrame) -> dict:
        import torch

        from dalign.sample.sampler import derive_seed

        torch.manual_seed(derive_seed(0, "teach", str(chunk["prompt_id"].iloc[0])))
        requests = [TeachRequest(**r) for r in chunk.to_dict("records")]
        return {"rows": sum(self.store.write(rows) for rows in self.teacher.run(requests))}


NO_FILTER = "none"  # filter.judge value that keeps every well-formed trace (a curated corpus)


def decide(
    row: dict, verdict: dict | None, judge_name: str, benign: str, keep_malformed: bool
) -> tuple[bool, str]:
    """kept, reason for one trace. A judge error is never read as safe."""
    if row["malformed"]:
        why = parse_trace(row["raw"]).reason or "no final answer"
        return keep_malformed, f"malformed: {why}"
    if judge_name == NO_FILTER:
        return True, "not filtered"
    label = verdict["label"]
    if label == "safe":
        return True, f"{judge_name}: safe"
    if label == "error":
        return False, f"{judge_name} error: {str(verdict.get('raw', ''))[:200]}"
    if judge_name in REFUSAL_JUDGES and row["category"] == benign:
        return True, f"{judge_name}: answered a benign request (this judge only detects refusals)"
    return False, f"{judge_name}: {label}"


def run_filter(run: RunDir, force: bool = False) -> dict:
    """traces -> filtered.parquet: every trace with the judge's label/score, kept (bool) and reason."""
    from dalign.judge import get_judge

    cfg = run.config
    traces = run.read("traces")
    jcfg = cfg.judge  # model, thresholds, batch size; the judge itself is filter.judge
    spec = load_spec(cfg.teach.spec)
    skip = cfg.filter.judge == NO_FILTER
    if skip and not cfg.filter.reason:
        raise ValueError(
            "filter.judge is 'none' but filter.reason is empty: say why the traces need no filtering "
            "(e.g. 'curated corpus'); it is recorded in the manifest"
        )
    run.begin("filter", force)

    store = run.store("filtered")
    done = {k[0] for k in store.done_keys()}
    todo = traces[~traces["prompt_id"].isin(done)].to_dict("records")
    judge = None if skip else get_judge(cfg.filter.judge, jcfg)
    size = max(1, jcfg.batch_size)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"filter ({cfg.filter.judge})", total=len(todo))
        for i in range(0, len(todo), size):
            batch = todo[i : i + size]
            well = [r for r in batch if not r["malformed"]]
            # The guard sees what the user would see: the prompt and the final answer, not the reasoning.
            items = [{"prompt": r["prompt"], "response": r["answer"], "answer": r["answer"]} for r in well]
            verdicts = [None] * len(well) if skip else judge.judge(items)
            if len(verdicts) != len(well):
                raise RuntimeError(
                    f"judge {cfg.filter.judge!r} returned {len(verdicts)} verdicts for {len(well)} items"
                )
            by_id = {r["prompt_id"]: v for r, v in zip(well, verdicts, strict=True)}
            rows = []
            for r in batch:
                v = by_id.get(r["prompt_id"])
                kept, reason = decide(
                    r, v, cfg.filter.judge, spec.default_category, cfg.filter.keep_malformed
                )
                label = v["label"] if v else None
                score = v.get("score") if v else None
                rows.append({**r, "label": label, "score": score, "kept": kept, "reason": reason})
            store.write(rows)
            bar.advance(task, len(batch))
    out = store.read()
    kept = int(out["kept"].sum())
    summary = {
        "traces": len(out),
        "kept": kept,
        "malformed": int(out["malformed"].sum()),
        "rejected_by_judge": int(((~out["kept"]) & (~out["malformed"])).sum()),
        "judge_errors": int((out["label"] == "error").sum()),
    }
    if skip:
        summary["not_filtered"] = cfg.filter.reason
    warnings = [] if kept else ["no trace was kept: SFT has nothing to train on (see the reason column)"]
    run.finish(
        "filter", rows=len(out), warnings=warnings, **{k: v for k, v in summary.items() if k != "traces"}
    )
    return summary
