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

from dalign.config import STAGES
from dalign.rundir import RunDir


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


def run_stage(name: str, run: RunDir, force: bool = False) -> dict:
    return PIPELINE[name].function()(run, force=force)
