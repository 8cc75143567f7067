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
    inputs_required: bool = True  # the report works with whatever exists

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
        Stage(
            "report",
            "dalign.report.stage:run_report",
            ("judgments", "scores", "selection"),
            ("report.md", "report.html", "results.json", "figures"),
            inputs_required=False,
        ),
    ]
}
assert list(PIPELINE) == STAGES


# The config sections each stage depends on ({section: fields to ignore}), used by `dalign run` to decide what
# can be reused. Stages keep their own, finer fingerprints (data hashes, adapter weights) and refuse mismatches in
# `RunDir.begin`; this coarser view only has to notice config edits. Batch sizes change speed, not results.
CONFIG_VIEW: dict[str, dict[str, list[str] | None]] = {
    "teach": {"teach": ["batch_size"]},
    "filter": {"filter": None, "judge": ["batch_size", "judge"]},
    "sft": {"model": ["adapter", "base", "device"], "sft": None},
    "grpo": {"model": ["adapter", "base", "device"], "grpo": None},
    "sample": {"model": ["device"], "sample": ["batch_size"]},
    "judge": {"judge": ["batch_size"]},
    "score": {"model": ["device"], "score": ["batch_size"]},
    "select": {"select": None},
    "report": {"report": None},
}


def config_view(name: str, run: RunDir) -> dict:
    return fingerprint(run.config, CONFIG_VIEW[name])


def input_signature(stage: Stage, run: RunDir) -> str:
    """Identity of a stage's inputs as they are on disk now (shard names, adapter weights)."""
    parts = {}
    for name in stage.inputs:
        store_dir = run.path / f"{name}.parquet"
        if store_dir.is_dir():
            parts[name] = sorted(p.name for p in store_dir.glob("part-*.parquet"))
        elif (run.path / name).is_dir():
            parts[name] = adapter_fingerprint(run.path / name)
    if stage.name in ("sample", "score"):
        parts["adapter"] = adapter_fingerprint(adapter_dir(run))
    return config_hash(parts)


def plan(run: RunDir, stages: list[str]) -> list[tuple[str, str, str]]:
    """(stage, action, why) for each stage: reuse, resume, run, rerun (config edited) or update (new inputs)."""
    out = []
    for name in stages:
        entry = run.stage_entry(name)
        view = config_view(name, run)
        if not entry:
            out.append((name, "run", "not started"))
        elif entry.get("status") != "done":
            out.append((name, "resume", f"stopped while {entry.get('status', 'unknown')}"))
        elif entry.get("config_view") != view:
            keys = diff_keys(entry.get("config_view") or {}, view)
            out.append((name, "rerun", "config changed: " + ", ".join(keys)))
        elif entry.get("inputs") != input_signature(PIPELINE[name], run):
            out.append((name, "update", "inputs changed since it ran"))
        else:
            out.append((name, "reuse", f"done {entry.get('finished', '')}"))
    return out


def run_stage(name: str, run: RunDir, force: bool = False) -> dict:
    result = PIPELINE[name].function()(run, force=force)
    # Record what the stage consumed, so `dalign run` can skip it next time when nothing changed.
    run._update(name, inputs=input_signature(PIPELINE[name], run), config_view=config_view(name, run))
    return result
