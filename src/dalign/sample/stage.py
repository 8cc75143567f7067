"""`dalign sample`: N candidates per benchmark prompt, written in resumable shards to samples.parquet."""

from __future__ import annotations

import time
import warnings

import pandas as pd
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dalign.config import DatasetRef, RunConfig
from dalign.judge import reasoning_closed
from dalign.models.chat import PromptTooLong, prompt_ids
from dalign.models.loading import describe_dtype, load_model
from dalign.models.pair import context_limit, load_pair, pair_tokenizer
from dalign.progress import Progress
from dalign.rundir import ARTIFACT_KEYS, RunDir, adapter_dir
from dalign.sample.sampler import derive_seed, sample_batch


def benchmark_rows(cfg: RunConfig) -> pd.DataFrame:
    """All prompts of all configured datasets, one row each, with benchmark/role/kind/checker columns."""
    from dalign.data import DATASETS, load_dataset

    if not cfg.sample.datasets:
        raise ValueError(
            "sample.datasets is empty: add at least one, e.g.\n  sample:\n    datasets:\n"
            "      - {name: advbench, limit: 20}\n(`dalign datasets` lists them)"
        )
    frames, seen = [], {}
    for ref in cfg.sample.datasets:
        label = ref.label
        if label in seen:
            raise ValueError(
                f"two sample.datasets entries share the benchmark name {label!r}; give one a distinct `benchmark:` "
                "(e.g. advbench-calibration for a calibration split)"
            )
        seen[label] = ref
        df = load_dataset(ref)
        df["benchmark"] = label
        df["role"] = ref.role
        df["checker"] = _checker(ref, DATASETS)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _checker(ref: DatasetRef, registry) -> str | None:
    if ref.name == "file":
        return "number" if ref.answer_field else None
    return registry.info[ref.name].get("checker")


def behaviours(rows: pd.DataFrame) -> pd.Series:
    """The harmful request each prompt carries: the embedded question of a composed prompt (DAN), else the prompt."""
    if "question" not in rows.columns:
        return rows["prompt"].astype(str)
    return rows["question"].where(rows["question"].notna(), rows["prompt"]).astype(str)


def drop_calibration_leaks(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int], list[str]]:
    """Drop calibration prompts that share a behaviour with any evaluation prompt, across all datasets.

    Overlap = equal after normalisation, or one text contains the other (dedup.find_contained): an AdvBench
    calibration prompt embedded in a DAN evaluation prompt counts. Returns (rows, dropped per benchmark, warnings);
    a calibration benchmark left empty is an error.
    """
    from dalign.data.dedup import find_contained

    cal = (rows["role"] == "calibration").to_numpy()
    if not cal.any():
        return rows, {}, []
    cal_rows, eval_rows = rows[cal], rows[~cal]
    hits = find_contained(cal_rows["prompt"].tolist(), behaviours(eval_rows).tolist())
    leaked = sorted({h.index_a for h in hits})
    dropped = cal_rows.iloc[leaked]["benchmark"].value_counts().to_dict()
    left = cal_rows.drop(index=cal_rows.index[leaked])
    empty = sorted(set(cal_rows["benchmark"]) - set(left["benchmark"]))
    if empty:
        raise ValueError(
            f"calibration split(s) {empty} are empty once prompts sharing a behaviour with an evaluation prompt are "
            f"dropped ({sum(dropped.values())} dropped); choose another offset/limit or dataset for calibration"
        )
    warnings = []
    if leaked:
        ex = hits[0]
        warnings.append(
            f"{len(leaked)} calibration prompt(s) dropped: they share a behaviour with an evaluation prompt "
            f"({', '.join(f'{b}: {n}' for b, n in sorted(dropped.items()))}; e.g. {ex.text[:80]!r})"
        )
    return pd.concat([eval_rows, left]).sort_index(), {str(k): int(v) for k, v in dropped.items()}, warnings


