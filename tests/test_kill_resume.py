"""SIGKILL every stage that writes at a seeded point of its work, rerun it, and get the uninterrupted artifacts.

One uninterrupted run of the whole tiny pipeline is the reference; each stage then reruns on a copy without its
outputs, is killed (a real SIGKILL of the subprocess group), and finishes on the next run. benchmarks/
resume_integrity.py does the same with K >= 5 kill points per stage.
"""

from __future__ import annotations

import random

import pytest
from tiny import kill_resume_stage, pipeline_config, stage_seconds

from dalign.config import load_config
from dalign.runner import run_pipeline

STAGES = ["teach", "filter", "sft", "grpo", "sample", "judge", "score", "select", "report"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("kill-ref")
    cfg = load_config(overrides=pipeline_config(root, tiny_dir, name="reference"))
    cfg.stages = STAGES
    run_pipeline(cfg)
    return cfg.run_dir


@pytest.mark.parametrize("stage", STAGES)
def test_kill_anywhere_then_rerun_gives_the_same_artifacts(stage, reference, tmp_path):
    rng = random.Random(f"kill-{stage}")  # seeded per stage: the same kill point on every run of the suite
    delay = rng.uniform(0.1, 0.7) * stage_seconds(reference, stage)  # inside the work, after start-up
    result = kill_resume_stage(reference, tmp_path / "killed", stage, [delay])
    assert result["rows_lost"] == 0 and result["rows_duplicated"] == 0, result
    assert result["equal"], result
