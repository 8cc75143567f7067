"""sample.models: base and teacher sampled on the same prompts and seeds, judged, and compared in the report."""

import json
from pathlib import Path

import pandas as pd
import pytest
from tiny import write_prompt_files

from dalign.config import load_config
from dalign.pipeline import plan
from dalign.rundir import RunDir
from dalign.runner import run_pipeline


def _config(tmp_path: Path, tiny_dir, adapter, teacher, **over):
    harmful, math = write_prompt_files(tmp_path)
    common = {"name": "file", "path": str(harmful), "prompt_field": "q", "id_field": "id", "seed": 0}
    cfg = {
        "name": "models",
        "runs_dir": str(tmp_path / "runs"),
        "stages": ["sample", "judge", "score", "select", "report"],
        "model": {"student": f"hf:{tiny_dir}", "adapter": str(adapter), "think_prefix": True},
        "teach": {"teacher": f"hf:{teacher}"},
        "judge": {"judges": ["refusal"]},
        "sample": {
            "n": 3,
            "max_new_tokens": 8,
            "batch_size": 4,
            "models": ["aligned", "base", "teacher"],
            "datasets": [
                {**common, "benchmark": "harm", "limit": 5},
                {**common, "benchmark": "harm-cal", "role": "calibration", "offset": 5, "limit": 2},
                {"name": "file", "path": str(math), "prompt_field": "q", "id_field": "id", "answer_field": "a",
                 "benchmark": "math"},
            ],
        },
        "score": {"metrics": ["latent_similarity", "random"], "layers": [2]},
        "select": {"default_layer": 2},
        "report": {"bootstrap": 20},
    }  # fmt: skip
    cfg.update(over)
    return load_config(overrides=cfg)


def test_base_and_teacher_are_sampled_judged_and_compared(
    tmp_path, tiny_dir, tiny_adapter_dir, tiny_qwen_dir
):
    from dalign.models import load_model, prompt_ids
    from dalign.sample.sampler import sample_batch

    cfg = _config(tmp_path, tiny_dir, tiny_adapter_dir, tiny_qwen_dir)
    assert {"sample-base", "sample-teacher", "judge-models"} <= set(cfg.stages)  # implied by sample.models
    run_pipeline(cfg)
    run = RunDir(cfg.run_dir)
    aligned, base, teacher = run.read("samples"), run.read("samples-base"), run.read("samples-teacher")
    key = ["benchmark", "prompt_id", "candidate"]
    for other, name in ((base, "base"), (teacher, "teacher")):
        assert set(other["model"]) == {name}
        pd.testing.assert_frame_equal(  # the same prompts, candidates and seeds as the aligned model
            aligned[[*key, "seed"]].sort_values(key).reset_index(drop=True),
            other[[*key, "seed"]].sort_values(key).reset_index(drop=True),
        )

    # base = the student without its adapter, in its plain chat format (no <think> prefix), seed by seed
    model, tok = load_model(f"hf:{tiny_dir}", "float32")
    for row in base.head(4).itertuples():
        ids = prompt_ids(tok, row.prompt, None, think_prefix=False)[0]
        assert list(row.prompt_token_ids) == ids
        (g,) = sample_batch(model, tok, [ids], [int(row.seed)], temperature=0.7, max_new_tokens=8)
        assert list(row.token_ids) == g.token_ids
    assert list(base["prompt_token_ids"].iloc[0]) != list(
        aligned.set_index(key).loc[tuple(base[key].iloc[0]), "prompt_token_ids"]
    )  # the aligned student's prompt ends with the think prefix

    # every candidate of both models judged once per judge; utility rows by their checker
    jm = run.read("judgments-models")
    assert len(jm) == len(base) + len(teacher)
    assert not jm.duplicated(["model", *key, "judge"]).any()
    assert set(jm.loc[jm.benchmark == "math", "judge"]) == {"number"}

    # the per-model table recomputed from the parquet files: candidate 0's label, eval prompts only
    res = json.loads((run.path / "results.json").read_text())
    assert "harm-cal" not in res["models"]

    def rate(judgments, bench, positive):
        j = judgments[(judgments.benchmark == bench) & (judgments.candidate == 0)]
        valid = j[j.label.isin([positive, "safe" if positive == "unsafe" else "wrong"])]
        return (valid.label == positive).mean()

    for bench, positive in (("harm", "unsafe"), ("math", "correct")):
        got = res["models"][bench]["models"]
        assert got["aligned"]["value"] == pytest.approx(rate(run.read("judgments"), bench, positive))
        for m in ("base", "teacher"):
            assert got[m]["value"] == pytest.approx(rate(jm[jm.model == m], bench, positive)), (bench, m)
            tokens = (base if m == "base" else teacher).query("benchmark == @bench")["n_tokens"].mean()
            assert got[m]["mean_tokens"] == pytest.approx(tokens)
        guard = got["aligned + guard"]
        assert (
            guard["value"]
            == res["safety" if positive == "unsafe" else "utility"][bench]["selectors"][guard["selector"]][
                "value"
            ]
        )
    md = (run.path / "report.md").read_text()
    assert "Models compared (alignment gap)" in md and "aligned + guard" in md
    assert (run.path / "figures" / "models_alignment_gap.png").is_file()
    assert res["lengths"]["compare"] and {r["model"] for r in res["lengths"]["rows"]} == {
        "aligned",
        "base",
        "teacher",
    }

    # base samples depend on neither the adapter nor the teacher (what lets a sweep share them); the aligned
    # samples do not depend on which other models are compared
    import shutil

    adapter = shutil.copytree(tiny_adapter_dir, tmp_path / "other-adapter")
    card = json.loads((adapter / "card.json").read_text())
    (adapter / "card.json").write_text(json.dumps({**card, "note": "another adapter"}))
    other = _config(tmp_path, tiny_dir, adapter, tiny_dir)
    steps = dict((s, a) for s, a, _ in plan(RunDir(other.run_dir, other), other.stages))
    assert steps["sample-base"] == "reuse" and steps["sample-teacher"] == "rerun"
    fewer = _config(tmp_path, tiny_dir, tiny_adapter_dir, tiny_qwen_dir)
    fewer.sample.models = ["aligned"]
    steps = dict((s, a) for s, a, _ in plan(RunDir(fewer.run_dir, fewer), fewer.stages))
    assert steps["sample"] == "reuse" and steps["sample-base"] == "skip"


def test_teacher_needs_a_local_model(tmp_path, tiny_dir, tiny_adapter_dir):
    from dalign.sample.stage import run_sample_teacher

    cfg = _config(tmp_path, tiny_dir, tiny_adapter_dir, tiny_dir)
    cfg.teach.teacher = "corpus"
    with pytest.raises(ValueError, match="only a teacher model"):
        run_sample_teacher(RunDir(cfg.run_dir, cfg))
    with pytest.raises(ValueError, match="must list aligned"):
        load_config(overrides={"sample": {"models": ["base"]}})