def batches(work: list[dict], rows: int, tokens: int) -> list[list[dict]]:
    """Consecutive work items in batches of at most `rows` items and `tokens` padded tokens (rows x (longest
    prompt + largest budget)); an item alone over `tokens` still gets a batch of its own. A batch ends before a
    prompt's candidates rather than among them when it holds other prompts too, so each prompt's prefill runs
    once (`sample.share_prompt`)."""
    out: list[list[dict]] = []
    batch: list[dict] = []

    def full(batch: list[dict], size: int) -> bool:
        width = max((len(b["prompt_token_ids"]) + b["max_new_tokens"] for b in batch), default=0)
        return bool(batch) and (len(batch) == rows or (len(batch) + 1) * max(width, size) > tokens)

    for w in work:
        size = len(w["prompt_token_ids"]) + w["max_new_tokens"]
        if full(batch, size):
            cut = len(batch)
            while cut and batch[cut - 1]["prompt_token_ids"] == w["prompt_token_ids"]:
                cut -= 1
            cut = cut or len(batch)  # one prompt's candidates alone over the bounds: split them
            out.append(batch[:cut])
            batch = batch[cut:]
            if full(batch, size):
                out.append(batch)
                batch = []
        batch.append(w)
    return out + ([batch] if batch else [])


def _prune(store, rows: pd.DataFrame, n: int) -> int:
    """Drop sample rows no longer requested (a dataset removed, a smaller n, a prompt whose text changed)."""
    if not store.files():
        return 0
    have = store.read()
    keys = zip(rows["benchmark"], rows["prompt_id"].astype(str), strict=True)
    want = dict(zip(keys, rows["prompt"], strict=True))
    keep = [
        want.get((b, str(p))) == text and int(c) < n
        for b, p, c, text in zip(
            have["benchmark"], have["prompt_id"], have["candidate"], have["prompt"], strict=True
        )
    ]
    if all(keep):
        return 0
    store.replace(have[keep])
    return len(have) - sum(keep)


def sample_row(
    item,
    token_ids: list[int],
    finish_reason: str,
    response: str,
    *,
    think_prefix: bool,
    token_ids_source: str = "generated",
) -> dict:
    """One samples.parquet row from a planned work item and its generation (shared by every sampling backend).

    `token_ids_source`: generated (HF sampling), server (ids reported by the server) or retokenized (re-encoded
    from the server's text, may differ from what it generated; see sample/openai_backend.py).

    `finished`: generation ended with a stop token; `reasoning_closed`: a final answer exists (see
    dalign.judge.reasoning_closed). The judge stage treats a candidate lacking either as unfinished.
    """
    return {
        "benchmark": item.benchmark,
        "prompt_id": item.prompt_id,
        "candidate": int(item.candidate),
        "prompt": item.prompt,
        "response": response,
        "token_ids": list(token_ids),
        "token_ids_source": token_ids_source,
        "prompt_token_ids": [int(t) for t in item.prompt_token_ids],
        "finish_reason": finish_reason,
        "finished": finish_reason == "stop",
        "reasoning_closed": reasoning_closed(response, think_prefix),
        "n_tokens": len(token_ids),
        "seed": int(item.seed),
        "category": item.category,
        "source": item.source,
        "role": item.role,
        "kind": item.kind,
        "checker": item.checker,
        "answer": item.answer,
    }


