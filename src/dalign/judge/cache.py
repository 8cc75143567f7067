"""Judgment cache: sha256(judge identity, prompt, response, answer) -> (label, score, raw), as parquet shards.

Re-judging the same pair costs nothing, also across runs that share a cache directory, and duplicate answers
within a batch (common with short outputs) are judged once. `error` results are not cached: they may come
from a passing network failure, and retrying them is the point of a rerun.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dalign.judge import Judge
from dalign.rundir import ShardStore


def cache_key(judge: Judge, item: dict) -> str:
    blob = json.dumps(
        {
            "judge": judge.identity(),
            "prompt": item.get("prompt") or "",
            "response": item.get("response") or "",
            "answer": None if item.get("answer") is None else str(item.get("answer")),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgmentCache:
    def __init__(self, path: str | Path):
        self.store = ShardStore(Path(path), ["key"])
        df = self.store.read()
        self._mem: dict[str, dict] = {}
        if not df.empty:
            for r in df.itertuples(index=False):
                score = None if r.score is None or r.score != r.score else float(r.score)  # NaN -> None
                self._mem[r.key] = {"label": r.label, "score": score, "raw": r.raw}

    def __len__(self) -> int:
        return len(self._mem)

    def get(self, key: str) -> dict | None:
        return self._mem.get(key)

    def put_many(self, entries: dict[str, dict]) -> None:
        new = {k: v for k, v in entries.items() if k not in self._mem and v["label"] != "error"}
        if not new:
            return
        self.store.write([{"key": k, **v} for k, v in new.items()])
        self._mem.update(new)


def judge_cached(judge: Judge, items: list[dict], cache: JudgmentCache | None) -> tuple[list[dict], int]:
    """Judge `items`, reusing cached verdicts; returns (results in item order, number served from cache)."""
    if cache is None:
        return judge.judge(items), 0
    keys = [cache_key(judge, it) for it in items]
    todo: dict[str, dict] = {}
    for k, it in zip(keys, items, strict=True):
        if cache.get(k) is None and k not in todo:
            todo[k] = it
    fresh = dict(zip(todo, judge.judge(list(todo.values())), strict=True)) if todo else {}
    cache.put_many(fresh)
    hits = sum(1 for k in keys if k not in todo)
    return [dict(cache.get(k) or fresh[k]) for k in keys], hits
