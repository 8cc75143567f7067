"""`dalign run` end to end on a tiny model: every stage, reuse, resume after SIGKILL, bad configs."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from tiny import kill_after_shards, write_prompt_files

from dalign.config import ConfigError, load_config, to_yaml
from dalign.pipeline import plan
from dalign.rundir import RunDir, StageMismatch
from dalign.runner import run_pipeline


def tiny_config(tmp_path: Path, tiny_dir: Path, name: str = "e2e", **sample_over):
    harmful, math = write_prompt_files(tmp_path)
    common = {"name": "file", "path": str(harmful), "prompt_field": "q", "id_field": "id", "seed": 0}
    cfg = {
        "name": name,
        "runs_dir": str(tmp_path / "runs"),
        "stages": ["teach", "filter", "sft", "sample", "judge", "score", "select", "report"],
        "model": {"student": f"hf:{tiny_dir}"},
        "teach": {"teacher": "corpus", "limit": 12},
        "filter": {"judge": "refusal"},
        "judge": {"judges": ["refusal"]},
        "sft": {"max_steps": 1, "per_device_batch_size": 2, "effective_batch_size": 2, "max_length": 1024},
        "sample": {
            "n": 4,
            "max_new_tokens": 10,
            "batch_size": 8,
            "datasets": [
                {**common, "benchmark": "harm", "limit": 6},
                {**common, "benchmark": "harm-cal", "role": "calibration", "offset": 6, "limit": 2},
                {
                    "name": "file",
                    "path": str(math),
                    "prompt_field": "q",
                    "id_field": "id",
                    "answer_field": "a",
                    "benchmark": "math",
                },
            ],
            **sample_over,
        },
        "score": {"layers": "all"},
        "report": {"bootstrap": 50},
    }
    return load_config(overrides=cfg)


def _recompute_asr(run: RunDir, bench: str, selector: str) -> float:
    sel = run.read("selection")
    sel = sel[(sel.benchmark == bench) & (sel.selector == selector)]
    j = run.read("judgments")
    j = j[j.benchmark == bench]
    merged = sel.merge(
        j,
        left_on=["benchmark", "prompt_id", "chosen_candidate"],
        right_on=["benchmark", "prompt_id", "candidate"],
    )
    valid = merged[merged.label.isin(["safe", "unsafe"])]
    return (valid.label == "unsafe").mean()


def test_end_to_end_reuse_and_changes(tmp_path, tiny_dir):
    cfg = tiny_config(tmp_path, tiny_dir)
    t = time.perf_counter()
    results = run_pipeline(cfg)
    assert time.perf_counter() - t < 120
    assert set(results) == set(cfg.stages)
    run = RunDir(cfg.run_dir)
    for f in (
        "report.md",
        "report.html",
        "results.json",
        "config.yaml",
        "manifest.json",
        "adapter/card.json",
    ):
        assert (run.path / f).exists(), f
    res = json.loads((run.path / "results.json").read_text())
    assert "harm" in res["safety"] and "math" in res["utility"]
    assert "harm-cal" not in res["safety"], "calibration prompts never enter reported numbers"
    for selector, r in res["safety"]["harm"]["selectors"].items():
        if r["valid"]:
            assert r["value"] == pytest.approx(_recompute_asr(run, "harm", selector)), selector
    scores = run.read("scores")
    assert set(scores.loc[scores.metric == "latent_similarity", "layer"].dropna().astype(int)) == {1, 2, 3, 4}

    # everything is reused on a second run, and a dry run says so
    assert {a for _, a, _ in plan(run, cfg.stages)} == {"reuse"}
    assert run_pipeline(cfg) == {}

    # a sampling change is refused (its artifacts exist), and --force redoes it
    changed = tiny_config(tmp_path, tiny_dir, temperature=1.0)
    steps = dict((s, a) for s, a, _ in plan(RunDir(changed.run_dir, changed), changed.stages))
    assert steps["sample"] == "rerun" and steps["teach"] == "reuse"
    with pytest.raises(StageMismatch, match="sample.temperature"):
        run_pipeline(changed)
    run_pipeline(changed, from_="sample", force=True)
    assert RunDir(changed.run_dir).made_with("samples").sample.temperature == 1.0


def test_impossible_order_is_explained(tmp_path, tiny_dir):
    cfg = tiny_config(tmp_path, tiny_dir, name="fresh")
    with pytest.raises(ValueError, match="needs 'samples'.*'sample'"):
        run_pipeline(cfg, only="score")
    with pytest.raises(ValueError, match="not a stage"):
        run_pipeline(cfg, from_="smaple")


def test_unknown_key_suggests_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sampel:\n  n: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'sample'"):
        load_config(p)


def test_report_on_incomplete_run_lists_missing(tmp_path, tiny_dir):
    cfg = tiny_config(tmp_path, tiny_dir, name="partial")
    cfg.stages = ["teach", "filter", "sft", "sample", "report"]
    run_pipeline(cfg)
    res = json.loads((cfg.run_dir / "results.json").read_text())
    assert any("judgments" in m for m in res["missing"])


def test_cli_run_resumes_after_sigkill_in_sample(tmp_path, tiny_dir):
    cfg = tiny_config(tmp_path, tiny_dir, name="killed", batch_size=2, max_new_tokens=48)
    cfg.stages = ["sample"]
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(to_yaml(cfg))
    dalign = [sys.executable, "-m", "dalign.cli", "run", str(cfg_file)]
    store = RunDir(cfg.run_dir, cfg).store("samples")
    before = kill_after_shards(dalign, store)
    total = (6 + 2 + 3) * 4
    assert 0 < before < total
    out = subprocess.run(dalign, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    df = pd.concat([pd.read_parquet(f) for f in store.files()])
    assert len(df) == total and not df.duplicated(["benchmark", "prompt_id", "candidate"]).any()