class SampleWorker:
    """HF backend: loads the aligned model once; samples one chunk of work items into one committed shard."""

    artifact = "samples"
    keys = tuple(ARTIFACT_KEYS[artifact])
    model_name = "aligned"

    def __init__(self, run: RunDir):
        self.cfg = run.config.sample
        self.think_prefix = prompt_format(run, self.model_name)[1]
        self.model, self.tokenizer = self.load(run)
        self.store = run.store(self.artifact)

    def load(self, run: RunDir):
        pair = load_pair(run.config.model, adapter_dir(run))
        if self.cfg.merge_adapter and hasattr(pair.model, "merge_and_unload"):
            # no LoRA matmuls and fp32 casts at every step; scoring keeps the unmerged pair (it needs the base)
            return pair.model.merge_and_unload(), pair.tokenizer
        return pair.model, pair.tokenizer

    def __call__(self, chunk: pd.DataFrame) -> dict:
        sc, tok = self.cfg, self.tokenizer
        gens = sample_batch(
            self.model,
            tok,
            [[int(t) for t in ids] for ids in chunk["prompt_token_ids"]],
            [int(s) for s in chunk["seed"]],
            temperature=sc.temperature,
            top_p=sc.top_p,
            repetition_penalty=sc.repetition_penalty,
            max_new_tokens=[int(b) for b in chunk["max_new_tokens"]],
            capture_layers=sc.capture_layers,
            share_prompt=sc.share_prompt,
        )
        out = []
        for item, g in zip(chunk.itertuples(index=False), gens, strict=True):
            text = tok.decode(g.token_ids, skip_special_tokens=True)
            row = sample_row(item, g.token_ids, g.finish_reason, text, think_prefix=self.think_prefix)
            for layer, h in g.hidden.items():
                row[f"hidden_l{layer}"] = h.tolist()
            if self.model_name != "aligned":
                row["model"] = self.model_name
            out.append(row)
        return {"rows": self.store.write(out), "tokens": sum(len(g.token_ids) for g in gens)}


class BaseSampleWorker(SampleWorker):
    """The student without its adapter (or model.base, a separate checkpoint), in its own chat format."""

    artifact = "samples-base"
    model_name = "base"

    def load(self, run: RunDir):
        m = model_config(run, self.model_name)
        return load_model(m.student, m.dtype, m.device, m.trust_remote_code)


class TeacherSampleWorker(BaseSampleWorker):
    """The teacher model (teach.teacher), answering the benchmark prompts without the spec."""

    artifact = "samples-teacher"
    model_name = "teacher"


WORKERS = {
    "hf": "dalign.sample.stage:SampleWorker",
    "openai": "dalign.sample.openai_backend:OpenAISampleWorker",
    "base": "dalign.sample.stage:BaseSampleWorker",
    "teacher": "dalign.sample.stage:TeacherSampleWorker",
    "teacher-openai": "dalign.sample.openai_backend:OpenAITeacherSampleWorker",
}


def prompt_format(run: RunDir, model: str) -> tuple[str | None, bool]:
    """(system prompt, think prefix) a model is prompted with. The aligned student gets the run's; the base and
    the teacher get their plain chat format: a `<think>` prefix would only confuse a model not trained on it, and
    the teacher answers as itself (its template adds what a reasoning model needs)."""
    m = run.config.model
    if model == "aligned":
        return m.system_prompt, m.think_prefix
    return (m.system_prompt if model == "base" else None), False


def model_config(run: RunDir, model: str):
    """The ModelConfig a model of the run loads with: base and teacher as a plain student, no adapter."""
    m = run.config.model
    if model == "aligned":
        return m
    spec = (m.base or m.student) if model == "base" else run.config.teach.teacher
    return m.model_copy(update={"student": spec, "adapter": None, "base": None})


def run_sample(run: RunDir, force: bool = False) -> dict:
    return _sample(run, "sample", "aligned", force)


def run_sample_base(run: RunDir, force: bool = False) -> dict:
    return _sample(run, "sample-base", "base", force)


def run_sample_teacher(run: RunDir, force: bool = False) -> dict:
    teacher = run.config.teach.teacher
    if teacher == "corpus":
        raise ValueError(
            "sample.models lists teacher, but teach.teacher is 'corpus': only a teacher model (hf:<id|dir>, "
            "packaged:<name> or openai:<model>) can be sampled; drop teacher from sample.models"
        )
    return _sample(run, "sample-teacher", "teacher", force)


def _remote(run: RunDir, model: str) -> bool:
    """A teacher behind a server: sampled by chat requests, with no local tokenizer."""
    return model == "teacher" and run.config.teach.teacher.startswith("openai:")


