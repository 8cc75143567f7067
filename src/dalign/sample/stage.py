"""`dalign sample`: N candidates per benchmark prompt, written in resumable shards to samples.parquet."""

from __future__ import annotations

import time
import warnings

import pandas as pd
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dalign.config import DatasetRef, RunConfig
from dalign.models.chat import PromptTooLong, prompt_ids
from dalign.models.pair import load_pair
from dalign.rundir import RunDir, adapter_dir, adapter_fingerprint, fingerprint
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
    rows = pd.concat(frames, ignore_index=True)
    _check_disjoint(rows, cfg.sample.datasets)
    return rows


def _checker(ref: DatasetRef, registry) -> str | None:
    if ref.name == "file":
        return "number" if ref.answer_field else None
    return registry.info[ref.name].get("checker")


def _check_disjoint(rows: pd.DataFrame, refs: list[DatasetRef]) -> None:
    """A calibration split must not share prompts with the evaluation split of the same dataset."""
    for name in {r.name for r in refs}:
        sub = rows[rows["benchmark"].isin([r.label for r in refs if r.name == name])]
        cal = set(sub.loc[sub["role"] == "calibration", "prompt"])
        ev = set(sub.loc[sub["role"] == "eval", "prompt"])
        if cal & ev:
            raise ValueError(
                f"dataset {name!r}: {len(cal & ev)} prompts are in both the calibration and the eval split; "
                "use disjoint offset/limit ranges with the same seed"
            )


def sample_fingerprint(run: RunDir) -> dict:
    fp = fingerprint(run.config, {"model": None, "sample": ["batch_size"]})
    fp["adapter"] = adapter_fingerprint(adapter_dir(run))
    return fp


def run_sample(run: RunDir, force: bool = False) -> dict:
    cfg = run.config
    sc = cfg.sample
    rows = benchmark_rows(cfg)
    run.begin("sample", sample_fingerprint(run), ["samples"], force)
    store = run.store("samples")
    done = store.done_keys()

    pair = load_pair(cfg.model, adapter_dir(run))
    model, tok = pair.model, pair.tokenizer
    limit = cfg.model.max_context or getattr(model.config, "max_position_embeddings", None)
    max_prompt = None if limit is None else limit - sc.max_new_tokens

    # One work item per (prompt, candidate) still missing; prompts are tokenized once.
    work, truncated = [], 0
    for r in rows.itertuples(index=False):
        todo = [c for c in range(sc.n) if (r.benchmark, r.prompt_id, c) not in done]
        if not todo:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTooLong)
            ids, cut = prompt_ids(tok, r.prompt, cfg.model.system_prompt, cfg.model.think_prefix, max_prompt)
        truncated += cut
        if cut:
            warnings.warn(f"{r.benchmark}/{r.prompt_id}: {caught[0].message}", PromptTooLong, stacklevel=1)
        for c in todo:
            work.append((r, c, ids))
    # Length bucketing: neighbours in a batch have similar prompt lengths, so little padding.
    work.sort(key=lambda w: (len(w[2]), w[0].benchmark, w[0].prompt_id, w[1]))

    written, new_tokens, t0 = 0, 0, time.perf_counter()
    columns = [
        TextColumn("[bold]sample"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("sample", total=len(work), tps=0.0)
        for start in range(0, len(work), sc.batch_size):
            batch = work[start : start + sc.batch_size]
            seeds = [derive_seed(sc.seed, r.benchmark, r.prompt_id, c) for r, c, _ in batch]
            gens = sample_batch(
                model,
                tok,
                [ids for _, _, ids in batch],
                seeds,
                temperature=sc.temperature,
                top_p=sc.top_p,
                repetition_penalty=sc.repetition_penalty,
                max_new_tokens=sc.max_new_tokens,
                capture_layers=sc.capture_layers,
            )
            out = []
            for (r, c, ids), seed, g in zip(batch, seeds, gens, strict=True):
                row = {
                    "benchmark": r.benchmark,
                    "prompt_id": r.prompt_id,
                    "candidate": c,
                    "prompt": r.prompt,
                    "response": tok.decode(g.token_ids, skip_special_tokens=True),
                    "token_ids": g.token_ids,
                    "prompt_token_ids": ids,
                    "finish_reason": g.finish_reason,
                    "n_tokens": len(g.token_ids),
                    "seed": seed,
                    "category": r.category,
                    "source": r.source,
                    "role": r.role,
                    "kind": r.kind,
                    "checker": r.checker,
                    "answer": None if pd.isna(r.answer) else str(r.answer),
                }
                for layer, h in g.hidden.items():
                    row[f"hidden_l{layer}"] = h.tolist()
                out.append(row)
                new_tokens += len(g.token_ids)
            written += store.write(out)
            bar.update(task, advance=len(batch), tps=new_tokens / (time.perf_counter() - t0))

    total = len(store.done_keys())
    run.finish(
        "sample",
        rows=total,
        new_rows=written,
        truncated_prompts=truncated,
        benchmarks=sorted(rows["benchmark"].unique()),
        seconds=round(time.perf_counter() - t0, 1),
        tokens_per_s=round(new_tokens / max(time.perf_counter() - t0, 1e-9), 1),
    )
    return {"rows": total, "new": written, "truncated_prompts": truncated}
