"""`dalign score`: every configured metric for every candidate in samples.parquet, written to scores.parquet.

Resumable: a shard holds all metric columns of whole (benchmark, prompt_id) groups, so a candidate present in
scores.parquet is complete, and a rerun skips it. Default input is the sampler's token ids (no re-tokenisation
drift); `score.retokenize` reproduces the paper's decode/re-template round-trip. When samples carry
`hidden_l{l}` columns (captured while sampling) and ids are not re-tokenized, the aligned pass is skipped for
those layers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dalign.models.loading import describe_dtype
from dalign.rundir import RunDir, adapter_dir
from dalign.score.engine import ScoreEngine, ScoreError, ScoreRow, retokenize

SAMPLE_KEYS = ["benchmark", "prompt_id", "candidate"]
REQUIRED = [*SAMPLE_KEYS, "prompt", "token_ids"]
CHUNK_BATCHES = 8  # engine batches per shard: bounds lost work on a kill without tiny shards


def validate(cfg) -> list[int]:
    """Metrics registered and layers within the model's depth, checked before anything is deleted or loaded."""
    from dalign.models.pair import model_depth
    from dalign.score.engine import resolve_layers
    from dalign.score.metrics import METRICS

    unknown = [m for m in cfg.score.metrics if m not in METRICS]
    if unknown:
        raise ScoreError(
            f"score.metrics: unknown metric(s) {unknown}; registered: {', '.join(sorted(METRICS))}"
        )
    return resolve_layers(cfg.score.layers, model_depth(cfg.model))


def _rows(df: pd.DataFrame, tokenizer, cfg) -> list[ScoreRow]:
    """ScoreRows from sample rows: generated ids as they are, or the paper's round-trip with `retokenize`."""
    from dalign.models.chat import prompt_ids

    rows = []
    has_pids = "prompt_token_ids" in df.columns
    for rec in df.itertuples(index=False):
        key = (rec.benchmark, rec.prompt_id, int(rec.candidate))
        resp = [] if rec.token_ids is None else [int(t) for t in rec.token_ids]
        pids = getattr(rec, "prompt_token_ids", None) if has_pids else None
        if cfg.score.retokenize:
            if not isinstance(rec.prompt, str) or not rec.prompt:
                raise ScoreError(f"samples row {key}: empty prompt text; --retokenize needs the prompt")
            p, r = retokenize(tokenizer, rec.prompt, resp, cfg.model.system_prompt, cfg.model.think_prefix)
        elif pids is not None and len(pids):
            p, r = [int(t) for t in pids], resp
        elif isinstance(rec.prompt, str) and rec.prompt:
            # Older samples without prompt ids: rebuild them the way the sampler formats prompts.
            p, _ = prompt_ids(tokenizer, rec.prompt, cfg.model.system_prompt, cfg.model.think_prefix)
            r = resp
        else:
            raise ScoreError(
                f"samples row {key} has no prompt (neither prompt_token_ids nor prompt text); a candidate can only "
                f"be scored together with its prompt — rerun `dalign sample` for it"
            )
        rows.append(ScoreRow(p, r, key))
    return rows


def _captured(df: pd.DataFrame, layers: list[int]) -> dict[int, torch.Tensor]:
    """hidden_l{l} columns present for every row of this chunk -> {l: [B, H] float32}."""
    out = {}
    for layer in layers:
        col = f"hidden_l{layer}"
        if col in df.columns and df[col].notna().all():
            out[layer] = torch.tensor(np.stack([np.asarray(v, dtype=np.float32) for v in df[col]]))
    return out


def _long(df: pd.DataFrame, values: dict) -> pd.DataFrame:
    parts = []
    for (metric, layer), vals in values.items():
        part = df[SAMPLE_KEYS].copy()
        part["metric"] = metric
        part["layer"] = pd.array([layer] * len(df), dtype="Int64")
        part["value"] = vals.astype("float64")
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


class ScoreWorker:
    """Loads the aligned/base pair once; scores one chunk of whole prompt groups into one committed shard."""

    artifact = "scores"
    keys = tuple(SAMPLE_KEYS)

    def __init__(self, run: RunDir):
        from dalign.models import load_pair

        self.cfg = run.config
        self.pair = load_pair(self.cfg.model, adapter_dir(run))
        sc = self.cfg.score
        self.engine = ScoreEngine(
            self.pair, sc.metrics, sc.layers, sc.batch_size, sc.share_prompt, seed=sc.seed, paired=sc.paired
        )
        self.store = run.store(self.artifact)

    def __call__(self, chunk: pd.DataFrame) -> dict:
        rows = _rows(chunk, self.pair.tokenizer, self.cfg)
        captured = {} if self.cfg.score.retokenize else _captured(chunk, self.engine.layers)
        values = self.engine.score(rows, captured or None)
        return {"rows": self.store.write(_long(chunk, values))}


def run_score(run: RunDir, force: bool = False) -> dict:
    """Stage contract (pipeline.py): read samples, write scores shards, resumable; returns a console summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from dalign.execution import execute
    from dalign.progress import Progress

    cfg = run.config
    layers = validate(cfg)
    samples = run.read("samples")
    missing = [c for c in REQUIRED if c not in samples.columns]
    if missing:
        raise ScoreError(
            f"{run.store('samples').path} lacks column(s) {missing}; it was made by an older `dalign sample` — "
            f"rerun the sample stage"
        )
    run.begin("score", force)
    samples = samples.assign(
        prompt_id=samples["prompt_id"].astype(str), candidate=samples["candidate"].astype(int)
    )
    store = run.store("scores")
    done = {k[:3] for k in store.done_keys()}
    keys = list(samples[SAMPLE_KEYS].itertuples(index=False, name=None))
    todo = samples[[k not in done for k in keys]]
    warnings: list[str] = []
    written, workers, busy = 0, set(), 0.0
    if not todo.empty:
        hidden_cols = [c for c in todo.columns if c.startswith("hidden_l")]
        if hidden_cols and cfg.score.retokenize:
            warnings.append(
                "captured hidden_l* columns ignored: --retokenize changes the token ids they belong to"
            )
        # Whole prompt groups per shard, so prefix sharing sees all candidates of a prompt together.
        groups = [g for _, g in todo.groupby(["benchmark", "prompt_id"], sort=False)]
        target = cfg.score.batch_size * CHUNK_BATCHES
        chunks, cur, n = [], [], 0
        for g in groups:
            cur.append(g)
            n += len(g)
            if n >= target:
                chunks.append(pd.concat(cur))
                cur, n = [], 0
        if cur:
            chunks.append(pd.concat(cur))
        cols = [TextColumn("score"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*cols, transient=True) as bar:
            task = bar.add_task("score", total=len(todo))
            for stats in execute(run, "dalign.score.stage:ScoreWorker", chunks):
                written += stats.get("rows", 0)
                workers.add(stats["worker"])
                busy += stats["seconds"]
                bar.advance(task, stats["items"])
    total = len(store.done_keys())
    run.finish(
        "score",
        rows=total,
        new_rows=written,
        metrics=list(cfg.score.metrics),
        layers=layers,
        warnings=warnings,
        backend=cfg.execution.backend,
        workers=sorted(workers),
        worker_seconds=round(busy, 2),
        dtype=describe_dtype(cfg.model.dtype, cfg.model.device),
    )
    return {
        "scores": total,
        "new": written,
        "candidates_skipped": len(samples) - len(todo),
        "warnings": warnings,
    }


__all__ = ["run_score", "validate"]