def _sample(run: RunDir, stage: str, model: str, force: bool) -> dict:
    """Plan the missing (prompt, candidate) items of `model` and sample them into the stage's artifact."""
    from dalign.execution import execute

    cfg = run.config
    sc = cfg.sample
    artifact = "samples" if model == "aligned" else f"samples-{model}"
    remote = _remote(run, model)
    worker = WORKERS["teacher-openai" if remote else sc.backend if model == "aligned" else model]
    system, think = prompt_format(run, model)
    rows, leaks, notes = drop_calibration_leaks(benchmark_rows(cfg))
    mc = model_config(run, model)
    tok, limit = (
        (None, None)
        if remote
        else (pair_tokenizer(mc, adapter_dir(run) if model == "aligned" else None), context_limit(mc))
    )
    run.begin(stage, force)
    store = run.store(artifact)
    pruned = _prune(store, rows, sc.n)
    done = store.done_keys()

    budgets = {d.label: d.max_new_tokens or sc.max_new_tokens for d in sc.datasets}
    max_prompt = None if limit is None else limit - max([sc.max_new_tokens, *budgets.values()])

    # One work item per (prompt, candidate) still missing; prompts are tokenized once.
    work, truncated = [], 0
    for r in rows.itertuples(index=False):
        todo = [c for c in range(sc.n) if (r.benchmark, r.prompt_id, c) not in done]
        if not todo:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTooLong)
            # a remote teacher gets the text and applies its own template: no ids here
            ids, cut = ([], False) if remote else prompt_ids(tok, r.prompt, system, think, max_prompt)
        truncated += cut
        if cut:
            warnings.warn(f"{r.benchmark}/{r.prompt_id}: {caught[0].message}", PromptTooLong, stacklevel=1)
        for c in todo:
            work.append(
                {
                    "benchmark": r.benchmark,
                    "prompt_id": r.prompt_id,
                    "candidate": c,
                    "prompt": r.prompt,
                    "prompt_token_ids": ids,
                    "seed": derive_seed(sc.seed, r.benchmark, r.prompt_id, c),
                    "max_new_tokens": budgets.get(r.benchmark, sc.max_new_tokens),
                    "category": r.category,
                    "source": r.source,
                    "role": r.role,
                    "kind": r.kind,
                    "checker": r.checker,
                    "answer": None if pd.isna(r.answer) else str(r.answer),
                }
            )
    # Length bucketing: neighbours in a batch have similar prompt lengths, so little padding.
    work.sort(key=lambda w: (len(w["prompt_token_ids"]), w["benchmark"], w["prompt_id"], w["candidate"]))
    # One chunk = one generation batch = one shard, on every execution backend.
    chunks = [pd.DataFrame(c) for c in batches(work, sc.batch_size, sc.batch_tokens)]

    written, new_tokens, workers, busy, t0 = 0, 0, set(), 0.0, time.perf_counter()
    columns = [
        TextColumn(f"[bold]{stage}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(stage, total=len(work), tps=0.0)
        for stats in execute(run, worker, chunks):
            written += stats.get("rows", 0)
            new_tokens += stats.get("tokens", 0)
            workers.add(stats["worker"])
            busy += stats["seconds"]
            bar.update(task, advance=stats["items"], tps=new_tokens / (time.perf_counter() - t0))

    total = len(store.done_keys())
    run.finish(
        stage,
        rows=total,
        new_rows=written,
        pruned_rows=pruned,
        calibration_overlaps_dropped=leaks,
        warnings=notes,
        truncated_prompts=truncated,
        benchmarks=sorted(rows["benchmark"].unique()),
        seconds=round(time.perf_counter() - t0, 1),
        tokens_per_s=round(new_tokens / max(time.perf_counter() - t0, 1e-9), 1),
        dtype=describe_dtype(cfg.model.dtype, cfg.model.device),
        adapter_merged=bool(
            model == "aligned" and sc.backend == "hf" and sc.merge_adapter and adapter_dir(run) is not None
        ),
        backend=f"{sc.backend if model == 'aligned' else 'openai' if remote else 'hf'}/{cfg.execution.backend}",
        workers=sorted(workers),
        worker_seconds=round(busy, 2),
    )
    return {"rows": total, "new": written, "truncated_prompts": truncated}
