"""The stage table and `dalign run`: stages in order, skipping those already done under the same config.

Each stage is a function `run_<stage>(run: RunDir, force: bool = False) -> dict` in its package's `stage.py`.
It calls `run.begin(stage, fingerprint, outputs, force)` first (which refuses artifacts made under another
config), does its work incrementally (skipping keys already present in its shard store), and ends with
`run.finish(stage, rows=..., warnings=...)`. The returned dict is a short summary for the console.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from dalign.config import STAGES, config_hash, diff_keys
from dalign.rundir import RunDir, adapter_dir, adapter_fingerprint, fingerprint


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    inputs: tuple[str, ...]  # artifacts it reads (parquet stores or directories)
    outputs: tuple[str, ...]

    def function(self) -> Callable[..., dict]:
        module, func = self.target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                raise NotImplementedError(f"stage {self.name!r} is not yet available in this version") from e
            raise
        return getattr(mod, func)


PIPELINE: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("teach", "dalign.teach.stage:run_teach", (), ("traces",)),
        Stage("filter", "dalign.teach.stage:run_filter", ("traces",), ("filtered",)),
        Stage("sft", "dalign.train.sft:run_sft", ("filtered",), ("adapter",)),
        Stage("grpo", "dalign.train.grpo:run_grpo", ("adapter",), ("adapter-grpo",)),
        Stage("sample", "dalign.sample.stage:run_sample", (), ("samples",)),
        Stage("judge", "dalign.judge.stage:run_judge", ("samples",), ("judgments",)),
        Stage("score", "dalign.score.stage:run_score", ("samples",), ("scores",)),
        Stage("select", "dalign.score.select:run_select", ("judgments", "scores"), ("selection",)),
        Stage("report", "dalign.report.stage:run_report", ("judgments", "scores", "selection"), ("report",)),
    ]
}
assert list(PIPELINE) == STAGES


# Config sections each stage depends on ({section: fields to ignore}); fields that change speed but not results
# (batch sizes) are ignored, so changing them never invalidates artifacts.
FINGERPRINT_SECTIONS: dict[str, dict[str, list[str] | None]] = {
    "teach": {"teach": ["batch_size"]},
    "filter": {"teach": ["batch_size"], "filter": None},
    "sft": {"model": ["adapter", "base", "device"], "teach": ["batch_size"], "filter": None, "sft": None},
    "grpo": {"model": ["adapter", "base", "device"], "grpo": None},
    "sample": {"model": ["device"], "sample": ["batch_size"]},
    "judge": {"judge": ["batch_size"]},
    "score": {"model": ["device"], "score": ["batch_size"]},
    "select": {"select": None},
    "report": {"report": None},
}


def stage_fingerprint(name: str, run: RunDir) -> dict:
    """What a stage's outputs depend on: its config sections, plus the adapter's content for model stages."""
    fp = fingerprint(run.config, FINGERPRINT_SECTIONS[name])
    if name in ("sample", "score"):
        fp["adapter"] = adapter_fingerprint(adapter_dir(run))
    if name == "grpo":
        fp["sft_adapter"] = adapter_fingerprint(run.path / "adapter") if (run.path / "adapter").exists() else None
    return fp


def input_signature(stage: Stage, run: RunDir) -> str:
    """Identity of a stage's inputs as they are on disk now (shard names, adapter weights)."""
    parts = {}
    for name in stage.inputs:
        store_dir = run.path / f"{name}.parquet"
        if store_dir.is_dir():
            parts[name] = sorted(p.name for p in store_dir.glob("part-*.parquet"))
        elif (run.path / name).is_dir():
            parts[name] = adapter_fingerprint(run.path / name)
    return config_hash(parts)


def plan(run: RunDir, stages: list[str]) -> list[tuple[str, str, str]]:
    """(stage, action, why) for each stage: reuse, resume, run or redo."""
    out = []
    for name in stages:
        entry = run.stage_entry(name)
        fp = stage_fingerprint(name, run)
        if not entry:
            out.append((name, "run", "not started"))
        elif entry.get("fingerprint") is not None and config_hash(entry["fingerprint"]) != config_hash(fp):
            keys = diff_keys(entry["fingerprint"], fp)
            out.append((name, "redo", "config changed: " + ", ".join(keys)))
        elif entry.get("status") != "done":
            out.append((name, "resume", f"stopped while {entry.get('status', 'unknown')}"))
        elif entry.get("inputs") != input_signature(PIPELINE[name], run):
            out.append((name, "update", "inputs changed since it ran"))
        else:
            out.append((name, "reuse", f"done {entry.get('finished', '')}"))
    return out


def run_stage(name: str, run: RunDir, force: bool = False) -> dict:
    result = PIPELINE[name].function()(run, force=force)
    # Record what the stage consumed, so `dalign run` can skip it next time when nothing changed.
    run._update(name, inputs=input_signature(PIPELINE[name], run))
    return result
